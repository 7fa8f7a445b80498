"""Tests of recipe.reward.grader: answer extraction, pre-parse caps and the safe grading pool.

The hostile cases cover every class of GRADING_SECURITY.md (huge numbers, uninterruptible C
work, memory blow-up, slow algebra, deep nesting, regex backtracking, code injection). Each
must score wrong and finish within the hard timeout plus a margin. Where a protection is what
makes the case safe, the expected status names it (``rejected`` for the caps, ``error`` for
the memory limit, ``timeout`` for soft/hard limits), so removing the protection fails a test.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from recipe.reward.grader import (
    GradeResult,
    SafeGrader,
    check_caps,
    close_all_graders,
    extract_answer,
    get_grader,
    gsm8k_answer,
    last_boxed,
)

SOFT = 1
HARD = 3.0
# Time allowed beyond the hard limit: pebble polls every 0.1 s, then kills and replaces the
# worker; the test machine has 2 cores shared with other work.
MARGIN = 4.0
BOUND = HARD + MARGIN
REPO = Path(__file__).resolve().parents[3]
from tests.paths import MATH500  # noqa: E402

CAPS = dict(max_chars=1000, max_nesting_depth=10, max_exponent_digits=4, max_factorial_digits=4)


@pytest.fixture(scope="module")
def grader():
    g = SafeGrader(num_workers=2, soft_timeout_s=SOFT, hard_timeout_s=HARD)
    g.warmup()
    yield g
    g.close()


@pytest.fixture(scope="module")
def uncapped_grader():
    """No pre-parse caps: only the worker limits (soft/hard timeouts, RLIMIT_AS) protect."""
    g = SafeGrader(
        num_workers=2,
        soft_timeout_s=SOFT,
        hard_timeout_s=HARD,
        max_nesting_depth=None,
        max_exponent_digits=None,
        max_factorial_digits=None,
    )
    g.warmup()
    yield g
    g.close()


@pytest.fixture(scope="module")
def fallback_grader():
    g = SafeGrader(num_workers=2, soft_timeout_s=SOFT, hard_timeout_s=HARD, fallback_unboxed=True)
    yield g
    g.close()


def timed_grade(g: SafeGrader, pred: str, gold: str, style: str = "boxed") -> tuple[GradeResult, float]:
    t0 = time.monotonic()
    res = g.grade(pred, gold, style)
    return res, time.monotonic() - t0


# ------------------------------------------------------------------------------------------
# Extraction
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"The answer is \boxed{5}.", "5"),
        (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
        (r"first \boxed{1} then \boxed{2}", "2"),
        (r"\boxed{\sqrt{\frac{a}{b}}} and more", r"\sqrt{\frac{a}{b}}"),
        (r"\fbox{3}", "3"),
        (r"so $\boxed 7$ done", "7"),
        ("\\boxed 42\nnext line", "42"),
        (r"\boxed{\{1,2\}}", r"\{1,2\}"),
        (r"\boxed{\left\{ x \right.}", r"\left\{ x \right."),
        (r"\boxed{}", ""),
        (r"\boxed {9}", "9"),
        (r"\boxed{1} \boxedfoo{2}", "1"),
        ("no box here", None),
        ("", None),
        (r"\boxed{1", None),
        (r"\boxed{1} and then \boxed{2", None),
        (r"ends with \boxed", None),
        (r"\boxed{a}}}}", "a"),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_last_boxed_large_inputs_are_fast():
    t0 = time.monotonic()
    assert last_boxed("\\boxed{1} " * 40000 + "x" * 1_000_000) == "1"
    assert last_boxed("\\boxed{" + "{" * 200_000 + "1") is None
    assert last_boxed("$$" + "\\boxed{1" * 20000) is None
    assert time.monotonic() - t0 < 2.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so #### 1,000", "1000"),
        ("#### 72", "72"),
        ("#### $18.50", "18.50"),
        (r"#### \$5", "5"),
        ("#### -3", "-3"),
        ("#### 1 \n#### 2", "2"),
        ("#### abc", None),
        ("no marker 5", None),
        ("", None),
    ],
)
def test_gsm8k_answer(text, expected):
    assert gsm8k_answer(text) == expected


def test_extract_answer_styles():
    assert extract_answer(r"#### 5 but \boxed{6}", "gsm8k") == "6"
    assert extract_answer("#### 1,234", "gsm8k") == "1234"
    assert extract_answer("#### 1,234", "boxed") is None
    assert extract_answer(r"\boxed{x}", "boxed") == "x"
    with pytest.raises(ValueError):
        extract_answer("x", "nope")


# ------------------------------------------------------------------------------------------
# Pre-parse caps
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("x" * 1001, "too_long"),
        ("(" * 11 + "1" + ")" * 11, "too_deep"),
        ("\\frac{" * 11 + "1" + "}" * 11, "too_deep"),
        ("9^{9^{9^{9}}}", "huge_exponent"),
        ("10^{10^{10}}", "huge_exponent"),
        ("(10^{10^{10}})!", "huge_exponent"),
        ("(x+1)^{10^{100}}", "huge_exponent"),
        ("2^{10000}", "huge_exponent"),
        ("2^{-10000}", "huge_exponent"),
        ("9**9**9", "huge_exponent"),
        ("2^{2^{100}}", "huge_exponent"),
        (r"\prod_{k=1}^{10^7} k", "huge_exponent"),
        ("1E1000000", "huge_enotation"),
        ("3.5e-100000", "huge_enotation"),
        ("100000!", "huge_factorial"),
    ],
)
def test_caps_reject(answer, reason):
    assert check_caps(answer, **CAPS) == reason


@pytest.mark.parametrize(
    "answer",
    [
        "2^{2008} - 2",
        "2^{4950}",
        "e^{x^2}",
        "2^{2^{n}}+1",
        "2^{2^{2^{2}}}",
        "10^{100}",
        "3e5",
        "5!",
        r"10,\!080",
        r"\left( 3, \frac{\pi}{2} \right)",
        r"\left( -\frac{9}{2} , -2 \right) \cup \left( \frac{1 - \sqrt{5}}{2}, \frac{1 + \sqrt{5}}{2} \right)",
        "x^5 - x^4 + x^3 - x^2 + x - 1",
    ],
)
def test_caps_accept(answer):
    assert check_caps(answer, **CAPS) is None


def test_caps_are_fast_on_adversarial_inputs():
    uncapped_depth = dict(CAPS, max_chars=None, max_nesting_depth=None)
    inputs = [
        "2^{" * 1500,
        "x^{" * 1500 + "}" * 1500,
        "x^{1}" * 600,
        "1" * 3000 + "!",
        "2^(" * 1000,
        "{" * 1500 + "2^{10^{10}}" + "}" * 1500,
        "1e" * 1500,
    ]
    t0 = time.monotonic()
    for s in inputs:
        check_caps(s, **uncapped_depth)
    assert time.monotonic() - t0 < 0.5


def test_caps_accept_every_math500_gold_answer():
    answers = [json.loads(line)["answer"] for line in MATH500.read_text().splitlines() if line.strip()]
    assert len(answers) == 500
    rejected = [a for a in answers if check_caps(a, **CAPS) is not None]
    assert rejected == []


# ------------------------------------------------------------------------------------------
# Grading semantics
# ------------------------------------------------------------------------------------------

CORRECT = [
    (r"\boxed{\frac12}", "0.5", "boxed"),
    (r"\boxed{0.5}", r"\frac{1}{2}", "boxed"),
    (r"\boxed{\dfrac{1}{2}}", r"\frac12", "boxed"),
    (r"The answer is \boxed{\sqrt{12}}", r"2\sqrt{3}", "boxed"),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{12}", "boxed"),
    (r"\boxed{[1, 2)}", "[1,2)", "boxed"),
    (r"\boxed{x \in [2, 5)}", "[2,5)", "boxed"),
    (r"\boxed{(-\infty, 3]}", r"(-\infty,3]", "boxed"),
    (r"\boxed{\{1, 2\}}", r"\{2,1\}", "boxed"),
    (r"\boxed{3, 5}", "5, 3", "boxed"),
    (r"\boxed{90^\circ}", r"90^\circ", "boxed"),
    (r"\boxed{90}", r"90^\circ", "boxed"),
    (r"\boxed{\text{(C)}}", r"\text{(C)}", "boxed"),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", "boxed"),
    (r"\boxed{x^2+2x+1}", "(x+1)^2", "boxed"),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)", "boxed"),
    (r"\boxed{10\%}", "10", "gsm8k"),
    ("so the total is #### 1,000", "1000", "gsm8k"),
    ("#### 1000", "1,000", "gsm8k"),
    (r"\boxed{72.0}", "72", "gsm8k"),
    (r"\boxed{\$18.90}", "18.9", "gsm8k"),
    (r"#### 5 oops, final: \boxed{6}", "6", "gsm8k"),
    (r"\boxed{\frac{3}{4}}", "0.75", "gsm8k"),
]

INCORRECT = [
    (r"\boxed{2}", "3", "boxed"),
    (r"\boxed{0.51}", r"\frac12", "boxed"),
    (r"\boxed{[1, 2]}", "[1,2)", "boxed"),
    (r"\boxed{\{1, 3\}}", r"\{1,2\}", "boxed"),
    (r"\boxed{\sqrt{13}}", r"2\sqrt{3}", "boxed"),
    (r"\boxed{x^2+1}", "(x+1)^2", "boxed"),
    (r"\boxed{\text{(B)}}", r"\text{(C)}", "boxed"),
    ("#### 999", "1000", "gsm8k"),
    (r"\boxed{72.5}", "72", "gsm8k"),
    (r"#### 6 then \boxed{5}", "6", "gsm8k"),
]


@pytest.mark.parametrize(("pred", "gold", "style"), CORRECT)
def test_correct_pairs(grader, pred, gold, style):
    res = grader.grade(pred, gold, style)
    assert res.status == "ok"
    assert res.correct, res


@pytest.mark.parametrize(("pred", "gold", "style"), INCORRECT)
def test_incorrect_pairs(grader, pred, gold, style):
    res = grader.grade(pred, gold, style)
    assert res.status == "ok"
    assert not res.correct, res


@pytest.mark.parametrize(
    ("pred", "style"),
    [("The answer is 5.", "boxed"), (r"\boxed{}", "boxed"), (r"\boxed{5", "boxed"), ("it is 72", "gsm8k"), ("", "boxed")],
)
def test_missing_answer_is_no_answer(grader, pred, style):
    res = grader.grade(pred, "5", style)
    assert (res.correct, res.status, res.pred) == (False, "no_answer", None)


def test_unboxed_fallback_optional(fallback_grader):
    assert fallback_grader.grade("so the final answer is $\\frac{1}{2}$", "0.5").correct
    assert not fallback_grader.grade("so the final answer is $3$", "0.5").correct


def test_grade_batch_order_and_counters(grader):
    before = grader.stats()
    items = [(p, g, s) for p, g, s in CORRECT[:6]] + [(p, g, s) for p, g, s in INCORRECT[:6]]
    items.append(("nothing", "1", "boxed"))
    items.append((r"\boxed{9^{9^{9^{9}}}}", "1", "boxed"))
    res = grader.grade_batch(items)
    assert [r.correct for r in res] == [True] * 6 + [False] * 8
    assert [r.status for r in res[-2:]] == ["no_answer", "rejected"]
    after = grader.stats()
    assert after["graded"] - before["graded"] == len(items)
    assert after["rejected"] - before["rejected"] == 1
    assert after["no_answer"] - before["no_answer"] == 1
    assert after["correct"] - before["correct"] == 6


def test_grade_from_four_threads(grader):
    items = [(p, g, s, True) for p, g, s in CORRECT[:8]] + [(p, g, s, False) for p, g, s in INCORRECT[:8]]

    def work(offset: int) -> list[bool]:
        out = []
        for k in range(len(items)):
            p, g, s, want = items[(k + offset) % len(items)]
            res = grader.grade(p, g, s)
            out.append(res.status == "ok" and res.correct == want)
        return out

    with ThreadPoolExecutor(4) as ex:
        results = list(ex.map(work, [0, 3, 7, 11]))
    assert all(all(r) for r in results)


def test_grade_async(grader):
    async def main():
        one = await grader.grade_async(r"\boxed{\frac{1}{2}}", "0.5")
        many = await grader.grade_batch_async([(r"\boxed{2}", "2"), (r"\boxed{3}", "2"), ("none", "2")])
        return one, many

    one, many = asyncio.run(main())
    assert one.correct
    assert [(r.correct, r.status) for r in many] == [(True, "ok"), (False, "ok"), (False, "no_answer")]


# ------------------------------------------------------------------------------------------
# Hostile answers: every class of GRADING_SECURITY.md
# ------------------------------------------------------------------------------------------

HOSTILE = [
    # (id, response, statuses allowed). Huge numbers and eager arithmetic:
    ("tower", r"\boxed{9^{9^{9^{9}}}}", {"rejected"}),
    ("factorial-tower", r"\boxed{(10^{10^{10}})!}", {"rejected"}),
    ("product", r"\boxed{\prod_{k=1}^{10^7} k}", {"rejected"}),
    ("binomial", r"\boxed{\binom{10^8}{5\cdot10^7}}", {"ok", "timeout"}),
    ("double-power", r"\boxed{2^{9999}^{9999}}", {"ok", "timeout"}),
    ("python-power", r"\boxed{9**9**9}", {"rejected"}),
    # Uninterruptible C-level work (E-notation):
    ("enotation", r"\boxed{1E1000000}", {"rejected"}),
    ("enotation-bigger", r"\boxed{1e100000000}", {"rejected"}),
    ("enotation-unboxed", r"the answer is $1E1000000$", {"no_answer"}),
    # Memory blow-up: RLIMIT_AS turns these into quick MemoryErrors.
    ("zeros", r"\boxed{\operatorname{zeros}(20000,20000)}", {"error"}),
    ("eye", r"\boxed{\operatorname{eye}(30000)}", {"error"}),
    ("poly-power", r"\boxed{(x+1)^{10^{100}}}", {"rejected"}),
    # Slow algebra:
    ("integral", r"\boxed{\int_0^{1} e^{x^{2}} \sin(x^{3}) \, dx}", {"ok", "timeout"}),
    ("sum", r"\boxed{\sum_{n=1}^{9999} n^{9999}}", {"ok", "timeout"}),
    ("high-degree", r"\boxed{x^{500} - 3x^{77} + 1 = 0}", {"ok", "timeout"}),
    (
        "determinant",
        r"\boxed{\det\begin{pmatrix}a&b&c&d\\e&f&g&h\\i&j&k&l\\m&n&o&p\end{pmatrix}}",
        {"ok", "timeout"},
    ),
    # Deep nesting:
    ("frac-10k", r"\boxed{" + "\\frac{1}{" * 10000 + "2" + "}" * 10000 + "}", {"rejected"}),
    ("paren-10k", r"\boxed{" + "(" * 10000 + "1" + ")" * 10000 + "}", {"rejected"}),
    ("brace-10k", r"\boxed{" + "{" * 10000 + "1" + "}" * 10000 + "}", {"rejected"}),
    ("paren-50", r"\boxed{" + "(" * 50 + "1" + ")" * 50 + "}", {"rejected"}),
    ("brace-40", r"\boxed{" + "{" * 40 + "1" + "}" * 40 + "}", {"rejected"}),
    # Regex backtracking:
    ("dollar-boxes", "$$" + "\\boxed{1}" * 2000, {"ok"}),
    ("dollar-boxes-unclosed", "$$" + "\\boxed{1" * 2000, {"no_answer"}),
    ("ones-in-box", r"\boxed{" + "1 " * 490 + "}", {"ok", "timeout"}),
    ("spaces-in-box", r"\boxed{1" + " " * 990 + "}", {"ok"}),
    ("brackets-in-box", r"\boxed{" + "\\[" * 330 + "}", {"ok", "rejected"}),
    ("long-box", r"\boxed{" + "1+" * 5000 + "1}", {"rejected"}),
    # Harmless but large:
    ("megabyte", "x" * 1_000_000 + "\\boxed{1} " * 40000, {"ok"}),
    ("unicode-digits", "\\boxed{\u0661\u0662}", {"ok"}),
]


@pytest.mark.parametrize(("name", "pred", "statuses"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_answers_score_wrong_and_finish(grader, name, pred, statuses):
    res, elapsed = timed_grade(grader, pred, "2")
    assert not res.correct
    assert res.status in statuses, res
    assert elapsed < BOUND, (name, elapsed)


INJECTIONS = [
    r"\boxed{__import__('os').system('touch {path}')}",
    r"\boxed{\operatorname{__import__}('os').system('touch {path}')}",
    r"\boxed{\mathrm{exec}(\text{open('{path}','w')})}",
    r"eval(__import__('os').system('touch {path}')) \boxed{eval('1+1')}",
    r"\boxed{x.__class__.__mro__[1].__subclasses__()}",
    r"\boxed{\text{__import__('os').system('touch {path}')}}",
    r"$__import__('os').system('touch {path}')$",
]


@pytest.mark.parametrize("template", INJECTIONS)
@pytest.mark.parametrize("style", ["boxed", "gsm8k"])
def test_code_injection_is_not_executed(grader, fallback_grader, tmp_path, template, style):
    target = tmp_path / "pwned"
    pred = template.replace("{path}", str(target))
    for g in (grader, fallback_grader):
        res, elapsed = timed_grade(g, pred, "0", style)
        assert not res.correct
        assert elapsed < BOUND
    assert not target.exists()


@pytest.mark.parametrize(
    "tail",
    [
        "1 " * 5000,
        "\\[" * 3000,
        "x" + " " * 10000,
        "$$" + "\\frac{1}{2}" * 1000,
        "$" + "(" * 5000,
        "$$" + "\\boxed{1" * 2000,
    ],
    ids=["ones", "brackets", "spaces", "dollar-fracs", "dollar-parens", "unclosed-boxes"],
)
def test_unboxed_fallback_is_bounded(fallback_grader, tail):
    res, elapsed = timed_grade(fallback_grader, tail, "7")
    assert not res.correct
    assert elapsed < BOUND


# ------------------------------------------------------------------------------------------
# Worker limits and pool recovery
# ------------------------------------------------------------------------------------------


def test_soft_timeout_stops_slow_parse_without_killing_the_worker(uncapped_grader):
    pids = set(uncapped_grader.worker_pids())
    res, elapsed = timed_grade(uncapped_grader, r"\boxed{" + "{" * 40 + "1" + "}" * 40 + "}", "1")
    assert (res.correct, res.status) == (False, "timeout")
    assert res.reason is None  # math-verify's soft limit, not the parent's hard limit
    assert elapsed < HARD
    assert set(uncapped_grader.worker_pids()) == pids


def test_hard_timeout_kills_and_replaces_worker(uncapped_grader):
    """E-notation parsing is uninterruptible C work (~31 s): only killing the worker stops it."""
    before = uncapped_grader.stats()["timeouts"]
    pids = set(uncapped_grader.worker_pids())
    res, elapsed = timed_grade(uncapped_grader, r"\boxed{1E1000000}", "1")
    assert (res.correct, res.status, res.reason) == (False, "timeout", "hard_timeout")
    assert HARD <= elapsed < BOUND
    assert uncapped_grader.stats()["timeouts"] == before + 1
    # The pool survives: the next good item is graded correctly and promptly.
    res, elapsed = timed_grade(uncapped_grader, r"\boxed{\frac{1}{2}}", "0.5")
    assert (res.correct, res.status) == (True, "ok")
    assert elapsed < BOUND
    assert set(uncapped_grader.worker_pids()) != pids


def test_hard_timeouts_in_a_batch_do_not_block_good_items(uncapped_grader):
    items = [(r"\boxed{1E1000000}", "1")] * 2 + [(r"\boxed{%d}" % k, str(k)) for k in range(6)]
    t0 = time.monotonic()
    res = uncapped_grader.grade_batch(items)
    elapsed = time.monotonic() - t0
    assert [r.status for r in res[:2]] == ["timeout", "timeout"]
    assert all(r.correct and r.status == "ok" for r in res[2:])
    assert elapsed < 2 * BOUND


def test_worker_crash_is_an_error_and_pool_recovers(grader):
    fut, _pool = grader._schedule(os._exit, (3,))  # the worker dies mid-task
    try:
        fut.result(timeout=BOUND)
    except Exception:  # noqa: BLE001 - pebble's ProcessExpired
        pass
    res = grader._finish(fut, None, time.monotonic())
    assert (res.correct, res.status) == (False, "error")
    good, elapsed = timed_grade(grader, r"\boxed{4}", "4")
    assert (good.correct, good.status) == (True, "ok")
    assert elapsed < BOUND


def test_idle_worker_killed_externally(grader):
    grader.warmup()
    pids = grader.worker_pids()
    assert pids
    os.kill(pids[0], signal.SIGKILL)
    time.sleep(0.5)
    for k in range(4):
        res, elapsed = timed_grade(grader, r"\boxed{%d}" % k, str(k))
        assert (res.correct, res.status) == (True, "ok"), res
        assert elapsed < BOUND


def test_get_grader_is_a_thread_safe_singleton():
    cfg = dict(num_workers=1, soft_timeout_s=SOFT, hard_timeout_s=HARD)
    with ThreadPoolExecutor(4) as ex:
        graders = list(ex.map(lambda _: get_grader(**cfg), range(8)))
    assert all(g is graders[0] for g in graders)
    assert get_grader(**cfg, max_boxed_chars=500) is not graders[0]
    assert graders[0].grade(r"\boxed{3}", "3").correct
    close_all_graders()
    assert graders[0].closed
    fresh = get_grader(**cfg)
    assert fresh is not graders[0]
    fresh.close()


def test_caller_never_imports_math_verify_and_works_off_main_thread():
    """Runs in a fresh interpreter: grading from worker threads must not load math-verify
    (and its signal.alarm timeouts) into the calling process."""
    code = textwrap.dedent(
        r"""
        import sys, threading
        from concurrent.futures import ThreadPoolExecutor
        from recipe.reward.grader import SafeGrader
        g = SafeGrader(num_workers=2, soft_timeout_s=1, hard_timeout_s=3)
        with ThreadPoolExecutor(2) as ex:
            res = list(ex.map(lambda p: g.grade(*p), [(r"\boxed{\frac12}", "0.5"), (r"\boxed{2}", "3")]))
        assert [r.correct for r in res] == [True, False], res
        assert "math_verify" not in sys.modules
        assert "sympy" not in sys.modules
        g.close()
        print("OK")
        """
    )
    # Fed on stdin on purpose: the parent's __main__ is not importable, which workers must
    # not need.
    proc = subprocess.run(
        [sys.executable, "-"], input=code, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().endswith("OK")


def test_worker_setup_silences_math_verify_and_sets_limits():
    """The worker initializer in a fresh interpreter: memory limit, no core dumps, math-verify
    warnings (which contain the untrusted text) swallowed, soft timeouts reported."""
    code = textwrap.dedent(
        r"""
        import logging, resource, sys
        logging.basicConfig(level=logging.DEBUG)
        from recipe.reward.grader import _WORKER, _worker_grade, _worker_init
        _worker_init(2048, 16)
        assert resource.getrlimit(resource.RLIMIT_AS)[0] == 2048 * 1024 * 1024
        assert resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)
        logging.getLogger("math_verify.parser").warning("Timeout during parsing: SECRET-TEXT")
        assert _WORKER["flag"].timeout
        slow = "\\boxed{" + "{" * 40 + "1" + "}" * 40 + "}"
        assert _worker_grade(slow, "1", 1) == (False, "timeout")
        assert _worker_grade("\\boxed{\\frac12}", "0.5", 1) == (True, "ok")
        print("OK")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SECRET-TEXT" not in proc.stderr + proc.stdout
    assert proc.stdout.strip().endswith("OK")


def test_closed_grader_refuses_work():
    g = SafeGrader(num_workers=1)
    g.close()
    res = g.grade(r"\boxed{1}", "1")
    assert (res.correct, res.status) == (False, "error")


def test_invalid_config():
    with pytest.raises(TypeError):
        SafeGrader(no_such_option=1)
    with pytest.raises(ValueError):
        SafeGrader(num_workers=0)
    with pytest.raises(ValueError):
        SafeGrader(start_method="fork")


def test_threads_do_not_leak_between_graders():
    before = threading.active_count()
    g = SafeGrader(num_workers=1, soft_timeout_s=SOFT, hard_timeout_s=HARD)
    assert g.grade(r"\boxed{1}", "1").correct
    g.close()
    time.sleep(0.3)
    assert threading.active_count() <= before + 1
