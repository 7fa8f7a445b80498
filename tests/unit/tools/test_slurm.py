"""recipe.slurm's pure helpers and the Slurm launcher presets (conf/hydra/launcher/), without Slurm.

The real cluster is exercised by tests/slurm; here: sweep job names, the allocation read
from SLURM_* variables, the Ray head/worker commands, what ray_cluster_for_allocation
decides (with the ``ray`` processes replaced by a recorder), and the sbatch script each
preset produces through Hydra and submitit.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import tempfile
from pathlib import Path

import hydra
import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from recipe import slurm
from recipe.slurm import (
    SlurmAllocation,
    SlurmConfigError,
    allocation_from_env,
    check_allocation,
    expand_nodelist,
    head_address,
    node_resources,
    ray_cluster_for_allocation,
    ray_head_command,
    ray_port,
    ray_worker_command,
    sweep_experiment_name,
)

REPO_ROOT = Path(__file__).resolve().parents[3]
CONF_DIR = REPO_ROOT / "conf"
LAUNCHERS = ["slurm_cpu", "slurm_gpu", "slurm_multinode"]


@pytest.fixture(scope="module")
def compose():
    with hydra.initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        yield lambda *o: hydra.compose("config", overrides=list(o), return_hydra_config=True)
    HydraConfig.instance().cfg = None


def _trainer_cfg(device="cpu", nnodes=1, n_gpus=1, num_cpus=8, num_gpus=1):
    return OmegaConf.create({
        "trainer": {"device": device, "nnodes": nnodes, "n_gpus_per_node": n_gpus, "experiment_name": "x"},
        "ray_kwargs": {"ray_init": {"num_cpus": num_cpus, "num_gpus": num_gpus}},
    })


# --------------------------------------------------------------------------------------
# sweep job names
# --------------------------------------------------------------------------------------
def test_sweep_experiment_name():
    ov = ["trainer.total_training_steps=2", "data.seed=1"]
    # a single run keeps its name (./run.sh resumes the same experiment)
    assert sweep_experiment_name("grpo_gsm8k_tiny", ov, multirun=False) == "grpo_gsm8k_tiny"
    # a sweep job: Hydra's override_dirname (sorted, comma-joined) appended
    assert (sweep_experiment_name("grpo_gsm8k_tiny", ov, multirun=True)
            == "grpo_gsm8k_tiny_data.seed=1,trainer.total_training_steps=2")
    assert sweep_experiment_name("n", [], multirun=True) == "n"
    # the sweep names its jobs itself
    assert sweep_experiment_name("run_a", ["trainer.experiment_name=run_a", "data.seed=1"], True) == "run_a"
    assert sweep_experiment_name("run_a", ["++trainer.experiment_name=run_a", "data.seed=1"], True) == "run_a"
    # one path component
    assert sweep_experiment_name("n", ["+experiment=minimalist/grpo_x"], True) == "n_+experiment=minimalist-grpo_x"


def test_sweep_experiment_name_long_overrides_are_cut_and_hashed():
    ov_a = [f"k{i}=" + "v" * 20 for i in range(8)]
    ov_b = ov_a[:-1] + ["k7=" + "v" * 19 + "w"]
    a, b = sweep_experiment_name("n", ov_a, True), sweep_experiment_name("n", ov_b, True)
    full_a = ",".join(sorted(ov_a))
    assert len(full_a) == 8 * 23 + 7 == 191
    assert a == "n_" + full_a[:109] + "-" + hashlib.sha1(full_a.encode()).hexdigest()[:10]
    assert len(a) == 2 + 120
    assert a != b and a[:111] == b[:111]


def test_apply_sweep_experiment_name_moves_run_dir_and_metrics(compose):
    cfg = compose("data.seed=1")
    with open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
    HydraConfig.instance().set_config(cfg)
    try:
        assert slurm.apply_sweep_experiment_name(cfg) == "grpo_gsm8k_tiny_data.seed=1"
        assert cfg.trainer.default_local_dir.endswith("runs/grpo_gsm8k_tiny_data.seed=1")
        assert cfg.metrics_file.endswith("runs/grpo_gsm8k_tiny_data.seed=1/metrics.jsonl")
        # applying it twice (a requeued job) gives the same name
        cfg2 = compose("data.seed=1")
        with open_dict(cfg2):
            cfg2.hydra.mode = "MULTIRUN"
        assert slurm.apply_sweep_experiment_name(cfg2) == "grpo_gsm8k_tiny_data.seed=1"
        # a single run is left alone
        cfg3 = compose("data.seed=1")
        HydraConfig.instance().set_config(cfg3)
        assert slurm.apply_sweep_experiment_name(cfg3) == "grpo_gsm8k_tiny"
    finally:
        HydraConfig.instance().cfg = None


# --------------------------------------------------------------------------------------
# the allocation
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("nodelist, hosts", [
    ("node1", ["node1"]),
    ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
    ("a[9-11]", ["a9", "a10", "a11"]),
    ("a[08-10]", ["a08", "a09", "a10"]),
    ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
    ("x-[3]-y,z[1,2]", ["x-3-y", "z1", "z2"]),
])
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad, msg", [("a[1-2", "unbalanced '['"), ("a]1", "unbalanced ']'"),
                                      ("a[3-1]", "empty range '3-1'"), ("a[x]", "bad range 'x'")])
def test_expand_nodelist_errors_name_the_list(bad, msg):
    with pytest.raises(SlurmConfigError, match=re.escape(f"SLURM_JOB_NODELIST='{bad}': {msg}")):
        expand_nodelist(bad)


ENV2 = {"SLURM_JOB_ID": "42", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1", "SLURM_LOCALID": "0",
        "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_CPUS_ON_NODE": "64"}


def test_allocation_from_env():
    assert allocation_from_env({}) is None
    assert allocation_from_env(ENV2) == SlurmAllocation(
        job_id="42", num_nodes=2, num_tasks=2, node_rank=1, local_rank=0, hostnames=("gpu07", "gpu08"),
        cpus_on_node=64)
    assert not allocation_from_env(ENV2).is_head
    # older variable names; a single-node batch step without srun
    alloc = allocation_from_env({"SLURM_JOBID": "7", "SLURM_NNODES": "1", "SLURM_NODELIST": "n1"})
    assert (alloc.job_id, alloc.num_nodes, alloc.node_rank, alloc.num_tasks, alloc.hostnames) == ("7", 1, 0, 1, ("n1",))
    assert alloc.is_head and alloc.cpus_on_node is None


@pytest.mark.parametrize("change, msg", [
    ({"SLURM_NODEID": "2"}, "SLURM_NODEID=2 is outside 0..SLURM_JOB_NUM_NODES-1=1"),
    ({"SLURM_JOB_NODELIST": "gpu07"}, "names 1 hosts but SLURM_JOB_NUM_NODES=2"),
    ({"SLURM_JOB_NODELIST": ""}, "SLURM_JOB_NUM_NODES=2 but SLURM_JOB_NODELIST is unset"),
    ({"SLURM_JOB_NUM_NODES": "two"}, "SLURM_JOB_NUM_NODES='two' is not an integer"),
])
def test_allocation_from_env_errors(change, msg):
    with pytest.raises(SlurmConfigError, match=msg):
        allocation_from_env({**ENV2, **change})


def test_check_allocation():
    alloc = allocation_from_env(ENV2)
    check_allocation(_trainer_cfg(nnodes=2), alloc)
    with pytest.raises(SlurmConfigError, match=r"trainer.nnodes=1 but .* 2 node\(s\) \(hydra.launcher.nodes\): set trainer.nnodes=2"):
        check_allocation(_trainer_cfg(nnodes=1), alloc)
    with pytest.raises(SlurmConfigError, match="SLURM_NTASKS=4 on 2 node.*hydra.launcher.tasks_per_node=1"):
        check_allocation(_trainer_cfg(nnodes=2), allocation_from_env({**ENV2, "SLURM_NTASKS": "4"}))


# --------------------------------------------------------------------------------------
# Ray commands
# --------------------------------------------------------------------------------------
def test_ray_commands():
    assert ray_port({}) == 6379 and ray_port({"RECIPE_RAY_PORT": "7000"}) == 7000
    addr = head_address("10.0.0.7", 6379)
    assert addr == "10.0.0.7:6379"
    with pytest.raises(SlurmConfigError, match="head's IP address is empty"):
        head_address("", 6379)
    assert ray_head_command("ray", "10.0.0.7", 6379, 64, None) == [
        "ray", "start", "--head", "--node-ip-address=10.0.0.7", "--port=6379", "--num-cpus=64", "--block",
        "--disable-usage-stats"]
    assert ray_worker_command("ray", addr, "10.0.0.8", 8, 1) == [
        "ray", "start", "--address=10.0.0.7:6379", "--node-ip-address=10.0.0.8", "--num-cpus=8", "--num-gpus=1",
        "--block", "--disable-usage-stats"]


def test_ray_token_path_is_shared_and_per_run(tmp_path):
    home = Path("/home/u")
    assert slurm.ray_token_path({}, "42", home) == home / ".ray" / "recipe_ray_token_42_0"
    # a requeued job (Slurm counts restarts) never reads its previous run's token
    assert slurm.ray_token_path({"SLURM_RESTART_COUNT": "2"}, "42", home) == home / ".ray" / "recipe_ray_token_42_2"
    # inside a submitit job: the sweep's .submitit folder, without its %j part
    env = {"SUBMITIT_FOLDER": "/runs/multirun/t/.submitit/%j"}
    assert slurm.ray_token_path(env, "42", home) == Path("/runs/multirun/t/.submitit/recipe_ray_token_42_0")
    env["RECIPE_RAY_TOKEN_DIR"] = "/shared/tok"
    assert slurm.ray_token_path(env, "42", home) == Path("/shared/tok/recipe_ray_token_42_0")
    assert slurm.ray_auth_env("abc") == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "abc"}

    path = tmp_path / "d" / "recipe_ray_token_42_0"
    token = slurm._write_token(path)
    assert len(token) == 64 and int(token, 16) >= 0
    assert path.stat().st_mode & 0o777 == 0o600
    assert slurm._read_token(path, timeout_s=1) == token
    with pytest.raises(RuntimeError, match="did not write its auth token to .*RECIPE_RAY_TOKEN_DIR"):
        slurm._read_token(tmp_path / "missing", timeout_s=0)


def test_forget_ray_address_removes_only_a_dead_record_of_our_port(tmp_path):
    import socket

    with socket.socket() as srv:  # a port that is listening, then one that is not
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        f = tmp_path / "ray_current_cluster"
        f.write_text(f"127.0.0.1:{port}")
        slurm._forget_ray_address(port, str(tmp_path))
        assert f.exists()  # that cluster still runs
    slurm._forget_ray_address(port + 1, str(tmp_path))
    assert f.exists()  # another cluster's record
    slurm._forget_ray_address(port, str(tmp_path))
    assert not f.exists()
    slurm._forget_ray_address(port, str(tmp_path))  # no file: nothing to do


def test_node_resources():
    alloc = allocation_from_env(ENV2)
    # CPU platform: the configured logical CPUs and one logical GPU per trainer.n_gpus_per_node
    assert node_resources(_trainer_cfg(nnodes=2, n_gpus=1, num_cpus=8), alloc) == (8, 1)
    # GPUs: the allocation's CPUs, Ray counts the visible GPUs
    assert node_resources(_trainer_cfg("cuda", 2, 8, num_cpus=None, num_gpus=None), alloc) == (64, None)


# --------------------------------------------------------------------------------------
# ray_cluster_for_allocation
# --------------------------------------------------------------------------------------
class Recorder:
    """Stands in for the ``ray`` processes: records every start, wait and stop."""

    def __init__(self, monkeypatch):
        self.calls: list = []
        monkeypatch.setattr(slurm, "_start_ray_node", lambda cmd: self.calls.append(("start", cmd)) or "proc")
        monkeypatch.setattr(slurm, "_stop_ray_node", lambda proc: self.calls.append(("stop", proc)))
        monkeypatch.setattr(slurm, "_wait_for_head", lambda proc, ip, port, t: self.calls.append(("head up", ip, port)))
        monkeypatch.setattr(slurm, "_wait_for_nodes", lambda addr, n, t: self.calls.append(("nodes", addr, n)))
        monkeypatch.setattr(slurm, "_run_worker", lambda cmd, ip, port, t, temp_dir=None: self.calls.append(("worker", cmd)))
        monkeypatch.setattr(slurm, "_ray_bin", lambda: "ray")
        monkeypatch.setattr(slurm, "_forget_ray_address",
                            lambda port, temp_dir=None: self.calls.append(("forget", port)))
        monkeypatch.setattr(slurm, "_write_token", lambda path: self.calls.append(("write token", path)) or "tok")
        self.lost: list[str] = []  # what _lost_nodes reports
        monkeypatch.setattr(slurm, "_lost_nodes", lambda addr, hosts, settle_s: self.calls.append(
            ("lost?", addr, dict(hosts), settle_s)) or self.lost)
        monkeypatch.setattr(slurm, "_read_token", lambda path, t: self.calls.append(("read token", path)) or "tok")
        for key in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN"):  # restored after the test
            monkeypatch.setenv(key, "unset")
        monkeypatch.setattr(slurm, "_use_ray_token", lambda tok: os.environ.update(slurm.ray_auth_env(tok)))
        ips = {"gpu07": "10.0.0.7", "gpu08": "10.0.0.8"}
        monkeypatch.setattr(slurm.socket, "gethostbyname", lambda h: ips[h])


def test_outside_slurm_nothing_changes(monkeypatch):
    rec = Recorder(monkeypatch)
    cfg = _trainer_cfg()
    with ray_cluster_for_allocation(cfg, env={}) as node:
        assert (node.role, node.train, node.address) == ("local", True, None)
    assert rec.calls == [] and cfg == _trainer_cfg()


def test_single_node_job_limits_ray_to_the_allocation(monkeypatch):
    rec = Recorder(monkeypatch)
    env = {"SLURM_JOB_ID": "5", "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "gpu07", "SLURM_CPUS_ON_NODE": "32"}
    cfg = _trainer_cfg("cuda", 1, 8, num_cpus=None, num_gpus=None)
    with ray_cluster_for_allocation(cfg, env=env) as node:
        assert (node.role, node.train) == ("local", True)
    # a Ray of its own (never a cluster another job recorded on the node), on the allocation's CPUs
    assert cfg.ray_kwargs.ray_init.num_cpus == 32 and cfg.ray_kwargs.ray_init.address == "local"
    cfg = _trainer_cfg()  # set explicitly (device=cpu: 8): kept
    with ray_cluster_for_allocation(cfg, env=env):
        pass
    assert cfg.ray_kwargs.ray_init.num_cpus == 8 and cfg.ray_kwargs.ray_init.address == "local"
    # an address the user gave wins
    cfg = _trainer_cfg()
    with ray_cluster_for_allocation(cfg, env={**env, "RAY_ADDRESS": "10.0.0.9:6379"}):
        pass
    assert "address" not in cfg.ray_kwargs.ray_init and rec.calls == []


def test_head_starts_ray_and_trains_against_it(monkeypatch):
    rec = Recorder(monkeypatch)
    cfg = _trainer_cfg("cuda", 2, 8, num_cpus=None, num_gpus=None)
    with ray_cluster_for_allocation(cfg, env={**ENV2, "SLURM_NODEID": "0"}) as node:
        assert (node.role, node.train, node.address) == ("head", True, "10.0.0.7:6379")
        assert cfg.ray_kwargs.ray_init.address == "10.0.0.7:6379"
        assert cfg.ray_kwargs.ray_init.num_cpus is None and cfg.ray_kwargs.ray_init.num_gpus is None
        assert os.environ["RAY_AUTH_MODE"] == "token" and os.environ["RAY_AUTH_TOKEN"] == "tok"
        assert rec.calls == [
            ("write token", Path.home() / ".ray" / "recipe_ray_token_42_0"),
            ("start", ["ray", "start", "--head", "--node-ip-address=10.0.0.7", "--port=6379", "--num-cpus=64",
                       "--block", "--disable-usage-stats"]),
            ("head up", "10.0.0.7", 6379),
            ("nodes", "10.0.0.7:6379", 2)]
    assert rec.calls[-2:] == [("stop", "proc"), ("forget", 6379)]


def test_head_creates_a_missing_ray_init_node(monkeypatch):
    Recorder(monkeypatch)
    cfg = OmegaConf.create({"trainer": {"device": "cuda", "nnodes": 2, "n_gpus_per_node": 8}, "ray_kwargs": {}})
    OmegaConf.set_struct(cfg, True)
    with ray_cluster_for_allocation(cfg, env={**ENV2, "SLURM_NODEID": "0"}):
        assert OmegaConf.to_container(cfg.ray_kwargs) == {
            "ray_init": {"address": "10.0.0.7:6379", "num_cpus": None, "num_gpus": None}}


def test_head_stops_ray_when_training_fails(monkeypatch):
    rec = Recorder(monkeypatch)
    with pytest.raises(RuntimeError, match="boom"):
        with ray_cluster_for_allocation(_trainer_cfg(nnodes=2), env={**ENV2, "SLURM_NODEID": "0"}):
            raise RuntimeError("boom")
    # not a Ray error: the GCS is not asked for lost nodes
    assert rec.calls[-2:] == [("stop", "proc"), ("forget", 6379)] and not [c for c in rec.calls if c[0] == "lost?"]


def test_head_names_a_lost_node_when_training_fails(monkeypatch, capsys):
    rec = Recorder(monkeypatch)
    from ray.exceptions import ActorDiedError

    rec.lost = ["10.0.0.8 (gpu08)"]
    cancels = []
    monkeypatch.setattr(slurm.subprocess, "run", lambda cmd, timeout: cancels.append(cmd) or
                        subprocess.CompletedProcess(cmd, 0))
    monkeypatch.setattr(slurm, "_port_open", lambda host, port, timeout=2.0: (host, port) == ("10.0.0.7", 6379))
    with pytest.raises(ActorDiedError):
        with ray_cluster_for_allocation(_trainer_cfg(nnodes=2), env={**ENV2, "SLURM_NODEID": "0"}):
            raise ActorDiedError()
    # a Ray error: the GCS gets time to mark the lost node dead
    assert rec.calls[-3][3] == slurm.LOST_NODE_SETTLE_S
    err = capsys.readouterr().err
    assert "[recipe] error: Ray node(s) lost during the run: 10.0.0.8 (gpu08)" in err
    # ... and cancels the job, so that the launcher reports it failed instead of waiting
    assert cancels == [["scancel", "42"]] and "cancelling Slurm job 42" in err
    with pytest.raises(ActorDiedError):
        with ray_cluster_for_allocation(_trainer_cfg(nnodes=2), env={**ENV2, "SLURM_NODEID": "0",
                                                                      "RECIPE_SLURM_CANCEL_ON_LOST_NODE": "0"}):
            raise ActorDiedError()
    assert len(cancels) == 1  # opted out: left for Slurm to requeue
    # the head's GCS is gone: not asked (ray.init would wait on it)
    monkeypatch.setattr(slurm, "_port_open", lambda host, port, timeout=2.0: False)
    n = len(rec.calls)
    with pytest.raises(ActorDiedError):
        with ray_cluster_for_allocation(_trainer_cfg(nnodes=2), env={**ENV2, "SLURM_NODEID": "0"}):
            raise ActorDiedError()
    assert not [c for c in rec.calls[n:] if c[0] == "lost?"]


def test_worker_joins_and_does_not_train(monkeypatch):
    rec = Recorder(monkeypatch)
    cfg = _trainer_cfg(nnodes=2)
    with ray_cluster_for_allocation(cfg, env={**ENV2, "RECIPE_RAY_PORT": "7001"}) as node:
        assert (node.role, node.train, node.address) == ("worker", False, "10.0.0.7:7001")
    assert os.environ["RAY_AUTH_TOKEN"] == "tok"
    assert rec.calls == [("read token", Path.home() / ".ray" / "recipe_ray_token_42_0"),
                         ("worker", ["ray", "start", "--address=10.0.0.7:7001", "--node-ip-address=10.0.0.8",
                                     "--num-cpus=8", "--num-gpus=1", "--block", "--disable-usage-stats"])]
    assert "address" not in cfg.ray_kwargs.ray_init


def test_temp_dir_of_every_node_from_recipe_ray_temp_dir(monkeypatch):
    """RECIPE_RAY_TEMP_DIR reaches both `ray start` commands and the forget step (nodes sharing /tmp)."""
    rec = Recorder(monkeypatch)
    forgotten = []
    monkeypatch.setattr(slurm, "_forget_ray_address", lambda port, temp_dir=None: forgotten.append(temp_dir))
    env = {**ENV2, "RECIPE_RAY_TEMP_DIR": "/tmp/rmn"}
    with ray_cluster_for_allocation(_trainer_cfg(nnodes=2), env={**env, "SLURM_NODEID": "0"}):
        pass
    with ray_cluster_for_allocation(_trainer_cfg(nnodes=2), env=env):
        pass
    head, worker = [c[1] for c in rec.calls if c[0] in ("start", "worker")]
    # one folder per node: each node's session (sockets, logs) its own
    assert head[-3:] == ["--temp-dir=/tmp/rmn/n0", "--block", "--disable-usage-stats"]
    assert worker[-3:] == ["--temp-dir=/tmp/rmn/n1", "--block", "--disable-usage-stats"]
    assert forgotten == ["/tmp/rmn/n0"]
    assert slurm.ray_temp_dir({}, 1) is None and slurm.ray_temp_dir({"RECIPE_RAY_TEMP_DIR": ""}, 1) is None


def test_mismatched_nnodes_fails_before_starting_anything(monkeypatch):
    rec = Recorder(monkeypatch)
    with pytest.raises(SlurmConfigError, match="set trainer.nnodes=2"):
        with ray_cluster_for_allocation(_trainer_cfg(nnodes=1), env={**ENV2, "SLURM_NODEID": "0"}):
            pytest.fail("must not train")
    assert rec.calls == []


# --------------------------------------------------------------------------------------
# launcher presets
# --------------------------------------------------------------------------------------
def _sbatch_script(launcher_cfg) -> str:
    """The sbatch script submitit writes for a preset (what Hydra's SlurmLauncher.launch builds)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    launcher = hydra.utils.instantiate(launcher_cfg)
    params = dict(launcher.params)
    executor = submitit.AutoExecutor(cluster="slurm", folder=tempfile.mkdtemp(),
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("python -m x", "uid")


@pytest.mark.parametrize("name, expected, absent", [
    ("slurm_cpu", ["--cpus-per-task=2", "--mem=6GB", "--ntasks-per-node=1", "--nodes=1", "--time=60",
                   "--signal=USR2@120"], ["--gpus-per-node", "--exclusive"]),
    ("slurm_gpu", ["--gpus-per-node=8", "--cpus-per-task=64", "--nodes=1", "--ntasks-per-node=1", "--time=1440",
                   "--signal=USR2@300"], ["--mem=", "--exclusive"]),
    ("slurm_multinode", ["--gpus-per-node=8", "--nodes=2", "--ntasks-per-node=1", "--exclusive",
                         "--signal=USR2@300"], ["--mem="]),
])
def test_launcher_presets_compose_to_sbatch(compose, name, expected, absent, monkeypatch):
    import submitit

    # submitit refuses to build a Slurm executor where `srun` is not on PATH; only the script
    # text is checked here (the real cluster: tests/slurm)
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))
    cfg = compose(f"hydra/launcher={name}")
    assert cfg.hydra.runtime.choices["hydra/launcher"] == name
    assert cfg.hydra.launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    # requeue on time-out: submitit resubmits the same job (same overrides -> same run dir)
    assert cfg.hydra.launcher.max_num_timeout >= 3
    HydraConfig.instance().set_config(cfg)
    try:
        sweep_dir = OmegaConf.select(cfg, "hydra.sweep.dir")
        assert sweep_dir.startswith(OmegaConf.select(cfg, "paths.runs") + "/multirun/")
        assert cfg.hydra.launcher.submitit_folder == f"{sweep_dir}/.submitit/%j"
        script = _sbatch_script(cfg.hydra.launcher)
    finally:
        HydraConfig.instance().cfg = None
    lines = script.splitlines()
    for flag in expected:
        assert f"#SBATCH {flag}" in lines, (flag, script)
    for flag in absent:
        assert not any(line.startswith(f"#SBATCH {flag}") for line in lines), (flag, script)
    assert "export PYTHONUNBUFFERED=1" in lines


