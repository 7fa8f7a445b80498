"""Tests of benchmarks.tasks.arithmetic: the synthetic task of the learning benchmarks."""

from __future__ import annotations

import random

import pyarrow.parquet as pq
import pytest

from benchmarks.tasks import arithmetic as ar
from benchmarks.tasks.arithmetic import ArithmeticSpec, Problem
from recipe.data import COLUMNS, validate_verl_parquet
from recipe.reward.math_reward import compute_score

ADD2 = ArithmeticSpec(min_digits=2, max_digits=2, ops=("+",))
MIXED = ArithmeticSpec(min_digits=1, max_digits=2, ops=("+", "-", "*"))


def keys(problems):
    return [ar.problem_key(p) for p in problems]


# --------------------------------------------------------------------------- problems


@pytest.mark.parametrize(
    "problem, text, answer",
    [
        (Problem(37, "+", 58), "37+58", 95),
        (Problem(90, "-", 17), "90-17", 73),
        (Problem(3, "-", 5), "3-5", -2),
        (Problem(12, "*", 12), "12*12", 144),
        (Problem(0, "*", 7), "0*7", 0),
    ],
)
def test_problem_text_and_answer(problem, text, answer):
    assert problem.text == text
    assert problem.answer == answer


def test_commutative_key_ignores_order_subtraction_does_not():
    assert ar.problem_key(Problem(37, "+", 58)) == ar.problem_key(Problem(58, "+", 37)) == ("+", 37, 58)
    assert ar.problem_key(Problem(4, "*", 9)) == ("*", 4, 9) == ar.problem_key(Problem(9, "*", 4))
    assert ar.problem_key(Problem(9, "-", 4)) != ar.problem_key(Problem(4, "-", 9))


@pytest.mark.parametrize(
    "spec, size",
    [
        (ArithmeticSpec(1, 1, ("+",)), 55),  # 10 values: 10 * 11 / 2 unordered pairs
        (ArithmeticSpec(1, 1, ("-",)), 55),  # a >= b
        (ArithmeticSpec(1, 1, ("-",), allow_negative=True), 100),  # ordered pairs
        (ADD2, 4095),  # 90 values: 90 * 91 / 2
        (ArithmeticSpec(1, 2, ("+", "-", "*")), 3 * 5050),  # 100 values
    ],
)
def test_space_size(spec, size):
    assert ar.space_size(spec) == size


def test_space_size_matches_exhaustive_sampling():
    spec = ArithmeticSpec(1, 1, ("+", "-"))
    problems = ar.sample_problems(spec, ar.space_size(spec), random.Random(0))
    assert len(set(keys(problems))) == 110
    with pytest.raises(ValueError, match="only 0 of the 110 problems"):
        ar.sample_problems(spec, 1, random.Random(0), exclude=set(keys(problems)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(min_digits=0), "min_digits"),
        (dict(min_digits=3, max_digits=2), "max_digits"),
        (dict(max_digits=10), "max_digits"),
        (dict(ops=("/",)), "ops"),
        (dict(ops=()), "ops"),
        (dict(ops=("+", "+")), "ops"),
    ],
)
def test_bad_spec_is_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ArithmeticSpec(**kwargs)


# ----------------------------------------------------------------------------- splits


def test_splits_are_deterministic_and_seed_dependent():
    a = ar.make_splits(300, 50, seed=3, spec=MIXED)
    b = ar.make_splits(300, 50, seed=3, spec=MIXED)
    c = ar.make_splits(300, 50, seed=4, spec=MIXED)
    assert a == b
    assert a[1] != c[1]


def test_splits_have_distinct_problems_and_no_overlap():
    train, test = ar.make_splits(2000, 500, seed=0, spec=ADD2)
    assert len(train) == 2000 and len(test) == 500
    assert len(set(keys(train))) == 2000 and len(set(keys(test))) == 500
    assert not set(keys(train)) & set(keys(test))
    # no mirror image either: b+a of a test problem is never a train problem
    mirrored = {(p.op, p.b, p.a) for p in test}
    assert not mirrored & {(p.op, p.a, p.b) for p in train}


def test_test_split_is_fixed_and_train_splits_are_nested():
    small_train, test_small = ar.make_splits(100, 50, seed=1, spec=ADD2)
    big_train, test_big = ar.make_splits(400, 50, seed=1, spec=ADD2)
    assert test_small == test_big
    assert big_train[:100] == small_train


def test_operands_respect_digits_and_non_negative_subtraction():
    train, _ = ar.make_splits(3000, 0, seed=0, spec=MIXED)
    assert {p.op for p in train} == {"+", "-", "*"}
    assert all(0 <= p.a <= 99 and 0 <= p.b <= 99 for p in train)
    assert all(p.answer >= 0 for p in train)
    two = ar.make_splits(500, 0, seed=0, spec=ADD2)[0]
    assert all(10 <= p.a <= 99 and 10 <= p.b <= 99 for p in two)
    neg = ar.make_splits(500, 0, seed=0, spec=ArithmeticSpec(1, 2, ("-",), allow_negative=True))[0]
    assert any(p.answer < 0 for p in neg)


def test_too_many_problems_is_an_error():
    with pytest.raises(ValueError, match="exceeds the 55 distinct problems"):
        ar.make_splits(50, 6, seed=0, spec=ArithmeticSpec(1, 1, ("+",)))
    ar.make_splits(50, 5, seed=0, spec=ArithmeticSpec(1, 1, ("+",)))  # exactly the space: fine


