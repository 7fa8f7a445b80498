"""Entry point: ``python -m recipe.main [HYDRA OVERRIDES]`` (what ``./run.sh`` runs).

Composes ``conf/config.yaml`` (verl's ``ppo_trainer`` defaults + this project's groups),
prepares what is missing (data files through :mod:`recipe.data`, the tiny model through
:mod:`recipe.models`), switches verl to the CPU platform when ``trainer.device=cpu``,
then runs verl's own V1 trainer (``verl.trainer.main_ppo.run_ppo`` with verl's
``TaskRunnerV1``, whose trainer is :class:`recipe.stages.trainer.RecipeTrainer`): Ray, FSDP2 workers, agent loop, rollout server, checkpoints.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from recipe.config import ConfigError, abs_path, as_files, check_all, setup_paths
from recipe.io import atomic_write_text

logger = logging.getLogger("recipe.main")

REPO_ROOT = Path(__file__).resolve().parents[1]


def prepare_data(cfg: DictConfig) -> None:
    """Convert missing ``${paths.data}/<dataset>/<split>.parquet`` files with :mod:`recipe.data`.

    Raises:
        FileNotFoundError: naming the config key and file, when a data file is missing and
            is not one this project can prepare.
    """
    from recipe import data as data_mod

    data_root = Path(cfg.paths.data).resolve()
    for key in ("train_files", "val_files"):
        for f in as_files(cfg.data.get(key)):
            path = Path(os.path.expanduser(f)).resolve()
            if path.exists():
                continue
            dataset = path.parent.name
            can_prepare = (
                cfg.prepare.data and path.parent.parent == data_root and dataset in data_mod.DATASETS
            )
            if not can_prepare:
                raise FileNotFoundError(
                    f"data.{key}: {path} does not exist (prepare it with `python -m recipe.data` "
                    f"or point data.{key} at a verl-format parquet)"
                )
            logger.info("preparing %s into %s", dataset, data_root)
            print(f"[recipe] preparing dataset '{dataset}' -> {data_root}", flush=True)
            data_mod.prepare(dataset, data_root, template=cfg.prepare.template)
            if not path.exists():
                raise FileNotFoundError(f"data.{key}: recipe.data prepared {dataset} but {path} is still missing")


def check_data_files(cfg: DictConfig) -> None:
    """Check every training and validation file before Ray starts: it exists, is readable
    parquet, and has the columns verl reads (``prompt`` as messages, ``reward_model`` with
    a ``ground_truth`` on every row, ``data_source``).

    Raises:
        ConfigError: naming the config key, the file and the missing field or bad row.
    """
    from recipe import data as data_mod

    for key in ("train_files", "val_files"):
        for f in as_files(cfg.data.get(key)):
            try:
                data_mod.validate_verl_parquet(abs_path(f), columns=data_mod.TRAIN_COLUMNS)
            except (data_mod.DataError, FileNotFoundError) as e:
                raise ConfigError(f"data.{key}: {e}") from None


def prepare_model(cfg: DictConfig) -> None:
    """Build the tiny model at ``actor_rollout_ref.model.path`` when asked and missing."""
    tm = cfg.get("tiny_model") or {}
    path = cfg.actor_rollout_ref.model.path
    if not (cfg.prepare.model and tm.get("build", False)):
        return
    from recipe import models

    if models.is_complete_model_dir(path):
        return
    print(f"[recipe] building tiny model -> {path}", flush=True)
    models.build_tiny_model(
        path,
        tokenizer=tm.get("tokenizer", "local"),
        hidden_size=tm.get("hidden_size", 64),
        num_layers=tm.get("num_layers", 2),
        seed=tm.get("seed", 0),
    )


def setup_device(cfg: DictConfig) -> None:
    """On ``trainer.device=cpu``: select verl's ``cpu`` platform and apply verl_patches.

    Raises:
        RuntimeError: when a patch failed to apply (the traceback is in the message).
    """
    if cfg.trainer.device != "cpu":
        return
    os.environ["VERL_PLATFORM"] = "cpu"
    import verl_patches

    verl_patches.apply(cpu=True)
    add_ray_env(cfg, VERL_PLATFORM="cpu", VERL_ENGINE_DEVICE=os.environ.get("VERL_ENGINE_DEVICE", "cuda"))


def add_ray_env(cfg: DictConfig, **env: str) -> None:
    """Add environment variables for every Ray worker (``ray_kwargs.ray_init.runtime_env.env_vars``).

    Workers of a locally started cluster inherit the driver's environment anyway; this
    also covers an existing cluster (``ray_kwargs.ray_init.address``, a multi-node Slurm
    job's). Missing nodes are created (``DictConfig.setdefault`` would hand back a detached
    dict for them, losing the variables); other entries of ``env_vars`` are kept.
    """
    with open_dict(cfg):
        for key, value in env.items():
            OmegaConf.update(cfg, f"ray_kwargs.ray_init.runtime_env.env_vars.{key}", value, force_add=True)


def join_existing_cluster(cfg: DictConfig) -> str | None:
    """Train on a running Ray cluster when one is named: ``ray_kwargs.ray_init.address``, or
    Ray's own ``RAY_ADDRESS`` variable (``RAY_ADDRESS=host:6379 ./run.sh``; the e2e tests
    share one cluster this way). ``num_cpus`` / ``num_gpus`` describe a cluster to start and
    ``ray.init`` refuses them with an address, so they are cleared; the driver's
    ``PYTHONPATH`` is passed to the workers (modules of ``stages.extra``), which do not
    inherit the driver's environment on a cluster it did not start.

    Returns:
        The address joined, or None (``address`` unset or ``local``: verl starts a Ray of its own).
    """
    ray_init = cfg.ray_kwargs.ray_init
    address = ray_init.get("address") or os.environ.get("RAY_ADDRESS")
    if not address or address == "local":
        return None
    with open_dict(cfg):
        ray_init.address = address
        ray_init.num_cpus = None
        ray_init.num_gpus = None
    if os.environ.get("PYTHONPATH"):
        add_ray_env(cfg, PYTHONPATH=os.environ["PYTHONPATH"])
    print(f"[recipe] joining the Ray cluster at {address}", flush=True)
    return address


def check_stages(cfg: DictConfig) -> None:
    """Every start-up check, before Ray starts: this project's config nodes and their
    cross-node rules (:func:`recipe.config.check_all`), then each enabled stage's own
    ``check_config`` (stages outside this package included: ``stages.extra``).

    Raises:
        ConfigError: naming the key at fault.
    """
    check_all(cfg)
    from recipe.stages.base import enabled_stage_classes

    try:
        classes = enabled_stage_classes(cfg)
    except ImportError as e:
        raise ConfigError(f"stages.extra: cannot import a stage module: {e}") from None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for cls in classes:
        cls.check_config(cfg)


#: verl warns in every process that imports its engines about each optional engine it
#: lacks (torchtitan, veomni, automodel, mindspeed, megatron): five lines per worker.
ENGINE_WARNINGS = "ignore::UserWarning:verl.workers.engine"


def quiet_engine_warnings(cfg: DictConfig) -> None:
    """Silence verl's engine-availability warnings here and in every Ray worker
    (``PYTHONWARNINGS``, passed through ``ray_kwargs.ray_init.runtime_env``); other warnings
    are untouched."""
    import warnings

    warnings.filterwarnings("ignore", category=UserWarning, module=r"verl\.workers\.engine")
    current = os.environ.get("PYTHONWARNINGS", "")
    if ENGINE_WARNINGS not in current.split(","):
        os.environ["PYTHONWARNINGS"] = ",".join(filter(None, [current, ENGINE_WARNINGS]))
    add_ray_env(cfg, PYTHONWARNINGS=os.environ["PYTHONWARNINGS"])


@contextlib.contextmanager
def ray_cleanup():
    """Leave no Ray process behind: SIGTERM / SIGHUP end the driver like Ctrl-C does (an
    exception, so ``finally`` blocks run) and, however the run ends, ``ray.shutdown()``
    stops the Ray processes this driver started (GCS, raylet, dashboard, workers and the
    TransferQueue actors); on a cluster it did not start it only disconnects."""
    def _exit(signum, frame):
        raise SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, _exit) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        import ray

        if ray.is_initialized():
            print("[recipe] shutting down Ray", flush=True)
            ray.shutdown()


def setup_metrics_file(cfg: DictConfig) -> str:
    """Point verl's ``file`` logger at ``metrics_file`` (appended to on resume)."""
    path = abs_path(cfg.metrics_file)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    os.environ["VERL_FILE_LOGGER_PATH"] = path
    add_ray_env(cfg, VERL_FILE_LOGGER_PATH=path)
    return path


