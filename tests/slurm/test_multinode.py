"""A real two-node Slurm: ``hydra/launcher=slurm_multinode`` jobs that span both nodes.

``scripts/slurm_local.sh`` with ``RECIPE_SLURM_NETNS=1`` runs one slurmd in each network
namespace of ``scripts/netns.sh`` (nodes recipe-n1 10.213.0.11 and recipe-n2 10.213.0.12,
own NodeName, spool dir and log; slurmctld, slurmdbd and MariaDB in the root namespace).
Each job is submitted by Hydra's submitit launcher with 2 nodes x 1 task; in it
:func:`recipe.slurm.ray_cluster_for_allocation` starts Ray's head on node 0 and a Ray node
on node 1, and verl trains 2 ranks, one per node. Checked: a sweep job completes on both
nodes; a job requeued after its step-2 checkpoint resumes from it; a job whose second node
is killed mid-run names the lost node in the head's log and is cancelled by its head, so the
launcher reports it failed (94.8 s after the kill, measured).

Skipped where the local Slurm or the namespaces cannot be made (not root, no
CAP_NET_ADMIN, packages missing without apt-get). Its own state dir and ports, so it
never meets tests/test_sweep.py's single-node Slurm. ~3 min per job on 2 cores, too long
for CI: a plain ``./test.sh`` skips the module; it runs when named
(``./test.sh tests/slurm/test_multinode.py``) or with ``RECIPE_MULTINODE=1``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.slurm.test_sweep import (
    SCRIPT,
    UNAVAILABLE,
    final_states,
    read_metrics,
    submitit_job_ids,
    unavailable_reason,
)

ROOT = Path(__file__).resolve().parents[2]
NETNS = ROOT / "scripts" / "netns.sh"
PARITY_REWARD = str(ROOT / "tests" / "e2e" / "parity_reward.py")
NODES = ("recipe-n1", "recipe-n2")
IPS = ("10.213.0.11", "10.213.0.12")
#: both CPUs of each node; no GPUs (the CPU platform's logical GPU is Ray bookkeeping)
LAUNCHER = ("hydra/launcher=slurm_multinode", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=2",
            "hydra.launcher.timeout_min=20", "hydra.launcher.signal_delay_s=30")
RUN = ("trainer.nnodes=2", "trainer.n_gpus_per_node=1", "trainer.test_freq=-1", "trainer.save_freq=2",
       f"reward.custom_reward_function.path={PARITY_REWARD}")
SWEEP_TIMEOUT_S = 900


def _script(cmd: str, env: dict, timeout: int) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(SCRIPT), cmd], env=env, capture_output=True, text=True, timeout=timeout)
    print(proc.stdout, proc.stderr, sep="\n")
    return proc


def _netns_up() -> bool:
    return subprocess.run(["bash", str(NETNS), "status"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def slurm2(request):
    """A running two-node Slurm for the module: the environment to submit with."""
    if os.environ.get("RECIPE_MULTINODE") != "1" and not any("test_multinode" in str(a) for a in request.config.args):
        pytest.skip("two-node Slurm jobs (~20 min on 2 cores): run them with ./test.sh tests/slurm/test_multinode.py "
                    "or RECIPE_MULTINODE=1")
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"local Slurm unavailable: {reason}")
    env = dict(os.environ, RECIPE_SLURM_DIR="/tmp/recipe-slurm-2n", RECIPE_SLURM_PORTS="6827", RECIPE_SLURM_NETNS="1")
    for key in [k for k in env if k.startswith(("SLURM_", "RAY_ADDRESS", "RAY_AUTH"))]:
        env.pop(key)
    had_netns = _netns_up()
    t = time.monotonic()
    proc = _script("start", env, timeout=900)
    if proc.returncode == UNAVAILABLE:
        pytest.skip(f"two-node local Slurm unavailable: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, f"scripts/slurm_local.sh start failed:\n{proc.stdout}\n{proc.stderr}"
    print(f"[slurm 2n] cluster started in {time.monotonic() - t:.1f} s")
    env["SLURM_CONF"] = _script("env", env, timeout=30).stdout.strip().split("=", 1)[1]
    try:
        yield env
    finally:
        proc = _script("stop", env, timeout=300)
        if not had_netns:
            subprocess.run(["bash", str(NETNS), "down"], timeout=120)
        assert proc.returncode == 0, f"scripts/slurm_local.sh stop failed:\n{proc.stderr}"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    """One artifacts dir for the module: data and the tiny model are prepared once."""
    return tmp_path_factory.mktemp("slurm2n_artifacts")


def job_env(env: dict, artifacts: Path, tag: str) -> dict:
    """The jobs' environment: each node's Ray under /tmp/rsl<tag>/n<rank> (the nodes share
    /tmp) on a port of the test's own (a killed job's Ray never meets the next one's)."""
    temp = Path(f"/tmp/rsl{tag}")
    shutil.rmtree(temp, ignore_errors=True)
    return dict(env, RECIPE_ARTIFACTS=str(artifacts), PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0",
                RECIPE_RAY_TEMP_DIR=str(temp), RECIPE_RAY_JOIN_TIMEOUT="240",
                RECIPE_RAY_PORT=str(6500 + ord(tag) - ord("a")))


