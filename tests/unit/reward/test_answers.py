"""Tests of recipe.reward.answers: the one last-box extractor for gold and model answers."""

from __future__ import annotations

import ast
import doctest
from pathlib import Path

import pytest

import recipe.data as rd
import recipe.reward as reward_pkg
from recipe.reward import answers, grader
from recipe.reward.answers import NOT_FOUND, TOO_LONG, find_last_box, last_boxed, match_brace

REPO_ROOT = Path(__file__).resolve().parents[3]

# (text, expected last_boxed), one group per rule of the module docstring.
CASES = [
    # plain and nested braces
    (r"The answer is \boxed{5}.", "5"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\sqrt{\frac{a}{b}}} and more", r"\sqrt{\frac{a}{b}}"),
    (r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}"),
    (r"\boxed{a}}}}", "a"),
    # escaped braces do not count; an escaped backslash before a brace does not escape it
    (r"\boxed{\{1,2\}}", r"\{1,2\}"),
    (r"\boxed{\left\{ x \right.}", r"\left\{ x \right."),
    (r"\boxed{a\\}b", "a\\\\"),
    # \fbox counts like \boxed
    (r"\fbox{3}", "3"),
    (r"\boxed{1} then \fbox{3}", "3"),
    (r"\fbox{1} then \boxed{2}", "2"),
    # \boxed 5: one token up to the next $ or newline
    (r"\boxed 5", "5"),
    (r"so $\boxed 7$ done", "7"),
    ("\\boxed 42\nnext line", "42"),
    (r"\boxed {9}", "9"),
    # multiple boxes: only the last counts; a box inside a box is found first
    (r"first \boxed{1} then \boxed{2}", "2"),
    (r"\boxed{\boxed{1} + 1}", "1"),
    (r"\boxed{1} \boxedfoo{2}", "1"),
    # unclosed / truncated / unrecognised last box: no answer, no fallback to an earlier box
    (r"\boxed{1", None),
    (r"\boxed{1} and \boxed{2", None),
    (r"\fbox{1} and \fbox{2", None),
    (r"\boxed{1} ends with \boxed", None),
    (r"\boxed{1} then \boxed\frac12", None),
    (r"\boxed{1} then \boxed5", None),
    # no box
    ("no box here", None),
    ("", None),
    (None, None),
    (12, None),
    # empty box: "" (a box, but nothing in it), not None
    (r"\boxed{}", ""),
    (r"\boxed{   }", ""),
    (r"\boxed{1} and \boxed{}", ""),
    # content is stripped
    ("\\boxed{ I(0) e^{-t} \n}", "I(0) e^{-t}"),
]


@pytest.mark.parametrize(("text", "expected"), CASES)
def test_last_boxed_rules(text, expected):
    assert last_boxed(text) == expected


def test_find_last_box_keeps_whitespace_and_signals():
    assert find_last_box(r"\boxed{ 5 }") == " 5 "
    assert find_last_box(r"\boxed{1} and \boxed{2") is NOT_FOUND
    assert find_last_box("no box") is NOT_FOUND
    assert find_last_box(None) is NOT_FOUND
    assert find_last_box(r"\boxed{123456}", max_chars=3) is TOO_LONG
    assert find_last_box(r"\boxed 123456", max_chars=3) is TOO_LONG
    assert find_last_box(r"\boxed{123}", max_chars=3) == "123"
    assert repr(NOT_FOUND) == "NOT_FOUND" and repr(TOO_LONG) == "TOO_LONG"


def test_match_brace():
    assert match_brace(r"\frac{a{b}}{c}", 5) == "a{b}"
    assert match_brace(r"{\}}", 0) == r"\}"
    assert match_brace("{open", 0) is NOT_FOUND
    assert match_brace("{abcdef}", 0, max_chars=3) is TOO_LONG


def test_docstring_examples():
    res = doctest.testmod(answers)
    assert res.attempted >= 10 and res.failed == 0


def test_large_inputs_are_linear():
    import time

    t0 = time.monotonic()
    assert last_boxed("\\boxed{1} " * 40000 + "x" * 1_000_000) == "1"
    assert last_boxed("\\boxed{" + "{" * 200_000 + "1") is None
    assert last_boxed("$$" + "\\boxed{1" * 20000) is None
    assert time.monotonic() - t0 < 2.0


# --------------------------------------------------------------- one extractor, both sides


def test_data_and_grader_use_the_same_function():
    assert rd.last_boxed is answers.last_boxed
    assert grader.last_boxed is answers.last_boxed
    assert reward_pkg.last_boxed is answers.last_boxed
    assert grader.find_last_box is answers.find_last_box
    assert "last_boxed" not in rd.__all__  # data.py no longer presents its own


def test_no_twin_extractor_in_recipe():
    """Only recipe/reward/answers.py defines a last-box extractor or a brace matcher."""
    names = {"last_boxed", "find_last_box", "_find_last_box", "match_brace", "_match_brace"}
    defs = []
    for path in sorted((REPO_ROOT / "recipe").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in names:
                defs.append((path.relative_to(REPO_ROOT).as_posix(), node.name))
    assert sorted(defs) == [
        ("recipe/reward/answers.py", "find_last_box"),
        ("recipe/reward/answers.py", "last_boxed"),
        ("recipe/reward/answers.py", "match_brace"),
    ]


def _gold(solution: str) -> str | None:
    """The gold answer data.py writes for a Minerva-style row, or None when it skips it."""
    res = rd.convert_rows("minerva_math", "test", [{"problem": "Q", "solution": solution}])
    return res.records[0]["reward_model"]["ground_truth"] if res.records else None


def _graded(response: str) -> str | None:
    """What the grader would send to math-verify as the model's answer (None: no_answer)."""
    g = grader.SafeGrader(num_workers=1)  # the pool is lazy: nothing starts here
    try:
        out = g._prepare(response, "1", "boxed")
    finally:
        g.close()
    if isinstance(out, grader.GradeResult):
        assert out.status == "no_answer"
        return None
    return out[2]


@pytest.mark.parametrize(
    "text",
    [
        r"\boxed{1} and \boxed{2",
        r"\fbox{3}",
        r"so $\boxed 5$.",
        r"\boxed{\{1,2\}}",
        r"a \boxed{1} b \boxed{\frac{1}{2}} c",
        "\\boxed{ I(0) e^{-t} \n}",
        r"\boxed{}",
        r"\boxed{1} ends with \boxed",
        r"\boxed{1} \boxedfoo{2}",
        "no box",
    ],
)
def test_gold_and_model_answers_agree(text):
    """The same text gives the same answer as a gold solution and as a model response."""
    expected = last_boxed(text) or None  # "" (empty box) is no answer on both sides
    assert _gold(text) == expected
    assert _graded(text) == expected
    assert grader.extract_answer(text) == last_boxed(text)
