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
  (:func:`reuse_initial`);
* the iteration schedule (:func:`step_role`, :func:`epoch_lambdas`, :func:`reset_epochs`,
  :func:`mini_batches`, :func:`schedule`): an iteration is a collection phase (one or more
  rollout steps by the iteration-start policy, or the stored initial pairs) and then a
  training phase on the last of its steps: L epochs over all of the iteration's pairs in
  mini-batches (one optimizer step each), lambda_k in epoch k, the reference fixed for the
  iteration, the reset after the iteration's epochs (or every ``every`` epochs).

The settings are :class:`recipe.config.LorrConfig`. Parameters are ``(name, tensor)`` pairs
of one rank's shard (FSDP2 local tensors), any dtype.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from recipe.config import is_int as _is_int
from recipe.config import is_real as _is_real

__all__ = ["module_matches", "interpolate_", "reset_named_parameters_", "snapshot", "sft_weight", "reset_due",
           "reuse_initial", "step_role", "epoch_lambdas", "reset_epochs", "mini_batches", "StepPlan", "schedule"]


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


# ----------------------------------------------------------------------------- iteration schedule


def step_role(position: int, rollout_steps: int, reuse: bool) -> tuple[bool, bool]:
    """What a step does inside its iteration: ``(collect, train)``.

    An iteration that draws fresh rollouts spans ``rollout_steps`` steps, all generating with
    the iteration-start policy (no update in between); the last of them trains. An iteration
    that reuses the initial pairs is one step that generates nothing and trains.

    Args:
        position: 0-based index of the step inside its iteration.
        rollout_steps: >= 1, steps that generate an iteration's pairs.
        reuse: the iteration trains on the initial pairs.

    Returns:
        ``(collect, train)``: the step generates rollouts; the step runs the L epochs.

    Raises:
        ValueError: position outside the iteration or rollout_steps < 1.
    """
    if not _is_int(rollout_steps) or rollout_steps < 1:
        raise ValueError(f"preference.iteration.rollout_steps must be an integer >= 1, got {rollout_steps!r}")
    last = 0 if reuse else rollout_steps - 1
    if not _is_int(position) or not 0 <= position <= last:
        raise ValueError(f"step position {position!r} lies outside an iteration of {last + 1} step(s)")
    return (not reuse, position == last)


def epoch_lambdas(epochs: int, growth: float, cap: float, enable: bool = True) -> tuple[float, ...]:
    """lambda_k of epochs k = 0 .. epochs - 1 (:func:`sft_weight`; all 0 with the SFT term off).

    Restarts at 0 in every iteration: k counts replays of the iteration's data (PAPERS.md §3)."""
    if not _is_int(epochs) or epochs < 1:
        raise ValueError(f"lorr.replays (epochs per iteration) must be an integer >= 1, got {epochs!r}")
    return tuple(sft_weight(k, growth, cap) if enable else 0.0 for k in range(epochs))


def reset_epochs(epochs: int, iteration: int, epochs_before: int, every: int, unit: str,
                 enable: bool = True) -> tuple[int, ...]:
    """The epochs of one iteration (0-based, inside it) after which a reset happens.

    ``unit="iterations"``: after the last epoch of every ``every``-th iteration (1-based
    ``iteration``); ``unit="epochs"`` (alias ``"replays"``): after every ``every``-th epoch
    counted over the run (``epochs_before`` epochs were trained in earlier iterations), which
    can fall between the epochs of an iteration.

    Raises:
        ValueError: unknown unit (names ``lorr.reset.unit``).
    """
    if not enable or every <= 0:
        return ()
    if unit == "iterations":
        return (epochs - 1,) if reset_due(iteration, every) else ()
    if unit in ("epochs", "replays"):
        return tuple(k for k in range(epochs) if reset_due(epochs_before + k + 1, every))
    raise ValueError(f"lorr.reset.unit must be one of ('iterations', 'epochs', 'replays'), got {unit!r}")


def mini_batches(n_pairs: int, mini_batch_pairs: int | None, multiple: int = 1) -> list[int]:
    """Pairs per optimizer step of one epoch over ``n_pairs`` pairs.

    Args:
        n_pairs: >= 0 pairs of the iteration.
        mini_batch_pairs: pairs per mini-batch; None (or >= n_pairs) = one mini-batch.
        multiple: the size of a full mini-batch is rounded down to a multiple of this (whole
            micro-batches on every data-parallel rank), at least ``multiple``.

    Returns:
        Sizes in order, summing to ``n_pairs``; only the last may be smaller
        (``[]`` for no pair). E.g. ``mini_batches(10, 4) == [4, 4, 2]``.
    """
    if n_pairs <= 0:
        return []
    if mini_batch_pairs is None or mini_batch_pairs >= n_pairs:
        return [n_pairs]
    size = max(multiple, mini_batch_pairs // multiple * multiple)
    if size >= n_pairs:
        return [n_pairs]
    full, rest = divmod(n_pairs, size)
    return [size] * full + ([rest] if rest else [])


@dataclass(frozen=True)
class StepPlan:
    """One training step of :func:`schedule`.

    Attributes:
        step: 1-based training step. iteration: 1-based iteration it belongs to.
        collect: the step generates rollouts (False on a reuse iteration's step).
        train: the step runs the iteration's epochs (the last step of the iteration).
        reuse: the iteration trains on the initial pairs.
        lambdas: lambda_k per epoch (empty unless ``train``).
        resets_after: epochs (0-based) after which a reset happens (empty unless ``train``).
        refresh_reference: the reference is set to the policy before this step's reference
            log-probs (the training step of every iteration; the policy has not moved since the
            iteration started, so this is the iteration-start policy).
    """

    step: int
    iteration: int
    collect: bool
    train: bool
    reuse: bool
    lambdas: tuple[float, ...] = ()
    resets_after: tuple[int, ...] = ()
    refresh_reference: bool = False


def schedule(steps: int, rollout_steps: int, epochs: int, reuse: Sequence[bool] = (), *, growth: float = 0.25,
             cap: float = 0.5, sft: bool = True, reset: bool = True, every: int = 1, unit: str = "iterations",
             reference: bool = True) -> list[StepPlan]:
    """The plan of ``steps`` training steps (pure; the stage follows it step by step).

    Args:
        steps: training steps to plan.
        rollout_steps: steps generating a fresh iteration's pairs.
        epochs: L, epochs over an iteration's pairs (1 for plain iterative DPO).
        reuse: per iteration (1-based index i -> ``reuse[i - 1]``), whether it trains on the
            initial pairs (missing entries: False; iteration 1 never reuses).
        growth, cap, sft: lambda_k = min(cap, growth k) when ``sft``.
        reset, every, unit: the reset schedule (:func:`reset_epochs`).
        reference: the loss has a reference refreshed at iterations' starts.

    Returns:
        One :class:`StepPlan` per step.
    """
    out: list[StepPlan] = []
    iteration, position, epochs_done = 1, 0, 0
    for step in range(1, steps + 1):
        re_use = iteration > 1 and iteration - 1 < len(reuse) and bool(reuse[iteration - 1])
        collect, train = step_role(position, rollout_steps, re_use)
        if train:
            out.append(StepPlan(step, iteration, collect, True, re_use, epoch_lambdas(epochs, growth, cap, sft),
                                reset_epochs(epochs, iteration, epochs_done, every, unit, reset), reference))
            epochs_done += epochs
            iteration, position = iteration + 1, 0
        else:
            out.append(StepPlan(step, iteration, collect, False, re_use))
            position += 1
    return out
