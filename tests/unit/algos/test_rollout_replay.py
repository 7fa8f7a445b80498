"""Rollout replay of recipe.algos.rollout_replay (DOTS + RR, arXiv 2506.05316): buffer, plan, state and the
off-policy corrections, with parity against verl 0.9.1's ``vanilla`` loss and rollout-correction
weights. CPU only, no Ray."""

from __future__ import annotations

import io
import math

import pytest
import torch

from recipe.algos.rollout_replay import (
    ReplayGroup,
    RolloutReplayBuffer,
    behaviour_weight_stats,
    behaviour_weights,
    decoupled_clip_loss,
    plain_clip_loss,
    plain_old_log_prob,
)
from verl.protocol import DataProto
from verl.trainer.config.algorithm import RolloutCorrectionConfig
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch
from verl.workers.config import ActorConfig

L = math.log


class Hostile:
    """A payload that fails loudly if the buffer ever compares or hashes it."""

    def __init__(self, tag):
        self.tag = tag

    def __eq__(self, other):
        raise AssertionError("payload compared (==)")

    def __lt__(self, other):
        raise AssertionError("payload compared (<)")

    def __hash__(self):
        raise AssertionError("payload hashed")


def grp(key, mean=0.5, uid=None, payload=None):
    return ReplayGroup(prompt_key=key, uid=uid or f"u-{key}", step=-1, mean_reward=mean, payload=payload)


def buf(batch_groups=None, **kw):
    """A buffer with ``replay.enable``; an absolute ``capacity`` (else 256) unless sized by
    ``batch_groups`` with ``capacity_ratio``."""
    if "capacity" in kw:
        kw.setdefault("capacity_ratio", None)
    elif batch_groups is None:
        kw.update(capacity=256, capacity_ratio=None)
    return RolloutReplayBuffer({"enable": True, **kw}, batch_groups=batch_groups)


# --------------------------------------------------------------------------- add / FIFO / dedup


def test_add_counts_dedup_and_fifo_eviction():
    b = buf(capacity=3)
    counts = b.add([grp("p0", 0.5), grp("p1", 0.0), grp("p2", 1.0), grp("p3", 0.25), grp("p4", 0.75)], step=1)
    # p1 (all wrong) and p2 (all correct) carry no GRPO signal
    assert counts == {"stored": 3, "skipped_not_mixed": 2, "replaced_duplicates": 0, "evicted": 0}
    assert [g.prompt_key for g in b.groups] == ["p0", "p3", "p4"]
    counts = b.add([grp("p3", 0.5, uid="u-p3-new"), grp("p5", 0.5)], step=2)
    # p3's old group removed, new one at the back: [p0, p4, p3'] -> + p5 -> p0 evicted
    assert counts == {"stored": 2, "skipped_not_mixed": 0, "replaced_duplicates": 1, "evicted": 1}
    assert [(g.prompt_key, g.uid, g.step) for g in b.groups] == [
        ("p4", "u-p4", 1), ("p3", "u-p3-new", 2), ("p5", "u-p5", 2)]
    assert len(b) == 3


def test_add_without_mixed_filter_or_dedup():
    b = buf(capacity=10, store_only_mixed=False, dedup_by_prompt=False)
    counts = b.add([grp("p", 1.0), grp("p", 0.0), grp("p", 0.5)], step=0)
    assert counts == {"stored": 3, "skipped_not_mixed": 0, "replaced_duplicates": 0, "evicted": 0}
    assert [g.mean_reward for g in b.groups] == [1.0, 0.0, 0.5]


def test_add_does_not_mutate_caller_groups_and_shares_payload():
    payload = {"x": torch.ones(2)}
    g = grp("p", payload=payload)
    b = buf()
    b.add([g], step=7)
    assert g.step == -1 and b.groups[0].step == 7 and b.groups[0].payload is payload


