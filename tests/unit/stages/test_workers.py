"""Tests of this project's actor worker methods (recipe/stages/workers.py) without Ray or
verl worker processes.

The worker is built without ``__init__`` (``RecipeActorRolloutRefWorker.__new__``: verl's
``Worker`` defines no ``__new__`` of its own, so nothing reads the Ray environment) and gets
fake ``actor`` / ``ref`` handles: ``SimpleNamespace(engine=SimpleNamespace(module=...,
optimizer=...), set_loss_fn=...)`` around a tiny ``torch.nn.Module`` whose parameter names
follow a HF decoder (``model.layers.0.mlp.down_proj.weight``).

The methods are decorated with verl's ``register(dispatch_mode=Dispatch.ONE_TO_ALL)``.
``register`` (verl.single_controller.base.decorator) only attaches the dispatch attributes
(``MAGIC_ATTR``) to a ``functools.wraps`` wrapper; that wrapper, and the ``tqbridge``
wrapper inside it, call the original function unchanged unless an argument is a
TransferQueue ``BatchMeta`` / ``KVBatchMeta`` (none is here). So calling the method on the
instance runs its body directly; the original is also reachable through the ``__wrapped__``
chain (``type(w).recipe_lorr_reset.__wrapped__...``), which these tests do not need.

Expected values are hand computed (exact in float32: multiples of 1/4).
"""

from __future__ import annotations

import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from tensordict import TensorDict

import recipe.stages.workers as workers_mod
from recipe.config import PreferenceConfig
from recipe.stages.workers import RecipeActorRolloutRefWorker, preference_loss, theta0_fingerprint
from verl.single_controller.base.decorator import MAGIC_ATTR, Dispatch
from verl.utils import tensordict_utils as tu

DOWN0 = "model.layers.0.mlp.down_proj.weight"
DOWN1 = "model.layers.1.mlp.down_proj.weight"
UP0 = "model.layers.0.mlp.up_proj.weight"
EMBED = "model.embed_tokens.weight"

#: theta_0: the actor's weights when the snapshot is taken
THETA0 = {
    EMBED: [[1.0, 2.0], [3.0, 4.0]],
    DOWN0: [[0.5, -1.0], [2.0, 0.0]],
    UP0: [1.0, -1.0],
    DOWN1: [4.0, 0.0, -2.0],
}
#: the actor's weights after some training
TRAINED = {
    EMBED: [[9.0, 9.0], [9.0, 9.0]],
    DOWN0: [[1.5, -2.0], [2.0, 1.0]],
    UP0: [7.0, 7.0],
    DOWN1: [0.0, 0.0, 2.0],
}


def build_module(params: dict[str, list]) -> torch.nn.Module:
    """A module whose ``named_parameters`` are exactly ``params`` (dotted names), in order."""
    root = torch.nn.Module()
    for name, value in params.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            if part not in mod._modules:
                mod.add_module(part, torch.nn.Module())
            mod = mod._modules[part]
        mod.register_parameter(leaf, torch.nn.Parameter(torch.tensor(value, dtype=torch.float32)))
    return root


def handle(module: torch.nn.Module, optimizer=None):
    loss_fns = []
    return SimpleNamespace(engine=SimpleNamespace(module=module, optimizer=optimizer),
                           set_loss_fn=loss_fns.append, loss_fns=loss_fns)


def make_worker(actor: dict | None = THETA0, ref: dict | None = None) -> RecipeActorRolloutRefWorker:
    w = RecipeActorRolloutRefWorker.__new__(RecipeActorRolloutRefWorker)
    if actor is not None:
        module = build_module(actor)
        w.actor = handle(module, torch.optim.Adam(module.parameters(), lr=0.1))
    w.ref = None if ref is None else handle(build_module(ref))
    return w


