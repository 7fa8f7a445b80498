"""Preference optimisation for iterative DPO and LoRR; pure torch / numpy, no Ray, no verl.

Iterative DPO (Minimalist paper, arXiv 2504.11343, docs/PAPERS.md §1 row "Iterative DPO"):
each iteration samples n responses per prompt, scores them, builds (chosen, rejected) pairs
inside every prompt group (:func:`build_pairs`; best vs worst, groups without a reward gap
skipped) and trains a preference loss against a reference policy (the iterate at the start
of the iteration, or the initial model).

Preference losses (sequence level, ``[P]`` = one entry per pair; log-probs in nats):

* ``dpo``  (Rafailov et al. 2023, eq. 7), with TRL's label smoothing (conservative DPO);
* ``ipo``  (Azar et al. 2023, eq. 17), on length-averaged log-probs as TRL computes it;
* ``simpo`` (Meng et al. 2024, eq. 6), reference free, length-averaged log-probs.

LoRR (Liu et al. 2025, "Sample-efficient LLM Optimization with Reset Replay",
arXiv 2508.06412, docs/PAPERS.md §3) adds, around any of these losses:

* high replay: every batch of pairs is trained on L times (``lorr.replays``, paper L = 3);
* periodic shrink-and-perturb reset of selected modules towards the initial weights,
  theta <- alpha * theta + (1 - alpha) * theta_0 (:func:`interpolate_`,
  :func:`reset_named_parameters_`; paper: alpha = 0.5 on the MLP down projections);
* reuse of the first-collected pairs after a reset, chosen by a Bernoulli rollout ratio;
* a hybrid objective L = L_pref + lambda_k * L_SFT, L_SFT = NLL of the chosen response,
  lambda_k = min(cap, growth * k) growing with the replay index k (:func:`sft_weight`).

:func:`preference_microbatch_loss` is the micro-batch loss the actor calls. Token-level
tensors are ``[B, T]`` (B = rows of the micro-batch), masks mean 1 = keep.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "sequence_logps", "PreferenceLossOutput", "PreferenceLossSpec", "PREFERENCE_LOSSES", "register_preference_loss",
    "get_preference_loss", "dpo_loss", "ipo_loss", "simpo_loss", "PAIR_MODES", "PairStats", "build_pairs",
    "module_matches", "interpolate_", "reset_named_parameters_", "snapshot", "sft_weight", "reset_due",
    "PreferenceConfig", "LorrConfig", "LorrResetConfig", "LorrReuseConfig", "LorrSftConfig",
    "preference_microbatch_loss",
]

PAIR_MODES = ("best_worst", "random", "all")
REFERENCES = ("iteration_start", "initial")
RESET_UNITS = ("replays", "iterations")


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) \
        and math.isfinite(v)


def _is_bool(v: Any) -> bool:
    return isinstance(v, (bool, np.bool_))


# ----------------------------------------------------------------------------- sequence log-probs


def sequence_logps(log_prob: torch.Tensor, response_mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sequence log-probability log pi(y|x) = sum_t mask_t * log pi(y_t | x, y_<t).

    Masked positions are removed with ``torch.where`` (not a product), so -inf log-probs on
    padding neither leak into the value nor give NaN gradients.

    Args:
        log_prob: ``[B, T]`` float, token log-probs in nats.
        response_mask: ``[B, T]`` bool or 0/1 float, 1 = response token.
        average: divide by the number of response tokens (clamped to >= 1): the length-averaged
            log-prob of SimPO / IPO.

    Returns:
        ``[B]`` float (dtype of ``log_prob``).

    Raises:
        ValueError: the shapes differ or are not 2-D.
    """
    if log_prob.dim() != 2 or response_mask.shape != log_prob.shape:
        raise ValueError(f"log_prob and response_mask must both be [B, T], got {tuple(log_prob.shape)} and "
                         f"{tuple(response_mask.shape)}")
    mask = response_mask.bool()
    total = torch.where(mask, log_prob, torch.zeros((), dtype=log_prob.dtype, device=log_prob.device)).sum(-1)
    if average:
        total = total / mask.sum(-1).clamp(min=1).to(total.dtype)
    return total


# ----------------------------------------------------------------------------- preference losses


