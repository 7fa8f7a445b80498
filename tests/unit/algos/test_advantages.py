"""Advantage estimators of recipe.algos.advantages (Minimalist paper, arXiv 2504.11343).

Hand-computed values, a plain-loop reference against the vectorised code, parity with verl's
GRPO, and the verl registry wrappers. CPU only, no Ray.
"""

from __future__ import annotations

import importlib
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

import recipe.algos  # noqa: F401  (registers the estimators)
from recipe.algos.advantages import outcome_rewards, raft_advantage, reinforce_advantage
from verl.trainer.config import AlgoConfig
from verl.trainer.ppo.core_algos import compute_grpo_outcome_advantage, get_adv_estimator_fn


def make_batch(rewards, lengths, T=None):
    """Outcome reward on the last valid token, mask = 1 for the first `length` tokens."""
    B = len(rewards)
    T = T or max(lengths) + 1
    mask = torch.zeros(B, T)
    tlr = torch.zeros(B, T)
    for i, (r, n) in enumerate(zip(rewards, lengths, strict=True)):
        mask[i, :n] = 1.0
        tlr[i, n - 1] = r
    return tlr, mask


def uids(*names):
    return np.array(list(names), dtype=object)


def scalar_adv(adv, mask):
    """The per-response scalar A_i (value on the first token; checks it is constant)."""
    out = []
    for i in range(adv.shape[0]):
        vals = adv[i][mask[i].bool()]
        assert torch.all(vals == vals[0]), "advantage must be the same on every valid token"
        out.append(vals[0].item())
    return out


def loop_reference(rewards, index, baseline, std_norm, epsilon=1e-6):
    """Plain-Python reference: groups by uid, mean and unbiased std, size-1 groups mean 0 std 1."""
    groups = {}
    for r, u in zip(rewards, index, strict=True):
        groups.setdefault(u, []).append(float(r))
    out = []
    for r, u in zip(rewards, index, strict=True):
        g = groups[u]
        if len(g) == 1:
            mean, std = 0.0, 1.0
        else:
            mean = sum(g) / len(g)
            std = math.sqrt(sum((x - mean) ** 2 for x in g) / (len(g) - 1))
        a = float(r) - (mean if baseline == "mean" else 0.0)
        if std_norm:
            a = a / (std + epsilon)
        out.append(a)
    return out


# --------------------------------------------------------------------------- outcome rewards


def test_outcome_rewards_sums_tokens_as_float32():
    tlr = torch.tensor([[0.0, 0.5, 0.5], [0.0, 0.0, -1.0]], dtype=torch.float64)
    r = outcome_rewards(tlr, torch.ones(2, 3))
    assert r.dtype == torch.float32
    assert r.tolist() == [1.0, -1.0]


def test_outcome_rewards_shape_mismatch():
    with pytest.raises(ValueError, match="same"):
        outcome_rewards(torch.zeros(2, 3), torch.zeros(2, 4))


# --------------------------------------------------------------------------- reinforce by hand


def test_reinforce_none_is_reward_pm1():
    tlr, mask = make_batch([1, -1, -1, 1], [2, 3, 1, 4])
    adv, ret = reinforce_advantage(tlr, mask, uids("a", "a", "b", "b"))
    assert scalar_adv(adv, mask) == [1.0, -1.0, -1.0, 1.0]
    assert adv is ret or torch.equal(adv, ret)
    assert adv.dtype == torch.float32 and adv.shape == mask.shape


def test_reinforce_none_zero_one_rewards_wrong_get_zero():
    tlr, mask = make_batch([1, 0, 0, 1], [2, 2, 2, 2])
    adv, _ = reinforce_advantage(tlr, mask, uids("a", "a", "b", "b"))
    assert scalar_adv(adv, mask) == [1.0, 0.0, 0.0, 1.0]


def test_early_eos_zeros_after_eos():
    tlr, mask = make_batch([1, -1], [1, 4], T=5)
    adv, _ = reinforce_advantage(tlr, mask, uids("a", "a"), baseline="mean")
    # mean 0 -> A = r; the first response ends after 1 token
    expected = torch.tensor([[1.0, 0, 0, 0, 0], [-1.0, -1, -1, -1, 0]])
    torch.testing.assert_close(adv, expected)


