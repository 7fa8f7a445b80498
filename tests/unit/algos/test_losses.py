"""RAFT and RAFT++ policy losses of recipe.algos.losses (Minimalist paper, arXiv 2504.11343).

The ``config`` argument is built as verl's actor has it: an ``ActorConfig`` whose
``global_batch_info`` dict ``verl.workers.utils.losses.ppo_loss`` fills in before each call.
CPU only, no Ray.
"""

from __future__ import annotations

import math

import pytest
import torch

import recipe.algos  # noqa: F401  (registers the losses)
from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla, get_policy_loss_fn
from verl.workers.config import ActorConfig

LOG_HALF = math.log(0.5)
METRIC_KEYS = {"actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower", "actor/raft_kept_frac"}


def actor_config(clip_low=0.2, clip_high=0.2, loss_agg_mode="token-mean", global_batch_info=None):
    cfg = ActorConfig(
        strategy="fsdp",
        rollout_n=4,
        ppo_micro_batch_size_per_gpu=1,
        clip_ratio=0.2,
        clip_ratio_low=clip_low,
        clip_ratio_high=clip_high,
        loss_agg_mode=loss_agg_mode,
    )
    cfg.global_batch_info.update(global_batch_info or {})
    return cfg


def tiny_batch():
    """3 responses, T = 4: two correct (A = 1), one wrong (A = 0); response 0 ends early."""
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, 0.0, 1.0]).unsqueeze(-1) * mask
    log_prob = torch.tensor(
        [[-0.5, -1.0, -9.0, -9.0], [-2.0, -2.0, -2.0, -2.0], [-0.25, -0.75, -1.5, -9.0]], requires_grad=True
    )
    old = log_prob.detach().clone()
    return old, log_prob, adv, mask


def call(name, old, log_prob, adv, mask, config=None, loss_agg_mode="token-mean", **kw):
    return get_policy_loss_fn(name)(
        old_log_prob=old,
        log_prob=log_prob,
        advantages=adv,
        response_mask=mask,
        loss_agg_mode=loss_agg_mode,
        config=config,
        **kw,
    )


# --------------------------------------------------------------------------- raft


@pytest.mark.parametrize("config", [None, "actor"])
def test_raft_value_by_hand(config):
    old, log_prob, adv, mask = tiny_batch()
    cfg = actor_config() if config else None
    loss, metrics = call("raft", old, log_prob, adv, mask, cfg)
    # kept tokens: response 0 (2 tokens) and response 2 (3 tokens)
    expected = (0.5 + 1.0 + 0.25 + 0.75 + 1.5) / 5
    assert loss.item() == pytest.approx(expected)
    assert set(metrics) == METRIC_KEYS
    assert metrics["actor/raft_kept_frac"] == pytest.approx(5 / 9)
    assert metrics["actor/pg_clipfrac"] == 0.0 and metrics["actor/pg_clipfrac_lower"] == 0.0
    assert metrics["actor/ppo_kl"] == pytest.approx(0.0)


def test_raft_gradient_direction():
    old, log_prob, adv, mask = tiny_batch()
    loss, _ = call("raft", old, log_prob, adv, mask)
    loss.backward()
    keep = mask & (adv > 0)
    grad = log_prob.grad
    # d loss / d log_prob_t = -1 / n_kept on kept tokens: raising their log-prob lowers the loss
    torch.testing.assert_close(grad[keep], torch.full((5,), -1 / 5))
    assert torch.all(grad[~keep] == 0)  # wrong response and padding get no gradient


def test_raft_ppo_kl_metric_as_vanilla():
    old, log_prob, adv, mask = tiny_batch()
    shifted = (log_prob.detach() + torch.tensor([0.1, 0.0, -0.3]).unsqueeze(-1)).requires_grad_(True)
    _, metrics = call("raft", old, shifted, adv, mask)
    # mean of (old - new) over the 5 kept tokens: 2 tokens at -0.1 and 3 at +0.3
    assert metrics["actor/ppo_kl"] == pytest.approx((2 * -0.1 + 3 * 0.3) / 5, abs=1e-6)