class PreferenceLossOutput(NamedTuple):
    """Per-pair output of a preference loss.

    Attributes:
        losses: ``[P]`` float, per-pair loss (with grad).
        chosen_rewards: ``[P]`` float, implicit reward of the chosen response (detached).
        rejected_rewards: ``[P]`` float, implicit reward of the rejected response (detached).
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


@dataclass(frozen=True)
class PreferenceLossSpec:
    """A registered preference loss.

    Attributes:
        fn: ``fn(pi_c, pi_r, ref_c, ref_r, **hyper) -> PreferenceLossOutput``; hyper-parameters
            among ``beta``, ``label_smoothing``, ``gamma_beta_ratio`` (passed when in its signature).
        needs_reference: the loss uses reference log-probs (False: ref_c / ref_r may be None).
        length_normalized: its default input is length-averaged log-probs (not sums).
    """

    fn: Callable[..., PreferenceLossOutput]
    needs_reference: bool
    length_normalized: bool


PREFERENCE_LOSSES: dict[str, PreferenceLossSpec] = {}


def register_preference_loss(name: str, needs_reference: bool, length_normalized: bool) -> Callable:
    """Decorator registering a preference loss under ``name`` (the value of ``preference.loss``).

    Raises:
        ValueError: ``name`` is already registered to a different function.
    """

    def deco(fn: Callable[..., PreferenceLossOutput]) -> Callable[..., PreferenceLossOutput]:
        old = PREFERENCE_LOSSES.get(name)
        if old is not None and (old.fn.__module__, old.fn.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"preference loss {name!r} is already registered ({old.fn.__qualname__})")
        PREFERENCE_LOSSES[name] = PreferenceLossSpec(fn, bool(needs_reference), bool(length_normalized))
        return fn

    return deco


def get_preference_loss(name: str) -> PreferenceLossSpec:
    """The registered spec of ``name``.

    Raises:
        ValueError: unknown name; the message names ``preference.loss`` and the known names.
    """
    if name not in PREFERENCE_LOSSES:
        raise ValueError(f"preference.loss must be one of {sorted(PREFERENCE_LOSSES)}, got {name!r}")
    return PREFERENCE_LOSSES[name]


def _check_pairs(*tensors: torch.Tensor | None) -> None:
    shape = tensors[0].shape
    if len(shape) != 1:
        raise ValueError(f"preference loss inputs must be [P], got {tuple(shape)}")
    for t in tensors:
        if t is not None and t.shape != shape:
            raise ValueError(f"preference loss inputs must all be [P] = {tuple(shape)}, got {tuple(t.shape)}")


def _smoothed_sigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """-(1 - ls) log sigma(z) - ls log sigma(-z) (TRL's ``sigmoid`` loss with label smoothing)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing!r}")
    losses = -F.logsigmoid(logits) * (1.0 - label_smoothing)
    if label_smoothing > 0.0:
        losses = losses - F.logsigmoid(-logits) * label_smoothing
    return losses


@register_preference_loss("dpo", needs_reference=True, length_normalized=False)
def dpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0) -> PreferenceLossOutput:
    """DPO (Rafailov et al. 2023, eq. 7) with conservative label smoothing (as TRL).

    z = beta * ((pi_c - ref_c) - (pi_r - ref_r));
    loss = -(1 - ls) * log sigma(z) - ls * log sigma(-z);  reward = beta * (pi - ref).

    Args:
        pi_c, pi_r: ``[P]`` float, policy sequence log-probs (nats) of chosen / rejected.
        ref_c, ref_r: ``[P]`` float, reference sequence log-probs.
        beta: > 0, inverse temperature of the implicit reward.
        label_smoothing: ls in [0, 0.5), assumed probability that a label is flipped.

    Returns:
        :class:`PreferenceLossOutput` with ``[P]`` tensors.

    Raises:
        ValueError: shapes differ, beta <= 0 or ls outside [0, 0.5).
    """
    if ref_c is None or ref_r is None:
        raise ValueError("dpo needs reference log-probs (ref_c, ref_r)")
    _check_pairs(pi_c, pi_r, ref_c, ref_r)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    chosen = pi_c - ref_c
    rejected = pi_r - ref_r
    losses = _smoothed_sigmoid_loss(beta * (chosen - rejected), label_smoothing)
    return PreferenceLossOutput(losses, (beta * chosen).detach(), (beta * rejected).detach())


