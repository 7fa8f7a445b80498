"""Start-up settings and checks on composed configs, before Ray starts: recipe.config's
configure_replay (what rollout replay needs from verl), recipe.main.check_stages (every
node, the cross-node rules, each enabled stage's own check, out-of-tree stages included)
and the one sampler every recipe uses.
"""

from __future__ import annotations

import contextlib
import copy
import math
import sys
import textwrap
from pathlib import Path

import hydra
import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

import recipe.stages.base as base
from recipe.config import ConfigError, configure_preference, configure_replay
from recipe.main import check_stages as main_check_stages
from recipe.stages.base import Stage, enabled_stage_classes, extra_modules, register_stage

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"
RECIPES = sorted(p.stem for p in (CONF_DIR / "recipe").glob("*.yaml"))


# ----------------------------------------------------------------------------- configure_replay
@pytest.fixture(scope="module")
def composed():
    """Composed configs (unresolved, as recipe.main.run sees them, with the ``hydra`` node
    that ``${hydra:...}`` interpolations read): default, grpo_dots_rr, and every recipe of
    conf/recipe/ under ``recipe/<name>``."""
    out = {}
    with hydra.initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        out["default"] = hydra.compose("config", return_hydra_config=True)
        out["dots_rr"] = hydra.compose("config", overrides=["recipe=grpo_dots_rr"], return_hydra_config=True)
        out["dots_rr_c2"] = hydra.compose("config", overrides=["recipe=grpo_dots_rr", "replay.truncation=2"],
                                          return_hydra_config=True)
        for name in RECIPES:
            out[f"recipe/{name}"] = hydra.compose("config", overrides=[f"recipe={name}"], return_hydra_config=True)
    return out


def _cfg(composed, name="dots_rr", **edits):
    cfg = copy.deepcopy(composed[name])
    with open_dict(cfg):
        for key, value in edits.items():
            OmegaConf.update(cfg, key.replace("__", "."), value, force_add=True)
    return cfg


def test_configure_replay_off_leaves_config_untouched(composed):
    cfg = _cfg(composed, "default")
    assert cfg.replay.enable is False
    before = OmegaConf.to_container(cfg, resolve=False)
    configure_replay(cfg)
    assert OmegaConf.to_container(cfg, resolve=False) == before
    assert cfg.data.get("gen_batch_size") is None and cfg.algorithm.rollout_correction.rollout_is is None


def test_configure_replay_grpo_dots_rr(composed):
    cfg = _cfg(composed)
    assert cfg.data.train_batch_size == 4 and cfg.data.get("gen_batch_size") is None
    configure_replay(cfg)
    assert cfg.data.gen_batch_size == 2  # gcd(B=4, round(0.5 * 4) = 2)
    rc = cfg.algorithm.rollout_correction
    assert rc.rollout_is == "token" and rc.rollout_is_threshold == math.inf
    # the sampler's kwargs follow the interpolation
    assert OmegaConf.select(cfg, "trainer.v1.sampler.sampler_kwargs.gen_batch_size") == 2


@pytest.mark.parametrize("batch,delta,gen", [(6, 0.5, 3), (8, 0.25, 2), (5, 0.5, 1), (4, 1.0, 4)])
def test_configure_replay_gen_batch_size_is_gcd(composed, batch, delta, gen):
    cfg = _cfg(composed, data__train_batch_size=batch, replay__fresh_fraction=delta, replay__capacity_ratio=4.0)
    configure_replay(cfg)
    assert cfg.data.gen_batch_size == gen


