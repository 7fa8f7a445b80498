"""The one extractor of final answers from LaTeX text: the last ``\\boxed{...}``.

Both sides of grading use this module, so a gold answer and a model answer are always
extracted by the same rules:

* :mod:`recipe.data` takes the gold answer of a row that has only a worked solution
  (Minerva Math, hub rows of MATH) as :func:`last_boxed` of the solution;
* :mod:`recipe.reward.grader` takes the model's answer as the last box of the response
  (through :func:`find_last_box`, which adds a length cap, and :func:`last_boxed`).

The rules are those of the grader, which is what the training reward has always used:

* **Commands.** ``\\boxed`` and ``\\fbox`` both count. A longer command that starts with
  one of them (``\\boxedfoo``, a letter or ``@`` right after the name) is not a box and
  is skipped; the search goes on to the left of it.
* **Which box.** Only the LAST box counts, searching from the end of the text; a box
  nested in another box is found before the outer one (``\\boxed{\\boxed{1}}`` gives
  ``1``).
* **Braced form.** ``\\boxed{...}`` (spaces allowed before ``{``): the content up to the
  matching ``}``. Nesting is counted; an escaped character (``\\{``, ``\\}``, ``\\\\``)
  never counts as a brace, so ``\\boxed{\\{1,2\\}}`` gives ``\\{1,2\\}``. Unbalanced
  closing braces after the match are ignored (``\\boxed{a}}}`` gives ``a``).
* **Unbraced form.** ``\\boxed 5`` (at least one space, then no ``{``): the text up to
  the next ``$`` or newline (``$\\boxed 7$`` gives ``7``). ``\\boxed\\frac12`` and
  ``\\boxed5`` (no space) are not recognised.
* **Unclosed or truncated last box** (``\\boxed{1} and \\boxed{2``, text ending in
  ``\\boxed``, ``\\boxed\\frac12``): **no answer** (``None``); there is NO fallback to
  an earlier box. For a model output this is the case that matters: a response cut off
  at the length limit while writing its final box has not given an answer, and an
  earlier box is at best an intermediate result, so it must not earn the reward. A gold
  solution whose last box is broken is malformed, and taking an earlier box there would
  silently grade against an intermediate value; the row is skipped instead (reason
  ``no_boxed_answer``). The old dataset-side extractor fell back to the previous box; on
  the local data files the fallback never fired, so no gold answer changed.
* **Empty box.** ``\\boxed{}`` (or only spaces) gives ``""``, not ``None``: a box was
  written but holds nothing. Both callers treat ``""`` as no answer (the grader scores it
  ``no_answer``; data preparation skips the row).
* **Whitespace.** :func:`last_boxed` strips the content (``\\boxed{ x \\n}`` gives
  ``x``); surrounding whitespace is never part of a LaTeX answer, and the grader has
  always stripped it before grading. :func:`find_last_box` returns it unstripped so that
  its length cap counts the raw text.

Everything is a linear-time string scan (regex-driven brace matching, ``str.rfind``), safe
on untrusted, very long model outputs.

Public API: :func:`last_boxed`, :func:`find_last_box`, :func:`match_brace`,
:data:`NOT_FOUND`, :data:`TOO_LONG`, :data:`BOX_COMMANDS`.
"""

from __future__ import annotations

import re

__all__ = [
    "BOX_COMMANDS",
    "NOT_FOUND",
    "TOO_LONG",
    "find_last_box",
    "harness_answer",
    "last_boxed",
    "match_brace",
]

#: The LaTeX commands whose argument is a final answer.
BOX_COMMANDS: tuple[str, ...] = ("\\boxed", "\\fbox")

# One escaped character (``\{``, ``\}``, ``\\``) or one brace.
_BRACE_TOKEN_RE = re.compile(r"\\.|[{}]", re.DOTALL)


class _Sentinel:
    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


#: Returned by :func:`match_brace` / :func:`find_last_box`: no (complete) box.
NOT_FOUND = _Sentinel("NOT_FOUND")
#: Returned by :func:`match_brace` / :func:`find_last_box`: the content exceeds ``max_chars``.
TOO_LONG = _Sentinel("TOO_LONG")


