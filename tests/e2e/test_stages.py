"""A stage added from outside the package runs through verl's trainer on CPU, and its state
is saved and restored with verl's checkpoints: no edit to the trainer or the entry point."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from tests.e2e.test_main_job import ROOT, run_parity_steps

#: The toy stage's folder: on PYTHONPATH as a user's own module (verl installs a package
#: named `tests` into site-packages, so `tests.e2e...` is not importable in Ray workers).
PLUGINS = Path(__file__).with_name("plugins")


@pytest.fixture(autouse=True)
def plugin_path(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")])))

BATCH, N = 4, 4  # data.train_batch_size and rollout.n of conf/device/cpu.yaml


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return tmp_path_factory.mktemp("artifacts_stages")


TOY = ("stages.extra=[recipe_toy_stage]", "+toy_metric.enable=true", "+toy_metric.constant=2.5")


def test_toy_stage_runs_and_resumes(artifacts):
    _, steps = run_parity_steps(artifacts, "e2e_toy", 2, *TOY)
    for step in (1, 2):
        m = steps[step]
        assert m["toy/step"] == step
        assert m["toy/sampled_rows"] == BATCH * N
        assert m["toy/old_log_prob_calls"] == step
        assert m["toy/constant"] == 2.5
        assert 0.0 <= m["reward/acc"] <= 1.0  # the built-in stages still run beside it
    state = torch.load(artifacts / "runs" / "e2e_toy" / "global_step_2" / "recipe_state.pt", weights_only=False)
    assert state["stages"]["toy_metric"] == {"old_log_prob_calls": 2}
    # resume: the counter continues from the checkpoint
    _, steps = run_parity_steps(artifacts, "e2e_toy", 3, *TOY)
    assert steps[3]["toy/old_log_prob_calls"] == 3


def test_toy_stage_check_runs_before_ray(artifacts):
    """An enabled stage's own start-up check fails the run with exit status 2, before Ray."""
    proc = subprocess.run([str(ROOT / "run.sh"), *TOY, "actor_rollout_ref.rollout.n=1", "algorithm.adv_estimator=reinforce"],
                          cwd=artifacts, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RECIPE_ARTIFACTS": str(artifacts)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "toy_metric needs actor_rollout_ref.rollout.n >= 2" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