def sweep_cmd(sweeps: Path, *overrides: str) -> list[str]:
    """The launcher's command; the sweep's folder (and its .submitit logs) under ``sweeps``."""
    return [sys.executable, "-m", "recipe.main", "-m", *LAUNCHER, *RUN, f"hydra.sweep.dir={sweeps / 'sweep'}",
            *overrides]


def task_logs(sweep_root: Path) -> dict[int, str]:
    """``{task rank: its submitit log (stdout and stderr)}`` of the sweep's one job."""
    out = {}
    for rank in (0, 1):
        out[rank] = "".join(p.read_text(errors="replace")
                            for p in sorted(sweep_root.glob(f"*/.submitit/*/*_{rank}_log.*")))
    return out


def sacct_job(env: dict, job_id: str) -> dict[str, str]:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State,NNodes,NodeList"],
                         env=env, capture_output=True, text=True, check=True).stdout
    job, state, nnodes, nodelist = out.strip().splitlines()[-1].split("|")
    return {"state": state, "nnodes": nnodes, "nodelist": nodelist}


def wait_for(what: str, cond, launcher: subprocess.Popen, log: Path, timeout: float = SWEEP_TIMEOUT_S) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert launcher.poll() is None, f"launcher exited before {what}: {log.read_text()[-3000:]}"
        assert time.monotonic() < end, f"{what}: not within {timeout:.0f} s"
        time.sleep(1)


def metrics_steps(path: Path) -> list[int]:
    return [r["step"] for r in read_metrics(path)] if path.exists() else []


def check_both_nodes(logs: dict[int, str]) -> None:
    assert re.search(rf"Ray cluster at {IPS[0]}:\d+: 2/2 nodes alive \({IPS[0]}, {IPS[1]}\)", logs[0]), logs[0][-3000:]
    assert re.search(rf"\[recipe\] Ray worker node of the cluster at {IPS[0]}:\d+: done", logs[1]), logs[1][-3000:]


