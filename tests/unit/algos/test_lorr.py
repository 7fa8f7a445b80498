"""LoRR's arithmetic of recipe.algos.lorr (Reset Replay, arXiv 2508.06412, PAPERS.md §3):
shrink-and-perturb reset towards theta_0, its schedule, the SFT weight lambda_k and the
Bernoulli draw that reuses the initial pairs. Every expected number is computed by hand.
CPU only, no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recipe.algos.lorr import (
    interpolate_,
    module_matches,
    reset_due,
    reset_named_parameters_,
    reuse_initial,
    sft_weight,
    snapshot,
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