def test_add_rejects_bad_groups():
    b = buf()
    with pytest.raises(ValueError, match=r"mean_reward must lie in \[0, 1\]"):
        b.add([grp("p", -1.0)], step=0)  # a +-1 score, not a correctness
    with pytest.raises(ValueError, match="ReplayGroup"):
        b.add([{"prompt_key": "p"}], step=0)


def test_hostile_payloads_never_compared_or_hashed():
    b = buf(capacity=3, dedup_by_prompt=True)
    # identical metadata everywhere: only the insertion counter tells them apart
    b.add([ReplayGroup("p", "u", 0, 0.5, Hostile(i)) for i in range(2)], step=0)
    assert [g.payload.tag for g in b.groups] == [1]
    b2 = buf(capacity=3, dedup_by_prompt=False)
    b2.add([ReplayGroup("p", "u", 0, 0.5, Hostile(i)) for i in range(5)], step=0)
    assert sorted(g.payload.tag for g in b2.groups) == [2, 3, 4]
    drawn = b2.sample(3)
    assert sorted(g.payload.tag for g in drawn) == [2, 3, 4]
    b2.metrics(3, 1, drawn)
    b3 = buf(capacity=3, dedup_by_prompt=False)
    b3.load_state_dict(b2.state_dict())
    assert [g.payload.tag for g in b3.groups] == [2, 3, 4]


# --------------------------------------------------------------------------- plan


@pytest.mark.parametrize(
    "kw,stored,batch,expected",
    [
        ({}, 0, 8, (8, 0)),  # first round: all fresh
        ({}, 3, 8, (8, 0)),  # 3 < 4 needed
        ({}, 4, 8, (4, 4)),
        ({}, 9, 8, (4, 4)),
        ({"fresh_fraction": 0.3}, 9, 5, (2, 3)),  # 1.5 rounds half up to 2
        ({"fresh_fraction": 0.5}, 9, 5, (3, 2)),  # 2.5 -> 3 (half up, not Python's half-even 2)
        ({"fresh_fraction": 0.1}, 9, 4, (1, 3)),  # 0.4 -> 0 -> at least 1 fresh
        ({"fresh_fraction": 1.0}, 9, 8, (8, 0)),
        ({"fresh_fraction": 0.5}, 9, 1, (1, 0)),
        ({"enable": False}, 9, 8, (8, 0)),
    ],
)
def test_plan(kw, stored, batch, expected):
    b = RolloutReplayBuffer({"enable": True, "capacity": 16, "capacity_ratio": None, **kw})
    b.add([grp(f"p{i}") for i in range(stored)], step=0)
    assert b.plan(batch) == expected


def test_plan_rejects_bad_batch():
    with pytest.raises(ValueError, match="batch_groups"):
        buf().plan(0)


# --------------------------------------------------------------------------- sample


def test_sample_without_replacement_keeps_groups_and_excludes():
    b = buf(capacity=10)
    b.add([grp(f"p{i}") for i in range(5)], step=0)
    drawn = b.sample(5)
    assert sorted(g.prompt_key for g in drawn) == [f"p{i}" for i in range(5)]
    assert len(b) == 5  # replayed groups stay (FIFO eviction only)
    drawn = b.sample(3, exclude_prompt_keys={"p0", "p1"})
    assert sorted(g.prompt_key for g in drawn) == ["p2", "p3", "p4"]
    assert b.sample(0) == []
    with pytest.raises(ValueError, match="only 3 of 5"):
        b.sample(4, exclude_prompt_keys=["p0", "p1"])
    with pytest.raises(ValueError, match="n must be"):
        b.sample(-1)


def test_sample_seeded_and_uniform():
    def draws(seed, k=2000):
        b = buf(capacity=4, seed=seed)
        b.add([grp(f"p{i}") for i in range(4)], step=0)
        return [b.sample(1)[0].prompt_key for _ in range(k)]

    a = draws(0)
    assert a == draws(0) and a != draws(1)
    for key in ("p0", "p1", "p2", "p3"):
        assert abs(a.count(key) / len(a) - 0.25) < 0.04  # 0.25 +- ~4 standard deviations


