"""Same seed, same run; and a run killed (kill -9) during step 3 resumes to exactly the
steps of an uninterrupted run (torchtune's resume test), through verl's V1 trainer on CPU.

For each recipe: run A goes 4 steps uninterrupted (checkpoints at steps 2 and 4); run B,
the same command, is killed with SIGKILL (its whole process group: driver, Ray daemons,
workers) once the step-2 checkpoint is published and step 3 has started, then resumed with
the same command. B's steps 1-2 (a fresh run) must equal A's (same seed), and B's steps 3-4
(after the resume) must equal A's: every logged metric but timings, bit for bit
(``assert a == b`` on the floats). Nothing is toleranced: rollouts are seeded per response
(verl_patches.seeding), rows are ordered by key, and the resumed state (weights,
optimizer, data order, replay buffer, DOTS predictions and selector, LoRR counters,
theta_0, initial pairs, reference model, RNGs) is restored exactly.

Reward: tests/e2e/parity_reward.py (mixed groups from a random tiny model).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.test_main_job import PARITY_REWARD, ROOT, read_metrics, run_job

#: timings and throughputs differ between any two runs
VARYING = re.compile(r"^(timing_s|timing_per_token_ms)/|(^|/)perf/|throughput|memory|_s$|/time")

RECIPES = {
    "grpo": (),
    # refill-mode filtering: the refill rounds' prompts and which groups are kept
    "reinforce_rej": ("group_filter.mode=refill", "group_filter.max_gen_rounds=3"),
    # DOTS rounds at steps 1 and 3 (the resumed run starts with one), replay from step 2
    "grpo_dots_rr": (),
    # L = 3 passes per step, resets, reuse of the initial pairs, iteration-start reference
    "lorr_dpo": (),
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts_repro")


#: each response generated alone: the ``hf`` server batches the requests that arrive within
#: ``batch_wait_ms`` of each other, so on a loaded machine two runs can batch the same
#: requests differently, and a batch's left padding and size change the float32 rounding of
#: the recorded rollout log-probs (~1e-6 relative: CI once saw ``rollout_corr/chi2_seq``
#: 0.0316646 vs 0.0316653 at step 2 of reinforce_rej). One request per batch makes them
#: independent of timing; the README's reproducibility section documents the same setting.
BATCH_INVARIANT = "actor_rollout_ref.rollout.max_num_seqs=1"


def _command(name: str, recipe: str) -> list[str]:
    return [str(ROOT / "run.sh"), f"recipe={recipe}", f"trainer.experiment_name={name}",
            "trainer.total_training_steps=4", "trainer.save_freq=2", "trainer.test_freq=-1",
            f"reward.custom_reward_function.path={PARITY_REWARD}", BATCH_INVARIANT, *RECIPES[recipe]]


def _env(artifacts: Path) -> dict:
    """The environment of ``run_job`` (tests/e2e/test_main_job.py), for a run started with Popen."""
    return dict(os.environ, RECIPE_ARTIFACTS=str(artifacts), PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0")


def _run_killed_during_step_3(artifacts: Path, name: str, recipe: str) -> None:
    """Start the run and SIGKILL its process group once global_step_2 is published."""
    run_dir = artifacts / "runs" / name
    marker = run_dir / "global_step_2" / "COMPLETE"
    with open(artifacts / f"{name}_killed.log", "w") as log:
        proc = subprocess.Popen(_command(name, recipe), cwd=artifacts, env=_env(artifacts), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # verl logs step 2's metrics after its checkpoint: from then on step 3 is under way
            # (no fixed sleep: LoRR's reuse steps take ~1 s, and a sleep of 1 s once let step 3 finish)
            metrics, deadline = run_dir / "metrics.jsonl", time.time() + 600
            while not (marker.exists() and metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
                assert proc.poll() is None, f"{name} ended before its step-2 checkpoint (log {log.name})"
                assert time.time() < deadline, f"{name}: no step-2 checkpoint after 600 s"
                time.sleep(0.02)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2], "not killed during step 3"
    assert not (run_dir / "global_step_4").exists()


def _by_step(path: Path) -> dict[int, dict]:
    """step -> metrics without timings; a step logged twice keeps its last line."""
    return {r["step"]: {k: v for k, v in r["data"].items() if not VARYING.search(k)} for r in read_metrics(path)}


def _differences(a: dict, b: dict) -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if x != y and not (isinstance(x, float) and isinstance(y, float) and x != x and y != y):  # nan == nan
            out.append(f"{key}: {x!r} vs {y!r}")
    return out


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_same_seed_same_run_and_resume_equals_uninterrupted(artifacts, recipe):
    uninterrupted, killed = f"repro_{recipe}_a", f"repro_{recipe}_b"
    run_job(artifacts, *_command(uninterrupted, recipe)[1:])
    _run_killed_during_step_3(artifacts, killed, recipe)
    resumed = run_job(artifacts, *_command(killed, recipe)[1:])
    assert re.search(r"global_step_2", resumed.stdout + resumed.stderr), \
        "the second start did not resume from global_step_2"

    a = _by_step(artifacts / "runs" / uninterrupted / "metrics.jsonl")
    b = _by_step(artifacts / "runs" / killed / "metrics.jsonl")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert len(a[1]) > 60, "non-vacuous: the full metrics are compared"
    for step in (1, 2, 3, 4):
        diff = _differences(a[step], b[step])
        assert not diff, f"{recipe} step {step} ({'same seed' if step <= 2 else 'after resume'}): " + "; ".join(
            diff[:10])
    # the runs did something that could have differed
    assert len({json.dumps(a[s], sort_keys=True) for s in a}) == 4
    if recipe == "grpo_dots_rr":
        assert a[3]["dots/rounds"] == 2 and a[3]["replay/replayed_groups"] > 0
    if recipe == "lorr_dpo":
        assert a[3]["lorr/resets"] >= 1
    if recipe == "reinforce_rej":
        assert all(a[s]["filter/gen_rounds"] >= 1 for s in a)