def match_brace(text: str, open_pos: int, max_chars: int | None = None) -> str | _Sentinel:
    """Returns the content of the brace group that opens at ``text[open_pos]``.

    Nesting is counted and escaped characters (``\\{``, ``\\}``, ``\\\\``) are skipped.
    Linear in the scanned length.

    Args:
        text: The text.
        open_pos: Index of the opening ``{``.
        max_chars: When given, stop scanning after ``max_chars + 1`` content characters.

    Returns:
        The content between the braces (unstripped); :data:`NOT_FOUND` when the group is
        never closed; :data:`TOO_LONG` when ``max_chars`` is given and the content is
        longer.

    Examples:
        >>> match_brace(r"\\frac{a{b}}{c}", 5)
        'a{b}'
        >>> match_brace(r"{\\{x}", 0)
        '\\\\{x'
        >>> match_brace("{never closed", 0)
        NOT_FOUND
        >>> match_brace("{abcdef}", 0, max_chars=3)
        TOO_LONG
    """
    depth = 1
    start = open_pos + 1
    end = len(text) if max_chars is None else min(len(text), start + max_chars + 1)
    for m in _BRACE_TOKEN_RE.finditer(text, start, end):
        tok = m.group()
        if tok == "{":
            depth += 1
        elif tok == "}":
            depth -= 1
            if depth == 0:
                return text[start : m.start()]
    if max_chars is not None and end < len(text):
        return TOO_LONG
    return NOT_FOUND


def find_last_box(text: str | None, max_chars: int | None = None) -> str | _Sentinel:
    """Finds the last ``\\boxed``/``\\fbox`` of ``text`` (the rules of the module docstring).

    Args:
        text: LaTeX text: a model response or a worked solution.
        max_chars: When given, a box whose content is longer gives :data:`TOO_LONG`
            without scanning the rest of it (the grader's cap on untrusted input).

    Returns:
        The box content, unstripped (``""`` for ``\\boxed{}``); :data:`NOT_FOUND` when
        there is no box or the last box is unclosed, truncated or not in a recognised
        form; :data:`TOO_LONG` as above.

    Examples:
        >>> find_last_box(r"\\boxed{ 5 }")
        ' 5 '
        >>> find_last_box(r"\\boxed{1} and \\boxed{2")
        NOT_FOUND
        >>> find_last_box(r"\\boxed{123456}", max_chars=3)
        TOO_LONG
    """
    if not text:
        return NOT_FOUND
    n = len(text)
    pos = n
    while pos > 0:
        i = max(text.rfind(cmd, 0, pos) for cmd in BOX_COMMANDS)
        if i < 0:
            return NOT_FOUND
        cmd = "\\boxed" if text.startswith("\\boxed", i) else "\\fbox"
        j = i + len(cmd)
        if j < n and (text[j].isalpha() or text[j] == "@"):
            pos = i  # another command such as \boxedfoo: keep looking further left
            continue
        k = j
        while k < n and text[k].isspace():
            k += 1
        if k >= n:
            return NOT_FOUND  # truncated right after \boxed
        if text[k] == "{":
            return match_brace(text, k, max_chars)
        if k > j:
            # "\boxed 5$" form: one token up to the next "$" or end of line.
            stop = len(text) if max_chars is None else min(len(text), k + max_chars + 1)
            token = text[k:stop].split("$", 1)[0].split("\n", 1)[0]
            if max_chars is not None and len(token) > max_chars:
                return TOO_LONG
            token = token.strip()
            return token if token else NOT_FOUND
        return NOT_FOUND  # e.g. "\boxed\frac12": not a form we grade
    return NOT_FOUND


