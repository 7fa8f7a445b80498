"""verl's trainer on a real two-node Ray cluster: one rank per node, gloo across the veth.

Each job runs ``python -m recipe.main`` once per node, as ``hydra/launcher=slurm_multinode``
does (one task per node): node rank 0 in namespace recipe-n1, node rank 1 in recipe-n2,
each with the ``SLURM_*`` variables of its task, so that
:func:`recipe.slurm.ray_cluster_for_allocation` does what it does in a Slurm job: rank 0
writes the job's Ray auth token, runs ``ray start --head`` on 10.213.0.11, waits for the
other node and trains against it (``trainer.nnodes=2 trainer.n_gpus_per_node=1``); rank 1
runs ``ray start --address=10.213.0.11:<port>`` on 10.213.0.12 and serves until the head is
done. Each node's Ray has its own temp dir (``RECIPE_RAY_TEMP_DIR``), so worker logs land on
the node that ran the worker. (tests/slurm/test_multinode.py runs the same through a real
two-node Slurm.)

About 2.5 min per job on 2 cores; a test is two or three jobs.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
NETNS = ROOT / "scripts" / "netns.sh"
PARITY_REWARD = str(ROOT / "tests" / "e2e" / "parity_reward.py")
HEAD_IP, WORKER_IP = "10.213.0.11", "10.213.0.12"
#: a two-node run, 2 prompts per rank: 2 steps with a checkpoint at step 2, no validation
TWO_NODES = ("trainer.nnodes=2", "trainer.n_gpus_per_node=1", "trainer.save_freq=2", "trainer.test_freq=-1",
             f"reward.custom_reward_function.path={PARITY_REWARD}")
JOB_TIMEOUT_S = 900


@dataclass
class NodeProc:
    proc: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Job:
    job_id: int
    port: int
    head: NodeProc
    worker: NodeProc
    temp_dir: Path
    token_dir: Path

    def wait(self, timeout: float = JOB_TIMEOUT_S) -> tuple[int, int]:
        end = time.monotonic() + timeout
        try:
            for node in (self.head, self.worker):
                node.proc.wait(timeout=max(1.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"job {self.job_id} still running after {timeout:.0f} s (logs: {self.head.log}, {self.worker.log})")
        return self.head.proc.returncode, self.worker.proc.returncode

    def kill(self) -> None:
        for node in (self.head, self.worker):
            if node.proc.poll() is None:
                os.killpg(node.proc.pid, signal.SIGKILL)
                node.proc.wait()

    def node_logs(self, rank: int) -> str:
        """Every Ray worker log of node ``rank`` (its own temp dir)."""
        return "".join(p.read_text(errors="replace") for p in sorted(self.temp_dir.glob(f"n{rank}/session_*/logs/worker-*")))


_JOBS = iter(range(9101, 9200))


def start_job(artifacts: Path, logs: Path, *overrides: str) -> Job:
    """Start one two-node job (both tasks); returns without waiting."""
    job_id = next(_JOBS)
    port = 6400 + job_id % 100  # a port per job: a late node never meets the next job's head
    temp_dir = Path(f"/tmp/rmn{job_id}")  # short: Ray's Unix socket paths live under it
    shutil.rmtree(temp_dir, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "SLURM_"))}
    env.update(
        SLURM_JOB_ID=str(job_id), SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="2", SLURM_LOCALID="0",
        SLURM_JOB_NODELIST="recipe-n[1-2]", RECIPE_RAY_PORT=str(port), RECIPE_RAY_TEMP_DIR=str(temp_dir),
        RECIPE_RAY_TOKEN_DIR=str(logs), RECIPE_RAY_JOIN_TIMEOUT="240", RECIPE_ARTIFACTS=str(artifacts),
        PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0",
    )
    procs = []
    for rank in (1, 0):  # the worker first: it waits for the head's port
        log = logs / f"job{job_id}_node{rank}.log"
        cmd = ["bash", str(NETNS), "exec", str(rank + 1), sys.executable, "-m", "recipe.main", *TWO_NODES, *overrides]
        procs.append(NodeProc(subprocess.Popen(cmd, cwd=artifacts, env=dict(env, SLURM_NODEID=str(rank)),
                                               stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                               start_new_session=True), log))
    worker, head = procs
    return Job(job_id, port, head, worker, temp_dir, logs)


def run_job(artifacts: Path, logs: Path, *overrides: str) -> Job:
    """A two-node job to its end; both tasks must exit 0."""
    t = time.monotonic()
    job = start_job(artifacts, logs, *overrides)
    rc = job.wait()
    print(f"[multinode] job {job.job_id} ({' '.join(overrides)}): {time.monotonic() - t:.0f} s, exit {rc}")
    assert rc == (0, 0), (f"job {job.job_id} exited {rc}:\n--- head ---\n{job.head.text()[-4000:]}"
                          f"\n--- worker ---\n{job.worker.text()[-3000:]}")
    return job


def read_metrics(path: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["step"]: r["data"] for r in rows}


def check_two_node_job(job: Job) -> None:
    """Both nodes joined one cluster, the worker node served it and left when the head was done,
    and each rank's FSDP worker ran on its own node."""
    head, worker = job.head.text(), job.worker.text()
    address = f"{HEAD_IP}:{job.port}"
    # ray.nodes() on the head: both nodes alive before training
    assert f"Ray cluster at {address}: 2/2 nodes alive ({HEAD_IP}, {WORKER_IP})" in head, head[-3000:]
    assert f"[recipe] joining the Ray cluster at {address}" in head
    assert f"[recipe] Ray worker node of the cluster at {address}: done" in worker, worker[-3000:]
    # verl's FSDP worker of rank r ran on node r (its log is in that node's Ray temp dir)
    n0, n1 = job.node_logs(0), job.node_logs(1)
    assert "[Rank 0] Saved model" in n0 and "[Rank 0] Saved model" not in n1
    assert "[Rank 1] Saved model" in n1 and "[Rank 1] Saved model" not in n0
    # the token file is removed with the cluster; no stray record of the stopped cluster
    assert not list(job.token_dir.glob(f"recipe_ray_token_{job.job_id}_*"))
    assert not (job.temp_dir / "n0" / "ray_current_cluster").exists()


