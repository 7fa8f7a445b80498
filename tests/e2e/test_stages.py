"""A stage added from outside the package: its own start-up check runs before Ray. (That it
runs through verl's trainer, checkpoints and resumes is checked on the main job's runs,
tests/e2e/test_main_job.py, to keep CI short.)"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.e2e.test_main_job import ROOT

#: The toy stage's folder: on PYTHONPATH as a user's own module (verl installs a package
#: named `tests` into site-packages, so `tests.e2e...` is not importable in Ray workers).
PLUGINS = Path(__file__).with_name("plugins")


@pytest.fixture(autouse=True)
def plugin_path(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")])))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return tmp_path_factory.mktemp("artifacts_stages")


TOY = ("stages.extra=[recipe_toy_stage]", "+toy_metric.enable=true", "+toy_metric.constant=2.5")


def test_toy_stage_check_runs_before_ray(artifacts):
    """An enabled stage's own start-up check fails the run with exit status 2, before Ray."""
    proc = subprocess.run([str(ROOT / "run.sh"), *TOY, "actor_rollout_ref.rollout.n=1", "algorithm.adv_estimator=reinforce"],
                          cwd=artifacts, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "RECIPE_ARTIFACTS": str(artifacts)})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "toy_metric needs actor_rollout_ref.rollout.n >= 2" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
