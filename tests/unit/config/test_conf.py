"""Tests of the Hydra configs (conf/) and the start-up checks on them: recipe.config.check_config
and recipe.main.prepare_data (recipe.config's nodes: test_nodes.py; configure_replay,
check_stages and the sampler: test_startup.py).

Every yaml under conf/ is composed the way ``python -m recipe.main`` composes it (verl's
own ``ppo_trainer`` through ``pkg://verl.trainer.config`` plus this project's groups) and
fully resolved, including ``${hydra:runtime.choices.*}``.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import hydra
import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from recipe import data as rd
from recipe.config import ConfigError, check_config
from recipe.main import prepare_data

REPO_ROOT = Path(__file__).resolve().parents[3]
CONF_DIR = REPO_ROOT / "conf"
# conf/eval.yaml and conf/eval/ are python -m recipe.eval's own config (tests/unit/tools/test_eval.py)
EVAL_YAMLS = {CONF_DIR / "eval.yaml", *(CONF_DIR / "eval").rglob("*.yaml")}
YAML_FILES = sorted(p for p in CONF_DIR.rglob("*.yaml") if p not in EVAL_YAMLS)
# every recipe of conf/recipe/ (a new yaml is tested without editing this file)
RECIPES = sorted(p.stem for p in (CONF_DIR / "recipe").glob("*.yaml"))
# conf/config.yaml's defaults list (checked in test_default_config)
DEFAULT_CHOICES = {"data": "gsm8k", "model": "tiny", "recipe": "grpo", "device": "cpu"}
DEFAULT_OVERRIDES = {f"{k}={v}" for k, v in DEFAULT_CHOICES.items()}


def _context(p: Path) -> list[str]:
    """Overrides a group file is composed with: data files and GPU-only models on device=gpu.

    device=cpu (the default) deliberately resizes data.* (and DOTS reference rounds) for the
    CPU, and the hub models are marked "GPU only" in their headers.
    """
    if p.parent == CONF_DIR or p.parent.name == "data" or (p.parent.name == "model" and "GPU only" in p.read_text()):
        return ["device=gpu"]
    return []


def _rel(p: Path) -> str:
    return p.relative_to(CONF_DIR).as_posix()


def _override(p: Path) -> list[str]:
    """``conf/<group>/<name>.yaml`` -> ``["<group>=<name>"]``; the primary config -> []."""
    if p.parent == CONF_DIR:
        return []
    rel = p.relative_to(CONF_DIR).with_suffix("").as_posix()
    if rel.startswith("experiment/"):  # presets are appended: +experiment=minimalist/<name>
        return [f"+experiment={rel[len('experiment/'):]}"]
    return [f"{p.parent.relative_to(CONF_DIR).as_posix()}={p.stem}"]


def _is_experiment(p: Path) -> bool:
    return _rel(p).startswith("experiment/")


def _flatten(node, prefix: str = "") -> dict:
    out = {}
    if isinstance(node, dict):
        if not node and prefix:
            out[prefix] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = node
    return out


def _group(p: Path) -> str:
    """The Hydra group of a file, its key in ``hydra.runtime.choices``: ``data``, ``hydra/launcher``."""
    return p.parent.relative_to(CONF_DIR).as_posix()


def _own_leaves(p: Path) -> dict:
    """The leaves a yaml file sets, as dotted keys of the composed config (unresolved).

    A group file's keys live under its package: ``# @package _global_`` at the root,
    ``# @package hydra.launcher`` under ``hydra.launcher``, otherwise under the group name.
    """
    raw = OmegaConf.to_container(OmegaConf.load(p), resolve=False)
    raw.pop("defaults", None)
    package = re.search(r"^# @package (\S+)", p.read_text(), re.M)
    package = package.group(1) if package else p.parent.name
    if not package.startswith("hydra"):
        raw.pop("hydra", None)
    if package != "_global_" and p.parent != CONF_DIR:
        for part in reversed(package.split(".")):
            raw = {part: raw}
    return _flatten(raw)


@pytest.fixture(scope="module")
def composer():
    """``compose(*overrides)`` -> a fresh copy of the composed config (hydra node included).

    Also exposes ``composer.verl_default``: verl's own ``ppo_trainer``, composed alone, and
    ``composer.verl_missing``: its keys left ``???``.
    """
    with hydra.initialize_config_module(config_module="verl.trainer.config", version_base=None):
        verl_default = hydra.compose("ppo_trainer")
    cache: dict[tuple, DictConfig] = {}
    with hydra.initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):

        def compose(*overrides: str) -> DictConfig:
            # choosing a default is the same config: compose it once (composing is slow)
            key = tuple(sorted(o for o in overrides if o not in DEFAULT_OVERRIDES))
            if key not in cache:
                cache[key] = hydra.compose("config", overrides=list(overrides), return_hydra_config=True)
            return copy.deepcopy(cache[key])

        compose.verl_default = verl_default
        compose.verl_missing = OmegaConf.missing_keys(verl_default)
        yield compose
    HydraConfig.instance().cfg = None


def resolve(cfg: DictConfig) -> tuple[DictConfig, dict]:
    """Resolve a composed config the way a Hydra app sees it; returns (cfg, hydra choices).

    ``${hydra:...}`` needs the Hydra config registered (what ``@hydra.main`` does); the
    ``hydra`` node itself has run-time-only values (``hydra.job.num``), so it is removed
    before resolving everything else.
    """
    HydraConfig.instance().set_config(cfg)
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices)
    run_dir = OmegaConf.select(cfg, "hydra.run.dir")
    with open_dict(cfg):
        del cfg["hydra"]
    OmegaConf.resolve(cfg)
    choices["_run_dir"] = run_dir
    return cfg, choices


# --------------------------------------------------------------------------------------
# every yaml composes and resolves
# --------------------------------------------------------------------------------------
def test_conf_tree_is_what_the_tests_expect():
    assert "grpo" in RECIPES and len(RECIPES) >= 2
    names = {_rel(p) for p in YAML_FILES}
    for expected in ("config.yaml", "data/gsm8k.yaml", "data/math.yaml", "device/cpu.yaml", "device/gpu.yaml",
                     "model/tiny.yaml", "model/tiny_qwen.yaml", "recipe/grpo.yaml"):
        assert expected in names


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_every_yaml_composes_and_resolves(composer, path):
    cfg = composer(*_override(path), *_context(path))
    unresolved = _flatten(OmegaConf.to_container(cfg, resolve=False))
    cfg, choices = resolve(cfg)
    OmegaConf.to_container(cfg, resolve=True)  # nothing left that cannot resolve

    # the file's own values are the ones composed (compared before interpolation)
    for key, value in _own_leaves(path).items():
        assert key in unresolved, f"{_rel(path)}: {key} missing from the composed config"
        assert unresolved[key] == value, f"{_rel(path)}: {key} = {unresolved[key]!r}, the file says {value!r}"

    # the group choice is the one asked for, and names the experiment
    if _is_experiment(path):
        assert choices["experiment"] == _override(path)[0].split("=", 1)[1]
        # presets name their own experiment (checked with the file's values above)
    elif path.parent != CONF_DIR:
        assert choices[_group(path)] == path.stem
    if not _is_experiment(path):
        assert cfg.trainer.experiment_name == f"{choices['recipe']}_{choices['data']}_{choices['model']}"
    assert cfg.trainer.default_local_dir.endswith(f"runs/{cfg.trainer.experiment_name}")
    assert choices["_run_dir"].startswith(f"{cfg.paths.runs}/{cfg.trainer.experiment_name}/hydra/")
    assert cfg.metrics_file == f"{cfg.trainer.default_local_dir}/metrics.jsonl"

    # no mandatory value left open beyond the ones verl's own defaults leave open
    missing = OmegaConf.missing_keys(cfg)
    assert missing <= composer.verl_missing, missing - composer.verl_missing
    assert "actor_rollout_ref.rollout.name" not in missing


_COMMAND = re.compile(r"(\./run\.sh|python -m \S+)")


@pytest.mark.parametrize("path", YAML_FILES, ids=_rel)
def test_every_yaml_starts_with_its_command(path):
    """Style rule: every config file starts with (a comment holding) the command that runs it."""
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert header, f"{_rel(path)} does not start with a comment"
    commands = [line for line in header if _COMMAND.search(line)]
    assert commands, f"{_rel(path)}: no `./run.sh ...` / `python -m ...` command in its leading comment"
    if path.parent != CONF_DIR:
        choice = _override(path)[0]
        assert any(choice in line for line in commands), f"{_rel(path)}: the command does not select {choice}"


def test_group_values(composer):
    cfg, _ = resolve(composer("data=math", "device=gpu"))
    assert cfg.data.train_files.endswith("math/train.parquet")
    assert cfg.data.val_files.endswith("math500/test.parquet")
    assert cfg.data.train_files.startswith(cfg.paths.data)
    assert cfg.data.max_response_length == 1024

    cfg, _ = resolve(composer("device=cpu"))
    assert cfg.actor_rollout_ref.rollout.name == "hf"
    assert cfg.trainer.device == "cpu"
    assert cfg.actor_rollout_ref.actor.strategy == "fsdp2"
    assert cfg.actor_rollout_ref.ref.strategy == "fsdp2"
    assert cfg.actor_rollout_ref.actor.fsdp_config.dtype == "float32"
    assert cfg.trainer.use_v1 is True

    cfg, _ = resolve(composer("device=gpu"))
    assert cfg.actor_rollout_ref.rollout.name == "vllm"
    assert cfg.trainer.device == "cuda"
    assert cfg.actor_rollout_ref.actor.strategy == "fsdp2"

    cfg, _ = resolve(composer("model=tiny_qwen"))
    assert "qwen2.5" in cfg.actor_rollout_ref.model.path
    assert cfg.actor_rollout_ref.model.path.startswith(cfg.paths.models)

    cfg, _ = resolve(composer("recipe=grpo"))
    assert cfg.algorithm.adv_estimator == "grpo"
    assert cfg.actor_rollout_ref.actor.clip_ratio == 0.2
    assert cfg.actor_rollout_ref.rollout.n >= 2


def test_default_config(composer):
    cfg, choices = resolve(composer())
    assert {k: choices[k] for k in DEFAULT_CHOICES} == DEFAULT_CHOICES
    assert cfg.trainer.experiment_name == "grpo_gsm8k_tiny"
    assert cfg.data.train_files.endswith("gsm8k/train.parquet")
    # device=cpu comes after data= in the defaults list, so its CPU sizes win
    assert cfg.data.train_batch_size == 4
    assert cfg.data.max_response_length == 128
    assert cfg.reward.custom_reward_function.path == "pkg://recipe.reward.math_reward"
    assert cfg.trainer.v1.trainer_mode == "recipe_sync"


def test_verl_defaults_untouched_unless_set_here(composer):
    """Every verl key that no yaml of the default composition sets keeps verl's value."""
    ours = _flatten(OmegaConf.to_container(composer(), resolve=False))
    verl = _flatten(OmegaConf.to_container(composer.verl_default, resolve=False))
    touched = set()
    for p in (CONF_DIR / "config.yaml", CONF_DIR / "data/gsm8k.yaml", CONF_DIR / "model/tiny.yaml",
              CONF_DIR / "recipe/grpo.yaml", CONF_DIR / "device/cpu.yaml"):
        touched |= set(_own_leaves(p))

    def is_touched(key: str) -> bool:
        return any(t == key or t.startswith(key + ".") or key.startswith(t + ".") for t in touched)

    changed = {k: (verl[k], ours.get(k)) for k in verl if not is_touched(k) and ours.get(k, object()) != verl[k]}
    assert not changed, f"verl defaults changed by no yaml of ours: {changed}"
    # a few by name
    assert ours["actor_rollout_ref.actor.clip_ratio_c"] == verl["actor_rollout_ref.actor.clip_ratio_c"] == 3.0
    assert ours["algorithm.gamma"] == 1.0
    assert ours["data.prompt_key"] == "prompt"


