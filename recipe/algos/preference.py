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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from recipe.config import PAIR_MODES, PreferenceConfig, is_int as _is_int

__all__ = [
    "sequence_logps", "PreferenceLossOutput", "PreferenceLossSpec", "PREFERENCE_LOSSES", "register_preference_loss",
    "get_preference_loss", "dpo_loss", "ipo_loss", "simpo_loss", "PairStats", "build_pairs",
    "preference_microbatch_loss",
]



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
