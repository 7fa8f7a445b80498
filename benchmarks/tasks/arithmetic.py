"""Synthetic integer arithmetic in verl's parquet format: a task a tiny model learns on CPU.

Each problem is ``a <op> b`` with ``op`` in ``+``, ``-``, ``*`` and non-negative integer
operands of ``min_digits``..``max_digits`` digits; the prompt asks for the answer in
``\\boxed{}`` and the ground truth is the exact integer result as a string, so
:func:`recipe.reward.math_reward.compute_score` grades responses unchanged (``data_source``
``"arithmetic"`` selects its ``\\boxed{}`` extraction). Rows have the columns of
:data:`recipe.data.COLUMNS` and are written with :func:`recipe.data.write_parquet`::

    data_source   "arithmetic"
    prompt        [{"role": "system", "content": "Please reason step by step, and put your final
                                         answer within \\boxed{}."},
                   {"role": "user", "content": "What is 37+58?"}]
    ability       "math"
    reward_model  {"style": "rule", "ground_truth": "95"}
    extra_info    {"split": "train", "index": 0, "question": "What is 37+58?", "answer": "95",
                   "op": "+", "a": 37, "b": 58, "solution": "7+8=15 3+5+1=9 \\boxed{95}"}

``extra_info.solution`` (:func:`solution`) is a worked column-by-column solution: the
target of the SFT warm start (``python -m benchmarks.sft --response-template '{solution}'``).
A tiny model learns this scratchpad far faster than the bare answer (2-digit addition,
hidden 128, 2 layers: the bare ``\\boxed{95}`` plateaus near 5 % sampled accuracy after
1,200 SFT steps of 32).

Difficulty is set by the digit range and the operations (2-digit addition: 45 % of the
problems need a carry; ``*`` of two 2-digit numbers is much harder for a tiny model).
Sampling (deterministic for a seed): for each operand, a digit count uniform in
``[min_digits, max_digits]`` then a value uniform among the numbers of that many digits
(1 digit: 0-9); the operation uniform among ``ops``. With ``allow_negative=False`` a
subtraction puts the larger operand first, so every answer is >= 0.

Split without overlap: problems are compared by a canonical key, in which ``a+b`` equals
``b+a`` and ``a*b`` equals ``b*a``, so a test problem's mirror is never in train. The test
split is drawn first from ``random.Random(seed)``, then the train split from the same
stream skipping every key already drawn: the test split depends only on
``(seed, n_test, spec)``, and the train split for ``n_train = N`` is a prefix of the one
for any larger ``n_train`` (nested training sets for data-efficiency curves).

Command line::

    python -m benchmarks.tasks.arithmetic --out DIR --n-train 4000 --n-test 200 --seed 0 \\
        [--min-digits 1 --max-digits 2 --ops + --allow-negative --template T]

writes ``DIR/train.parquet`` and ``DIR/test.parquet`` (atomically) and prints one line per
file.
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recipe.data import PromptTemplate, resolve_template, write_parquet

__all__ = [
    "DATA_SOURCE",
    "OPS",
    "TEMPLATE",
    "ArithmeticSpec",
    "Problem",
    "main",
    "make_splits",
    "problem_key",
    "question",
    "sample_problems",
    "solution",
    "space_size",
    "target_response",
    "to_record",
    "write_splits",
]

#: ``data_source`` of every row (graded with ``\\boxed{}`` extraction by math_reward).
DATA_SOURCE = "arithmetic"

#: Supported operations.
OPS: tuple[str, ...] = ("+", "-", "*")

#: Default prompt template: :data:`recipe.data.TEMPLATES` ``qwen_math_cot`` (the
#: Qwen2.5-Math evaluation prompt: the step-by-step / ``\\boxed{}`` instruction as the
#: system message, the question ``What is 37+58?`` as the user message). Shorter than
#: ``boxed``, whose user-only prompt makes the chat template add Qwen's default system
#: prompt: 66 -> ~35 prompt tokens with the task's tokenizer, the bulk of a CPU step.
TEMPLATE = "qwen_math_cot"


@dataclass(frozen=True)
class ArithmeticSpec:
    """What problems look like.

    Attributes:
        min_digits: Fewest digits of an operand (>= 1; 1 digit means 0-9).
        max_digits: Most digits of an operand (>= min_digits, <= 9).
        ops: Operations drawn uniformly, a non-empty subset of :data:`OPS`.
        allow_negative: Allow ``a-b`` with ``a < b`` (negative answers); when False a
            subtraction puts the larger operand first.
    """

    min_digits: int = 1
    max_digits: int = 2
    ops: tuple[str, ...] = ("+",)
    allow_negative: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.min_digits, int) or self.min_digits < 1:
            raise ValueError(f"min_digits must be an int >= 1, got {self.min_digits!r}")
        if not isinstance(self.max_digits, int) or not self.min_digits <= self.max_digits <= 9:
            raise ValueError(
                f"max_digits must be an int in [min_digits={self.min_digits}, 9], got {self.max_digits!r}"
            )
        ops = tuple(self.ops)
        if not ops or any(op not in OPS for op in ops) or len(set(ops)) != len(ops):
            raise ValueError(f"ops must be distinct members of {OPS}, got {self.ops!r}")
        object.__setattr__(self, "ops", ops)


@dataclass(frozen=True)
class Problem:
    """One problem ``a <op> b``.

    Attributes:
        a: First operand (>= 0).
        op: ``+``, ``-`` or ``*``.
        b: Second operand (>= 0).
    """

    a: int
    op: str
    b: int

    @property
    def text(self) -> str:
        """The expression as shown in the prompt, e.g. ``"37+58"``."""
        return f"{self.a}{self.op}{self.b}"

    @property
    def answer(self) -> int:
        """The exact integer result."""
        if self.op == "+":
            return self.a + self.b
        if self.op == "-":
            return self.a - self.b
        if self.op == "*":
            return self.a * self.b
        raise ValueError(f"unknown operation {self.op!r}")


def _digit_range(d: int) -> tuple[int, int]:
    """Smallest and largest number with ``d`` digits (``d = 1``: 0 and 9)."""
    return (0 if d == 1 else 10 ** (d - 1)), 10**d - 1


def problem_key(p: Problem) -> tuple[str, int, int]:
    """Canonical key: commutative operations ignore operand order (``a+b`` == ``b+a``)."""
    if p.op in ("+", "*"):
        return (p.op, min(p.a, p.b), max(p.a, p.b))
    return (p.op, p.a, p.b)


def space_size(spec: ArithmeticSpec) -> int:
    """Number of distinct problems (canonical keys) ``spec`` can produce.

    With ``R`` possible operand values: ``R (R + 1) / 2`` for ``+``, ``*`` and
    non-negative ``-``; ``R**2`` for ``-`` with ``allow_negative``.
    """
    lo, _ = _digit_range(spec.min_digits)
    _, hi = _digit_range(spec.max_digits)
    r = hi - lo + 1
    half = r * (r + 1) // 2
    return sum(r * r if (op == "-" and spec.allow_negative) else half for op in spec.ops)


def _draw(rng: random.Random, spec: ArithmeticSpec) -> Problem:
    def operand() -> int:
        lo, hi = _digit_range(rng.randint(spec.min_digits, spec.max_digits))
        return rng.randint(lo, hi)

    op = spec.ops[rng.randrange(len(spec.ops))]
    a, b = operand(), operand()
    if op == "-" and not spec.allow_negative and a < b:
        a, b = b, a
    return Problem(a, op, b)


def sample_problems(
    spec: ArithmeticSpec, n: int, rng: random.Random, exclude: set[tuple[str, int, int]] | None = None
) -> list[Problem]:
    """Draws ``n`` problems with distinct keys, none of them in ``exclude``.

    Args:
        spec: What problems look like.
        n: How many (>= 0).
        rng: The random stream (advanced in place).
        exclude: Keys (:func:`problem_key`) not to draw; the keys drawn are added to it.

    Returns:
        The problems, in the order drawn.

    Raises:
        ValueError: ``n < 0``, or fewer than ``n`` unused problems remain in the space.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    seen = exclude if exclude is not None else set()
    free = space_size(spec) - len(seen)
    if n > free:
        raise ValueError(
            f"asked for {n} distinct problems but only {free} of the {space_size(spec)} problems of {spec} "
            "remain: lower n_train / n_test or widen the digits / ops"
        )
    out: list[Problem] = []
    while len(out) < n:
        p = _draw(rng, spec)
        k = problem_key(p)
        if k in seen:
            continue
        seen.add(k)
        out.append(p)
    return out


