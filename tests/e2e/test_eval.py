"""End to end: ``python -m recipe.eval`` as a user runs it, on the CPU (``hf`` backend).

One run from an HF model directory (a tiny model from recipe.models), its resumed rerun,
and one run from a real verl checkpoint written by a 1-step ``./run.sh`` (merged to HF
with verl's model merger). About 1.5 min on 2 cores, most of it the training step.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from recipe import eval as ev
from recipe.models import build_tiny_model
from tests.e2e.test_main_job import run_job
from tests.paths import DATA, require

ROOT = Path(__file__).resolve().parents[2]
SMALL = ("benchmarks=[math500,gsm8k]", "k=2", "pass_k=[1,2]", "max_tokens=16", "max_problems=3", "backend=hf")
SAMPLE_KEYS = {"benchmark", "index", "problem_id", "sample", "prompt", "response", "pred", "gold", "acc",
               "has_answer", "grader_timeout", "grader_error", "grader_rejected", "finish_reason",
               "prompt_tokens", "response_tokens"}
METRIC_KEYS = {f"{b}/{m}" for b in ("math500", "gsm8k", "average") for m in ("avg@2", "pass@1", "pass@2")}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    require(DATA / "gsm8k" / "train.jsonl", DATA / "gsm8k" / "test.jsonl", DATA / "math500" / "test.jsonl")
    art = tmp_path_factory.mktemp("eval_artifacts")
    build_tiny_model(art / "models" / "tiny", vocab_size=512, max_train_rows=200)
    return art


def run_eval(artifacts: Path, *overrides: str, expect_rc: int = 0) -> subprocess.CompletedProcess:
    env = dict(os.environ, RECIPE_ARTIFACTS=str(artifacts), PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "recipe.eval", *overrides],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == expect_rc, (
        f"recipe.eval {' '.join(overrides)}: rc {proc.returncode}\n{proc.stderr[-4000:]}"
    )
    return proc


def check_outputs(out: Path, stdout: str) -> dict:
    lines = [json.loads(x) for x in (out / ev.SAMPLES_FILE).read_text().splitlines()]
    assert len(lines) == 3 * 2 * 2  # problems x benchmarks x k
    assert all(set(r) == SAMPLE_KEYS for r in lines)
    assert sorted((r["benchmark"], r["index"], r["sample"]) for r in lines) == sorted(
        (b, i, s) for b in ("math500", "gsm8k") for i in range(3) for s in range(2))
    assert all(r["acc"] in (0.0, 1.0) and 1 <= r["response_tokens"] <= 16 and r["prompt_tokens"] > 0 for r in lines)
    assert all(r["prompt"].rstrip().endswith("assistant") for r in lines)  # chat template, generation prompt
    results = json.loads((out / ev.RESULTS_JSON).read_text())
    assert set(results["metrics"]) == METRIC_KEYS
    assert all(0.0 <= v <= 1.0 for v in results["metrics"].values())
    assert results["benchmarks"]["math500"]["problems"] == 3 and results["backend"] == "hf"
    table = (out / ev.RESULTS_MD).read_text()
    for text in ("| benchmark | problems | k | avg@2 (%) | pass@1 (%) | pass@2 (%)", "| math500 | 3 | 2 |",
                 "| gsm8k | 3 | 2 |", "| **average** | 6 | 2 |"):
        assert text in table and text in stdout, text
    return results


def test_eval_model_dir_then_resume(artifacts):
    out = artifacts / "eval" / "tiny"
    args = (f"model_path={artifacts / 'models' / 'tiny'}", *SMALL, f"out_dir={out}")
    proc = run_eval(artifacts, *args)
    assert "[eval] math500: 3/3 problems, 6 samples" in proc.stdout and "samples/s" in proc.stdout
    first = check_outputs(out, proc.stdout)
    assert first["new_samples"] == 12
    assert (artifacts / "data" / "math500" / "test.parquet").is_file()  # prepared on demand

    proc = run_eval(artifacts, *args)  # resumed: nothing left to generate, same results
    assert "0 problems to generate (6 done already)" in proc.stdout
    again = check_outputs(out, proc.stdout)
    assert again["new_samples"] == 0 and again["metrics"] == first["metrics"]
    assert (first["settings"]["grading"], first["settings"]["stops"]) == ("strict", "eos+turn_end")

    proc = run_eval(artifacts, *args, "grading=harness", expect_rc=2)  # samples graded otherwise: named
    assert "grading: 'strict' -> 'harness'" in proc.stderr

    proc = run_eval(artifacts, *args[:-1], "benchmarks=[math500,minerva]", f"out_dir={out}", expect_rc=2)
    assert "unknown benchmark 'minerva'" in proc.stderr and "minerva_math" in proc.stderr


def test_eval_verl_checkpoint(artifacts):
    run_dir = artifacts / "runs" / "eval_ckpt"
    run_job(
        artifacts,
        f"actor_rollout_ref.model.path={artifacts / 'models' / 'tiny'}",
        f"trainer.default_local_dir={run_dir}",
        "trainer.experiment_name=eval_ckpt",
        "trainer.total_training_steps=1",
        "trainer.save_freq=1",
        "trainer.test_freq=-1",
        "data.train_batch_size=2",
        "data.max_response_length=16",
        "actor_rollout_ref.rollout.n=2",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        timeout=600,
    )
    step = run_dir / "global_step_1"
    assert (step / "actor" / "model_world_size_1_rank_0.pt").is_file()
    out = artifacts / "eval" / "ckpt"
    proc = run_eval(artifacts, f"checkpoint={step}", *SMALL, f"out_dir={out}")
    merged = step / "actor" / ev.MERGED_DIR
    assert (merged / "config.json").is_file() and (merged / "model.safetensors").is_file()
    results = check_outputs(out, proc.stdout)
    assert results["settings"]["model"] == str(merged)

    missing = run_dir / "global_step_7"
    proc = run_eval(artifacts, f"checkpoint={missing}", *SMALL, expect_rc=2)
    assert f"checkpoint: {missing} does not exist" in proc.stderr
