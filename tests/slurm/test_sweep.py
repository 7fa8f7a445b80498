"""Sweeps through Hydra's submitit launcher against a real Slurm (``scripts/slurm_local.sh``).

The module starts a single-node Slurm on localhost (slurmctld, slurmd, munged, slurmdbd
with MariaDB so that ``sacct`` works), submits real ``python -m recipe.main -m
hydra/launcher=slurm_cpu`` sweeps of short CPU runs through verl, and stops the cluster
afterwards. Needs root (the script installs Debian's packages when missing): without root,
or when the packages are missing and apt-get is absent or fails, the module is skipped
with the reason (the script's exit status 3). Two runs of ~5 GiB each at the same time;
~3 minutes in all on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "slurm_local.sh"

# a short CPU run: tiny model, 2 prompts x 2 responses of <= 32 tokens, no validation,
# no checkpoints
SHORT_RUN = (
    "trainer.test_freq=-1",
    "trainer.save_freq=-1",
    "data.train_batch_size=2",
    "data.max_response_length=32",
    "actor_rollout_ref.rollout.n=2",
    "actor_rollout_ref.actor.ppo_mini_batch_size=2",
)
# both jobs at once on a 2-CPU node; a hung job is ended by Slurm's time limit
LAUNCHER = ("hydra/launcher=slurm_cpu", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10")


def _script(cmd: str, env: dict, timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(SCRIPT), cmd], env=env, capture_output=True, text=True, timeout=timeout)
    print(proc.stdout, proc.stderr, sep="\n")
    return proc


#: what scripts/slurm_local.sh runs (it installs the Debian packages providing them)
SLURM_BINARIES = ("munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd", "sbatch", "sacct")
#: scripts/slurm_local.sh's exit status for "this machine cannot run a local Slurm"
UNAVAILABLE = 3


def unavailable_reason() -> str | None:
    """Why this machine cannot run the local Slurm (None: it can, possibly after apt-get)."""
    if os.geteuid() != 0:
        return "needs root: scripts/slurm_local.sh installs Debian's slurm/munge/mariadb packages and runs Slurm as root"
    missing = [b for b in SLURM_BINARIES if not shutil.which(b, path="/usr/sbin:/usr/bin:/sbin:/bin")]
    if missing and not shutil.which("apt-get"):
        return f"Slurm is not installed ({', '.join(missing)} missing) and there is no apt-get to install it"
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running Slurm for the module: the environment to submit with (``SLURM_CONF``, ...)."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"local Slurm unavailable: {reason}")
    env = dict(os.environ)
    t = time.monotonic()
    proc = _script("start", env, timeout=900)  # a fresh machine installs the packages first
    if proc.returncode == UNAVAILABLE:
        pytest.skip(f"local Slurm unavailable: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, f"scripts/slurm_local.sh start failed:\n{proc.stdout}\n{proc.stderr}"
    print(f"[slurm test] cluster started in {time.monotonic() - t:.1f} s")
    conf = _script("env", env, timeout=30).stdout.strip().split("=", 1)[1]
    env["SLURM_CONF"] = conf
    yield env
    t = time.monotonic()
    proc = _script("stop", env, timeout=300)
    print(f"[slurm test] cluster stopped in {time.monotonic() - t:.1f} s")
    assert proc.returncode == 0, f"scripts/slurm_local.sh stop failed:\n{proc.stderr}"


def sweep_cmd(*overrides: str) -> list[str]:
    return [sys.executable, "-m", "recipe.main", "-m", *LAUNCHER, *SHORT_RUN, *overrides]


def job_env(slurm_env: dict, artifacts: Path) -> dict:
    return dict(slurm_env, RECIPE_ARTIFACTS=str(artifacts), PYTHONUNBUFFERED="1")


def sacct_states(env: dict, job_id: str) -> dict[str, str]:
    """``{"<array id>_<task>": "COMPLETED", ...}`` for the allocations of ``job_id``."""
    out = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State"], env=env, capture_output=True, text=True,
        check=True,
    ).stdout
    return dict(line.split("|", 1) for line in out.split() if "|" in line)


def final_states(env: dict, job_id: str, n: int, timeout: float = 90) -> dict[str, str]:
    """:func:`sacct_states` once all ``n`` allocations have ended (the launcher returns as soon
    as a job wrote its result; the job's Python and Ray may still be exiting)."""
    end = time.monotonic() + timeout
    while True:
        states = sacct_states(env, job_id)
        if len(states) == n and not set(states.values()) & {"PENDING", "RUNNING", "COMPLETING", "REQUEUED"}:
            return states
        assert time.monotonic() < end, f"Slurm jobs of {job_id} not ended {timeout:.0f} s after the launcher: {states}"
        time.sleep(1)


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def submitit_job_ids(sweep_root: Path) -> list[str]:
    """Slurm job ids of a sweep, from the launcher's ``<sweep dir>/.submitit/<id>`` folders: ``<array
    id>_<task>`` for a sweep of several jobs, a plain job id for one."""
    return sorted(p.name for p in sweep_root.glob("*/.submitit/*") if re.fullmatch(r"\d+_\d+", p.name)
                  or list(p.glob("*_log.out")))


def test_two_job_sweep_runs_both_jobs(slurm, tmp_path):
    artifacts = tmp_path / "artifacts"
    env = job_env(slurm, artifacts)
    t = time.monotonic()
    proc = subprocess.run(
        sweep_cmd("trainer.total_training_steps=2", "data.seed=1,2", "trainer.experiment_name=slurm_seed${data.seed}"),
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=420,
    )
    took = time.monotonic() - t
    (tmp_path / "launcher.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    assert proc.returncode == 0, f"sweep failed (log: {tmp_path / 'launcher.log'}):\n{proc.stderr[-4000:]}"
    print(f"[slurm test] two-job sweep took {took:.1f} s")

    # the launcher submitted one array job of two tasks, and Slurm's accounting saw both finish
    ids = submitit_job_ids(artifacts / "runs" / "multirun")
    assert len(ids) == 2 and len({i.split("_")[0] for i in ids}) == 1, ids
    states = final_states(env, ids[0].split("_")[0], 2)
    assert states == {i: "COMPLETED" for i in ids}, states

    # each job trained in its own run dir and wrote its metrics
    for seed in (1, 2):
        rows = read_metrics(artifacts / "runs" / f"slurm_seed{seed}" / "metrics.jsonl")
        assert [r["step"] for r in rows] == [1, 2]
        assert all(r["data"]["actor/grad_norm"] > 0 for r in rows)
    # Hydra's per-job folders of the sweep: the overrides each job ran with
    overrides = sorted(p.read_text() for p in (artifacts / "runs" / "multirun").glob("*/[01]/.hydra/overrides.yaml"))
    assert len(overrides) == 2 and "data.seed=1" in overrides[0] and "data.seed=2" in overrides[1]


def _job_python(job_id: str) -> int | None:
    """PID of the Python (submitit's ``_submit`` process) of Slurm job (or array job) ``job_id``."""
    keys = (f"SLURM_JOB_ID={job_id}".encode(), f"SLURM_ARRAY_JOB_ID={job_id}".encode())
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
            environ = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in cmd and any(k in environ for k in keys):
            return int(d.name)
    return None


def test_killed_job_fails_the_sweep_instead_of_hanging(slurm, tmp_path):
    """A job killed mid-run (SIGKILL, as the OOM killer does) ends the launcher with an error."""
    artifacts = tmp_path / "artifacts"
    env = job_env(slurm, artifacts)
    log = open(tmp_path / "launcher.log", "w+")
    launcher = subprocess.Popen(
        sweep_cmd("trainer.total_training_steps=1000", "data.seed=3", "trainer.experiment_name=slurm_killed"),
        cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
    )
    try:
        # wait until the job's task function runs (recipe.main printed its run dir)
        deadline = time.monotonic() + 180
        pid = None
        while pid is None:
            assert launcher.poll() is None, f"launcher exited early: {(tmp_path / 'launcher.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the sweep job did not start within 180 s"
            time.sleep(1)
            ids = submitit_job_ids(artifacts / "runs" / "multirun")
            logs = [p for p in (artifacts / "runs" / "multirun").glob("*/.submitit/*/*_0_log.out")]
            if ids and any("[recipe] run dir" in p.read_text() for p in logs):
                job_id = ids[0].split("_")[0]
                pid = _job_python(job_id)
        os.kill(pid, signal.SIGKILL)
        t_kill = time.monotonic()
        try:
            launcher.wait(timeout=180)
        except subprocess.TimeoutExpired:
            pytest.fail("the launcher still waits 180 s after its job was killed")
        took = time.monotonic() - t_kill
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    log.seek(0)
    out = log.read()
    print(f"[slurm test] killed job reported after {took:.1f} s")
    assert launcher.returncode != 0
    assert "UncompletedJobError" in out, out[-3000:]
    assert took < 180
    states = final_states(env, job_id, 1)
    assert list(states.values()) == ["FAILED"], states