def test_raft_no_kept_tokens_zero_loss_finite_grad():
    old, log_prob, _, mask = tiny_batch()
    adv = torch.zeros(3, 4)
    with_pad_inf = log_prob.detach().clone()
    with_pad_inf[~mask] = float("-inf")  # padding log-probs may be anything
    with_pad_inf.requires_grad_(True)
    for name, cfg in (("raft", None), ("raft_pp", actor_config())):
        lp = with_pad_inf.detach().clone().requires_grad_(True)
        loss, metrics = call(name, old, lp, adv, mask, cfg)
        assert loss.item() == 0.0
        loss.backward()
        assert lp.grad is not None and torch.all(lp.grad == 0)
        assert metrics["actor/raft_kept_frac"] == 0.0
        assert set(metrics) == METRIC_KEYS


def test_raft_uses_global_batch_info_like_vanilla():
    """With verl's actor info, token-mean divides by the mini-batch's response tokens (all ranks)."""
    old, log_prob, adv, mask = tiny_batch()
    cfg = actor_config(global_batch_info={"dp_size": 2, "batch_num_tokens": 20, "global_batch_size": 6})
    loss, _ = call("raft", old, log_prob, adv, mask, cfg)
    assert loss.item() == pytest.approx((0.5 + 1.0 + 0.25 + 0.75 + 1.5) / 20 * 2)


def test_raft_seq_mean_token_mean():
    old, log_prob, adv, mask = tiny_batch()
    loss, _ = call("raft", old, log_prob, adv, mask, None, loss_agg_mode="seq-mean-token-mean")
    # mean over the 2 kept responses of their token means
    assert loss.item() == pytest.approx(((0.5 + 1.0) / 2 + (0.25 + 0.75 + 1.5) / 3) / 2)


def test_raft_rollout_is_weights_multiply_token_losses():
    old, log_prob, adv, mask = tiny_batch()
    w = torch.full((3, 4), 2.0)
    loss, _ = call("raft", old, log_prob, adv, mask, None, rollout_is_weights=w)
    assert loss.item() == pytest.approx(2 * (0.5 + 1.0 + 0.25 + 0.75 + 1.5) / 5)


# --------------------------------------------------------------------------- raft_pp


def ppo_batch(seed=0, B=6, T=5):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    correct = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.float32)[:B]
    adv = correct.unsqueeze(-1) * mask
    old = -torch.rand(B, T, generator=g) * 3
    log_prob = (old + (torch.rand(B, T, generator=g) - 0.5) * 0.8).requires_grad_(True)
    return old, log_prob, adv, mask, correct.bool()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("clip_high", [0.2, 0.28])
def test_raft_pp_equals_vanilla_on_kept_subset(seed, clip_high):
    old, log_prob, adv, mask, correct = ppo_batch(seed)
    cfg = actor_config(clip_high=clip_high)
    loss, metrics = call("raft_pp", old, log_prob, adv, mask, cfg)
    sub = correct
    ref, ref_metrics = compute_policy_loss_vanilla(
        old[sub], log_prob[sub], adv[sub], mask[sub], "token-mean", actor_config(clip_high=clip_high)
    )
    torch.testing.assert_close(loss, ref)
    for key in ("actor/pg_clipfrac", "actor/ppo_kl", "actor/pg_clipfrac_lower"):
        assert metrics[key] == pytest.approx(ref_metrics[key], abs=1e-6)
    assert metrics["actor/raft_kept_frac"] == pytest.approx((mask & correct[:, None]).sum().item() / mask.sum().item())