# --------------------------------------------------------------------------------------
# verl's own validation
# --------------------------------------------------------------------------------------
def _validate(cfg: DictConfig) -> None:
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg), use_critic=need_critic(cfg))


@pytest.mark.filterwarnings("ignore:Disabled critic")
@pytest.mark.parametrize(
    "overrides",
    [(), ("device=gpu", "data=math"), ("device=gpu", "model=qwen2.5_math_1.5b"),
     *[(f"recipe={r}",) for r in RECIPES if f"recipe={r}" not in DEFAULT_OVERRIDES],
     ("recipe=ppo", "device=gpu")],
    ids=["default", "gpu_math", "gpu_qwen", *[r for r in RECIPES if f"recipe={r}" not in DEFAULT_OVERRIDES],
         "ppo_gpu"],
)
def test_verl_validate_config_passes(composer, overrides, tmp_path_factory):
    """verl's own checks, which also build the actor (and critic) config dataclasses."""
    from verl.utils.config import omega_conf_to_dataclass

    if "recipe=ppo" in overrides:  # the critic's config loads its model: give it a real one
        from recipe.models import build_tiny_model

        model = build_tiny_model(tmp_path_factory.mktemp("m") / "tiny", vocab_size=512, max_train_rows=100)
        overrides = (*overrides, f"actor_rollout_ref.model.path={model}")
    cfg, _ = resolve(composer(*overrides))
    check_config(cfg)
    _validate(cfg)
    # every worker config instantiates (unknown keys would fail here, not in a Ray worker)
    omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
    if cfg.critic.get("enable"):
        # the critic's dataclass loads its model from disk: check its keys and engine config instead
        import dataclasses

        from hydra.utils import get_class

        fields = {f.name for f in dataclasses.fields(get_class(cfg.critic._target_))}
        assert set(cfg.critic.keys()) - {"_target_"} <= fields, set(cfg.critic.keys()) - fields
        omega_conf_to_dataclass(cfg.critic.fsdp)


