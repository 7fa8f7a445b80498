"""RAFT and RAFT++ policy losses, registered with verl's ``register_policy_loss``.

Paper: Xiong et al., "A Minimalist Approach to LLM Reasoning: from Rejection Sampling to
Reinforce", arXiv 2504.11343 (v2), §2; docs/PAPERS.md §1 rows "RAFT" and "RAFT++".
Select with ``actor_rollout_ref.actor.policy_loss.loss_mode=raft`` (or ``raft_pp``) and
``algorithm.adv_estimator=raft`` (or ``raft_pp``), whose advantage is A_i = 1[r_i correct].

verl's actor (``verl.workers.utils.losses.ppo_loss``) calls a policy loss per micro-batch as
``fn(old_log_prob, log_prob, advantages, response_mask, loss_agg_mode, config,
rollout_is_weights)`` with ``[B, T]`` tensors (log-probs in nats, ``response_mask`` bool) and
``config`` the ``ActorConfig`` whose ``global_batch_info`` dict (dp_size, batch_num_tokens,
global_batch_size, loss_scale_factor) it fills in first. Both losses aggregate with
verl's ``agg_loss(..., **config.global_batch_info)``, as ``compute_policy_loss_vanilla`` does.

Normalisation (read this before comparing with the paper): verl computes
``batch_num_tokens`` from the *full* response mask of the mini-batch (all ranks) before the
loss runs. With ``token-mean`` the loss is therefore
sum_{kept tokens} l_t / (number of response tokens in the mini-batch), not a mean over the
kept tokens: the gradient is scaled by the kept share. This is also what the Minimal-RL code
does (PPO with A = 1[correct] and a token mean over all response tokens). Without global
batch info (``config=None`` or an empty ``global_batch_info``, e.g. in unit tests) the mean
is over the kept tokens of the micro-batch.
"""

from __future__ import annotations

from typing import Any

import torch

import verl.utils.torch_functional as verl_F
from verl.trainer.ppo.core_algos import agg_loss, compute_policy_loss_vanilla, register_policy_loss

__all__ = ["compute_policy_loss_raft", "compute_policy_loss_raft_pp", "positive_mask"]


