"""Slurm sweeps: what a job of Hydra's submitit launcher does before it trains.

``python -m recipe.main -m hydra/launcher=slurm_gpu <sweep>`` submits one Slurm job per
combination of the sweep (``conf/hydra/launcher/``); each job runs ``recipe.main``'s task
function. Two things differ from a plain run, both handled here:

1. **One run directory per job.** ``trainer.experiment_name`` (and with it
   ``trainer.default_local_dir`` and ``metrics_file``) defaults to
   ``<recipe>_<data>_<model>``, the same for every job of a sweep over, say, ``seed``:
   the jobs would write into one directory and resume from each other's checkpoints.
   :func:`apply_sweep_experiment_name` appends the job's own overrides (Hydra's
   ``override_dirname``, e.g. ``grpo_gsm8k_tiny_seed=1``) unless the sweep sets
   ``trainer.experiment_name`` itself. The name depends only on the overrides, so a
   requeued job (preemption, time limit) finds its own checkpoints again
   (``trainer.resume_mode=auto``, verl's default).
2. **Several nodes.** verl places its workers through Ray, so a multi-node allocation
   (``hydra/launcher=slurm_multinode``: ``nodes`` tasks, one per node) must become one
   Ray cluster: :func:`ray_cluster_for_allocation` makes node rank 0 start
   ``ray start --head`` and train with ``ray_kwargs.ray_init.address`` pointing at it,
   while every other node runs ``ray start --address=<head> --block`` and returns
   without training. Single-node jobs keep verl's own local Ray.

Everything that reads the environment goes through :func:`allocation_from_env` and the
pure command builders, so the logic is testable without Slurm or Ray
(``tests/unit/tools/test_slurm.py``); the real thing is tested by ``tests/slurm``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from recipe.io import atomic_write_text

from omegaconf import DictConfig, OmegaConf, open_dict

logger = logging.getLogger("recipe.slurm")

#: Ray's head port unless ``RECIPE_RAY_PORT`` says otherwise.
DEFAULT_RAY_PORT = 6379
#: seconds the head waits for every node to join (``RECIPE_RAY_JOIN_TIMEOUT``).
DEFAULT_JOIN_TIMEOUT_S = 300.0
#: longest suffix :func:`sweep_experiment_name` appends before hashing the rest.
MAX_SUFFIX_CHARS = 120


class SlurmConfigError(ValueError):
    """The Slurm allocation and the config disagree (names the keys at fault)."""


# --------------------------------------------------------------------------------------
# one run directory per sweep job
# --------------------------------------------------------------------------------------
def _override_key(override: str) -> str:
    """``"+a.b=1"`` -> ``"a.b"`` (Hydra's ``+``, ``++`` and ``~`` prefixes dropped)."""
    return override.split("=", 1)[0].lstrip("+~")


def sweep_experiment_name(name: str, task_overrides: Sequence[str], multirun: bool) -> str:
    """The experiment name of one sweep job: ``name`` plus the job's own overrides.

    Args:
        name: the composed ``trainer.experiment_name`` (e.g. ``grpo_gsm8k_tiny``).
        task_overrides: the job's command-line overrides (``hydra.overrides.task``), the
            swept value included, e.g. ``["trainer.total_training_steps=2", "seed=1"]``.
        multirun: whether this is a job of a ``-m`` sweep (``hydra.mode=MULTIRUN``).

    Returns:
        ``name`` unchanged for a single run, for a sweep that sets
        ``trainer.experiment_name`` itself, or without overrides; otherwise
        ``f"{name}_{override_dirname}"`` where ``override_dirname`` is Hydra's: the
        overrides sorted and joined with ``,`` (``/`` replaced by ``-`` so that it is one
        path component). Over :data:`MAX_SUFFIX_CHARS` characters, the suffix is cut and
        ended with 10 hex digits of its SHA-1, so distinct overrides stay distinct.
        Deterministic: a requeued job gets the same name and resumes its checkpoints.
    """
    if not multirun or not task_overrides:
        return name
    if any(_override_key(o) == "trainer.experiment_name" for o in task_overrides):
        return name
    suffix = ",".join(sorted(task_overrides)).replace("/", "-")
    if len(suffix) > MAX_SUFFIX_CHARS:
        digest = hashlib.sha1(suffix.encode()).hexdigest()[:10]
        suffix = f"{suffix[: MAX_SUFFIX_CHARS - 11]}-{digest}"
    return f"{name}_{suffix}"


def apply_sweep_experiment_name(cfg: DictConfig) -> str:
    """Give this sweep job its own ``trainer.experiment_name`` (see :func:`sweep_experiment_name`).

    Call it in the job before anything reads ``trainer.default_local_dir`` (it is an
    interpolation of the name, as is ``metrics_file``). Outside a Hydra app or in a single
    run it changes nothing.

    Returns:
        The experiment name now in ``cfg``.
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return cfg.trainer.experiment_name
    hc = HydraConfig.get()
    name = sweep_experiment_name(
        cfg.trainer.experiment_name, list(hc.overrides.task), hc.mode == RunMode.MULTIRUN
    )
    if name != cfg.trainer.experiment_name:
        with open_dict(cfg):
            cfg.trainer.experiment_name = name
        logger.info("sweep job %s: trainer.experiment_name=%s", hc.job.get("num"), name)
    return name


# --------------------------------------------------------------------------------------
# the allocation, from the environment
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlurmAllocation:
    """The part of a Slurm job's environment that decides what this process does.

    Attributes:
        job_id: ``SLURM_JOB_ID``.
        num_nodes: ``SLURM_JOB_NUM_NODES`` (or ``SLURM_NNODES``).
        num_tasks: ``SLURM_NTASKS`` (1 when unset: a batch script without srun).
        node_rank: ``SLURM_NODEID``, 0 .. num_nodes - 1.
        local_rank: ``SLURM_LOCALID``, the task's rank on its node.
        hostnames: ``SLURM_JOB_NODELIST`` expanded, one per node; ``hostnames[0]`` is the
            node of rank 0, which hosts the Ray head.
        cpus_on_node: ``SLURM_CPUS_ON_NODE``, the CPUs allocated on this node (None: unset).
    """

    job_id: str
    num_nodes: int
    num_tasks: int
    node_rank: int
    local_rank: int
    hostnames: tuple[str, ...]
    cpus_on_node: int | None = None

    @property
    def is_head(self) -> bool:
        return self.node_rank == 0


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand a Slurm host list: ``"gpu[01-03,07],login1"`` -> ``gpu01, gpu02, gpu03, gpu07, login1``.

    Zero-padding of a range is kept; several bracket groups in one name expand as a
    product (``"r[1-2]n[1-2]"`` -> ``r1n1, r1n2, r2n1, r2n2``).

    Raises:
        SlurmConfigError: on an unbalanced bracket or a malformed range, naming the list.
    """
    hosts: list[str] = []
    for name in _split_top_level(nodelist):
        prefixes = [""]
        for literal, ranges in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", name):
            if not literal and not ranges:
                continue
            prefixes = [p + literal for p in prefixes]
            if ranges:
                prefixes = [p + s for p in prefixes for s in _expand_ranges(ranges, nodelist)]
        hosts.extend(prefixes)
    return hosts


def _split_top_level(nodelist: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for c in nodelist.strip():
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
            if depth < 0:
                raise SlurmConfigError(f"SLURM_JOB_NODELIST={nodelist!r}: unbalanced ']'")
        if c == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += c
    if depth:
        raise SlurmConfigError(f"SLURM_JOB_NODELIST={nodelist!r}: unbalanced '['")
    parts.append(cur)
    return [p for p in parts if p]


def _expand_ranges(ranges: str, nodelist: str) -> list[str]:
    out = []
    for part in ranges.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        if not m:
            raise SlurmConfigError(f"SLURM_JOB_NODELIST={nodelist!r}: bad range {part!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise SlurmConfigError(f"SLURM_JOB_NODELIST={nodelist!r}: empty range {part!r}")
        out.extend(f"{i:0{len(lo)}d}" for i in range(int(lo), int(hi) + 1))
    return out


def _int_env(env: Mapping[str, str], *names: str, default: int | None = None) -> int | None:
    for n in names:
        if env.get(n, "") != "":
            try:
                return int(env[n])
            except ValueError:
                raise SlurmConfigError(f"{n}={env[n]!r} is not an integer") from None
    return default


def allocation_from_env(env: Mapping[str, str] | None = None) -> SlurmAllocation | None:
    """Read the Slurm allocation this process runs in (None outside a Slurm job).

    Args:
        env: the environment (default ``os.environ``); a job step of
            ``srun``/submitit has ``SLURM_JOB_ID``, ``SLURM_JOB_NUM_NODES``,
            ``SLURM_NODEID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``, ``SLURM_JOB_NODELIST``.

    Raises:
        SlurmConfigError: when the variables contradict each other (node rank out of
            range, a node list of the wrong length), naming the variables.
    """
    env = os.environ if env is None else env
    job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID")
    if not job_id:
        return None
    num_nodes = _int_env(env, "SLURM_JOB_NUM_NODES", "SLURM_NNODES", default=1)
    node_rank = _int_env(env, "SLURM_NODEID", default=0)
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or ""
    if nodelist:
        hostnames = tuple(expand_nodelist(nodelist))
    elif num_nodes == 1:
        hostnames = (socket.gethostname(),)
    else:
        raise SlurmConfigError(f"SLURM_JOB_NUM_NODES={num_nodes} but SLURM_JOB_NODELIST is unset")
    if not 0 <= node_rank < num_nodes:
        raise SlurmConfigError(f"SLURM_NODEID={node_rank} is outside 0..SLURM_JOB_NUM_NODES-1={num_nodes - 1}")
    if len(hostnames) != num_nodes:
        raise SlurmConfigError(
            f"SLURM_JOB_NODELIST={nodelist!r} names {len(hostnames)} hosts but SLURM_JOB_NUM_NODES={num_nodes}"
        )
    return SlurmAllocation(
        job_id=str(job_id),
        num_nodes=num_nodes,
        num_tasks=_int_env(env, "SLURM_NTASKS", "SLURM_NPROCS", default=1),
        node_rank=node_rank,
        local_rank=_int_env(env, "SLURM_LOCALID", default=0),
        hostnames=hostnames,
        cpus_on_node=_int_env(env, "SLURM_CPUS_ON_NODE"),
    )


# --------------------------------------------------------------------------------------
# Ray commands (pure)
# --------------------------------------------------------------------------------------
def ray_port(env: Mapping[str, str] | None = None) -> int:
    """The Ray head's GCS port: ``RECIPE_RAY_PORT`` or :data:`DEFAULT_RAY_PORT`."""
    env = os.environ if env is None else env
    return _int_env(env, "RECIPE_RAY_PORT", default=DEFAULT_RAY_PORT)


def head_address(head_ip: str, port: int) -> str:
    """``"10.0.0.1", 6379`` -> ``"10.0.0.1:6379"`` (what ``ray start --address`` and
    ``ray_kwargs.ray_init.address`` take)."""
    if not head_ip:
        raise SlurmConfigError("the Ray head's IP address is empty (could not resolve the first host of the job)")
    return f"{head_ip}:{port}"


def _resources(num_cpus: int | None, num_gpus: int | None) -> list[str]:
    out = []
    if num_cpus is not None:
        out.append(f"--num-cpus={num_cpus}")
    if num_gpus is not None:
        out.append(f"--num-gpus={num_gpus}")
    return out


def ray_temp_dir(env: Mapping[str, str] | None = None, node_rank: int | None = None) -> str | None:
    """Ray's temp dir for a node of this job: ``$RECIPE_RAY_TEMP_DIR/n<node_rank>`` (None when
    the variable is unset: Ray's ``/tmp/ray``).

    Needed where several "nodes" share one ``/tmp`` (the namespaces of ``scripts/netns.sh``
    in ``tests/multinode``): ``ray start`` records its cluster in
    ``<temp dir>/ray_current_cluster``, and any plain ``ray.init()`` on the machine would
    join that cluster instead of starting its own; one folder per node keeps each node's
    session (sockets, logs) its own, as on separate machines. Keep it short (Ray's socket
    paths live under it and a Unix socket path has at most 107 characters).
    """
    env = os.environ if env is None else env
    base = env.get("RECIPE_RAY_TEMP_DIR") or None
    if base is None or node_rank is None:
        return base
    return os.path.join(base, f"n{node_rank}")


def _temp_dir_flag(temp_dir: str | None) -> list[str]:
    return [f"--temp-dir={temp_dir}"] if temp_dir else []


def ray_head_command(ray: str, node_ip: str, port: int, num_cpus: int | None, num_gpus: int | None,
                     temp_dir: str | None = None) -> list[str]:
    """``ray start --head --block`` on node rank 0.

    ``--block`` keeps the command running as the owner of this node's Ray processes (its
    own process group, with Ray's reaper), so stopping it stops exactly this cluster's
    processes, never another job's (``ray stop`` would kill every Ray on the node).
    ``num_cpus`` / ``num_gpus`` None let Ray detect them (GPUs from
    ``CUDA_VISIBLE_DEVICES``, which Slurm sets to the allocated ones). ``temp_dir``: see
    :func:`ray_temp_dir` (None: Ray's default).
    """
    return [ray, "start", "--head", f"--node-ip-address={node_ip}", f"--port={port}",
            *_resources(num_cpus, num_gpus), *_temp_dir_flag(temp_dir), "--block", "--disable-usage-stats"]


def ray_worker_command(ray: str, address: str, node_ip: str, num_cpus: int | None,
                       num_gpus: int | None, temp_dir: str | None = None) -> list[str]:
    """``ray start --address=<head> --block`` on every other node (runs while the cluster lives)."""
    return [ray, "start", f"--address={address}", f"--node-ip-address={node_ip}",
            *_resources(num_cpus, num_gpus), *_temp_dir_flag(temp_dir), "--block", "--disable-usage-stats"]


def ray_token_path(env: Mapping[str, str], job_id: str, home: Path | None = None) -> Path:
    """Where the head leaves the job's Ray auth token for the other nodes (a shared folder).

    Ray >= 2.52 protects a cluster started by ``ray start --head`` with a token when one is
    configured, and a node or driver joining it must present the same token
    (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``). The head makes a fresh token per job and
    writes it here, in a folder every node of the job sees:

    - ``$RECIPE_RAY_TOKEN_DIR`` when set;
    - else the submitit folder of the sweep (``$SUBMITIT_FOLDER``, shared by construction:
      submitit exchanges its pickles through it; its ``%j`` part is dropped);
    - else ``~/.ray`` (a shared home, where Ray itself keeps its token).

    The name holds the job id and ``SLURM_RESTART_COUNT``, so a requeued job never reads
    the token of its previous run.
    """
    if env.get("RECIPE_RAY_TOKEN_DIR"):
        folder = Path(env["RECIPE_RAY_TOKEN_DIR"])
    elif env.get("SUBMITIT_FOLDER"):
        folder = Path(env["SUBMITIT_FOLDER"])
        while "%" in folder.name:
            folder = folder.parent
    else:
        folder = (home or Path.home()) / ".ray"
    return folder / f"recipe_ray_token_{job_id}_{env.get('SLURM_RESTART_COUNT', '0')}"


def ray_auth_env(token: str) -> dict[str, str]:
    """Environment that makes ``ray start`` and ``ray.init`` use the job's token."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}


def node_resources(cfg: DictConfig, alloc: SlurmAllocation) -> tuple[int | None, int | None]:
    """CPUs and GPUs each node declares to Ray: ``(num_cpus, num_gpus)``.

    CPUs: ``ray_kwargs.ray_init.num_cpus`` when set, else the allocation's
    ``SLURM_CPUS_ON_NODE``. GPUs: on ``trainer.device=cpu`` the logical GPUs verl's CPU
    platform places workers on (``trainer.n_gpus_per_node``); on GPUs None (Ray counts
    the devices Slurm made visible).
    """
    ray_init = cfg.get("ray_kwargs", {}).get("ray_init", {}) or {}
    num_cpus = ray_init.get("num_cpus") or alloc.cpus_on_node
    num_gpus = int(cfg.trainer.n_gpus_per_node) if cfg.trainer.device == "cpu" else None
    return (int(num_cpus) if num_cpus else None), num_gpus


def check_allocation(cfg: DictConfig, alloc: SlurmAllocation) -> None:
    """The allocation must match what verl will ask Ray for.

    Raises:
        SlurmConfigError: when ``trainer.nnodes`` differs from the allocation's node count
            (``hydra.launcher.nodes``), or when there is more than one task per node
            (``hydra.launcher.tasks_per_node`` must be 1: verl starts its own worker
            processes through Ray, one task per node would train N times).
    """
    if alloc.num_tasks != alloc.num_nodes:
        raise SlurmConfigError(
            f"SLURM_NTASKS={alloc.num_tasks} on {alloc.num_nodes} node(s): set hydra.launcher.tasks_per_node=1 "
            "(verl starts its own workers through Ray; one task per node is all it needs)"
        )
    if int(cfg.trainer.nnodes) != alloc.num_nodes:
        raise SlurmConfigError(
            f"trainer.nnodes={cfg.trainer.nnodes} but the Slurm allocation has {alloc.num_nodes} node(s) "
            f"(hydra.launcher.nodes): set trainer.nnodes={alloc.num_nodes}"
        )


# --------------------------------------------------------------------------------------
# what a job does
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NodeRole:
    """What :func:`ray_cluster_for_allocation` decided for this process.

    Attributes:
        role: ``"local"`` (no Slurm, or one node: verl starts its own Ray), ``"head"``
            (node rank 0 of a multi-node job: trains against the cluster) or ``"worker"``
            (another node: served as a Ray node until the head stopped).
        train: whether the caller should now run the trainer (``local`` and ``head``).
        address: the Ray head's ``ip:port`` on multi-node jobs.
    """

    role: str
    train: bool
    address: str | None = None


def _ray_bin() -> str:
    """The ``ray`` CLI of this interpreter's environment (jobs may not have it on PATH)."""
    cand = os.path.join(os.path.dirname(sys.executable), "ray")
    return cand if os.access(cand, os.X_OK) else (shutil.which("ray") or "ray")


def _port_open(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _start_ray_node(cmd: list[str]) -> subprocess.Popen:
    """Run a blocking ``ray start`` in a session of its own: its process group is this node's Ray."""
    logger.info("starting: %s", " ".join(cmd))
    return subprocess.Popen(cmd, start_new_session=True)


def _write_token(path: Path) -> str:
    token = secrets.token_hex(32)
    atomic_write_text(path, token, mode=0o600)
    return token


def _use_ray_token(token: str) -> None:
    """Make this process and its children use the job's Ray token (``ray start``, verl's ``ray.init``).

    Ray reads ``RAY_AUTH_MODE`` into its config when it is imported; if it already was
    (verl and this project import it early), refresh that config and the cached token the
    way Ray itself does when it turns token mode on (``_enable_token_auth``).
    """
    os.environ.update(ray_auth_env(token))
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:  # a Ray without token authentication (< 2.52): the variables are unused
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _read_token(path: Path, timeout_s: float) -> str:
    end = time.monotonic() + timeout_s
    while True:
        try:
            token = path.read_text().strip()
            if token:
                return token
        except FileNotFoundError:
            pass
        if time.monotonic() > end:
            raise RuntimeError(f"the Ray head did not write its auth token to {path} within {timeout_s:.0f} s "
                               "(is the folder shared between nodes? set RECIPE_RAY_TOKEN_DIR to one that is)")
        time.sleep(1.0)


def _stop_ray_node(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """Stop the Ray node ``proc`` started: SIGTERM to its process group, SIGKILL after ``grace_s``."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait_s)
            break
        except subprocess.TimeoutExpired:
            continue


def _wait_for_head(proc: subprocess.Popen | None, head_ip: str, port: int, timeout_s: float) -> None:
    """Wait until the head's GCS port accepts connections (``proc``: the head's own ``ray start``)."""
    end = time.monotonic() + timeout_s
    while not _port_open(head_ip, port):
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {proc.returncode} before {head_ip}:{port} was up")
        if time.monotonic() > end:
            raise RuntimeError(f"the Ray head {head_ip}:{port} did not come up within {timeout_s:.0f} s "
                               "(RECIPE_RAY_JOIN_TIMEOUT); see node 0's log in the job's .submitit folder")
        time.sleep(1.0)


def _wait_for_nodes(address: str, n: int, timeout_s: float) -> None:
    import ray

    ray.init(address=address, logging_level=logging.WARNING)
    try:
        end = time.monotonic() + timeout_s
        while True:
            alive = [x for x in ray.nodes() if x.get("Alive")]
            if len(alive) >= n:
                logger.info("Ray cluster at %s: %d/%d nodes alive (%s)", address, len(alive), n,
                            ", ".join(sorted(x["NodeManagerAddress"] for x in alive)))
                return
            if time.monotonic() > end:
                raise RuntimeError(
                    f"only {len(alive)} of {n} nodes joined the Ray head at {address} within {timeout_s:.0f} s "
                    f"(RECIPE_RAY_JOIN_TIMEOUT); see the other tasks' logs in the job's .submitit folder"
                )
            time.sleep(2.0)
    finally:
        ray.shutdown()  # verl's run_ppo calls ray.init itself, with its runtime_env


#: seconds the head waits, after a Ray error, for the GCS to mark a lost node dead (its health
#: check declares a silent node dead after ~15 s: 5 missed checks 3 s apart)
LOST_NODE_SETTLE_S = 30.0


def _is_ray_error(e: BaseException) -> bool:
    try:
        from ray.exceptions import RayError
    except ImportError:  # pragma: no cover - Ray is a dependency
        return False
    return isinstance(e, RayError)


def _lost_nodes(address: str, hosts: Mapping[str, str], settle_s: float = 0.0) -> list[str]:
    """Nodes of the cluster at ``address`` that Ray marks dead, as ``"<ip> (<hostname>)"``.

    Called on the head after the trainer failed, to name a lost node in the job's log.
    A node whose raylet died is marked dead by the GCS within its health-check period, which
    may come after the trainer already failed (its workers there died first): the check is
    repeated for up to ``settle_s`` seconds while none is dead. Never raises (returns []).
    """
    try:
        import ray

        if not ray.is_initialized():
            ray.init(address=address, logging_level=logging.WARNING)
        try:
            end = time.monotonic() + settle_s
            while True:
                dead = sorted({x["NodeManagerAddress"] for x in ray.nodes() if not x.get("Alive")})
                if dead or time.monotonic() > end:
                    return [f"{ip} ({hosts[ip]})" if ip in hosts else ip for ip in dead]
                time.sleep(1.0)
        finally:
            ray.shutdown()
    except Exception as e:  # the GCS may be gone too: the original error matters more
        logger.warning("could not ask the Ray head which nodes were lost: %s", e)
        return []


def _run_worker(cmd: list[str], head_ip: str, port: int, timeout_s: float, poll_s: float = 5.0,
                temp_dir: str | None = None) -> None:
    """Join the head (waiting for it to come up) and serve until the head goes away."""
    _wait_for_head(None, head_ip, port, timeout_s)
    proc = _start_ray_node(cmd)
    misses = 0
    try:
        while proc.poll() is None:
            time.sleep(poll_s)
            # the head stops Ray after training; this node's raylet would only notice after
            # Ray's 60 s GCS reconnect timeout, so watch the head's port
            misses = 0 if _port_open(head_ip, port) else misses + 1
            if misses >= 3:
                logger.info("Ray head %s:%d is gone: stopping this node's Ray", head_ip, port)
                return
        if _port_open(head_ip, port):
            raise RuntimeError(f"`{' '.join(cmd)}` exited with {proc.returncode} while the head was up "
                               "(its output is above)")
    finally:
        _stop_ray_node(proc)
        _forget_ray_address(port, temp_dir)


def _forget_ray_address(port: int, temp_dir: str | None = None) -> None:
    """Remove the node's ``ray_current_cluster`` file if it names our (now stopped) cluster.

    ``ray start`` records its cluster there, and a later plain ``ray.init()`` on the node
    (the next job's) would try to join that dead cluster instead of starting its own.
    """
    path = Path(temp_dir or "/tmp/ray") / "ray_current_cluster"
    try:
        recorded = path.read_text().strip()
    except OSError:
        return
    if recorded.rsplit(":", 1)[-1] == str(port) and not _port_open(recorded.rsplit(":", 1)[0], port, timeout=1.0):
        path.unlink(missing_ok=True)


def _set_ray_init(cfg: DictConfig, **values) -> None:
    """Set ``ray_kwargs.ray_init.<key>`` (creating the nodes; DictConfig.setdefault would hand
    back a detached dict for a missing node)."""
    with open_dict(cfg):
        for key, value in values.items():
            OmegaConf.update(cfg, f"ray_kwargs.ray_init.{key}", value, force_add=True)


def _cancel_job_after_lost_node(job_id: str | None, env: Mapping[str, str]) -> bool:
    """``scancel`` the job whose Ray cluster lost a node, so that it ends as failed.

    Without it the job does not end: the launcher waits for every task, the lost node's
    task only ends when Slurm declares the node dead (``SlurmdTimeout``), and Slurm then
    requeues the job after NODE_FAIL. Cancelled, the job's state is CANCELLED and the
    launcher reports the job failed at once; the log already names the lost node. Skipped
    with ``RECIPE_SLURM_CANCEL_ON_LOST_NODE=0`` (e.g. to let Slurm requeue and resume).

    Returns:
        Whether ``scancel`` was called and exited 0.
    """
    if not job_id or env.get("RECIPE_SLURM_CANCEL_ON_LOST_NODE", "1") == "0":
        return False
    print(f"[recipe] cancelling Slurm job {job_id}: a node was lost, so the job cannot finish "
          "(RECIPE_SLURM_CANCEL_ON_LOST_NODE=0 keeps it for Slurm to requeue)", file=sys.stderr, flush=True)
    try:
        return subprocess.run(["scancel", str(job_id)], timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired) as e:
        logger.error("scancel %s failed: %s", job_id, e)
        return False


@contextlib.contextmanager
def ray_cluster_for_allocation(cfg: DictConfig, env: Mapping[str, str] | None = None) -> Iterator[NodeRole]:
    """Turn a multi-node Slurm allocation into one Ray cluster; tell the caller whether to train.

    Use in the entry point around the trainer::

        with ray_cluster_for_allocation(cfg) as node:
            if node.train:
                run(cfg)

    - Outside Slurm: role ``local``, nothing changes.
    - One node: role ``local``; unless ``ray_kwargs.ray_init.address`` or ``RAY_ADDRESS``
      is set, ``address=local`` (verl starts a Ray of its own, never joining a cluster some
      other job recorded in the node's ``/tmp/ray/ray_current_cluster``) and, when
      ``num_cpus`` is unset, ``SLURM_CPUS_ON_NODE`` (Ray does not count CPUs outside the
      allocation).
    - Node rank 0 of ``SLURM_JOB_NUM_NODES > 1``: writes a fresh Ray auth token to
      :func:`ray_token_path` (and uses it itself), ``ray start --head --block`` on its IP and
      port ``RECIPE_RAY_PORT`` (6379), waits until every node joined
      (``RECIPE_RAY_JOIN_TIMEOUT`` s, 300), sets ``ray_kwargs.ray_init.address`` (and
      clears ``num_cpus`` / ``num_gpus``, which ``ray.init`` refuses with an address),
      yields role ``head``; stops its Ray node afterwards, even on error, and removes the
      node's record of the stopped cluster.
    - Other nodes: read the token, ``ray start --address=<head> --block`` until the head's port has been
      closed for ~15 s, then stop this node's Ray and yield role ``worker`` (train False).
    - When training fails with a Ray error and the head's GCS reports lost nodes, the head
      names them and cancels the job (:func:`_cancel_job_after_lost_node`).

    Raises:
        SlurmConfigError: ``trainer.nnodes`` differs from the allocation, or more than
            one task per node (see :func:`check_allocation`).
        RuntimeError: the nodes did not join, the head or its token did not come up in
            time, or a node's ``ray start`` failed.
    """
    env = os.environ if env is None else env
    alloc = allocation_from_env(env)
    if alloc is None:
        yield NodeRole("local", True)
        return
    check_allocation(cfg, alloc)
    if alloc.num_nodes == 1:
        ray_init = OmegaConf.select(cfg, "ray_kwargs.ray_init") or {}
        if not ray_init.get("address") and not env.get("RAY_ADDRESS"):
            # a Ray of our own, never one another job left recorded on this node
            _set_ray_init(cfg, address="local")
            if ray_init.get("num_cpus") is None and alloc.cpus_on_node:
                _set_ray_init(cfg, num_cpus=alloc.cpus_on_node)
        yield NodeRole("local", True)
        return

    port = ray_port(env)
    head_ip = socket.gethostbyname(alloc.hostnames[0])
    address = head_address(head_ip, port)
    node_ip = socket.gethostbyname(alloc.hostnames[alloc.node_rank])
    num_cpus, num_gpus = node_resources(cfg, alloc)
    timeout_s = float(env.get("RECIPE_RAY_JOIN_TIMEOUT", DEFAULT_JOIN_TIMEOUT_S))
    ray = _ray_bin()
    temp_dir = ray_temp_dir(env, alloc.node_rank)
    token_path = ray_token_path(env, alloc.job_id)
    if not alloc.is_head:
        _use_ray_token(_read_token(token_path, timeout_s))
        _run_worker(ray_worker_command(ray, address, node_ip, num_cpus, num_gpus, temp_dir), head_ip, port,
                    timeout_s, temp_dir=temp_dir)
        yield NodeRole("worker", False, address)
        return

    # this process and its children: the `ray start` child, and verl's ray.init later
    _use_ray_token(_write_token(token_path))
    proc = _start_ray_node(ray_head_command(ray, node_ip, port, num_cpus, num_gpus, temp_dir))
    try:
        _wait_for_head(proc, head_ip, port, timeout_s)
        _wait_for_nodes(address, alloc.num_nodes, timeout_s)
        _set_ray_init(cfg, address=address, num_cpus=None, num_gpus=None)
        yield NodeRole("head", True, address)
    except BaseException as e:
        # say why before stopping Ray: a driver still attached to a stopped cluster can be
        # aborted by Ray before Python prints the traceback
        logger.exception("stopping the Ray cluster after an error")
        # a Ray error (an actor or worker died) may mean a lost node: ask the GCS, giving it
        # time to mark the node dead; not for other errors (config, data), nor when the GCS is
        # gone (ray.init would wait on it: a head hung so after its raylet crashed)
        lost = []
        if _is_ray_error(e) and _port_open(head_ip, port):
            lost = _lost_nodes(address, {socket.gethostbyname(h): h for h in alloc.hostnames},
                               settle_s=LOST_NODE_SETTLE_S)
        if lost:
            logger.error("Ray node(s) lost during the run: %s", ", ".join(lost))
            print(f"[recipe] error: Ray node(s) lost during the run: {', '.join(lost)}", file=sys.stderr, flush=True)
            _cancel_job_after_lost_node(alloc.job_id, env)
        raise
    finally:
        _stop_ray_node(proc)
        _forget_ray_address(port, temp_dir)
        token_path.unlink(missing_ok=True)