def params(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def set_params(module, values: dict[str, list]) -> None:
    with torch.no_grad():
        for n, p in module.named_parameters():
            p.copy_(torch.tensor(values[n]))


def t(v):
    return torch.tensor(v, dtype=torch.float32)


def test_methods_are_registered_one_to_all():
    names = ["recipe_set_preference_loss", "recipe_sync_reference", "recipe_lorr_snapshot", "recipe_lorr_reset",
             "recipe_lorr_save", "recipe_lorr_load", "recipe_reference_save", "recipe_reference_load"]
    for name in names:
        attrs = getattr(getattr(RecipeActorRolloutRefWorker, name), MAGIC_ATTR)
        assert attrs["dispatch_mode"] == Dispatch.ONE_TO_ALL, name
    assert list(params(build_module(THETA0))) == [EMBED, DOWN0, UP0, DOWN1]


# ----------------------------------------------------------------------------- loss switch
def test_set_preference_loss_keeps_actor_config_and_installs_loss():
    w = make_worker()

    def ppo_loss(config, model_output, data, dp_group=None):  # verl's loss_fn stand-in
        raise AssertionError

    w.loss_fn = partial(ppo_loss, config="ACTOR_CONFIG")
    assert w.recipe_set_preference_loss({"loss": "ipo", "beta": 0.25}) == "ipo"
    assert w.loss_fn.func is preference_loss
    assert w.loss_fn.keywords["config"] == "ACTOR_CONFIG"
    assert w.loss_fn.keywords["pref"].loss == "ipo" and w.loss_fn.keywords["pref"].beta == 0.25
    assert w.actor.loss_fns == [w.loss_fn]


# ----------------------------------------------------------------------------- reference sync
def test_sync_reference_copies_every_parameter():
    w = make_worker(TRAINED, ref=THETA0)
    assert w.recipe_sync_reference() == 4
    ref = params(w.ref.engine.module)
    for name, value in TRAINED.items():
        assert torch.equal(ref[name], t(value)), name
    # a copy, not shared storage: training the actor further leaves the reference alone
    with torch.no_grad():
        dict(w.actor.engine.module.named_parameters())[DOWN0].add_(1.0)
    assert torch.equal(params(w.ref.engine.module)[DOWN0], t(TRAINED[DOWN0]))


def test_sync_reference_refuses_other_names_shapes_or_no_reference():
    w = make_worker(TRAINED, ref={**THETA0, "model.extra.weight": [1.0]})
    with pytest.raises(RuntimeError, match=r"the actor \(recipe_sync_reference\) and the reference model differ in "
                                           r"parameters: \['model.extra.weight'\]"):
        w.recipe_sync_reference()
    w = make_worker(TRAINED, ref={**THETA0, DOWN1: [1.0, 2.0, 3.0, 4.0]})
    with pytest.raises(RuntimeError, match=rf"{DOWN1}: shard of shape \(3,\) in the actor \(recipe_sync_reference\), "
                                           r"\(4,\) in the reference model \(sharded differently\)"):
        w.recipe_sync_reference()
    # nothing was copied before the mismatch was found
    assert torch.equal(params(w.ref.engine.module)[EMBED], t(THETA0[EMBED]))
    with pytest.raises(RuntimeError, match="no reference model"):
        make_worker(TRAINED, ref=None).recipe_sync_reference()


def test_reference_save_load_restores_the_iteration_start_reference(tmp_path):
    """A checkpoint inside an iteration keeps the reference (the policy of the iteration's
    start); loading it into a reference that a fresh start made the initial model restores
    it exactly, with the same fingerprint."""
    w = make_worker(TRAINED, ref=TRAINED)
    saved_fp = w.recipe_reference_save(str(tmp_path))
    assert (tmp_path / "reference_rank0.pt").exists()
    fresh = make_worker(THETA0, ref=THETA0)  # a resumed process: reference = the initial model
    assert fresh.recipe_reference_load(str(tmp_path)) == saved_fp
    for name, value in TRAINED.items():
        assert torch.equal(params(fresh.ref.engine.module)[name], t(value)), name
    assert make_worker(THETA0, ref=THETA0).recipe_reference_load(str(tmp_path / "absent")) is None
    other = make_worker(THETA0, ref={**THETA0, DOWN1: [1.0, 2.0, 3.0, 4.0]})
    with pytest.raises(RuntimeError, match=rf"{DOWN1}: shard of shape \(3,\) in .*reference_rank0.pt, \(4,\) in the "
                                           r"reference model \(saved with another number of ranks\?\)"):
        other.recipe_reference_load(str(tmp_path))
    extra = make_worker(THETA0, ref={**THETA0, "model.extra.weight": [1.0]})
    with pytest.raises(RuntimeError, match=r"reference_rank0.pt and the reference model differ in parameters: "
                                           r"\['model.extra.weight'\]"):
        extra.recipe_reference_load(str(tmp_path))


# ----------------------------------------------------------------------------- LoRR snapshot / reset
def test_snapshot_keeps_cpu_copies_of_matching_params():
    w = make_worker(THETA0)
    out = w.recipe_lorr_snapshot("down_proj")
    assert out == {"tensors": 2, "numel": 4 + 3, "fingerprint": theta0_fingerprint(w._theta0)}
    assert sorted(w._theta0) == [DOWN0, DOWN1]
    assert all(v.device.type == "cpu" and not v.requires_grad for v in w._theta0.values())
    set_params(w.actor.engine.module, TRAINED)  # copies: the snapshot keeps theta_0
    assert torch.equal(w._theta0[DOWN0], t(THETA0[DOWN0])) and torch.equal(w._theta0[DOWN1], t(THETA0[DOWN1]))
    assert w.recipe_lorr_snapshot(r"layers\.0\.")["tensors"] == 2  # down_proj and up_proj of layer 0
    assert sorted(w._theta0) == [DOWN0, UP0]


def test_snapshot_without_match_names_the_config_key():
    w = make_worker(THETA0)
    with pytest.raises(ValueError, match=r"lorr.reset.pattern='o_proj' matches no actor parameter"):
        w.recipe_lorr_snapshot("o_proj")
    with pytest.raises(RuntimeError, match="before recipe_lorr_snapshot"):
        make_worker(THETA0).recipe_lorr_reset(0.5, "down_proj")


def trained_worker_with_adam_state() -> RecipeActorRolloutRefWorker:
    w = make_worker(THETA0)
    w.recipe_lorr_snapshot("down_proj")
    set_params(w.actor.engine.module, TRAINED)
    for p in w.actor.engine.module.parameters():
        p.grad = torch.ones_like(p)
    w.actor.engine.optimizer.step()  # Adam state for every parameter
    set_params(w.actor.engine.module, TRAINED)  # undo the step: weights exactly TRAINED again
    return w


def test_reset_half_way_towards_theta0():
    w = trained_worker_with_adam_state()
    opt = w.actor.engine.optimizer
    named = dict(w.actor.engine.module.named_parameters())
    state_before = {n: opt.state[p] for n, p in named.items()}
    assert len(state_before) == 4 and all("exp_avg" in s for s in state_before.values())

    out = w.recipe_lorr_reset(0.5, "down_proj", reset_optimizer=False)
    assert out["changed"] == [DOWN0, DOWN1]
    now = params(w.actor.engine.module)
    # (theta + theta_0) / 2
    assert torch.equal(now[DOWN0], t([[1.0, -1.5], [2.0, 0.5]]))
    assert torch.equal(now[DOWN1], t([2.0, 0.0, 0.0]))
    assert torch.equal(now[EMBED], t(TRAINED[EMBED])) and torch.equal(now[UP0], t(TRAINED[UP0]))
    # delta = (theta_0 - theta) / 2: [[-.5, .5], [0, -.5]] and [2, 0, -2] -> sqrt(.75 + 8)
    assert out["delta_norm"] == pytest.approx(math.sqrt(8.75), rel=1e-12)
    assert all(opt.state[named[n]] is state_before[n] for n in named)  # optimizer untouched
    assert torch.equal(w._theta0[DOWN0], t(THETA0[DOWN0]))  # theta_0 itself unchanged


def test_reset_clears_adam_state_of_reset_params_only():
    w = trained_worker_with_adam_state()
    opt = w.actor.engine.optimizer
    named = dict(w.actor.engine.module.named_parameters())
    kept = {n: opt.state[named[n]] for n in (EMBED, UP0)}
    w.recipe_lorr_reset(0.5, "down_proj", reset_optimizer=True)
    assert named[DOWN0] not in opt.state and named[DOWN1] not in opt.state
    assert all(opt.state[named[n]] is s for n, s in kept.items())
    assert torch.equal(kept[EMBED]["exp_avg"], torch.full((2, 2), 0.1))  # (1 - beta1) * grad, as before


def test_reset_alpha_one_changes_nothing():
    w = trained_worker_with_adam_state()
    before = params(w.actor.engine.module)
    out = w.recipe_lorr_reset(1.0, "down_proj", reset_optimizer=False)
    assert out == {"changed": [DOWN0, DOWN1], "delta_norm": 0.0}
    after = params(w.actor.engine.module)
    assert all(torch.equal(after[n], before[n]) for n in before)


# ----------------------------------------------------------------------------- theta_0 with checkpoints
def test_save_load_round_trip_and_missing_file(tmp_path):
    w = make_worker(THETA0)
    fp = w.recipe_lorr_snapshot("down_proj")["fingerprint"]
    folder = tmp_path / "global_step_2"
    path = w.recipe_lorr_save(str(folder))
    assert path == str(folder / "lorr_theta0_rank0.pt")  # no process group: rank 0

    other = make_worker(TRAINED)
    other.recipe_lorr_snapshot("down_proj")  # the start-up snapshot of the resumed run (other weights)
    assert other.recipe_lorr_load(str(folder)) == fp
    assert sorted(other._theta0) == [DOWN0, DOWN1]
    assert torch.equal(other._theta0[DOWN0], t(THETA0[DOWN0])) and torch.equal(other._theta0[DOWN1], t(THETA0[DOWN1]))
    # the reset then pulls towards the restored theta_0
    assert other.recipe_lorr_reset(0.0, "down_proj")["changed"] == [DOWN0, DOWN1]
    assert torch.equal(params(other.actor.engine.module)[DOWN1], t(THETA0[DOWN1]))

    third = make_worker(TRAINED)
    mine = third.recipe_lorr_snapshot("down_proj")["fingerprint"]
    assert mine != fp
    assert third.recipe_lorr_load(str(tmp_path / "nowhere")) is None
    assert theta0_fingerprint(third._theta0) == mine  # the start-up snapshot is kept


def test_fingerprint_depends_on_names_and_values():
    a = {DOWN0: t([1.0, 2.0])}
    assert theta0_fingerprint(a) == theta0_fingerprint({DOWN0: t([1.0, 2.0]).to(torch.bfloat16)})
    assert theta0_fingerprint(a) != theta0_fingerprint({DOWN0: t([1.0, 2.5])})
    assert theta0_fingerprint(a) != theta0_fingerprint({DOWN1: t([1.0, 2.0])})
    assert len(theta0_fingerprint(a)) == 16


# ----------------------------------------------------------------------------- preference_loss
PROMPT_LEN, RESP_WIDTH = 2, 3
#: rows [c0, r0, c1, r1, padding]: response lengths and per-token log-probs (policy / reference)
RESP_LENS = [3, 2, 2, 3, 1]
POLICY = [[-0.5, -1.0, -0.5], [-1.5, -2.5], [-1.0, -1.0], [-0.5, -0.5, -0.5], [-3.0]]
REF = [[-1.0, -1.0, -1.0], [-1.0, -1.0, -100.0], [-1.5, -0.5, -100.0], [-0.25, -0.25, -0.5], [-7.0, -7.0, -7.0]]


def micro_batch(sft_weight=0.0, num_pairs=4.0, dp_size=None) -> TensorDict:
    """A padded micro-batch as verl hands it to the loss (prompts of 2 tokens, responses <= 3)."""
    b = len(RESP_LENS)
    attn = torch.zeros(b, PROMPT_LEN + RESP_WIDTH, dtype=torch.int64)
    resp_mask = torch.zeros(b, RESP_WIDTH, dtype=torch.int64)
    for i, n in enumerate(RESP_LENS):
        attn[i, : PROMPT_LEN + n] = 1
        resp_mask[i, :n] = 1
    td = TensorDict({
        "prompts": torch.full((b, PROMPT_LEN), 5, dtype=torch.int64),
        "responses": torch.full((b, RESP_WIDTH), 6, dtype=torch.int64),
        "attention_mask": attn,
        "response_mask": resp_mask,
        "ref_log_prob": t(REF),
        "pair_id": torch.tensor([0, 0, 1, 1, -1]),
        "is_chosen": torch.tensor([True, False, True, False, False]),
        "sft_weight": torch.full((b,), float(sft_weight)),
        "num_pairs": torch.full((b,), float(num_pairs)),
    }, batch_size=b)
    if dp_size is not None:
        tu.assign_non_tensor_data(td, "dp_size", dp_size)
    return td


def flat_log_probs() -> torch.Tensor:
    """The engine's remove-padding output: one value per token of prompt + response, where the
    value at position p is log pi of token p + 1 (verl's no_padding_2_padding shifts by one)."""
    out = []
    for lp in POLICY:
        out += [0.0] * (PROMPT_LEN - 1) + lp + [0.0]
    return torch.tensor(out, dtype=torch.float32, requires_grad=True)


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


# pair 0: (pi_c - ref_c) - (pi_r - ref_r) = (-2 - -3) - (-4 - -2) = 3
# pair 1: (-2 - -2) - (-1.5 - -1) = 0.5;  dpo loss -log sigmoid(beta * margin) = softplus(-beta * margin)
DPO_L0, DPO_L1 = softplus(-0.1 * 3.0), softplus(-0.1 * 0.5)


def test_preference_loss_dpo_by_hand_through_verl_unpadding():
    pref = PreferenceConfig.from_config({"enable": True, "loss": "dpo", "beta": 0.1})
    flat = flat_log_probs()
    loss, metrics = preference_loss(None, {"log_probs": flat}, micro_batch(), pref=pref)
    assert loss.item() == pytest.approx((DPO_L0 + DPO_L1) / 4, rel=1e-6)  # / num_pairs of the mini-batch
    assert metrics["actor/pg_loss"].aggregate() == pytest.approx(loss.item())
    # per-pair metrics: this micro-batch's share of the mean over the mini-batch's 4 pairs
    assert metrics["dpo/loss"].aggregate() == pytest.approx((DPO_L0 + DPO_L1) / 4, rel=1e-6)
    assert metrics["dpo/reward_margin"].aggregate() == pytest.approx(0.1 * (3.0 + 0.5) / 4, rel=1e-6)
    assert metrics["dpo/reward_accuracy"].aggregate() == 0.5  # 2 of 4 pairs, both correct
    assert metrics["dpo/chosen_logps"].aggregate() == pytest.approx(-1.0)  # (-2 + -2) / 4
    assert metrics["dpo/rejected_logps"].aggregate() == pytest.approx(-1.375)  # (-4 + -1.5) / 4
    assert metrics["dpo/pairs_in_micro_batch"].aggregate() == 2.0
    loss.backward()
    # d loss / d log pi of a chosen token of pair 0: -beta * sigmoid(-beta * 3) / num_pairs
    g0 = -0.1 / (1 + math.exp(0.3)) / 4
    assert flat.grad[PROMPT_LEN - 1].item() == pytest.approx(g0, rel=1e-5)
    pad_start = sum(PROMPT_LEN + n for n in RESP_LENS[:4])
    assert torch.all(flat.grad[pad_start:] == 0)  # the padding row has no gradient


def test_preference_loss_sft_term_and_dp_size():
    pref = PreferenceConfig.from_config({"enable": True, "loss": "dpo", "beta": 0.1})
    loss, metrics = preference_loss(None, {"log_probs": flat_log_probs()}, micro_batch(sft_weight=0.5, dp_size=2),
                                    pref=pref)
    # nll of the chosen responses (token means): 2/3 and 1; times lambda 0.5; times dp_size 2
    nll = (2.0 / 3.0, 1.0)
    assert loss.item() == pytest.approx((DPO_L0 + DPO_L1 + 0.5 * sum(nll)) / 4 * 2, rel=1e-6)
    # shares of the mean over 4 pairs, times dp_size 2 (verl averages over the 2 ranks)
    assert metrics["lorr/sft_loss"].aggregate() == pytest.approx(sum(nll) / 4 * 2, rel=1e-6)
    assert metrics["lorr/sft_weight"].aggregate() == pytest.approx(0.5 * 2 / 4 * 2)


def test_micro_batch_metrics_aggregate_to_the_pair_mean_on_uneven_ranks():
    """2 ranks, 3 pairs: rank 0 holds pairs with losses 1 and 2 in its two micro-batches,
    rank 1 holds the pair with loss 6 and a micro-batch of padding only. verl's dp
    aggregation (same key count on every rank, SUM = sum over micro-batches of the rank
    mean) gives the mean over the 3 pairs, (1 + 2 + 6) / 3 = 3."""
    from verl.utils.metric import Metric

    from recipe.stages.workers import micro_batch_metrics

    loss = torch.tensor(0.0)
    ranks = [
        [micro_batch_metrics({"dpo/loss": 1.0, "dpo/pairs_in_micro_batch": 1.0}, loss, 3, 2),
         micro_batch_metrics({"dpo/loss": 2.0, "dpo/pairs_in_micro_batch": 1.0}, loss, 3, 2)],
        [micro_batch_metrics({"dpo/loss": 6.0, "dpo/pairs_in_micro_batch": 1.0}, loss, 3, 2),
         micro_batch_metrics({"dpo/pairs_in_micro_batch": 0.0}, loss, 3, 2)],  # padding only
    ]
    assert all(set(m) == set(ranks[0][0]) for r in ranks for m in r)
    per_rank = []
    for r in ranks:
        metric = r[0]["dpo/loss"].init_list()
        for m in r:
            metric.append(m["dpo/loss"].values[0])
        per_rank.append(metric)
    assert Metric.aggregate_dp(per_rank) == pytest.approx(3.0)


def test_preference_loss_simpo_needs_no_reference_and_missing_fields_named(monkeypatch):
    # padded log-probs: no_padding_2_padding replaced by the identity here
    monkeypatch.setattr(workers_mod, "no_padding_2_padding", lambda tensor, data: tensor)
    padded = torch.zeros(len(RESP_LENS), RESP_WIDTH)
    for i, lp in enumerate(POLICY):
        padded[i, : len(lp)] = t(lp)
    data = micro_batch(num_pairs=2)
    del data["ref_log_prob"]
    pref = PreferenceConfig.from_config({"enable": True, "loss": "simpo", "beta": 2.0, "simpo_gamma_beta_ratio": 0.5})
    loss, _ = preference_loss(None, {"log_probs": padded}, data, pref=pref)
    # length-averaged: c0 -2/3, r0 -2, c1 -1, r1 -0.5; z = 2 (pi_c - pi_r) - 1
    z0, z1 = 2 * (-2 / 3 + 2.0) - 1.0, 2 * (-1.0 + 0.5) - 1.0
    assert loss.item() == pytest.approx((softplus(-z0) + softplus(-z1)) / 2, rel=1e-6)

    dpo = PreferenceConfig.from_config({"enable": True, "loss": "dpo"})
    with pytest.raises(ValueError, match=r"lacks \['ref_log_prob'\]"):
        preference_loss(None, {"log_probs": padded}, data, pref=dpo)
    split = micro_batch()
    split["pair_id"] = torch.tensor([0, 0, 1, 2, -1])  # pair 1 without its rejected row
    with pytest.raises(ValueError, match="pair 1"):
        preference_loss(None, {"log_probs": padded}, split, pref=dpo)