# --------------------------------------------------------------------------- age / metrics


def test_mean_age_and_metrics():
    b = buf(capacity=10)
    b.add([grp("a"), grp("b")], step=1)
    b.add([grp("c")], step=4)
    assert b.mean_age(5) == pytest.approx((4 + 4 + 1) / 3)
    replayed = [g for g in b.groups if g.prompt_key in ("a", "c")]
    assert b.metrics(5, n_fresh=2, replayed=replayed) == {
        "replay/size": 3.0, "replay/capacity": 10.0, "replay/fresh_groups": 2.0, "replay/replayed_groups": 2.0,
        "replay/mean_age": 2.5, "replay/max_age": 4.0}
    # nothing replayed: no age logged (a 0 would pull a run's mean age down)
    assert b.metrics(5, 4, []) == {"replay/size": 3.0, "replay/capacity": 10.0, "replay/fresh_groups": 4.0,
                                   "replay/replayed_groups": 0.0}
    assert buf().mean_age(3) == 0.0


def test_ages_over_scripted_pushes_and_evictions():
    """C = 4, every group stored (store_only_mixed off), dedup on. Hand bookkeeping, oldest
    first, as (prompt, step added):
    step 1 adds a1 b1 c1            -> [a1 b1 c1]
    step 2 adds d2 e2               -> [a1 b1 c1 d2 e2] -> evict a1 -> [b1 c1 d2 e2]
    step 3 adds b3 (dedup drops b1) -> [c1 d2 e2 b3]
    step 4 adds f4 g4               -> evict c1 d2 -> [e2 b3 f4 g4]
    step 5 replays them all: ages 5-2, 5-3, 5-4, 5-4 = 3, 2, 1, 1."""
    b = buf(capacity=4, store_only_mixed=False)
    assert b.add([grp("a"), grp("b"), grp("c")], step=1)["evicted"] == 0
    assert b.ages(2) == [1, 1, 1]
    assert b.add([grp("d"), grp("e")], step=2)["evicted"] == 1
    assert [g.prompt_key for g in b.groups] == ["b", "c", "d", "e"] and b.ages(3) == [2, 2, 1, 1]
    counts = b.add([grp("b")], step=3)
    assert (counts["replaced_duplicates"], counts["evicted"]) == (1, 0)
    assert [(g.prompt_key, g.step) for g in b.groups] == [("c", 1), ("d", 2), ("e", 2), ("b", 3)]
    assert b.add([grp("f"), grp("g")], step=4)["evicted"] == 2
    assert [(g.prompt_key, g.step) for g in b.groups] == [("e", 2), ("b", 3), ("f", 4), ("g", 4)]
    replayed = b.sample(4)
    m = b.metrics(5, n_fresh=4, replayed=replayed)
    assert sorted(b.ages(5, replayed)) == [1, 1, 2, 3]
    assert (m["replay/mean_age"], m["replay/max_age"]) == (7 / 4, 3.0)
    two = [g for g in b.groups if g.prompt_key in ("b", "f")]
    assert b.metrics(6, 2, two)["replay/mean_age"] == (3 + 2) / 2 and b.metrics(6, 2, two)["replay/max_age"] == 3.0


@pytest.mark.parametrize("ratio,delta,batch,expected", [
    (2.0, 0.5, 512, 512),  # public code: buffer_size 512 with 256 fresh groups
    (1.0, 0.5, 512, 256),  # the paper's smaller C
    (2.0, 0.5, 8, 8),  # the CPU benchmark's 4 fresh groups (was 256 = 64 steps of them)
    (2.0, 0.5, 5, 6),  # 2.5 -> 3 fresh (half up) x 2
    (1.5, 0.5, 3, 3),  # 2 fresh x 1.5
    (1.25, 0.5, 6, 4),  # 3 x 1.25 = 3.75 -> 4 (ceil)
])
def test_capacity_ratio_sizes_the_buffer_from_the_fresh_groups(ratio, delta, batch, expected):
    b = buf(batch_groups=batch, capacity_ratio=ratio, fresh_fraction=delta)
    assert b.capacity == expected
    b.add([grp(f"p{i}") for i in range(expected + 3)], step=1)
    assert len(b) == expected and b.metrics(2, 0, [])["replay/capacity"] == expected


