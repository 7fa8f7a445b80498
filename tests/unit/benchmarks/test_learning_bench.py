"""Tests of the CPU learning benchmark's pure parts (benchmarks/runs.py, benchmarks/learning.py)
on synthetic metrics files and curves: no verl run, no Ray."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from benchmarks import learning as lb
from benchmarks import runs

REPO = Path(__file__).resolve().parents[3]
VAL = "val/arithmetic/avg@4"


def _write(path: Path, records: list[tuple[int, dict]], extra_lines: tuple[str, ...] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": s, "data": d}) for s, d in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def _run_records(vals: dict[int, float], entropy: list[float], step_s: float = 2.0, acc: float = 0.5) -> list:
    """Steps 0..len(entropy): validation at the keys of ``vals``, entropy / timing per step."""
    recs = []
    for step in range(len(entropy) + 1):
        data = {}
        if step > 0:
            data = {"actor/entropy": entropy[step - 1], "timing_s/step": step_s, "reward/acc": acc,
                    "critic/score/mean": 2 * acc - 1}
        if step in vals:
            data[VAL] = vals[step]
            data["val/average/avg@4"] = vals[step]
            data["val-core/arithmetic/acc/mean@4"] = vals[step]
        recs.append((step, data))
    return recs


# --------------------------------------------------------------------------- runs.py


def test_read_curve_cumulates_step_time_and_reads_val_accuracy(tmp_path, caplog):
    recs = _run_records({0: 0.25, 2: 0.30, 4: 0.40}, [0.4, 0.3, 0.2, 0.1], step_s=2.0)
    # a resumed run re-logs step 4 (last value wins) and a killed run left half a line
    recs.append((4, {VAL: 0.45, "timing_s/step": 3.0}))
    f = _write(tmp_path / "run" / "metrics.jsonl", recs, extra_lines=('{"step": 5, "da',))
    c = runs.read_curve(tmp_path / "run")
    assert c["steps"] == [0, 1, 2, 3, 4]
    assert c["wall"] == {0: 0.0, 1: 2.0, 2: 4.0, 3: 6.0, 4: 9.0}
    assert c["val_key"] == VAL
    assert c["val"] == {0: 0.25, 2: 0.30, 4: 0.45}
    assert c["rows"][4]["actor/entropy"] == 0.1  # metrics only the first record had are kept
    assert runs.series(c, "actor/entropy") == {1: 0.4, 2: 0.3, 3: 0.2, 4: 0.1}
    assert runs.series(c, "nope") == {}
    assert c["file"] == str(f)
    assert "metrics.jsonl:7" in caplog.text  # the cut line is named


def test_val_key_choice():
    assert runs.val_key(["val/gsm8k/avg@4", "val/average/avg@4", "val/gsm8k/pass@4"]) == "val/gsm8k/avg@4"
    assert runs.val_key(["val/a/avg@1", "val/b/avg@1", "val/average/avg@1"]) == "val/average/avg@1"
    assert runs.val_key(["val-core/arithmetic/acc/mean@1", "actor/entropy"]) == "val-core/arithmetic/acc/mean@1"
    assert runs.val_key(["actor/entropy"]) is None
    with pytest.raises(ValueError, match="ambiguous validation accuracy keys"):
        runs.val_key(["val/a/avg@1", "val/b/avg@1"])


def test_first_reach_skips_step_zero_and_uses_training_wall_time():
    c = {"val": {0: 0.5, 2: 0.3, 4: 0.4, 6: 0.45}, "wall": {0: 0.0, 2: 5.0, 4: 9.5, 6: 14.0}}
    assert runs.first_reach(c, 0.4) == (4, 9.5)
    assert runs.first_reach(c, 0.4 + 1e-12) == (4, 9.5)  # float tolerance
    assert runs.first_reach(c, 0.45) == (6, 14.0)
    assert runs.first_reach(c, 0.5) == (None, None)  # only the start reached it


def test_recipe_command_orders_run_keys_before_overrides(tmp_path):
    cmd = runs.recipe_command("raft_pp", ["trainer.test_freq=7", "x=1"], tmp_path / "raft_pp_s3", 20, 5, 3,
                              python="py")
    assert cmd[:4] == ["py", "-m", "recipe.main", "recipe=raft_pp"]
    assert "trainer.experiment_name=raft_pp_s3" in cmd
    assert f"trainer.default_local_dir={tmp_path / 'raft_pp_s3'}" in cmd
    for key in ("trainer.total_training_steps=20", "trainer.total_epochs=20", "trainer.save_freq=-1", "trainer.val_before_train=true",
                "trainer.resume_mode=disable", "seed=3"):
        assert key in cmd
    # the caller's overrides come last (Hydra: last value wins)
    assert cmd[-2:] == ["trainer.test_freq=7", "x=1"]
    assert cmd.index("trainer.test_freq=5") < cmd.index("trainer.test_freq=7")
    with pytest.raises(ValueError, match="steps=0"):
        runs.recipe_command("grpo", [], tmp_path, 0, 5, 0)
    with pytest.raises(ValueError, match="test_freq=0"):
        runs.recipe_command("grpo", [], tmp_path, 5, 0, 0)


def test_run_recipe_reuses_only_a_finished_run_of_the_same_command(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, **kw):  # a "training run" that logs steps 0..3
        calls.append(cmd)
        run_dir = Path(next(a for a in cmd if a.startswith("trainer.default_local_dir=")).split("=", 1)[1])
        _write(run_dir / "metrics.jsonl", _run_records({0: 0.2, 3: 0.3}, [0.3] * 3))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(runs.subprocess, "run", fake_run)
    quiet = {"echo": lambda s: None}
    d = runs.run_recipe("grpo", ["a=1"], tmp_path / "runs", 3, 3, 0, tmp_path / "logs", **quiet)
    assert d == (tmp_path / "runs" / "grpo_s0").resolve() and len(calls) == 1
    assert json.loads((d / "command.json").read_text()) == calls[0][1:]
    assert runs.logged_steps(d / "metrics.jsonl") == {0, 1, 2, 3}
    assert runs.run_recipe("grpo", ["a=1"], tmp_path / "runs", 3, 3, 0, tmp_path / "logs", **quiet) == d
    assert len(calls) == 1  # finished with the same command: not started again
    runs.run_recipe("grpo", ["a=2"], tmp_path / "runs", 3, 3, 0, tmp_path / "logs", **quiet)
    assert len(calls) == 2  # other overrides: run again
    # a run that logged more steps than asked (an older, longer benchmark) is not reused either
    assert not runs.is_finished(d, calls[-1], 2)
    assert runs.is_finished(d, calls[-1], 3)


def test_preset_fills_unset_keys_and_copies_lists():
    from argparse import Namespace

    full, quick = {"seeds": [0, 1, 2], "steps": 12}, {"seeds": [0], "steps": 8}
    got = runs.preset(Namespace(quick=False, seeds=None, steps=None), full, quick)
    assert got == {"seeds": [0, 1, 2], "steps": 12}
    got["seeds"].append(9)
    assert full["seeds"] == [0, 1, 2]  # the preset is not mutated
    assert runs.preset(Namespace(quick=True, seeds=[5], steps=None), full, quick) == {"seeds": [5], "steps": 8}
    assert runs.preset(Namespace(quick=True, seeds=None, steps=0), full, quick) == {"seeds": [0], "steps": 0}


def test_run_recipe_reports_failures(tmp_path, monkeypatch):
    calls = []

    def failing(cmd, **kw):
        calls.append(cmd)
        kw["stdout"].write("boom: the worker died\n")
        return subprocess.CompletedProcess(cmd, 1)

    monkeypatch.setattr(runs.subprocess, "run", failing)
    quiet = {"echo": lambda s: None}
    # an unfinished run (stopped at step 2) is started over; exit 1 -> RunFailed naming the log
    part = _write(tmp_path / "runs" / "raft_s1" / "metrics.jsonl", _run_records({0: 0.2}, [0.3] * 2))
    with pytest.raises(runs.RunFailed, match=r"raft_s1 failed \(exit status 1\); log: .*raft_s1.log\n.*boom"):
        runs.run_recipe("raft", ["a=1"], tmp_path / "runs", 3, 3, 1, tmp_path / "logs", **quiet)
    assert len(calls) == 1 and calls[0][3] == "recipe=raft" and calls[0][-1] == "a=1"
    assert not part.exists()  # the old partial metrics were removed before the restart

    # exit 0 without the last step logged is a failure too
    monkeypatch.setattr(runs.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0))
    with pytest.raises(runs.RunFailed, match="no step 3 in"):
        runs.run_recipe("raft", [], tmp_path / "runs", 3, 3, 2, tmp_path / "logs", label="x", **quiet)
    assert (tmp_path / "logs" / "x_s2.log").exists()


# --------------------------------------------------------------------------- learning.py: setup


def test_benchmark_recipes_are_real_configs():
    # every recipe the benchmark names is a yaml of conf/recipe/; grpo_dots_rr is data_efficiency.py's
    names = {p.stem for p in (REPO / "conf" / "recipe").glob("*.yaml")}
    assert {*lb.BASE_RECIPES, *lb.OPTIONAL_RECIPES} <= names
    assert "grpo_dots_rr" not in (*lb.BASE_RECIPES, *lb.OPTIONAL_RECIPES)
    assert lb._parser().parse_args([]).recipes == list(lb.BASE_RECIPES)


def test_recipe_settings_from_the_real_configs(tmp_path):
    assert lb.recipe_settings("grpo") == {"n": 4, "critic": False}
    assert lb.recipe_settings("ppo") == {"n": 1, "critic": True}
    (tmp_path / "bare.yaml").write_text("# @package _global_\nalgorithm: {adv_estimator: grpo}\n")
    assert lb.recipe_settings("bare", tmp_path) == {"n": 4, "critic": False}
    with pytest.raises(FileNotFoundError, match=r"recipe 'nope': .*nope.yaml does not exist \(recipes: bare\)"):
        lb.recipe_settings("nope", tmp_path)
    # a recipe built on another inherits its n and critic; its own keys win
    (tmp_path / "base.yaml").write_text("actor_rollout_ref: {rollout: {n: 8}}\ncritic: {enable: true}\n")
    (tmp_path / "child.yaml").write_text("defaults:\n  - base\n  - _self_\ncritic: {enable: false}\n")
    assert lb.recipe_settings("child", tmp_path) == {"n": 8, "critic": False}
    (tmp_path / "orphan.yaml").write_text("defaults: [missing]\n")
    with pytest.raises(FileNotFoundError, match="recipe 'missing'"):
        lb.recipe_settings("orphan", tmp_path)


def test_budget_overrides_give_equal_rollouts_per_step():
    # default: 2 optimiser steps per step (the Minimalist paper's 1024 prompts / mini-batch 512)
    o = lb.budget_overrides(4, 64)
    assert o[:4] == ["data.train_batch_size=16", "actor_rollout_ref.rollout.n=4",
                     "actor_rollout_ref.actor.ppo_mini_batch_size=8",
                     "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=32"]
    # every micro-batch holds one mini-batch (the recipe's config check: it must divide 8 x 4 = 32 rows)
    assert o[4:] == ["actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=32",
                     "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=32"]
    assert not any(k.startswith("critic.") for k in o)
    one = lb.budget_overrides(4, 64, updates_per_step=1)
    assert "actor_rollout_ref.actor.ppo_mini_batch_size=16" in one
    ppo = lb.budget_overrides(1, 64, critic=True)
    assert "data.train_batch_size=64" in ppo and "actor_rollout_ref.rollout.n=1" in ppo
    assert ppo[-2:] == ["critic.ppo_mini_batch_size=32", "critic.ppo_micro_batch_size_per_gpu=32"]
    assert "data.train_batch_size=8" in lb.budget_overrides(8, 64)
    with pytest.raises(ValueError, match="rollouts_per_step=64 is not a positive multiple of .*rollout.n=3"):
        lb.budget_overrides(3, 64)
    with pytest.raises(ValueError, match="rollout.n=0"):
        lb.budget_overrides(0, 64)
    with pytest.raises(ValueError, match="updates_per_step=3 does not divide the 16 prompts"):
        lb.budget_overrides(4, 64, updates_per_step=3)
    with pytest.raises(ValueError, match="updates_per_step=0"):
        lb.budget_overrides(4, 64, updates_per_step=0)


def test_write_val_copies_repeats_every_row(tmp_path):
    src = tmp_path / "test.parquet"
    pd.DataFrame({"q": ["a", "b", "c"], "i": [0, 1, 2]}).to_parquet(src)
    path = lb.write_val_copies(src, 4, tmp_path / "out")
    assert path.name == "test_x4.parquet"
    df = pd.read_parquet(path)
    assert df["q"].tolist() == ["a", "b", "c"] * 4
    with pytest.raises(ValueError, match="--val-samples=0"):
        lb.write_val_copies(src, 0, tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.parquet"):
        lb.write_val_copies(tmp_path / "missing.parquet", 2, tmp_path)


def test_estimate_run_seconds_counts_validations():
    # 20 steps, validation at 0, 5, 10, 15, 20 -> 5 validations of 400 generations
    expect = lb.COST_STARTUP_S + 20 * lb.COST_STEP_S + 5 * (lb.COST_VAL_S + 400 * lb.COST_VAL_S_PER_SAMPLE)
    assert lb.estimate_run_seconds(20, 5, val_samples=400) == pytest.approx(expect)
    # 7 steps every 3: 0, 3, 6 and the last step 7 -> 4 validations; the critic adds per step
    expect = (lb.COST_STARTUP_S + 7 * (lb.COST_STEP_S + lb.COST_CRITIC_EXTRA_S)
              + 4 * (lb.COST_VAL_S + 800 * lb.COST_VAL_S_PER_SAMPLE))
    assert lb.estimate_run_seconds(7, 3, critic=True, val_samples=800) == pytest.approx(expect)


def _total_estimate(args) -> float:
    return sum(lb.estimate_run_seconds(args.steps, args.test_freq, r == "ppo", 200 * args.val_samples)
               for r in args.recipes) * len(args.seeds)


def test_full_and_quick_settings_and_their_cost():
    full = lb.resolve_settings(lb._parser().parse_args([]))
    assert (full.seeds, full.steps, full.test_freq) == ([0, 1, 2], 12, 4)
    # 18 runs: 18 x (43 + 12 x 2.25 + 4 validations x 6.7) + 3 x 12 x 0.7 (PPO's critic) = 1767.6 s
    assert _total_estimate(full) == pytest.approx(1767.6)
    quick = lb.resolve_settings(lb._parser().parse_args(["--quick"]))
    assert (quick.seeds, quick.steps, quick.test_freq) == ([0], 8, 4)
    assert _total_estimate(quick) <= 9 * 60
    # command-line values win over --quick
    mixed = lb.resolve_settings(lb._parser().parse_args(["--quick", "--seeds", "3", "4", "--steps", "5"]))
    assert (mixed.seeds, mixed.steps, mixed.test_freq) == ([3, 4], 5, 4)
    with pytest.raises(SystemExit, match="--test-freq=0: need at least 1"):
        lb.resolve_settings(lb._parser().parse_args(["--test-freq", "0"]))
    with pytest.raises(SystemExit, match="--jobs=0"):
        lb.resolve_settings(lb._parser().parse_args(["--jobs", "0"]))


# --------------------------------------------------------------------------- learning.py: summary


def _curve(tmp_path: Path, name: str, vals: dict[int, float], entropy: list[float], step_s: float = 2.0) -> dict:
    return runs.read_curve(_write(tmp_path / name / "metrics.jsonl", _run_records(vals, entropy, step_s)))


def test_run_stats_hand_computed(tmp_path):
    c = _curve(tmp_path, "a", {0: 0.25, 2: 0.30, 4: 0.40}, [0.4, 0.3, 0.2, 0.1], step_s=2.0)
    s = lb.run_stats(c, target=0.33, early=1, late=2, tail=2)
    assert s["steps"] == 4
    assert s["start_acc"] == 0.25 and s["final_acc"] == 0.40 and s["best_acc"] == 0.40
    assert s["early_acc"] == pytest.approx(0.30)
    assert s["late_acc"] == pytest.approx(0.35)
    assert (s["steps_to_target"], s["wall_to_target"]) == (4, 8.0)
    assert s["entropy_start"] == pytest.approx(0.35) and s["entropy_final"] == pytest.approx(0.15)
    assert s["entropy_drop_pct"] == pytest.approx(100 * (1 - 0.15 / 0.35))
    assert s["train_acc_final"] == 0.5 and s["reward_final"] == 0.0
    assert s["s_per_step"] == 2.0 and s["wall_s"] == 8.0
    # not reached
    assert lb.run_stats(c, target=0.5)["steps_to_target"] is None
    # a run that never validated after step 0 is an error naming its file
    c0 = _curve(tmp_path, "b", {0: 0.25}, [0.4, 0.3])
    with pytest.raises(ValueError, match=r"b/metrics.jsonl: no validation after step 0"):
        lb.run_stats(c0, 0.3)


def test_run_stats_entropy_noise_hand_computed(tmp_path):
    c = _curve(tmp_path, "e", {0: 0.2, 5: 0.3}, [0.30, 0.32, 0.28, 0.30, 0.26])
    s = lb.run_stats(c, 0.5, tail=2)
    assert s["entropy_start"] == pytest.approx(0.31) and s["entropy_final"] == pytest.approx(0.28)
    assert s["entropy_drop_pct"] == pytest.approx(100 * (1 - 0.28 / 0.31))
    # successive differences 0.02, -0.04, 0.02, -0.04: sample variance 0.0012; noise sd
    # sqrt(0.0012 / 2); standard error of a 2-step mean sqrt(0.0003)
    se = math.sqrt(0.0003)
    assert s["entropy_drop_pct_se"] == pytest.approx(100 * se * math.sqrt(1 + (0.28 / 0.31) ** 2) / 0.31)


def test_aggregate_means_and_reached_counts():
    base = {k: 0.0 for k in lb.NUMERIC}
    s0 = {**base, "final_acc": 0.30, "s_per_step": 4.0, "steps_to_target": 10, "wall_to_target": 40.0}
    s1 = {**base, "final_acc": 0.40, "s_per_step": 5.0, "steps_to_target": None, "wall_to_target": None}
    s2 = {**base, "final_acc": 0.35, "s_per_step": 6.0, "steps_to_target": 20, "wall_to_target": 100.0}
    a = lb.aggregate([s0, s1, s2])
    assert a["runs"] == 3 and a["reached"] == 2
    assert a["final_acc"] == pytest.approx(0.35) and a["final_acc_sd"] == pytest.approx(0.05)
    assert a["s_per_step"] == pytest.approx(5.0)
    assert a["steps_to_target"] == 15 and a["wall_to_target"] == 70.0
    one = lb.aggregate([s1])
    assert math.isnan(one["final_acc_sd"]) and one["steps_to_target"] is None and one["reached"] == 0
    with pytest.raises(ValueError):
        lb.aggregate([])


def test_results_table_rows():
    base = {k: 0.0 for k in lb.NUMERIC}
    s0 = {**base, "start_acc": 0.25, "final_acc": 0.30, "best_acc": 0.31, "entropy_final": 0.2,
          "entropy_drop_pct": 20.0, "train_acc_final": 0.33, "s_per_step": 4.0, "steps_to_target": 10,
          "wall_to_target": 40.0}
    s1 = {**s0, "final_acc": 0.40, "best_acc": 0.41, "steps_to_target": None, "wall_to_target": None}
    t = lb.results_table({"grpo": lb.aggregate([s0, s1])}, 0.33, failed={"ppo": "see logs/ppo_s0.log"})
    lines = t.splitlines()
    assert "steps to 0.330" in lines[0] and len(lines) == 4
    assert lines[2] == ("| grpo | 2 | 0.250 | 0.350 ± 0.071 | 0.360 | 10.0 (1/2) | 40 | 0.200 ± 0.000 | 20 % "
                        "| 0.330 | 4.00 |")
    assert lines[3].startswith("| ppo | 0 | failed: see logs/ppo_s0.log |")


# --------------------------------------------------------------------------- learning.py: findings


def _stats(metric: str, values: dict[tuple[str, int], float]) -> dict:
    return {k: {metric: v} for k, v in values.items()}


def test_sampling_se_hand_computed():
    # (0.4*0.6 + 0.3*0.7) / (800 * 2) = 0.45 / 1600
    assert lb.sampling_se(0.4, 0.3, 800, 2) == pytest.approx(math.sqrt(0.45 / 1600))
    assert lb.sampling_se(0.4, 0.3, 0) == 0.0


def test_evaluate_claim_verdicts():
    claim = lb.Claim("RAFT++ learns faster early than RAFT", "src", "early_acc", "raft_pp", "raft")
    seeds = [0, 1]
    holds = _stats("early_acc", {("raft_pp", 0): 0.40, ("raft_pp", 1): 0.42, ("raft", 0): 0.30, ("raft", 1): 0.34})
    f = lb.evaluate_claim(claim, holds, seeds)
    assert f["verdict"] == "holds"
    assert f["diff"] == pytest.approx(0.09) and f["spread"] == pytest.approx(math.sqrt(2) * 0.01)
    assert f["diffs"] == pytest.approx([0.10, 0.08]) and f["seeds"] == [0, 1]
    assert "raft_pp 0.410 vs raft 0.320, diff 0.090 (per seed 0.100, 0.080; spread 0.014)" in f["numbers"]

    reverse = _stats("early_acc", {("raft_pp", 0): 0.30, ("raft_pp", 1): 0.34, ("raft", 0): 0.40, ("raft", 1): 0.42})
    assert lb.evaluate_claim(claim, reverse, seeds)["verdict"] == "does not hold"

    spread = _stats("early_acc", {("raft_pp", 0): 0.40, ("raft_pp", 1): 0.42, ("raft", 0): 0.30, ("raft", 1): 0.50})
    assert lb.evaluate_claim(claim, spread, seeds)["verdict"] == "inconclusive (difference within seed spread)"
    # the same with a sampling error larger than the seed spread names it
    f = lb.evaluate_claim(claim, spread, seeds, n_val_samples=4)
    assert f["verdict"] == "inconclusive (difference within sampling noise)"

    # equal per-seed differences (sd 0) below twice the sampling error of 800 samples x 2 validations
    small = _stats("early_acc", {("raft_pp", 0): 0.425, ("raft_pp", 1): 0.425, ("raft", 0): 0.40, ("raft", 1): 0.40})
    f = lb.evaluate_claim(claim, small, seeds, n_val_samples=800)
    assert f["spread"] == pytest.approx(2 * lb.sampling_se(0.425, 0.40, 800, 2))  # 2 x 0.01693
    assert f["verdict"] == "inconclusive (difference within sampling noise)"
    assert lb.evaluate_claim(claim, small, seeds)["verdict"] == "holds"  # no sampling error given

    # one seed, entropy (no sampling error): the sign decides, flagged
    ent = lb.Claim("RAFT collapses faster", "src", "entropy_drop_pct", "raft", "grpo")
    one = _stats("entropy_drop_pct", {("raft", 0): 40.0, ("grpo", 0): 10.0})
    f = lb.evaluate_claim(ent, one, [0])
    assert f["verdict"] == "holds (one seed)" and "raft 40.0 % vs grpo 10.0 %" in f["numbers"]

    # entropy with the runs' noise estimates: spread 2 sqrt(3^2 + 4^2) = 10
    noisy = {("raft", 0): {"entropy_drop_pct": 40.0, "entropy_drop_pct_se": 3.0},
             ("grpo", 0): {"entropy_drop_pct": 10.0, "entropy_drop_pct_se": 4.0}}
    f = lb.evaluate_claim(ent, noisy, [0])
    assert f["verdict"] == "holds" and f["spread"] == pytest.approx(10.0)
    noisy[("raft", 0)]["entropy_drop_pct"] = 19.0
    assert lb.evaluate_claim(ent, noisy, [0])["verdict"] == "inconclusive (difference within sampling noise)"

    # a recipe that did not run
    f = lb.evaluate_claim(claim, _stats("early_acc", {("raft_pp", 0): 0.4}), seeds)
    assert f["verdict"] == "not run" and "raft" in f["numbers"]
    # seeds where only one recipe finished are left out of the pairing
    partial = _stats("early_acc", {("raft_pp", 0): 0.40, ("raft_pp", 1): 0.90, ("raft", 0): 0.30})
    f = lb.evaluate_claim(claim, partial, seeds)
    assert f["seeds"] == [0] and f["diff"] == pytest.approx(0.10)


def test_evaluate_claim_similar():
    claim = lb.Claim("Reinforce-Rej matches GRPO", "src", "late_acc", "reinforce_rej", "grpo", "similar")
    close = _stats("late_acc", {("reinforce_rej", 0): 0.36, ("reinforce_rej", 1): 0.34, ("grpo", 0): 0.35,
                                ("grpo", 1): 0.35})
    assert lb.evaluate_claim(claim, close, [0, 1])["verdict"] == "holds (difference within seed spread)"
    apart = _stats("late_acc", {("reinforce_rej", 0): 0.50, ("reinforce_rej", 1): 0.51, ("grpo", 0): 0.35,
                                ("grpo", 1): 0.35})
    assert lb.evaluate_claim(claim, apart, [0, 1])["verdict"] == "does not hold"


def test_claims_name_known_recipes_and_metrics():
    known = set(lb.BASE_RECIPES) | set(lb.OPTIONAL_RECIPES)
    for c in lb.CLAIMS:
        assert c.a in known and c.b in known and c.a != c.b, c
        assert c.metric in ("early_acc", "late_acc", "entropy_drop_pct"), c
        assert c.relation in ("greater", "similar"), c
    md = lb.findings_markdown([{"claim": "X", "source": "S", "numbers": "n", "verdict": "holds"}])
    assert md == "- X (S): n -> **holds**"


def test_mean_frame_and_json_safe(tmp_path):
    from recipe import report

    a = report.load_metrics(_write(tmp_path / "a" / "metrics.jsonl", _run_records({0: 0.2, 2: 0.4}, [0.4, 0.2])))
    b = report.load_metrics(_write(tmp_path / "b" / "metrics.jsonl", _run_records({0: 0.3, 2: 0.6}, [0.2, 0.2],
                                                                                 step_s=4.0)))
    m = lb.mean_frame([a, b])
    assert m.loc[2, VAL] == pytest.approx(0.5) and m.loc[0, VAL] == pytest.approx(0.25)
    assert m.loc[1, "actor/entropy"] == pytest.approx(0.3)
    assert m.loc[2, report.WALL_TIME_COLUMN] == pytest.approx(6.0)  # mean of 4 and 8
    assert math.isnan(m.loc[1, VAL])
    assert lb.json_safe({"a": [1.0, math.nan], "b": (math.inf, "x")}) == {"a": [1.0, None], "b": [None, "x"]}
    assert json.dumps(lb.json_safe({"x": math.nan}), allow_nan=False) == '{"x": null}'


def test_plot_curves_writes_val_and_entropy_plots(tmp_path):
    d1 = _write(tmp_path / "grpo_s0" / "metrics.jsonl", _run_records({0: 0.2, 2: 0.4}, [0.4, 0.2])).parent
    d2 = _write(tmp_path / "raft_s0" / "metrics.jsonl", _run_records({0: 0.2, 2: 0.3}, [0.4, 0.1])).parent
    pngs = lb.plot_curves({"grpo": [d1], "raft": [d2]}, tmp_path / "plots")
    names = {p.name for p in pngs}
    assert {"val_acc.png", "entropy.png", "reward.png"} <= names
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_dry_run_lists_runs_without_training(capsys):
    assert lb.main(["--recipes", "grpo", "ppo", "--seeds", "0", "1", "--steps", "10", "--test-freq", "5",
                    "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 recipes x 2 seeds = 4 runs of 10 steps" in out
    assert "ppo_s1: n=1 critic=True" in out and "grpo_s0: n=4 critic=False" in out


def test_unknown_recipe_fails_before_any_run():
    with pytest.raises(FileNotFoundError, match="recipe 'nope'"):
        lb.main(["--recipes", "nope", "--dry-run"])
