"""The config nodes of recipe.config (``group_filter``, ``replay``, ``dots``, ``preference``,
``lorr``) and the one validation helper they share: defaults, sources (dict, omegaconf
node, instance, None), coercion, and errors that name the key at fault
(``unknown option(s) <node>.<key>; known: [...]``, ``<node>.<key> must be <what>, got <value>``)."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
from omegaconf import OmegaConf

from recipe.config import (
    NODES,
    ConfigError,
    ConfigNode,
    DotsConfig,
    GroupFilterConfig,
    LorrConfig,
    LorrResetConfig,
    LorrReuseConfig,
    LorrSftConfig,
    PreferenceConfig,
    ReplayConfig,
    check_value,
    load_node,
)

# ----------------------------------------------------------------------------- the shared helper


def test_nodes_are_the_project_config_nodes():
    assert NODES == {"group_filter": GroupFilterConfig, "replay": ReplayConfig, "dots": DotsConfig,
                     "preference": PreferenceConfig, "lorr": LorrConfig}
    for name, cls in NODES.items():
        assert issubclass(cls, ConfigNode) and cls.PREFIX == name


ALL_NODES = [*NODES.values(), LorrResetConfig, LorrReuseConfig, LorrSftConfig]


@pytest.mark.parametrize("cls", ALL_NODES, ids=lambda c: c.PREFIX)
def test_every_node_names_unknown_options_and_lists_the_known(cls):
    known = sorted(f.name for f in dataclasses.fields(cls))
    with pytest.raises(ValueError) as exc:
        cls.from_config({"zz_b": 1, "zz_a": 2, known[0]: cls.defaults()[known[0]]})
    prefix = re.escape(cls.PREFIX)
    assert re.fullmatch(rf"unknown option\(s\) {prefix}\.zz_a, {prefix}\.zz_b; known: \[.*\]", str(exc.value))
    assert str(exc.value).endswith(f"known: {known}")


@pytest.mark.parametrize("cls", ALL_NODES, ids=lambda c: c.PREFIX)
def test_every_node_defaults_from_none_empty_and_instance(cls):
    cfg = cls.from_config(None)
    assert cfg == cls() == cls.from_config({}) == cls.from_config(OmegaConf.create({}))
    assert cls.from_config(cfg) is cfg
    assert {k: getattr(cfg, k) for k in cls.defaults()} == cls.defaults()
    with pytest.raises(ValueError, match=rf"^{re.escape(cls.PREFIX)} must be a mapping or null, got list$"):
        cls.from_config([1, 2])


def test_check_value_message_and_coercion():
    assert check_value("n", "k", 3, "real") == 3.0 and type(check_value("n", "k", 3, "real")) is float
    assert check_value("n", "k", None, "int", optional=True) is None
    assert check_value("n", "k", "b", "str", choices=("a", "b")) == "b"
    with pytest.raises(ValueError, match=r"^n\.k must be an integer >= 1, got 0$"):
        check_value("n", "k", 0, "int", lambda v: v >= 1, "an integer >= 1")
    with pytest.raises(ValueError, match=r"^n\.k must be a number or null, got 'x'$"):
        check_value("n", "k", "x", "real", optional=True)
    with pytest.raises(ValueError, match=r"^n\.k must be one of \('a', 'b'\), got 'c'$"):
        check_value("n", "k", "c", "str", choices=("a", "b"))
    for bad in (True, math.inf, math.nan, "1"):
        with pytest.raises(ValueError, match=r"^n\.k must be a number, got "):
            check_value("n", "k", bad, "real")
    with pytest.raises(ValueError, match=r"^n\.k must be true or false, got 1$"):
        check_value("n", "k", 1, "bool")


def test_load_node_raises_config_error_naming_the_key():
    cfg = OmegaConf.create({"replay": {"capacity": 0}, "dots": None})
    with pytest.raises(ConfigError, match=r"^replay\.capacity must be an integer > 0 or null, got 0$"):
        load_node(cfg, "replay")
    assert load_node(cfg, "dots") == DotsConfig()
    assert load_node(OmegaConf.create({}), "lorr") == LorrConfig()


# ----------------------------------------------------------------------------- group_filter


def test_group_filter_defaults_and_dictconfig():
    node = {"drop_all_wrong": True, "band": [0.1, 0.9], "mode": "refill", "max_gen_rounds": 3, "oversample": 1.5}
    cfg = GroupFilterConfig.from_config(OmegaConf.create(node))
    assert cfg.drop_all_wrong and not cfg.drop_all_correct
    assert cfg.band == (0.1, 0.9) and isinstance(cfg.band, tuple)
    assert (cfg.mode, cfg.max_gen_rounds, cfg.oversample, cfg.metric) == ("refill", 3, 1.5, "acc")
    assert cfg.enabled
    assert GroupFilterConfig.from_config(None) == GroupFilterConfig()
    assert GroupFilterConfig.from_config({"band": None}).band is None
    assert GroupFilterConfig.from_config(cfg) is cfg
    assert GroupFilterConfig(band=(0.2, 0.8)).enabled


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ({"mode": "resample"}, "group_filter.mode"),
        ({"band": [0.8, 0.2]}, "group_filter.band"),
        ({"band": [-0.1, 0.5]}, "group_filter.band"),
        ({"band": [0.5, 1.5]}, "group_filter.band"),
        ({"band": [0.5]}, "group_filter.band"),
        ({"band": "0.2,0.8"}, "group_filter.band"),
        ({"band": 0.5}, "group_filter.band"),
        ({"max_gen_rounds": 0}, "group_filter.max_gen_rounds"),
        ({"max_gen_rounds": 1.5}, "group_filter.max_gen_rounds"),
        ({"oversample": 0.5}, "group_filter.oversample"),
        ({"metric": ""}, "group_filter.metric"),
        ({"drop_all_wrong": "yes"}, "group_filter.drop_all_wrong"),
        ({"drop_al_wrong": True}, "group_filter.drop_al_wrong"),
    ],
)
def test_group_filter_errors_name_the_key(value, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        GroupFilterConfig.from_config(value)
    if key != "group_filter.drop_al_wrong":
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            GroupFilterConfig.from_config(OmegaConf.create(value))


def test_group_filter_rejects_non_mapping():
    with pytest.raises(ValueError, match="group_filter"):
        GroupFilterConfig.from_config([1, 2])


# ----------------------------------------------------------------------------- replay


def test_replay_defaults_and_sources():
    cfg = ReplayConfig.from_config(None)
    assert (cfg.enable, cfg.capacity, cfg.capacity_ratio, cfg.fresh_fraction, cfg.warmup_steps, cfg.store_only_mixed,
            cfg.dedup_by_prompt) == (False, None, 2.0, 0.5, 2, True, True)
    assert (cfg.correction, cfg.correction_rows, cfg.truncation, cfg.reuse_advantages, cfg.seed, cfg.metric) == (
        "decoupled", "replayed", None, True, 0, "acc")
    node = OmegaConf.create({"enable": True, "capacity": 512, "capacity_ratio": None, "truncation": 2,
                             "correction": "plain"})
    cfg = ReplayConfig.from_config(node)
    assert cfg.capacity == 512 and cfg.truncation == 2.0 and isinstance(cfg.truncation, float)
    assert ReplayConfig.from_config(cfg) is cfg


def test_replay_unknown_keys_named():
    with pytest.raises(ValueError, match=r"replay\.capcity.*replay\.zzz"):
        ReplayConfig.from_config({"capcity": 3, "zzz": 1, "enable": True})


@pytest.mark.parametrize(
    "key,value",
    [("enable", "yes"), ("capacity", 0), ("capacity", 2.5), ("capacity", True), ("fresh_fraction", 0.0),
     ("fresh_fraction", 1.5), ("fresh_fraction", float("nan")), ("store_only_mixed", 1), ("dedup_by_prompt", None),
     ("reuse_advantages", "no"),
     ("correction", "tis"), ("truncation", 0.5), ("truncation", "2"), ("seed", 1.0), ("metric", "")],
)
def test_replay_bad_value_names_key(key, value):
    with pytest.raises(ValueError, match=rf"replay\.{key}"):
        ReplayConfig.from_config({key: value})


# ----------------------------------------------------------------------------- dots


def test_dots_defaults():
    cfg = DotsConfig.from_config(None)
    assert cfg == DotsConfig() == DotsConfig.from_config({})
    assert (cfg.enable, cfg.every, cfg.ref_size, cfg.ref_samples, cfg.holdout_size, cfg.tau, cfg.target) == (
        False, 2, None, 8, 32, 1e-3, 0.5)
    assert (cfg.reference_ratio, cfg.selection) == (0.5, "per_round")
    assert (cfg.encoder, cfg.adapter, cfg.rounds_file, cfg.metric, cfg.seed) == (None, None, None, "acc", 0)


def test_dots_from_omegaconf_node():
    from omegaconf import OmegaConf

    node = OmegaConf.create({"dots": {"enable": True, "every": 3, "cache_dir": "${root}/c"}, "root": "/r"}).dots
    cfg = DotsConfig.from_config(node)
    assert cfg.enable is True and cfg.every == 3 and cfg.cache_dir == "/r/c"


def test_dots_unknown_key_named():
    with pytest.raises(ValueError, match=r"^unknown option\(s\) dots\.evry; known: \[.*'every'.*\]$"):
        DotsConfig.from_config({"evry": 2})


@pytest.mark.parametrize("key,value", [("every", 0), ("tau", 0), ("tau", -1e-3), ("holdout_size", 2), ("holdout_size", -1),
                                       ("reference_ratio", 0), ("selection", "per_step"), ("ref_size", 1), ("ref_samples", 0), ("target", 1.5)])
def test_dots_out_of_range_names_key(key, value):
    with pytest.raises(ValueError, match=rf"^dots\.{key} must be .+, got {re.escape(repr(value))}$"):
        DotsConfig.from_config({key: value})


@pytest.mark.parametrize("key,value", [("every", "2"), ("ref_size", 2.5)])
def test_dots_wrong_type_names_key(key, value):
    with pytest.raises(ValueError, match=rf"dots\.{key}"):
        DotsConfig.from_config({key: value})


def test_dots_edges_accepted():
    cfg = DotsConfig.from_config({"every": 1, "holdout_size": 0, "ref_size": 2, "ref_samples": 1, "target": 1.0})
    assert (cfg.every, cfg.holdout_size, cfg.ref_size, cfg.ref_samples, cfg.target) == (1, 0, 2, 1, 1.0)
    assert DotsConfig.from_config({"holdout_size": 3, "ref_size": 7}).ref_size == 7  # 3 held out + 4


# ----------------------------------------------------------------------------- preference / lorr


def test_preference_config_defaults_sources_and_resolution():
    cfg = PreferenceConfig.from_config(None)
    assert (cfg.loss, cfg.beta, cfg.label_smoothing, cfg.simpo_gamma_beta_ratio, cfg.pairs, cfg.reference,
            cfg.length_normalize, cfg.seed, cfg.score_key) == (
        "dpo", 0.1, 0.0, 0.5, "best_worst", "iteration_start", None, 0, None)
    assert cfg.needs_reference and not cfg.length_normalized
    assert cfg.loss_kwargs() == {"beta": 0.1, "label_smoothing": 0.0}
    node = OmegaConf.create({"loss": "simpo", "beta": 2, "score_key": "acc", "label_smoothing": 0.1})
    s = PreferenceConfig.from_config(node)
    assert s.beta == 2.0 and isinstance(s.beta, float) and s.length_normalized and not s.needs_reference
    assert s.loss_kwargs() == {"beta": 2.0, "label_smoothing": 0.1, "gamma_beta_ratio": 0.5}
    assert PreferenceConfig.from_config({"loss": "ipo"}).length_normalized
    assert not PreferenceConfig.from_config({"loss": "ipo", "length_normalize": False}).length_normalized
    assert PreferenceConfig.from_config(s) is s
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.beta = 3.0


def test_preference_config_unknown_keys_named():
    with pytest.raises(ValueError, match=r"preference\.bta.*preference\.metric"):
        PreferenceConfig.from_config({"bta": 1, "metric": "acc"})
    with pytest.raises(ValueError, match="mapping"):
        PreferenceConfig.from_config([1, 2])


@pytest.mark.parametrize(
    "key,value",
    [("loss", "kto"), ("loss", 3), ("beta", 0), ("beta", -1.0), ("beta", "0.1"), ("beta", True), ("beta", float("inf")),
     ("label_smoothing", 0.5), ("label_smoothing", -0.1), ("simpo_gamma_beta_ratio", -1.0), ("pairs", "best"),
     ("reference", "previous"), ("length_normalize", 1), ("seed", 1.5), ("score_key", ""), ("score_key", 3)],
)
def test_preference_config_bad_values_name_key(key, value):
    with pytest.raises(ValueError, match=rf"preference\.{key}"):
        PreferenceConfig.from_config({key: value})


def test_preference_config_ipo_rejects_label_smoothing():
    with pytest.raises(ValueError, match=r"preference\.label_smoothing.*ipo"):
        PreferenceConfig.from_config({"loss": "ipo", "label_smoothing": 0.1})


def test_lorr_config_defaults_nested_and_disabled():
    cfg = LorrConfig.from_config(None)
    assert (cfg.enable, cfg.replays) == (False, 3)
    assert dataclasses.asdict(cfg.reset) == {"enable": True, "alpha": 0.5, "pattern": "down_proj", "every": 1,
                                             "unit": "iterations", "reset_optimizer": False}
    assert (cfg.reuse.enable, cfg.reuse.rollout_ratio) == (True, 0.5)
    assert (cfg.sft.enable, cfg.sft.growth, cfg.sft.cap) == (True, 0.25, 0.5)
    node = OmegaConf.create({"enable": True, "replays": 5, "reset": {"alpha": 0, "unit": "epochs", "every": 3},
                             "sft": {"cap": 1}})
    on = LorrConfig.from_config(node)
    assert isinstance(on.reset, LorrResetConfig) and on.reset.alpha == 0.0 and on.reset.unit == "epochs"
    assert on.reset.every == 3 and on.sft.cap == 1.0 and on.replays == 5
    assert on.effective() is on and [on.sft_lambda(k) for k in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    off = LorrConfig.disabled()
    assert (off.enable, off.replays, off.reset.enable, off.reuse.enable, off.sft.enable) == (False, 1, False, False,
                                                                                             False)
    assert cfg.effective() == off and cfg.sft_lambda(2) == 0.0  # enable false -> plain iterative DPO


def test_lorr_config_unknown_keys_named_with_path():
    with pytest.raises(ValueError, match=r"lorr\.replay\b"):
        LorrConfig.from_config({"replay": 3})
    with pytest.raises(ValueError, match=r"lorr\.reset\.alpah"):
        LorrConfig.from_config({"reset": {"alpah": 0.5}})
    with pytest.raises(ValueError, match=r"lorr\.sft must be a mapping"):
        LorrConfig.from_config({"sft": 0.5})


@pytest.mark.parametrize(
    "node,key",
    [({"enable": "yes"}, "lorr.enable"), ({"replays": 0}, "lorr.replays"), ({"replays": 2.0}, "lorr.replays"),
     ({"reset": {"alpha": 1.5}}, "lorr.reset.alpha"), ({"reset": {"every": 0}}, "lorr.reset.every"),
     ({"reset": {"unit": "steps"}}, "lorr.reset.unit"), ({"reset": {"pattern": "("}}, "lorr.reset.pattern"),
     ({"reset": {"reset_optimizer": None}}, "lorr.reset.reset_optimizer"),
     ({"reuse": {"rollout_ratio": -0.1}}, "lorr.reuse.rollout_ratio"), ({"sft": {"growth": -1}}, "lorr.sft.growth"),
     ({"sft": {"cap": "0.5"}}, "lorr.sft.cap")],
)
def test_lorr_config_bad_values_name_key(node, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        LorrConfig.from_config(node)