def test_capacity_ratio_ages_stay_one_or_two_steps():
    """B = 8, delta 0.5 -> 4 fresh groups a step, C = 2 x 4 = 8, every group stored: after the
    warm-up the buffer holds exactly the last two steps' groups, so replayed ages are 1 or 2."""
    b = buf(batch_groups=8, store_only_mixed=False, seed=0)
    ages = []
    for step in range(1, 13):
        n_fresh, n_replay = b.plan(8, step=step)
        assert (n_fresh, n_replay) == ((8, 0) if step <= 2 else (4, 4))
        ages += b.ages(step, b.sample(n_replay))
        b.add([grp(f"s{step}-{i}") for i in range(n_fresh)], step)
        assert len(b) == 8
    assert set(ages) == {1, 2} and len(ages) == 10 * 4


def test_capacity_config_both_or_neither_is_an_error():
    with pytest.raises(ValueError, match=r"replay\.capacity=8 and replay\.capacity_ratio=2\.0 are both set"):
        RolloutReplayBuffer({"capacity": 8}, batch_groups=4)
    with pytest.raises(ValueError, match=r"replay\.capacity and replay\.capacity_ratio are both null"):
        RolloutReplayBuffer({"capacity_ratio": None})
    with pytest.raises(ValueError, match=r"replay\.capacity_ratio=2\.0 sizes the buffer.*data\.train_batch_size"):
        RolloutReplayBuffer({"enable": True})
    with pytest.raises(ValueError, match=r"replay\.capacity_ratio must be a number > 0"):
        RolloutReplayBuffer({"capacity_ratio": 0.0}, batch_groups=4)


@pytest.mark.parametrize("warmup,first_replay_step", [(0, 2), (1, 2), (2, 3), (4, 5)])
def test_warmup_steps_are_all_fresh(warmup, first_replay_step):
    """The buffer is full from step 1 on (every group stored), so only the warm-up keeps a
    step all fresh; step None (no step known) ignores the warm-up."""
    b = buf(capacity=8, store_only_mixed=False, warmup_steps=warmup)
    for step in range(1, 7):
        plan = b.plan(4, step=step)
        assert plan == ((4, 0) if step < first_replay_step else (2, 2)), step
        b.add([grp(f"s{step}-{i}") for i in range(plan[0])], step)
    assert b.plan(4) == (2, 2)


# --------------------------------------------------------------------------- state


def _roundtrip(sd):
    f = io.BytesIO()
    torch.save(sd, f)
    f.seek(0)
    return torch.load(f, weights_only=True)


def test_state_roundtrip_resume_equals_uninterrupted():
    cfg = {"capacity": 6, "seed": 3, "dedup_by_prompt": True}

    def step_groups(step):
        return [grp(f"p{(3 * step + i) % 8}", payload={"lp": torch.full((2, 3), float(step))}) for i in range(3)]

    a = buf(**cfg)
    for step in range(3):
        a.add(step_groups(step), step)
        a.sample(2)
    sd = _roundtrip(a.state_dict())
    b = buf(**cfg)
    b.load_state_dict(sd)
    assert [(g.prompt_key, g.uid, g.step, g.mean_reward) for g in a.groups] == [
        (g.prompt_key, g.uid, g.step, g.mean_reward) for g in b.groups]
    torch.testing.assert_close(b.groups[-1].payload["lp"], torch.full((2, 3), 2.0))
    for step in range(3, 7):  # continue both identically
        assert a.add(step_groups(step), step) == b.add(step_groups(step), step)
        assert [g.uid for g in a.sample(4, {"p0"})] == [g.uid for g in b.sample(4, {"p0"})]
    assert a.state_dict()["counter"] == b.state_dict()["counter"] == 3 * 7