@pytest.mark.parametrize("edits,named", [
    # B = 8, delta 0.25: 2 fresh, 6 replayed; C = 2 x 2 = 4 cannot hold them
    ({"data__train_batch_size": 8, "replay__fresh_fraction": 0.25},
     r"^replay\.capacity_ratio=2\.0 x 2 fresh groups = 4 cannot hold the 6 replayed groups of a step"),
    ({"replay__capacity": 1, "replay__capacity_ratio": None}, r"^replay\.capacity=1 cannot hold the 2 replayed groups"),
    ({"replay__capacity": 8}, r"replay\.capacity=8 and replay\.capacity_ratio=2\.0 are both set"),
    ({"replay__capacity_ratio": None}, r"replay\.capacity and replay\.capacity_ratio are both null"),
    ({"replay__correction": "plain", "replay__correction_rows": "all"},
     r"replay\.correction_rows=all .* needs replay\.correction=decoupled"),
    ({"algorithm__rollout_correction__rollout_is_batch_normalize": True},
     r"replay\.correction_rows=replayed .*rollout_is_batch_normalize=true"),
])
def test_configure_replay_capacity_and_rows_errors(composed, edits, named):
    with pytest.raises(ConfigError, match=named):
        configure_replay(_cfg(composed, **edits))
    configure_replay(_cfg(composed, replay__capacity=2, replay__capacity_ratio=None))  # C = the 2 replayed: fine


def test_configure_replay_truncation_sets_threshold(composed):
    cfg = _cfg(composed, "dots_rr_c2")
    configure_replay(cfg)
    assert cfg.algorithm.rollout_correction.rollout_is == "token"
    assert cfg.algorithm.rollout_correction.rollout_is_threshold == 2.0


def test_configure_replay_plain_leaves_rollout_correction(composed):
    cfg = _cfg(composed, replay__correction="plain", actor_rollout_ref__rollout__calculate_log_probs=False)
    configure_replay(cfg)
    assert cfg.algorithm.rollout_correction.rollout_is is None
    assert cfg.algorithm.rollout_correction.rollout_is_threshold == composed["dots_rr"].algorithm.rollout_correction \
        .rollout_is_threshold
    assert cfg.data.gen_batch_size == 2


def test_configure_replay_keeps_explicit_rollout_is(composed):
    cfg = _cfg(composed, algorithm__rollout_correction__rollout_is="sequence",
               algorithm__rollout_correction__rollout_is_threshold=5.0)
    configure_replay(cfg)
    assert cfg.algorithm.rollout_correction.rollout_is == "sequence"
    assert cfg.algorithm.rollout_correction.rollout_is_threshold == 5.0


def test_configure_replay_explicit_gen_batch_size(composed):
    ok = _cfg(composed, data__gen_batch_size=1)
    configure_replay(ok)
    assert ok.data.gen_batch_size == 1
    with pytest.raises(ConfigError, match=r"data\.gen_batch_size=3 must divide both"):
        configure_replay(_cfg(composed, data__gen_batch_size=3))


@pytest.mark.parametrize("edits,named", [
    ({"actor_rollout_ref__rollout__calculate_log_probs": False}, r"actor_rollout_ref\.rollout\.calculate_log_probs"),
    ({"algorithm__rollout_correction__bypass_mode": True}, r"algorithm\.rollout_correction\.bypass_mode"),
    ({"replay__foo": 1}, r"replay\.foo"),
    ({"replay__capacity": 0}, r"replay\.capacity"),
    ({"replay__truncation": 0.5}, r"replay\.truncation"),
    ({"replay__correction": "ppo"}, r"replay\.correction"),
])
def test_configure_replay_errors_name_the_key(composed, edits, named):
    with pytest.raises(ConfigError, match=named):
        configure_replay(_cfg(composed, **edits))


# ----------------------------------------------------------------------------- check_stages
@contextlib.contextmanager
def hydra_app(cfg):
    """What ``@hydra.main`` provides: the Hydra config that ``${hydra:runtime.choices.*}``
    (in ``trainer.experiment_name``, hence ``dots.rounds_file``) resolves from."""
    HydraConfig.instance().set_config(cfg)
    try:
        yield cfg
    finally:
        HydraConfig.instance().cfg = None


def check_stages(cfg) -> None:
    """recipe.main.check_stages inside a Hydra app."""
    with hydra_app(cfg):
        main_check_stages(cfg)