@pytest.mark.filterwarnings("ignore:Disabled critic")
def test_verl_validate_config_is_a_real_check(composer):
    """Control: the same call rejects a batch that does not divide over 8 GPUs."""
    cfg, _ = resolve(composer("device=gpu"))
    cfg.data.train_batch_size = 1
    cfg.actor_rollout_ref.rollout.n = 2
    with pytest.raises(AssertionError, match="real_train_batch_size"):
        _validate(cfg)


# --------------------------------------------------------------------------------------
# recipe.config.check_config
# --------------------------------------------------------------------------------------
def test_check_config_accepts_defaults(composer):
    check_config(composer())
    check_config(composer("device=gpu"))


def test_check_config_vllm_on_cpu(composer):
    cfg = composer()
    cfg.actor_rollout_ref.rollout.name = "vllm"
    with pytest.raises(ConfigError, match=r"actor_rollout_ref\.rollout\.name=vllm") as exc:
        check_config(cfg)
    assert "hf" in str(exc.value)


def test_check_config_hf_on_gpu(composer):
    cfg = composer("device=gpu")
    cfg.actor_rollout_ref.rollout.name = "hf"
    with pytest.raises(ConfigError, match=r"actor_rollout_ref\.rollout\.name=hf") as exc:
        check_config(cfg)
    assert "vllm" in str(exc.value)


