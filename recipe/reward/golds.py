"""Gold-answer normalisation at conversion time (issue 16 fills this in).

:func:`normalise_gold` is called by :func:`recipe.data.convert_rows` on every extracted
gold answer, so that a correct natural answer can match it when graded.
"""

from __future__ import annotations


def normalise_gold(gold: str, data_source: str) -> str:
    """Returns ``gold`` rewritten into a form a correct answer can match.

    Args:
        gold: The extracted gold answer (LaTeX or plain text).
        data_source: The dataset name (``minerva_math``, ``math500``, ...).

    Returns:
        The normalised gold (today: unchanged).
    """
    return gold
