"""Rule-based math reward for verl 0.9.1, graded safely with math-verify in worker processes.

verl loads it through ``reward.custom_reward_function``::

    reward:
      custom_reward_function:
        path: pkg://recipe.reward.math_reward   # a file path works too
        name: compute_score                     # or compute_score_async
        reward_kwargs:
          correct_reward: 1.0                   # Minimalist-RL style {-1, +1}:
          incorrect_reward: 0.0                 #   correct_reward=1.0, incorrect_reward=-1.0

verl (``experimental/reward_loop/reward_manager/naive.py``) calls
``compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=...,
**reward_kwargs)`` from a thread-pool executor inside a Ray actor (or awaits it directly when
it is a coroutine function). Every key of the returned dict becomes a per-sample
``reward_extra_info`` entry: numeric entries are averaged into validation metrics
(``val-core/<data_source>/acc/mean@N`` uses ``acc``), string entries are skipped by
``process_validation_metrics`` except ``pred``, which verl uses for majority voting
(``maj@N``). Every call returns the same keys, as verl stacks them into arrays.

Sources:
    * Verification: math-verify (Hugging Face), https://github.com/huggingface/Math-Verify.
    * {-1, +1} rewards: Xiong et al., "A Minimalist Approach to LLM Reasoning: from Rejection
      Sampling to Reinforce", arXiv:2504.11343 (2025).
"""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path
from typing import Any

try:
    from recipe.reward.golds import normalise_gold
    from recipe.reward.grader import GradeOptions, GradeResult, GraderConfig, SafeGrader, get_grader
except ImportError:  # loaded by file path with the repository root not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from recipe.reward.golds import normalise_gold
    from recipe.reward.grader import GradeOptions, GradeResult, GraderConfig, SafeGrader, get_grader

logger = logging.getLogger(__name__)

__all__ = [
    "GSM8K_SOURCES",
    "answer_style",
    "compute_score",
    "compute_score_async",
    "grade_options",
    "gold_tolerance",
    "score_from_result",
]

#: ``data_source`` values graded GSM8K-style (numeric answer after ``####`` or in a box).
GSM8K_SOURCES = frozenset({"gsm8k", "openai/gsm8k"})

#: Grader options accepted as ``compute_score`` keyword arguments (see GraderConfig).
_GRADER_KEYS = frozenset(GraderConfig.__dataclass_fields__)

#: Keyword arguments verl may pass that this function does not use.
_IGNORED_KEYS = frozenset({"reward_router_address", "reward_model_tokenizer"})

_warned_unknown: set[str] = set()


def answer_style(data_source: Any) -> str:
    """Return the grading style for a ``data_source``: ``"gsm8k"`` or ``"boxed"``."""
    return "gsm8k" if str(data_source) in GSM8K_SOURCES else "boxed"


def _split_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    grader_cfg = {}
    for key, value in kwargs.items():
        if key in _GRADER_KEYS:
            grader_cfg[key] = value
        elif key not in _IGNORED_KEYS and key not in _warned_unknown:
            _warned_unknown.add(key)
            logger.warning("compute_score: ignoring unknown keyword argument %r", key)
    return grader_cfg


def _golds(ground_truth: Any) -> list[str]:
    if isinstance(ground_truth, (list, tuple)) or type(ground_truth).__name__ == "ndarray":
        golds = [str(g) for g in ground_truth if g is not None and str(g).strip()]
        return golds or [""]
    return [str(ground_truth)]


def _combine(results: list[GradeResult]) -> GradeResult:
    """Several acceptable gold answers: correct if any matches."""
    for res in results:
        if res.correct:
            return res
    order = ("ok", "no_answer", "rejected", "timeout", "error")
    return min(results, key=lambda r: order.index(r.status) if r.status in order else len(order))


def score_from_result(
    res: GradeResult,
    *,
    correct_reward: float = 1.0,
    incorrect_reward: float = 0.0,
    format_reward: float = 0.0,
    format_penalty: float = 0.0,
    pred_max_chars: int = 100,
) -> dict[str, Any]:
    """Turn a :class:`GradeResult` into verl's reward dict (see :func:`compute_score`)."""
    has_answer = res.status != "no_answer"
    score = float(correct_reward if res.correct else incorrect_reward)
    if has_answer and res.status != "rejected":
        score += float(format_reward)
    elif not has_answer:
        score -= float(format_penalty)
    pred = (res.pred or "").strip()
    return {
        "score": score,
        "acc": 1.0 if res.correct else 0.0,
        "has_answer": int(has_answer),
        "grader_timeout": int(res.status == "timeout"),
        "grader_error": int(res.status == "error"),
        "grader_rejected": int(res.status == "rejected"),
        "pred": pred[:pred_max_chars],
    }


def gold_tolerance(extra_info: Any) -> float | None:
    """The gold's absolute numeric tolerance: ``extra_info["error"]`` (OlympiadBench, e.g. ``"1e-1"``).

    Returns:
        The tolerance as a float, or None when there is none (missing, null, empty) or it
        is not a non-negative number (logged once).
    """
    if not isinstance(extra_info, dict):
        try:
            extra_info = dict(extra_info) if extra_info is not None else None
        except (TypeError, ValueError):
            return None
    err = (extra_info or {}).get("error")
    if err is None or (isinstance(err, str) and not err.strip()):
        return None
    try:
        tol = float(err)
    except (TypeError, ValueError):
        tol = -1.0
    if not tol >= 0 or math.isinf(tol):
        key = f"error={err!r}"
        if key not in _warned_unknown:
            _warned_unknown.add(key)
            logger.warning("compute_score: ignoring extra_info error %r (not a non-negative number)", err)
        return None
    return tol