def test_load_state_mismatch_and_missing_keys():
    a = buf(capacity=4)
    a.add([grp("p")], step=0)
    with pytest.raises(ValueError, match=r"replay capacity: the checkpoint was saved with C = 4 groups, the config "
                                         r"gives C = 8"):
        buf(capacity=8).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match=r"C = 4 groups, the config gives C = 6"):  # ratio 2 x 3 fresh of B = 6
        buf(batch_groups=6).load_state_dict(a.state_dict())
    buf(batch_groups=4, capacity_ratio=2.0).load_state_dict(a.state_dict())  # 2 x 2 fresh = 4: same C
    old = a.state_dict()  # a checkpoint from before capacity_ratio: C only in its config
    del old["capacity"]
    buf(capacity=4).load_state_dict(old)
    with pytest.raises(ValueError, match=r"replay\.seed"):
        buf(capacity=4, seed=1).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="lacks"):
        buf(capacity=4).load_state_dict({"groups": []})


# --------------------------------------------------------------------------- correction: hand values

# pi_old = [[0.2, 0.05], [0.4, 0.9]], mu = 0.1 everywhere -> w = pi_old / mu = [[2, 0.5], [4, 9]];
# token (1, 1) is padding.
OLD = torch.log(torch.tensor([[0.2, 0.05], [0.4, 0.9]]))
MU = torch.full((2, 2), L(0.1))
MASK = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
ADV = torch.tensor([[1.0, 1.0], [-1.0, -1.0]])


def test_behaviour_weights_by_hand():
    torch.testing.assert_close(behaviour_weights(OLD, MU, MASK), torch.tensor([[2.0, 0.5], [4.0, 0.0]]))
    torch.testing.assert_close(behaviour_weights(OLD, MU, MASK, truncation=2.0), torch.tensor([[2.0, 0.5], [2.0, 0.0]]))
    old = OLD.clone().requires_grad_(True)
    assert not behaviour_weights(old, MU, MASK).requires_grad
    # overflow: a huge log-ratio is clamped at 20 nats (as verl), padding stays 0, never nan
    w = behaviour_weights(torch.tensor([[100.0, 100.0]]), torch.zeros(1, 2), torch.tensor([[1, 0]]))
    torch.testing.assert_close(w, torch.tensor([[math.exp(20.0), 0.0]]))
    with pytest.raises(ValueError, match="truncation"):
        behaviour_weights(OLD, MU, MASK, truncation=0.9)
    with pytest.raises(ValueError, match="shape"):
        behaviour_weights(OLD, MU[:, :1], MASK)


