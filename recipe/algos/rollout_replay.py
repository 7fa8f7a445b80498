"""Rollout replay (DOTS + RR, arXiv 2506.05316, docs/PAPERS.md §2); pure, no Ray.

Each step trains on ``n_fresh = round(delta * B)`` freshly generated prompt groups plus
``B - n_fresh`` groups replayed uniformly from a FIFO buffer of the last C stored groups. Only
groups with mean correctness strictly in (0, 1) are stored (the others carry no GRPO signal),
together with their responses, advantages and behaviour-policy log-probs mu (the payload).
Public code (ASTRAL-Group/data-efficient-llm-rl, ``ray_trainer_teacher_replay.py``): keeps the
latest group of a question, samples uniformly, never removes a replayed group (FIFO eviction
only), keeps the first selection round (mu = 2 steps) all fresh, and sizes the buffer at
``buffer_size`` = 512 groups with 256 fresh groups per step (``select_buffer`` keeps the newest
512 - 256 before appending the step's 256): C = 2 x the fresh groups, so a replayed group is
1 or 2 steps old. ``replay.capacity_ratio`` (default 2.0) keeps that ratio at any batch size.

Staleness is measured by the age of the replayed groups (current step - step that generated
them; ``replay/mean_age``, ``replay/max_age``) and by the spread of the behaviour weights
w = pi_old / mu (:func:`behaviour_weight_stats`). The mean weight is no staleness signal: for
tokens sampled from mu, E_mu[pi_old / mu] = sum_y mu(y) pi_old(y) / mu(y) = 1 at every position,
however far pi_old has moved from mu, so its average over many tokens is ~1 by construction
(only truncation pulls it below 1). What grows with staleness is the variance: std, the range
and the effective sample size ESS = (sum w)^2 / (N sum w^2) (1 when all weights are equal,
-> 1/N when one token dominates).

Replayed responses come from an older policy mu, so the PPO-clip loss needs a correction:

* ``plain`` (paper): PPO-clip with ratio pi_theta / mu, i.e. verl's ``vanilla`` loss with
  ``old_log_prob`` := log mu on replayed rows (:func:`plain_old_log_prob`);
* ``decoupled`` (public code): w * PPO-clip(pi_theta / pi_old), w = pi_old / mu, i.e. verl's
  ``vanilla`` loss with ``rollout_is_weights`` := w (:func:`behaviour_weights`);
* ``none``: replayed rows are treated as fresh (ratio pi_theta / pi_old, no weight).

Log-probs are in nats, token-level tensors are ``[B, T]`` (B = prompts x n), masks 1 = keep.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np
import torch

from recipe.config import ReplayConfig, is_int as _is_int, is_real as _is_real, replay_fresh_count

__all__ = [
    "ReplayConfig", "ReplayGroup", "RolloutReplayBuffer", "fresh_count", "behaviour_weights", "behaviour_weight_stats",
    "plain_old_log_prob", "plain_clip_loss", "decoupled_clip_loss",
]

#: Log-ratio clamp before exp, as verl's ``rollout_corr_helper.SAFETY_BOUND`` (exp(20) ~ 4.9e8).
LOG_RATIO_BOUND = 20.0
#: Config keys whose change makes a saved buffer invalid (checked by ``load_state_dict``).
_STATE_KEYS = ("store_only_mixed", "dedup_by_prompt", "metric", "seed")
_TOL = 1e-6  # a mean correctness within 1e-6 of 0 or 1 counts as all wrong / all correct


def fresh_count(fresh_fraction: float, batch_groups: int) -> int:
    """Fresh groups of a B-group step once replay is running: max(1, floor(delta * B + 0.5))
    (half rounds up), at most B."""
    return replay_fresh_count(fresh_fraction, batch_groups)


@dataclass
class ReplayGroup:
    """One prompt's group of n responses, as stored in the buffer.

    Attributes:
        prompt_key: the prompt's identity for deduplication (e.g. its data index).
        uid: verl's group id at generation time.
        step: training step at which the group was generated (and added).
        mean_reward: mean correctness of the n responses, in [0, 1].
        payload: opaque (the trainer's per-response tensors); never compared or inspected.
    """

    prompt_key: str
    uid: str
    step: int
    mean_reward: float
    payload: Any = field(default=None, compare=False, repr=False)


class RolloutReplayBuffer:
    """FIFO buffer of whole groups with uniform, seeded sampling (DOTS + RR, PAPERS.md §2).

    Groups are kept in insertion order as ``(insertion_id, group)`` pairs; the id is unique, so
    no operation ever compares payloads. Sampling leaves groups in place; only capacity evicts.

    Args:
        config: the ``replay`` node.
        batch_groups: B, groups per step (``data.train_batch_size``); sizes the buffer with
            ``replay.capacity_ratio`` (C = ceil(ratio x round(delta x B))).

    Attributes:
        capacity: C, the resolved capacity in groups.

    Raises:
        ValueError: ``capacity_ratio`` set and ``batch_groups`` missing.
    """

    def __init__(self, config: ReplayConfig | Mapping[str, Any] | None = None, batch_groups: int | None = None) -> None:
        self.config = ReplayConfig.from_config(config)
        self.capacity = self.config.buffer_capacity(batch_groups)
        self._items: list[tuple[int, ReplayGroup]] = []
        self._counter = 0
        self._rng = np.random.Generator(np.random.PCG64(self.config.seed))

    def __len__(self) -> int:
        return len(self._items)

    @property
    def groups(self) -> list[ReplayGroup]:
        """The stored groups, oldest first (a copy of the list)."""
        return [g for _, g in self._items]

    def is_mixed(self, mean_reward: float) -> bool:
        """True when 0 < mean_reward < 1 (within 1e-6): the group has a GRPO learning signal."""
        return _TOL < mean_reward < 1.0 - _TOL

    def add(self, groups: Iterable[ReplayGroup], step: int) -> dict[str, int]:
        """Store groups at the back of the FIFO, then evict the oldest beyond capacity.

        Args:
            groups: the step's groups; stored as copies whose ``step`` is ``step`` (payload shared).
            step: current training step.

        Returns:
            Counts ``stored``, ``skipped_not_mixed``, ``replaced_duplicates`` (older group of the
            same prompt removed) and ``evicted`` (capacity).

        Raises:
            ValueError: a group is not a ReplayGroup or its mean_reward lies outside [0, 1].
        """
        counts = {"stored": 0, "skipped_not_mixed": 0, "replaced_duplicates": 0, "evicted": 0}
        for g in groups:
            if not isinstance(g, ReplayGroup):
                raise ValueError(f"replay buffer stores ReplayGroup objects, got {type(g).__name__}")
            if not _is_real(g.mean_reward) or not 0.0 <= g.mean_reward <= 1.0:
                raise ValueError(f"group {g.uid!r}: mean_reward must lie in [0, 1] (replay.metric "
                                 f"{self.config.metric!r} is a correctness), got {g.mean_reward!r}")
            if self.config.store_only_mixed and not self.is_mixed(g.mean_reward):
                counts["skipped_not_mixed"] += 1
                continue
            if self.config.dedup_by_prompt:
                before = len(self._items)
                self._items = [(i, old) for i, old in self._items if old.prompt_key != g.prompt_key]
                counts["replaced_duplicates"] += before - len(self._items)
            self._items.append((self._counter, replace(g, step=int(step))))
            self._counter += 1
            counts["stored"] += 1
        overflow = max(0, len(self._items) - self.capacity)
        del self._items[:overflow]
        counts["evicted"] = overflow
        return counts

    def plan(self, batch_groups: int, step: int | None = None) -> tuple[int, int]:
        """Split a step's B groups into (n_fresh, n_replay).

        n_fresh = max(1, floor(delta * B + 0.5)) (half rounds up), n_replay = B - n_fresh; but
        (B, 0) when replay is disabled, during the first ``replay.warmup_steps`` steps
        (``step <= warmup_steps``; the public code's first round of mu steps is all fresh), or
        when the buffer holds fewer than n_replay groups.

        Args:
            batch_groups: B.
            step: the current (1-based) training step; None skips the warm-up rule.

        Raises:
            ValueError: batch_groups is not an integer >= 1.
        """
        if not _is_int(batch_groups) or batch_groups < 1:
            raise ValueError(f"batch_groups must be an integer >= 1, got {batch_groups!r}")
        n_fresh = fresh_count(self.config.fresh_fraction, batch_groups)
        n_replay = batch_groups - n_fresh
        warming_up = step is not None and step <= self.config.warmup_steps
        if not self.config.enable or warming_up or len(self) < n_replay:
            return int(batch_groups), 0
        return n_fresh, n_replay

    def sample(self, n: int, exclude_prompt_keys: Iterable[str] = ()) -> list[ReplayGroup]:
        """Draw n groups uniformly without replacement; they stay in the buffer.

        Args:
            n: how many groups.
            exclude_prompt_keys: prompts not to draw (e.g. those in this step's fresh part).

        Returns:
            n groups in draw order.

        Raises:
            ValueError: n < 0 or fewer than n eligible groups.
        """
        if not _is_int(n) or n < 0:
            raise ValueError(f"n must be an integer >= 0, got {n!r}")
        excluded = set(exclude_prompt_keys)
        eligible = [g for _, g in self._items if g.prompt_key not in excluded]
        if len(eligible) < n:
            raise ValueError(f"asked for {n} replay groups but only {len(eligible)} of {len(self)} are eligible")
        if n == 0:
            return []
        return [eligible[i] for i in self._rng.choice(len(eligible), size=n, replace=False).tolist()]

    def ages(self, step: int, groups: Sequence[ReplayGroup] | None = None) -> list[int]:
        """Age in steps, ``step - group.step`` (current step - step that generated the group),
        of each of ``groups`` (default: the whole buffer, oldest first)."""
        groups = self.groups if groups is None else list(groups)
        return [int(step) - int(g.step) for g in groups]

    def mean_age(self, step: int, groups: Sequence[ReplayGroup] | None = None) -> float:
        """Mean of :meth:`ages` over ``groups`` (default: the whole buffer); 0 if empty."""
        ages = self.ages(step, groups)
        return float(np.mean(ages)) if ages else 0.0

    def metrics(self, step: int, n_fresh: int, replayed: Sequence[ReplayGroup]) -> dict[str, float]:
        """``replay/size`` (groups stored), ``replay/capacity`` (C), ``replay/fresh_groups``,
        ``replay/replayed_groups``, and, when a group was replayed, ``replay/mean_age`` /
        ``replay/max_age`` (steps since the replayed groups were generated). A step that replays
        nothing has no age: the keys are left out, so means over a run's logged values cover
        the replaying steps only."""
        out = {
            "replay/size": float(len(self)),
            "replay/capacity": float(self.capacity),
            "replay/fresh_groups": float(n_fresh),
            "replay/replayed_groups": float(len(replayed)),
        }
        ages = self.ages(step, replayed)
        if ages:
            out["replay/mean_age"] = float(np.mean(ages))
            out["replay/max_age"] = float(max(ages))
        return out

    def state_dict(self) -> dict[str, Any]:
        """Plain dict (str/int/float/payload only) for ``torch.save``."""
        return {
            "config": asdict(self.config),
            "capacity": self.capacity,
            "groups": [{"id": i, **{f.name: getattr(g, f.name) for f in fields(ReplayGroup)}} for i, g in self._items],
            "counter": self._counter,
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        """Restore groups, insertion counter and generator state.

        Raises:
            ValueError: a key is missing, the checkpoint's capacity C differs from this buffer's
                (resolved) C, or ``replay.<key>`` of the checkpoint differs from this buffer's
                config for a key in ``store_only_mixed, dedup_by_prompt, metric, seed``.
        """
        missing = [k for k in ("config", "groups", "counter", "rng") if k not in sd]
        if missing:
            raise ValueError(f"replay state_dict lacks {missing}")
        saved_capacity = sd.get("capacity", sd["config"].get("capacity"))
        if saved_capacity != self.capacity:
            raise ValueError(f"replay capacity: the checkpoint was saved with C = {saved_capacity} groups, the config "
                             f"gives C = {self.capacity} (replay.capacity / replay.capacity_ratio)")
        for key in _STATE_KEYS:
            saved, now = sd["config"].get(key), getattr(self.config, key)
            if saved != now:
                raise ValueError(f"replay.{key}: the checkpoint was saved with {saved!r}, the config has {now!r}")
        if len(sd["groups"]) > self.capacity:
            raise ValueError(f"replay state_dict holds {len(sd['groups'])} groups > replay.capacity")
        self._items = [(int(d["id"]), ReplayGroup(**{k: v for k, v in d.items() if k != "id"})) for d in sd["groups"]]
        self._counter = int(sd["counter"])
        self._rng.bit_generator.state = sd["rng"]


# ----------------------------------------------------------------------------- off-policy correction


def _check(mask: torch.Tensor, *tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.shape != mask.shape:
            raise ValueError(f"shape mismatch: {tuple(t.shape)} vs response_mask {tuple(mask.shape)}")


def _token_mean(loss: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.bool()
    return torch.where(mask, loss, torch.zeros_like(loss)).sum() / mask.sum().clamp(min=1)


def _ppo_clip(ratio: torch.Tensor, advantages: torch.Tensor, clip: float, clip_ratio_c: float | None):
    """max(-A ratio, -A clip(ratio, 1-eps, 1+eps)) per token, optionally dual-clipped for A < 0."""
    loss = torch.maximum(-advantages * ratio, -advantages * ratio.clamp(1.0 - clip, 1.0 + clip))
    if clip_ratio_c is not None:
        loss = torch.where(advantages < 0, torch.minimum(loss, -advantages * clip_ratio_c), loss)
    return loss


def behaviour_weights(old_log_prob: torch.Tensor, behaviour_log_prob: torch.Tensor, response_mask: torch.Tensor,
                      truncation: float | None = None) -> torch.Tensor:
    """Token-level behaviour weight w = pi_old / mu of the decoupled loss (public DOTS+RR code).

    w = exp(clamp(log pi_old - log mu, -20, 20)), capped at ``truncation`` c when given, 0 on
    masked tokens, detached (an importance weight changes the measure, not the objective). Equals
    verl's ``compute_rollout_correction_weights(old - mu, mask, "token", c)`` (c = inf if None).

    Args:
        old_log_prob: ``[B, T]`` log pi_old (the current policy before this step's update).
        behaviour_log_prob: ``[B, T]`` log mu (policy that generated the tokens); = old on fresh rows.
        response_mask: ``[B, T]`` bool/0-1, 1 = response token.
        truncation: c >= 1 or None.

    Returns:
        ``[B, T]`` float weights, dtype of ``old_log_prob``.

    Raises:
        ValueError: shapes differ or c < 1.
    """
    _check(response_mask, old_log_prob, behaviour_log_prob)
    if truncation is not None and truncation < 1.0:
        raise ValueError(f"truncation must be >= 1, got {truncation}")
    w = torch.exp((old_log_prob - behaviour_log_prob).clamp(-LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    if truncation is not None:
        w = w.clamp(max=truncation)
    return torch.where(response_mask.bool(), w, torch.zeros_like(w)).detach()


def behaviour_weight_stats(old_log_prob: torch.Tensor, behaviour_log_prob: torch.Tensor,
                           response_mask: torch.Tensor, truncation: float | None = None) -> dict[str, float]:
    """Spread of the behaviour weights w = min(pi_old / mu, c) over the masked (replayed) tokens.

    The weights are those :func:`behaviour_weights` gives (what ``decoupled`` multiplies the loss
    by, and the cap ``plain`` puts on pi_old / anchor). Their mean is ~1 by construction
    (E_mu[pi_old / mu] = 1 for tokens sampled from mu; module docstring), so staleness shows in
    the spread: ``is_weight_std`` (population std, ddof 0), ``is_weight_min`` / ``is_weight_max``,
    ``is_weight_ess`` = (sum w)^2 / (N sum w^2) in (0, 1] (a fraction of the N tokens; 1 when
    all weights are equal), and ``truncated_frac``: share of the N tokens whose raw weight
    pi_old / mu exceeded c (0 without truncation).

    Args:
        old_log_prob: ``[B, T]`` log pi_old (nats). behaviour_log_prob: ``[B, T]`` log mu (nats).
        response_mask: ``[B, T]`` bool / 0-1, 1 = a token to count (e.g. replayed response tokens).
        truncation: c >= 1 or None.

    Returns:
        ``{"is_weight_mean", "is_weight_std", "is_weight_min", "is_weight_max", "is_weight_ess",
        "truncated_frac"}`` as floats; with no token counted: mean / min / max / ess 1, std and
        truncated_frac 0 (on-policy values).

    Raises:
        ValueError: shapes differ or c < 1.
    """
    # in float64: verl's CPU actor returns bf16 log-probs, whose exp in bf16 would round w again
    old_log_prob, behaviour_log_prob = old_log_prob.to(torch.float64), behaviour_log_prob.to(torch.float64)
    w = behaviour_weights(old_log_prob, behaviour_log_prob, response_mask, truncation)
    mask = response_mask.bool()
    n = int(mask.sum())
    if n == 0:
        return {"is_weight_mean": 1.0, "is_weight_std": 0.0, "is_weight_min": 1.0, "is_weight_max": 1.0,
                "is_weight_ess": 1.0, "truncated_frac": 0.0}
    v = w[mask]
    raw = (old_log_prob - behaviour_log_prob).to(torch.float64)[mask]
    truncated = 0.0 if truncation is None else float((raw > math.log(truncation)).sum()) / n
    total, sq = float(v.sum()), float((v * v).sum())
    return {
        "is_weight_mean": total / n,
        "is_weight_std": float(v.std(unbiased=False)),
        "is_weight_min": float(v.min()),
        "is_weight_max": float(v.max()),
        "is_weight_ess": total * total / (n * sq) if sq > 0 else 0.0,
        "truncated_frac": truncated,
    }


def plain_old_log_prob(old_log_prob: torch.Tensor, behaviour_log_prob: torch.Tensor, replayed: torch.Tensor,
                       truncation: float | None = None) -> torch.Tensor:
    """Anchor for the paper's plain form: PPO-clip with ratio pi_theta / mu (DOTS+RR, PAPERS.md §2).

    Fed to verl's ``vanilla`` loss as ``old_log_prob``, its ratio exp(log pi - anchor) becomes
    pi_theta / mu on replayed rows. With truncation c the anchor is max(log mu, log pi_old - log c),
    so that pi_old / anchor = min(pi_old / mu, c). Fresh rows keep log pi_old.

    Args:
        old_log_prob: ``[B, T]`` log pi_old.
        behaviour_log_prob: ``[B, T]`` log mu.
        replayed: ``[B]`` bool, True = the row comes from the replay buffer.
        truncation: c >= 1 or None.

    Returns:
        ``[B, T]`` anchor log-probs (nats), detached.

    Raises:
        ValueError: shapes differ or c < 1.
    """
    _check(old_log_prob, behaviour_log_prob)
    if replayed.shape != old_log_prob.shape[:1]:
        raise ValueError(f"replayed must have shape [B] = {tuple(old_log_prob.shape[:1])}, got {tuple(replayed.shape)}")
    if truncation is not None and truncation < 1.0:
        raise ValueError(f"truncation must be >= 1, got {truncation}")
    anchor = behaviour_log_prob
    if truncation is not None:
        anchor = torch.maximum(anchor, old_log_prob - math.log(truncation))
    return torch.where(replayed.bool().unsqueeze(-1), anchor, old_log_prob).detach()


def plain_clip_loss(log_prob: torch.Tensor, behaviour_log_prob: torch.Tensor, advantages: torch.Tensor,
                    response_mask: torch.Tensor, clip: float = 0.2, clip_ratio_c: float | None = None) -> torch.Tensor:
    """Reference plain loss (paper): token-mean of max(-A rho, -A clip(rho, 1-eps, 1+eps)), rho = pi / mu.

    That is -A min(rho, clip(rho)) for A >= 0 and -A max(rho, clip(rho)) for A < 0 (PPO-clip).
    ``clip_ratio_c`` adds verl's dual clip (loss <= -A c for A < 0; verl's default c = 3).

    Args:
        log_prob: ``[B, T]`` log pi_theta; behaviour_log_prob: ``[B, T]`` log mu;
        advantages: ``[B, T]``; response_mask: ``[B, T]`` 1 = keep.

    Returns:
        Scalar loss.
    """
    _check(response_mask, log_prob, behaviour_log_prob, advantages)
    rho = torch.exp(log_prob - behaviour_log_prob)
    return _token_mean(_ppo_clip(rho, advantages, clip, clip_ratio_c), response_mask)


def decoupled_clip_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, behaviour_log_prob: torch.Tensor,
                        advantages: torch.Tensor, response_mask: torch.Tensor, clip: float = 0.2,
                        truncation: float | None = None, clip_ratio_c: float | None = None) -> torch.Tensor:
    """Reference decoupled loss: token-mean of w * max(-A r, -A clip(r, 1-eps, 1+eps)).

    r = pi_theta / pi_old, w = :func:`behaviour_weights` (pi_old / mu, capped at c). The public
    code writes max(-A rho, -A clamp(rho, w(1-eps), w(1+eps))) with rho = pi / mu = r w; since
    w > 0, clamp(r w, w(1-eps), w(1+eps)) = w clip(r) and the two are equal for every sign of A
    when c is None. With c, the weight becomes min(w, c) while the public code keeps w.

    Args:
        log_prob, old_log_prob, behaviour_log_prob, advantages, response_mask: ``[B, T]``.
        clip: eps. truncation: c >= 1 or None. clip_ratio_c: verl's dual clip (applied to r).

    Returns:
        Scalar loss.
    """
    _check(response_mask, log_prob, old_log_prob, behaviour_log_prob, advantages)
    w = behaviour_weights(old_log_prob, behaviour_log_prob, response_mask, truncation)
    r = torch.exp(log_prob - old_log_prob)
    return _token_mean(w * _ppo_clip(r, advantages, clip, clip_ratio_c), response_mask)
