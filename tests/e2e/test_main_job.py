"""End to end: ``./run.sh`` through verl's real V1 trainer on CPU.

Each run starts Ray, FSDP2 actor + reference workers, the ``hf`` rollout server, the
agent loop and reward workers, as a user's run does (~70 s each on 2 cores).
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    """One artifacts dir for the module: data and the tiny model are prepared once."""
    return tmp_path_factory.mktemp("artifacts")


def run_job(artifacts: Path, *overrides: str, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, RECIPE_ARTIFACTS=str(artifacts), PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0")
    proc = subprocess.run(
        [str(ROOT / "run.sh"), *overrides],
        cwd=artifacts,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    log = artifacts / f"log_{len(list(artifacts.glob('log_*')))}.txt"
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    assert proc.returncode == 0, f"run.sh {' '.join(overrides)} failed (log: {log}):\n{proc.stderr[-4000:]}"
    return proc


def short_lines(proc: subprocess.CompletedProcess) -> list[str]:
    """The console's short per-step lines (``step 3/10 | reward ...``), Ray's prefix removed."""
    return [m.group(0) for m in re.finditer(r"step \d+(/\d+)? \|[^\n]*", proc.stdout + proc.stderr)]


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


#: Reward giving mixed groups from a random tiny model (tests/e2e/parity_reward.py).
PARITY_REWARD = str(Path(__file__).with_name("parity_reward.py"))


def run_parity_steps(artifacts: Path, name: str, steps: int, *extra: str):
    """``run.sh`` for ``steps`` steps with the parity reward, checkpoints every 2 steps and no
    validation; returns ``(process, {step: metrics})`` of run ``name``."""
    proc = run_job(
        artifacts,
        f"trainer.experiment_name={name}",
        f"trainer.total_training_steps={steps}",
        "trainer.save_freq=2",
        "trainer.test_freq=-1",
        f"reward.custom_reward_function.path={PARITY_REWARD}",
        *extra,
    )
    return proc, {r["step"]: r["data"] for r in read_metrics(artifacts / "runs" / name / "metrics.jsonl")}


#: A stage kept outside the package (tests/e2e/plugins/recipe_toy_stage.py): the main job
#: also carries it, to show that a stage added without touching the trainer or the entry
#: point runs, checkpoints and resumes (one run serves both checks).
PLUGINS = Path(__file__).with_name("plugins")
TOY_STAGE = ("stages.extra=[recipe_toy_stage]", "+toy_metric.enable=true", "+toy_metric.constant=2.5")


def test_main_job_two_steps_then_resume(artifacts, monkeypatch):
    name = "e2e_main"
    run_dir = artifacts / "runs" / name
    # on PYTHONPATH as a user's own module (verl installs a package named `tests` into
    # site-packages, so `tests.e2e...` is not importable in Ray workers)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")])))
    common = (
        f"trainer.experiment_name={name}",
        "trainer.save_freq=2",
        "trainer.test_freq=2",
        "data.val_max_samples=8",
        *TOY_STAGE,
    )
    proc = run_job(artifacts, "trainer.total_training_steps=2", *common)
    log = proc.stdout + proc.stderr
    # verl's engine-availability warnings are filtered in the driver and every worker
    assert "engine is not available" not in log
    # quiet console (log.short, log.config_dump=false): no config dump, no line of every
    # metric, one short line per step (validation at step 2); the config is in config.yaml
    assert "{'actor_rollout_ref': " not in log and not re.search(r"^actor_rollout_ref:", log, re.MULTILINE)
    assert "step:1 - " not in log
    lines = short_lines(proc)
    assert [line.split(" |")[0] for line in lines] == ["step 1/2", "step 2/2"], lines
    assert all(" | reward " in line and " s/step" in line for line in lines), lines
    assert " | val acc " in lines[1] and " | val " not in lines[0], lines
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["trainer"]["experiment_name"] == name and config["log"]["config_dump"] is False
    assert Path(config["trainer"]["default_local_dir"]).resolve() == run_dir.resolve()

    # data prepared, model built, on demand
    assert (artifacts / "data" / "gsm8k" / "train.parquet").exists()
    assert (artifacts / "data" / "gsm8k" / "test.parquet").exists()
    assert any((artifacts / "models").iterdir())

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        m = r["data"]
        assert math.isfinite(m["actor/loss"]) and math.isfinite(m["actor/pg_loss"])
        assert m["actor/grad_norm"] > 0
        for key in ("critic/score/mean", "critic/rewards/mean", "reward/acc", "reward/grader_timeout"):
            assert key in m, key
        assert 0.0 <= m["reward/acc"] <= 1.0
        # the hf rollout's log-probs match the actor's recomputation
        assert m["training/rollout_probs_diff_max"] < 1e-3
        assert m["response_length/mean"] > 0
    assert "val-core/gsm8k/acc/mean@1" in rows[1]["data"]
    # the names python -m recipe.eval reports, from the same validation samples (greedy, n = 1)
    val = rows[1]["data"]
    assert val["val/gsm8k/avg@1"] == pytest.approx(val["val-core/gsm8k/acc/mean@1"])
    assert val["val/gsm8k/pass@1"] == pytest.approx(val["val/gsm8k/avg@1"])

    # the toy stage's hooks ran at every step, beside the built-in ones
    for step, r in enumerate(rows, start=1):
        m = r["data"]
        assert m["toy/step"] == step and m["toy/old_log_prob_calls"] == step and m["toy/constant"] == 2.5
        assert m["toy/sampled_rows"] == 4 * 4  # data.train_batch_size x rollout.n of conf/device/cpu.yaml
    state = torch.load(run_dir / "global_step_2" / "recipe_state.pt", weights_only=False)
    assert state["stages"]["toy_metric"] == {"old_log_prob_calls": 2}

    # checkpoint written by verl
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    actor = run_dir / "global_step_2" / "actor"
    assert (actor / "model_world_size_1_rank_0.pt").stat().st_size > 0
    assert (actor / "optim_world_size_1_rank_0.pt").stat().st_size > 0

    # resume: same experiment, more steps -> continues at step 3, earlier metrics kept
    proc = run_job(artifacts, "trainer.total_training_steps=3", *common)
    assert "global_step_2" in proc.stdout + proc.stderr  # loaded from the step-2 checkpoint
    assert [line.split(" |")[0] for line in short_lines(proc)] == ["step 3/3"]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["total_training_steps"] == 3
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    assert rows[2]["data"]["toy/old_log_prob_calls"] == 3  # the toy stage's state was restored


def test_real_qwen_tokenizer_one_step(artifacts):
    """The real 151,665-token Qwen2.5 tokenizer: chat template, answer extraction, big vocab."""
    name = "e2e_qwen"
    run_job(
        artifacts,
        "model=tiny_qwen",
        f"trainer.experiment_name={name}",
        "trainer.total_training_steps=1",
        "trainer.test_freq=1",
        "trainer.save_freq=-1",
        "data.train_batch_size=2",
        "data.max_response_length=32",
        "data.val_max_samples=2",
        "actor_rollout_ref.rollout.n=2",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
        timeout=900,
    )
    rows = read_metrics(artifacts / "runs" / name / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1]
    m = rows[0]["data"]
    assert math.isfinite(m["actor/loss"]) and m["actor/grad_norm"] > 0
    assert m["training/rollout_probs_diff_max"] < 1e-3
    assert "reward/acc" in m and "val-core/gsm8k/acc/mean@1" in m