def make_splits(
    n_train: int, n_test: int, seed: int, spec: ArithmeticSpec = ArithmeticSpec()
) -> tuple[list[Problem], list[Problem]]:
    """The train and test problems for a seed (test drawn first; no key in both).

    Returns:
        ``(train, test)``.

    Raises:
        ValueError: The space holds fewer than ``n_train + n_test`` distinct problems.
    """
    rng = random.Random(seed)
    seen: set[tuple[str, int, int]] = set()
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train}, {n_test}")
    if n_train + n_test > space_size(spec):
        raise ValueError(
            f"n_train + n_test = {n_train + n_test} exceeds the {space_size(spec)} distinct problems of {spec}"
        )
    test = sample_problems(spec, n_test, rng, seen)
    train = sample_problems(spec, n_train, rng, seen)
    return train, test


def question(p: Problem) -> str:
    """The problem as asked in the prompt (``{problem}`` of the template): ``What is 37+58?``."""
    return f"What is {p.text}?"


def target_response(ground_truth: Any) -> str:
    """The shortest correct response: ``\\boxed{<ground truth>}``."""
    return f"\\boxed{{{ground_truth}}}"


def solution(p: Problem) -> str:
    """A worked solution ending in ``\\boxed{answer}`` (the SFT target of the warm start).

    Addition is worked column by column from the units, each column written as
    ``x+y=s`` (units) or ``x+y+c=s`` (later columns, ``c`` the carry 0 or 1), a missing
    digit of the shorter operand counted as 0; the answer is the last column's sum
    followed by the units digits of the earlier ones. ``37+58`` ->
    ``"7+8=15 3+5+1=9 \\boxed{95}"``; ``5+4`` -> ``"5+4=9 \\boxed{9}"``. Other operations
    get the bare ``\\boxed{answer}``.
    """
    if p.op != "+":
        return target_response(p.answer)
    da, db = str(p.a)[::-1], str(p.b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}={s}" if i == 0 else f"{x}+{y}+{carry}={s}")
        carry = s // 10
    return " ".join(steps) + " " + target_response(p.answer)