@register_preference_loss("ipo", needs_reference=True, length_normalized=True)
def ipo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
             beta: float = 0.1) -> PreferenceLossOutput:
    """IPO (Azar et al. 2023, eq. 17): loss = (h - 1 / (2 beta))^2, h = (pi_c - ref_c) - (pi_r - ref_r).

    beta plays the role of the paper's tau (regularisation strength). TRL feeds length-averaged
    log-probs (the registry's default for ``ipo``); reward = beta * (pi - ref).

    Args:
        pi_c, pi_r, ref_c, ref_r: ``[P]`` float log-probs (nats; sums or averages).
        beta: > 0.

    Returns:
        :class:`PreferenceLossOutput` with ``[P]`` tensors.

    Raises:
        ValueError: shapes differ or beta <= 0.
    """
    if ref_c is None or ref_r is None:
        raise ValueError("ipo needs reference log-probs (ref_c, ref_r)")
    _check_pairs(pi_c, pi_r, ref_c, ref_r)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    chosen = pi_c - ref_c
    rejected = pi_r - ref_r
    losses = (chosen - rejected - 1.0 / (2.0 * beta)) ** 2
    return PreferenceLossOutput(losses, (beta * chosen).detach(), (beta * rejected).detach())


@register_preference_loss("simpo", needs_reference=False, length_normalized=True)
def simpo_loss(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor | None = None,
               ref_r: torch.Tensor | None = None, beta: float = 2.0, gamma_beta_ratio: float = 0.5,
               label_smoothing: float = 0.0) -> PreferenceLossOutput:
    """SimPO (Meng et al. 2024, eq. 6), reference free.

    z = beta * (pi_c - pi_r) - gamma, gamma = gamma_beta_ratio * beta, on length-averaged
    log-probs; loss = -(1 - ls) log sigma(z) - ls log sigma(-z); reward = beta * pi.

    Args:
        pi_c, pi_r: ``[P]`` float, length-averaged policy log-probs (nats per token).
        ref_c, ref_r: ignored (accepted so every loss has the same call form).
        beta: > 0 (paper: 2.0 to 2.5 typical).
        gamma_beta_ratio: gamma / beta, the target reward margin in units of beta.
        label_smoothing: ls in [0, 0.5).

    Returns:
        :class:`PreferenceLossOutput` with ``[P]`` tensors.

    Raises:
        ValueError: shapes differ, beta <= 0 or ls outside [0, 0.5).
    """
    _check_pairs(pi_c, pi_r)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    gamma = gamma_beta_ratio * beta
    losses = _smoothed_sigmoid_loss(beta * (pi_c - pi_r) - gamma, label_smoothing)
    return PreferenceLossOutput(losses, (beta * pi_c).detach(), (beta * pi_r).detach())


# ----------------------------------------------------------------------------- pair construction


@dataclass
class PairStats:
    """Counts of one :func:`build_pairs` call.

    Attributes:
        groups: prompt groups seen (distinct uids).
        skipped_no_gap: groups whose max score equals their min score (incl. groups of one response).
        pairs: pairs built.
    """

    groups: int = 0
    skipped_no_gap: int = 0
    pairs: int = 0


def build_pairs(uids: Sequence[str], scores: Sequence[float], mode: str = "best_worst",
                rng: np.random.Generator | None = None) -> tuple[list[tuple[int, int]], PairStats]:
    """Preference pairs inside each prompt group (iterative DPO, PAPERS.md §1: best vs worst of n).

    Groups are the rows sharing a uid, taken in order of first appearance (rows need not be
    contiguous). A group whose max score equals its min score has no preference and is skipped.

    Modes:
        ``best_worst``: one pair per group, chosen = first row with the max score, rejected =
            first row with the min score (deterministic).
        ``random``: one pair per group, chosen uniformly among the rows with the max score,
            rejected uniformly among those with the min score (needs ``rng``).
        ``all``: every (i, j) of the group with score_i > score_j, ordered by (i, j); with 0/1
            rewards that is every correct x wrong pair.

    Args:
        uids: ``[B]`` group ids (B = prompts x n).
        scores: ``[B]`` finite floats, higher = better (e.g. correctness or reward).
        mode: one of :data:`PAIR_MODES`.
        rng: numpy generator, required for ``random``.

    Returns:
        ``(pairs, stats)``: ``pairs`` is a list of (chosen_index, rejected_index) into the flat
        batch, groups in first-appearance order.

    Raises:
        ValueError: unknown mode (names ``preference.pairs``), ``random`` without rng, lengths
            differ or a score is not finite (names the row).
    """
    if mode not in PAIR_MODES:
        raise ValueError(f"preference.pairs must be one of {PAIR_MODES}, got {mode!r}")
    if mode == "random" and rng is None:
        raise ValueError("preference.pairs='random' needs a numpy Generator (rng)")
    if len(uids) != len(scores):
        raise ValueError(f"uids and scores differ in length: {len(uids)} vs {len(scores)}")
    vals = [float(s) for s in scores]
    for i, s in enumerate(vals):
        if not math.isfinite(s):
            raise ValueError(f"score of row {i} (uid {uids[i]!r}) is not finite: {s!r}")
    groups: dict[Any, list[int]] = {}
    for i, u in enumerate(uids):
        groups.setdefault(u, []).append(i)

    pairs: list[tuple[int, int]] = []
    stats = PairStats(groups=len(groups))
    for rows in groups.values():
        g = [vals[i] for i in rows]
        hi, lo = max(g), min(g)
        if hi == lo:
            stats.skipped_no_gap += 1
            continue
        if mode == "all":
            pairs.extend((i, j) for i in rows for j in rows if vals[i] > vals[j])
            continue
        best = [i for i in rows if vals[i] == hi]
        worst = [i for i in rows if vals[i] == lo]
        if mode == "best_worst":
            pairs.append((best[0], worst[0]))
        else:
            pairs.append((best[int(rng.integers(len(best)))], worst[int(rng.integers(len(worst)))]))
    stats.pairs = len(pairs)
    return pairs, stats


