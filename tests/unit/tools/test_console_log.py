"""What the main job prints: one short line per step (verl_patches.tracking), the resolved
config written to config.yaml and printed only on request (recipe.main.write_run_config), and
verl's own config dump silenced in the task runner (recipe.stages.trainer)."""

from __future__ import annotations

import json

import pytest
import verl  # noqa: F401  (loads the verl.plugins entry point: verl_patches applied)
import yaml
from omegaconf import OmegaConf

from verl_patches.tracking import ShortConsoleLogger, short_console_settings, short_line

#: A step's metrics as verl 0.9.1 logs them (a subset of the ~120 keys), with validation.
STEP = {
    "actor/entropy": 1.2345,
    "actor/kl_loss": 0.00123,
    "actor/ppo_kl": 0.0004,
    "actor/pg_loss": -0.01,
    "critic/score/mean": 0.4125,
    "critic/rewards/mean": 0.40,
    "reward/acc": 0.375,
    "val-core/gsm8k/acc/mean@1": 0.40,
    "val-aux/gsm8k/reward/mean@1": 0.40,
    "val/gsm8k/avg@1": 0.40,
    "val/average/avg@1": 0.40,
    "timing_s/step": 12.34,
    "response_length/mean": 100.0,
}


def test_short_line_every_field():
    assert short_line(STEP, 3, 10) == (
        "step 3/10 | reward 0.41 | acc 0.38 | val acc 0.40 | entropy 1.23 | kl 0.0012 | 12.3 s/step"
    )


def test_short_line_without_validation_or_total():
    data = {k: v for k, v in STEP.items() if not k.startswith("val")}
    assert short_line(data, 3) == "step 3 | reward 0.41 | acc 0.38 | entropy 1.23 | kl 0.0012 | 12.3 s/step"


def test_short_line_fallback_keys():
    # no task score: the reward after in-reward KL; no KL loss: the PPO KL, named so
    data = {"critic/rewards/mean": -0.5, "actor/ppo_kl": 0.0004, "timing_s/step": 2.0}
    assert short_line(data, 1, 4) == "step 1/4 | reward -0.50 | ppo_kl 0.0004 | 2.0 s/step"


def test_short_line_missing_keys_are_left_out():
    assert short_line({}, 7, 10) == "step 7/10"
    # not numbers: left out, never an error
    assert short_line({"reward/acc": "n/a", "actor/entropy": None, "timing_s/step": float("nan")}, 1) == "step 1"


def test_short_line_validation_only():
    """verl logs the validation before training alone, at step 0."""
    data = {"val-core/gsm8k/acc/mean@4": 0.25, "val-core/gsm8k/acc/best@4/mean": 0.5}
    assert short_line(data, 0, 10) == "step 0/10 | val acc 0.25"


def test_short_line_validation_several_sources_and_fallbacks():
    data = {
        "val-core/math500/acc/mean@1": 0.22,
        "val-core/gsm8k/acc/mean@1": 0.4,
        "val-core/openai/gsm8k/acc/mean@1": 0.5,  # data sources may hold a slash
    }
    assert short_line(data, 4) == "step 4 | val acc gsm8k 0.40 math500 0.22 openai/gsm8k 0.50"
    # this project's names when verl's are absent (val/average is not a source)
    assert short_line({"val/gsm8k/avg@1": 0.3, "val/average/avg@1": 0.3}, 4) == "step 4 | val acc 0.30"
    # a reward without acc: verl's core metric is the reward
    assert short_line({"val-core/toy/reward/mean@2": 0.75}, 4) == "step 4 | val reward 0.75"
    # the largest n of a source
    data = {"val-core/gsm8k/acc/mean@2": 0.1, "val-core/gsm8k/acc/mean@8": 0.3}
    assert short_line(data, 4) == "step 4 | val acc 0.30"


def test_short_line_numpy_scalars():
    np = pytest.importorskip("numpy")
    data = {"critic/score/mean": np.float32(0.5), "timing_s/step": np.float64(1.25)}
    assert short_line(data, 2, 2) == "step 2/2 | reward 0.50 | 1.2 s/step"


