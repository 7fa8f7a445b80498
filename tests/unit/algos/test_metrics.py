"""Metrics of recipe.algos.metrics on hand-computed examples: pass@k / avg@k and the
evaluation / validation tables built from them (``python -m recipe.eval``, ``val/*``),
the effective ratio (DOTS + RR paper) and the reward-field means (``reward/*``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from recipe.algos.metrics import (
    avg_at_k,
    benchmark_metrics,
    check_pass_ks,
    effective_ratio,
    pass_at_k,
    reward_metrics,
    validation_metrics,
)
from recipe.config import ConfigError


# --------------------------------------------------------------------------------------
# pass@k, avg@k
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "n,c,k,expected",
    [
        (4, 1, 1, 0.25),
        (4, 1, 2, 0.5),  # 1 - C(3,2)/C(4,2) = 1 - 3/6
        (5, 2, 3, 0.9),  # 1 - C(3,3)/C(5,3) = 1 - 1/10
        (16, 0, 1, 0.0),
        (16, 0, 16, 0.0),
        (4, 3, 2, 1.0),  # n - c = 1 < k = 2: every draw of 2 holds a correct one
        (4, 4, 4, 1.0),
        (16, 4, 1, 0.25),
        (10, 3, 2, 1 - 21 / 45),  # 1 - C(7,2)/C(10,2)
    ],
)
def test_pass_at_k_hand_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_equals_the_binomial_formula_and_pass1_is_c_over_n():
    for n in range(1, 21):
        for c in range(n + 1):
            assert pass_at_k(n, c, 1) == pytest.approx(c / n, abs=1e-12)
            for k in range(1, n + 1):
                exact = 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12), (n, c, k)
    # large n: the product form stays finite where C(n, k) would overflow a float
    assert pass_at_k(2000, 1, 1000) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize(
    "args,match",
    [((4, 5, 1), "c must be in"), ((4, -1, 1), "c must be in"), ((4, 1, 5), "k must be in"),
     ((4, 1, 0), "k must be in"), ((0, 0, 1), "n must be"), ((4.0, 1, 1), "n must be an integer"),
     ((4, True, 1), "c must be an integer")],
)
def test_pass_at_k_rejects_bad_counts(args, match):
    with pytest.raises(ValueError, match=match):
        pass_at_k(*args)


def test_avg_at_k():
    assert avg_at_k([[1, 0, 0, 1], [1, 1, 1, 1]]) == 0.75
    assert avg_at_k([[0.0, 0.0], [0.0, 1.0]]) == 0.25
    # per-problem means are averaged (not pooled samples): (1 + 0.5) / 2
    assert avg_at_k([[1], [0, 0, 1, 1]]) == 0.75
    with pytest.raises(ValueError, match="no problems"):
        avg_at_k([])
    with pytest.raises(ValueError, match="problem 1 has no samples"):
        avg_at_k([[1], []])
    with pytest.raises(ValueError, match=r"problem 0 has an accuracy outside \[0, 1\]"):
        avg_at_k([[1.5, 0]])


def _records(bench, problems):
    return [{"benchmark": bench, "index": i, "acc": a} for i, accs in enumerate(problems) for a in accs]


def test_benchmark_metrics_two_benchmarks():
    # A: c = 1 and 2 of k = 4; B: c = 4 and 0
    recs = _records("A", [[1, 0, 0, 0], [0, 1, 1, 0]]) + _records("B", [[1, 1, 1, 1], [0, 0, 0, 0]])
    m = benchmark_metrics(recs, pass_ks=[1, 2])
    a_pass2 = ((1 - 3 / 6) + (1 - 1 / 6)) / 2  # 1 - C(3,2)/C(4,2), 1 - C(2,2)/C(4,2)
    expected = {
        "A/avg@4": 0.375, "A/pass@1": 0.375, "A/pass@2": a_pass2,
        "B/avg@4": 0.5, "B/pass@1": 0.5, "B/pass@2": 0.5,
        "average/avg@4": 0.4375, "average/pass@1": 0.4375, "average/pass@2": (a_pass2 + 0.5) / 2,
    }
    assert m.keys() == expected.keys()
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, abs=1e-12), key
    assert benchmark_metrics([], [1]) == {}


def test_benchmark_metrics_errors():
    with pytest.raises(ValueError, match=r"A: problems have different numbers of samples \[2, 4\]"):
        benchmark_metrics(_records("A", [[1, 0, 0, 0], [1, 0]]))
    with pytest.raises(ValueError, match=r"different samples per problem \[2, 4\]"):
        benchmark_metrics(_records("A", [[1, 0, 0, 0]]) + _records("B", [[1, 0]]))
    with pytest.raises(ValueError, match="accuracy 0.5; pass@k needs 0 or 1"):
        benchmark_metrics(_records("A", [[0.5, 1]]))
    with pytest.raises(ValueError, match=r"pass@4 needs 1 <= 4 <= n = 2"):
        benchmark_metrics(_records("A", [[1, 0]]), pass_ks=[1, 4])
    with pytest.raises(ValueError, match="record 0: missing key 'index'"):
        benchmark_metrics([{"benchmark": "A", "acc": 1}])
    with pytest.raises(ValueError, match=r"record 0 \(A, problem 3\): accuracy 2 is outside"):
        benchmark_metrics([{"benchmark": "A", "index": 3, "acc": 2}])


def test_validation_metrics_hand_example_and_same_names_as_eval():
    sources = ["gsm8k"] * 4 + ["math500"] * 4
    uids = ["a", "a", "b", "b", "c", "c", "d", "d"]
    accs = [1, 0, 0, 0, 1, 1, 1, 0]
    m = validation_metrics(sources, uids, accs, pass_ks=[1, 2])
    expected = {
        "val/gsm8k/avg@2": 0.25, "val/gsm8k/pass@1": 0.25, "val/gsm8k/pass@2": 0.5,  # a: 1 of 2 -> 1; b: 0
        "val/math500/avg@2": 0.75, "val/math500/pass@1": 0.75, "val/math500/pass@2": 1.0,
        "val/average/avg@2": 0.5, "val/average/pass@1": 0.5, "val/average/pass@2": 0.75,
    }
    assert m == pytest.approx(expected, abs=1e-12) and m.keys() == expected.keys()
    # an evaluation key X is the validation key val/X
    recs = [{"benchmark": s, "index": u, "acc": a} for s, u, a in zip(sources, uids, accs)]
    assert {f"val/{k}": v for k, v in benchmark_metrics(recs, [1, 2]).items()} == m
    # order of responses does not matter; numpy values are accepted
    perm = [7, 0, 5, 2, 4, 1, 6, 3]
    m2 = validation_metrics([sources[i] for i in perm], np.array(uids)[perm], np.array(accs, dtype=np.float32)[perm],
                            [1, 2])
    assert m2 == pytest.approx(m)


def test_validation_metrics_errors():
    with pytest.raises(ValueError, match="same length, got 2, 2, 1"):
        validation_metrics(["a", "a"], [1, 1], [1])
    with pytest.raises(ValueError, match=r"pass@2 needs 1 <= 2 <= n = 1"):
        validation_metrics(["a"], [1], [1.0], pass_ks=[1, 2])
    with pytest.raises(ValueError, match=r"response 1 \(a, uid 1\): accuracy -1"):
        validation_metrics(["a", "a"], [1, 1], [1, -1])
    assert validation_metrics([], [], []) == {}


def test_check_pass_ks():
    assert check_pass_ks([1, 4, 4, 16], 16) == [1, 4, 16]
    with pytest.raises(ConfigError, match=r"pass_k=\[1, 8\]: pass@8 needs 1 <= 8 <= k = 4"):
        check_pass_ks([1, 8], 4)
    with pytest.raises(ConfigError, match="pass_k: '2' is not an integer"):
        check_pass_ks(["2"], 4)


# --------------------------------------------------------------------------------------
# effective ratio
# --------------------------------------------------------------------------------------
def test_effective_ratio_hand_values():
    # groups: a [1, 0] mixed (0.5), b [1, 1] all correct, c [0, 0] all wrong, d [0.5, 0.5] partial credit (0.5)
    uids = ["a", "a", "b", "b", "c", "c", "d", "d"]
    accs = [1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.5, 0.5]
    assert effective_ratio(uids, accs) == 0.5  # 2 of 4 groups
    assert effective_ratio(uids[:6], accs[:6]) == pytest.approx(1 / 3)  # a of a, b, c
    assert effective_ratio(["a", "b", "a"], [True, False, False]) == 0.5  # bools; interleaved uids: a 0.5, b 0
    assert effective_ratio(["a", "a", "b"], [0.25, 0.25, 0.999]) == 1.0  # strictly inside (0, 1)
    assert effective_ratio(["a", "a"], [1, 1]) == 0.0
    assert type(effective_ratio(uids, accs)) is float


def test_effective_ratio_none_without_responses_and_errors():
    assert effective_ratio([], []) is None
    with pytest.raises(ValueError, match="2 uids but 1 accuracies"):
        effective_ratio(["a", "b"], [1.0])
    with pytest.raises(ValueError, match=r"\[0, 1\].*'a'"):  # a +-1 score is not an accuracy
        effective_ratio(["a", "a"], [1.0, -1.0])


# --------------------------------------------------------------------------------------
# reward-field means
# --------------------------------------------------------------------------------------
def test_reward_metrics_hand_values():
    infos = [
        {"score": 1.0, "acc": True, "has_answer": 1, "pred": "42", "grader_timeout": False},
        {"score": 0.0, "acc": False, "has_answer": 0, "pred": "7"},
        {"score": 1.0, "acc": np.bool_(True), "has_answer": np.int64(1), "len": np.float32(3.5)},
        {"acc": None, "pred": None},  # None is not a number: ignored
        {},  # a response without reward fields
    ]
    got = reward_metrics(infos)
    assert set(got) == {"reward/acc", "reward/has_answer", "reward/grader_timeout", "reward/len"}
    assert got["reward/acc"] == pytest.approx(2 / 3)  # (1 + 0 + 1) / 3 responses that carry it
    assert got["reward/has_answer"] == pytest.approx(2 / 3)
    assert got["reward/grader_timeout"] == 0.0  # one response carries it
    assert got["reward/len"] == 3.5
    assert all(type(v) is float for v in got.values())
    assert reward_metrics(infos, prefix="x/").keys() == {"x/acc", "x/has_answer", "x/grader_timeout", "x/len"}
    assert reward_metrics([]) == {}
    assert reward_metrics([{"pred": "1", "score": 0.5}]) == {}  # score: verl's critic/score/*; strings skipped
    assert reward_metrics(iter([{"acc": 0.25}, {"acc": 0.75}, {"acc": 1}])) == {"reward/acc": pytest.approx(2 / 3)}
