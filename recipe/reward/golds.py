"""Gold-answer normalisation at conversion time (issue 16).

:func:`normalise_gold` is called by :func:`recipe.data.convert_rows` on every extracted
gold answer, so that a correct natural answer can match it when graded. It rewrites only
forms that no grader reads as the author meant (all found in Minerva Math, whose golds are
copied from the solutions' boxes); every other gold is returned unchanged:

* **E-notation** (``4.5e33``, ``1e-5``; 58 Minerva rows): math-verify reads ``e`` as
  Euler's number (``33 + 4.5 e``). Rewritten as ``4.5 \\times 10^{33}``, which LaTeX,
  ``10^{-5}``-style and decimal answers match.
* **Python-style floats** (``-1./3``, ``-3./2``: Minerva rows 38, 49): a number with a
  trailing dot. Rewritten as a LaTeX fraction ``-\\frac{1}{3}``.
* **Code-like golds** (``np.arcsin(10/13)``: Minerva row 5): ``np.`` / ``numpy.`` /
  ``math.`` functions become LaTeX commands (``\\arcsin(10/13)``).
* **Stray delimiters** (``x_{0} \\cos (\\omega t)+$ $\\dot{x}_{0} ...``: Minerva row 72):
  unescaped ``$`` inside the answer are removed (an answer wrapped as a whole in one
  ``$...$`` pair keeps it; ``\\$`` is kept).

Source of the cases: the evaluation review (``docs/reviews/EVAL.md``) and issue 16.
"""

from __future__ import annotations

import re

__all__ = ["normalise_gold", "e_notation_to_latex"]

_E_NOTATION_RE = re.compile(r"([+-]?)(\d+(?:\.\d*)?|\.\d+)[eE]([+-]?)(\d+)")
_PY_FRACTION_RE = re.compile(r"([+-]?)(\d+)\.?\s*/\s*(\d+)\.?")
_PY_FLOAT_RE = re.compile(r"([+-]?)(\d+)\.")
_CODE_FUNC_RE = re.compile(r"\b(?:np|numpy|math)\.(arcsin|arccos|arctan|sinh|cosh|tanh|sin|cos|tan|exp|log|ln|pi|e)\b")
_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")


def e_notation_to_latex(text: str) -> str | None:
    """``"4.5e33"`` -> ``"4.5 \\times 10^{33}"``; None when ``text`` is not one E-notation number.

    Args:
        text: A whole answer string.

    Returns:
        ``<mantissa> \\times 10^{<exponent>}`` (the sign kept on both, a ``+`` and leading
        zeros dropped from the exponent), or None.
    """
    m = _E_NOTATION_RE.fullmatch(text.strip())
    if m is None:
        return None
    sign, mantissa, esign, exp = m.groups()
    exp = str(int(exp))
    if esign == "-" and exp != "0":
        exp = "-" + exp
    return f"{'-' if sign == '-' else ''}{mantissa} \\times 10^{{{exp}}}"


def normalise_gold(gold: str, data_source: str) -> str:
    """Returns ``gold`` rewritten into a form a correct answer can match (rules in the module doc).

    Args:
        gold: The extracted gold answer (LaTeX or plain text).
        data_source: The dataset name (``minerva_math``, ``math500``, ...); the rules are
            the same for every dataset (they match only forms that no dataset means
            literally).

    Returns:
        The normalised gold; unchanged when no rule applies.
    """
    del data_source
    if not isinstance(gold, str):
        return gold
    g = gold.strip()
    sci = e_notation_to_latex(g)
    if sci is not None:
        return sci
    m = _PY_FRACTION_RE.fullmatch(g)
    if m is not None and "." in g:
        sign, num, den = m.groups()
        return f"{'-' if sign == '-' else ''}\\frac{{{num}}}{{{den}}}"
    m = _PY_FLOAT_RE.fullmatch(g)
    if m is not None:
        return f"{'-' if m.group(1) == '-' else ''}{m.group(2)}"
    if _CODE_FUNC_RE.search(g):
        g = _CODE_FUNC_RE.sub(lambda mm: "\\" + mm.group(1), g)
    dollars = _UNESCAPED_DOLLAR_RE.findall(g)
    if dollars and not (len(dollars) == 2 and g.startswith("$") and g.endswith("$") and len(g) > 1):
        g = re.sub(r"\s+", " ", _UNESCAPED_DOLLAR_RE.sub("", g)).strip()
    return g if g != gold.strip() else gold