def test_behaviour_weight_stats_by_hand():
    """w over the 3 unmasked tokens = 2, 0.5, 4 (OLD / MU). Mean 6.5 / 3; population variance
    ((2 - 13/6)^2 + (0.5 - 13/6)^2 + (4 - 13/6)^2) / 3 = (1 + 100 + 121) / 108; ESS = 6.5^2 /
    (3 x (4 + 0.25 + 16)) = 42.25 / 60.75. With c = 3: w = 2, 0.5, 3, one token of three truncated."""
    st = behaviour_weight_stats(OLD, MU, MASK)
    assert st == pytest.approx({"is_weight_mean": 6.5 / 3, "is_weight_std": math.sqrt(222 / 108), "is_weight_min": 0.5,
                                "is_weight_max": 4.0, "is_weight_ess": 42.25 / 60.75, "truncated_frac": 0.0})
    st = behaviour_weight_stats(OLD, MU, MASK, truncation=3.0)
    m = 5.5 / 3
    assert st == pytest.approx({"is_weight_mean": m, "is_weight_std": math.sqrt(((2 - m) ** 2 + (0.5 - m) ** 2 +
                                                                                 (3 - m) ** 2) / 3),
                                "is_weight_min": 0.5, "is_weight_max": 3.0, "is_weight_ess": 5.5 ** 2 / (3 * 13.25),
                                "truncated_frac": 1 / 3})
    # c above the largest weight: nothing capped, nothing counted as truncated
    assert behaviour_weight_stats(OLD, MU, MASK, truncation=4.5)["truncated_frac"] == 0.0
    # on-policy (pi_old == mu): every weight 1, ESS 1; no token at all: the same on-policy values
    same = behaviour_weight_stats(OLD, OLD, MASK)
    assert same == {"is_weight_mean": 1.0, "is_weight_std": 0.0, "is_weight_min": 1.0, "is_weight_max": 1.0,
                    "is_weight_ess": 1.0, "truncated_frac": 0.0}
    assert behaviour_weight_stats(OLD, MU, torch.zeros(2, 2, dtype=torch.bool)) == same
    # one token dominating: ESS -> 1/N (here w = e^10, 1, 1, 1 over N = 4)
    big = behaviour_weight_stats(torch.tensor([[10.0, 0.0, 0.0, 0.0]]), torch.zeros(1, 4), torch.ones(1, 4))
    e = math.exp(10.0)
    assert big["is_weight_ess"] == pytest.approx((e + 3) ** 2 / (4 * (e * e + 3))) and big["is_weight_ess"] < 0.2501


def test_mean_weight_is_one_by_construction_however_stale():
    """E_mu[pi_old / mu] = 1 for tokens sampled from mu: draw 20,000 tokens from mu over a
    5-token vocabulary and weight them by pi_old / mu for a pi_old near mu and one far from it.
    The mean stays ~1 (no staleness signal) while std grows and ESS falls."""
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    near = torch.tensor([0.38, 0.31, 0.16, 0.1, 0.05])
    far = torch.tensor([0.05, 0.1, 0.15, 0.3, 0.4])
    y = torch.multinomial(mu, 20000, replacement=True, generator=g).view(1, -1)
    mask = torch.ones_like(y, dtype=torch.bool)
    st_near = behaviour_weight_stats(near.log()[y], mu.log()[y], mask)
    st_far = behaviour_weight_stats(far.log()[y], mu.log()[y], mask)
    assert abs(st_near["is_weight_mean"] - 1) < 0.01 and abs(st_far["is_weight_mean"] - 1) < 0.1
    # exact: E[w^2] = sum pi_old^2 / mu; ESS -> 1 / E[w^2]
    ess_far = 1 / float((far ** 2 / mu).sum())
    assert st_far["is_weight_ess"] == pytest.approx(ess_far, rel=0.1) and ess_far < 0.25
    assert st_near["is_weight_ess"] > 0.99 and st_far["is_weight_std"] > 10 * st_near["is_weight_std"]


def test_plain_old_log_prob_by_hand():
    replayed = torch.tensor([True, False])
    anchor = plain_old_log_prob(OLD, MU, replayed)
    torch.testing.assert_close(anchor, torch.stack([MU[0], OLD[1]]))
    # c = 1.5: row 0 token 0: max(log 0.1, log(0.2 / 1.5) = log 0.1333) -> pi_old / anchor = 1.5;
    # token 1: max(log 0.1, log(0.05 / 1.5)) = log 0.1 -> 0.5 (already below c)
    anchor = plain_old_log_prob(OLD, MU, replayed, truncation=1.5)
    torch.testing.assert_close(torch.exp(OLD - anchor)[0], torch.tensor([1.5, 0.5]))
    torch.testing.assert_close(anchor[1], OLD[1])
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        plain_old_log_prob(OLD, MU, torch.tensor([True]))