def test_raft_pp_equation_min_s_clip_over_kept_tokens():
    old, log_prob, adv, mask, correct = ppo_batch(1)
    cfg = actor_config(clip_low=0.2, clip_high=0.28)
    loss, _ = call("raft_pp", old, log_prob, adv, mask, cfg)
    s = torch.exp(log_prob - old)
    keep = mask & correct[:, None]
    expected = -torch.minimum(s, s.clamp(0.8, 1.28))[keep].mean()
    torch.testing.assert_close(loss, expected)


def test_raft_pp_ignores_wrong_responses():
    old, log_prob, adv, mask, correct = ppo_batch(2)
    cfg = actor_config()
    loss_a, _ = call("raft_pp", old, log_prob, adv, mask, cfg)
    changed = log_prob.detach().clone()
    changed[~correct] += 5.0  # move pi_theta far away on the wrong responses
    changed.requires_grad_(True)
    loss_b, _ = call("raft_pp", old, changed, adv, mask, cfg)
    torch.testing.assert_close(loss_a, loss_b)
    loss_b.backward()
    assert torch.all(changed.grad[~correct] == 0)
    assert torch.any(changed.grad[correct] != 0)


def test_raft_pp_global_batch_info_matches_minimal_rl_normalisation():
    """In the actor: sum over kept tokens / all response tokens = vanilla with the full mask."""
    old, log_prob, adv, mask, correct = ppo_batch(0)
    info = {"dp_size": 1, "batch_num_tokens": int(mask.sum()), "global_batch_size": 6, "loss_scale_factor": None}
    loss, _ = call("raft_pp", old, log_prob, adv, mask, actor_config(global_batch_info=info))
    full, _ = compute_policy_loss_vanilla(old, log_prob, adv, mask, "token-mean", actor_config(global_batch_info=info))
    torch.testing.assert_close(loss, full)
    keep = mask & correct[:, None]
    local, _ = call("raft_pp", old, log_prob, adv, mask, actor_config())
    # local token-mean over kept tokens = global value scaled by all tokens / kept tokens
    torch.testing.assert_close(local, loss * mask.sum() / keep.sum())


def ratio_case(ratio):
    mask = torch.ones(1, 1, dtype=torch.bool)
    old = torch.tensor([[LOG_HALF]])
    log_prob = (old + math.log(ratio)).requires_grad_(True)
    return old, log_prob, torch.ones(1, 1), mask


@pytest.mark.parametrize(
    ("ratio", "clip_high", "clipped"),
    [(1.25, 0.28, False), (1.3, 0.28, True), (1.25, 0.2, True), (0.85, 0.28, False)],
)
def test_raft_pp_clip_higher(ratio, clip_high, clipped):
    old, log_prob, adv, mask = ratio_case(ratio)
    loss, metrics = call("raft_pp", old, log_prob, adv, mask, actor_config(clip_low=0.2, clip_high=clip_high))
    loss.backward()
    grad = log_prob.grad.item()
    if clipped:
        assert metrics["actor/pg_clipfrac"] == 1.0
        assert grad == 0.0
        assert loss.item() == pytest.approx(-(1 + clip_high))
    else:
        assert metrics["actor/pg_clipfrac"] == 0.0
        assert grad == pytest.approx(-ratio)  # d(-s)/d log pi = -s
        assert loss.item() == pytest.approx(-ratio)


def test_raft_pp_low_side_not_clipped_for_positive_advantage():
    # s = 0.7 < 1 - eps_low: min(s, clip(s)) = s, so the gradient still pushes s up
    old, log_prob, adv, mask = ratio_case(0.7)
    loss, metrics = call("raft_pp", old, log_prob, adv, mask, actor_config())
    loss.backward()
    assert metrics["actor/pg_clipfrac"] == 0.0
    assert log_prob.grad.item() == pytest.approx(-0.7)


def test_raft_pp_requires_config():
    old, log_prob, adv, mask = ratio_case(1.0)
    with pytest.raises(ValueError, match="actor config"):
        call("raft_pp", old, log_prob, adv, mask, None)