# ----------------------------------------------------------------------------- LoRR: reset and schedule


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


# ----------------------------------------------------------------------------- configs


def _to_mapping(node: Any, prefix: str) -> Mapping[str, Any]:
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, Mapping):
        raise ValueError(f"{prefix} must be a mapping or null, got {type(node).__name__}")
    return node


def _from_node(cls: type, node: Any, prefix: str) -> Any:
    """Shared ``from_config``: None -> defaults, instance -> itself, mapping -> validated."""
    if node is None:
        return cls()
    if isinstance(node, cls):
        return node
    node = _to_mapping(node, prefix)
    known = {f.name for f in fields(cls)}
    unknown = sorted(str(k) for k in node if k not in known)
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(prefix + '.' + k for k in unknown)}; known: {sorted(known)}")
    return cls(**node)


def _set(obj: Any, key: str, value: Any) -> None:
    object.__setattr__(obj, key, value)


def _check_bool(obj: Any, prefix: str, *keys: str) -> None:
    for key in keys:
        v = getattr(obj, key)
        if not _is_bool(v):
            raise ValueError(f"{prefix}.{key} must be true or false, got {v!r}")
        _set(obj, key, bool(v))


def _check_real(obj: Any, prefix: str, key: str, ok: Callable[[float], bool], what: str) -> None:
    v = getattr(obj, key)
    if not _is_real(v) or not ok(float(v)):
        raise ValueError(f"{prefix}.{key} must be {what}, got {v!r}")
    _set(obj, key, float(v))