def test_check_config_grpo_needs_groups(composer):
    cfg = composer()
    cfg.actor_rollout_ref.rollout.n = 1
    with pytest.raises(ConfigError) as exc:
        check_config(cfg)
    msg = str(exc.value)
    assert "algorithm.adv_estimator=grpo" in msg and "actor_rollout_ref.rollout.n" in msg and "got 1" in msg


def test_recipe_group_overrides_config_defaults(composer):
    """A recipe's group_filter wins over conf/config.yaml's defaults (defaults-list order)."""
    cfg, _ = resolve(composer("recipe=reinforce_rej"))
    assert cfg.group_filter.drop_all_correct and cfg.group_filter.drop_all_wrong
    assert cfg.trainer.v1.sampler.sampler_kwargs.group_filter.drop_all_wrong is True
    assert cfg.algorithm.adv_estimator == "reinforce_rej"
    assert cfg.reward.custom_reward_function.reward_kwargs.incorrect_reward == -1.0
    cfg, _ = resolve(composer("recipe=ppo"))
    assert cfg.algorithm.adv_estimator == "gae" and cfg.critic.enable and cfg.actor_rollout_ref.rollout.n == 1
    assert cfg.critic.model.path == cfg.actor_rollout_ref.model.path


def test_check_config_filter_needs_groups(composer):
    cfg = composer("recipe=reinforce_rej")
    cfg.actor_rollout_ref.rollout.n = 1
    with pytest.raises(ConfigError) as exc:
        check_config(cfg)
    msg = str(exc.value)
    assert "group_filter" in msg and "actor_rollout_ref.rollout.n=1" in msg