def to_record(
    p: Problem, split: str, index: int, template: str | PromptTemplate = TEMPLATE
) -> dict[str, Any]:
    """One verl-format record (the keys of :data:`recipe.data.COLUMNS`)."""
    tmpl = resolve_template(template)
    answer = str(p.answer)
    return {
        "data_source": DATA_SOURCE,
        "prompt": tmpl.messages(question(p)),
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {
            "split": split,
            "index": index,
            "question": question(p),
            "answer": answer,
            "op": p.op,
            "a": p.a,
            "b": p.b,
            "solution": solution(p),
        },
    }


def write_splits(
    out_dir: str | Path,
    n_train: int,
    n_test: int,
    seed: int,
    spec: ArithmeticSpec = ArithmeticSpec(),
    template: str | PromptTemplate = TEMPLATE,
) -> dict[str, Path]:
    """Writes ``out_dir/train.parquet`` and ``out_dir/test.parquet`` (atomically).

    Returns:
        ``{"train": path, "test": path}``.

    Raises:
        ValueError: Too many problems asked for, or a bad template.
        OSError: A file cannot be written.
    """
    resolve_template(template)
    train, test = make_splits(n_train, n_test, seed, spec)
    out = Path(out_dir)
    return {
        split: write_parquet(
            [to_record(p, split, i, template) for i, p in enumerate(problems)], out / f"{split}.parquet"
        )
        for split, problems in (("train", train), ("test", test))
    }


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.tasks.arithmetic",
        description="Write synthetic arithmetic problems as verl-format train/test parquet files.",
    )
    p.add_argument("--out", required=True, help="output folder: writes OUT/train.parquet and OUT/test.parquet")
    p.add_argument("--n-train", type=int, required=True)
    p.add_argument("--n-test", type=int, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-digits", type=int, default=1)
    p.add_argument("--max-digits", type=int, default=2)
    p.add_argument("--ops", default="+", help="operations, e.g. '+' or '+-*' (default '+')")
    p.add_argument("--allow-negative", action="store_true", help="allow a-b with a < b")
    p.add_argument(
        "--template",
        default=TEMPLATE,
        help=f"recipe.data preset or a user-message template containing {{problem}} (default {TEMPLATE})",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 on bad arguments)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        spec = ArithmeticSpec(args.min_digits, args.max_digits, tuple(args.ops), args.allow_negative)
        paths = write_splits(args.out, args.n_train, args.n_test, args.seed, spec, args.template)
    except ValueError as e:
        parser.error(str(e))
    counts = {"train": args.n_train, "test": args.n_test}
    for split, path in paths.items():
        print(f"arithmetic/{split}: wrote {counts[split]} rows ({spec}) -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