def grade_options(grading_mode: str, extra_info: Any) -> GradeOptions:
    """:class:`GradeOptions` of one call: the mode and the gold's tolerance (:func:`gold_tolerance`).

    Raises:
        ValueError: Unknown grading mode.
    """
    return GradeOptions(mode=str(grading_mode), abs_tol=gold_tolerance(extra_info))


def _prepare_call(
    data_source: Any, ground_truth: Any, reward_kwargs: dict[str, Any]
) -> tuple[SafeGrader, str, list[str]]:
    grader = get_grader(**_split_kwargs(reward_kwargs))
    # files prepared before the gold normalisation (issue 16) still grade right; idempotent
    golds = [normalise_gold(g, str(data_source)) for g in _golds(ground_truth)]
    return grader, answer_style(data_source), golds


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict | None = None,
    correct_reward: float = 1.0,
    incorrect_reward: float = 0.0,
    format_reward: float = 0.0,
    format_penalty: float = 0.0,
    pred_max_chars: int = 100,
    grading_mode: str = "strict",
    **reward_kwargs: Any,
) -> dict[str, Any]:
    """Score one response with a rule-based math reward (verl ``custom_reward_function``).

    The final answer is the last ``\\boxed{}`` of the response (GSM8K: the last box, else the
    number after the last ``####``). It is compared with the gold answer by math-verify
    (``verify(gold, pred)``, gold first) in a sandboxed worker process pool
    (:class:`recipe.reward.grader.SafeGrader`); GSM8K plain numbers are compared numerically
    (``"1,000" == "1000"``, ``"72.0" == "72"``). A hostile or pathological answer scores as
    incorrect (never hangs the caller beyond the hard timeout). Safe to call from any thread.

    Rewards follow the binary correctness reward of math-verify-based RL recipes: ``{0, 1}``
    by default, or ``{-1, +1}`` as in the Minimalist RL paper (arXiv:2504.11343) with
    ``incorrect_reward=-1.0``.

    Args:
        data_source: Dataset name; ``"gsm8k"`` (or ``"openai/gsm8k"``) selects GSM8K-style
            extraction, anything else ``\\boxed{}`` extraction.
        solution_str: The decoded model response (untrusted).
        ground_truth: The reference answer (LaTeX or number), or a list of acceptable ones.
        extra_info: The row's ``extra_info``; its ``error`` (OlympiadBench's numeric
            tolerance, e.g. ``"1e-1"``) is honoured in both grading modes (a numeric answer
            within ``error * 1.01`` of the gold is correct, :class:`GradeOptions`).
        correct_reward: Score of a correct answer.
        incorrect_reward: Score of an incorrect, missing, rejected or timed-out answer.
        format_reward: Optional format bonus, off by default: added when the response has an
            extractable final answer (a box, or ``####`` for GSM8K) that passed the
            pre-parse caps, whether right or wrong.
        format_penalty: Optional, off by default: subtracted when no final answer can be
            extracted.
        pred_max_chars: Truncation of the ``pred`` string reported back to verl.
        grading_mode: ``"strict"`` (default, the training reward) or ``"harness"`` (the
            Qwen2.5-Math evaluation harness's extraction fallbacks, percent handling,
            relative 1e-4 numeric tolerance and ordered lists; see
            :class:`recipe.reward.grader.GradeOptions`).
        **reward_kwargs: Grader options (fields of
            :class:`recipe.reward.grader.GraderConfig`): ``num_workers`` (2),
            ``soft_timeout_s`` (3), ``hard_timeout_s`` (None: 2*soft+2), ``memory_limit_mb``
            (3072), ``max_boxed_chars`` (1000), ``max_unboxed_chars`` (3000),
            ``max_nesting_depth`` (10), ``max_exponent_digits`` (4), ``max_factorial_digits``
            (4), ``fallback_unboxed`` (False), ``gold_cache_size`` (1024),
            ``max_tasks_per_worker`` (0), ``start_method`` ("forkserver"). The pool is a
            per-process singleton per configuration. Unknown keys are ignored with a warning.

    Returns:
        ``{"score": float, "acc": 1.0|0.0, "has_answer": 0|1, "grader_timeout": 0|1,
        "grader_error": 0|1, "grader_rejected": 0|1, "pred": str}``; ``acc`` is 1.0 iff the
        answer is correct, independently of the reward range.
    """
    options = grade_options(grading_mode, extra_info)
    grader, style, golds = _prepare_call(data_source, ground_truth, reward_kwargs)
    results = grader.grade_batch([(solution_str, g, style, options) for g in golds])
    return score_from_result(
        _combine(results),
        correct_reward=correct_reward,
        incorrect_reward=incorrect_reward,
        format_reward=format_reward,
        format_penalty=format_penalty,
        pred_max_chars=pred_max_chars,
    )


async def compute_score_async(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict | None = None,
    correct_reward: float = 1.0,
    incorrect_reward: float = 0.0,
    format_reward: float = 0.0,
    format_penalty: float = 0.0,
    pred_max_chars: int = 100,
    grading_mode: str = "strict",
    **reward_kwargs: Any,
) -> dict[str, Any]:
    """Coroutine variant of :func:`compute_score` (same arguments and result).

    verl awaits coroutine reward functions on the reward loop's event loop instead of using
    a thread; the grading still happens in worker processes and the loop is never blocked
    (apart from the first call, which starts the pool).
    """
    options = grade_options(grading_mode, extra_info)
    grader, style, golds = _prepare_call(data_source, ground_truth, reward_kwargs)
    results = await grader.grade_batch_async([(solution_str, g, style, options) for g in golds])
    return score_from_result(
        _combine(results),
        correct_reward=correct_reward,
        incorrect_reward=incorrect_reward,
        format_reward=format_reward,
        format_penalty=format_penalty,
        pred_max_chars=pred_max_chars,
    )