@dataclass(frozen=True)
class PreferenceConfig:
    """The ``preference`` config group (iterative DPO pairs and loss).

    Attributes:
        enable: train with preference pairs (``recipe=iterative_dpo`` / ``lorr_dpo``).
        loss: registered preference loss: "dpo" (default), "ipo", "simpo".
        beta: > 0, DPO / IPO / SimPO beta (SimPO's paper uses 2.0 to 2.5).
        label_smoothing: in [0, 0.5), conservative DPO / SimPO (Online-DPO-R1 uses 0.1); must be
            0 for ipo.
        simpo_gamma_beta_ratio: >= 0, SimPO's gamma / beta.
        pairs: pair construction, one of :data:`PAIR_MODES` ("best_worst", paper).
        reference: "iteration_start" (reference = the policy at the start of the iteration, i.e.
            the previous iterate, paper) or "initial" (the initial model throughout).
        length_normalize: feed length-averaged log-probs to the loss; None = the loss's default
            (dpo: sums; ipo, simpo: averages).
        seed: seed of the ``random`` pair generator.
        score_key: ``reward_extra_info`` key whose per-response value scores responses for
            pairing; None = the sequence reward (sum of the token-level scores).
        iteration_steps: >= 1, training steps per iteration: with ``reference:
            iteration_start`` the reference is refreshed every this many steps.
    """

    enable: bool = False
    loss: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma_beta_ratio: float = 0.5
    pairs: str = "best_worst"
    reference: str = "iteration_start"
    length_normalize: bool | None = None
    seed: int = 0
    score_key: str | None = None
    iteration_steps: int = 1

    def __post_init__(self) -> None:
        p = "preference"
        _check_bool(self, p, "enable")
        if not _is_int(self.iteration_steps) or self.iteration_steps < 1:
            raise ValueError(f"{p}.iteration_steps must be an integer >= 1, got {self.iteration_steps!r}")
        _set(self, "iteration_steps", int(self.iteration_steps))
        if not isinstance(self.loss, str) or self.loss not in PREFERENCE_LOSSES:
            raise ValueError(f"{p}.loss must be one of {sorted(PREFERENCE_LOSSES)}, got {self.loss!r}")
        _check_real(self, p, "beta", lambda v: v > 0, "a number > 0")
        _check_real(self, p, "label_smoothing", lambda v: 0.0 <= v < 0.5, "a number in [0, 0.5)")
        if self.loss == "ipo" and self.label_smoothing != 0.0:
            raise ValueError(f"{p}.label_smoothing must be 0 with preference.loss=ipo, got {self.label_smoothing!r}")
        _check_real(self, p, "simpo_gamma_beta_ratio", lambda v: v >= 0, "a number >= 0")
        if self.pairs not in PAIR_MODES:
            raise ValueError(f"{p}.pairs must be one of {PAIR_MODES}, got {self.pairs!r}")
        if self.reference not in REFERENCES:
            raise ValueError(f"{p}.reference must be one of {REFERENCES}, got {self.reference!r}")
        if self.length_normalize is not None:
            _check_bool(self, p, "length_normalize")
        if not _is_int(self.seed):
            raise ValueError(f"{p}.seed must be an integer, got {self.seed!r}")
        _set(self, "seed", int(self.seed))
        if self.score_key is not None and (not isinstance(self.score_key, str) or not self.score_key):
            raise ValueError(f"{p}.score_key must be null or a non-empty string, got {self.score_key!r}")

    @property
    def spec(self) -> PreferenceLossSpec:
        """The registered spec of ``loss``."""
        return get_preference_loss(self.loss)

    @property
    def needs_reference(self) -> bool:
        """Whether reference log-probs must be computed (False for simpo)."""
        return self.spec.needs_reference

    @property
    def length_normalized(self) -> bool:
        """The resolved ``length_normalize`` (the loss's default when null)."""
        return self.spec.length_normalized if self.length_normalize is None else self.length_normalize

    def loss_kwargs(self) -> dict[str, float]:
        """Hyper-parameters for ``spec.fn``, restricted to the names in its signature."""
        offered = {"beta": self.beta, "label_smoothing": self.label_smoothing,
                   "gamma_beta_ratio": self.simpo_gamma_beta_ratio}
        params = inspect.signature(self.spec.fn).parameters
        return {k: v for k, v in offered.items() if k in params}

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | PreferenceConfig | None) -> PreferenceConfig:
        """Build from a dict, an omegaconf DictConfig or None (defaults).

        Raises:
            ValueError: unknown keys (all named) or a bad value; messages name ``preference.<key>``.
        """
        return _from_node(cls, node, "preference")


@dataclass(frozen=True)
class LorrResetConfig:
    """``lorr.reset``: periodic shrink-and-perturb reset (LoRR, PAPERS.md §3).

    Attributes:
        enable: reset at all.
        alpha: in [0, 1], theta <- alpha * theta + (1 - alpha) * theta_0 (paper 0.5).
        pattern: regular expression searched in parameter names (paper: MLP down projections).
        every: >= 1, reset after every ``every`` units (see :func:`reset_due`).
        unit: "replays" (count replay passes over pair batches) or "iterations".
        reset_optimizer: also clear the optimizer state of the reset parameters.
    """

    enable: bool = True
    alpha: float = 0.5
    pattern: str = "down_proj"
    every: int = 3
    unit: str = "replays"
    reset_optimizer: bool = False

    def __post_init__(self) -> None:
        p = "lorr.reset"
        _check_bool(self, p, "enable", "reset_optimizer")
        _check_real(self, p, "alpha", lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")
        if not isinstance(self.pattern, str) or not self.pattern:
            raise ValueError(f"{p}.pattern must be a non-empty regular expression, got {self.pattern!r}")
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"{p}.pattern {self.pattern!r} is not a valid regular expression: {e}") from e
        if not _is_int(self.every) or self.every < 1:
            raise ValueError(f"{p}.every must be an integer >= 1, got {self.every!r}")
        _set(self, "every", int(self.every))
        if self.unit not in RESET_UNITS:
            raise ValueError(f"{p}.unit must be one of {RESET_UNITS}, got {self.unit!r}")

    @classmethod
    def from_config(cls, node: Any) -> LorrResetConfig:
        """As :meth:`PreferenceConfig.from_config`; messages name ``lorr.reset.<key>``."""
        return _from_node(cls, node, "lorr.reset")