def test_sweep_job_spans_both_nodes_and_completes(slurm2, artifacts, tmp_path):
    env = job_env(slurm2, artifacts, "a")
    t = time.monotonic()
    sweep_root = tmp_path / "multirun"
    proc = subprocess.run(sweep_cmd(sweep_root, "trainer.total_training_steps=2", "seed=1",
                                    "trainer.experiment_name=slurm2n_seed1"),
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S)
    took = time.monotonic() - t
    (tmp_path / "launcher.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    logs = task_logs(sweep_root)
    assert proc.returncode == 0, f"sweep failed:\n{proc.stderr[-3000:]}\n--- task 0 ---\n{logs[0][-3000:]}"
    print(f"[slurm 2n] two-node sweep job took {took:.1f} s")
    ids = submitit_job_ids(sweep_root)
    assert len(ids) == 1, ids
    job_id = ids[0].split("_")[0]
    final_states(env, job_id, 1)
    assert sacct_job(env, job_id) == {"state": "COMPLETED", "nnodes": "2", "nodelist": "recipe-n[1-2]"}
    check_both_nodes(logs)
    rows = read_metrics(artifacts / "runs" / "slurm2n_seed1" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        m = r["data"]
        assert m["global_seqlen/mean"] * 2 == pytest.approx(m["perf/total_num_tokens"])  # 2 ranks
        assert m["actor/grad_norm"] > 0
    assert (artifacts / "runs" / "slurm2n_seed1" / "global_step_2" / "COMPLETE").exists()


def _kill_node(ns: str) -> list[int]:
    """SIGKILL everything in namespace ``ns`` (its slurmd, the job's tasks, its Ray): the node dies."""
    pids = [int(p) for p in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def test_job_whose_second_node_dies_is_reported_failed(slurm2, artifacts, tmp_path):
    env = job_env(slurm2, artifacts, "b")
    log = tmp_path / "launcher.log"
    sweep_root = tmp_path / "multirun"
    launcher = subprocess.Popen(sweep_cmd(sweep_root, "trainer.total_training_steps=1000", "seed=2",
                                          "trainer.experiment_name=slurm2n_killed"),
                                cwd=tmp_path, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    metrics = artifacts / "runs" / "slurm2n_killed" / "metrics.jsonl"
    job_id = None
    try:
        wait_for("step 1 of the two-node job", lambda: 1 in metrics_steps(metrics), launcher, log)
        job_id = submitit_job_ids(sweep_root)[0].split("_")[0]
        assert _kill_node(NODES[1])
        t_kill = time.monotonic()
        try:
            launcher.wait(timeout=300)
        except subprocess.TimeoutExpired:
            pytest.fail("the launcher still waits 300 s after the job's second node died")
        took = time.monotonic() - t_kill
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        if job_id:
            state = sacct_job(slurm2, job_id)["state"]  # before the cancel below
            subprocess.run(["scancel", job_id], env=slurm2)  # Slurm may requeue a job after NODE_FAIL
        # the node comes back (ReturnToService=2) for the next tests
        assert _script("start", slurm2, timeout=300).returncode == 0
    out = log.read_text()
    print(f"[slurm 2n] launcher reported the failed job {took:.1f} s after node 2 died")
    assert launcher.returncode != 0
    assert "FailedJobError" in out or "UncompletedJobError" in out, out[-3000:]
    logs = task_logs(sweep_root)
    assert f"Ray node(s) lost during the run: {IPS[1]} ({NODES[1]})" in logs[0], logs[0][-3000:]
    print(f"[slurm 2n] Slurm's state of the job when the launcher returned: {state}")


def test_requeued_job_resumes_from_its_checkpoint(slurm2, artifacts, tmp_path):
    env = job_env(slurm2, artifacts, "c")
    log = tmp_path / "launcher.log"
    name = "slurm2n_requeue"
    sweep_root = tmp_path / "multirun"
    launcher = subprocess.Popen(sweep_cmd(sweep_root, "trainer.total_training_steps=4", "seed=3",
                                          f"trainer.experiment_name={name}"),
                                cwd=tmp_path, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    run_dir = artifacts / "runs" / name
    try:
        wait_for("the step-2 checkpoint", lambda: (run_dir / "global_step_2" / "COMPLETE").exists(), launcher, log)
        job_id = submitit_job_ids(sweep_root)[0].split("_")[0]
        subprocess.run(["scontrol", "requeue", job_id], env=slurm2, check=True)
        t = time.monotonic()
        launcher.wait(timeout=SWEEP_TIMEOUT_S)
        took = time.monotonic() - t
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    out = log.read_text()
    logs = task_logs(sweep_root)
    print(f"[slurm 2n] requeued job finished {took:.1f} s after the requeue")
    assert launcher.returncode == 0, f"{out[-3000:]}\n--- task 0 ---\n{logs[0][-3000:]}"
    assert sacct_job(slurm2, job_id)["state"] == "COMPLETED"
    # the second run of the job (same job id, same run dir) resumed from global_step_2
    assert re.search(r"Resuming from \S*/global_step_2\b", logs[0]), logs[0][-3000:]
    assert logs[0].count("2/2 nodes alive") == 2  # the Ray cluster was made twice
    steps = metrics_steps(run_dir / "metrics.jsonl")
    assert steps[:2] == [1, 2] and steps[-1] == 4 and set(steps) == {1, 2, 3, 4}, steps