#: The resolved config of a run, in ``trainer.default_local_dir`` (rewritten at every start).
CONFIG_FILE = "config.yaml"


def write_run_config(cfg: DictConfig) -> Path:
    """Write the resolved config to ``${trainer.default_local_dir}/config.yaml`` (atomically,
    every start: a resumed run writes what it ran with) and print it when ``log.config_dump``.

    verl's task runner would print the whole config (~1,000 lines) at every start;
    :class:`recipe.stages.trainer.RecipeTaskRunner` does not, so this is the only dump.

    Returns:
        The path written.
    """
    text = OmegaConf.to_yaml(cfg, resolve=True)
    path = atomic_write_text(Path(abs_path(cfg.trainer.default_local_dir)) / CONFIG_FILE, text)
    if OmegaConf.select(cfg, "log.config_dump", default=False):
        print(text, end="", flush=True)
    return path


def run(cfg: DictConfig) -> None:
    """Prepare, patch and run verl's V1 PPO trainer with ``cfg``."""
    setup_paths(cfg)
    check_stages(cfg)
    prepare_data(cfg)
    check_data_files(cfg)
    prepare_model(cfg)
    quiet_engine_warnings(cfg)
    setup_device(cfg)
    join_existing_cluster(cfg)
    metrics_path = setup_metrics_file(cfg)

    import verl_patches
    from verl.trainer.main_ppo import run_ppo
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config
    from verl.utils.device import auto_set_device

    st = verl_patches.status()
    if st["error"] or (cfg.trainer.device == "cpu" and not st["cpu"]):
        raise RuntimeError(f"verl_patches did not apply: {st['error']}")

    # Resolve our own keys (paths, hydra choices) now: Ray workers have no Hydra context.
    OmegaConf.resolve(cfg)
    auto_set_device(cfg)
    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))
    if not cfg.trainer.use_v1:
        raise ConfigError("trainer.use_v1=false: this project runs verl's V1 trainer only (see README, design)")
    config_path = write_run_config(cfg)
    print(f"[recipe] run dir: {abs_path(cfg.trainer.default_local_dir)}  metrics: {metrics_path}  "
          f"config: {config_path.name}", flush=True)
    from recipe.stages.trainer import RecipeTaskRunner

    with ray_cleanup():
        run_ppo(cfg, task_runner_class=RecipeTaskRunner)