def test_plain_clip_loss_by_hand():
    # rho = pi / mu = [[1.5, 0.9], [0.5, *]]; eps = 0.2
    # (0,0) A=+1: -min(1.5, 1.2) = -1.2; (0,1) A=+1: -0.9; (1,0) A=-1: max(0.5, 0.8) = 0.8
    log_prob = MU + torch.log(torch.tensor([[1.5, 0.9], [0.5, 7.0]]))
    loss = plain_clip_loss(log_prob, MU, ADV, MASK)
    assert loss.item() == pytest.approx((-1.2 - 0.9 + 0.8) / 3)


def _decoupled_log_prob():
    # r = pi / pi_old = [[1.5, 0.9], [0.5, *]]
    return OLD + torch.log(torch.tensor([[1.5, 0.9], [0.5, 3.0]]))


def test_decoupled_clip_loss_by_hand():
    # w = [[2, 0.5], [4, -]]: (0,0) -2 * 1.2 = -2.4; (0,1) -0.5 * 0.9 = -0.45; (1,0) 4 * 0.8 = 3.2
    lp = _decoupled_log_prob()
    assert decoupled_clip_loss(lp, OLD, MU, ADV, MASK).item() == pytest.approx((-2.4 - 0.45 + 3.2) / 3)
    # c = 2: (1,0) weight 4 -> 2: 2 * 0.8 = 1.6
    assert decoupled_clip_loss(lp, OLD, MU, ADV, MASK, truncation=2.0).item() == pytest.approx((-2.4 - 0.45 + 1.6) / 3)


# --------------------------------------------------------------------------- correction: equivalences


def random_batch(seed, B=6, T=7, spread=1.5):
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(T) < torch.randint(1, T + 1, (B, 1), generator=g)
    mu = -torch.rand(B, T, generator=g) * 3
    old = mu + (torch.rand(B, T, generator=g) - 0.5) * 2 * spread
    lp = (old + (torch.rand(B, T, generator=g) - 0.5) * 2 * spread).requires_grad_(True)
    adv = torch.randn(B, 1, generator=g).expand(B, T).contiguous()
    return lp, old, mu, adv, mask


def public_code_loss(lp, old, mu, adv, mask, eps=0.2):
    """DOTS+RR public code: max(-A rho, -A clamp(rho, r_old (1-eps), r_old (1+eps))), rho = pi/mu, r_old = pi_old/mu."""
    rho, r_old = torch.exp(lp - mu), torch.exp(old - mu)
    clipped = torch.maximum(torch.minimum(rho, r_old * (1 + eps)), r_old * (1 - eps))
    loss = torch.maximum(-adv * rho, -adv * clipped)
    return (loss * mask).sum() / mask.sum()


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("seed", range(3))
def test_decoupled_equals_public_code_form(sign, seed):
    lp, old, mu, adv, mask = random_batch(seed)
    adv = adv.abs() * sign
    ours = decoupled_clip_loss(lp, old, mu, adv, mask)
    public = public_code_loss(lp, old, mu, adv, mask)
    torch.testing.assert_close(ours, public)
    g_ours, = torch.autograd.grad(ours, lp)
    g_pub, = torch.autograd.grad(public, lp)
    torch.testing.assert_close(g_ours, g_pub)
    # with truncation the two differ (the public code never caps w)
    assert not torch.allclose(decoupled_clip_loss(lp, old, mu, adv, mask, truncation=1.2), public)


def actor_config():
    return ActorConfig(strategy="fsdp", rollout_n=4, ppo_micro_batch_size_per_gpu=1, clip_ratio=0.2,
                       clip_ratio_low=0.2, clip_ratio_high=0.2, loss_agg_mode="token-mean")


def vanilla(old, lp, adv, mask, weights=None):
    loss, _ = get_policy_loss_fn("vanilla")(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask,
                                            loss_agg_mode="token-mean", config=actor_config(),
                                            rollout_is_weights=weights)
    return loss