@pytest.mark.parametrize("name", RECIPES)
def test_check_stages_accepts_every_recipe(composed, name):
    cfg = _cfg(composed, f"recipe/{name}")
    check_stages(cfg)
    with hydra_app(cfg):
        enabled = {cls.name for cls in enabled_stage_classes(cfg)}
    assert "reward_metrics" in enabled  # always on
    assert ("rollout_replay" in enabled) == bool(cfg.replay.enable)
    assert ("dots" in enabled) == bool(cfg.dots.enable)
    assert ("preference" in enabled) == bool(cfg.preference.enable)


@pytest.mark.parametrize("edits,named", [
    ({"dots__evry": 1}, r"^unknown option\(s\) dots\.evry; known: \["),
    ({"lorr__reset__alpha": 2.0}, r"^lorr\.reset\.alpha must be a number in \[0, 1\], got 2\.0$"),
    ({"group_filter__mode": "resample"}, r"^group_filter\.mode must be one of \('drop', 'refill'\), got 'resample'$"),
    ({"actor_rollout_ref__rollout__n": 1}, r"algorithm\.adv_estimator=grpo"),
    ({"replay__capacity": 0}, r"^replay\.capacity must be an integer > 0 or null, got 0$"),
])
def test_check_stages_errors_name_the_key(composed, edits, named):
    with pytest.raises(ConfigError, match=named):
        check_stages(_cfg(composed, **edits))


def test_check_stages_preference_rules(composed):
    check_stages(_cfg(composed, "recipe/lorr_dpo"))
    with pytest.raises(ConfigError, match=r"preference\.enable=true and replay\.enable=true"):
        check_stages(_cfg(composed, "recipe/iterative_dpo", replay__enable=True))
    with pytest.raises(ConfigError, match=r"actor_rollout_ref\.actor\.shuffle must be false"):
        check_stages(_cfg(composed, "recipe/iterative_dpo", actor_rollout_ref__actor__shuffle=True))
    with pytest.raises(ConfigError, match=r"actor_rollout_ref\.actor\.use_kl_loss=true"):
        check_stages(_cfg(composed, "recipe/iterative_dpo", actor_rollout_ref__actor__use_kl_loss=False))
    # simpo is reference-free: no reference model needed
    check_stages(_cfg(composed, "recipe/iterative_dpo", preference__loss="simpo",
                      actor_rollout_ref__actor__use_kl_loss=False))


def test_configure_preference_no_longer_checks_the_sampler(composed):
    """One sampler for every recipe: a preference recipe runs with the config's sampler as is."""
    cfg = _cfg(composed, "recipe/iterative_dpo")
    before = OmegaConf.to_container(cfg.trainer.v1.sampler, resolve=False)
    configure_preference(cfg)
    assert OmegaConf.to_container(cfg.trainer.v1.sampler, resolve=False) == before


@pytest.fixture
def private_registry(monkeypatch):
    """A copy of the stage registry for this test (stages registered here vanish after it)."""
    monkeypatch.setattr(base, "STAGES", dict(base.STAGES))
    return base.STAGES