def test_check_config_rejects_verl_dapo_with_custom_sampler(composer):
    cfg = composer()
    with open_dict(cfg):
        cfg.algorithm.filter_groups = {"enable": True, "metric": "acc"}
    with pytest.raises(ConfigError, match=r"algorithm\.filter_groups\.enable.*group_filter\.mode=refill"):
        check_config(cfg)


# --------------------------------------------------------------------------------------
# recipe.main.prepare_data
# --------------------------------------------------------------------------------------
def _data_cfg(composer, data_dir: Path) -> DictConfig:
    cfg = composer()
    cfg.paths.data = str(data_dir)
    cfg, _ = resolve(cfg)
    return cfg


def test_prepare_data_builds_missing_gsm8k(composer, tmp_path):
    data_dir = tmp_path / "data"
    cfg = _data_cfg(composer, data_dir)
    train, val = Path(cfg.data.train_files), Path(cfg.data.val_files)
    assert train == data_dir / "gsm8k" / "train.parquet" and not train.exists()
    prepare_data(cfg)
    assert rd.validate_verl_parquet(train) == 7473
    assert rd.validate_verl_parquet(val) == 1319
    mtime = train.stat().st_mtime_ns
    prepare_data(cfg)  # present: left alone
    assert train.stat().st_mtime_ns == mtime


def test_prepare_data_missing_file_outside_data_dir(composer, tmp_path):
    cfg = _data_cfg(composer, tmp_path / "data")
    outside = tmp_path / "elsewhere" / "gsm8k" / "train.parquet"
    cfg.data.train_files = str(outside)
    with pytest.raises(FileNotFoundError) as exc:
        prepare_data(cfg)
    assert "data.train_files" in str(exc.value) and str(outside.resolve()) in str(exc.value)
    assert not outside.exists()


def test_prepare_data_names_val_files_and_unknown_datasets(composer, tmp_path):
    data_dir = tmp_path / "data"
    cfg = _data_cfg(composer, data_dir)
    cfg.data.train_files = str(data_dir / "no_such_dataset" / "train.parquet")
    with pytest.raises(FileNotFoundError, match="data.train_files"):
        prepare_data(cfg)

    (tmp_path / "given.parquet").write_bytes(b"")
    cfg.data.train_files = str(tmp_path / "given.parquet")  # exists: not checked further
    cfg.data.val_files = [str(tmp_path / "missing_val.parquet")]
    with pytest.raises(FileNotFoundError) as exc:
        prepare_data(cfg)
    assert "data.val_files" in str(exc.value) and "missing_val.parquet" in str(exc.value)


def test_prepare_data_disabled(composer, tmp_path):
    cfg = _data_cfg(composer, tmp_path / "data")
    cfg.prepare.data = False
    with pytest.raises(FileNotFoundError, match="data.train_files"):
        prepare_data(cfg)
    assert not (tmp_path / "data").exists()


def test_top_level_seed_feeds_every_seed(composer):
    """``seed=N`` alone pairs benchmark runs (benchmarks/runs.py passes only it)."""
    cfg = composer("seed=7", "recipe=grpo_dots_rr")
    got = {k: OmegaConf.select(cfg, k) for k in (
        "data.seed", "actor_rollout_ref.rollout.seed", "actor_rollout_ref.actor.data_loader_seed",
        "replay.seed", "dots.seed", "preference.seed")}
    assert got == dict.fromkeys(got, 7)