def test_mean_baseline_by_hand_with_ties():
    # group a: 1, 1, -1, -1 (tie) -> mean 0 ; group b: 1, -1, -1, -1 -> mean -0.5
    tlr, mask = make_batch([1, 1, -1, -1, 1, -1, -1, -1], [3] * 8)
    idx = uids(*"aaaabbbb")
    adv, _ = reinforce_advantage(tlr, mask, idx, baseline="mean")
    assert scalar_adv(adv, mask) == [1.0, 1.0, -1.0, -1.0, 1.5, -0.5, -0.5, -0.5]


def test_mean_baseline_zero_one_same_as_pm1_halved():
    # {0,1} vs {-1,+1}: r' = 2r - 1 so A' = 2A under the mean baseline
    r01 = [1, 0, 0, 0]
    tlr01, mask = make_batch(r01, [2] * 4)
    tlrpm, _ = make_batch([2 * r - 1 for r in r01], [2] * 4)
    a01, _ = reinforce_advantage(tlr01, mask, uids(*"aaaa"), baseline="mean")
    apm, _ = reinforce_advantage(tlrpm, mask, uids(*"aaaa"), baseline="mean")
    torch.testing.assert_close(apm, 2 * a01)
    assert scalar_adv(a01, mask) == [0.75, -0.25, -0.25, -0.25]


def test_all_same_groups_mean_baseline_zero():
    tlr, mask = make_batch([1, 1, 1, -1, -1, -1], [2] * 6)
    idx = uids(*"aaabbb")
    for std_norm in (False, True):
        adv, _ = reinforce_advantage(tlr, mask, idx, baseline="mean", std_norm=std_norm)
        assert torch.count_nonzero(adv) == 0  # GRPO's "all-same groups get A = 0"
    grpo, _ = compute_grpo_outcome_advantage(tlr, mask, idx, norm_adv_by_std_in_grpo=True)
    assert torch.count_nonzero(grpo) == 0


def test_std_norm_by_hand():
    # group a: 1, -1 -> mean 0, std sqrt(2) ; group b: 1, 1, 1, -1 -> mean .5, std 1
    tlr, mask = make_batch([1, -1, 1, 1, 1, -1], [2] * 6)
    idx = uids("a", "a", "b", "b", "b", "b")
    eps = 1e-6
    adv, _ = reinforce_advantage(tlr, mask, idx, baseline="mean", std_norm=True)
    s2 = math.sqrt(2.0)
    expected = [1 / (s2 + eps), -1 / (s2 + eps), 0.5 / (1 + eps), 0.5 / (1 + eps), 0.5 / (1 + eps), -1.5 / (1 + eps)]
    torch.testing.assert_close(torch.tensor(scalar_adv(adv, mask)), torch.tensor(expected))
    adv_none, _ = reinforce_advantage(tlr, mask, idx, baseline="none", std_norm=True)
    expected_none = [1 / (s2 + eps), -1 / (s2 + eps)] + [r / (1 + eps) for r in (1, 1, 1, -1)]
    torch.testing.assert_close(torch.tensor(scalar_adv(adv_none, mask)), torch.tensor(expected_none))


def test_singleton_group_mirrors_verl_mean0_std1():
    tlr, mask = make_batch([1, -1, 1], [2] * 3)
    idx = uids("solo", "p", "p")
    adv, _ = reinforce_advantage(tlr, mask, idx, baseline="mean", std_norm=True)
    # singleton: mean 0, std 1 -> A = r / (1 + eps), exactly as verl's GRPO
    assert scalar_adv(adv, mask)[0] == pytest.approx(1 / (1 + 1e-6))
    grpo, _ = compute_grpo_outcome_advantage(tlr, mask, idx)
    torch.testing.assert_close(adv, grpo)


def test_none_std_norm_all_same_group_warns_and_explodes():
    tlr, mask = make_batch([1, 1, 1, -1], [2] * 4)
    with pytest.warns(RuntimeWarning, match="group filter"):
        adv, _ = reinforce_advantage(tlr, mask, uids("a", "a", "b", "b"), std_norm=True)
    # group a is all correct: std 0 -> r / eps; the filter must remove such groups first
    assert scalar_adv(adv, mask)[0] == pytest.approx(1e6)