def positive_mask(advantages: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Tokens RAFT trains on: keep = response_mask * 1[A > 0]; ``[B, T]`` bool."""
    return response_mask.bool() & (advantages > 0)


def _global_batch_info(config: Any) -> dict[str, Any]:
    """``config.global_batch_info`` (the actor fills it per mini-batch); {} when absent."""
    if config is None:
        return {}
    if hasattr(config, "get"):  # verl BaseConfig, DictConfig, dict
        info = config.get("global_batch_info", None)
    else:
        info = getattr(config, "global_batch_info", None)
    return dict(info) if info else {}


def _kept_frac(keep: torch.Tensor, response_mask: torch.Tensor) -> float:
    """Share of the micro-batch's response tokens that are kept."""
    return verl_F.masked_mean(keep.float(), response_mask.bool()).detach().item()


def _zero_loss(log_prob: torch.Tensor) -> torch.Tensor:
    """A scalar 0 attached to ``log_prob``'s graph with an all-zero gradient (even where
    ``log_prob`` is -inf on padding)."""
    return torch.where(torch.zeros_like(log_prob, dtype=torch.bool), log_prob, 0.0).sum()


@register_policy_loss("raft")  # type: ignore[arg-type]
def compute_policy_loss_raft(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """RAFT: negative log-likelihood (SFT) on the positive-advantage responses.

    Equation (Minimalist paper §2, RAFT):
        keep_t = response_mask_t * 1[A_t > 0]            (A = 1[r correct] from ``raft``)
        l_t    = -log pi_theta(a_t | x, a_<t)            (no ratio, no clip)
        L      = agg_loss(l, keep, loss_agg_mode, **global_batch_info)
    With ``token-mean`` and no global batch info, L = mean over kept tokens of -log pi.
    ``rollout_is_weights`` (verl's rollout-correction weights), when given, multiply l_t.

    Args:
        old_log_prob: ``[B, T]`` float, log pi_old in nats; used only for the ``ppo_kl``
            metric.
        log_prob: ``[B, T]`` float, log pi_theta in nats, with grad.
        advantages: ``[B, T]`` float; tokens with A > 0 are trained on.
        response_mask: ``[B, T]`` bool/int, 1 = response token.
        loss_agg_mode: verl's ``actor.loss_agg_mode`` ("token-mean", "seq-mean-token-mean"...).
        config: the ``ActorConfig`` (only ``global_batch_info`` is read); None is allowed.
        rollout_is_weights: optional ``[B, T]`` float weights.

    Returns:
        ``(pg_loss, metrics)``: scalar loss; metrics ``actor/pg_clipfrac`` (0, nothing is
        clipped), ``actor/ppo_kl`` (mean of log pi_old - log pi_theta over kept tokens, as
        vanilla computes it over its mask), ``actor/pg_clipfrac_lower`` (0) and
        ``actor/raft_kept_frac`` (kept share of the response tokens). When no token is kept
        the loss is exactly 0 with a zero gradient.
    """
    keep = positive_mask(advantages, response_mask)  # [B, T] bool
    # l_t = -log pi_theta(a_t), only on kept tokens (where() keeps -inf padding out of the graph)
    loss_mat = torch.where(keep, -log_prob, 0.0)
    if rollout_is_weights is not None:
        loss_mat = loss_mat * rollout_is_weights
    if bool(keep.any()):
        batch_info = _global_batch_info(config)
        pg_loss = agg_loss(loss_mat=loss_mat, loss_mask=keep, loss_agg_mode=loss_agg_mode, **batch_info)
    else:  # agg_loss would divide 0 by 0 when it has no global token count
        pg_loss = _zero_loss(log_prob)

    # same KL estimate as compute_policy_loss_vanilla, over the tokens trained on
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ppo_kl = verl_F.masked_mean(-negative_approx_kl, keep)
    metrics = {
        "actor/pg_clipfrac": 0.0,
        "actor/ppo_kl": ppo_kl.detach().item(),
        "actor/pg_clipfrac_lower": 0.0,
        "actor/raft_kept_frac": _kept_frac(keep, response_mask),
    }
    return pg_loss, metrics


@register_policy_loss("raft_pp")  # type: ignore[arg-type]
def compute_policy_loss_raft_pp(
    old_log_prob: torch.Tensor,
    log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    loss_agg_mode: str = "token-mean",
    config: Any = None,
    rollout_is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """RAFT++: PPO clipped ratio restricted to the positive-advantage (correct) responses.

    Equation (Minimalist paper §2, RAFT++), s_t = pi_theta(a_t) / pi_old(a_t):
        L = - agg_{t: keep_t} min(s_t, clip(s_t, 1 - eps_low, 1 + eps_high)) * 1[r_i = 1]

    Implementation: verl's ``compute_policy_loss_vanilla`` with ``response_mask = keep``
    (keep = response_mask * 1[A > 0]). Why that is the equation above: vanilla's per-token
    loss is max(-A s_t, -A clip(s_t, 1 - eps_low, 1 + eps_high)); with A_t = 1 > 0 this is
    -min(s_t, clip(s_t, ...)), and vanilla's dual-clip branch (clip_ratio_c) only acts where
    A < 0, which never happens on kept tokens. The mask removes the wrong responses
    (1[r_i = 1] = 0) from the loss, so pi_theta on them gets no gradient, and ``agg_loss`` over
    ``keep`` makes "token-mean" the mean over the kept tokens (when no global batch info is
    set; see the module docstring for verl's global normalisation). eps_low / eps_high are
    the actor's ``clip_ratio_low`` / ``clip_ratio_high`` (clip-higher: 0.2 / 0.28). Any
    positive A is used as is (so A = 1 from the ``raft`` estimator gives the paper's loss).

    Args:
        old_log_prob: ``[B, T]`` float, log pi_old in nats.
        log_prob: ``[B, T]`` float, log pi_theta in nats, with grad.
        advantages: ``[B, T]`` float; tokens with A > 0 are trained on.
        response_mask: ``[B, T]`` bool/int, 1 = response token.
        loss_agg_mode: verl's ``actor.loss_agg_mode``.
        config: the ``ActorConfig`` (required, as for vanilla): ``clip_ratio``,
            ``clip_ratio_low``, ``clip_ratio_high``, ``clip_ratio_c``, ``global_batch_info``.
        rollout_is_weights: optional ``[B, T]`` float weights, passed to vanilla.

    Returns:
        ``(pg_loss, metrics)``: vanilla's metrics (``actor/pg_clipfrac``, ``actor/ppo_kl``,
        ``actor/pg_clipfrac_lower``, over the kept tokens) plus ``actor/raft_kept_frac``.
        When no token is kept the loss is exactly 0 with a zero gradient.

    Raises:
        ValueError: ``config`` is None (the clip ranges come from the actor config).
    """
    if config is None:
        raise ValueError("policy loss raft_pp needs the actor config (clip_ratio_low/high); got config=None")
    keep = positive_mask(advantages, response_mask)  # [B, T] bool
    kept_frac = _kept_frac(keep, response_mask)
    if not bool(keep.any()):  # agg_loss would divide 0 by 0 when it has no global token count
        metrics = {"actor/pg_clipfrac": 0.0, "actor/ppo_kl": 0.0, "actor/pg_clipfrac_lower": 0.0}
        metrics["actor/raft_kept_frac"] = kept_frac
        return _zero_loss(log_prob), metrics
    pg_loss, metrics = compute_policy_loss_vanilla(
        old_log_prob=old_log_prob,
        log_prob=log_prob,
        advantages=advantages,
        response_mask=keep,
        loss_agg_mode=loss_agg_mode,
        config=config,
        rollout_is_weights=rollout_is_weights,
    )
    metrics = dict(metrics)
    metrics["actor/raft_kept_frac"] = kept_frac
    return pg_loss, metrics
