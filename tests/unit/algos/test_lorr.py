"""LoRR's arithmetic of recipe.algos.lorr (Reset Replay, arXiv 2508.06412, PAPERS.md §3):
shrink-and-perturb reset towards theta_0, its schedule, the SFT weight lambda_k and the
Bernoulli draw that reuses the initial pairs. Every expected number is computed by hand.
CPU only, no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recipe.algos.lorr import (
    StepPlan,
    epoch_lambdas,
    interpolate_,
    mini_batches,
    module_matches,
    reset_due,
    reset_epochs,
    reset_named_parameters_,
    reuse_initial,
    schedule,
    sft_weight,
    snapshot,
    step_role,
)

# --------------------------------------------------------------------------- reset


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Module()
        self.mlp.up_proj = torch.nn.Linear(3, 4)
        self.mlp.down_proj = torch.nn.Linear(4, 3)


def test_module_matches():
    assert module_matches("model.layers.0.mlp.down_proj.weight")
    assert not module_matches("model.layers.0.mlp.up_proj.weight")
    assert module_matches("model.layers.10.self_attn.q_proj.weight", r"layers\.1\d\..*q_proj")
    assert not module_matches("model.layers.1.self_attn.q_proj.weight", r"layers\.1\d\..*q_proj")


def test_interpolate_values_identity_and_restore():
    p = torch.tensor([1.0, 3.0])
    assert interpolate_(p, torch.tensor([3.0, -1.0]), 0.5) is p
    assert p.tolist() == [2.0, 1.0]  # 0.5 * [1, 3] + 0.5 * [3, -1]
    q = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    before = q.clone()
    interpolate_(q, torch.randn(5, 7), 1.0)
    assert torch.equal(q, before)  # bit-identical
    theta0 = torch.randn(5, 7)
    interpolate_(q, theta0, 0.0)
    assert torch.equal(q, theta0)
    p = torch.tensor([1.0, 3.0])
    interpolate_(p, torch.tensor([3.0, -1.0]), 0.25)
    assert p.tolist() == [2.5, 0.0]  # 0.25 * [1, 3] + 0.75 * [3, -1]


def test_interpolate_bf16_param_float_theta0_and_errors():
    p = torch.tensor([1.0, 2.0], dtype=torch.bfloat16)
    interpolate_(p, torch.tensor([2.0, 4.0]), 0.5)
    assert p.dtype == torch.bfloat16 and p.tolist() == [1.5, 3.0]
    for bad in (1.5, -0.1, float("nan"), True):
        with pytest.raises(ValueError, match="alpha"):
            interpolate_(torch.zeros(2), torch.zeros(2), bad)
    with pytest.raises(ValueError, match="shape"):
        interpolate_(torch.zeros(2), torch.zeros(3), 0.5)


def test_reset_only_matching_modules_of_a_model():
    torch.manual_seed(0)
    model = Tiny()
    theta0 = snapshot(model.named_parameters(), "down_proj")
    assert sorted(theta0) == ["mlp.down_proj.bias", "mlp.down_proj.weight"]
    assert all(v.device.type == "cpu" and not v.requires_grad for v in theta0.values())
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # "training"
    assert torch.equal(theta0["mlp.down_proj.weight"], init["mlp.down_proj.weight"])  # snapshot is a copy
    changed = reset_named_parameters_(model.named_parameters(), theta0, 0.5, "down_proj")
    assert changed == ["mlp.down_proj.weight", "mlp.down_proj.bias"]
    for n, p in model.named_parameters():
        expected = init[n] + (0.5 if "down_proj" in n else 1.0)  # 0.5 (theta0 + 1) + 0.5 theta0
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6)
        assert p.requires_grad and isinstance(p, torch.nn.Parameter)


def test_reset_through_views_writes_to_the_parameters():
    # what FSDP2 gives after DTensor.to_local(): a non-leaf view that requires grad
    model = Tiny()
    theta0 = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    views = [(n, p.view_as(p)) for n, p in model.named_parameters()]
    assert all(v.requires_grad and v.grad_fn is not None for _, v in views)
    changed = reset_named_parameters_(views, theta0, 0.0, "proj")
    assert len(changed) == 4 and all(torch.equal(p, torch.zeros_like(p)) for p in model.parameters())


def test_reset_missing_initial_value_names_parameter():
    model = Tiny()
    theta0 = snapshot(model.named_parameters(), "down_proj.weight")
    with pytest.raises(KeyError, match=r"mlp\.down_proj\.bias"):
        reset_named_parameters_(model.named_parameters(), theta0, 0.5, "down_proj")


def test_sft_weight_schedule_and_errors():
    assert [sft_weight(k, 0.25, 0.5) for k in range(4)] == [0.0, 0.25, 0.5, 0.5]
    assert [sft_weight(k, 0.0, 0.5) for k in range(3)] == [0.0, 0.0, 0.0]
    assert sft_weight(10, 0.1, 0.5) == 0.5
    with pytest.raises(ValueError, match="k"):
        sft_weight(-1, 0.25, 0.5)
    with pytest.raises(ValueError, match=r"lorr\.sft"):
        sft_weight(1, -0.25, 0.5)


def test_reset_due():
    assert [reset_due(c, 3) for c in range(8)] == [False, False, False, True, False, False, True, False]
    assert [reset_due(c, 1) for c in range(3)] == [False, True, True]
    assert not any(reset_due(c, 0) for c in range(5))


# --------------------------------------------------------------------------- reuse of the initial pairs


def test_reuse_initial_no_draw_before_a_reset_or_without_initial_pairs():
    rng = np.random.default_rng(7)
    state = rng.bit_generator.state
    for resets, has_initial in ((0, True), (-1, True), (1, False), (3, False), (0, False)):
        assert reuse_initial(rng, 0.0, resets, has_initial) is False  # ratio 0 would always reuse if drawn
        assert reuse_initial(rng, 1.0, resets, has_initial) is False
    assert rng.bit_generator.state == state  # the generator did not advance


def test_reuse_initial_draw_by_hand_with_a_seeded_rng():
    ratio = 0.5
    draws = np.random.default_rng(123).random(8)  # the numbers the stage's generator will produce
    want = [bool(u >= ratio) for u in draws]  # reuse when the draw is not a "fresh rollout" (u < ratio)
    # seed 123: 0.682, 0.054, 0.220, 0.184, 0.176, 0.812, 0.923, 0.277
    assert want == [True, False, False, False, False, True, True, False]
    rng = np.random.default_rng(123)
    got = [reuse_initial(rng, ratio, resets=1, has_initial=True) for _ in draws]
    assert got == want and all(type(g) is bool for g in got)
    # one draw per call: the generator is where 8 draws leave it
    ref = np.random.default_rng(123)
    ref.random(8)
    assert rng.random() == ref.random()


def test_reuse_initial_ratio_edges():
    rng = np.random.default_rng(0)
    # rollout_ratio 1: always fresh rollouts (u >= 1 never happens); 0: always reuse (u >= 0 always)
    assert not any(reuse_initial(rng, 1.0, 2, True) for _ in range(50))
    assert all(reuse_initial(rng, 0.0, 2, True) for _ in range(50))
    # the first draw of seed 0 is 0.6369...: reused at ratio 0.6, fresh at 0.7
    assert np.random.default_rng(0).random() == pytest.approx(0.6369616873214543)
    assert reuse_initial(np.random.default_rng(0), 0.6, 1, True) is True
    assert reuse_initial(np.random.default_rng(0), 0.7, 1, True) is False


# --------------------------------------------------------------------------- iteration schedule


def test_step_role_collection_then_training():
    # 3 rollout steps: collect, collect, collect + train
    assert [step_role(p, 3, False) for p in range(3)] == [(True, False), (True, False), (True, True)]
    assert step_role(0, 1, False) == (True, True)  # one step per iteration
    assert step_role(0, 3, True) == (False, True)  # a reuse iteration: one step, no rollouts
    for bad in ((3, 3, False), (1, 3, True), (-1, 2, False)):
        with pytest.raises(ValueError, match="outside an iteration"):
            step_role(*bad)
    with pytest.raises(ValueError, match="rollout_steps"):
        step_role(0, 0, False)


def test_epoch_lambdas_restart_each_iteration():
    assert epoch_lambdas(3, 0.25, 0.5) == (0.0, 0.25, 0.5)
    assert epoch_lambdas(5, 0.25, 0.5) == (0.0, 0.25, 0.5, 0.5, 0.5)  # capped
    assert epoch_lambdas(3, 0.25, 0.5, enable=False) == (0.0, 0.0, 0.0)
    assert epoch_lambdas(1, 0.25, 0.5) == (0.0,)
    with pytest.raises(ValueError, match="lorr.replays"):
        epoch_lambdas(0, 0.25, 0.5)


def test_reset_epochs_units():
    # after the last epoch of every iteration (the default) / every 2nd iteration
    assert [reset_epochs(3, i, 3 * (i - 1), 1, "iterations") for i in (1, 2, 3)] == [(2,), (2,), (2,)]
    assert [reset_epochs(3, i, 3 * (i - 1), 2, "iterations") for i in (1, 2, 3, 4)] == [(), (2,), (), (2,)]
    # every 2 epochs over the run: epochs 2, 4, 6 -> iteration 1 after its 2nd, iteration 2 after
    # its 1st (epoch 4) and 3rd (epoch 6)
    assert reset_epochs(3, 1, 0, 2, "epochs") == (1,)
    assert reset_epochs(3, 2, 3, 2, "epochs") == (0, 2)
    assert reset_epochs(3, 2, 3, 2, "replays") == (0, 2)  # alias
    assert reset_epochs(3, 1, 0, 1, "iterations", enable=False) == ()
    with pytest.raises(ValueError, match="lorr.reset.unit"):
        reset_epochs(3, 1, 0, 1, "steps")


def test_mini_batches_by_hand():
    assert mini_batches(10, 4) == [4, 4, 2]
    assert mini_batches(10, None) == [10]
    assert mini_batches(10, 10) == [10] and mini_batches(10, 32) == [10]
    assert mini_batches(0, 4) == []
    assert mini_batches(12, 4) == [4, 4, 4]
    # whole micro-batches on every rank: 2 ranks x 2 pairs -> full mini-batches of 4, not 5
    assert mini_batches(11, 5, multiple=4) == [4, 4, 3]
    assert mini_batches(11, 3, multiple=4) == [4, 4, 3]  # at least one multiple
    assert mini_batches(7, 4, multiple=8) == [7]


def test_schedule_lorr_three_iterations_by_hand():
    """The LoRR defaults with 2 rollout steps per iteration, L = 3, a reset after each
    iteration, and iteration 3 reusing the initial pairs: steps 1-2 iteration 1 (collect,
    collect + train), 3-4 iteration 2, 5 iteration 3 (reuse: no rollouts, trains), 6-7
    iteration 4."""
    plan = schedule(7, rollout_steps=2, epochs=3, reuse=[False, False, True])
    lam = (0.0, 0.25, 0.5)
    assert plan == [
        StepPlan(1, 1, collect=True, train=False, reuse=False),
        StepPlan(2, 1, True, True, False, lam, (2,), True),
        StepPlan(3, 2, True, False, False),
        StepPlan(4, 2, True, True, False, lam, (2,), True),
        StepPlan(5, 3, False, True, True, lam, (2,), True),
        StepPlan(6, 4, True, False, False),
        StepPlan(7, 4, True, True, False, lam, (2,), True),
    ]
    # epochs trained: 3 per training step -> 12 in 7 steps; resets: 4
    assert sum(len(p.lambdas) for p in plan) == 12 and sum(len(p.resets_after) for p in plan) == 4


def test_schedule_iterative_dpo_and_reset_every_epochs():
    plan = schedule(4, rollout_steps=1, epochs=1, sft=False, reset=False)
    assert [(p.iteration, p.train, p.lambdas, p.resets_after) for p in plan] == [
        (1, True, (0.0,), ()), (2, True, (0.0,), ()), (3, True, (0.0,), ()), (4, True, (0.0,), ())]
    # L = 3, reset every 2 epochs over the run, 3 rollout steps: trains at steps 3 and 6
    plan = schedule(6, rollout_steps=3, epochs=3, every=2, unit="epochs")
    assert [p.step for p in plan if p.train] == [3, 6]
    assert [p.resets_after for p in plan if p.train] == [(1,), (0, 2)]  # epochs 2 | 4, 6
    assert not any(p.refresh_reference for p in plan if not p.train)
    assert [p.refresh_reference for p in schedule(2, 1, 1, reference=False)] == [False, False]