@dataclass(frozen=True)
class LorrReuseConfig:
    """``lorr.reuse``: train on the first-collected pairs again after a reset (LoRR, PAPERS.md §3).

    Attributes:
        enable: reuse at all.
        rollout_ratio: in [0, 1], probability of fresh rollouts (instead of reusing the initial
            pairs) for an iteration once a reset has happened.
    """

    enable: bool = True
    rollout_ratio: float = 0.5

    def __post_init__(self) -> None:
        _check_bool(self, "lorr.reuse", "enable")
        _check_real(self, "lorr.reuse", "rollout_ratio", lambda v: 0.0 <= v <= 1.0, "a number in [0, 1]")

    @classmethod
    def from_config(cls, node: Any) -> LorrReuseConfig:
        """As :meth:`PreferenceConfig.from_config`; messages name ``lorr.reuse.<key>``."""
        return _from_node(cls, node, "lorr.reuse")


@dataclass(frozen=True)
class LorrSftConfig:
    """``lorr.sft``: hybrid objective L_pref + lambda_k * NLL(chosen), lambda_k = min(cap, growth * k).

    Attributes:
        enable: add the SFT term at all (off: lambda = 0).
        growth: >= 0, lambda increase per replay index.
        cap: >= 0, maximum lambda (paper 0.5).
    """

    enable: bool = True
    growth: float = 0.25
    cap: float = 0.5

    def __post_init__(self) -> None:
        _check_bool(self, "lorr.sft", "enable")
        _check_real(self, "lorr.sft", "growth", lambda v: v >= 0, "a number >= 0")
        _check_real(self, "lorr.sft", "cap", lambda v: v >= 0, "a number >= 0")

    @classmethod
    def from_config(cls, node: Any) -> LorrSftConfig:
        """As :meth:`PreferenceConfig.from_config`; messages name ``lorr.sft.<key>``."""
        return _from_node(cls, node, "lorr.sft")


@dataclass(frozen=True)
class LorrConfig:
    """The ``lorr`` config group (LoRR, arXiv 2508.06412, PAPERS.md §3).

    Attributes:
        enable: use LoRR; False = plain iterative DPO (see :meth:`effective`).
        replays: L >= 1, passes over every batch of pairs (paper 3).
        reset: :class:`LorrResetConfig` (a mapping is converted).
        reuse: :class:`LorrReuseConfig`.
        sft: :class:`LorrSftConfig`.
    """

    enable: bool = False
    replays: int = 3
    reset: LorrResetConfig = field(default_factory=LorrResetConfig)
    reuse: LorrReuseConfig = field(default_factory=LorrReuseConfig)
    sft: LorrSftConfig = field(default_factory=LorrSftConfig)

    def __post_init__(self) -> None:
        _check_bool(self, "lorr", "enable")
        if not _is_int(self.replays) or self.replays < 1:
            raise ValueError(f"lorr.replays must be an integer >= 1, got {self.replays!r}")
        _set(self, "replays", int(self.replays))
        _set(self, "reset", LorrResetConfig.from_config(self.reset))
        _set(self, "reuse", LorrReuseConfig.from_config(self.reuse))
        _set(self, "sft", LorrSftConfig.from_config(self.sft))

    @classmethod
    def disabled(cls) -> LorrConfig:
        """Plain iterative DPO: enable off, one replay, no reset, no reuse, no SFT term."""
        return cls(enable=False, replays=1, reset=LorrResetConfig(enable=False), reuse=LorrReuseConfig(enable=False),
                   sft=LorrSftConfig(enable=False))

    def effective(self) -> LorrConfig:
        """``self`` when enabled, else :meth:`disabled` (the trainer should read this one)."""
        return self if self.enable else self.disabled()

    def sft_lambda(self, k: int) -> float:
        """lambda_k of the effective config: :func:`sft_weight` when LoRR and its SFT term are on, else 0."""
        eff = self.effective()
        return sft_weight(k, eff.sft.growth, eff.sft.cap) if eff.sft.enable else 0.0

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | LorrConfig | None) -> LorrConfig:
        """Build from a dict, an omegaconf DictConfig or None (defaults).

        Raises:
            ValueError: unknown keys (all named) or a bad value; messages name ``lorr.<key>`` or
                ``lorr.<node>.<key>``.
        """
        return _from_node(cls, node, "lorr")