def check_split_over_two_ranks(m: dict) -> None:
    """verl balances a step's tokens over the data-parallel ranks: global_seqlen/* are per-rank
    token counts, and with two ranks their mean is half of the step's tokens."""
    assert m["global_seqlen/mean"] * 2 == pytest.approx(m["perf/total_num_tokens"])
    assert m["global_seqlen/min"] <= m["global_seqlen/mean"] <= m["global_seqlen/max"]
    assert m["global_seqlen/min"] > 0


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    """One artifacts dir for the module: data and the tiny model are prepared once."""
    return tmp_path_factory.mktemp("multinode_artifacts")


@pytest.fixture
def logs(tmp_path) -> Path:
    return tmp_path


def test_grpo_on_two_nodes_trains_checkpoints_and_resumes(two_nodes, artifacts, logs):
    name = "mn_grpo"
    common = ("recipe=grpo", f"trainer.experiment_name={name}")
    job = run_job(artifacts, logs, "trainer.total_training_steps=2", *common)
    check_two_node_job(job)
    run_dir = artifacts / "runs" / name
    steps = read_metrics(run_dir / "metrics.jsonl")
    assert sorted(steps) == [1, 2]
    for m in steps.values():
        check_split_over_two_ranks(m)
        assert math.isfinite(m["actor/pg_loss"]) and m["actor/grad_norm"] > 0
        # the hf rollout got the weights synced across the nodes: its log-probs match the actor's
        assert m["training/rollout_probs_diff_max"] < 1e-3
    ckpt = run_dir / "global_step_2"
    assert (ckpt / "COMPLETE").exists()
    assert sorted(p.name for p in (ckpt / "actor").glob("model_world_size_2_rank_*.pt")) == [
        "model_world_size_2_rank_0.pt", "model_world_size_2_rank_1.pt"]

    # a new job (a requeue) resumes from global_step_2 and trains step 3 only
    job = run_job(artifacts, logs, "trainer.total_training_steps=3", *common)
    check_two_node_job(job)
    assert re.search(r"Resuming from \S*/global_step_2\b", job.head.text()), job.head.text()[-3000:]
    assert re.findall(r"step (\d+)/3 \|", job.head.text()) == ["3"]
    steps = read_metrics(run_dir / "metrics.jsonl")
    assert sorted(steps) == [1, 2, 3]
    check_split_over_two_ranks(steps[3])
    assert steps[3]["actor/grad_norm"] > 0


