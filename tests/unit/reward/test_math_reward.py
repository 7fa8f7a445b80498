"""Tests of recipe.reward.math_reward.compute_score, the verl reward function."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from recipe.reward.grader import close_all_graders
from recipe.reward.math_reward import answer_style, compute_score, compute_score_async

# Small limits keep the suite fast; every call below shares one pool per configuration.
FAST = dict(soft_timeout_s=1, hard_timeout_s=3)
KEYS = {"score", "acc", "has_answer", "grader_timeout", "grader_error", "grader_rejected", "pred"}


@pytest.fixture(scope="module", autouse=True)
def _close_pools():
    yield
    close_all_graders()


def score(solution, gold, source="math500", **kw):
    return compute_score(source, solution, gold, extra_info={"index": 0}, **FAST, **kw)


def test_answer_style():
    assert answer_style("gsm8k") == "gsm8k"
    assert answer_style("openai/gsm8k") == "gsm8k"
    assert answer_style("math500") == "boxed"
    assert answer_style("aime24") == "boxed"


@pytest.mark.parametrize(
    ("solution", "gold", "source", "acc"),
    [
        (r"... so the answer is $\boxed{\frac{1}{2}}$.", "0.5", "math500", 1.0),
        (r"\boxed{0.5}", r"\frac12", "math500", 1.0),
        (r"\boxed{[2,5)}", "[2, 5)", "math500", 1.0),
        (r"\boxed{3}", "4", "math500", 0.0),
        ("Natalia sold 72 clips.\n#### 72", "72", "gsm8k", 1.0),
        (r"The total is \boxed{1,000}", "1000", "gsm8k", 1.0),
        (r"\boxed{72.0}", "72", "gsm8k", 1.0),
        ("#### 71", "72", "gsm8k", 0.0),
        ("I think 72.", "72", "gsm8k", 0.0),
    ],
)
def test_default_rewards_are_zero_one(solution, gold, source, acc):
    out = score(solution, gold, source)
    assert set(out) == KEYS
    assert out["acc"] == acc
    assert out["score"] == acc


def test_plus_minus_one_rewards_and_acc_is_separate():
    kw = dict(correct_reward=1.0, incorrect_reward=-1.0)
    right = score(r"\boxed{2}", "2", **kw)
    wrong = score(r"\boxed{3}", "2", **kw)
    missing = score("no answer", "2", **kw)
    assert (right["score"], right["acc"]) == (1.0, 1.0)
    assert (wrong["score"], wrong["acc"]) == (-1.0, 0.0)
    assert (missing["score"], missing["acc"], missing["has_answer"]) == (-1.0, 0.0, 0)


def test_format_reward_off_by_default_and_documented_rule():
    assert score(r"\boxed{3}", "2")["score"] == 0.0
    kw = dict(format_reward=0.1, format_penalty=0.2)
    assert score(r"\boxed{2}", "2", **kw)["score"] == pytest.approx(1.1)
    assert score(r"\boxed{3}", "2", **kw)["score"] == pytest.approx(0.1)
    assert score("no box", "2", **kw)["score"] == pytest.approx(-0.2)
    # A rejected (hostile) box gets no format bonus.
    rejected = score(r"\boxed{9^{9^{9^{9}}}}", "2", **kw)
    assert rejected["score"] == pytest.approx(0.0)
    assert rejected["grader_rejected"] == 1


def test_result_types_are_uniform_for_verl():
    """verl stacks every key over the batch, so every call returns the same keys; numbers are
    averaged into metrics, ``pred`` (a string) is skipped there but used for maj@N."""
    outs = [
        score(r"\boxed{2}", "2"),
        score("nothing", "2"),
        score(r"\boxed{" + "(" * 60 + ")" * 60 + "}", "2"),
        score("#### 5", "5", source="gsm8k"),
    ]
    for out in outs:
        assert set(out) == KEYS
        assert isinstance(out["score"], float)
        assert isinstance(out["acc"], float)
        for key in ("has_answer", "grader_timeout", "grader_error", "grader_rejected"):
            assert out[key] in (0, 1) and isinstance(out[key], int)
        assert isinstance(out["pred"], str)
    assert [o["has_answer"] for o in outs] == [1, 0, 1, 1]
    assert outs[2]["grader_rejected"] == 1


def test_pred_is_truncated():
    out = score(r"\boxed{" + "7" * 300 + "}", "1", pred_max_chars=50)
    assert len(out["pred"]) <= 50


@pytest.mark.parametrize(
    "solution",
    [
        r"\boxed{9^{9^{9^{9}}}}",
        r"\boxed{(10^{10^{10}})!}",
        r"\boxed{1E1000000}",
        r"\boxed{\operatorname{zeros}(20000,20000)}",
        r"\boxed{" + "\\frac{1}{" * 10000 + "2" + "}" * 10000 + "}",
        r"\boxed{" + "(" * 50 + "1" + ")" * 50 + "}",
        "$$" + "\\boxed{1}" * 2000,
        r"\boxed{__import__('os').system('echo pwned')}",
    ],
)
def test_hostile_answers_get_incorrect_reward(solution):
    t0 = time.monotonic()
    out = score(solution, "2", correct_reward=1.0, incorrect_reward=-1.0)
    assert out["score"] == -1.0 and out["acc"] == 0.0
    assert time.monotonic() - t0 < 3 + 4


def test_hard_timeout_reported_in_metrics():
    out = score(r"\boxed{1E1000000}", "1", max_exponent_digits=None)
    assert (out["score"], out["grader_timeout"], out["grader_rejected"]) == (0.0, 1, 0)
    assert score(r"\boxed{1}", "1", max_exponent_digits=None)["acc"] == 1.0


def test_memory_blowup_reported_as_error():
    out = score(r"\boxed{\operatorname{zeros}(20000,20000)}", "1")
    assert (out["acc"], out["grader_error"]) == (0.0, 1)


def test_list_of_acceptable_gold_answers():
    assert score(r"\boxed{3}", ["2", "3"])["acc"] == 1.0
    assert score(r"\boxed{4}", np.array(["2", "3"]))["acc"] == 0.0


def test_unknown_and_verl_kwargs_are_ignored():
    out = compute_score(
        "math500",
        r"\boxed{2}",
        "2",
        extra_info=None,
        reward_router_address=None,
        reward_model_tokenizer=None,
        some_future_option=True,
        **FAST,
    )
    assert out["acc"] == 1.0


def test_compute_score_from_non_main_threads():
    """verl calls compute_score via loop.run_in_executor (a thread pool) in a Ray actor."""
    cases = [(r"\boxed{%d}" % k, str(k), 1.0) for k in range(12)]
    cases += [(r"\boxed{%d}" % k, str(k + 1), 0.0) for k in range(12)]
    cases += [("#### 1,00%d" % k, "100%d" % k, 1.0) for k in range(4)]
    seen_threads = set()

    def run(case):
        seen_threads.add(threading.current_thread().name)
        solution, gold, acc = case
        source = "gsm8k" if solution.startswith("####") else "math500"
        return compute_score(source, solution, gold, **FAST)["acc"] == acc

    with ThreadPoolExecutor(4) as ex:
        assert all(ex.map(run, cases))
    assert threading.main_thread().name not in seen_threads


def test_compute_score_async_and_run_in_executor():
    async def main():
        loop = asyncio.get_running_loop()
        direct = await compute_score_async("math500", r"\boxed{\frac{1}{2}}", "0.5", **FAST)
        in_thread = await loop.run_in_executor(
            None, lambda: compute_score("math500", r"\boxed{\frac{1}{2}}", "0.5", **FAST)
        )
        many = await asyncio.gather(
            *[compute_score_async("math500", r"\boxed{%d}" % k, "3", **FAST) for k in range(6)]
        )
        return direct, in_thread, many

    direct, in_thread, many = asyncio.run(main())
    assert direct == in_thread
    assert direct["acc"] == 1.0
    assert [m["acc"] for m in many] == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0]


def test_verl_loader_and_metric_aggregation():
    """Load the function as verl does and aggregate its outputs with verl's own code."""
    from omegaconf import OmegaConf
    from verl.trainer.ppo.metric_utils import process_validation_metrics
    from verl.trainer.ppo.reward import get_custom_reward_fn

    cfg = OmegaConf.create(
        {
            "reward": {
                "custom_reward_function": {
                    "path": "pkg://recipe.reward.math_reward",
                    "name": "compute_score",
                    "reward_kwargs": {"incorrect_reward": -1.0, **FAST},
                }
            }
        }
    )
    fn = get_custom_reward_fn(cfg)
    samples = [
        ("math500", "u1", r"\boxed{2}", "2"),
        ("math500", "u1", r"\boxed{3}", "2"),
        ("math500", "u2", "no answer", "5"),
        ("math500", "u2", r"\boxed{5}", "5"),
        ("gsm8k", "u3", "#### 1,000", "1000"),
        ("gsm8k", "u3", r"\boxed{9^{9^{9^{9}}}}", "1000"),
    ]
    infos = [fn(data_source=s, solution_str=r, ground_truth=g, extra_info={}) for s, _, r, g in samples]
    assert [i["score"] for i in infos] == [1.0, -1.0, -1.0, 1.0, 1.0, -1.0]
    # As verl's reward loop does: one array per key, then validation metrics.
    keys = list(infos[0].keys())
    non_tensor = {k: np.array([info[k] for info in infos]) for k in keys}
    metrics = process_validation_metrics(
        [s for s, *_ in samples], [u for _, u, *_ in samples], {k: list(v) for k, v in non_tensor.items()}
    )
    assert metrics["math500"]["acc"]["mean@2"] == pytest.approx(0.5)
    assert metrics["gsm8k"]["grader_rejected"]["mean@2"] == pytest.approx(0.5)
    assert "pred" not in metrics["math500"]
    assert "maj@2/mean" in metrics["math500"]["acc"]