@pytest.mark.parametrize(
    "problem, worked",
    [
        (Problem(37, "+", 58), "7+8=15 3+5+1=9 \\boxed{95}"),
        (Problem(26, "+", 11), "6+1=7 2+1+0=3 \\boxed{37}"),
        (Problem(99, "+", 1), "9+1=10 9+0+1=10 \\boxed{100}"),  # shorter operand padded with 0
        (Problem(5, "+", 4), "5+4=9 \\boxed{9}"),
        (Problem(3, "-", 5), "\\boxed{-2}"),
        (Problem(12, "*", 12), "\\boxed{144}"),
    ],
)
def test_worked_solution(problem, worked):
    assert ar.solution(problem) == worked


def test_worked_solutions_of_a_split_are_all_correct():
    train, _ = ar.make_splits(500, 0, seed=0, spec=ArithmeticSpec(1, 3, ("+",)))
    for p in train:
        sol = ar.solution(p)
        assert sol.endswith(ar.target_response(p.answer))
        # every column: x+y(+c)=s with s = x + y + c
        for step in sol.split(" ")[:-1]:
            lhs, rhs = step.split("=")
            assert sum(int(t) for t in lhs.split("+")) == int(rhs)


# ---------------------------------------------------------------------------- records


def test_record_layout():
    rec = ar.to_record(Problem(37, "+", 58), "train", 7)
    assert set(rec) == set(COLUMNS)
    assert rec["data_source"] == "arithmetic"
    assert rec["prompt"] == [
        {"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."},
        {"role": "user", "content": "What is 37+58?"},
    ]
    assert rec["ability"] == "math"
    assert rec["reward_model"] == {"style": "rule", "ground_truth": "95"}
    assert rec["extra_info"] == {
        "split": "train", "index": 7, "question": "What is 37+58?", "answer": "95", "op": "+", "a": 37, "b": 58,
        "solution": "7+8=15 3+5+1=9 \\boxed{95}",
    }
    assert ar.target_response("95") == "\\boxed{95}"
    user_only = ar.to_record(Problem(1, "+", 2), "test", 0, template="Q: {problem}")
    assert user_only["prompt"] == [{"role": "user", "content": "Q: What is 1+2?"}]


def test_write_splits_and_cli(tmp_path):
    paths = ar.write_splits(tmp_path / "w", 40, 10, seed=2, spec=ADD2)
    assert validate_verl_parquet(paths["train"]) == 40
    assert validate_verl_parquet(paths["test"]) == 10
    rows = pq.read_table(paths["test"]).to_pylist()
    _, test = ar.make_splits(40, 10, seed=2, spec=ADD2)
    assert [r["extra_info"]["question"] for r in rows] == [f"What is {p.text}?" for p in test]
    assert [r["prompt"][-1]["content"] for r in rows] == [f"What is {p.text}?" for p in test]
    assert [r["extra_info"]["index"] for r in rows] == list(range(10))
    assert {r["extra_info"]["split"] for r in rows} == {"test"}

    assert ar.main(["--out", str(tmp_path / "cli"), "--n-train", "40", "--n-test", "10", "--seed", "2",
                    "--min-digits", "2", "--max-digits", "2"]) == 0
    assert pq.read_table(tmp_path / "cli" / "test.parquet").to_pylist() == rows
    with pytest.raises(SystemExit) as e:
        ar.main(["--out", str(tmp_path / "bad"), "--n-train", "1", "--n-test", "1", "--ops", "/"])
    assert e.value.code == 2


def test_answers_are_graded_by_the_math_reward():
    # ground truths as written in the parquet, including a negative one and a product
    for p in (Problem(37, "+", 58), Problem(3, "-", 5), Problem(12, "*", 12)):
        gt = ar.to_record(p, "test", 0)["reward_model"]["ground_truth"]
        right = compute_score(ar.DATA_SOURCE, ar.target_response(gt), gt)
        assert right["acc"] == 1.0 and right["score"] == 1.0 and right["pred"] == gt
        assert compute_score(ar.DATA_SOURCE, ar.solution(p), gt)["acc"] == 1.0
        wrong = compute_score(ar.DATA_SOURCE, ar.target_response(p.answer + 1), gt)
        assert wrong["acc"] == 0.0
    assert compute_score(ar.DATA_SOURCE, "95", "95")["has_answer"] == 0  # no box: no answer


# --------------------------------------------------------- benchmarks/learning_setup.py


def _learning_setup():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[3] / "benchmarks" / "learning_setup.py"
    spec = importlib.util.spec_from_file_location("learning_setup", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["learning_setup"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_learning_setup_splits_are_disjoint_and_the_cache_key_tracks_settings(tmp_path):
    ls = _learning_setup()
    cfg = ls.LearningSetupConfig(n_train=30, n_test=20, n_sft=40, n_dev=10)
    paths = ls.write_data(cfg, tmp_path)
    rows = {s: pq.read_table(p).to_pylist() for s, p in paths.items()}
    assert {s: len(r) for s, r in rows.items()} == {"sft": 40, "dev": 10, "train": 30, "test": 20}
    seen = {}
    for split, split_rows in rows.items():
        for r in split_rows:
            e = r["extra_info"]
            key = ar.problem_key(Problem(e["a"], e["op"], e["b"]))
            assert key not in seen, (key, split, seen.get(key))
            seen[key] = split
    # the RL validation split is the task's own test split for the seed
    assert [r["extra_info"]["question"] for r in rows["test"]] == [
        ar.question(p) for p in ar.make_splits(0, 20, 0, ADD2)[1]
    ]
    assert cfg.key() == ls.LearningSetupConfig(n_train=30, n_test=20, n_sft=40, n_dev=10).key()
    assert cfg.key() != ls.LearningSetupConfig(n_train=30, n_test=20, n_sft=40, n_dev=10, sft_lr=1e-3).key()