# ----------------------------------------------------------------------------- micro-batch loss


def _zero_loss(log_prob: torch.Tensor) -> torch.Tensor:
    """Scalar 0 on ``log_prob``'s graph with an all-zero gradient (safe where log_prob = -inf)."""
    return torch.where(torch.zeros_like(log_prob, dtype=torch.bool), log_prob, 0.0).sum()


def _match_pairs(pair_id: torch.Tensor, is_chosen: torch.Tensor) -> tuple[list[int], list[int], list[int]]:
    """(pair ids, chosen rows, rejected rows), pair ids ascending; padding rows (id < 0) skipped."""
    rows: dict[int, list[int]] = {}
    for r, pid in enumerate(pair_id.tolist()):
        if pid >= 0:
            rows.setdefault(int(pid), []).append(r)
    chosen_flags = is_chosen.bool().tolist()
    ids, ch, rj = [], [], []
    for pid in sorted(rows):
        rr = rows[pid]
        flags = [chosen_flags[r] for r in rr]
        if len(rr) != 2 or sum(flags) != 1:
            raise ValueError(f"pair {pid}: found {len(rr)} row(s) with {sum(flags)} chosen in this micro-batch; the "
                             f"chosen and rejected response of a pair must sit in the same micro-batch (exactly one "
                             f"of each)")
        ids.append(pid)
        ch.append(rr[0] if flags[0] else rr[1])
        rj.append(rr[1] if flags[0] else rr[0])
    return ids, ch, rj


