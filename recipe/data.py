"""Dataset preparation: math benchmarks and training sets as verl-format parquet files.

verl's ``RLHFDataset`` reads parquet files with one row per problem and these columns
(exactly these; this module writes nothing else):

* ``data_source`` (str): short dataset name, one of :data:`DATASETS` (``gsm8k``,
  ``math``, ``math500``, ``minerva_math``, ``olympiadbench``, ``aime24``, ``amc23``), of
  :data:`PAPER_DATASETS`, or the name given to a user's file (``--data-source``).
  The reward function dispatches on it (``gsm8k`` means a GSM8K-style numeric answer).
* ``prompt`` (list of chat messages): ``[{"role": "user", "content": ...}]``, the
  prompt template applied to the problem (the ``qwen_math_cot`` preset puts the
  instruction in a preceding ``system`` message instead, see :data:`TEMPLATES`).
* ``ability`` (str): always ``"math"``.
* ``reward_model`` (dict): ``{"style": "rule", "ground_truth": <str>}``.
* ``extra_info`` (dict): ``split`` (str), ``index`` (int: the row's position in the
  source file, counted from 0 over all records, skipped ones included), ``question``
  (the raw problem text), ``answer`` (the raw answer or solution text of the source,
  as a str), plus a few dataset-specific fields (``solution``, ``level``, ``id``, ...;
  the same keys for every row of one file, ``None`` where a row has no value).

Ground truth per dataset (the local files are described in ``shared/data/README.md``):

* ``gsm8k`` (train, test): the text after the last ``####`` of ``answer``, with
  thousands commas removed (``"1,000"`` -> ``"1000"``) and stripped.
* ``math`` (train; the 7,474 MATH training problems of ``math_train/math.json``): the
  ``answer`` field; when a row has none (hub rows of MATH carry only a ``solution``),
  the content of the last ``\\boxed{...}`` of ``solution`` (same rules as
  ``minerva_math`` below). The four local rows with
  an empty answer are skipped with a warning.
* ``math500`` (test): ``answer``.
* ``minerva_math`` (test): the content of the LAST ``\\boxed{...}`` of ``solution``
  (found by :func:`recipe.reward.answers.last_boxed`, the same extractor the grader
  applies to model answers: nested braces work, escaped ``\\{``/``\\}`` do not count,
  ``\\fbox{...}`` and ``\\boxed 5`` count too, and a solution whose last box is
  unclosed or empty is skipped as ``no_boxed_answer``, never graded against an earlier
  box); a row that has an ``answer`` field (the hub copy) uses it instead.
* ``olympiadbench`` (test; the 675 open-ended, text-only, English competition maths
  problems, ``OE_TO_maths_en_COMP``): ``final_answer`` is a list of LaTeX strings. In
  the real data every list has exactly one element, but 94 rows are
  ``is_multiple_answer`` and pack several answers into that one string, often as
  separate math spans such as ``"$69$,$84$"`` or ``"$f(x)=x$,$f(x)=2-x$"``. Each
  element is cleaned as follows: a comma-separated sequence of ``$...$`` spans is
  split into its spans; otherwise the surrounding ``$`` pair is stripped and any
  stray unescaped ``$`` left inside is removed (row 194, ``"$221,$8$"``, becomes
  ``"221,8"``; row 73, a sentence with inline maths, loses its ``$`` delimiters); a
  trailing full stop is dropped (row 76). All the resulting answers are joined with
  ``", "`` (``"$69$,$84$"`` -> ``"69, 84"``). Plain-text lists such as ``"1,3,5"`` and
  tuples are kept as they are. The ``unit`` field (8 rows, e.g. ``"km"``) is not
  appended to the ground truth (graders compare the number); it is kept in
  ``extra_info`` with ``answer_type``, ``is_multiple_answer`` and ``error`` (one
  row's numeric tolerance, ``"1e-1"``). A non-empty ``context`` (none in the local
  file) is put before the question, separated by a blank line.
* ``aime24`` (test): ``answer`` such as ``"025"`` normalised to the integer string
  ``"25"`` (a non-integer answer is kept as it is, stripped).
* ``amc23`` (test): ``answer`` float such as ``27.0`` -> ``"27"``; non-integers keep
  their decimal form (``0.5`` -> ``"0.5"``).

Rows with an empty or missing problem, or with no usable ground truth, are skipped:
each skipped row is counted by reason (``missing_problem``, ``missing_answer``,
``no_boxed_answer``, ``malformed_json``) and logged as a warning that names the file
and the row index (the first :data:`MAX_ROW_WARNINGS` individually, then one summary
line). A malformed line of a JSON-lines file is **skipped** with a warning naming the
file and its 1-based line number; a ``.json`` array file that does not parse is an
error.

Command line::

    python -m recipe.data --datasets gsm8k,math500 --out-dir DIR \\
        [--source-dir ../shared/data | --source hub] [--template boxed] [--max-rows N] \\
        [--max-prompt-tokens 700 --tokenizer PATH [--length-of problem|prompt]]
    python -m recipe.data --input FILE --out OUT [--problem-key K] [--answer-key K | --solution-key K] \\
        [--data-source NAME] [--split train] [--rows-key K] [--template ...] [--max-prompt-tokens ...]

The first form writes ``DIR/<dataset>/<split>.parquet`` for every split of each named
dataset (``--datasets all`` for the seven of :data:`DATASETS`; the papers' sets of
:data:`PAPER_DATASETS` by name) and prints one summary line per file. The second
converts a user's JSON-lines, JSON or parquet file of problems (:func:`convert_file`),
or, when ``FILE`` is already a verl parquet (:func:`is_verl_parquet`), validates it and
copies it unchanged to ``OUT``. ``--max-prompt-tokens`` drops rows longer than that many
tokens of the model's tokenizer (:class:`PromptLengthFilter`; counted as
``prompt_too_long``). Every output is written to a temporary file in the destination
directory and then moved into place (:mod:`recipe.io`), so a reader never sees half a file.

The local source directory defaults to ``$RECIPE_SHARED_DIR/data`` when that variable
is set, else to ``../shared/data`` relative to the repository root (the parent of the
``recipe`` package directory). With ``--source hub`` the same datasets are loaded with
:func:`datasets.load_dataset` from the Hugging Face hub ids in :data:`DATASETS` and
mapped to records by the same function (:func:`convert_rows`).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import math
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from recipe.reward.answers import last_boxed
from recipe.reward.golds import normalise_gold
from recipe.io import atomic_write

logger = logging.getLogger("recipe.data")

__all__ = [
    "COLUMNS",
    "DATASETS",
    "DataError",
    "DatasetSpec",
    "LENGTH_OF",
    "MAX_ROW_WARNINGS",
    "PAPER_DATASETS",
    "PromptLengthFilter",
    "PromptTemplate",
    "SplitResult",
    "TEMPLATES",
    "ConversionResult",
    "answer_value",
    "convert_file",
    "convert_rows",
    "convert_split",
    "default_data_source",
    "default_source_dir",
    "download_cache_dir",
    "file_spec",
    "is_verl_parquet",
    "load_records",
    "main",
    "olympiadbench_answer",
    "orz_row",
    "passthrough",
    "prepare",
    "read_source_rows",
    "resolve_template",
    "validate_verl_parquet",
    "write_parquet",
]

#: The columns of a verl-format parquet file, in the order they are written.
COLUMNS: tuple[str, ...] = ("data_source", "prompt", "ability", "reward_model", "extra_info")

#: How many skipped rows are warned about one by one before a single summary line.
MAX_ROW_WARNINGS = 10

#: Environment variable naming the shared folder that contains ``data/``.
SHARED_DIR_ENV = "RECIPE_SHARED_DIR"

_BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


class DataError(ValueError):
    """A source file, a row or a parquet file does not have the expected content."""


class _SkipRow(Exception):
    """Raised by an answer extractor: the row has no usable ground truth."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt template.

    Attributes:
        user: Content of the user message; ``{problem}`` is replaced by the problem
            text (a plain substitution: other braces such as ``\\boxed{}`` are literal).
        system: Content of an optional system message put before the user message.
    """

    user: str
    system: str | None = None

    def messages(self, problem: str) -> list[dict[str, str]]:
        """Returns the chat messages for one problem."""
        msgs = []
        if self.system is not None:
            msgs.append({"role": "system", "content": self.system})
        msgs.append({"role": "user", "content": self.user.replace("{problem}", problem)})
        return msgs


#: Named prompt presets. ``boxed`` (the default) appends the step-by-step/boxed
#: instruction to the problem in the user message. ``qwen_math_cot`` is the
#: Qwen2.5-Math evaluation "qwen25-math-cot" prompt: the same instruction as a system
#: message, the bare problem as the user message. ``plain`` is the bare problem.
#: ``minimal_rl`` is the Minimalist public code's Numina prompt (RLHFlow/Minimal-RL,
#: ``scripts/data_preprocess/numina_math.py``): the same system message, and the problem
#: followed by " Let's think step by step and output the final answer within \boxed{}.".
TEMPLATES: dict[str, PromptTemplate] = {
    "boxed": PromptTemplate(user="{problem}\n" + _BOXED_INSTRUCTION),
    "qwen_math_cot": PromptTemplate(user="{problem}", system=_BOXED_INSTRUCTION),
    "plain": PromptTemplate(user="{problem}"),
    "minimal_rl": PromptTemplate(
        user="{problem} Let's think step by step and output the final answer within \\boxed{}.",
        system=_BOXED_INSTRUCTION,
    ),
}


def resolve_template(template: str | PromptTemplate) -> PromptTemplate:
    """Turns a preset name or a literal template string into a :class:`PromptTemplate`.

    Args:
        template: A name in :data:`TEMPLATES`, a literal user-message template that
            contains ``{problem}``, or a :class:`PromptTemplate`.

    Returns:
        The template.

    Raises:
        ValueError: ``template`` is neither a preset name nor a string containing
            ``{problem}``.
    """
    if isinstance(template, PromptTemplate):
        if "{problem}" not in template.user:
            raise ValueError(f"prompt template {template.user!r} lacks the placeholder {{problem}}")
        return template
    if not isinstance(template, str):
        raise ValueError(f"prompt template must be a string, not {type(template).__name__}")
    if template in TEMPLATES:
        return TEMPLATES[template]
    if "{problem}" not in template:
        raise ValueError(
            f"prompt template {template!r} is not a preset ({', '.join(TEMPLATES)}) and lacks "
            "the placeholder {problem}"
        )
    return PromptTemplate(user=template)


# ---------------------------------------------------------------------- answer helpers


def _text(value: Any) -> str | None:
    """Returns a stripped non-empty string for ``value``, else ``None``."""
    if value is None:
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    s = str(value).strip()
    return s or None


def _first(row: Mapping[str, Any], keys: Iterable[str]) -> Any:
    for k in keys:
        if k in row and _text(row[k]) is not None:
            return row[k]
    return None


def _gsm8k_answer(row: Mapping[str, Any]) -> str:
    raw = _text(row.get("answer"))
    if raw is None:
        raise _SkipRow("missing_answer")
    if "####" not in raw:
        raise _SkipRow("missing_answer")
    gt = raw.rsplit("####", 1)[1].replace(",", "").strip()
    if not gt:
        raise _SkipRow("missing_answer")
    return gt


def _boxed_from_solution(row: Mapping[str, Any]) -> str:
    """The last ``\\boxed{}`` of ``row["solution"]`` (skips the row when there is none)."""
    if _text(row.get("solution")) is None:
        raise _SkipRow("missing_answer")
    boxed = last_boxed(row["solution"])
    if not boxed:
        raise _SkipRow("no_boxed_answer")
    return boxed


def _answer_or_boxed(row: Mapping[str, Any]) -> str:
    gt = _text(row.get("answer"))
    if gt is not None:
        return gt
    return _boxed_from_solution(row)


def _math500_answer(row: Mapping[str, Any]) -> str:
    gt = _text(row.get("answer"))
    if gt is None:
        raise _SkipRow("missing_answer")
    return gt


_DOLLAR_SPAN_LIST = re.compile(r"\$[^$]*\$(?:\s*,\s*\$[^$]*\$)+")
_DOLLAR_SPAN = re.compile(r"\$([^$]*)\$")
_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


def _clean_olympiad_answer(s: str) -> list[str]:
    s = s.strip()
    if _DOLLAR_SPAN_LIST.fullmatch(s):
        parts = [p.strip() for p in _DOLLAR_SPAN.findall(s)]
    else:
        if len(s) >= 2 and s.startswith("$") and s.endswith("$"):
            s = s[1:-1]
        parts = [_UNESCAPED_DOLLAR.sub("", s).strip()]
    out = []
    for p in parts:
        if p.endswith(".") and not p.endswith(".."):
            p = p[:-1].rstrip()
        if p:
            out.append(p)
    return out


def olympiadbench_answer(final_answer: Any) -> str | None:
    """Builds the OlympiadBench ground truth from its ``final_answer`` field.

    See the module docstring for the rules (split ``$a$,$b$`` span lists, strip the
    surrounding and stray ``$``, drop a trailing full stop, join with ``", "``).

    Args:
        final_answer: The ``final_answer`` value: a list of strings (or one string).

    Returns:
        The ground-truth string, or ``None`` when nothing is left.
    """
    if final_answer is None:
        return None
    items = [final_answer] if isinstance(final_answer, str) else list(final_answer)
    answers: list[str] = []
    for item in items:
        if _text(item) is not None:
            answers.extend(_clean_olympiad_answer(str(item)))
    return ", ".join(answers) or None


def _olympiad_answer(row: Mapping[str, Any]) -> str:
    gt = olympiadbench_answer(row.get("final_answer"))
    if gt is None:
        raise _SkipRow("missing_answer")
    return gt


def _integer_string(value: Any) -> str | None:
    """``"025"`` -> ``"25"``, ``27.0`` -> ``"27"``; other values as stripped strings."""
    if value is None or isinstance(value, bool):
        return _text(value)
    if isinstance(value, float):
        if math.isnan(value):
            return None
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, int):
        return str(value)
    s = _text(value)
    if s is None:
        return None
    if re.fullmatch(r"[+-]?\d+", s):
        return str(int(s))
    if re.fullmatch(r"[+-]?\d+\.0*", s):
        return str(int(float(s)))
    return s


def _integer_answer(row: Mapping[str, Any]) -> str:
    gt = _integer_string(row.get("answer"))
    if gt is None:
        raise _SkipRow("missing_answer")
    return gt


def _olympiad_problem(row: Mapping[str, Any]) -> Any:
    question = row.get("question")
    context = _text(row.get("context"))
    if context is not None and _text(question) is not None:
        return f"{context}\n\n{question}"
    return question


def _raw_str(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return "\n\n".join(str(v) for v in value)
    return str(value)


# -------------------------------------------------------------------- dataset registry


@dataclass(frozen=True)
class DatasetSpec:
    """How to read and convert one dataset.

    Attributes:
        name: The short name, also written as ``data_source``.
        splits: Split name -> local file path relative to the source directory.
        hub_id: Hugging Face hub dataset id used with ``--source hub``.
        hub_config: The hub config name, or ``None``.
        hub_splits: Split name -> hub split name.
        problem_keys: Row fields tried in order for the problem text.
        raw_answer_keys: Row fields tried in order for ``extra_info.answer``.
        extra_keys: Row fields copied into ``extra_info`` when present.
        ground_truth: Row -> ground-truth string (raises ``_SkipRow``).
        problem: Optional row -> problem text function overriding ``problem_keys``.
        urls: Split -> URL of a file (JSON, JSON lines or parquet) downloaded instead of
            :func:`datasets.load_dataset` with ``--source hub`` (sets published as one
            file outside the hub, e.g. Open-Reasoner-Zero's JSON); ``None``: the hub.
        adapt: Optional raw row -> mapping function applied before anything else (for
            rows that are not flat records, e.g. ORZ's ``[question turn, answer turn]``
            pairs); it returns ``None`` for a row of the wrong shape (skipped as
            ``malformed_row``).
    """

    name: str
    splits: dict[str, str]
    hub_id: str | None
    hub_config: str | None
    hub_splits: dict[str, str]
    problem_keys: tuple[str, ...]
    raw_answer_keys: tuple[str, ...]
    extra_keys: tuple[str, ...]
    ground_truth: Callable[[Mapping[str, Any]], str]
    problem: Callable[[Mapping[str, Any]], Any] | None = None
    urls: dict[str, str] | None = None
    adapt: Callable[[Any], Any] | None = None


#: The known datasets, by ``data_source`` name.
DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="gsm8k",
            splits={"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"},
            hub_id="openai/gsm8k",
            hub_config="main",
            hub_splits={"train": "train", "test": "test"},
            problem_keys=("question", "problem"),
            raw_answer_keys=("answer",),
            extra_keys=(),
            ground_truth=_gsm8k_answer,
        ),
        DatasetSpec(
            name="math",
            splits={"train": "math_train/math.json"},
            hub_id="DigitalLearningGmbH/MATH-lighteval",
            hub_config="default",
            hub_splits={"train": "train"},
            problem_keys=("problem", "question"),
            raw_answer_keys=("answer", "solution"),
            extra_keys=("type", "difficulty", "level", "solution"),
            ground_truth=_answer_or_boxed,
        ),
        DatasetSpec(
            name="math500",
            splits={"test": "math500/test.jsonl"},
            hub_id="HuggingFaceH4/MATH-500",
            hub_config=None,
            hub_splits={"test": "test"},
            problem_keys=("problem", "question"),
            raw_answer_keys=("answer",),
            extra_keys=("solution", "subject", "level", "unique_id"),
            ground_truth=_math500_answer,
        ),
        DatasetSpec(
            name="minerva_math",
            splits={"test": "minerva_math/test.jsonl"},
            hub_id="math-ai/minervamath",
            hub_config=None,
            hub_splits={"test": "test"},
            problem_keys=("problem", "question"),
            raw_answer_keys=("solution", "answer"),
            extra_keys=("type", "idx"),
            ground_truth=_answer_or_boxed,
        ),
        DatasetSpec(
            name="olympiadbench",
            splits={"test": "olympiadbench/test.jsonl"},
            hub_id="Hothan/OlympiadBench",
            hub_config="OE_TO_maths_en_COMP",
            hub_splits={"test": "train"},
            problem_keys=("question", "problem"),
            raw_answer_keys=("final_answer",),
            extra_keys=(
                "id",
                "subfield",
                "solution",
                "is_multiple_answer",
                "unit",
                "answer_type",
                "error",
            ),
            ground_truth=_olympiad_answer,
            problem=_olympiad_problem,
        ),
        DatasetSpec(
            name="aime24",
            splits={"test": "aime24/test.jsonl"},
            hub_id="HuggingFaceH4/aime_2024",
            hub_config=None,
            hub_splits={"test": "train"},
            problem_keys=("problem", "question"),
            raw_answer_keys=("answer",),
            extra_keys=("id", "solution", "url"),
            ground_truth=_integer_answer,
        ),
        DatasetSpec(
            name="amc23",
            splits={"test": "amc23/test.jsonl"},
            hub_id="math-ai/amc23",
            hub_config=None,
            hub_splits={"test": "test"},
            problem_keys=("problem", "question"),
            raw_answer_keys=("answer",),
            extra_keys=("id", "url"),
            ground_truth=_integer_answer,
        ),
    )
}


def answer_value(value: Any) -> str | None:
    """Turns an answer field of any common shape into a ground-truth string.

    The rules of the built-in datasets, by the value's type: a list (OlympiadBench's
    ``final_answer``) is cleaned and joined by :func:`olympiadbench_answer`
    (``["$69$,$84$"]`` -> ``"69, 84"``); a number is written as an integer when it is one
    (AMC's ``27.0`` -> ``"27"``, ``0.5`` -> ``"0.5"``); a string of digits loses its
    leading zeros (AIME's ``"025"`` -> ``"25"``) and ``"27.0"`` becomes ``"27"``; any
    other string is stripped.

    Args:
        value: The field's value (``str``, ``int``, ``float``, list of ``str``, ``None``).

    Returns:
        The ground truth, or ``None`` when the value is missing, NaN or empty.
    """
    if isinstance(value, (list, tuple)):
        return olympiadbench_answer(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # numpy arrays / scalars
        return answer_value(value.tolist())
    return _integer_string(value)


def _any_answer(row: Mapping[str, Any]) -> str:
    """``answer``, else ``final_answer``, else the last box of ``solution`` (paper sets)."""
    for key in ("answer", "final_answer"):
        gt = answer_value(row.get(key))
        if gt is not None:
            return gt
    return _boxed_from_solution(row)


def orz_row(row: Any) -> Mapping[str, Any] | None:
    """Flattens one Open-Reasoner-Zero record into ``{problem, answer, pass_at_n}``.

    ORZ's ``orz_math_57k_collected.json`` is a JSON list of two-turn conversations:
    ``[{"from": "human", "value": <problem>}, {"from": "assistant", "ground_truth":
    {"value": <answer>, "pass_at_n": <float or null>}}]``. A record that is already a
    flat mapping (a converted copy with ``problem``/``answer`` columns) is returned as
    it is.

    Args:
        row: One record of the file.

    Returns:
        The flat record, or ``None`` when the record has neither shape.
    """
    if isinstance(row, Mapping):
        return row
    if not isinstance(row, (list, tuple)) or len(row) < 2:
        return None
    human, assistant = row[0], row[1]
    if not isinstance(human, Mapping) or not isinstance(assistant, Mapping):
        return None
    truth = assistant.get("ground_truth")
    if isinstance(truth, Mapping):
        answer, pass_at_n = truth.get("value"), truth.get("pass_at_n")
    else:
        answer, pass_at_n = truth, None
    return {"problem": human.get("value"), "answer": answer, "pass_at_n": pass_at_n}


_DEEPSCALER_TEST_URL = "https://raw.githubusercontent.com/agentica-project/deepscaler/main/deepscaler/data/test/{}.json"
_ORZ_URL = "https://github.com/Open-Reasoner-Zero/Open-Reasoner-Zero/raw/refs/heads/main/data/orz_math_57k_collected.json"


def _paper_spec(name: str, split: str, local: str, hub_id: str | None, hub_split: str = "train", *,
                hub_config: str | None = None, problem_keys: tuple[str, ...] = ("problem", "question"),
                raw_answer_keys: tuple[str, ...] = ("answer", "final_answer", "solution"),
                extra_keys: tuple[str, ...] = (), ground_truth: Callable[[Mapping[str, Any]], str] = _any_answer,
                url: str | None = None, adapt: Callable[[Any], Any] | None = None) -> DatasetSpec:
    return DatasetSpec(
        name=name, splits={split: local}, hub_id=hub_id, hub_config=hub_config, hub_splits={split: hub_split},
        problem_keys=problem_keys, raw_answer_keys=raw_answer_keys, extra_keys=extra_keys,
        ground_truth=ground_truth, urls={split: url} if url else None, adapt=adapt,
    )


#: The papers' own training sets and extra evaluation sets, by ``data_source`` name.
#: They are not in ``../shared/data``: ``--source hub`` loads them from the hub id (or the
#: URL of ``urls``); a local copy of the same shape is read from ``--source-dir`` at the
#: path of ``splits`` (``.jsonl``, ``.json`` or ``.parquet`` with the same stem also do).
#: Kept apart from :data:`DATASETS` (which ``recipe.eval`` lists as its benchmarks and
#: ``recipe.main`` prepares on demand from ``../shared/data``).
PAPER_DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        # Minimalist paper (arXiv 2504.11343): the prompts of its public code (RLHFlow/Minimal-RL,
        # scripts/data_preprocess/numina_math.py), ground truth = `answer`; the code then keeps
        # problems of <= 700 tokens (--max-prompt-tokens 700 --tokenizer Qwen/Qwen2.5-Math-1.5B).
        # A NuminaMath-CoT-shaped copy (problem, solution) works too: the last box of `solution`.
        _paper_spec("numina_math", "train", "numina_math/train.parquet", "ScaleML-RLHF/numina_math",
                    extra_keys=("source",)),
        # DOTS + RR paper (arXiv 2506.05316) Table 1 training sets
        _paper_spec("deepscaler", "train", "deepscaler/deepscaler.json", "agentica-org/DeepScaleR-Preview-Dataset"),
        _paper_spec("orz_math", "train", "orz_math/orz_math_57k_collected.json", None, url=_ORZ_URL,
                    extra_keys=("pass_at_n",), adapt=orz_row),
        _paper_spec("deepmath", "train", "deepmath/train.parquet", "zwhe99/DeepMath-103K",
                    problem_keys=("question", "problem"), raw_answer_keys=("final_answer", "answer"),
                    extra_keys=("difficulty", "topic")),
        # evaluation sets
        _paper_spec("aime25", "test", "aime25/test.jsonl", "math-ai/aime25", "test", extra_keys=("id",)),
        _paper_spec("math_full", "test", "math_full/test.parquet", "DigitalLearningGmbH/MATH-lighteval", "test",
                    hub_config="default", raw_answer_keys=("solution", "answer"), extra_keys=("level", "type")),
        *(
            _paper_spec(f"deepscaler_{name}", "test", f"deepscaler_test/{name}.json", None,
                        url=_DEEPSCALER_TEST_URL.format(name))
            for name in ("aime", "amc", "math", "minerva", "olympiad_bench")
        ),
    )
}


def _spec(dataset: str | DatasetSpec) -> DatasetSpec:
    if isinstance(dataset, DatasetSpec):
        return dataset
    spec = DATASETS.get(dataset) or PAPER_DATASETS.get(dataset)
    if spec is None:
        raise ValueError(
            f"unknown dataset {dataset!r}; known datasets: {', '.join(DATASETS)}; "
            f"the papers' sets (--source hub or a local copy): {', '.join(PAPER_DATASETS)}"
        )
    return spec


def _check_split(spec: DatasetSpec, split: str) -> None:
    if split not in spec.splits:
        raise ValueError(
            f"dataset {spec.name!r} has no split {split!r}; its splits: {', '.join(spec.splits)}"
        )


# ------------------------------------------------------------------------- conversion


@dataclass
class ConversionResult:
    """Records converted from source rows, and what was skipped.

    Attributes:
        records: verl-format records (dicts with the keys of :data:`COLUMNS`).
        skipped: Count of skipped rows per reason.
        rows_read: Number of source rows looked at (good and skipped).
    """

    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: collections.Counter = field(default_factory=collections.Counter)
    rows_read: int = 0


class _SkipLog:
    """Counts skipped rows and logs capped per-row warnings."""

    def __init__(self, source: str, counter: collections.Counter) -> None:
        self.source = source
        self.counter = counter
        self.warned = 0

    def skip(self, reason: str, detail: str) -> None:
        self.counter[reason] += 1
        if self.warned < MAX_ROW_WARNINGS:
            logger.warning("%s: skipped %s (%s)", self.source, detail, reason)
        self.warned += 1

    def finish(self) -> None:
        if self.warned > MAX_ROW_WARNINGS:
            logger.warning(
                "%s: %d more skipped rows not listed; skipped by reason: %s",
                self.source,
                self.warned - MAX_ROW_WARNINGS,
                dict(self.counter),
            )


@dataclass(frozen=True)
class _BadLine:
    line: int
    error: str


#: What :class:`PromptLengthFilter` counts: the raw problem text (the Minimalist public
#: code: ``len(tokenizer.encode(problem)) <= 700``) or the whole chat prompt as the model
#: sees it (the template's messages through the tokenizer's chat template with the
#: generation prompt, what verl's ``data.filter_overlong_prompts`` counts).
LENGTH_OF: tuple[str, ...] = ("problem", "prompt")


@dataclass
class PromptLengthFilter:
    """Keeps rows whose prompt has at most ``max_tokens`` tokens of the model's tokenizer.

    Source: the Minimalist paper (arXiv 2504.11343) trains on Numina-Math prompts of <= 700
    tokens; its public code (RLHFlow/Minimal-RL, ``scripts/data_preprocess/numina_math.py``)
    drops a problem when ``len(tokenizer.encode(problem)) > 700`` with the
    Qwen2.5-Math-1.5B tokenizer.

    Attributes:
        tokenizer: A ``transformers`` tokenizer (anything with ``encode`` and
            ``apply_chat_template``).
        max_tokens: The largest token count kept (>= 1).
        length_of: ``"problem"`` (the raw problem text, no special tokens) or
            ``"prompt"`` (the chat prompt with the generation prompt), see :data:`LENGTH_OF`.
    """

    tokenizer: Any
    max_tokens: int
    length_of: str = "problem"

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max prompt tokens must be >= 1, got {self.max_tokens}")
        if self.length_of not in LENGTH_OF:
            raise ValueError(f"length_of must be one of {LENGTH_OF}, got {self.length_of!r}")

    @classmethod
    def load(cls, tokenizer: str | os.PathLike, max_tokens: int, length_of: str = "problem") -> "PromptLengthFilter":
        """Loads the tokenizer with ``transformers.AutoTokenizer.from_pretrained``.

        Raises:
            ValueError: ``max_tokens`` < 1 or an unknown ``length_of``.
            DataError: The tokenizer cannot be loaded (names the path).
        """
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(tokenizer))
        except Exception as e:  # OSError, ValueError, hub errors
            raise DataError(f"could not load the tokenizer {tokenizer}: {e}") from e
        return cls(tok, max_tokens, length_of)

    def count(self, problem: str, messages: list[dict[str, str]]) -> int:
        """Returns the number of tokens counted for one row (see ``length_of``)."""
        if self.length_of == "problem":
            return len(self.tokenizer.encode(problem, add_special_tokens=False))
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, Mapping):  # newer transformers may return a BatchEncoding
            ids = ids["input_ids"]
        return len(ids)


def convert_rows(
    dataset: str | DatasetSpec,
    split: str,
    rows: Iterable[Mapping[str, Any] | _BadLine],
    template: str | PromptTemplate = "boxed",
    max_rows: int | None = None,
    source: str = "<rows>",
    length_filter: PromptLengthFilter | None = None,
) -> ConversionResult:
    """Maps source rows (local or hub) to verl-format records.

    This is the one function that turns a dataset's rows into records, whatever
    their origin (:func:`read_source_rows` for local files, the hub loader for
    ``--source hub``, or a plain list of dicts).

    Args:
        dataset: A name in :data:`DATASETS` or :data:`PAPER_DATASETS`, or a
            :class:`DatasetSpec` (a user's file, :func:`file_spec`).
        split: The split name written to ``extra_info.split``.
        rows: Source rows in file order (the position gives ``extra_info.index``).
        template: A preset name, a literal template containing ``{problem}``, or a
            :class:`PromptTemplate`.
        max_rows: Keep only the first ``max_rows`` good rows (``None``: all).
        source: A name for the rows (file path) used in warnings.
        length_filter: Optional prompt-length filter; a longer row is skipped as
            ``prompt_too_long`` (counted like every skipped row, before ``max_rows``).

    Returns:
        The records, skip counts and number of rows read.

    Raises:
        ValueError: Unknown dataset, bad template or negative ``max_rows``.
    """
    spec = _spec(dataset)
    tmpl = resolve_template(template)
    if max_rows is not None and max_rows < 0:
        raise ValueError(f"max_rows must be >= 0, got {max_rows}")
    result = ConversionResult()
    log = _SkipLog(source, result.skipped)
    if max_rows == 0:
        return result
    for index, row in enumerate(rows):
        result.rows_read += 1
        if isinstance(row, _BadLine):
            log.skip("malformed_json", f"line {row.line}: {row.error}")
            continue
        if spec.adapt is not None:
            row = spec.adapt(row)
            if row is None:
                log.skip("malformed_row", f"row {index}: not a record of {spec.name}'s shape")
                continue
        if not isinstance(row, Mapping):
            log.skip("malformed_json", f"row {index}: not a JSON object")
            continue
        raw_problem = spec.problem(row) if spec.problem else _first(row, spec.problem_keys)
        if _text(raw_problem) is None:
            log.skip("missing_problem", f"row {index}")
            continue
        problem = str(raw_problem)
        try:
            ground_truth = normalise_gold(spec.ground_truth(row), spec.name)
        except _SkipRow as skip:
            log.skip(skip.reason, f"row {index}")
            continue
        raw_answer = _first(row, spec.raw_answer_keys)
        if raw_answer is not None and isinstance(raw_answer, (list, tuple)):
            raw_answer = ", ".join(str(a) for a in raw_answer)
        elif hasattr(raw_answer, "tolist") and not isinstance(raw_answer, str):  # numpy array from parquet
            raw_answer = ", ".join(str(a) for a in raw_answer.tolist())
        extra: dict[str, Any] = {
            "split": split,
            "index": index,
            "question": problem,
            "answer": _raw_str(raw_answer),
        }
        for key in spec.extra_keys:
            value = row.get(key)
            if key == "solution" and value is not None:
                value = _raw_str(value)
            extra[key] = value
        messages = tmpl.messages(problem.strip())
        if length_filter is not None:
            n_tokens = length_filter.count(problem, messages)
            if n_tokens > length_filter.max_tokens:
                log.skip("prompt_too_long", f"row {index}: {n_tokens} > {length_filter.max_tokens} tokens")
                continue
        result.records.append(
            {
                "data_source": spec.name,
                "prompt": messages,
                "ability": "math",
                "reward_model": {"style": "rule", "ground_truth": ground_truth},
                "extra_info": extra,
            }
        )
        if max_rows is not None and len(result.records) >= max_rows:
            break
    log.finish()
    # Drop dataset-specific extra_info keys that no row has (e.g. ``solution`` of the
    # local MATH train file) so that the parquet schema has no all-null fields.
    for key in spec.extra_keys:
        if all(r["extra_info"][key] is None for r in result.records):
            for r in result.records:
                del r["extra_info"][key]
    return result


# ---------------------------------------------------------------------------- sources


def default_source_dir() -> Path:
    """Returns the default local data directory.

    ``$RECIPE_SHARED_DIR/data`` when the variable is set, else ``../shared/data``
    relative to the repository root (the parent of the ``recipe`` package directory).
    """
    env = os.environ.get(SHARED_DIR_ENV)
    if env:
        return Path(env).expanduser().resolve() / "data"
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


#: File suffixes :func:`read_source_rows` reads (anything else is read as JSON lines).
SOURCE_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".parquet")


def _source_file(spec: DatasetSpec, split: str, source_dir: str | os.PathLike | None) -> Path:
    root = Path(source_dir) if source_dir is not None else default_source_dir()
    path = root / spec.splits[split]
    if path.is_file():
        return path
    for suffix in SOURCE_SUFFIXES:  # the same file saved in another format
        other = path.with_suffix(suffix)
        if other.is_file():
            return other
    raise FileNotFoundError(
        f"{spec.name}/{split}: source file {path} not found (set --source-dir or "
        f"${SHARED_DIR_ENV}, or use --source hub)"
    )


def read_source_rows(
    path: str | os.PathLike, rows_key: str | None = None
) -> Iterator[Mapping[str, Any] | _BadLine]:
    """Yields the rows of a local JSON-lines, JSON or parquet file.

    * ``.parquet``: one row per table row (nested columns as Python lists and dicts).
    * ``.json``: a JSON list of records, or an object holding the list under
      ``rows_key`` (``{"data": [...]}`` with ``rows_key="data"``). A ``.json`` file that
      is really JSON lines (one object per line) is read as such.
    * anything else (``.jsonl``, ``.ndjson``, ...): one JSON value per line; blank lines
      are ignored and a malformed line is yielded as a marker that :func:`convert_rows`
      skips with a warning naming its 1-based line number.

    Args:
        path: The file.
        rows_key: For a JSON object file: the key holding the list of records.

    Yields:
        One record per row (or a malformed-line marker).

    Raises:
        FileNotFoundError: The file does not exist.
        DataError: A ``.json`` file that does not parse, is not a list (and has no
            ``rows_key`` list), a missing ``rows_key``, or an unreadable parquet file;
            the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    if path.suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable parquet file: {e}") from e
        if rows_key is not None:
            raise DataError(f"{path}: --rows-key applies to JSON files, not parquet")
        yield from table.to_pylist()
        return
    if path.suffix == ".json":
        with path.open(encoding="utf-8") as f:
            text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if e.msg == "Extra data" and text.lstrip().startswith("{"):  # JSON lines named .json
                yield from _json_lines(path)
                return
            raise DataError(f"{path}: malformed JSON at line {e.lineno}: {e.msg}") from e
        if rows_key is not None:
            if not isinstance(data, Mapping) or rows_key not in data:
                keys = list(data) if isinstance(data, Mapping) else type(data).__name__
                raise DataError(f"{path}: --rows-key {rows_key!r} not found (top level: {keys})")
            data = data[rows_key]
        if not isinstance(data, list):
            hint = ""
            if isinstance(data, Mapping):
                lists = [k for k, v in data.items() if isinstance(v, list)]
                hint = f"; its lists are under {lists}: pass --rows-key KEY" if lists else ""
            raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}{hint}")
        yield from data
        return
    if rows_key is not None:
        raise DataError(f"{path}: --rows-key applies to JSON files, not JSON lines")
    yield from _json_lines(path)


def _json_lines(path: Path) -> Iterator[Any]:
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                yield _BadLine(lineno, e.msg)


def download_cache_dir() -> Path:
    """Where files fetched from ``DatasetSpec.urls`` are kept: ``$RECIPE_DATA_CACHE``, else
    ``~/.cache/recipe/data``."""
    return Path(os.environ.get("RECIPE_DATA_CACHE") or Path.home() / ".cache" / "recipe" / "data")


def _download(url: str, name: str) -> Path:
    import urllib.request

    path = download_cache_dir() / name / url.rsplit("/", 1)[-1]
    if path.is_file():
        return path
    print(f"[recipe.data] downloading {url} -> {path}", flush=True)
    try:
        with urllib.request.urlopen(url, timeout=120) as resp:  # noqa: S310 (fixed https URLs)
            atomic_write(path, lambda tmp: tmp.write_bytes(resp.read()))
    except OSError as e:
        raise DataError(f"could not download {url}: {e}") from e
    return path


def _hub_rows(spec: DatasetSpec, split: str) -> Iterator[Any]:
    if spec.urls and split in spec.urls:
        yield from read_source_rows(_download(spec.urls[split], spec.name))
        return
    if spec.hub_id is None:
        raise DataError(f"{spec.name}: no hub copy known; put the file at --source-dir/{spec.splits[split]}")
    import datasets  # imported lazily: slow, and only needed with --source hub

    try:
        ds = datasets.load_dataset(spec.hub_id, spec.hub_config, split=spec.hub_splits[split])
    except Exception as e:  # network, auth or hub errors of many types
        config = f" (config {spec.hub_config})" if spec.hub_config else ""
        raise DataError(f"could not load {spec.hub_id}{config} from the hub: {e}") from e
    yield from ds


def _convert(
    dataset: str,
    split: str,
    source_dir: str | os.PathLike | None,
    template: str | PromptTemplate,
    max_rows: int | None,
    source: str,
    length_filter: PromptLengthFilter | None = None,
) -> ConversionResult:
    spec = _spec(dataset)
    _check_split(spec, split)
    resolve_template(template)  # fail before reading anything
    if source == "hub":
        if spec.urls and split in spec.urls:
            name = spec.urls[split]
        else:
            name = f"hub:{spec.hub_id}" + (f"[{spec.hub_config}]" if spec.hub_config else "")
            name += f"/{spec.hub_splits[split]}"
        rows: Iterable[Any] = _hub_rows(spec, split)
        return convert_rows(spec, split, rows, template, max_rows, name, length_filter)
    if source != "local":
        raise ValueError(f"source must be 'local' or 'hub', got {source!r}")
    path = _source_file(spec, split, source_dir)
    return convert_rows(spec, split, read_source_rows(path), template, max_rows, str(path), length_filter)


def load_records(
    dataset: str,
    split: str,
    source_dir: str | os.PathLike | None = None,
    template: str | PromptTemplate = "boxed",
    max_rows: int | None = None,
    source: str = "local",
    length_filter: PromptLengthFilter | None = None,
) -> list[dict[str, Any]]:
    """Loads one split of a dataset as verl-format records (dicts).

    Args:
        dataset: A name in :data:`DATASETS`.
        split: One of ``DATASETS[dataset].splits``.
        source_dir: Local data directory (default: :func:`default_source_dir`).
        template: Prompt preset name or literal template containing ``{problem}``.
        max_rows: Keep only the first ``max_rows`` good rows.
        source: ``"local"`` or ``"hub"`` (needs internet).
        length_filter: Optional :class:`PromptLengthFilter` (rows over it are skipped).

    Returns:
        The records; skipped rows are logged as warnings.

    Raises:
        ValueError: Unknown dataset, split, source or bad template.
        FileNotFoundError: The local source file is missing.
        DataError: The source file cannot be parsed as a whole.
    """
    return _convert(dataset, split, source_dir, template, max_rows, source, length_filter).records


# ----------------------------------------------------------------------------- output


def write_parquet(records: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Writes verl-format records to a parquet file atomically.

    Args:
        records: Dicts with the keys of :data:`COLUMNS`.
        path: Output file; its directory is created when missing.

    Returns:
        The output path.

    Raises:
        OSError: The file cannot be written (no temporary file is left behind).
    """
    path = Path(path)
    if records:
        table = pa.Table.from_pylist([{c: r[c] for c in COLUMNS} for r in records])
    else:
        table = pa.table(
            {
                "data_source": pa.array([], pa.string()),
                "prompt": pa.array([], pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
                "ability": pa.array([], pa.string()),
                "reward_model": pa.array(
                    [], pa.struct([("style", pa.string()), ("ground_truth", pa.string())])
                ),
                "extra_info": pa.array(
                    [],
                    pa.struct(
                        [
                            ("split", pa.string()),
                            ("index", pa.int64()),
                            ("question", pa.string()),
                            ("answer", pa.string()),
                        ]
                    ),
                ),
            }
        )
    return atomic_write(path, lambda tmp: pq.write_table(table, str(tmp)))


@dataclass
class SplitResult:
    """What :func:`convert_split` wrote.

    Attributes:
        dataset: Dataset name.
        split: Split name.
        path: The parquet file written.
        rows_written: Number of records written.
        skipped: Count of skipped rows per reason.
    """

    dataset: str
    split: str
    path: Path
    rows_written: int
    skipped: collections.Counter

    def summary(self) -> str:
        """Returns a one-line human-readable summary."""
        total = sum(self.skipped.values())
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
        skipped = f"skipped {total}" + (f" ({reasons})" if reasons else "")
        return f"{self.dataset}/{self.split}: wrote {self.rows_written} rows, {skipped} -> {self.path}"


def convert_split(
    dataset: str,
    split: str,
    out_dir: str | os.PathLike,
    source_dir: str | os.PathLike | None = None,
    template: str | PromptTemplate = "boxed",
    max_rows: int | None = None,
    source: str = "local",
    length_filter: PromptLengthFilter | None = None,
) -> SplitResult:
    """Converts one split and writes ``out_dir/<dataset>/<split>.parquet``.

    Args:
        dataset: A name in :data:`DATASETS`.
        split: One of ``DATASETS[dataset].splits``.
        out_dir: Output root directory.
        source_dir: Local data directory (default: :func:`default_source_dir`).
        template: Prompt preset name or literal template containing ``{problem}``.
        max_rows: Keep only the first ``max_rows`` good rows.
        source: ``"local"`` or ``"hub"``.
        length_filter: Optional :class:`PromptLengthFilter`; its drops are counted as
            ``prompt_too_long`` in ``skipped``.

    Returns:
        The path written and the row counts.

    Raises:
        ValueError: Unknown dataset, split, source or bad template.
        FileNotFoundError: The local source file is missing.
        DataError: The source file cannot be parsed as a whole.
        OSError: The output cannot be written.
    """
    result = _convert(dataset, split, source_dir, template, max_rows, source, length_filter)
    path = write_parquet(result.records, Path(out_dir) / dataset / f"{split}.parquet")
    return SplitResult(dataset, split, path, len(result.records), result.skipped)


def prepare(
    dataset: str,
    out_dir: str | os.PathLike,
    source_dir: str | os.PathLike | None = None,
    template: str | PromptTemplate = "boxed",
    max_rows: int | None = None,
    source: str = "local",
    length_filter: PromptLengthFilter | None = None,
) -> dict[str, Path]:
    """Writes every split of a dataset as ``out_dir/<dataset>/<split>.parquet``.

    Args:
        dataset: A name in :data:`DATASETS`.
        out_dir: Output root directory.
        source_dir: Local data directory (default: :func:`default_source_dir`).
        template: Prompt preset name or literal template containing ``{problem}``.
        max_rows: Keep only the first ``max_rows`` good rows of each split.
        source: ``"local"`` or ``"hub"``.
        length_filter: Optional :class:`PromptLengthFilter`.

    Returns:
        Split name -> path of the parquet file written.

    Raises:
        ValueError: Unknown dataset, source or bad template.
        FileNotFoundError: A local source file is missing.
        DataError: A source file cannot be parsed as a whole.
        OSError: An output cannot be written.
    """
    spec = _spec(dataset)
    resolve_template(template)
    return {
        split: convert_split(dataset, split, out_dir, source_dir, template, max_rows, source, length_filter).path
        for split in spec.splits
    }


# ------------------------------------------------------------------------ passthrough


def _field_names(t: pa.DataType) -> set[str]:
    return {t.field(i).name for i in range(t.num_fields)} if pa.types.is_struct(t) else set()


#: The columns verl's trainer reads from a training / validation file.
TRAIN_COLUMNS: tuple[str, ...] = ("data_source", "prompt", "reward_model")


def validate_verl_parquet(path: str | os.PathLike, columns: tuple[str, ...] = COLUMNS) -> int:
    """Checks that a parquet file has the verl format.

    Checks: every column of ``columns`` (default :data:`COLUMNS`; the trainer needs only
    :data:`TRAIN_COLUMNS`) is present; every ``prompt`` is a non-empty
    list of messages with string ``role`` and ``content``; every ``reward_model`` has a
    non-null ``ground_truth``.

    Args:
        path: The parquet file.

    Returns:
        The number of rows.

    Raises:
        FileNotFoundError: The file does not exist.
        DataError: The file is not readable parquet or lacks a column or field; the
            message names the file and the missing field.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable parquet file: {e}") from e
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing required column(s): {', '.join(missing)} (has {table.column_names})")
    schema = table.schema
    rm_type = schema.field("reward_model").type
    if "ground_truth" not in _field_names(rm_type):
        raise DataError(f"{path}: missing field reward_model.ground_truth")
    prompt_type = schema.field("prompt").type
    if not (pa.types.is_list(prompt_type) or pa.types.is_large_list(prompt_type)):
        raise DataError(f"{path}: field prompt must be a list of messages, got {prompt_type}")
    msg_fields = _field_names(prompt_type.value_type)
    for name in ("role", "content"):
        if name not in msg_fields:
            raise DataError(f"{path}: missing field prompt[].{name} (messages need role and content)")
    prompts = table.column("prompt").to_pylist()
    truths = table.column("reward_model").to_pylist()
    for i, (prompt, rm) in enumerate(zip(prompts, truths)):
        if not prompt:
            raise DataError(f"{path}: row {i}: field prompt is empty or null")
        for msg in prompt:
            if not msg or not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
                raise DataError(f"{path}: row {i}: field prompt[].role/content missing or not a string")
        if rm is None or rm.get("ground_truth") is None:
            raise DataError(f"{path}: row {i}: missing field reward_model.ground_truth")
    return table.num_rows


def passthrough(input_path: str | os.PathLike, out_path: str | os.PathLike) -> int:
    """Validates a verl-format parquet file and copies it unchanged (atomically).

    Args:
        input_path: The existing verl-format parquet file.
        out_path: Where to write the byte-identical copy.

    Returns:
        The number of rows.

    Raises:
        FileNotFoundError: The input does not exist.
        DataError: The input is not a valid verl-format parquet file.
        OSError: The output cannot be written.
    """
    n = validate_verl_parquet(input_path)
    out_path = Path(out_path)
    if out_path.exists() and Path(input_path).resolve() == out_path.resolve():
        return n
    atomic_write(out_path, lambda tmp: shutil.copyfile(input_path, tmp))
    return n


# ------------------------------------------------------------------ bring your own data

#: Row keys tried, in order, when ``--problem-key`` / ``--answer-key`` / ``--solution-key``
#: are not given.
DEFAULT_PROBLEM_KEYS: tuple[str, ...] = ("problem", "question")
DEFAULT_ANSWER_KEYS: tuple[str, ...] = ("answer", "final_answer")
DEFAULT_SOLUTION_KEYS: tuple[str, ...] = ("solution",)

#: File stems that say nothing about the data; the folder's name is the ``data_source`` then.
_GENERIC_STEMS = {"train", "test", "val", "validation", "dev", "data", "dataset"}


def default_data_source(path: str | os.PathLike) -> str:
    """The ``data_source`` of a user's file: its stem (``aime2025.jsonl`` -> ``aime2025``),
    or its folder's name when the stem is generic (``deepscaler/train.parquet`` ->
    ``deepscaler``)."""
    path = Path(path)
    if path.stem.lower() in _GENERIC_STEMS and path.parent.name:
        return path.parent.name
    return path.stem


def file_spec(
    data_source: str,
    problem_key: str | None = None,
    answer_key: str | None = None,
    solution_key: str | None = None,
) -> DatasetSpec:
    """Builds the :class:`DatasetSpec` of a user's file from its column names.

    Ground truth: :func:`answer_value` of ``answer_key`` (lists, numbers and strings as
    the built-in datasets handle them); when that is empty or not given, the content of
    the LAST ``\\boxed{}`` of ``solution_key`` (by :func:`recipe.reward.answers.last_boxed`,
    the one extractor); a row with neither is skipped (``missing_answer`` /
    ``no_boxed_answer``). Without keys the defaults :data:`DEFAULT_PROBLEM_KEYS`,
    :data:`DEFAULT_ANSWER_KEYS` and :data:`DEFAULT_SOLUTION_KEYS` are tried in order.

    Args:
        data_source: The name written as ``data_source`` (``gsm8k`` selects GSM8K-style
            grading; any other name is graded as a boxed maths answer).
        problem_key: The column of the problem text.
        answer_key: The column of the final answer.
        solution_key: The column of a worked solution whose last box is the answer.

    Returns:
        The spec (no local file, no hub id).

    Raises:
        ValueError: ``data_source`` is empty.
    """
    if not data_source or not data_source.strip():
        raise ValueError("data_source must be a non-empty name")
    problem_keys = (problem_key,) if problem_key else DEFAULT_PROBLEM_KEYS
    if answer_key or solution_key:
        answer_keys = (answer_key,) if answer_key else ()
        solution_keys = (solution_key,) if solution_key else ()
    else:
        answer_keys, solution_keys = DEFAULT_ANSWER_KEYS, DEFAULT_SOLUTION_KEYS

    def ground_truth(row: Mapping[str, Any]) -> str:
        for key in answer_keys:
            gt = answer_value(row.get(key))
            if gt is not None:
                return gt
        solutions = [row.get(k) for k in solution_keys if _text(row.get(k)) is not None]
        if not solutions:
            raise _SkipRow("missing_answer")
        boxed = last_boxed(str(solutions[0]))
        if not boxed:
            raise _SkipRow("no_boxed_answer")
        return boxed

    return DatasetSpec(
        name=data_source.strip(), splits={}, hub_id=None, hub_config=None, hub_splits={},
        problem_keys=problem_keys, raw_answer_keys=answer_keys + solution_keys, extra_keys=(),
        ground_truth=ground_truth,
    )


def _check_keys(path: Path, rows: list[Any], spec: DatasetSpec, given: dict[str, str | None]) -> None:
    """Raises DataError when a key (given or default) is in no row of the file."""
    records = [r for r in rows if isinstance(r, Mapping)]
    if not records:
        raise DataError(f"{path}: no records (read {len(rows)} rows, none a JSON object / table row)")
    seen: set[str] = set()
    for r in records:
        seen.update(r.keys())
    first = list(records[0].keys())
    for option, key in given.items():
        if key is not None and key not in seen:
            raise DataError(f"{path}: no row has the key {key!r} ({option}); the first row's keys: {first}")
    if not any(k in seen for k in spec.problem_keys):
        raise DataError(
            f"{path}: no row has a problem key (tried {', '.join(spec.problem_keys)}); pass --problem-key "
            f"(the first row's keys: {first})"
        )
    if not any(k in seen for k in spec.raw_answer_keys):
        raise DataError(
            f"{path}: no row has an answer key (tried {', '.join(spec.raw_answer_keys)}); pass --answer-key "
            f"or --solution-key (the first row's keys: {first})"
        )


def convert_file(
    input_path: str | os.PathLike,
    out_path: str | os.PathLike,
    *,
    data_source: str | None = None,
    split: str = "train",
    problem_key: str | None = None,
    answer_key: str | None = None,
    solution_key: str | None = None,
    rows_key: str | None = None,
    template: str | PromptTemplate = "boxed",
    max_rows: int | None = None,
    length_filter: PromptLengthFilter | None = None,
) -> SplitResult:
    """Converts a user's JSON-lines, JSON or parquet file of problems to a verl parquet.

    The rows go through :func:`convert_rows` (same prompt templates, bad-row handling,
    ``normalise_gold`` and ``extra_info`` as the built-in datasets) with the spec of
    :func:`file_spec`; the output is written atomically.

    Args:
        input_path: ``.jsonl`` (or any non-JSON, non-parquet suffix: JSON lines),
            ``.json`` (a list, or rows under ``rows_key``) or ``.parquet``.
        out_path: The verl parquet to write.
        data_source: The ``data_source`` name (default :func:`default_data_source`).
        split: Written to ``extra_info.split``.
        problem_key, answer_key, solution_key: Column names (see :func:`file_spec`).
        rows_key: For a JSON object file, the key holding the list of rows.
        template: Prompt preset name or literal template containing ``{problem}``.
        max_rows: Keep only the first ``max_rows`` good rows.
        length_filter: Optional :class:`PromptLengthFilter`.

    Returns:
        What was written (rows, skip counts by reason, path).

    Raises:
        FileNotFoundError: The input does not exist.
        DataError: The file is malformed, a key is in no row (names the file and the
            key), or no row could be converted (names the skip reasons).
        ValueError: A bad template or ``max_rows``.
        OSError: The output cannot be written.
    """
    path = Path(input_path)
    resolve_template(template)
    spec = file_spec(data_source or default_data_source(path), problem_key, answer_key, solution_key)
    rows = list(read_source_rows(path, rows_key))
    _check_keys(path, rows, spec, {"--problem-key": problem_key, "--answer-key": answer_key,
                                   "--solution-key": solution_key})
    result = convert_rows(spec, split, rows, template, max_rows, str(path), length_filter)
    if not result.records and max_rows != 0:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(result.skipped.items()))
        raise DataError(f"{path}: no row could be converted ({result.rows_read} rows read; skipped: {reasons})")
    out = write_parquet(result.records, out_path)
    return SplitResult(spec.name, split, out, len(result.records), result.skipped)


def is_verl_parquet(path: str | os.PathLike) -> bool:
    """Whether a file looks like a verl parquet (to validate and copy, not to convert):
    a ``.parquet`` with a ``reward_model`` column or a list-typed ``prompt`` column. An
    unreadable ``.parquet`` counts as one, so that its validation names the problem."""
    path = Path(path)
    if path.suffix != ".parquet":
        return False
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError):
        return True
    if "reward_model" in schema.names:
        return True
    if "prompt" in schema.names:
        t = schema.field("prompt").type
        return pa.types.is_list(t) or pa.types.is_large_list(t)
    return False


# -------------------------------------------------------------------------------- CLI


def _parse_datasets(value: str) -> list[str]:
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise ValueError("--datasets is empty")
    if "all" in names:
        return list(DATASETS)
    for n in names:
        _spec(n)
    return list(dict.fromkeys(names))


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m recipe.data",
        description="Write math datasets as verl-format parquet files: named datasets (--datasets), "
        "or any JSON-lines / JSON / parquet file of problems (--input FILE --out FILE; a verl parquet "
        "is validated and copied unchanged).",
    )
    p.add_argument(
        "--datasets",
        help=f"comma-separated names or 'all' (the local ones: {', '.join(DATASETS)}); the papers' sets: "
        f"{', '.join(PAPER_DATASETS)}",
    )
    p.add_argument("--out-dir", help="output root: writes OUT_DIR/<dataset>/<split>.parquet")
    p.add_argument(
        "--source-dir",
        help=f"local data directory (default: ${SHARED_DIR_ENV}/data or ../shared/data from the repo root)",
    )
    p.add_argument(
        "--source", choices=("local", "hub"), default="local", help="read local files (default) or the hub"
    )
    p.add_argument(
        "--template",
        default="boxed",
        help=f"prompt preset ({', '.join(TEMPLATES)}) or a literal string containing {{problem}}",
    )
    p.add_argument("--max-rows", type=int, default=None, help="keep the first N good rows of each split")
    g = p.add_argument_group("any file (--input)")
    g.add_argument("--input", help="a .jsonl / .json / .parquet file of problems, or a verl parquet to validate")
    g.add_argument("--out", help="output parquet file for --input")
    g.add_argument("--problem-key", help=f"column of the problem (default: first of {', '.join(DEFAULT_PROBLEM_KEYS)})")
    g.add_argument("--answer-key", help=f"column of the final answer (default: {', '.join(DEFAULT_ANSWER_KEYS)})")
    g.add_argument(
        "--solution-key",
        help="column of a worked solution: its last \\boxed{} is the answer (default: solution, when no "
        "--answer-key either)",
    )
    g.add_argument("--data-source", help="the data_source name written (default: the file's stem)")
    g.add_argument("--split", default="train", help="extra_info.split (default: train)")
    g.add_argument("--rows-key", help="for a JSON object file: the key holding the list of rows")
    f = p.add_argument_group("prompt-length filter (both forms)")
    f.add_argument("--max-prompt-tokens", type=int, default=None,
                   help="drop rows longer than N tokens (Minimalist paper: 700); needs --tokenizer")
    f.add_argument("--tokenizer", help="tokenizer folder or hub id (the model's), for --max-prompt-tokens")
    f.add_argument("--length-of", choices=LENGTH_OF, default="problem",
                   help="count the raw problem (default, as the Minimalist code) or the chat prompt")
    return p


