"""LoRR's parts around a preference loss (Liu et al. 2025, "Sample-efficient LLM
Optimization with Reset Replay", arXiv 2508.06412, docs/PAPERS.md §3); pure torch / numpy.

* periodic shrink-and-perturb reset of selected modules towards the initial weights,
  theta <- alpha * theta + (1 - alpha) * theta_0 (:func:`interpolate_`,
  :func:`reset_named_parameters_`, :func:`snapshot`; paper: alpha = 0.5 on the MLP down
  projections), on a schedule (:func:`reset_due`);
* the hybrid objective's weight lambda_k = min(cap, growth * k), growing with the replay
  index k (:func:`sft_weight`; the loss itself is
  :func:`recipe.algos.preference.preference_microbatch_loss`);
* reuse of the first-collected pairs after a reset, chosen by a Bernoulli rollout ratio
  (:func:`reuse_initial`).

The settings are :class:`recipe.config.LorrConfig`. Parameters are ``(name, tensor)`` pairs
of one rank's shard (FSDP2 local tensors), any dtype.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from recipe.config import is_int as _is_int
from recipe.config import is_real as _is_real

__all__ = ["module_matches", "interpolate_", "reset_named_parameters_", "snapshot", "sft_weight", "reset_due",
           "reuse_initial"]


def module_matches(name: str, pattern: str = "down_proj") -> bool:
    """True when ``re.search(pattern, name)`` finds the pattern in the parameter name
    (e.g. ``model.layers.3.mlp.down_proj.weight``)."""
    return re.search(pattern, name) is not None


@torch.no_grad()
def interpolate_(param: torch.Tensor, theta0: torch.Tensor, alpha: float) -> torch.Tensor:
    """Shrink-and-perturb reset towards the initial weights, in place (LoRR, PAPERS.md §3).

    param <- alpha * param + (1 - alpha) * theta0, computed in float32 and written back in
    param's dtype; theta0 may live on another device / dtype. alpha = 1 leaves param
    bit-identical, alpha = 0 copies theta0.

    Args:
        param: a parameter tensor (any shape), modified in place (its storage; a view such as
            ``DTensor.to_local()`` writes through to the parameter).
        theta0: the initial value, same shape.
        alpha: in [0, 1], the weight kept on the current value (paper: 0.5).

    Returns:
        ``param``.

    Raises:
        ValueError: alpha outside [0, 1] or the shapes differ.
    """
    if not _is_real(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha!r}")
    if param.shape != theta0.shape:
        raise ValueError(f"param and theta0 differ in shape: {tuple(param.shape)} vs {tuple(theta0.shape)}")
    if alpha == 1.0:
        return param
    target = param.detach()  # same storage; also works for non-leaf views such as DTensor.to_local()
    init = theta0.to(device=param.device)
    if alpha == 0.0:
        target.copy_(init)
        return param
    target.copy_(target.float() * alpha + init.float() * (1.0 - alpha))
    return param


def reset_named_parameters_(named_params: Iterable[tuple[str, torch.Tensor]], theta0: Mapping[str, torch.Tensor],
                            alpha: float, pattern: str) -> list[str]:
    """Apply :func:`interpolate_` to every parameter whose name matches ``pattern``.

    Args:
        named_params: ``(name, tensor)`` pairs, e.g. ``model.named_parameters()`` (plain tensors;
            pass local shards for sharded parameters).
        theta0: initial values by name (e.g. from :func:`snapshot` with the same pattern).
        alpha: in [0, 1]. pattern: regular expression searched in each name.

    Returns:
        Names of the parameters reset, in iteration order.

    Raises:
        KeyError: a matching parameter is missing from ``theta0`` (named).
        ValueError: as :func:`interpolate_`.
    """
    changed = []
    for name, p in named_params:
        if not module_matches(name, pattern):
            continue
        if name not in theta0:
            raise KeyError(f"parameter {name!r} matches lorr.reset.pattern {pattern!r} but has no initial value")
        interpolate_(p, theta0[name], alpha)
        changed.append(name)
    return changed


def snapshot(named_params: Iterable[tuple[str, torch.Tensor]], pattern: str) -> dict[str, torch.Tensor]:
    """Detached CPU copies (same dtype) of the parameters whose name matches ``pattern``: theta_0."""
    return {n: p.detach().to("cpu", copy=True) for n, p in named_params if module_matches(n, pattern)}


def sft_weight(k: int, growth: float, cap: float) -> float:
    """LoRR's SFT weight lambda_k = min(cap, growth * k) for replay index k (0-based; k = 0 -> 0).

    Paper: lambda grows with the replay index and is capped at 0.5 (PAPERS.md §3).

    Raises:
        ValueError: k not an integer >= 0, growth or cap negative.
    """
    if not _is_int(k) or k < 0:
        raise ValueError(f"replay index k must be an integer >= 0, got {k!r}")
    if not _is_real(growth) or growth < 0 or not _is_real(cap) or cap < 0:
        raise ValueError(f"lorr.sft.growth and lorr.sft.cap must be numbers >= 0, got {growth!r}, {cap!r}")
    return float(min(cap, growth * k))


def reset_due(count: int, every: int) -> bool:
    """True when a reset falls on this count: every > 0, count > 0 and count % every == 0.

    ``count`` is the number of replays (or iterations, per ``lorr.reset.unit``) completed so far.
    """
    return every > 0 and count > 0 and count % every == 0


def reuse_initial(rng: np.random.Generator, rollout_ratio: float, resets: int, has_initial: bool) -> bool:
    """Whether an iteration trains on the initial pairs again instead of fresh rollouts.

    LoRR (PAPERS.md §3): once a reset has happened, each iteration draws fresh rollouts with
    probability ``rollout_ratio`` and otherwise reuses the initial data. No draw is made
    (the generator does not advance) before the first reset or without initial pairs.

    Args:
        rng: the stage's generator (its state is saved with checkpoints).
        rollout_ratio: probability of fresh rollouts, in [0, 1].
        resets: resets so far.
        has_initial: whether the initial pairs were kept.

    Returns:
        True to reuse the initial pairs.
    """
    if resets <= 0 or not has_initial:
        return False
    return bool(rng.random() >= rollout_ratio)