def preference_microbatch_loss(log_prob: torch.Tensor, ref_log_prob: torch.Tensor | None,
                               response_mask: torch.Tensor, pair_id: torch.Tensor, is_chosen: torch.Tensor,
                               sft_weight: torch.Tensor, cfg: PreferenceConfig, num_pairs: int,
                               dp_size: int = 1) -> tuple[torch.Tensor, dict[str, float]]:
    """Preference + LoRR SFT loss of one micro-batch, scaled so micro-batch losses add up.

    Pairs are matched by ``pair_id`` inside the micro-batch. For pair p with chosen row c and
    rejected row r, with s(.) = :func:`sequence_logps` (averaged when
    ``cfg.length_normalized``):
        l_p   = preference loss ``cfg.loss`` of (s(pi_c), s(pi_r), s(ref_c), s(ref_r))
        nll_p = -(mean over the chosen response's tokens of log pi)   (RPO, Pang et al. 2024)
        L     = (sum_p l_p + sum_p lambda_p * nll_p) / num_pairs * dp_size
    (LoRR hybrid objective L_pref + lambda_k L_SFT, PAPERS.md §3). ``num_pairs`` counts the pairs
    of the whole global mini-batch, so summing L over its micro-batches (and averaging the
    gradients over ``dp_size`` ranks, as data-parallel all-reduce does) gives the mini-batch mean.

    Args:
        log_prob: ``[b, T]`` float, log pi_theta in nats, with grad (may be -inf off the mask).
        ref_log_prob: ``[b, T]`` float reference log-probs, or None for a reference-free loss.
        response_mask: ``[b, T]`` bool/0-1, 1 = response token.
        pair_id: ``[b]`` long, pair index in the mini-batch; -1 (any negative) = padding row, ignored.
        is_chosen: ``[b]`` bool, True = the row is the pair's chosen response.
        sft_weight: ``[b]`` float, lambda_k (read from the chosen row).
        cfg: the preference config (loss, beta, label smoothing, length normalisation).
        num_pairs: >= 1 pairs in the global mini-batch (0 allowed only if this micro-batch has none).
        dp_size: data-parallel world size.

    Returns:
        ``(loss, metrics)``: scalar loss; metrics (means over this micro-batch's pairs)
        ``dpo/reward_margin``, ``dpo/reward_accuracy`` (chosen reward > rejected reward),
        ``dpo/chosen_logps``, ``dpo/rejected_logps`` (sequence sums), ``dpo/loss`` (preference
        part), ``lorr/sft_loss`` (mean nll), ``lorr/sft_weight`` (mean lambda) and
        ``dpo/pairs_in_micro_batch``. A micro-batch without pairs returns an exact 0 with a zero
        gradient and only ``dpo/pairs_in_micro_batch`` = 0.

    Raises:
        ValueError: shapes differ; ref_log_prob is None for a loss that needs it; a pair id
            appears other than exactly twice (once chosen, once rejected) in the micro-batch
            (names the id); num_pairs < pairs here; dp_size < 1; a lambda is negative or not finite.
    """
    if log_prob.dim() != 2 or response_mask.shape != log_prob.shape:
        raise ValueError(f"log_prob and response_mask must be [b, T], got {tuple(log_prob.shape)} and "
                         f"{tuple(response_mask.shape)}")
    b = log_prob.shape[0]
    if ref_log_prob is not None and ref_log_prob.shape != log_prob.shape:
        raise ValueError(f"ref_log_prob must be [b, T] = {tuple(log_prob.shape)}, got {tuple(ref_log_prob.shape)}")
    for name, t in (("pair_id", pair_id), ("is_chosen", is_chosen), ("sft_weight", sft_weight)):
        if t.shape != (b,):
            raise ValueError(f"{name} must be [b] = ({b},), got {tuple(t.shape)}")
    spec = cfg.spec
    if spec.needs_reference and ref_log_prob is None:
        raise ValueError(f"preference.loss={cfg.loss!r} needs ref_log_prob (reference log-probs), got None")
    if not _is_int(dp_size) or dp_size < 1:
        raise ValueError(f"dp_size must be an integer >= 1, got {dp_size!r}")

    ids, ch, rj = _match_pairs(pair_id, is_chosen)
    n = len(ids)
    if not _is_int(num_pairs) or num_pairs < n or (n > 0 and num_pairs < 1):
        raise ValueError(f"num_pairs (pairs in the global mini-batch) must be an integer >= {max(n, 1)} "
                         f"(pairs in this micro-batch), got {num_pairs!r}")
    if n == 0:
        return _zero_loss(log_prob), {"dpo/pairs_in_micro_batch": 0.0}

    dev = log_prob.device
    ci = torch.tensor(ch, dtype=torch.long, device=dev)
    ri = torch.tensor(rj, dtype=torch.long, device=dev)
    lam = sft_weight.index_select(0, ci).detach().float()
    if not bool(torch.isfinite(lam).all()) or bool((lam < 0).any()):
        raise ValueError(f"sft_weight (lambda_k) must be finite and >= 0, got {lam.tolist()}")
    mask_c, mask_r = response_mask.index_select(0, ci), response_mask.index_select(0, ri)
    lp_c, lp_r = log_prob.index_select(0, ci).float(), log_prob.index_select(0, ri).float()
    avg = cfg.length_normalized

    pi_c, pi_r = sequence_logps(lp_c, mask_c, avg), sequence_logps(lp_r, mask_r, avg)
    if ref_log_prob is not None and spec.needs_reference:
        ref = ref_log_prob.detach().float()
        ref_c = sequence_logps(ref.index_select(0, ci), mask_c, avg)
        ref_r = sequence_logps(ref.index_select(0, ri), mask_r, avg)
    else:
        ref_c = ref_r = None
    out = spec.fn(pi_c, pi_r, ref_c, ref_r, **cfg.loss_kwargs())

    nll = -sequence_logps(lp_c, mask_c, average=True)  # [P], length-normalised NLL of the chosen response
    loss = (out.losses.sum() + (lam * nll).sum()) / num_pairs * dp_size

    with torch.no_grad():
        sum_c, sum_r = sequence_logps(lp_c, mask_c), sequence_logps(lp_r, mask_r)
        margin = out.chosen_rewards - out.rejected_rewards
        metrics = {
            "dpo/reward_margin": margin.mean().item(),
            "dpo/reward_accuracy": (margin > 0).float().mean().item(),
            "dpo/chosen_logps": sum_c.mean().item(),
            "dpo/rejected_logps": sum_r.mean().item(),
            "dpo/loss": out.losses.detach().mean().item(),
            "lorr/sft_loss": nll.detach().mean().item(),
            "lorr/sft_weight": lam.mean().item(),
            "dpo/pairs_in_micro_batch": float(n),
        }
    return loss, metrics
