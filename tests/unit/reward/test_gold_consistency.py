"""Every gold answer of the 7 local benchmarks grades correct against itself (issue 16).

For every converted row (``recipe.data.load_records``) of GSM8K (train, test), MATH train,
MATH500, Minerva Math, OlympiadBench, AIME24 and AMC23, the gold answer in a box is graded
by the training reward's grader (strict mode) against the gold; for numeric golds (a plain
decimal, or ``a \\times 10^{b}`` as :func:`recipe.reward.golds.normalise_gold` writes
E-notation) its plain decimal form and its scientific LaTeX form are graded too. Every
failure must be in :data:`ALLOWED` with its reason. Skipped when ../shared/data is absent.
"""

from __future__ import annotations

import re
from decimal import Decimal

import pytest

from recipe import data as data_mod

SPLITS = [
    ("gsm8k", "train"), ("gsm8k", "test"), ("math", "train"), ("math500", "test"),
    ("minerva_math", "test"), ("olympiadbench", "test"), ("aime24", "test"), ("amc23", "test"),
]

#: (dataset, split, row index, form) -> why it cannot grade correct. Empty: every gold of the
#: 7 benchmarks, and every decimal / scientific form of the numeric ones, grades correct.
ALLOWED: dict[tuple[str, str, int, str], str] = {}

_DECIMAL_RE = re.compile(r"-?\d+(?:\.\d+)?")
_SCI_RE = re.compile(r"(-?\d+(?:\.\d+)?) \\times 10\^\{(-?\d+)\}")


def numeric_value(gold: str) -> Decimal | None:
    """The value of a plain-decimal or ``a \\times 10^{b}`` gold, else None."""
    g = gold.strip()
    if _DECIMAL_RE.fullmatch(g):
        return Decimal(g)
    m = _SCI_RE.fullmatch(g)
    if m:
        return Decimal(m.group(1)).scaleb(int(m.group(2)))
    return None


def decimal_form(v: Decimal) -> str:
    """Plain decimal without exponent or trailing zeros: 4.5e33 -> '4500...0', 2.5e-6 -> '0.0000025'."""
    s = format(v.normalize(), "f")
    return s


def scientific_form(v: Decimal) -> str | None:
    """``m \\times 10^{e}`` with one digit before the point (None for 0)."""
    if v == 0:
        return None
    sign, digits, exp = v.normalize().as_tuple()
    e = exp + len(digits) - 1
    mant = str(digits[0]) + ("." + "".join(map(str, digits[1:])) if len(digits) > 1 else "")
    return f"{'-' if sign else ''}{mant} \\times 10^{{{e}}}"


def test_forms_hand_computed():
    assert numeric_value("4.5 \\times 10^{33}") == Decimal("4.5e33")
    assert decimal_form(Decimal("4.5e33")) == "45" + "0" * 32
    assert decimal_form(Decimal("2.7778e-6")) == "0.0000027778"
    assert scientific_form(Decimal("14903")) == "1.4903 \\times 10^{4}"
    assert scientific_form(Decimal("-0.5")) == "-5 \\times 10^{-1}"
    assert numeric_value("\\frac{1}{2}") is None


@pytest.fixture(scope="module")
def grader():
    from recipe.reward.grader import SafeGrader

    with SafeGrader(num_workers=2) as g:
        yield g


@pytest.mark.parametrize("dataset,split", SPLITS)
def test_every_gold_grades_correct(dataset, split, grader):
    try:
        records = data_mod.load_records(dataset, split)
    except FileNotFoundError as e:
        pytest.skip(f"no local data: {e}")
    style = "gsm8k" if dataset == "gsm8k" else "boxed"
    items, keys = [], []
    for r in records:
        gold = r["reward_model"]["ground_truth"]
        idx = r["extra_info"]["index"]
        forms = {"boxed": f"\\boxed{{{gold}}}"}
        v = numeric_value(gold)
        if v is not None:
            forms["decimal"] = f"\\boxed{{{decimal_form(v)}}}"
            sci = scientific_form(v)
            if sci is not None:
                forms["scientific"] = f"\\boxed{{{sci}}}"
        for name, text in forms.items():
            items.append((text, gold, style))
            keys.append((dataset, split, idx, name))
    unique = list(dict.fromkeys(items))  # GSM8K golds repeat: grade each distinct item once
    graded = dict(zip(unique, grader.grade_batch(unique)))
    results = [graded[it] for it in items]
    failed = {k: (it[0], res.status, res.reason) for k, it, res in zip(keys, items, results) if not res.correct}
    unexpected = {k: v for k, v in failed.items() if k not in ALLOWED}
    assert not unexpected, f"{len(unexpected)} of {len(items)} forms grade wrong: {list(unexpected.items())[:20]}"
    stale = [k for k in ALLOWED if k[:2] == (dataset, split) and k not in failed]
    assert not stale, f"allowed failures that now pass (remove them): {stale}"