@hydra.main(config_path="../conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    """Hydra entry point (also the task function of each job of a ``-m`` sweep).

    In a sweep (``hydra.mode=MULTIRUN``, e.g. ``-m hydra/launcher=slurm_cpu``) the job gets
    its own ``trainer.experiment_name`` (:func:`recipe.slurm.apply_sweep_experiment_name`),
    and inside a Slurm allocation :func:`recipe.slurm.ray_cluster_for_allocation` decides
    whether this process trains (a single node, or rank 0 of a multi-node Ray cluster) or
    only serves as a Ray node.

    Exits with status 2 and a one-line message on a config error (``ConfigError``,
    ``SlurmConfigError``, a missing file); in a sweep it re-raises instead, so that the
    launcher reports that job as failed with the error (``sys.exit`` would end the job
    without a result).
    """
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from recipe.slurm import SlurmConfigError, apply_sweep_experiment_name, ray_cluster_for_allocation

    logging.basicConfig(level=logging.INFO)
    try:
        apply_sweep_experiment_name(cfg)
        with ray_cluster_for_allocation(cfg) as node:
            if node.train:
                run(cfg)
            else:
                print(f"[recipe] Ray worker node of the cluster at {node.address}: done", flush=True)
    except (ConfigError, SlurmConfigError, FileNotFoundError) as e:
        print(f"[recipe] error: {e}", file=sys.stderr, flush=True)
        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            raise
        sys.exit(2)


if __name__ == "__main__":
    main()