def last_boxed(text: str | None) -> str | None:
    """Returns the stripped content of the last ``\\boxed{...}`` / ``\\fbox{...}`` in ``text``.

    The single extractor for gold answers (:mod:`recipe.data`) and model answers
    (:mod:`recipe.reward.grader`); the rules are in the module docstring.

    Args:
        text: LaTeX text: a model response or a worked solution. ``None`` and non-strings
            give ``None``.

    Returns:
        The stripped content of the last box (``""`` for an empty ``\\boxed{}``), or
        ``None`` when there is no box or the last box is unclosed or truncated.

    Examples:
        Nested braces; only the last box counts:

        >>> last_boxed(r"first \\boxed{1}, then \\boxed{\\frac{1}{2}}")
        '\\\\frac{1}{2}'

        Escaped braces do not count:

        >>> last_boxed(r"\\boxed{\\{1, 2\\}}")
        '\\\\{1, 2\\\\}'

        ``\\fbox`` counts like ``\\boxed``:

        >>> last_boxed(r"\\fbox{3}")
        '3'

        The unbraced form, ended by ``$`` or a newline:

        >>> last_boxed(r"so $\\boxed 5$.")
        '5'

        An unclosed last box is no answer (no fallback to the earlier box):

        >>> last_boxed(r"\\boxed{1} and \\boxed{2") is None
        True

        No box; an empty box:

        >>> last_boxed("no box here") is None
        True
        >>> last_boxed(r"\\boxed{}")
        ''
    """
    if not isinstance(text, str) or not text:
        return None
    res = find_last_box(text)
    return res.strip() if isinstance(res, str) else None


# ---------------------------------------------------------------------------------------
# The Qwen2.5-Math evaluation harness's extraction (grading mode "harness")
# ---------------------------------------------------------------------------------------

_HARNESS_NUMBER_RE = re.compile(r"-?\d*\.?\d+")
#: Characters scanned for the "the answer is" / last-number fallbacks (untrusted text).
HARNESS_TAIL_CHARS = 3000


def harness_answer(text: str | None, max_chars: int | None = 1000) -> str | None:
    """The final answer as the Qwen2.5-Math evaluation harness extracts it (``parser.extract_answer``).

    In order: the last box (:func:`find_last_box`, as in strict mode); else the text after
    the last ``"he answer is"`` (``The answer is`` / ``the answer is``), else after the
    last ``"final answer is"``; else the last number of the text (regex ``-?\\d*\\.?\\d+``
    with commas removed). Only the last :data:`HARNESS_TAIL_CHARS` characters are searched
    for the fallbacks. Then Qwen's clean-up: newlines with their indentation removed, a
    leading ``:`` and a trailing ``.`` or ``/`` dropped, and an answer wrapped in one
    ``$...$`` pair unwrapped.

    Source: QwenLM/Qwen2.5-Math, ``evaluation/parser.py`` (``extract_answer``, also used
    by hkust-nlp/simpleRL-reason's ``math_eval``).

    Args:
        text: The model response (untrusted).
        max_chars: Answers longer than this give None (the grader's length cap).

    Returns:
        The answer (stripped), or None when nothing is found (or it is empty / too long).
    """
    if not isinstance(text, str) or not text.strip():
        return None
    box = find_last_box(text, max_chars)
    if box is TOO_LONG:
        return None
    if isinstance(box, str):
        pred = box
    else:
        tail = text[-HARNESS_TAIL_CHARS:]
        pred = None
        for marker in ("he answer is", "final answer is"):
            i = tail.rfind(marker)
            if i >= 0:
                pred = tail[i + len(marker) :]
                break
        if pred is None:
            nums = _HARNESS_NUMBER_RE.findall(tail.replace(",", ""))
            pred = nums[-1] if nums else ""
    pred = re.sub(r"\n\s*", "", pred).strip()
    if pred.startswith(":"):
        pred = pred[1:].strip()
    while pred and pred[-1] in "./":
        pred = pred[:-1].rstrip()
    if len(pred) > 1 and pred.startswith("$") and pred.endswith("$") and pred.count("$") == 2:
        pred = pred[1:-1].strip()
    if not pred or (max_chars is not None and len(pred) > max_chars):
        return None
    return pred
