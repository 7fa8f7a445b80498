"""DOTS: difficulty-targeted online data selection (pure math, no I/O, no Ray).

Paper: Sun et al., "Improving Data Efficiency for LLM Reinforcement Fine-tuning Through
Difficulty-targeted Online Data Selection and Rollout Replay", arXiv 2506.05316
(``docs/PAPERS.md`` §2). Each selection round:

1. roll out a random reference set of K questions with G responses each and measure their
   *adaptive difficulty* d_i = (1/G) sum_j (1 - r_j), r in {0, 1}
   (:func:`adaptive_difficulty`);
2. predict every other question's difficulty by attention over the reference set,
   a_i = softmax_i(z_q . z_i * scale), d_hat_q = sum_i a_i d_i (:func:`attention_predict`),
   where z are frozen-LM embeddings mapped by an :class:`Adapter` (or by the identity
   projection, :func:`project`);
3. calibrate, sigma(w * logit(d_hat) + b) (:class:`Calibration`): with an adapter, (w, b)
   come from its calibration MLP of the reference mean/std of d (paper); or they are fitted
   at run time on leave-one-out predictions of the reference set
   (:func:`leave_one_out_predict`, :func:`fit_calibration`; public code's run-time refit);
4. sample questions with P(q) ~ exp(-|d_hat_q - 0.5| / tau), tau = 1e-3, without
   replacement within a round, each round from the whole training set as the public code
   does (or without replacement within an epoch; :class:`DotsSelector`). Rationale: the
   expected squared policy-gradient norm is proportional to p(1-p)(1-1/G), largest at p = 0.5.

The reference set is sized from the training batch (:func:`reference_size`): the public
code rolls out 256 reference questions x 8 per round of mu = 2 steps of 256 fresh
questions x 8, i.e. half as many reference rollouts as fresh training rollouts.

**Identity projection (no adapter).** Raw mean-pooled LM states share a large common
component and a few outlier dimensions, so their dot products barely depend on the
question (the paper reports Pearson 0.07-0.27 for raw embeddings). Without an adapter,
:func:`project` therefore standardises each dimension over the pool of questions
(subtract the mean, divide by the std) and L2-normalises, so z_q . z_i is a cosine
similarity in [-1, 1]; :func:`predict_difficulty` then uses the fixed (not learned)
temperature ``IDENTITY_TEMPERATURE`` = 0.1 (scale = 10) instead of 1/sqrt(H), which would
make the attention nearly uniform for unit vectors.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from recipe.config import IDENTITY_TEMPERATURE
from recipe.io import atomic_torch_save  # softmax temperature on cosine similarity without an adapter

logger = logging.getLogger(__name__)

__all__ = [
    "Adapter", "Calibration", "DotsSelector", "IDENTITY_TEMPERATURE", "adaptive_difficulty",
    "attention_predict", "evaluate_heldout", "fit_calibration", "leave_one_out_predict", "pearson",
    "pool_stats", "predict_difficulty", "project", "reference_size", "SELECTIONS",
]

EPS = 1e-4  #: clip for logit(d_hat): d_hat in [EPS, 1 - EPS].
_CHUNK = 8192  #: query rows per matmul chunk in attention_predict.


def adaptive_difficulty(acc: Any) -> np.ndarray:
    """Adaptive difficulty d_q = (1/G) sum_i (1 - r_i) (DOTS paper; PAPERS.md §2).

    Args:
        acc: per-response correctness r in [0, 1]: a [K, G] array or a list of K per-question
            lists (G may differ between questions).

    Returns:
        [K] float64 difficulties in [0, 1] (1 = never solved).

    Raises:
        ValueError: a question with no responses, or a value that is NaN or outside [0, 1]
            (names the question's row).
    """
    if hasattr(acc, "ndim") and acc.ndim != 2:
        raise ValueError(f"adaptive_difficulty: an array must be [K, G], got shape {tuple(acc.shape)}")
    rows = list(acc)
    out = np.empty(len(rows), dtype=np.float64)
    for k, row in enumerate(rows):
        r = np.asarray(row, dtype=np.float64).reshape(-1)
        if r.size == 0:
            raise ValueError(f"adaptive_difficulty: question {k} has no responses")
        if not np.all((r >= 0.0) & (r <= 1.0)):  # also false for NaN
            raise ValueError(f"adaptive_difficulty: question {k} has correctness outside [0, 1]: {r.tolist()}")
        out[k] = float(np.mean(1.0 - r))
    return out


def attention_predict(query_emb, ref_emb, ref_difficulty, scale: float | None = None,
                      chunk: int = _CHUNK) -> np.ndarray:
    """Attention-weighted difficulty d_hat_q = sum_i softmax_i(z_q . z_i * scale) d_i (DOTS paper; PAPERS.md §2).

    The softmax subtracts each row's max logit (log-sum-exp trick), so any scale is stable.

    Args:
        query_emb: [Q, H] projected query embeddings z_q.
        ref_emb: [K, H] projected reference embeddings z_i (K >= 1).
        ref_difficulty: [K] measured difficulties d_i.
        scale: logit scale; default 1/sqrt(H) (the paper's z_q . z_i / sqrt(h)).
        chunk: query rows per matmul (memory: chunk x K floats).

    Returns:
        [Q] predicted difficulties, float32 for float32 inputs (float64 if any input is).

    Raises:
        ValueError: shape mismatch or K = 0.
    """
    q, r, d = np.asarray(query_emb), np.asarray(ref_emb), np.asarray(ref_difficulty)
    dtype = np.float64 if np.float64 in (q.dtype, r.dtype) else np.float32
    q, r, d = q.astype(dtype, copy=False), r.astype(dtype, copy=False), d.astype(dtype, copy=False).reshape(-1)
    if q.ndim != 2 or r.ndim != 2 or q.shape[1] != r.shape[1] or r.shape[0] != d.shape[0] or r.shape[0] == 0:
        raise ValueError(f"attention_predict: need query [Q, H], ref [K, H], difficulty [K] with K >= 1; "
                         f"got {q.shape}, {r.shape}, {d.shape}")
    s = dtype(1.0 / math.sqrt(q.shape[1]) if scale is None else scale)
    out = np.empty(q.shape[0], dtype=dtype)
    for lo in range(0, q.shape[0], chunk):
        logits = (q[lo:lo + chunk] @ r.T) * s  # [c, K]
        logits -= logits.max(axis=1, keepdims=True)
        w = np.exp(logits)
        out[lo:lo + chunk] = (w @ d) / w.sum(axis=1)
    return out


def leave_one_out_predict(ref_emb, ref_difficulty, scale: float | None = None, query_emb=None) -> np.ndarray:
    """Predicts each reference question from the other K - 1 (what run-time calibration is fitted on).

    Args:
        ref_emb: [K, H] reference-side projections z_i (K >= 2).
        ref_difficulty: [K] measured difficulties.
        scale: as in :func:`attention_predict`.
        query_emb: [K, H] query-side projections of the same questions (adapters project
            queries and references differently); default ``ref_emb``.

    Returns:
        [K] float64 leave-one-out predictions.

    Raises:
        ValueError: K < 2 or shape mismatch.
    """
    r = np.asarray(ref_emb, dtype=np.float64)
    q = r if query_emb is None else np.asarray(query_emb, dtype=np.float64)
    d = np.asarray(ref_difficulty, dtype=np.float64).reshape(-1)
    if r.ndim != 2 or q.shape != r.shape or d.shape[0] != r.shape[0] or r.shape[0] < 2:
        raise ValueError(f"leave_one_out_predict: need K >= 2 and matching shapes; got {q.shape}, {r.shape}, {d.shape}")
    logits = (q @ r.T) * (1.0 / math.sqrt(r.shape[1]) if scale is None else scale)
    np.fill_diagonal(logits, -np.inf)
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    return (w @ d) / w.sum(axis=1)


def _logit(p):
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, 1.0 - EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))  # overflow-free


@dataclass
class Calibration:
    """d -> sigmoid(w * logit(clip(d, EPS, 1 - EPS)) + b) (DOTS paper; PAPERS.md §2); w=1, b=0 is the identity
    (up to the clip)."""

    w: float = 1.0
    b: float = 0.0
    #: True when :func:`fit_calibration` fell back to a constant (w = 0): no usable signal.
    fallback: bool = False

    def __call__(self, d_hat) -> np.ndarray:
        """[N] predictions -> [N] float64 calibrated predictions in (0, 1)."""
        return _sigmoid(self.w * _logit(d_hat) + self.b)


def fit_calibration(pred, measured, l2: float = 1e-5, iters: int = 50) -> Calibration:
    """Fits (w, b) by Newton's method on the soft-label BCE of sigmoid(w * logit(pred) + b).

    Minimises mean_k BCE(measured_k, sigmoid(w x_k + b)) + (l2 / 2) ((w - 1)^2 + b^2) with
    x = logit(clip(pred)); the small ridge towards the identity keeps (w, b) finite when
    the data are separable (measured all 0/1). Soft labels (measured in [0, 1]) are exact
    for a well-specified model: measured = sigmoid(w* x + b*) recovers (w*, b*).

    Args:
        pred: [K] uncalibrated predictions (e.g. :func:`leave_one_out_predict`).
        measured: [K] measured difficulties in [0, 1].
        l2: ridge strength towards (w, b) = (1, 0).
        iters: maximum Newton steps (stops when the step is < 1e-10).

    Returns:
        The fitted :class:`Calibration`; the identity (1, 0) when K < 3 or when ``pred`` or
        ``measured`` is constant (nothing to fit: the slope is not identifiable). A negative
        fitted slope (the similarity predictor is anti-correlated with the references, i.e.
        it has no usable signal) is not trusted: it returns the constant
        w = 0, b = logit(mean(measured)), so selection falls back to random order.

    Raises:
        ValueError: shape mismatch, NaN, or ``measured`` outside [0, 1].
    """
    x, y = _logit(pred).reshape(-1), np.asarray(measured, dtype=np.float64).reshape(-1)
    if x.shape != y.shape or not np.all(np.isfinite(x)) or not np.all((y >= 0) & (y <= 1)):
        raise ValueError("fit_calibration: pred and measured must be [K] finite, measured in [0, 1]")
    if x.size < 3 or np.ptp(x) < 1e-9 or np.ptp(y) < 1e-9:
        return Calibration()
    theta = np.array([1.0, 0.0])
    feats = np.stack([x, np.ones_like(x)], axis=1)  # [K, 2]
    prior = np.array([1.0, 0.0])

    def loss(t):
        z = feats @ t
        return np.mean(np.logaddexp(0, z) - y * z) + 0.5 * l2 * np.sum((t - prior) ** 2)

    for _ in range(iters):
        p = _sigmoid(feats @ theta)
        grad = feats.T @ (p - y) / x.size + l2 * (theta - prior)
        hess = (feats * (p * (1 - p))[:, None]).T @ feats / x.size + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        t, f0 = 1.0, loss(theta)
        while loss(theta - t * step) > f0 and t > 1e-6:  # backtracking keeps Newton monotone
            t *= 0.5
        theta = theta - t * step
        if np.max(np.abs(t * step)) < 1e-10:
            break
    if theta[0] < 0:  # anti-correlated on the references: do not invert, predict a constant
        return Calibration(0.0, float(_logit(np.clip(y.mean(), EPS, 1 - EPS))), fallback=True)
    return Calibration(float(theta[0]), float(theta[1]))


def pearson(x, y) -> float:
    """Pearson correlation of two [N] arrays; NaN when N < 2 or either side is constant
    (the correlation is undefined there, and NaN keeps a logged metric honest)."""
    x, y = np.asarray(x, dtype=np.float64).reshape(-1), np.asarray(y, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"pearson: shapes differ: {x.shape} vs {y.shape}")
    if x.size < 2:
        return float("nan")
    xc, yc = x - x.mean(), y - y.mean()
    den = math.sqrt(float(xc @ xc) * float(yc @ yc))
    return float(xc @ yc / den) if den > 1e-300 and np.ptp(x) > 0 and np.ptp(y) > 0 else float("nan")


def _mlp(in_dim: int, hidden: int, layers: int, dropout: float) -> nn.Sequential:
    mods: list[nn.Module] = [nn.LayerNorm(in_dim)]
    for i in range(layers):
        mods.append(nn.Linear(in_dim if i == 0 else hidden, hidden))
        if i < layers - 1:
            mods += [nn.GELU(), nn.Dropout(dropout)]
    mods.append(nn.LayerNorm(hidden))
    return nn.Sequential(*mods)


class Adapter(nn.Module):
    """The DOTS paper's adapter (PAPERS.md §2): maps frozen-LM embeddings to attention space.

    Two separate MLPs, one for queries and one for references (the paper's "separate query
    and reference projections"), each: LayerNorm(in) -> [Linear -> GELU -> Dropout] x 2 ->
    Linear -> LayerNorm(hidden) (3 hidden layers of ``hidden`` = 896 units, dropout 0.1).
    Inputs are first standardised with the buffers ``in_mean`` / ``in_std`` (set from the
    training embeddings by :meth:`set_input_stats`; identity by default). A calibration MLP
    2 -> 32 -> 2 maps (mean, std) of the reference difficulties to (w, b) (paper), initialised
    to output (1, 0). Attention uses the paper's scale 1/sqrt(hidden).
    """

    def __init__(self, in_dim: int, hidden: int = 896, layers: int = 3, dropout: float = 0.1):
        super().__init__()
        self.in_dim, self.hidden, self.layers, self.dropout = in_dim, hidden, layers, dropout
        self.query_net = _mlp(in_dim, hidden, layers, dropout)
        self.ref_net = _mlp(in_dim, hidden, layers, dropout)
        self.calib_net = nn.Sequential(nn.Linear(2, 32), nn.GELU(), nn.Linear(32, 2))
        nn.init.zeros_(self.calib_net[2].weight)
        with torch.no_grad():
            self.calib_net[2].bias.copy_(torch.tensor([1.0, 0.0]))
        self.register_buffer("in_mean", torch.zeros(in_dim))
        self.register_buffer("in_std", torch.ones(in_dim))

    def set_input_stats(self, emb) -> None:
        """Sets the standardisation buffers from [N, in_dim] embeddings (per-dim mean and std)."""
        e = torch.as_tensor(np.asarray(emb), dtype=torch.float32)
        self.in_mean.copy_(e.mean(0))
        self.in_std.copy_(e.std(0, unbiased=False).clamp_min(1e-6))

    def _prep(self, emb) -> torch.Tensor:
        e = torch.as_tensor(emb, dtype=torch.float32, device=self.in_mean.device)
        if e.ndim != 2 or e.shape[1] != self.in_dim:
            raise ValueError(f"Adapter: embeddings must be [N, {self.in_dim}], got {tuple(e.shape)}")
        return (e - self.in_mean) / self.in_std

    def project_query(self, emb) -> torch.Tensor:
        """[N, in_dim] -> [N, hidden] float32 query projections."""
        return self.query_net(self._prep(emb))

    def project_reference(self, emb) -> torch.Tensor:
        """[K, in_dim] -> [K, hidden] float32 reference projections."""
        return self.ref_net(self._prep(emb))

    def calibration(self, ref_difficulty: torch.Tensor) -> Calibration:
        """(w, b) from the [K] reference difficulties' mean and std (paper)."""
        with torch.no_grad():
            w, b = self._wb(torch.as_tensor(ref_difficulty, dtype=torch.float32, device=self.in_mean.device))
        return Calibration(float(w), float(b))

    def _wb(self, d: torch.Tensor) -> torch.Tensor:
        return self.calib_net(torch.stack([d.mean(-1), d.std(-1, unbiased=False)], -1))

    def forward(self, query_emb, ref_emb, ref_difficulty, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Calibrated predictions (differentiable; what BCE training uses).

        Args:
            query_emb: [B, in_dim]; ref_emb: [K, in_dim]; ref_difficulty: [K].
            mask: optional [B, K] bool, True = reference i may be attended by query b (used to
                exclude a query's own entry); every row needs at least one True.

        Returns:
            [B] float32 calibrated difficulty predictions in (0, 1).
        """
        d = torch.as_tensor(ref_difficulty, dtype=torch.float32, device=self.in_mean.device)
        logits = self.project_query(query_emb) @ self.project_reference(ref_emb).T / math.sqrt(self.hidden)
        if mask is not None:
            logits = logits.masked_fill(~mask, float("-inf"))
        d_hat = torch.softmax(logits, dim=-1) @ d
        w, b = self._wb(d)
        x = torch.logit(d_hat.clamp(EPS, 1 - EPS))
        return torch.sigmoid(w * x + b)


def project(emb, adapter: Adapter | None = None, role: str = "query", mean=None, std=None) -> np.ndarray:
    """Maps [N, H] embeddings to attention space.

    With an adapter: its query or reference MLP (eval mode, no grad) -> [N, hidden].
    Without: standardise by ``mean`` / ``std`` (per dimension; default: of ``emb`` itself) and
    L2-normalise -> [N, H] unit vectors (see the module docstring for why).

    Args:
        emb: [N, H] embeddings. adapter: trained :class:`Adapter` or None.
        role: ``"query"`` or ``"reference"``. mean, std: [H] pool statistics.

    Returns:
        [N, H'] float32.

    Raises:
        ValueError: unknown ``role`` or dimension mismatch.
    """
    if role not in ("query", "reference"):
        raise ValueError(f"project: role must be 'query' or 'reference', got {role!r}")
    if adapter is not None:
        was = adapter.training
        adapter.eval()
        fn = adapter.project_query if role == "query" else adapter.project_reference
        if not isinstance(emb, torch.Tensor):
            emb = np.asarray(emb, dtype=np.float32)
        if len(emb) == 0:
            return np.zeros((0, adapter.hidden), dtype=np.float32)
        try:
            with torch.no_grad():  # chunks bound the activation memory for 1e5 questions
                z = np.concatenate([fn(emb[lo:lo + _CHUNK]).cpu().numpy() for lo in range(0, len(emb), _CHUNK)])
        finally:
            adapter.train(was)
        return z.astype(np.float32, copy=False)
    e = np.asarray(emb, dtype=np.float32)
    mu = e.mean(0) if mean is None else np.asarray(mean, dtype=np.float32)
    sd = e.std(0) if std is None else np.asarray(std, dtype=np.float32)
    if e.ndim != 2 or mu.shape != (e.shape[1],) or sd.shape != (e.shape[1],):
        raise ValueError(f"project: emb [N, H] with mean/std [H] required; got {e.shape}, {mu.shape}, {sd.shape}")
    z = (e - mu) / np.maximum(sd, 1e-6)
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def pool_stats(*embs) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std [H] (float32, accumulated in float64 by chunks) over the rows
    of all [N_j, H] arrays: the identity projection's standardisation statistics."""
    n, s1, s2 = 0, 0.0, 0.0
    for e in embs:
        for lo in range(0, len(e), _CHUNK):
            c = np.asarray(e[lo:lo + _CHUNK], dtype=np.float64)
            n, s1, s2 = n + len(c), s1 + c.sum(0), s2 + (c * c).sum(0)
    if n == 0:
        raise ValueError("pool_stats: no rows")
    mean = s1 / n
    return mean.astype(np.float32), np.sqrt(np.maximum(s2 / n - mean * mean, 0.0)).astype(np.float32)


def predict_difficulty(query_emb, ref_emb, ref_difficulty, adapter: Adapter | None = None,
                       calibration: str = "auto", temperature: float = IDENTITY_TEMPERATURE, stats=None):
    """Steps 2-3 of a selection round: project, attend, calibrate.

    Args:
        query_emb: [Q, H] embeddings of the questions to score. ref_emb: [K, H] of the
            reference set. ref_difficulty: [K] measured difficulties.
        adapter: trained :class:`Adapter`, or None for the identity projection (standardised
            over query + reference embeddings, cosine / ``temperature``).
        calibration: ``"adapter"`` (the adapter's MLP of mean/std of d; paper), ``"loo"``
            (fit on leave-one-out predictions of the reference set; public code),
            ``"none"``, or ``"auto"`` = adapter if given else loo.
        temperature: identity projection only.
        stats: identity projection only: (mean, std) [H] for standardising; pass
            :func:`pool_stats` of the whole dataset once so every round uses the same space.
            Default: :func:`pool_stats` of query + reference embeddings.

    Returns:
        ([Q] float64 calibrated predictions, the :class:`Calibration` used).

    Raises:
        ValueError: unknown ``calibration``, ``"adapter"`` without an adapter, bad shapes.
    """
    mode = ("adapter" if adapter is not None else "loo") if calibration == "auto" else calibration
    if mode not in ("adapter", "loo", "none") or (mode == "adapter" and adapter is None):
        raise ValueError(f"predict_difficulty: calibration={calibration!r} invalid (adapter given: {adapter is not None})")
    d = np.asarray(ref_difficulty, dtype=np.float64).reshape(-1)
    if adapter is None:
        mu, sd = pool_stats(query_emb, ref_emb) if stats is None else stats
        zq, zr, zrq = project(query_emb, None, mean=mu, std=sd), project(ref_emb, None, mean=mu, std=sd), None
        scale = 1.0 / temperature
    else:
        zq, zr = project(query_emb, adapter, "query"), project(ref_emb, adapter, "reference")
        zrq, scale = project(ref_emb, adapter, "query"), 1.0 / math.sqrt(adapter.hidden)
    raw = attention_predict(zq, zr, d, scale=scale).astype(np.float64)
    if mode == "none":
        return raw, Calibration()
    if mode == "adapter":
        cal = adapter.calibration(d)
    else:
        cal = fit_calibration(leave_one_out_predict(zr, d, scale, zrq), d) if d.size >= 3 else Calibration()
    return cal(raw), cal


#: ``dots.selection`` modes of :class:`DotsSelector`.
SELECTIONS = ("per_round", "per_epoch")


def reference_size(ratio: float, every: int, fresh_prompts: int, n: int, ref_samples: int) -> int:
    """K, reference questions per round so that reference rollouts ~ ``ratio`` x fresh training rollouts.

    K = ceil(ratio x every x fresh_prompts x n / ref_samples): a round serves ``every`` (mu)
    steps of ``fresh_prompts`` fresh questions with ``n`` responses each, and each reference
    question costs ``ref_samples`` (G) rollouts. The public DOTS code (ASTRAL-Group/
    data-efficient-llm-rl, ``final_ds_teacher_replay.sh``: 512 questions per step, half
    fresh, mu = 2, n = G = 8, ref_size 256) has ratio 256 x 8 / (2 x 256 x 8) = 0.5:
    ``reference_size(0.5, 2, 256, 8, 8) == 256``.

    Raises:
        ValueError: a non-positive argument.
    """
    if not (ratio > 0 and every >= 1 and fresh_prompts >= 1 and n >= 1 and ref_samples >= 1):
        raise ValueError(f"reference_size: need ratio > 0 and every, fresh_prompts, n, ref_samples >= 1; got "
                         f"{ratio}, {every}, {fresh_prompts}, {n}, {ref_samples}")
    return int(math.ceil(ratio * every * fresh_prompts * n / ref_samples - 1e-9))


class DotsSelector:
    """Samples questions with P(q) ~ exp(-|d_hat_q - target| / tau) without replacement (DOTS paper; PAPERS.md §2).

    Sampling without replacement from that softmax = Gumbel-top-k: keys = logits + Gumbel
    noise, take the n largest (no exp, so tau = 1e-3 is stable), as the public code's
    ``torch.multinomial(softmax, budget, replacement=False)``. ``select`` draws only from
    questions not yet used in the current *pool*. With ``mode="per_round"`` (public code,
    default) :meth:`start_round` (called at every reference round) returns every question to
    the pool, so each round samples from the whole training set and a question repeats only
    across rounds. With ``mode="per_epoch"`` the pool is an *epoch*: every one of the N
    questions is used once before any repeats, and :meth:`start_round` does nothing.

    When fewer than n unused remain, ``select`` takes all r remaining (in key order), refills
    the pool (a new epoch), and draws the other n - r from the questions not just taken; those
    n - r count as used in the new pool (the r do not), so no batch repeats a question. A pool
    that ends exactly is refilled on the next call.
    """

    def __init__(self, num_questions: int, seed: int = 0, mode: str = "per_round"):
        if num_questions < 1:
            raise ValueError(f"DotsSelector: num_questions must be >= 1, got {num_questions}")
        if mode not in SELECTIONS:
            raise ValueError(f"DotsSelector: mode must be one of {SELECTIONS}, got {mode!r}")
        self.num_questions, self.seed, self.mode = int(num_questions), int(seed), mode
        self.used = np.zeros(self.num_questions, dtype=bool)
        self.epoch = 0
        self.rng = np.random.default_rng(seed)

    def start_round(self) -> None:
        """A new reference round: ``per_round`` returns every question to the pool; ``per_epoch`` keeps it."""
        if self.mode == "per_round":
            self.used[:] = False

    def _topk(self, logits: np.ndarray, pool: np.ndarray, k: int) -> np.ndarray:
        keys = logits[pool] + self.rng.gumbel(size=pool.size)
        return pool[np.argsort(-keys, kind="stable")[:k]]

    def select(self, pred_difficulty: Sequence[float], n: int, tau: float = 1e-3, target: float = 0.5) -> np.ndarray:
        """Picks n question indices for the next round.

        Args:
            pred_difficulty: [N] predicted difficulties (N = num_questions).
            n: how many to pick (0 <= n <= N). tau: temperature (> 0). target: preferred difficulty.

        Returns:
            [n] int64 indices, highest key first (the previous epoch's remainder first).

        Raises:
            ValueError: wrong length, NaN, n out of range or tau <= 0.
        """
        d = np.asarray(pred_difficulty, dtype=np.float64).reshape(-1)
        if d.shape[0] != self.num_questions or not np.all(np.isfinite(d)):
            raise ValueError(f"DotsSelector.select: need {self.num_questions} finite predictions, got shape {d.shape}")
        if not 0 <= n <= self.num_questions or tau <= 0:
            raise ValueError(f"DotsSelector.select: need 0 <= n <= {self.num_questions} and tau > 0; got n={n}, tau={tau}")
        logits = -np.abs(d - target) / tau
        if self.used.all():
            self._new_epoch()
        unused = np.flatnonzero(~self.used)
        if unused.size >= n:
            picked = self._topk(logits, unused, n)
            self.used[picked] = True
            return picked.astype(np.int64)
        rest = self._topk(logits, unused, unused.size)
        self._new_epoch()
        pool = np.setdiff1d(np.arange(self.num_questions), rest)
        more = self._topk(logits, pool, n - rest.size)
        self.used[more] = True
        return np.concatenate([rest, more]).astype(np.int64)

    def _new_epoch(self) -> None:
        self.used[:] = False
        self.epoch += 1

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state: used indices of the current pool, epoch number, mode, RNG state."""
        return {"num_questions": self.num_questions, "seed": self.seed, "epoch": self.epoch, "mode": self.mode,
                "used": np.flatnonzero(self.used).tolist(), "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output (the mode stays the constructor's: it is a setting);
        raises ValueError on a different num_questions."""
        if int(state["num_questions"]) != self.num_questions:
            raise ValueError(f"DotsSelector.load_state_dict: state has num_questions={state['num_questions']}, "
                             f"selector has {self.num_questions}")
        self.seed, self.epoch = int(state["seed"]), int(state["epoch"])
        self.used[:] = False
        self.used[np.asarray(state["used"], dtype=np.int64)] = True
        self.rng.bit_generator.state = state["rng"]


# ----------------------------------------------------------------------------- adapter training (offline)

#: Format tag of :func:`save_adapter` files.
ADAPTER_FORMAT = "recipe.dots.adapter/1"

def _batches(groups: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(query rows, rows of their group)] for one epoch, groups with >= 2 questions only."""
    out = []
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        if members.size < 2:
            continue
        perm = rng.permutation(members)
        out += [(perm[lo:lo + batch_size], members) for lo in range(0, perm.size, batch_size)]
    return [out[i] for i in rng.permutation(len(out))]


def _batch_loss(adapter: Adapter, emb: torch.Tensor, diff: torch.Tensor, queries, members, ref_size: int,
                rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ref = rng.choice(members, size=min(ref_size, members.size), replace=False)
    mask = torch.as_tensor(ref[None, :] != queries[:, None])
    pred = adapter(emb[queries], emb[ref], diff[ref], mask)
    return torch.nn.functional.binary_cross_entropy(pred, diff[queries]), pred


def evaluate_adapter(adapter: Adapter, emb, difficulty, groups=None, ref_size: int = 256, seed: int = 0):
    """Mean BCE and Pearson of adapter predictions vs measured difficulty, eval mode, fixed references.

    Args: as :func:`train_adapter`. Returns: (bce, pearson) floats.
    """
    e, d = torch.as_tensor(np.asarray(emb, np.float32)), torch.as_tensor(np.asarray(difficulty, np.float32))
    g = np.zeros(len(d), dtype=np.int64) if groups is None else np.asarray(groups)
    rng, was = np.random.default_rng(seed), adapter.training
    adapter.eval()
    preds, targets, total = [], [], 0.0
    with torch.no_grad():
        for queries, members in _batches(g, 256, rng):
            loss, pred = _batch_loss(adapter, e, d, queries, members, ref_size, rng)
            total += float(loss) * len(queries)
            preds.append(pred.numpy())
            targets.append(d[queries].numpy())
    adapter.train(was)
    n = sum(len(t) for t in targets)
    if n == 0:
        raise ValueError("evaluate_adapter: no group has 2 or more questions")
    return total / n, pearson(np.concatenate(preds), np.concatenate(targets))


def evaluate_heldout(adapter: Adapter | None, emb, difficulty, groups, query_mask, ref_size: int = 256,
                     seed: int = 0, stats=None) -> dict[str, Any]:
    """Held-out prediction quality as a run uses the predictor (DOTS paper's evaluation on unseen questions).

    For each group (one policy: a logged step, checkpoint or seed), up to ``ref_size`` of its
    records whose ``query_mask`` is False are drawn as the reference set (seeded) and every
    record with ``query_mask`` True is predicted from them through :func:`predict_difficulty`
    (the adapter's calibration; without an adapter the identity projection with run-time
    calibration). The references are measured, as in a reference round; the queries are
    questions the adapter was not trained on.

    Args:
        adapter: trained :class:`Adapter`, or None (identity projection: the baseline).
        emb: [M, H] embeddings of the M records. difficulty: [M] measured difficulties.
        groups: [M] group ids. query_mask: [M] bool, True = held-out query.
        ref_size: references per group. seed: reference draws. stats: identity projection
            only, as in :func:`predict_difficulty`.

    Returns:
        {"pearson": pooled Pearson over all queries (NaN if undefined), "pearson_per_group":
        {group: r}, "pearson_group_mean": mean of the defined per-group r (NaN if none),
        "n_queries", "n_groups", "pred", "measured" ([Q] arrays, pooled)}.

    Raises:
        ValueError: shape mismatch, or no group with both >= 2 references and >= 1 query.
    """
    e = np.asarray(emb, np.float32)
    d = np.asarray(difficulty, np.float64).reshape(-1)
    g, q = np.asarray(groups).reshape(-1), np.asarray(query_mask, dtype=bool).reshape(-1)
    if e.ndim != 2 or not (e.shape[0] == d.shape[0] == g.shape[0] == q.shape[0]):
        raise ValueError(f"evaluate_heldout: emb [M, H], difficulty, groups, query_mask [M]; got {e.shape}, "
                         f"{d.shape}, {g.shape}, {q.shape}")
    rng = np.random.default_rng(seed)
    preds, meas, per_group = [], [], {}
    for grp in np.unique(g):
        refs, queries = np.flatnonzero((g == grp) & ~q), np.flatnonzero((g == grp) & q)
        if refs.size < 2 or queries.size == 0:
            continue
        refs = np.sort(rng.choice(refs, size=min(ref_size, refs.size), replace=False))
        pred, _ = predict_difficulty(e[queries], e[refs], d[refs], adapter=adapter, stats=stats)
        preds.append(pred)
        meas.append(d[queries])
        per_group[grp.item() if hasattr(grp, "item") else grp] = pearson(pred, d[queries])
    if not preds:
        raise ValueError("evaluate_heldout: no group has >= 2 reference records and >= 1 held-out query")
    pred_all, meas_all = np.concatenate(preds), np.concatenate(meas)
    defined = [r for r in per_group.values() if np.isfinite(r)]
    return {"pearson": pearson(pred_all, meas_all), "pearson_per_group": per_group,
            "pearson_group_mean": float(np.mean(defined)) if defined else float("nan"),
            "n_queries": int(pred_all.size), "n_groups": len(per_group), "pred": pred_all, "measured": meas_all}


def train_adapter(emb, difficulty, groups=None, epochs: int = 20, lr: float = 1e-3, batch_size: int = 256,
                  ref_size: int = 256, hidden: int = 896, dropout: float = 0.1, weight_decay: float = 0.01,
                  seed: int = 0) -> tuple[Adapter, dict]:
    """Trains an :class:`Adapter` with BCE on logged difficulties (paper: 20 epochs, AdamW lr 1e-3, batch 256).

    Args:
        emb: [M, H] embeddings of the M logged (question, step) records.
        difficulty: [M] measured difficulties in [0, 1].
        groups: [M] group ids (the records' ``step``); None = one group.
        epochs, lr, batch_size, weight_decay: optimiser settings. ref_size: references per batch
            (>= 2). hidden, dropout: adapter size. seed: torch + numpy seed.

    Returns:
        (trained adapter in eval mode, {"epoch_loss": [mean BCE per epoch]}).

    Raises:
        ValueError: shape mismatch, ref_size < 2, or no group with >= 2 questions.
    """
    e, d = np.asarray(emb, np.float32), np.asarray(difficulty, np.float32).reshape(-1)
    g = np.zeros(len(d), dtype=np.int64) if groups is None else np.asarray(groups).reshape(-1)
    if e.ndim != 2 or e.shape[0] != d.shape[0] or g.shape[0] != d.shape[0] or ref_size < 2:
        raise ValueError(f"train_adapter: emb [M, H], difficulty [M], groups [M], ref_size >= 2; got "
                         f"{e.shape}, {d.shape}, {g.shape}, {ref_size}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    adapter = Adapter(e.shape[1], hidden=hidden, dropout=dropout)
    adapter.set_input_stats(e)
    opt = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=weight_decay)
    te, td = torch.from_numpy(e), torch.from_numpy(d)
    history: dict = {"epoch_loss": []}
    adapter.train()
    for epoch in range(epochs):
        batches = _batches(g, batch_size, rng)
        if not batches:
            raise ValueError("train_adapter: no group has 2 or more questions")
        total, count, start = 0.0, 0, time.perf_counter()
        for queries, members in batches:
            loss, _ = _batch_loss(adapter, te, td, queries, members, ref_size, rng)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, count = total + float(loss.detach()) * len(queries), count + len(queries)
        history["epoch_loss"].append(total / count)
        logger.info("dots adapter: epoch %d/%d BCE %.4f (%.1fs)", epoch + 1, epochs, total / count,
                    time.perf_counter() - start)
    adapter.eval()
    return adapter, history


def save_adapter(adapter: Adapter, path, **extra) -> None:
    """Saves {"format", "state_dict", "in_dim", "hidden", "layers", "dropout", **extra} atomically."""
    blob = {"format": ADAPTER_FORMAT, "state_dict": adapter.state_dict(), "in_dim": adapter.in_dim,
            "hidden": adapter.hidden, "layers": adapter.layers, "dropout": adapter.dropout, **extra}
    atomic_torch_save(blob, path)


def load_adapter(path, map_location: str = "cpu") -> Adapter:
    """Loads a :func:`save_adapter` file into an :class:`Adapter` (eval mode).

    Raises:
        FileNotFoundError: missing file. ValueError: not an adapter file, a missing key or
            mismatched weights (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable adapter checkpoint: {err}") from None
    if not isinstance(blob, dict) or blob.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path}: not an adapter checkpoint (format {ADAPTER_FORMAT!r} expected)")
    for key in ("state_dict", "in_dim", "hidden", "layers", "dropout"):
        if key not in blob:
            raise ValueError(f"{path}: adapter checkpoint lacks key {key!r}")
    adapter = Adapter(int(blob["in_dim"]), int(blob["hidden"]), int(blob["layers"]), float(blob["dropout"]))
    try:
        adapter.load_state_dict(blob["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"{path}: adapter weights do not match its sizes: {err}") from None
    return adapter.eval()