_CONVERSION_OPTIONS = ("problem_key", "answer_key", "solution_key", "data_source", "rows_key", "max_prompt_tokens")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 1 on a data or input error, 2 on usage errors.
    """
    parser = _build_parser()
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if (args.max_prompt_tokens is None) != (args.tokenizer is None):
        parser.error("--max-prompt-tokens and --tokenizer go together")
    try:
        resolve_template(args.template)
        if args.max_rows is not None and args.max_rows < 0:
            raise ValueError("--max-rows must be >= 0")
        if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
            raise ValueError("--max-prompt-tokens must be >= 1")
    except ValueError as e:
        parser.error(str(e))
    if args.input is not None:
        if args.out is None:
            parser.error("--input needs --out")
        if args.datasets or args.out_dir:
            parser.error("--input cannot be combined with --datasets/--out-dir")
        keys_given = any(getattr(args, k) for k in ("problem_key", "answer_key", "solution_key"))
        if is_verl_parquet(args.input) and not keys_given:
            extra = [f"--{k.replace('_', '-')}" for k in _CONVERSION_OPTIONS if getattr(args, k) is not None]
            if extra:
                parser.error(f"{args.input} is already a verl parquet (validated and copied as it is): "
                             f"{', '.join(extra)} only apply to files that are converted")
            try:
                n = passthrough(args.input, args.out)
            except (DataError, OSError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
            print(f"{args.input}: valid verl parquet, {n} rows -> {args.out}")
            return 0
        try:
            length_filter = _length_filter(args)
            res = convert_file(
                args.input, args.out, data_source=args.data_source, split=args.split,
                problem_key=args.problem_key, answer_key=args.answer_key, solution_key=args.solution_key,
                rows_key=args.rows_key, template=args.template, max_rows=args.max_rows,
                length_filter=length_filter,
            )
        except (DataError, OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{args.input}: {res.summary()}", flush=True)
        return 0
    if not args.datasets or not args.out_dir:
        parser.error("--datasets and --out-dir are required (or --input FILE --out FILE)")
    if args.source == "hub" and args.source_dir is not None:
        parser.error("--source-dir cannot be combined with --source hub")
    given = [f"--{k.replace('_', '-')}" for k in _CONVERSION_OPTIONS[:-1] if getattr(args, k) is not None]
    if given:
        parser.error(f"{', '.join(given)} apply to --input only")
    try:
        names = _parse_datasets(args.datasets)
    except ValueError as e:
        parser.error(str(e))
    try:
        length_filter = _length_filter(args)
        for name in names:
            for split in _spec(name).splits:
                res = convert_split(
                    name, split, args.out_dir, args.source_dir, args.template, args.max_rows, args.source,
                    length_filter,
                )
                print(res.summary(), flush=True)
    except (DataError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def _length_filter(args: argparse.Namespace) -> PromptLengthFilter | None:
    if args.max_prompt_tokens is None:
        return None
    return PromptLengthFilter.load(args.tokenizer, args.max_prompt_tokens, args.length_of)


if __name__ == "__main__":
    sys.exit(main())