@pytest.mark.parametrize("name", LAUNCHERS)
def test_launcher_header(name):
    lines = (CONF_DIR / "hydra" / "launcher" / f"{name}.yaml").read_text().splitlines()
    assert "Command: python -m recipe.main -m" in lines[0] and f"hydra/launcher={name}" in lines[0]
    assert "# @package hydra.launcher" in lines[:3]


# --------------------------------------------------------------------------------------
# recipe.main: add_ray_env and the entry point
# --------------------------------------------------------------------------------------
def test_add_ray_env_creates_missing_nodes():
    from recipe.main import add_ray_env

    # no runtime_env (as in verl's ppo_trainer.yaml), struct config as Hydra composes it
    cfg = OmegaConf.create({"ray_kwargs": {"ray_init": {"num_cpus": 2}}})
    OmegaConf.set_struct(cfg, True)
    add_ray_env(cfg, VERL_PLATFORM="cpu", B="2")
    assert OmegaConf.to_container(cfg.ray_kwargs) == {
        "ray_init": {"num_cpus": 2, "runtime_env": {"env_vars": {"VERL_PLATFORM": "cpu", "B": "2"}}}}
    # not even ray_init
    cfg = OmegaConf.create({"ray_kwargs": {}})
    OmegaConf.set_struct(cfg, True)
    add_ray_env(cfg, A="1")
    assert OmegaConf.to_container(cfg.ray_kwargs) == {"ray_init": {"runtime_env": {"env_vars": {"A": "1"}}}}