def test_lorr_dpo_on_two_nodes_resets_and_resumes(two_nodes, artifacts, logs):
    """LoRR with its two ranks on two nodes: one iteration per step (L = 2 epochs), the
    reference synced at each iteration's start, a reset after each iteration, theta_0 kept
    as one shard per rank (one per node), reuse of iteration 1's pairs after the reset
    (rollout_ratio 0), and a resume that restores counters, pairs and theta_0."""
    from safetensors.torch import load_file

    name = "mn_lorr"
    common = ("recipe=lorr_dpo", "lorr.replays=2", "lorr.reset.every=1", "lorr.reuse.rollout_ratio=0.0",
              f"trainer.experiment_name={name}")
    job = run_job(artifacts, logs, "trainer.total_training_steps=2", *common)
    check_two_node_job(job)
    head = job.head.text()
    snap = re.search(r"LoRR theta_0: (\d+) tensors .*fingerprint ([0-9a-f]+)\)", head)
    assert snap and int(snap.group(1)) == 2, head[-3000:]  # the tiny model's two mlp.down_proj.weight
    run_dir = artifacts / "runs" / name
    steps = read_metrics(run_dir / "metrics.jsonl")
    s1, s2 = steps[1], steps[2]
    # iteration 1: fresh rollouts, reference synced, 2 epochs, then the reset
    assert (s1["lorr/iteration"], s1["lorr/epoch"], s1["lorr/resets"], s1["lorr/reused_initial"]) == (1, 2, 1, 0)
    assert s1["dpo/reference_refreshed"] == 1 and s1["dpo/fresh_rollouts"] == 4 * 4
    assert s1["lorr/reset_delta_norm"] > 0 and s1["actor/grad_norm"] > 0
    assert abs(s1["dpo/reward_margin_last_pass"]) > 0  # epoch 2 sees a policy moved away from the reference
    # iteration 2: iteration 1's pairs again, no rollouts, reference synced again, reset again
    assert (s2["lorr/iteration"], s2["lorr/resets"], s2["lorr/reused_initial"]) == (2, 2, 1)
    assert s2["dpo/fresh_rollouts"] == 0 and s2["dpo/iteration_pairs"] == s1["dpo/iteration_pairs"]
    assert s2["dpo/reference_refreshes"] == 2 and s2["lorr/reset_delta_norm"] > 0
    # theta_0: rank 0's shard written on node 0, rank 1's on node 1; together the initial tensors
    shards = [torch.load(run_dir / "global_step_2" / f"lorr_theta0_rank{r}.pt", weights_only=True) for r in (0, 1)]
    models = list((artifacts / "models").glob("*/model.safetensors"))
    assert len(models) == 1, models
    initial = load_file(models[0])
    assert sorted(shards[0]) == sorted(shards[1]) == sorted(n for n in initial if "down_proj" in n)
    for n in shards[0]:
        assert all(s[n].shape[0] < initial[n].shape[0] for s in shards), n
        assert torch.equal(torch.cat([s[n] for s in shards]), initial[n].to(shards[0][n].dtype)), n

    job = run_job(artifacts, logs, "trainer.total_training_steps=3", *common)
    check_two_node_job(job)
    restored = re.search(r"restored preference state: (\d+) replay passes, (\d+) resets, initial pairs (\w+), "
                         r"theta_0 fingerprint ([0-9a-f]+)", job.head.text())
    assert restored, job.head.text()[-3000:]
    assert restored.groups() == (str(int(s2["lorr/replay_index"])), "2", "kept", snap.group(2))
    s3 = read_metrics(run_dir / "metrics.jsonl")[3]
    assert (s3["lorr/iteration"], s3["lorr/resets"], s3["lorr/reused_initial"]) == (3, 3, 1)
    assert s3["dpo/iteration_pairs"] == s1["dpo/iteration_pairs"] and s3["dpo/reference_refreshes"] == 3
    assert math.isfinite(s3["dpo/loss"]) and s3["actor/grad_norm"] > 0


def _raylet_pid(temp_dir: Path) -> int:
    """PID of the raylet whose session lives under ``temp_dir`` (one node's Ray)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd and cmd[0].endswith(b"/raylet") and any(str(temp_dir).encode() in a for a in cmd):
            return int(d.name)
    raise AssertionError(f"no raylet running under {temp_dir}")


#: how long a run may take to fail after its worker node's raylet was killed
FAIL_WITHIN_S = 240


def test_killed_worker_raylet_fails_the_run_naming_the_node_then_a_restart_resumes(two_nodes, artifacts, logs):
    name = "mn_fault"
    common = ("recipe=grpo", f"trainer.experiment_name={name}")
    run_dir = artifacts / "runs" / name
    job = start_job(artifacts, logs, "trainer.total_training_steps=6", *common)
    try:
        # kill once step 2 is logged and its checkpoint published: during step 3
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not ((run_dir / "global_step_2" / "COMPLETE").exists() and (run_dir / "metrics.jsonl").exists()
                   and 2 in read_metrics(run_dir / "metrics.jsonl")):
            assert job.head.proc.poll() is None, job.head.text()[-3000:]
            assert time.monotonic() < deadline, "step 2 not reached"
            time.sleep(0.5)
        os.kill(_raylet_pid(job.temp_dir / "n1"), signal.SIGKILL)
        t_kill = time.monotonic()
        try:
            job.head.proc.wait(timeout=FAIL_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the run still runs {FAIL_WITHIN_S} s after its worker node's raylet was killed "
                        f"(log: {job.head.log})")
        took = time.monotonic() - t_kill
        job.worker.proc.wait(timeout=120)
    finally:
        job.kill()
    head = job.head.text()
    print(f"[multinode] run failed {took:.1f} s after the raylet was killed")
    assert job.head.proc.returncode != 0 and job.worker.proc.returncode != 0
    assert f"[recipe] error: Ray node(s) lost during the run: {WORKER_IP} (recipe-n2)" in head, head[-4000:]
    assert max(read_metrics(run_dir / "metrics.jsonl")) < 6

    # a restart (the requeued job) resumes from the last published checkpoint
    last = int((run_dir / "latest_checkpointed_iteration.txt").read_text())
    assert last >= 2
    job = run_job(artifacts, logs, f"trainer.total_training_steps={last + 1}", *common)
    check_two_node_job(job)
    assert re.search(rf"Resuming from \S*/global_step_{last}\b", job.head.text()), job.head.text()[-3000:]
    steps = read_metrics(run_dir / "metrics.jsonl")
    assert last + 1 in steps and steps[last + 1]["actor/grad_norm"] > 0
