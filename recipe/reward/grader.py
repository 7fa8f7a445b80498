"""Safe grading of untrusted model answers with math-verify in a pool of worker processes.

Model outputs are untrusted input. Parsing them with `math-verify
<https://github.com/huggingface/Math-Verify>`_ (sympy + latex2sympy2) can run for minutes in
uninterruptible C code (E-notation numbers, power towers), allocate many gigabytes
(``\\operatorname{zeros}(20000,20000)``) or backtrack in regexes. See
``docs/GRADING_SECURITY.md`` in the shared docs for the measured threat model. The design here
follows the one that held up there:

* **Before parsing** (in the calling process, pure string code, linear time): only the last
  ``\\boxed{...}`` / ``\\fbox{...}`` is graded (found by
  :func:`recipe.reward.answers.find_last_box`, the same extractor that
  :mod:`recipe.data` uses for gold answers; an unclosed last box is no answer); its content is
  rejected when longer than ``max_boxed_chars``, nested deeper than ``max_nesting_depth``,
  containing an exponent (or a power tower, or E-notation) worth more than
  ``max_exponent_digits`` digits, or a factorial of a number with more than
  ``max_factorial_digits`` digits. A rejected answer scores wrong (status ``rejected``).
* **Worker processes** (``pebble.ProcessPool`` on a ``forkserver`` context that preloads
  math-verify; never a plain ``fork`` of a threaded process): each worker sets
  ``RLIMIT_AS`` (memory) and ``RLIMIT_CORE = 0``, silences math-verify's loggers (they log the
  whole untrusted text on timeout), keeps math-verify's own ``signal.alarm`` timeouts as a soft
  limit (they work on the worker's main thread) and caches parsed gold answers (LRU).
* **In the calling process**: a hard wall-clock limit per item; on expiry pebble kills the
  worker (SIGTERM with the default disposition, so even C code stops at once) and starts a
  replacement; the item scores 0 with status ``timeout``. A worker that dies (crash, OOM
  kill) gives status ``error``. The caller never runs math-verify itself, so the pool can be
  used from any thread and from asyncio.

Grading modes (:class:`GradeOptions`, per item): ``strict`` (the default and the training
reward: the rules above, math-verify equality, numbers equal up to float rounding) and
``harness`` (the Qwen2.5-Math evaluation harness's extraction fallbacks, percent handling,
relative 1e-4 numeric tolerance and ordered comma lists); a gold's absolute tolerance
(OlympiadBench's ``error``) is honoured in both.

Public API: :func:`last_boxed` (re-exported from :mod:`recipe.reward.answers`),
:func:`gsm8k_answer`, :func:`extract_answer`, :class:`GradeResult`, :class:`GraderConfig`,
:class:`SafeGrader`, :func:`get_grader`, :func:`close_all_graders`, :class:`GradeOptions`,
:func:`harness_clean`, :func:`numbers_close`, :func:`split_top_level_commas`.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import logging
import math
import multiprocessing
import multiprocessing.context
import multiprocessing.popen_forkserver
import os
import re
import sys
import threading
import time
import weakref
from concurrent.futures import CancelledError, Future
from concurrent.futures import TimeoutError as FuturesTimeoutError
from decimal import Decimal, InvalidOperation
from typing import Any, Iterable, Sequence

from recipe.reward.answers import TOO_LONG, find_last_box, harness_answer, last_boxed

logger = logging.getLogger(__name__)

__all__ = [
    "check_caps",
    "GRADING_MODES",
    "GradeOptions",
    "GradeResult",
    "GraderConfig",
    "harness_clean",
    "numbers_close",
    "split_top_level_commas",
    "SafeGrader",
    "STATUSES",
    "close_all_graders",
    "extract_answer",
    "get_grader",
    "gsm8k_answer",
    "last_boxed",
]

#: Every value :attr:`GradeResult.status` can take.
STATUSES: tuple[str, ...] = ("ok", "no_answer", "rejected", "timeout", "error")

_STYLES = ("boxed", "gsm8k")

#: Grading modes: ``strict`` (the training reward's default) and ``harness`` (the
#: Qwen2.5-Math evaluation harness's conventions); see :class:`GradeOptions`.
GRADING_MODES: tuple[str, ...] = ("strict", "harness")

#: Relative tolerance of the strict mode's numeric comparison: only float rounding
#: (``1.1 \times 10^{2}`` is 110.00000000000001 in binary floating point).
STRICT_REL_TOL = 1e-9
#: Relative tolerance of the harness mode (Qwen2.5-Math ``grader.numeric_equal``).
HARNESS_REL_TOL = 1e-4


@dataclasses.dataclass(frozen=True)
class GradeOptions:
    """How one answer is extracted and compared (per item, not per pool).

    Attributes:
        mode: ``"strict"`` (default; the training reward): only the last ``\\boxed{}``
            (GSM8K: or the number after ``####``), math-verify equality (comma lists as
            sets), numbers equal up to float rounding (relative 1e-9). ``"harness"`` (the
            Qwen2.5-Math evaluation harness, QwenLM/Qwen2.5-Math ``evaluation/``): the
            answer from :func:`recipe.reward.answers.harness_answer` (last box, else "the
            answer is", else the last number); percent signs, ``\\$``, degree signs and
            a short ``x =`` prefix removed from both sides (``strip_string``); plain numbers
            equal within a relative 1e-4 of the gold, the gold / 100 or the gold x 100
            (``math_equal(include_percentage=True)``); comma lists compared element by
            element in order; other answers by math-verify, then numerically (relative 1e-4).
        abs_tol: Absolute numeric tolerance of this gold (OlympiadBench's ``error``), in
            both modes: numeric answers within ``abs_tol * 1.01`` of the gold are correct
            (OlympiadBench's ``judge.py`` compares ``abs(gold - pred) <= error * 1.01``;
            in harness mode also against gold / 100 and gold x 100, as OlympiadBench's
            ``include_percentage``). None: no tolerance.

    Raises:
        ValueError: Unknown mode, or a negative tolerance.
    """

    mode: str = "strict"
    abs_tol: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in GRADING_MODES:
            raise ValueError(f"unknown grading mode {self.mode!r}; expected one of {GRADING_MODES}")
        if self.abs_tol is not None and not (float(self.abs_tol) >= 0):
            raise ValueError(f"abs_tol must be >= 0, got {self.abs_tol!r}")


_DEFAULT_OPTIONS = GradeOptions()

_HARNESS_STRIP_RE = re.compile(r"\\%|%|\\\$|\^\s*\{?\s*\\circ\s*\}?|\\!|\\left|\\right")
_HARNESS_PREFIX_RE = re.compile(r"^\s*[A-Za-z](?:_\{?\w\}?)?\s*=\s*(?!=)")
_PERCENT_RE = re.compile(r"\\%|%")
_THOUSANDS_NUMBER_RE = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+")


def harness_clean(answer: str) -> str:
    """The part of Qwen2.5-Math's ``strip_string`` that changes what is graded.

    Removes ``\\%`` / ``%``, ``\\$``, degree signs (``^\\circ``, ``^{\\circ}``),
    ``\\!``, ``\\left`` / ``\\right`` and a one-letter ``x =`` prefix; ``\\dfrac`` /
    ``\\tfrac`` become ``\\frac``. ``"10\\%"`` -> ``"10"``, ``"x = 5"`` -> ``"5"``.
    """
    s = _HARNESS_STRIP_RE.sub("", answer)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = _HARNESS_PREFIX_RE.sub("", s, count=1)
    return s.strip()


def _harness_number(s: str) -> float | None:
    """A plain number (thousands commas allowed: ``1,000``; ``5,1`` is not one), else None."""
    t = s.strip()
    if not t or len(t) > 200 or not _THOUSANDS_NUMBER_RE.fullmatch(t):
        return None
    try:
        return float(t.replace(",", ""))
    except ValueError:
        return None


def numbers_close(gold: float, pred: float, options: GradeOptions) -> bool:
    """Numeric comparison of a numeric gold and answer under ``options`` (see GradeOptions).

    Returns True when ``pred`` is within the mode's relative tolerance of the gold (harness:
    also of gold / 100 or gold x 100), or within ``abs_tol * 1.01`` of it.
    """
    targets = [gold] if options.mode == "strict" else [gold, gold / 100.0, gold * 100.0]
    rel = STRICT_REL_TOL if options.mode == "strict" else HARNESS_REL_TOL
    for t in targets:
        if math.isclose(t, pred, rel_tol=rel, abs_tol=0.0):
            return True
        if options.abs_tol is not None and abs(t - pred) <= float(options.abs_tol) * 1.01:
            return True
    return False


def split_top_level_commas(s: str) -> list[str]:
    """``"1, (2,3), \\{4,5\\}"`` -> ``["1", "(2,3)", "\\{4,5\\}"]``: commas outside brackets."""
    parts, depth, cur = [], 0, []
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s):
            cur.append(s[i : i + 2])
            if s[i + 1] in "{[(":
                depth += 1
            elif s[i + 1] in "}])":
                depth -= 1
            i += 2
            continue
        if c in "{[(":
            depth += 1
        elif c in "}])":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
        else:
            cur.append(c)
        i += 1
    parts.append("".join(cur).strip())
    return parts

# ---------------------------------------------------------------------------------------
# Answer extraction (pure functions, run in the calling process)
# ---------------------------------------------------------------------------------------

_GSM8K_NUMBER_RE = re.compile(r"\s*(?:\\\$|\$)?\s*(-?\s*[0-9][0-9,]*(?:\.[0-9]+)?|-?\s*\.[0-9]+)")


def gsm8k_answer(text: str | None) -> str | None:
    """Return the number after the last ``####`` in ``text`` with commas removed.

    Args:
        text: Model response or GSM8K reference solution.

    Returns:
        The number as a string (e.g. ``"1000"`` for ``"#### 1,000"``, ``"-3.5"`` for
        ``"#### $-3.5"``), or ``None`` when there is no ``####`` followed by a number.
    """
    if not text:
        return None
    i = text.rfind("####")
    if i < 0:
        return None
    m = _GSM8K_NUMBER_RE.match(text, i + 4, min(len(text), i + 4 + 200))
    if m is None:
        return None
    num = m.group(1).replace(",", "").replace(" ", "")
    return num or None


def extract_answer(text: str | None, style: str = "boxed") -> str | None:
    """Extract the final answer of a response.

    Args:
        text: Model response.
        style: ``"boxed"``: the last ``\\boxed{}`` content. ``"gsm8k"``: the last
            ``\\boxed{}`` content if there is one, else the number after the last ``####``.

    Returns:
        The extracted answer, or ``None`` when none is found.

    Raises:
        ValueError: On an unknown style.
    """
    if style not in _STYLES:
        raise ValueError(f"unknown answer style {style!r}; expected one of {_STYLES}")
    boxed = last_boxed(text)
    if boxed is not None or style == "boxed":
        return boxed
    return gsm8k_answer(text)


# ---------------------------------------------------------------------------------------
# Pre-parse caps (cheap, linear-time string checks)
# ---------------------------------------------------------------------------------------

_BRACKET_RE = re.compile(r"[()\[\]{}]")
_POWER_RE = re.compile(r"\^|\*\*")
_ENOTATION_RE = re.compile(r"[0-9.]\s*[eE]\s*[+-]?\s*([0-9]+)")
_FACTORIAL_RE = re.compile(r"(?<![0-9,])([0-9][0-9,]*)\s*!")
_NUMBER_RE = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_POWER_AFTER_NUMBER_RE = re.compile(r"[0-9]+(?:\.[0-9]*)?(\^|\*\*)")
_SPACING_RE = re.compile(r"\\[,!;: ]|\\left|\\right|\s")
_GROUP_TOKEN_RE = re.compile(r"\\.|[{}()]", re.DOTALL)
_BARE_EXPONENT_RE = re.compile(r"[+-]?[0-9.]+(?:(?:\^|\*\*)[+-]?[0-9.]+)*")
_MAX_TOWER_LEVELS = 50


def _max_nesting_depth(s: str) -> int:
    depth = best = 0
    for m in _BRACKET_RE.finditer(s):
        if m.group() in "([{":
            depth += 1
            if depth > best:
                best = depth
        elif depth > 0:
            depth -= 1
    return best


def _group_ends(s: str) -> dict[int, int]:
    """Map the index of every ``{`` / ``(`` to the index of its closing partner (one linear
    pass; escaped braces ignored; unclosed groups map to ``len(s)``)."""
    ends: dict[int, int] = {}
    stacks: dict[str, list[int]] = {"{": [], "(": []}
    closers = {"}": "{", ")": "("}
    for m in _GROUP_TOKEN_RE.finditer(s):
        tok = m.group()
        if tok in stacks:
            stacks[tok].append(m.start())
        elif tok in closers and stacks[closers[tok]]:
            ends[stacks[closers[tok]].pop()] = m.start()
    for stack in stacks.values():
        for start in stack:
            ends[start] = len(s)
    return ends


def _number_log10(s: str, i: int, j: int) -> float:
    int_part = s[i:j].split(".", 1)[0].lstrip("0")
    if not int_part:
        return 0.0
    if len(int_part) > 15:
        return float(len(int_part) - 1)
    return math.log10(int(int_part))


class _TowerEstimator:
    """log10 of the value of purely numeric exponents (``2008``, ``9^{9^{9}}``, ``9**9**9``)
    in a string without spacing; ``None`` for anything else. Memoized on index ranges, so all
    exponents of a string are estimated in near-linear time."""

    def __init__(self, s: str) -> None:
        self.s = s
        self.ends = _group_ends(s)
        self.memo: dict[tuple[int, int], float | None] = {}

    def exponent_range(self, j: int) -> tuple[int, int]:
        """The argument of the ``^``/``**`` ending at ``j``, as an index range."""
        s, n = self.s, len(self.s)
        if j >= n:
            return j, j
        if s[j] in "{(":
            return j + 1, self.ends.get(j, n)
        m = _BARE_EXPONENT_RE.match(s, j)
        return (j, m.end()) if m is not None else (j, j + 1)

    def log10(self, i: int, j: int, level: int = 0) -> float | None:
        key = (i, j)
        if key in self.memo:
            return self.memo[key]
        s = self.s
        while i < j and s[i] in "{(" and self.ends.get(i) == j - 1:  # outer group
            i, j = i + 1, j - 1
        while i < j and s[i] in "+-":
            i += 1
        if i >= j:
            res: float | None = None
        elif _NUMBER_RE.fullmatch(s, i, j):
            res = _number_log10(s, i, j)
        elif level >= _MAX_TOWER_LEVELS:
            res = math.inf
        else:
            m = _POWER_AFTER_NUMBER_RE.match(s, i, j)
            res = None
            if m is not None:
                inner = self.log10(*self.exponent_range(m.end()), level + 1) if m.end() < j else None
                if inner is not None:
                    base = _number_log10(s, i, m.start(1))
                    res = math.inf if inner > 300 else (10.0**inner) * base if base > 0 else 0.0
        self.memo[key] = res
        return res


def check_caps(
    answer: str,
    *,
    max_chars: int | None,
    max_nesting_depth: int | None,
    max_exponent_digits: int | None,
    max_factorial_digits: int | None,
) -> str | None:
    """Return why ``answer`` must be rejected before parsing, or ``None`` if it may be parsed.

    All checks are linear (or close to it) in ``len(answer)``. ``None`` disables a check.

    Args:
        answer: The extracted answer (box content, or the unboxed tail of a response).
        max_chars: Maximum length.
        max_nesting_depth: Maximum depth of ``( [ {`` brackets.
        max_exponent_digits: Maximum number of digits of any numeric exponent, including the
            value of numeric power towers (``9^{9^{9}}``) and E-notation (``1E1000000``).
        max_factorial_digits: Maximum number of digits of a number followed by ``!``.

    Returns:
        A short reason string (``"too_long"``, ``"too_deep"``, ``"huge_exponent"``,
        ``"huge_enotation"``, ``"huge_factorial"``) or ``None``.
    """
    if max_chars is not None and len(answer) > max_chars:
        return "too_long"
    if max_nesting_depth is not None and _max_nesting_depth(answer) > max_nesting_depth:
        return "too_deep"
    if max_exponent_digits is not None:
        for m in _ENOTATION_RE.finditer(answer):
            if len(m.group(1).lstrip("0")) > max_exponent_digits:
                return "huge_enotation"
        if _POWER_RE.search(answer):
            est = _TowerEstimator(_SPACING_RE.sub("", answer))
            for m in _POWER_RE.finditer(est.s):
                log10 = est.log10(*est.exponent_range(m.end()))
                if log10 is not None and log10 >= max_exponent_digits:
                    return "huge_exponent"
    if max_factorial_digits is not None:
        for m in _FACTORIAL_RE.finditer(answer):
            start = m.start()
            if start > 0 and answer[start - 1] == "\\":
                continue
            if len(m.group(1).replace(",", "").lstrip("0")) > max_factorial_digits:
                return "huge_factorial"
    return None


# GSM8K numeric comparison in the caller (no sympy involved).
_GSM8K_STRIP_RE = re.compile(
    r"\\text\{\s*\}|\\\$|\$|\\%|%|\\!|\\,|\\;|\\:|\\ |,|\s|\\mathrm\{\s*\}|^\\left|\\right$"
)
_PLAIN_DECIMAL_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)")


def _plain_number(s: str) -> Decimal | None:
    """Parse a plain decimal (commas, ``$``, ``%`` and spaces ignored); None if not one."""
    t = _GSM8K_STRIP_RE.sub("", s)
    t = t.rstrip(".")
    if not t or len(t) > 200 or not _PLAIN_DECIMAL_RE.fullmatch(t):
        return None
    try:
        return Decimal(t)
    except (InvalidOperation, ValueError):
        return None


# ---------------------------------------------------------------------------------------
# Worker side (runs only inside pool worker processes)
# ---------------------------------------------------------------------------------------


class _MathVerifyLogFlag(logging.Handler):
    """Swallows math-verify log records (never printing the untrusted text) but notes
    soft timeouts and MemoryErrors reported through them."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.timeout = False
        self.memory_error = False

    def reset(self) -> None:
        self.timeout = False
        self.memory_error = False

    def emit(self, record: logging.LogRecord) -> None:  # noqa: D102
        msg = record.msg if isinstance(record.msg, str) else ""
        if msg.startswith("Timeout"):
            self.timeout = True
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, MemoryError):
            self.memory_error = True

    def handle(self, record: logging.LogRecord) -> bool:  # no lock/format needed
        self.emit(record)
        return True


_WORKER: dict[str, Any] = {}

#: Typical answer shapes parsed once before grading. math-verify's LaTeX parser (ANTLR)
#: caches its prediction automaton as it meets new constructs, so a cold process grades
#: MATH answers ~1.7x slower than a warm one. The forkserver parses these once (its workers are
#: forked warm); with "spawn" each worker does it in its initializer.
_WARMUP_ANSWERS: tuple[str, ...] = (
    "42", "-7", "3.14", "0.5", r"\frac{1}{2}", r"-\frac{3}{4}", r"\dfrac{5}{6}", r"\tfrac12",
    r"\sqrt{2}", r"2\sqrt{3}", r"\frac{\sqrt{3}}{2}", r"\sqrt[3]{5}", r"\pi", r"2\pi",
    r"\frac{\pi}{4}", r"90^\circ", r"45^{\circ}", r"25\%", r"\text{(C)}", r"\textbf{(A)}",
    r"\text{Monday}", r"\mbox{ inches}^2", r"[1, 2)", r"(-\infty, 3]", r"(0, \infty)",
    r"[-1, 1] \cup [2, 3]", r"\left( 3, \frac{\pi}{2} \right)", r"\left[ -1, \frac{1}{\sqrt{2}} \right)",
    r"\{1, 2, 3\}", r"\emptyset", r"(2, -3)", r"1, 2, 3",
    r"\begin{pmatrix} 1 \\ -2 \end{pmatrix}", r"\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}",
    r"x^2 + 2x + 1", r"(x+1)^2", r"3x^3 - 2x + 5", r"y = 2x + 3", r"x \le 3", r"x > -1",
    r"3 + 4i", r"-1 - i\sqrt{3}", r"\log_2 8", r"\ln 2", r"\sin x", r"\cos^2 \theta",
    r"\tan 30^\circ", r"e^{2}", r"e^{-x}", r"2^{10}", r"10^{-3}", r"1.5 \times 10^{3}",
    r"\binom{10}{3}", r"5!", r"\pm 2", r"\infty", r"\$18.90", r"10,\!080", r"1011_2",
    r"\overline{AB}", r"3:4", r"2\frac{1}{2}", r"a = 1", r"x = 5", r"\frac{a+b}{c}",
    r"\frac{x^2 - 1}{x + 1}", r"\sqrt{x^2 + y^2}", r"|x - 1|", r"\lfloor x \rfloor",
    r"\frac{1}{\sqrt{2}}", r"4\sqrt{2} - 1", r"\frac{7}{25}", r"-\frac{\sqrt{5}}{5}",
    r"\sum_{k=1}^{n} k", r"\int_0^1 x \, dx", r"f(x) = x^2", r"\dfrac{9\pi}{2}", r"0.\overline{3}",
)

_WARMED = False


def _warm_up_math_verify() -> None:
    """Parse and verify :data:`_WARMUP_ANSWERS` once in this process (never in callers)."""
    global _WARMED
    if _WARMED:
        return
    _WARMED = True
    try:
        from math_verify import parse, verify

        for ans in _WARMUP_ANSWERS:
            gold = parse(_wrap_gold(ans))
            pred = parse(f"\\boxed{{{ans}}}")
            verify(gold, pred)
    except BaseException:  # noqa: BLE001 - warm-up is best effort
        pass


def _imported_by_forkserver() -> bool:
    """Whether this module is being preloaded by a multiprocessing forkserver."""
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if code.co_name == "main" and code.co_filename.replace("\\", "/").endswith(
            "multiprocessing/forkserver.py"
        ):
            return True
        frame = frame.f_back
    return False


def _wrap_gold(gold: str) -> str:
    g = gold.strip()
    if "\\boxed" in g or (g.startswith("$") and g.endswith("$") and len(g) > 1):
        return g
    return f"${g}$"


def _worker_init(memory_limit_mb: int | None, gold_cache_size: int) -> None:
    """Pool worker initializer: limits, quiet loggers, math-verify import, gold cache."""
    import functools
    import resource
    import signal
    import warnings

    # pebble installs a Python-level SIGTERM handler, which cannot run while the worker is
    # stuck in C code; the default disposition kills at once when the parent stops a worker.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (ValueError, OSError):
        pass
    if memory_limit_mb:
        limit = int(memory_limit_mb) * 1024 * 1024
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    warnings.filterwarnings("ignore")

    flag = _MathVerifyLogFlag()
    for name in ("math_verify", "latex2sympy2_extended", "latex2sympy2"):
        lg = logging.getLogger(name)
        lg.handlers = [flag] if name == "math_verify" else []
        lg.propagate = False
        lg.setLevel(logging.DEBUG if name == "math_verify" else logging.CRITICAL + 1)
        lg.disabled = name != "math_verify"

    from math_verify import parse

    def _parse_gold(gold: str, soft: int) -> list:
        res = parse(_wrap_gold(gold), parsing_timeout=soft)
        if not res and "\\boxed" not in gold:
            res = parse(f"\\boxed{{{gold.strip()}}}", parsing_timeout=soft)
        return res

    _WORKER["flag"] = flag
    _WORKER["parse_gold"] = functools.lru_cache(maxsize=max(0, int(gold_cache_size)))(_parse_gold)
    _warm_up_math_verify()  # no-op when forked from the (already warm) forkserver


def _numeric_value(expr: Any) -> float | None:
    """A real number for a closed sympy expression (no free symbols), else None (worker side)."""
    try:
        import sympy

        if not isinstance(expr, sympy.Expr) or expr.free_symbols:
            return None
        v = complex(sympy.N(expr, 20))
    except Exception:  # noqa: BLE001 - not a number
        return None
    if v.imag != 0 or not math.isfinite(v.real):
        return None
    return v.real


def _worker_equal(gold: str, pred_text: str, soft_timeout_s: int, options: "GradeOptions") -> bool:
    """math-verify equality, then the numeric comparison of :func:`numbers_close` (worker side).

    Raises:
        math-verify's TimeoutException, MemoryError or parser errors (handled by the caller).
    """
    from math_verify import parse, verify

    gold_parsed = _WORKER["parse_gold"](gold, soft_timeout_s)
    if not gold_parsed:
        raise _BadGold(gold)
    pred_parsed = parse(pred_text, parsing_timeout=soft_timeout_s, raise_on_error=True)
    if not pred_parsed:
        return False
    if verify(gold_parsed, pred_parsed, timeout_seconds=soft_timeout_s):
        return True
    g, p = _numeric_value(gold_parsed[0]), _numeric_value(pred_parsed[0])
    return g is not None and p is not None and numbers_close(g, p, options)


class _BadGold(Exception):
    """The gold answer does not parse (status ``error``)."""


def _worker_grade(
    pred_text: str, gold: str, soft_timeout_s: int, options: "GradeOptions | None" = None,
    pairs: "list[tuple[str, str]] | None" = None,
) -> tuple[bool, str]:
    """Grade one (already extracted and capped) answer in a worker. Returns (correct, status).

    ``pairs`` (harness mode, comma lists): ``[(pred_part, gold_part)]`` compared in order;
    correct iff every pair is (each by number, else math-verify, else numerically).
    """
    from math_verify.errors import TimeoutException

    if not _WORKER:  # initializer not run (should not happen): keep limits anyway
        _worker_init(None, 1024)
    options = options or _DEFAULT_OPTIONS
    flag: _MathVerifyLogFlag = _WORKER["flag"]
    flag.reset()
    try:
        if pairs:
            correct = True
            for pp, gp in pairs:
                pn, gn = _harness_number(pp), _harness_number(gp)
                if pn is not None and gn is not None:
                    ok = numbers_close(gn, pn, options)
                else:
                    ok = _worker_equal(gp, f"\\boxed{{{pp}}}", soft_timeout_s, options)
                if not ok:
                    correct = False
                    break
        else:
            correct = _worker_equal(gold, pred_text, soft_timeout_s, options)
    except TimeoutException:
        return False, "timeout"
    except MemoryError:
        return False, "error"
    except _BadGold:
        return False, "error"
    except Exception:  # noqa: BLE001 - any parser failure scores 0
        return False, "error"
    if correct:
        return True, "ok"
    if flag.timeout:
        return False, "timeout"
    if flag.memory_error:
        return False, "error"
    return False, "ok"


def _worker_info() -> dict[str, Any]:
    """Diagnostics of a worker process (used by warmup() and tests)."""
    import resource

    return {
        "pid": os.getpid(),
        "warmed": _WARMED,
        "rlimit_as": resource.getrlimit(resource.RLIMIT_AS)[0],
        "math_verify_loaded": "math_verify" in sys.modules,
    }


# ---------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class GradeResult:
    """Outcome of grading one response.

    Attributes:
        correct: Whether the answer matched the gold answer.
        status: ``ok`` (graded), ``no_answer`` (nothing extractable), ``rejected`` (failed a
            pre-parse cap), ``timeout`` (soft or hard time limit) or ``error`` (worker crash,
            MemoryError, unparseable gold, broken pool).
        pred: The extracted answer (truncated to ``max_boxed_chars``) or ``None``.
        seconds: Wall-clock seconds from submission to result (includes queueing).
        reason: Short machine-readable detail for ``rejected``/``error`` (e.g. ``too_deep``).
    """

    correct: bool
    status: str
    pred: str | None
    seconds: float
    reason: str | None = None


@dataclasses.dataclass(frozen=True)
class GraderConfig:
    """Configuration of a :class:`SafeGrader` (all fields are keyword arguments of it).

    Attributes:
        num_workers: Worker processes.
        soft_timeout_s: math-verify's own per-call timeout inside a worker (whole seconds:
            it uses ``signal.alarm``; non-integers are rounded up).
        hard_timeout_s: Wall-clock limit per item in the parent; the worker is killed on
            expiry. ``None``: ``2 * soft_timeout_s + 2``.
        memory_limit_mb: ``RLIMIT_AS`` of each worker in MiB (``None`` or 0: unlimited).
        max_boxed_chars: Longer box contents are rejected.
        max_unboxed_chars: Only this many trailing characters are parsed when there is no box
            (only with ``fallback_unboxed``).
        max_nesting_depth: Deeper bracket nesting is rejected (50 nested parentheses took
            8.8 s to parse; 12 nested braces ~2 s).
        max_exponent_digits: Exponents (including numeric power towers and E-notation) with
            more digits are rejected.
        max_factorial_digits: Factorials of numbers with more digits are rejected.
        fallback_unboxed: For ``style="boxed"``, grade the last ``max_unboxed_chars``
            characters with math-verify's own extraction when there is no box (default:
            no box means ``no_answer``).
        gold_cache_size: Parsed gold answers cached per worker (LRU; 0 disables).
        max_tasks_per_worker: Recycle a worker after this many items (0: never).
        start_method: ``"forkserver"`` (default) or ``"spawn"``.
    """

    num_workers: int = 2
    soft_timeout_s: float = 3
    hard_timeout_s: float | None = None
    memory_limit_mb: int | None = 3072
    max_boxed_chars: int | None = 1000
    max_unboxed_chars: int = 3000
    max_nesting_depth: int | None = 10
    max_exponent_digits: int | None = 4
    max_factorial_digits: int | None = 4
    fallback_unboxed: bool = False
    gold_cache_size: int = 1024
    max_tasks_per_worker: int = 0
    start_method: str = "forkserver"

    @property
    def soft_timeout_int(self) -> int:
        """The soft timeout as ``signal.alarm`` needs it (an int >= 1)."""
        return max(1, int(math.ceil(float(self.soft_timeout_s))))

    @property
    def hard_timeout(self) -> float:
        """Effective hard timeout in seconds."""
        if self.hard_timeout_s is None:
            return 2.0 * self.soft_timeout_int + 2.0
        return float(self.hard_timeout_s)


_PRELOAD = ["math_verify", "math_verify.parser", "math_verify.grader", "recipe.reward.grader"]


class _NoMainForkServerPopen(multiprocessing.popen_forkserver.Popen):
    """forkserver Popen that does not re-import the parent's ``__main__`` in the worker.

    multiprocessing normally re-runs the parent's main script (as ``__mp_main__``) in every
    child. Workers only need :mod:`recipe.reward.grader`, and the main script may be
    unimportable (stdin, some launchers) or heavy (a Ray worker imports all of Ray). This is
    CPython's ``popen_forkserver.Popen._launch`` (3.8-3.13) with the two main-module keys
    removed from the preparation data.
    """

    def _launch(self, process_obj):  # pragma: no cover - exercised through the pool
        import io
        from multiprocessing import forkserver, spawn, util
        from multiprocessing.context import reduction, set_spawning_popen

        prep_data = spawn.get_preparation_data(process_obj._name)
        prep_data.pop("init_main_from_path", None)
        prep_data.pop("init_main_from_name", None)
        buf = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        self.sentinel, w = forkserver.connect_to_new_process(self._fds)
        _parent_w = os.dup(w)
        self.finalizer = util.Finalize(self, util.close_fds, (_parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class _GraderForkServerProcess(multiprocessing.context.ForkServerProcess):  # type: ignore[name-defined]
    """A forkserver Process whose child skips re-importing ``__main__``."""

    @staticmethod
    def _Popen(process_obj):
        return _NoMainForkServerPopen(process_obj)


class _GraderForkServerContext(multiprocessing.context.ForkServerContext):  # type: ignore[name-defined]
    Process = _GraderForkServerProcess


def _mp_context(start_method: str):
    if start_method not in ("forkserver", "spawn"):
        raise ValueError("start_method must be 'forkserver' or 'spawn' (never plain fork)")
    ctx = multiprocessing.get_context(start_method)
    if start_method == "forkserver":
        try:  # merge with any preload list set by someone else in this process
            from multiprocessing import forkserver

            current = list(getattr(forkserver._forkserver, "_preload_modules", []) or [])
        except Exception:  # noqa: BLE001
            current = []
        merged = current + [m for m in _PRELOAD if m not in current]
        ctx.set_forkserver_preload(merged)
        if (3, 8) <= sys.version_info[:2] <= (3, 13):
            return _GraderForkServerContext()
    return ctx


_LIVE_GRADERS: "weakref.WeakSet[SafeGrader]" = weakref.WeakSet()


class SafeGrader:
    """A pool of worker processes that grades untrusted answers with math-verify.

    Thread-safe: :meth:`grade` and :meth:`grade_batch` may be called from any thread,
    :meth:`grade_async` / :meth:`grade_batch_async` from any event loop. The pool starts
    lazily on first use.

    Example:
        >>> g = SafeGrader(num_workers=2, soft_timeout_s=3)
        >>> g.grade(r"so the answer is \\boxed{\\frac12}", "0.5").correct
        True
    """

    def __init__(self, **config: Any) -> None:
        unknown = set(config) - {f.name for f in dataclasses.fields(GraderConfig)}
        if unknown:
            raise TypeError(f"unknown SafeGrader option(s): {sorted(unknown)}")
        self.config = GraderConfig(**config)
        if self.config.num_workers < 1:
            raise ValueError("num_workers must be >= 1")
        if self.config.hard_timeout <= 0:
            raise ValueError("hard_timeout_s must be > 0")
        if self.config.start_method not in ("forkserver", "spawn"):
            raise ValueError("start_method must be 'forkserver' or 'spawn' (never plain fork)")
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._pool: Any = None
        self._closed = False
        self._inflight = 0
        self._counts = {k: 0 for k in ("graded", "correct", *STATUSES, "pool_restarts")}
        _LIVE_GRADERS.add(self)

    # -- pool management ----------------------------------------------------------------

    def _new_pool(self):
        from pebble import ProcessPool

        cfg = self.config
        return ProcessPool(
            max_workers=cfg.num_workers,
            max_tasks=cfg.max_tasks_per_worker,
            initializer=_worker_init,
            initargs=(cfg.memory_limit_mb, cfg.gold_cache_size),
            context=_mp_context(cfg.start_method),
        )

    def _get_pool(self):
        with self._lock:
            if self._closed:
                raise RuntimeError("SafeGrader is closed")
            if os.getpid() != self._pid:
                raise RuntimeError("SafeGrader used in a forked child; call get_grader() there")
            if self._pool is None:
                self._pool = self._new_pool()
            return self._pool

    def _restart_pool(self, broken: Any) -> None:
        with self._lock:
            if self._closed or self._pool is not broken:
                return  # another thread already restarted it
            self._pool = self._new_pool()
            self._counts["pool_restarts"] += 1
        logger.warning("SafeGrader: worker pool broken; started a new one")
        _stop_pool_quietly(broken)

    def _schedule(self, fn, args: tuple) -> tuple[Future, Any]:
        for attempt in range(2):
            pool = self._get_pool()
            try:
                fut = pool.schedule(fn, args=args, timeout=self.config.hard_timeout)
            except RuntimeError:
                if attempt == 1:
                    raise
                self._restart_pool(pool)
                continue
            with self._lock:
                self._inflight += 1
            fut.add_done_callback(self._task_done)
            return fut, pool
        raise RuntimeError("unreachable")

    def _task_done(self, _fut: Future) -> None:
        with self._lock:
            self._inflight -= 1

    def _safety_deadline(self) -> float:
        """A generous backstop for waiting on one queued item (pebble enforces the real
        per-item hard limit from the moment a worker starts it)."""
        with self._lock:
            ahead = self._inflight
        rounds = math.ceil((ahead + 1) / self.config.num_workers) + 1
        return time.monotonic() + rounds * (self.config.hard_timeout + 3.0) + 30.0

    def close(self) -> None:
        """Stop the workers. Idempotent; the grader cannot be used afterwards."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None and os.getpid() == self._pid:
            _stop_pool_quietly(pool)

    def __enter__(self) -> "SafeGrader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def stats(self) -> dict[str, int]:
        """Running counts: ``graded``, ``correct``, one per status, ``pool_restarts``.

        ``timeouts``, ``errors`` and ``rejected`` are provided as aliases too.
        """
        with self._lock:
            c = dict(self._counts)
        c["timeouts"] = c["timeout"]
        c["errors"] = c["error"]
        return c

    @property
    def timeouts(self) -> int:
        """Items that hit a soft or hard time limit."""
        return self._counts["timeout"]

    @property
    def errors(self) -> int:
        """Items that ended in a worker crash / MemoryError / broken pool."""
        return self._counts["error"]

    @property
    def rejected(self) -> int:
        """Items rejected by a pre-parse cap."""
        return self._counts["rejected"]

    @property
    def graded(self) -> int:
        """All items passed to grade / grade_batch (every status)."""
        return self._counts["graded"]

    def _count(self, res: GradeResult) -> GradeResult:
        with self._lock:
            self._counts["graded"] += 1
            self._counts[res.status] += 1
            if res.correct:
                self._counts["correct"] += 1
        return res

    def worker_pids(self) -> list[int]:
        """PIDs of the current worker processes (diagnostics and tests)."""
        pool = self._pool
        if pool is None:
            return []
        try:
            return list(pool._pool_manager.worker_manager.workers.keys())
        except AttributeError:
            return []

    def warmup(self) -> None:
        """Start the workers now (otherwise they start on the first item)."""
        futs = [self._schedule(_worker_info, ())[0] for _ in range(self.config.num_workers)]
        for f in futs:
            try:
                f.result(timeout=60)
            except Exception:  # noqa: BLE001
                pass

    # -- preparation in the calling process ---------------------------------------------

    def _prepare(
        self, pred_text: str, gold: str, style: str, options: GradeOptions | None = None
    ) -> GradeResult | tuple:
        """Extract and cap. Returns a final GradeResult, or (worker_text, gold, pred, options, pairs)."""
        cfg = self.config
        if style not in _STYLES:
            raise ValueError(f"unknown answer style {style!r}; expected one of {_STYLES}")
        options = options or _DEFAULT_OPTIONS
        text = pred_text if isinstance(pred_text, str) else ("" if pred_text is None else str(pred_text))
        gold = gold if isinstance(gold, str) else str(gold)
        box = find_last_box(text, cfg.max_boxed_chars)
        if box is TOO_LONG:
            return GradeResult(False, "rejected", None, 0.0, "too_long")
        harness = options.mode == "harness"
        if isinstance(box, str):
            pred = box.strip()
            if not pred:
                return GradeResult(False, "no_answer", None, 0.0)
            worker_text = f"\\boxed{{{pred}}}"
        elif style == "gsm8k" and gsm8k_answer(text) is not None:
            pred = gsm8k_answer(text)
            worker_text = f"${pred}$"
        elif harness:
            pred = harness_answer(text, cfg.max_boxed_chars)
            if pred is None:
                return GradeResult(False, "no_answer", None, 0.0)
            worker_text = f"\\boxed{{{pred}}}"
        elif style != "gsm8k" and cfg.fallback_unboxed and text.strip():
            pred = None
            worker_text = text[-cfg.max_unboxed_chars :]
        else:
            return GradeResult(False, "no_answer", None, 0.0)

        reason = check_caps(
            pred if pred is not None else worker_text,
            max_chars=cfg.max_boxed_chars if pred is not None else None,
            max_nesting_depth=cfg.max_nesting_depth,
            max_exponent_digits=cfg.max_exponent_digits,
            max_factorial_digits=cfg.max_factorial_digits,
        )
        if reason is not None:
            short = None if pred is None else pred[:200]
            return GradeResult(False, "rejected", short, 0.0, reason)

        if harness:
            pred_c, gold_c = harness_clean(pred), harness_clean(gold)
            p, g = _harness_number(pred_c), _harness_number(gold_c)
            if p is not None and g is not None:
                return GradeResult(numbers_close(g, p, options), "ok", pred, 0.0)
            gold_parts = split_top_level_commas(gold_c)
            if len(gold_parts) > 1:
                pred_parts = split_top_level_commas(pred_c)
                if len(pred_parts) != len(gold_parts):
                    return GradeResult(False, "ok", pred, 0.0)  # lists of different lengths
                return (worker_text, gold_c, pred, options, list(zip(pred_parts, gold_parts)))
            return (f"\\boxed{{{pred_c}}}", gold_c, pred, options, None)

        if options.abs_tol is not None and pred is not None:
            p = _harness_number(_PERCENT_RE.sub("", pred))
            g = _harness_number(_PERCENT_RE.sub("", gold))
            if p is not None and g is not None and numbers_close(g, p, options):
                return GradeResult(True, "ok", pred, 0.0)
        if style == "gsm8k":
            # Numeric comparison without sympy: "1,000" == "1000", "72.0" == "72".
            p, g = _plain_number(pred), _plain_number(gold)
            if p is not None and g is not None:
                return GradeResult(p == g, "ok", pred, 0.0)
            if g is not None:
                gold = format(g, "f")
        return (worker_text, gold, pred, options, None)

    def _finish(self, fut: Future, pred: str | None, t0: float) -> GradeResult:
        try:
            correct, status = fut.result(timeout=0)
            return GradeResult(bool(correct), status, pred, time.monotonic() - t0)
        except (FuturesTimeoutError, TimeoutError):
            return GradeResult(False, "timeout", pred, time.monotonic() - t0, "hard_timeout")
        except CancelledError:
            return GradeResult(False, "timeout", pred, time.monotonic() - t0, "cancelled")
        except Exception as exc:  # noqa: BLE001 - ProcessExpired, BrokenProcessPool, ...
            return GradeResult(False, "error", pred, time.monotonic() - t0, type(exc).__name__)

    @staticmethod
    def _is_pool_failure(fut: Future) -> bool:
        from concurrent.futures.process import BrokenProcessPool

        if fut.cancelled() or not fut.done():
            return False
        exc = fut.exception(timeout=0)
        return isinstance(exc, BrokenProcessPool) or (
            isinstance(exc, RuntimeError) and "Pool" in str(exc)
        )

    # -- public grading API ---------------------------------------------------------------

    def grade(
        self, pred_text: str, gold: str, style: str = "boxed", options: GradeOptions | None = None
    ) -> GradeResult:
        """Grade one response against a gold answer. Safe to call from any thread.

        Args:
            pred_text: The untrusted model response.
            gold: The trusted reference answer (bare LaTeX such as ``\\sqrt{12}`` or a number).
            style: ``"boxed"`` or ``"gsm8k"`` (see :func:`extract_answer`).
            options: Grading mode and tolerance (:class:`GradeOptions`; default strict).

        Returns:
            A :class:`GradeResult`. Never raises for bad model output.
        """
        return self.grade_batch([(pred_text, gold, style, options)])[0]

    def grade_batch(self, items: Iterable[Sequence[str]]) -> list[GradeResult]:
        """Grade many ``(pred_text, gold[, style[, options]])`` items (options: :class:`GradeOptions`).

        All items are submitted at once so the workers run in parallel. Safe to call from any
        thread. Results are in input order; bad model output never raises.
        """
        t0 = time.monotonic()
        items = [tuple(it) for it in items]
        results: list[GradeResult | None] = [None] * len(items)
        pending: dict[int, list] = {}
        for i, it in enumerate(items):
            prep = self._prepare(it[0], it[1], _item_style(it), _item_options(it))
            if not isinstance(prep, GradeResult):
                sub = self._submit(prep)
                if isinstance(sub, tuple):
                    pending[i] = [sub[0], sub[1], prep, False]
                    continue
                prep = sub
            prep.seconds = time.monotonic() - t0
            results[i] = self._count(prep)
        deadline = self._safety_deadline()
        for i, entry in pending.items():
            fut, pool, prep, retried = entry
            while True:
                try:
                    fut.result(timeout=max(0.0, deadline - time.monotonic()))
                except (FuturesTimeoutError, TimeoutError):
                    if not fut.done():  # backstop expired (pebble stalled): give up on it
                        fut.cancel()
                        res = GradeResult(False, "timeout", prep[2], time.monotonic() - t0, "backstop")
                        break
                except Exception:  # noqa: BLE001 - classified by _finish
                    pass
                if self._is_pool_failure(fut):
                    self._restart_pool(pool)
                    if not retried:  # the pool broke, maybe not this item's fault: retry once
                        sub = self._submit(prep)
                        if isinstance(sub, tuple):
                            fut, pool = sub
                            retried = True
                            deadline = self._safety_deadline()
                            continue
                        res = sub
                        break
                res = self._finish(fut, prep[2], t0)
                break
            results[i] = self._count(res)
        return results  # type: ignore[return-value]

    def _submit(self, prep: tuple) -> tuple[Future, Any] | GradeResult:
        try:
            return self._schedule(_worker_grade, (prep[0], prep[1], self.config.soft_timeout_int, prep[3], prep[4]))
        except Exception as exc:  # noqa: BLE001 - infrastructure failure: score 0, do not raise
            logger.warning("SafeGrader: could not schedule an item: %s", type(exc).__name__)
            return GradeResult(False, "error", prep[2], 0.0, "schedule_failed")

    async def grade_async(
        self, pred_text: str, gold: str, style: str = "boxed", options: GradeOptions | None = None
    ) -> GradeResult:
        """Asyncio variant of :meth:`grade`: awaits the worker without blocking the loop."""
        return (await self.grade_batch_async([(pred_text, gold, style, options)]))[0]

    async def grade_batch_async(self, items: Iterable[Sequence[str]]) -> list[GradeResult]:
        """Asyncio variant of :meth:`grade_batch`."""
        if self._pool is None and not self._closed:
            # Starting the pool (and, the first time, the forkserver) blocks for a few
            # seconds: do it off the event loop.
            await asyncio.get_running_loop().run_in_executor(None, self.warmup)
        t0 = time.monotonic()
        items = [tuple(it) for it in items]
        results: list[GradeResult | None] = [None] * len(items)
        pending: dict[int, tuple] = {}
        for i, it in enumerate(items):
            prep = self._prepare(it[0], it[1], _item_style(it), _item_options(it))
            if not isinstance(prep, GradeResult):
                sub = self._submit(prep)
                if isinstance(sub, tuple):
                    pending[i] = (sub[0], sub[1], prep)
                    continue
                prep = sub
            prep.seconds = time.monotonic() - t0
            results[i] = self._count(prep)
        deadline = self._safety_deadline()
        for i, (fut, pool, prep) in pending.items():
            try:
                await asyncio.wait_for(
                    asyncio.shield(asyncio.wrap_future(fut)),
                    timeout=max(0.0, deadline - time.monotonic()),
                )
            except asyncio.TimeoutError:
                if not fut.done():
                    fut.cancel()
                    results[i] = self._count(
                        GradeResult(False, "timeout", prep[2], time.monotonic() - t0, "backstop")
                    )
                    continue
            except asyncio.CancelledError:
                fut.cancel()
                raise
            except Exception:  # noqa: BLE001 - classified by _finish
                pass
            if self._is_pool_failure(fut):
                # Rare: restart the pool and retry this item once, off the event loop.
                self._restart_pool(pool)
                loop = asyncio.get_running_loop()
                results[i] = await loop.run_in_executor(
                    None, self.grade, *items[i][:2], _item_style(items[i]), _item_options(items[i])
                )
                continue
            results[i] = self._count(self._finish(fut, prep[2], t0))
        return results  # type: ignore[return-value]


def _item_style(item: Sequence[Any]) -> str:
    return item[2] if len(item) > 2 else "boxed"


def _item_options(item: Sequence[Any]) -> GradeOptions | None:
    return item[3] if len(item) > 3 else None


def _stop_pool_quietly(pool: Any) -> None:
    try:
        pool.stop()
        pool.join(timeout=10)
    except Exception:  # noqa: BLE001
        logger.debug("SafeGrader: error while stopping a pool", exc_info=True)


# ---------------------------------------------------------------------------------------
# Per-process singletons
# ---------------------------------------------------------------------------------------

_REGISTRY: dict[tuple, SafeGrader] = {}
_REGISTRY_LOCK = threading.Lock()


def _config_key(config: dict[str, Any]) -> tuple:
    full = dataclasses.asdict(GraderConfig(**config))
    return tuple(sorted(full.items()))


def get_grader(**config: Any) -> SafeGrader:
    """Return this process's shared :class:`SafeGrader` for ``config`` (created lazily).

    Thread-safe. Each distinct configuration gets its own pool, so keep the configuration
    fixed within a process. After ``fork`` the child gets fresh graders.

    Args:
        **config: Fields of :class:`GraderConfig`.

    Returns:
        The shared grader.
    """
    key = _config_key(config)
    with _REGISTRY_LOCK:
        grader = _REGISTRY.get(key)
        if grader is None or grader.closed or grader._pid != os.getpid():
            grader = SafeGrader(**config)
            _REGISTRY[key] = grader
        return grader


def close_all_graders() -> None:
    """Close every grader of this process (registered with ``atexit``)."""
    with _REGISTRY_LOCK:
        _REGISTRY.clear()
    for grader in list(_LIVE_GRADERS):
        if grader._pid == os.getpid():
            grader.close()


def _after_fork_in_child() -> None:
    global _REGISTRY_LOCK
    _REGISTRY_LOCK = threading.Lock()
    _REGISTRY.clear()


atexit.register(close_all_graders)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)

if _imported_by_forkserver():
    # Preloaded by the forkserver (see _PRELOAD): warm math-verify once so that every worker,
    # including replacements of killed ones, is forked warm; freeze the heap for copy-on-write.
    import gc

    _warm_up_math_verify()
    gc.freeze()
