"""Iterative DPO pieces of recipe.algos.preference (arXiv 2504.11343 §1, 2508.06412 §3):
preference losses (DPO / IPO / SimPO) and their registry, pair construction and the actor's
micro-batch loss (with LoRR's SFT term). Every expected number is computed by hand with math.
LoRR's reset / schedule: test_lorr.py; the config nodes: tests/unit/config/test_nodes.py.
CPU only, no Ray."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recipe.algos.preference import (
    PREFERENCE_LOSSES,
    PairStats,
    PreferenceLossOutput,
    build_pairs,
    dpo_loss,
    get_preference_loss,
    ipo_loss,
    preference_microbatch_loss,
    register_preference_loss,
    sequence_logps,
    simpo_loss,
)
from recipe.config import PreferenceConfig

INF = float("inf")


def softplus(x: float) -> float:
    """-log sigma(-x) = log(1 + e^x)."""
    return math.log1p(math.exp(x))


def t(*v, grad=False):
    return torch.tensor(v, dtype=torch.float32, requires_grad=grad)


# --------------------------------------------------------------------------- sequence_logps


def test_sequence_logps_sum_and_average_with_masks():
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -INF, -INF], [-1.0, -1.0, -1.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    assert sequence_logps(lp, mask).tolist() == [-3.0, -0.5, 0.0]
    assert sequence_logps(lp, mask, average=True).tolist() == [-1.5, -0.5, 0.0]  # empty row: /max(0, 1)
    assert sequence_logps(lp, mask.float(), average=True).tolist() == [-1.5, -0.5, 0.0]


def test_sequence_logps_gradient_is_the_mask_and_finite_on_inf_padding():
    lp = torch.tensor([[-1.0, -INF], [-2.0, -3.0]], requires_grad=True)
    mask = torch.tensor([[1, 0], [1, 1]])
    sequence_logps(lp, mask, average=True).sum().backward()
    assert lp.grad.tolist() == [[1.0, 0.0], [0.5, 0.5]]


def test_sequence_logps_shape_errors():
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        sequence_logps(torch.zeros(2, 3), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        sequence_logps(torch.zeros(3), torch.ones(3))


# --------------------------------------------------------------------------- preference losses


def test_dpo_loss_hand_values_and_rewards():
    # pair 0: (pi_c - ref_c) = 1, (pi_r - ref_r) = -1, beta 0.1 -> z = 0.2
    # pair 1: (pi_c - ref_c) = -2, (pi_r - ref_r) = 2 -> z = 0.1 * -4 = -0.4
    out = dpo_loss(t(-3.0, -10.0), t(-5.0, -2.0), t(-4.0, -8.0), t(-4.0, -4.0), beta=0.1)
    assert isinstance(out, PreferenceLossOutput)
    assert out.losses.tolist() == pytest.approx([softplus(-0.2), softplus(0.4)], abs=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, -0.2], abs=1e-6)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1, 0.2], abs=1e-6)


def test_dpo_label_smoothing_conservative():
    ls = 0.1
    out = dpo_loss(t(-3.0, -1.0), t(-5.0, -1.0), t(-4.0, -1.0), t(-4.0, -1.0), beta=0.1, label_smoothing=ls)
    # z = 0.2: -(0.9) log sigma(0.2) - 0.1 log sigma(-0.2); z = 0: log 2 whatever ls
    expected = (1 - ls) * softplus(-0.2) + ls * softplus(0.2)
    assert out.losses.tolist() == pytest.approx([expected, math.log(2.0)], abs=1e-6)


def test_dpo_gradient_direction_and_rewards_detached():
    pi_c, pi_r = t(-3.0, grad=True), t(-5.0, grad=True)
    out = dpo_loss(pi_c, pi_r, t(-4.0), t(-4.0), beta=0.1)
    out.losses.sum().backward()
    s = 1.0 / (1.0 + math.exp(0.2))  # sigma(-z)
    assert pi_c.grad.item() == pytest.approx(-0.1 * s, abs=1e-7) and pi_c.grad.item() < 0
    assert pi_r.grad.item() == pytest.approx(0.1 * s, abs=1e-7) and pi_r.grad.item() > 0
    assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


def test_ipo_loss_hand_values_and_gradient():
    pi_c = t(-3.0, -1.0, grad=True)
    # beta 0.1 -> target 1 / (2 beta) = 5; h = 2 -> 9; h = 5 -> 0
    out = ipo_loss(pi_c, t(-5.0, -6.0), t(-4.0, -1.0), t(-4.0, -1.0), beta=0.1)
    assert out.losses.tolist() == pytest.approx([9.0, 0.0], abs=1e-5)
    assert out.chosen_rewards.tolist() == pytest.approx([0.1, 0.0], abs=1e-6)
    assert out.rejected_rewards.tolist() == pytest.approx([-0.1, -0.5], abs=1e-6)
    out.losses.sum().backward()
    assert pi_c.grad.tolist() == pytest.approx([2 * (2 - 5), 0.0], abs=1e-5)  # d/dpi_c = 2 (h - 5)


def test_simpo_loss_reference_free_hand_values():
    # beta 2, gamma = 0.5 * 2 = 1: z = 2 * (-0.5 - -1.5) - 1 = 1
    out = simpo_loss(t(-0.5), t(-1.5), beta=2.0, gamma_beta_ratio=0.5)
    assert out.losses.item() == pytest.approx(softplus(-1.0), abs=1e-6)
    assert (out.chosen_rewards.item(), out.rejected_rewards.item()) == pytest.approx((-1.0, -3.0))
    same = simpo_loss(t(-0.5), t(-1.5), t(-9.0), t(9.0), beta=2.0, gamma_beta_ratio=0.5)
    assert torch.equal(same.losses, out.losses)  # reference ignored
    ls = simpo_loss(t(-0.5), t(-1.5), beta=2.0, gamma_beta_ratio=0.5, label_smoothing=0.2)
    assert ls.losses.item() == pytest.approx(0.8 * softplus(-1.0) + 0.2 * softplus(1.0), abs=1e-6)


def test_loss_input_errors():
    with pytest.raises(ValueError, match="beta must be > 0"):
        dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(t(0.0), t(0.0), t(0.0), t(0.0), label_smoothing=0.5)
    with pytest.raises(ValueError, match=r"\[P\]"):
        dpo_loss(t(0.0, 1.0), t(0.0), t(0.0), t(0.0))
    with pytest.raises(ValueError, match="reference"):
        ipo_loss(t(0.0), t(0.0), None, None)


def test_registry_specs_and_unknown_name():
    assert {k: (v.needs_reference, v.length_normalized) for k, v in PREFERENCE_LOSSES.items()
            if k in ("dpo", "ipo", "simpo")} == {"dpo": (True, False), "ipo": (True, True), "simpo": (False, True)}
    assert get_preference_loss("simpo").fn is simpo_loss
    with pytest.raises(ValueError, match=r"preference\.loss.*dpo.*ipo.*simpo.*'kto'"):
        get_preference_loss("kto")


def test_register_custom_loss_used_by_config_and_microbatch():
    @register_preference_loss("test_hinge", needs_reference=False, length_normalized=False)
    def hinge(pi_c, pi_r, ref_c=None, ref_r=None, beta=1.0):
        losses = torch.relu(1.0 - beta * (pi_c - pi_r))
        return PreferenceLossOutput(losses, (beta * pi_c).detach(), (beta * pi_r).detach())

    try:
        with pytest.raises(ValueError, match="already registered"):
            register_preference_loss("test_hinge", False, False)(lambda *a, **k: None)
        cfg = PreferenceConfig(loss="test_hinge", beta=0.5)
        assert cfg.loss_kwargs() == {"beta": 0.5} and not cfg.needs_reference
        lp = torch.tensor([[-1.0], [-2.0]], requires_grad=True)
        loss, _ = preference_microbatch_loss(lp, None, torch.ones(2, 1), torch.tensor([0, 0]),
                                             torch.tensor([True, False]), torch.zeros(2), cfg, num_pairs=1)
        assert loss.item() == pytest.approx(1.0 - 0.5 * 1.0)  # relu(1 - 0.5 * (-1 - -2))
    finally:
        PREFERENCE_LOSSES.pop("test_hinge")


# --------------------------------------------------------------------------- build_pairs


def test_build_pairs_best_worst_skips_uniform_groups():
    uids = ["a"] * 4 + ["b"] * 4
    pairs, stats = build_pairs(uids, [0, 1, 1, 0, 1, 1, 1, 1])
    assert pairs == [(1, 0)]  # first max, first min; group b all correct -> skipped
    assert stats == PairStats(groups=2, skipped_no_gap=1, pairs=1)


def test_build_pairs_real_scores_n2_n1_and_all_same():
    pairs, stats = build_pairs(["x", "x", "y", "z", "z", "z"], [0.0, 1.0, 1.0, 0.2, 0.9, 0.5])
    assert pairs == [(1, 0), (4, 3)]  # y (n = 1) skipped
    assert stats == PairStats(groups=3, skipped_no_gap=1, pairs=2)
    pairs, stats = build_pairs(["a", "a", "a"], [0.5, 0.5, 0.5])
    assert pairs == [] and stats == PairStats(groups=1, skipped_no_gap=1, pairs=0)
    assert build_pairs([], []) == ([], PairStats(0, 0, 0))


def test_build_pairs_non_contiguous_uids_in_first_appearance_order():
    pairs, stats = build_pairs(["b", "a", "b", "a", "c"], [1, 0, 0, 1, 1])
    assert pairs == [(0, 2), (3, 1)]  # group b first (row 0), then a; c has one response
    assert stats == PairStats(groups=3, skipped_no_gap=1, pairs=2)


def test_build_pairs_all_mode():
    pairs, stats = build_pairs(["g"] * 4, [1, 0, 1, 0], mode="all")
    assert pairs == [(0, 1), (0, 3), (2, 1), (2, 3)]  # every correct x wrong, index order
    assert stats.pairs == 4
    pairs, _ = build_pairs(["g", "g", "g", "h", "h"], [0.5, 1.0, 0.0, 0.0, 0.0], mode="all")
    assert pairs == [(0, 2), (1, 0), (1, 2)]  # ties never paired, h skipped


def test_build_pairs_random_mode():
    uids, scores = ["g"] * 5 + ["h"] * 2, [1, 0, 1, 0, 0, 0, 1]
    with pytest.raises(ValueError, match="rng"):
        build_pairs(uids, scores, mode="random")
    a, _ = build_pairs(uids, scores, "random", np.random.default_rng(7))
    b, _ = build_pairs(uids, scores, "random", np.random.default_rng(7))
    assert a == b  # reproducible
    seen_c, seen_r = set(), set()
    for seed in range(60):
        pairs, stats = build_pairs(uids, scores, "random", np.random.default_rng(seed))
        assert stats == PairStats(groups=2, skipped_no_gap=0, pairs=2)
        (c, r), h = pairs
        assert c in (0, 2) and r in (1, 3, 4) and h == (6, 5)  # h: single candidates -> best_worst
        seen_c.add(c)
        seen_r.add(r)
    assert seen_c == {0, 2} and seen_r == {1, 3, 4}  # uniform among ties: every candidate drawn


def test_build_pairs_errors():
    with pytest.raises(ValueError, match=r"preference\.pairs.*'best'"):
        build_pairs(["a"], [1.0], mode="best")
    with pytest.raises(ValueError, match="length"):
        build_pairs(["a", "a"], [1.0])
    with pytest.raises(ValueError, match=r"row 1 \(uid 'a'\)"):
        build_pairs(["a", "a"], [1.0, float("nan")])


# --------------------------------------------------------------------------- micro-batch loss

DPO = PreferenceConfig()  # dpo, beta 0.1, sums


def batch():
    """Rows: [pair 1 rejected, pair 0 chosen, padding, pair 0 rejected, pair 1 chosen], T = 3.

    pair 0: chosen sum -3 (2 tokens, -1 -2), ref -4; rejected sum -6 (3 tokens), ref -5
            -> z = 0.1 * ((-3 + 4) - (-6 + 5)) = 0.2, nll = 1.5, lambda 0.25
    pair 1: chosen sum -2 (1 token), ref -1; rejected sum -4 (2 tokens), ref -2
            -> z = 0.1 * ((-2 + 1) - (-4 + 2)) = 0.1, nll = 2.0, lambda 0.5
    """
    lp = torch.tensor([[-1.0, -3.0, -INF], [-1.0, -2.0, -INF], [-INF, -INF, -INF], [-1.0, -2.0, -3.0],
                       [-2.0, -INF, -INF]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0, 0.0], [-2.0, -2.0, 0.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -2.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 0], [1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    pair_id = torch.tensor([1, 0, -1, 0, 1])
    chosen = torch.tensor([False, True, False, False, True])
    lam = torch.tensor([0.5, 0.25, 0.0, 0.25, 0.5])
    return lp, ref, mask, pair_id, chosen, lam


EXPECTED = (softplus(-0.2) + softplus(-0.1) + 0.25 * 1.5 + 0.5 * 2.0) / 2


def test_microbatch_loss_hand_value_and_metrics():
    lp, ref, mask, pid, ch, lam = batch()
    loss, m = preference_microbatch_loss(lp, ref, mask, pid, ch, lam, DPO, num_pairs=2)
    assert loss.item() == pytest.approx(EXPECTED, abs=1e-6)
    assert m["dpo/pairs_in_micro_batch"] == 2.0
    assert m["dpo/loss"] == pytest.approx((softplus(-0.2) + softplus(-0.1)) / 2, abs=1e-6)
    assert m["dpo/reward_margin"] == pytest.approx((0.2 + 0.1) / 2, abs=1e-6)
    assert m["dpo/reward_accuracy"] == 1.0
    assert m["dpo/chosen_logps"] == pytest.approx(-2.5) and m["dpo/rejected_logps"] == pytest.approx(-5.0)
    assert m["lorr/sft_loss"] == pytest.approx(1.75) and m["lorr/sft_weight"] == pytest.approx(0.375)
    assert all(isinstance(v, float) for v in m.values())
    scaled, _ = preference_microbatch_loss(lp, ref, mask, pid, ch, lam, DPO, num_pairs=2, dp_size=4)
    assert scaled.item() == pytest.approx(4 * EXPECTED, abs=1e-5)


def test_microbatch_loss_gradients_padding_ignored():
    lp, ref, mask, pid, ch, lam = batch()
    loss, _ = preference_microbatch_loss(lp, ref, mask, pid, ch, lam, DPO, num_pairs=2)
    loss.backward()
    g = lp.grad
    assert torch.isfinite(g).all()
    assert g[2].abs().sum() == 0 and g[:, 2][~mask[:, 2]].abs().sum() == 0  # padding row, masked tokens
    # chosen row of pair 0, each token: (-0.1 sigma(-0.2) - 0.25 / 2) / 2
    s0 = 1 / (1 + math.exp(0.2))
    assert g[1, 0].item() == pytest.approx((-0.1 * s0 - 0.125) / 2, abs=1e-6)
    assert g[3, 2].item() == pytest.approx(0.1 * s0 / 2, abs=1e-6)  # rejected token pushed down
    # the padding row's values do not matter
    lp2 = lp.detach().clone()
    lp2[2] = torch.tensor([5.0, -7.0, 1.0])
    loss2, _ = preference_microbatch_loss(lp2, ref, mask, pid, ch, lam, DPO, num_pairs=2)
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-7)


def test_microbatch_losses_sum_to_the_one_batch_loss():
    lp, ref, mask, pid, ch, lam = batch()
    full, _ = preference_microbatch_loss(lp, ref, mask, pid, ch, lam, DPO, num_pairs=2)
    (g_full,) = torch.autograd.grad(full, lp)
    parts = [torch.tensor([1, 3]), torch.tensor([0, 2, 4])]  # pair 0 | pair 1 + padding
    total = 0.0
    g_sum = torch.zeros_like(lp)
    for rows in parts:
        sub = lp.detach()[rows].clone().requires_grad_(True)
        loss, m = preference_microbatch_loss(sub, ref[rows], mask[rows], pid[rows], ch[rows], lam[rows], DPO,
                                             num_pairs=2)
        assert m["dpo/pairs_in_micro_batch"] == 1.0
        loss.backward()
        total += loss.item()
        g_sum[rows] = sub.grad
    assert total == pytest.approx(full.item(), abs=1e-6)
    torch.testing.assert_close(g_sum, g_full)


def test_microbatch_zero_pairs_zero_grad_no_nan():
    lp = torch.tensor([[-INF, -1.0], [-2.0, -INF]], requires_grad=True)
    loss, m = preference_microbatch_loss(lp, torch.zeros(2, 2), torch.ones(2, 2), torch.tensor([-1, -1]),
                                         torch.tensor([True, False]), torch.zeros(2), DPO, num_pairs=0)
    assert loss.item() == 0.0 and loss.requires_grad
    assert m == {"dpo/pairs_in_micro_batch": 0.0}
    loss.backward()
    assert torch.equal(lp.grad, torch.zeros(2, 2))


def test_microbatch_split_or_malformed_pair_raises_naming_id():
    lp, ref, mask, pid, ch, lam = batch()
    rows = torch.tensor([0, 1, 3])  # pair 1 lost its chosen row
    with pytest.raises(ValueError, match=r"pair 1:.*same micro-batch"):
        preference_microbatch_loss(lp[rows], ref[rows], mask[rows], pid[rows], ch[rows], lam[rows], DPO, num_pairs=2)
    both_chosen = torch.tensor([False, True, False, True, True])
    with pytest.raises(ValueError, match=r"pair 0:.*2 chosen"):
        preference_microbatch_loss(lp, ref, mask, pid, both_chosen, lam, DPO, num_pairs=2)
    three = torch.tensor([1, 0, 0, 0, 1])
    with pytest.raises(ValueError, match=r"pair 0: found 3 row"):
        preference_microbatch_loss(lp, ref, mask, three, ch, lam, DPO, num_pairs=2)


def test_microbatch_argument_errors():
    lp, ref, mask, pid, ch, lam = batch()
    with pytest.raises(ValueError, match="needs ref_log_prob"):
        preference_microbatch_loss(lp, None, mask, pid, ch, lam, DPO, num_pairs=2)
    with pytest.raises(ValueError, match="num_pairs"):
        preference_microbatch_loss(lp, ref, mask, pid, ch, lam, DPO, num_pairs=1)
    with pytest.raises(ValueError, match=r"pair_id must be \[b\]"):
        preference_microbatch_loss(lp, ref, mask, pid[:4], ch, lam, DPO, num_pairs=2)
    with pytest.raises(ValueError, match="sft_weight"):
        preference_microbatch_loss(lp, ref, mask, pid, ch, -lam, DPO, num_pairs=2)
    with pytest.raises(ValueError, match="dp_size"):
        preference_microbatch_loss(lp, ref, mask, pid, ch, lam, DPO, num_pairs=2, dp_size=0)


def test_microbatch_simpo_without_reference_uses_averages():
    lp, _, mask, pid, ch, lam = batch()
    cfg = PreferenceConfig(loss="simpo", beta=2.0, simpo_gamma_beta_ratio=0.5)
    loss, m = preference_microbatch_loss(lp, None, mask, pid, ch, torch.zeros(5), cfg, num_pairs=2)
    # averages: pair 0 chosen -1.5, rejected -2 -> z = 2 * 0.5 - 1 = 0; pair 1 chosen -2, rejected -2 -> z = -1
    assert loss.item() == pytest.approx((math.log(2.0) + softplus(1.0)) / 2, abs=1e-6)
    assert m["dpo/reward_margin"] == pytest.approx((1.0 + 0.0) / 2, abs=1e-6)
    assert m["dpo/reward_accuracy"] == 0.5 and m["lorr/sft_weight"] == 0.0


def test_microbatch_ipo_and_length_normalized_dpo():
    lp, ref, mask, pid, ch, lam = batch()
    zero = torch.zeros(5)
    # averaged log-probs: pair 0: pi_c -1.5, ref_c -2, pi_r -2, ref_r -5/3 -> h = 0.5 + 1/3 = 5/6
    #                     pair 1: pi_c -2, ref_c -1, pi_r -2, ref_r -1 -> h = 0
    h0, h1 = 0.5 + 1.0 / 3.0, 0.0
    ipo = PreferenceConfig(loss="ipo", beta=0.5)  # target 1 / (2 * 0.5) = 1
    loss, _ = preference_microbatch_loss(lp, ref, mask, pid, ch, zero, ipo, num_pairs=2)
    assert loss.item() == pytest.approx(((h0 - 1) ** 2 + (h1 - 1) ** 2) / 2, abs=1e-6)
    dpo_avg = PreferenceConfig(length_normalize=True)
    loss, _ = preference_microbatch_loss(lp, ref, mask, pid, ch, zero, dpo_avg, num_pairs=2)
    assert loss.item() == pytest.approx((softplus(-0.1 * h0) + softplus(-0.1 * h1)) / 2, abs=1e-6)