def test_add_ray_env_keeps_other_env_vars():
    from recipe.main import add_ray_env

    cfg = OmegaConf.create({"ray_kwargs": {"ray_init": {"runtime_env": {
        "env_vars": {"KEEP": "x", "A": "old"}, "working_dir": None}}}})
    OmegaConf.set_struct(cfg, True)
    add_ray_env(cfg, A="new", C="3")
    assert OmegaConf.to_container(cfg.ray_kwargs.ray_init.runtime_env) == {
        "env_vars": {"KEEP": "x", "A": "new", "C": "3"}, "working_dir": None}


@pytest.mark.parametrize("mode, raises", [("RUN", SystemExit), ("MULTIRUN", SlurmConfigError)])
def test_main_slurm_config_error_exits_2_or_fails_the_sweep_job(compose, monkeypatch, capsys, mode, raises):
    """A job whose allocation disagrees with trainer.nnodes never trains: a plain run exits
    with status 2 and the message; a sweep job raises, so the launcher marks it failed."""
    import recipe.main as main_mod

    monkeypatch.setattr(main_mod, "run", lambda cfg: pytest.fail("must not train"))
    for key, value in {**ENV2, "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    cfg = compose("trainer.nnodes=1")
    with open_dict(cfg):
        cfg.hydra.mode = mode
    HydraConfig.instance().set_config(cfg)
    try:
        with pytest.raises(raises) as err:
            main_mod.main.__wrapped__(cfg)
    finally:
        HydraConfig.instance().cfg = None
    if raises is SystemExit:
        assert err.value.code == 2
    assert "[recipe] error: trainer.nnodes=1 but the Slurm allocation has 2 node(s)" in capsys.readouterr().err


def test_main_runs_the_trainer_outside_slurm_and_names_sweep_jobs(compose, monkeypatch):
    import recipe.main as main_mod

    for key in ("SLURM_JOB_ID", "SLURM_JOBID"):
        monkeypatch.delenv(key, raising=False)
    seen = []
    monkeypatch.setattr(main_mod, "run", lambda cfg: seen.append(cfg.trainer.experiment_name))
    cfg = compose("data.seed=4")
    with open_dict(cfg):
        cfg.hydra.mode = "MULTIRUN"
    HydraConfig.instance().set_config(cfg)
    try:
        main_mod.main.__wrapped__(cfg)
    finally:
        HydraConfig.instance().cfg = None
    assert seen == ["grpo_gsm8k_tiny_data.seed=4"]
