"""Entry point: ``python -m recipe.main [HYDRA OVERRIDES]`` (what ``./run.sh`` runs).

Composes ``conf/config.yaml`` (verl's ``ppo_trainer`` defaults + this project's groups),
prepares what is missing (data files through :mod:`recipe.data`, the tiny model through
:mod:`recipe.models`), switches verl to the CPU platform when ``trainer.device=cpu``,
then runs verl's own V1 trainer (``verl.trainer.main_ppo.run_ppo`` with verl's
``TaskRunnerV1``, whose trainer is :class:`recipe.trainer.RecipeTrainer`): Ray, FSDP2 workers, agent loop, rollout server, checkpoints.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

logger = logging.getLogger("recipe.main")

REPO_ROOT = Path(__file__).resolve().parents[1]


class ConfigError(ValueError):
    """The composed config cannot run (names the key at fault)."""


def _abs(path: str | os.PathLike) -> str:
    return str(Path(os.path.expanduser(str(path))).resolve())


def _files(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def setup_paths(cfg: DictConfig) -> None:
    """Make ``paths.*`` absolute and export the shared-data location for subprocesses."""
    cfg.paths.artifacts = _abs(cfg.paths.artifacts)
    if cfg.paths.get("shared"):
        os.environ["RECIPE_SHARED_DIR"] = _abs(cfg.paths.shared)


def prepare_data(cfg: DictConfig) -> None:
    """Convert missing ``${paths.data}/<dataset>/<split>.parquet`` files with :mod:`recipe.data`.

    Raises:
        FileNotFoundError: naming the config key and file, when a data file is missing and
            is not one this project can prepare.
    """
    from recipe import data as data_mod

    data_root = Path(cfg.paths.data).resolve()
    for key in ("train_files", "val_files"):
        for f in _files(cfg.data.get(key)):
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


def check_config(cfg: DictConfig) -> None:
    """Start-up checks that verl does not make itself, each naming the keys at fault.

    Raises:
        ConfigError: on an incompatible setting.
    """
    rollout = cfg.actor_rollout_ref.rollout
    if rollout.name == "hf" and cfg.trainer.device != "cpu":
        raise ConfigError(
            f"trainer.device={cfg.trainer.device}: actor_rollout_ref.rollout.name=hf is the CPU-only rollout; "
            "use actor_rollout_ref.rollout.name=vllm (device=gpu sets it)"
        )
    if cfg.trainer.device == "cpu" and rollout.name in ("vllm", "sglang", "trtllm"):
        raise ConfigError(
            f"trainer.device=cpu: actor_rollout_ref.rollout.name={rollout.name} needs a GPU; "
            "on CPU use actor_rollout_ref.rollout.name=hf (device=cpu sets it)"
        )
    gf = cfg.get("group_filter") or {}
    filter_on = bool(gf.get("drop_all_correct") or gf.get("drop_all_wrong") or gf.get("band") is not None)
    if filter_on and rollout.n < 2:
        raise ConfigError(
            "group_filter (drop_all_correct / drop_all_wrong / band) needs groups of several responses: "
            f"actor_rollout_ref.rollout.n={rollout.n}; set it >= 2 or turn the filter off"
        )
    sampler = cfg.trainer.v1.get("sampler", {})
    custom = (sampler.get("custom_sampler") or {}).get("path")
    if custom and (cfg.algorithm.get("filter_groups") or {}).get("enable", False):
        raise ConfigError(
            "algorithm.filter_groups.enable=true is verl's DAPO filter, which verl ignores with a custom sampler "
            f"(trainer.v1.sampler.custom_sampler.path={custom}); use group_filter.mode=refill instead"
        )
    if cfg.algorithm.adv_estimator == "grpo" and rollout.n < 2:
        raise ConfigError(
            "algorithm.adv_estimator=grpo needs groups: set actor_rollout_ref.rollout.n >= 2 "
            f"(got {rollout.n})"
        )


def configure_replay(cfg: DictConfig) -> None:
    """Settings rollout replay needs from verl (``replay.enable``), each named on failure.

    - ``data.gen_batch_size``: the fresh prompts of a step (``round(delta * B)``) and a full
      batch (``B``) are fetched in whole ``gen_batch_size`` chunks; null becomes their gcd.
    - ``replay.correction=decoupled`` runs through verl's ``algorithm.rollout_correction``
      (token-level IS weight pi_old / mu times PPO-clip): ``rollout_is`` becomes ``token``
      and ``rollout_is_threshold`` the truncation (``inf`` for none),
      unless ``rollout_is`` was set explicitly; it needs
      ``actor_rollout_ref.rollout.calculate_log_probs=true``.

    Raises:
        ConfigError: on an incompatible setting.
    """
    rp = cfg.get("replay") or {}
    if not rp.get("enable", False):
        return
    from recipe.algos.replay import ReplayConfig, fresh_count

    try:
        rcfg = ReplayConfig.from_config(rp)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    batch = int(cfg.data.train_batch_size)
    n_fresh = fresh_count(rcfg.fresh_fraction, batch)
    gen = cfg.data.get("gen_batch_size", None)
    with open_dict(cfg):
        if gen is None:
            cfg.data.gen_batch_size = math.gcd(batch, n_fresh)
        elif n_fresh % int(gen) or batch % int(gen):
            raise ConfigError(
                f"replay.fresh_fraction={rcfg.fresh_fraction} gives {n_fresh} fresh prompts of "
                f"data.train_batch_size={batch}; data.gen_batch_size={gen} must divide both (null: automatic)"
            )
        if rcfg.correction == "decoupled":
            rc = cfg.algorithm.rollout_correction
            if not cfg.actor_rollout_ref.rollout.get("calculate_log_probs", False):
                raise ConfigError(
                    "replay.correction=decoupled needs the rollout's log-probs: "
                    "set actor_rollout_ref.rollout.calculate_log_probs=true"
                )
            if rc.get("bypass_mode", False):
                raise ConfigError(
                    "replay.correction=decoupled recomputes pi_old: algorithm.rollout_correction.bypass_mode must be false"
                )
            if rc.get("rollout_is") is None:
                rc.rollout_is = "token"
                rc.rollout_is_threshold = float(rcfg.truncation) if rcfg.truncation else float("inf")


def configure_preference(cfg: DictConfig) -> None:
    """Settings iterative DPO / LoRR (``preference.enable``) need from verl, each named on failure.

    Raises:
        ConfigError: on an invalid ``preference`` / ``lorr`` node or an incompatible setting.
    """
    pref = cfg.get("preference") or {}
    if not pref.get("enable", False):
        return
    from recipe.algos.preference import LorrConfig, PreferenceConfig

    try:
        pcfg = PreferenceConfig.from_config(pref)
        LorrConfig.from_config(cfg.get("lorr"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    actor = cfg.actor_rollout_ref.actor
    sampler = cfg.trainer.v1.sampler.get("custom_sampler") or {}
    if sampler.get("name") != "PreferencePairSampler":
        raise ConfigError(
            "preference.enable=true needs the pair sampler: trainer.v1.sampler.custom_sampler.path="
            f"pkg://recipe.preference name=PreferencePairSampler (got {sampler.get('name')}; recipe=iterative_dpo sets it)"
        )
    if (cfg.get("replay") or {}).get("enable", False):
        raise ConfigError("preference.enable=true and replay.enable=true: rollout replay is for policy-gradient "
                          "recipes; LoRR's replay is lorr.replays")
    if cfg.actor_rollout_ref.rollout.n < 2:
        raise ConfigError(f"preference pairs need groups: actor_rollout_ref.rollout.n={cfg.actor_rollout_ref.rollout.n};"
                          " set it >= 2")
    if actor.get("shuffle", False):
        raise ConfigError("preference.enable=true: actor_rollout_ref.actor.shuffle must be false "
                          "(pairs sit in consecutive rows)")
    if pcfg.needs_reference and not actor.use_kl_loss and not cfg.algorithm.get("use_kl_in_reward", False):
        raise ConfigError(f"preference.loss={pcfg.loss} needs a reference model: set "
                          "actor_rollout_ref.actor.use_kl_loss=true (verl builds its reference worker then; "
                          "the KL term itself is replaced by the preference loss)")
    lora = (cfg.actor_rollout_ref.model.get("lora") or {}).get("rank", 0) or cfg.actor_rollout_ref.model.get(
        "lora_rank", 0)
    if pcfg.needs_reference and pcfg.reference == "iteration_start" and lora:
        raise ConfigError("preference.reference=iteration_start refreshes a separate reference model; with LoRA "
                          "(actor_rollout_ref.model.lora.rank > 0) the reference is the base model: "
                          "use preference.reference=initial")
    if int(actor.get("ppo_epochs", 1)) != 1:
        logger.warning("actor_rollout_ref.actor.ppo_epochs=%s is not used by preference recipes "
                       "(passes over the pairs: lorr.replays)", actor.ppo_epochs)


def setup_metrics_file(cfg: DictConfig) -> str:
    """Point verl's ``file`` logger at ``metrics_file`` (appended to on resume)."""
    path = _abs(cfg.metrics_file)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    os.environ["VERL_FILE_LOGGER_PATH"] = path
    add_ray_env(cfg, VERL_FILE_LOGGER_PATH=path)
    return path


def run(cfg: DictConfig) -> None:
    """Prepare, patch and run verl's V1 PPO trainer with ``cfg``."""
    setup_paths(cfg)
    check_config(cfg)
    configure_replay(cfg)
    configure_preference(cfg)
    prepare_data(cfg)
    prepare_model(cfg)
    setup_device(cfg)
    metrics_path = setup_metrics_file(cfg)
    print(f"[recipe] run dir: {_abs(cfg.trainer.default_local_dir)}  metrics: {metrics_path}", flush=True)

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
    from recipe.trainer import RecipeTaskRunner

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