def test_check_stages_runs_each_enabled_stage_check_including_extra_modules(composed, private_registry, tmp_path,
                                                                          monkeypatch):
    module = "recipe_unit_extra_stage"
    (tmp_path / f"{module}.py").write_text(textwrap.dedent("""
        from recipe.config import ConfigError
        from recipe.stages.base import Stage, register_stage

        CHECKED = []


        @register_stage
        class ExtraStage(Stage):
            name = "unit_extra"

            @classmethod
            def enabled(cls, cfg, config):
                return bool(config.get("unit_extra", {}).get("on", False))

            @classmethod
            def check_config(cls, config):
                CHECKED.append(config.unit_extra.level)
                if config.unit_extra.level > 1:
                    raise ConfigError(f"unit_extra.level must be <= 1, got {config.unit_extra.level}")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, module, raising=False)
    cfg = _cfg(composed, "default", stages__extra=[module], unit_extra__on=True, unit_extra__level=1)
    assert extra_modules(cfg) == [module]
    check_stages(cfg)
    extra = sys.modules[module]
    assert extra.CHECKED == [1] and "unit_extra" in private_registry
    with pytest.raises(ConfigError, match=r"unit_extra\.level must be <= 1, got 2"):
        check_stages(_cfg(composed, "default", stages__extra=[module], unit_extra__on=True, unit_extra__level=2))
    check_stages(_cfg(composed, "default", stages__extra=[module], unit_extra__level=5))  # not enabled: not checked
    assert extra.CHECKED == [1, 2]
    monkeypatch.delitem(sys.modules, module)


def test_check_stages_missing_extra_module_fails_loudly(composed):
    with pytest.raises((ModuleNotFoundError, ConfigError), match="no_such_stage_module"):
        check_stages(_cfg(composed, "default", stages__extra=["no_such_stage_module"]))


def test_register_stage_refuses_a_second_class_under_one_name(private_registry):
    with pytest.raises(ValueError, match="needs a name"):
        register_stage(type("Nameless", (Stage,), {}))
    with pytest.raises(ValueError, match=r"stage 'dots' is already registered by recipe\.stages\.dots\.DotsStage"):
        register_stage(type("OtherDots", (Stage,), {"name": "dots"}))


# ----------------------------------------------------------------------------- the sampler
@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_uses_the_one_group_filter_sampler(composed, name):
    cfg = _cfg(composed, f"recipe/{name}")
    v1 = cfg.trainer.v1
    assert v1.trainer_mode == "recipe_sync"
    assert OmegaConf.to_container(v1.sampler.custom_sampler) == {"path": "pkg://recipe.stages.group_filter",
                                                                  "name": "GroupFilterSampler"}
    kwargs = OmegaConf.to_container(v1.sampler.sampler_kwargs, resolve=True)
    assert set(kwargs) == {"group_filter", "gen_batch_size", "poll_interval"}
    assert kwargs["group_filter"] == OmegaConf.to_container(cfg.group_filter, resolve=True)
    assert list(cfg.stages.extra) == []


def test_the_sampler_path_names_the_class():
    from recipe.stages.group_filter import GroupFilterSampler
    from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

    assert issubclass(GroupFilterSampler, ReplayBuffer)
    cfg = OmegaConf.load(CONF_DIR / "config.yaml").trainer.v1.sampler.custom_sampler
    module = cfg.path.removeprefix("pkg://")
    assert getattr(sys.modules[module], cfg.name) is GroupFilterSampler


# ----------------------------------------------------------------------------- micro-batches vs ranks
@pytest.mark.parametrize("name", RECIPES)
def test_micro_batches_tile_two_ranks_except_ppo(composed, name):
    """On 2 CPU ranks every recipe's micro-batches tile a rank's rows except PPO's: its
    n = 1 gives 4 x 1 / 2 = 2 rows per rank (verl asserted deep in a worker before)."""
    cfg = _cfg(composed, f"recipe/{name}", trainer__n_gpus_per_node=2)
    if name != "ppo":
        check_stages(cfg)
        return
    with pytest.raises(ConfigError, match=r"^actor_rollout_ref\.actor\.ppo_micro_batch_size_per_gpu=4 must divide "
                                          r"the rows one rank gets per mini-batch: .* = 4 / 2 = 2; set it to a "
                                          r"divisor of 2$"):
        check_stages(cfg)
    check_stages(_cfg(composed, "recipe/ppo", trainer__n_gpus_per_node=2,
                      actor_rollout_ref__actor__ppo_micro_batch_size_per_gpu=2,
                      actor_rollout_ref__rollout__log_prob_micro_batch_size_per_gpu=2,
                      actor_rollout_ref__ref__log_prob_micro_batch_size_per_gpu=2,
                      critic__ppo_micro_batch_size_per_gpu=2))
    with pytest.raises(ConfigError, match=r"^critic\.ppo_micro_batch_size_per_gpu=4 must divide"):
        check_stages(_cfg(composed, "recipe/ppo", trainer__n_gpus_per_node=2,
                          actor_rollout_ref__actor__ppo_micro_batch_size_per_gpu=2,
                          actor_rollout_ref__rollout__log_prob_micro_batch_size_per_gpu=2,
                          actor_rollout_ref__ref__log_prob_micro_batch_size_per_gpu=2))