def test_verl_vanilla_parity_hand_values():
    replayed = torch.tensor([True, True])
    log_prob = MU + torch.log(torch.tensor([[1.5, 0.9], [0.5, 7.0]]))
    loss = vanilla(plain_old_log_prob(OLD, MU, replayed), log_prob, ADV, MASK)
    assert loss.item() == pytest.approx((-1.2 - 0.9 + 0.8) / 3)
    loss = vanilla(OLD, _decoupled_log_prob(), ADV, MASK, behaviour_weights(OLD, MU, MASK))
    assert loss.item() == pytest.approx((-2.4 - 0.45 + 3.2) / 3)


@pytest.mark.parametrize("truncation", [None, 1.5])
@pytest.mark.parametrize("seed", range(3))
def test_verl_vanilla_parity_plain(seed, truncation):
    lp, old, mu, adv, mask = random_batch(seed)
    replayed = torch.tensor([True, False, True, True, False, True])
    anchor = plain_old_log_prob(old, mu, replayed, truncation)
    ref_mu = torch.where(replayed[:, None], mu, old)
    if truncation is not None:
        ref_mu = torch.where(replayed[:, None], torch.maximum(mu, old - L(truncation)), old)
    ours = vanilla(anchor, lp, adv, mask)
    ref = plain_clip_loss(lp, ref_mu, adv, mask, clip_ratio_c=3.0)  # verl's dual clip, c = 3
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, lp)[0], torch.autograd.grad(ref, lp)[0])


@pytest.mark.parametrize("truncation", [None, 2.0])
@pytest.mark.parametrize("seed", range(3))
def test_verl_vanilla_parity_decoupled(seed, truncation):
    lp, old, mu, adv, mask = random_batch(seed)
    ours = vanilla(old, lp, adv, mask, behaviour_weights(old, mu, mask, truncation))
    ref = decoupled_clip_loss(lp, old, mu, adv, mask, truncation=truncation, clip_ratio_c=3.0)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, lp)[0], torch.autograd.grad(ref, lp)[0])


def test_verl_dual_clip_matters_on_these_batches():
    """The random batches do reach verl's dual clip (r > 3 with A < 0), so the parity tests above
    would fail without ``clip_ratio_c``."""
    lp, old, mu, adv, mask = random_batch(0)
    anchor = plain_old_log_prob(old, mu, torch.ones(6, dtype=torch.bool))
    assert not torch.allclose(vanilla(anchor, lp, adv, mask), plain_clip_loss(lp, mu, adv, mask))


@pytest.mark.parametrize("threshold", [2.0, float("inf")])
def test_verl_rollout_correction_weights_equal_behaviour_weights(threshold):
    """algorithm.rollout_correction = {rollout_is: token, rollout_is_threshold: c, bypass_mode: false}
    puts pi_old / mu (capped at c, detached, 0 on padding) into the batch as rollout_is_weights."""
    batch = DataProto.from_dict(tensors={"old_log_probs": OLD, "rollout_log_probs": MU, "response_mask": MASK.long()})
    cfg = RolloutCorrectionConfig.decoupled_token_is(threshold=threshold)
    assert (cfg.rollout_is, cfg.rollout_rs, cfg.bypass_mode, cfg.rollout_is_batch_normalize) == (
        "token", None, False, False)
    out, metrics = compute_rollout_correction_and_add_to_batch(batch, cfg)
    truncation = None if math.isinf(threshold) else threshold
    torch.testing.assert_close(out.batch["rollout_is_weights"], behaviour_weights(OLD, MU, MASK, truncation))
    torch.testing.assert_close(out.batch["response_mask"], MASK.long())  # no rejection sampling
    assert metrics["rollout_corr/rollout_is_mean"] == pytest.approx((2 + 0.5 + min(4, threshold)) / 3)
    assert metrics["rollout_corr/rollout_is_ratio_fraction_high"] == pytest.approx(
        0.0 if math.isinf(threshold) else 1 / 3)