def test_settings_from_the_config_verl_gives_tracking():
    assert short_console_settings({"log": {"short": True}, "trainer": {"total_training_steps": 5}}) == (True, 5)
    assert short_console_settings({"log": {"short": False}, "trainer": {"total_training_steps": 5}}) == (False, 5)
    assert short_console_settings({"log": {"short": True}, "trainer": {"total_training_steps": None}}) == (True, None)
    # verl without this project's config: verl's console
    assert short_console_settings({"trainer": {}}) == (False, None)
    assert short_console_settings(None) == (False, None)


def _tracking(tmp_path, monkeypatch, config):
    from verl.utils import tracking

    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(tmp_path / "metrics.jsonl"))
    return tracking.Tracking("p", "e", default_backend=["console", "file"], config=config)


def test_tracking_short_console_full_file(tmp_path, monkeypatch, capsys):
    """verl's Tracking (patched): one short line on the console, every metric in the file."""
    config = {"log": {"short": True}, "trainer": {"total_training_steps": 10}}
    t = _tracking(tmp_path, monkeypatch, config)
    assert isinstance(t.logger["console"], ShortConsoleLogger)
    capsys.readouterr()
    t.log(STEP, step=3)
    t.finish()
    out = capsys.readouterr().out
    assert out == short_line(STEP, 3, 10) + "\n"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 3 and rows[0]["data"] == STEP


def test_tracking_long_console_when_not_short(tmp_path, monkeypatch, capsys):
    t = _tracking(tmp_path, monkeypatch, {"log": {"short": False}, "trainer": {}})
    assert not isinstance(t.logger["console"], ShortConsoleLogger)
    capsys.readouterr()
    t.log({"a/b": 1.5, "c/d": 2}, step=1)
    t.finish()
    assert capsys.readouterr().out.strip() == "step:1 - a/b:1.5 - c/d:2"


# --------------------------------------------------------------------------------------
# the config: written to config.yaml always, printed on request
# --------------------------------------------------------------------------------------
def _cfg(tmp_path, dump: bool):
    return OmegaConf.create({
        "log": {"config_dump": dump, "short": True},
        "trainer": {"default_local_dir": str(tmp_path / "run"), "experiment_name": "x"},
        "data": {"train_batch_size": 4, "seed": "${trainer.experiment_name}"},
    })


@pytest.mark.parametrize("dump", [False, True])
def test_write_run_config(tmp_path, capsys, dump):
    from recipe.main import write_run_config

    path = write_run_config(_cfg(tmp_path, dump))
    assert path == tmp_path / "run" / "config.yaml"
    written = yaml.safe_load(path.read_text())
    assert written["data"] == {"train_batch_size": 4, "seed": "x"}  # resolved
    assert written["log"]["config_dump"] is dump
    assert [p.name for p in path.parent.iterdir()] == ["config.yaml"]  # no temporary file left
    out = capsys.readouterr().out
    assert out == (path.read_text() if dump else "")


def test_write_run_config_replaces_the_previous_one(tmp_path):
    from recipe.main import write_run_config

    cfg = _cfg(tmp_path, False)
    write_run_config(cfg)
    cfg.data.train_batch_size = 8  # a resumed run with other settings
    assert yaml.safe_load(write_run_config(cfg).read_text())["data"]["train_batch_size"] == 8


def test_task_runner_does_not_print_verls_config_dump(monkeypatch, capsys):
    """``_RecipeTaskRunner.run`` silences verl's ``pprint`` of the config for the call (and
    only then); what verl's run does otherwise is unchanged."""
    from verl.trainer import main_ppo

    from recipe.stages.trainer import _RecipeTaskRunner

    seen = []

    def verl_run(self, config):  # stands for TaskRunnerV1.run: the dump, then training
        main_ppo.pprint({"the": "whole config"})
        print("training")
        seen.append(config)
        return "done"

    monkeypatch.setattr(main_ppo.TaskRunnerV1.__ray_actor_class__, "run", verl_run)
    verl_pprint = main_ppo.pprint
    assert _RecipeTaskRunner().run("cfg") == "done"
    assert seen == ["cfg"]
    assert capsys.readouterr().out == "training\n"
    assert main_ppo.pprint is verl_pprint

    def failing_run(self, config):
        raise RuntimeError("boom")

    monkeypatch.setattr(main_ppo.TaskRunnerV1.__ray_actor_class__, "run", failing_run)
    with pytest.raises(RuntimeError, match="boom"):
        _RecipeTaskRunner().run("cfg")
    assert main_ppo.pprint is verl_pprint