def test_no_warning_on_mixed_groups():
    tlr, mask = make_batch([1, -1, -1, 1], [2] * 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        reinforce_advantage(tlr, mask, uids("a", "a", "b", "b"), std_norm=True)


def test_index_required_and_length_checked():
    tlr, mask = make_batch([1, -1], [2, 2])
    with pytest.raises(ValueError, match="index"):
        reinforce_advantage(tlr, mask, None)
    with pytest.raises(ValueError, match="index has 3"):
        reinforce_advantage(tlr, mask, uids("a", "a", "b"))


def test_unknown_baseline_names_the_key():
    tlr, mask = make_batch([1, -1], [2, 2])
    with pytest.raises(ValueError, match=r"algorithm\.reinforce\.baseline"):
        reinforce_advantage(tlr, mask, uids("a", "a"), baseline="median")


def test_no_grad_and_dtype():
    tlr, mask = make_batch([1.0, -1.0], [2, 2])
    tlr.requires_grad_(True)
    adv, _ = reinforce_advantage(tlr, mask, uids("a", "a"), baseline="mean", std_norm=True)
    assert not adv.requires_grad and adv.dtype == torch.float32


# --------------------------------------------------------------------------- loop vs vectorised


def random_groups(seed, n_groups=12, max_n=6, rewards=(-1.0, 1.0), continuous=False, T=7):
    g = torch.Generator().manual_seed(seed)
    sizes = [1, 1] + torch.randint(2, max_n + 1, (n_groups - 2,), generator=g).tolist()  # incl. size-1 groups
    index = []
    for k, n in enumerate(sizes):
        index += [f"uid-{k}"] * n
    perm = torch.randperm(len(index), generator=g).tolist()  # groups interleaved, as after a shuffle
    index = [index[p] for p in perm]
    B = len(index)
    if continuous:
        r = torch.rand(B, generator=g) * 2 - 1
    else:
        choice = torch.randint(0, len(rewards), (B,), generator=g)
        r = torch.tensor(rewards)[choice]
    lengths = torch.randint(1, T + 1, (B,), generator=g).tolist()
    tlr = torch.zeros(B, T)
    mask = torch.zeros(B, T)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        tlr[i, n - 1] = r[i]
    return tlr, mask, np.array(index, dtype=object), r


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("baseline", ["none", "mean"])
@pytest.mark.parametrize("std_norm", [False, True])
def test_loop_reference_matches_vectorised(seed, baseline, std_norm):
    tlr, mask, index, r = random_groups(seed, continuous=seed % 2 == 1)
    with warnings.catch_warnings():  # all-same groups with baseline none + std_norm warn
        warnings.simplefilter("ignore", RuntimeWarning)
        adv, _ = reinforce_advantage(tlr, mask, index, baseline=baseline, std_norm=std_norm)
    ref = torch.tensor(loop_reference(r.tolist(), index.tolist(), baseline, std_norm))
    torch.testing.assert_close(adv, ref.unsqueeze(-1) * mask)


# --------------------------------------------------------------------------- parity with verl GRPO


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("rewards", [(-1.0, 1.0), (0.0, 1.0), None])
def test_mean_std_norm_equals_verl_grpo(seed, rewards):
    tlr, mask, index, _ = random_groups(seed, rewards=rewards or (0.0,), continuous=rewards is None)
    ours, _ = reinforce_advantage(tlr, mask, index, baseline="mean", std_norm=True)
    grpo, _ = compute_grpo_outcome_advantage(tlr.clone(), mask, index, norm_adv_by_std_in_grpo=True)
    torch.testing.assert_close(ours, grpo)


@pytest.mark.parametrize("seed", range(5))
def test_mean_no_std_equals_verl_grpo_without_std(seed):
    tlr, mask, index, _ = random_groups(seed, continuous=seed % 2 == 0)
    ours, _ = reinforce_advantage(tlr, mask, index, baseline="mean", std_norm=False)
    grpo, _ = compute_grpo_outcome_advantage(tlr.clone(), mask, index, norm_adv_by_std_in_grpo=False)
    torch.testing.assert_close(ours, grpo)


def test_none_std_norm_equals_grpo_on_balanced_pm1_groups_only():
    # balanced mixed groups (mean 0): r / std == (r - mean) / std
    balanced = [1, -1, 1, -1, -1, 1, 1, -1, -1, 1]
    idx = uids(*"aaaabbccdd")
    tlr, mask = make_batch(balanced, [1, 2, 3, 4, 5, 1, 2, 3, 4, 5])
    ours, _ = reinforce_advantage(tlr, mask, idx, baseline="none", std_norm=True)
    grpo, _ = compute_grpo_outcome_advantage(tlr.clone(), mask, idx)
    torch.testing.assert_close(ours, grpo)
    # unbalanced mixed group: 3 correct, 1 wrong -> mean 0.5, so they differ
    tlr, mask = make_batch([1, 1, 1, -1], [2] * 4)
    idx = uids(*"aaaa")
    ours, _ = reinforce_advantage(tlr, mask, idx, baseline="none", std_norm=True)
    grpo, _ = compute_grpo_outcome_advantage(tlr.clone(), mask, idx)
    assert not torch.allclose(ours, grpo)
    assert scalar_adv(ours, mask) == pytest.approx([1 / (1 + 1e-6)] * 3 + [-1 / (1 + 1e-6)])
    assert scalar_adv(grpo, mask) == pytest.approx([0.5, 0.5, 0.5, -1.5], rel=1e-5)


# --------------------------------------------------------------------------- raft


def test_raft_threshold_pm1_and_01():
    for rewards in ([1, -1, 1, -1], [1, 0, 1, 0]):
        tlr, mask = make_batch(rewards, [1, 2, 3, 4], T=5)
        adv, ret = raft_advantage(tlr, mask)
        expected = torch.tensor([[1.0, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]])
        torch.testing.assert_close(adv, expected)
        assert torch.equal(adv, ret)


def test_raft_threshold_is_strict_and_configurable():
    tlr, mask = make_batch([0.5, 0.7, 1.0, 0.2], [2] * 4)
    assert scalar_adv(raft_advantage(tlr, mask)[0], mask) == [0.0, 1.0, 1.0, 0.0]
    assert scalar_adv(raft_advantage(tlr, mask, threshold=0.9)[0], mask) == [0.0, 0.0, 1.0, 0.0]
    assert scalar_adv(raft_advantage(tlr, mask, threshold=0.1)[0], mask) == [1.0, 1.0, 1.0, 1.0]


# --------------------------------------------------------------------------- verl registry


def algo_cfg(**nodes):
    return OmegaConf.create({"adv_estimator": "reinforce", "gamma": 1.0, **nodes})


@pytest.mark.parametrize("name", ["reinforce", "reinforce_rej"])
def test_registry_reinforce_reads_option_node(name):
    tlr, mask, index, _ = random_groups(3)
    fn = get_adv_estimator_fn(name)
    cfg = algo_cfg(reinforce={"baseline": "mean", "std_norm": True, "epsilon": 1e-6})
    adv, ret = fn(token_level_rewards=tlr, response_mask=mask, config=cfg, index=index)
    grpo, _ = compute_grpo_outcome_advantage(tlr.clone(), mask, index)
    torch.testing.assert_close(adv, grpo)
    assert ret.shape == mask.shape


@pytest.mark.parametrize(
    "config",
    [
        None,
        {},
        OmegaConf.create({"adv_estimator": "reinforce"}),
        AlgoConfig(adv_estimator="reinforce"),
    ],
    ids=["none", "dict", "dictconfig-no-node", "algoconfig"],
)
def test_registry_defaults_without_option_node(config):
    tlr, mask = make_batch([1, -1, -1, -1], [2] * 4)
    fn = get_adv_estimator_fn("reinforce")
    adv, _ = fn(token_level_rewards=tlr, response_mask=mask, config=config, index=uids(*"aabb"))
    assert scalar_adv(adv, mask) == [1.0, -1.0, -1.0, -1.0]  # baseline none, no std


def test_registry_struct_dictconfig_and_plain_dict():
    tlr, mask = make_batch([1, -1, -1, -1], [2] * 4)
    fn = get_adv_estimator_fn("reinforce_rej")
    struct = algo_cfg()
    OmegaConf.set_struct(struct, True)  # hydra configs are struct: unknown keys raise on attribute access
    adv, _ = fn(token_level_rewards=tlr, response_mask=mask, config=struct, index=uids(*"aaaa"))
    assert scalar_adv(adv, mask) == [1.0, -1.0, -1.0, -1.0]
    adv, _ = fn(
        token_level_rewards=tlr, response_mask=mask, config={"reinforce": {"baseline": "mean"}}, index=uids(*"aaaa")
    )
    assert scalar_adv(adv, mask) == [1.5, -0.5, -0.5, -0.5]


def test_registry_unknown_baseline_and_missing_index():
    tlr, mask = make_batch([1, -1], [2, 2])
    fn = get_adv_estimator_fn("reinforce")
    with pytest.raises(ValueError, match=r"algorithm\.reinforce\.baseline"):
        cfg = algo_cfg(reinforce={"baseline": "max"})
        fn(token_level_rewards=tlr, response_mask=mask, config=cfg, index=uids("a", "a"))
    with pytest.raises(ValueError, match="index"):
        fn(token_level_rewards=tlr, response_mask=mask, config=algo_cfg())  # verl omits index without uid


@pytest.mark.parametrize("name", ["raft", "raft_pp"])
def test_registry_raft_threshold(name):
    tlr, mask = make_batch([0.5, 0.7, 1.0], [2] * 3)
    fn = get_adv_estimator_fn(name)
    cfg = algo_cfg(raft={"threshold": 0.8})
    adv, _ = fn(token_level_rewards=tlr, response_mask=mask, config=cfg, index=uids(*"aab"))
    assert scalar_adv(adv, mask) == [0.0, 0.0, 1.0]
    adv, _ = fn(token_level_rewards=tlr, response_mask=mask, config=None)  # no index needed
    assert scalar_adv(adv, mask) == [0.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"algorithm\.raft\.threshold"):
        fn(token_level_rewards=tlr, response_mask=mask, config={"raft": {"threshold": "high"}})


def test_registry_ignores_extra_kwargs():
    tlr, mask = make_batch([1, -1], [2, 2])
    fn = get_adv_estimator_fn("reinforce")
    adv, _ = fn(token_level_rewards=tlr, response_mask=mask, config=None, index=uids("a", "a"), reward_baselines=None)
    assert scalar_adv(adv, mask) == [1.0, -1.0]


def test_import_twice_and_reload_is_idempotent():
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY

    importlib.import_module("recipe.algos")
    importlib.import_module("recipe.algos.advantages")
    importlib.reload(importlib.import_module("recipe.algos.advantages"))
    importlib.reload(importlib.import_module("recipe.algos.losses"))
    importlib.reload(importlib.import_module("recipe.algos"))
    for name in ("reinforce", "reinforce_rej"):
        assert ADV_ESTIMATOR_REGISTRY[name].__qualname__ == "compute_reinforce_advantage"
    for name in ("raft", "raft_pp"):
        assert ADV_ESTIMATOR_REGISTRY[name].__qualname__ == "compute_raft_advantage"
        assert POLICY_LOSS_REGISTRY[name].__module__ == "recipe.algos.losses"
    assert ADV_ESTIMATOR_REGISTRY["reinforce"] is ADV_ESTIMATOR_REGISTRY["reinforce_rej"]


def test_verl_compute_advantage_dispatches_to_registered_estimator():
    """verl's own ``compute_advantage`` (ray_trainer) calls our estimator with the uid index."""
    from verl import DataProto
    from verl.trainer.ppo.ray_trainer import compute_advantage

    tlr, mask, index, _ = random_groups(7)
    data = DataProto.from_dict(
        tensors={"token_level_rewards": tlr, "response_mask": mask}, non_tensors={"uid": index}
    )
    cfg = OmegaConf.create({"adv_estimator": "reinforce_rej", "reinforce": {"baseline": "mean", "std_norm": True}})
    out = compute_advantage(data, adv_estimator="reinforce_rej", config=cfg)
    grpo, _ = compute_grpo_outcome_advantage(tlr.clone(), mask, index)
    torch.testing.assert_close(out.batch["advantages"], grpo)


def test_grpo_recipe_is_verls_own_estimator():
    """recipe=grpo must be stock verl: importing recipe.algos leaves verl's 'grpo' untouched."""
    from omegaconf import OmegaConf

    from verl.trainer.ppo import core_algos

    assert core_algos.get_adv_estimator_fn("grpo") is core_algos.compute_grpo_outcome_advantage
    grpo_yaml = OmegaConf.load(Path(__file__).resolve().parents[3] / "conf" / "recipe" / "grpo.yaml")
    assert grpo_yaml.algorithm.adv_estimator == "grpo"
    assert grpo_yaml.actor_rollout_ref.actor.get("policy_loss") is None  # verl's default loss (vanilla)
