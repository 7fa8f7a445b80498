"""scripts/gpu_check.py without GPU runs: the table, the metric comparisons and verdicts, the
budget, check selection, the scheduler on trivial commands, and the GPU runs' overrides,
composed with Hydra and passed through the project's and verl's start-up checks (what a
GPU machine would reject before Ray starts).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
CONF_DIR = ROOT / "conf"


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


gc = _load()
RECIPES = sorted(p.stem for p in (CONF_DIR / "recipe").glob("*.yaml"))


def settings(tmp_path=Path("/tmp/gc"), **kw):
    base = {"gpu": True, "python": "py", "work": tmp_path / "work", "artifacts": tmp_path / "artifacts",
            "hidden": 256, "ranks": 1, "qwen_model": "tiny_qwen", "seed": 7, "flash_attn": False, "overrides": [],
            "same_seed_overrides": [], "min_corr": 0.9, "kv_cache_bytes": 1 << 30, "recipes": RECIPES}
    base.update(kw)
    return gc.Settings(**base)


# ----------------------------------------------------------------------------- table
def test_format_table_lines_up_and_cleans_details():
    rows = [gc.Result("env", "pass", 1.234, "torch 2.11"),
            gc.Result("recipe_reinforce_rej", "differs", 123.45, "a | b\nc"),
            gc.Result("eval", "skip", 0, "x" * 500)]
    lines = gc.format_table(rows).splitlines()
    assert lines[0].split("|")[1:5] == [" check                ", " status  ", " seconds ", " detail "]
    assert len({len(ln.split("|")[1]) for ln in lines}) == 1  # first column padded alike
    assert lines[2] == "| env                  | pass    |     1.2 | torch 2.11 |"
    assert "| differs |   123.5 | a / b c |" in lines[3]
    assert lines[4].endswith("...  |") or lines[4].endswith("... |")
    assert len(lines[4].split("|")[4].strip()) == gc.DETAIL_CHARS
    assert set(lines[1]) <= set("|-: ")


def test_result_rejects_unknown_status():
    with pytest.raises(ValueError):
        gc.Result("x", "ok")
    assert gc.count_statuses([gc.Result("a", "pass"), gc.Result("b", "skip"), gc.Result("c", "pass")]) == {
        "pass": 2, "fail": 0, "skip": 1, "differs": 0}


def test_last_error_line():
    log = (
        "starting\n"
        "(TaskRunner pid=12) ValueError: micro batch 4 does not divide 6\n"
        "UserWarning: something deprecated\n"
        "[recipe] shutting down Ray\n\n"
    )
    assert gc.last_error_line(log) == "(TaskRunner pid=12) ValueError: micro batch 4 does not divide 6"
    assert gc.last_error_line("[recipe] error: data.train_files: x.parquet does not exist\nbye") == \
        "[recipe] error: data.train_files: x.parquet does not exist"
    assert gc.last_error_line("all good\nlast line\n\n") == "last line"
    assert gc.last_error_line("") == ""


# ----------------------------------------------------------------------------- metrics
def test_read_metrics_last_line_of_a_step_wins(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text("\n".join([json.dumps({"step": 1, "data": {"a": 1}}), "not json",
                            json.dumps({"step": 2, "data": {"a": 2}}), json.dumps({"step": 1, "data": {"a": 3}})]))
    assert gc.read_metrics(f) == {1: {"a": 3}, 2: {"a": 2}}
    assert gc.read_metrics(tmp_path / "missing.jsonl") == {}


def test_compare_metrics():
    a = {1: {"k": 1.0, "n": math.nan}, 2: {"k": 2.0, "n": 1.0}, 3: {"k": 0.0}}
    b = {1: {"k": 1.5, "n": math.nan}, 2: {"k": 1.0, "n": 1.0}}
    out = gc.compare_metrics(a, b, ("k", "n"))
    assert out["steps"] == [1, 2] and out["only_a"] == [3] and out["only_b"] == []
    assert out["diff"]["k"] == 1.0
    assert out["diff"]["n"] == 0.0  # nan in both runs counts as equal
    assert math.isnan(gc.compare_metrics({1: {"k": math.nan}}, {1: {"k": 1.0}}, ("k",))["diff"]["k"])
    assert gc.compare_metrics({1: {}}, {1: {"k": 1.0}}, ("k",))["diff"]["k"] is None
    assert gc.compare_metrics({}, {}, ("k",))["diff"]["k"] is None


def test_judge_same_seed():
    a = {1: {"critic/score/mean": 0.25, "response_length/mean": 40.0}, 2: {"critic/score/mean": 0.5,
                                                                          "response_length/mean": 38.5}}
    status, detail = gc.judge_same_seed(a, {k: dict(v) for k, v in a.items()}, 2)
    assert status == "pass"
    assert detail.startswith("max abs diff critic/score/mean 0, max abs diff response_length/mean 0 "
                             "(step 1: 0.25 vs 0.25")
    b = {k: dict(v) for k, v in a.items()}
    b[2]["response_length/mean"] = 41.0
    status, detail = gc.judge_same_seed(a, b, 2)
    assert status == "differs"
    assert "response_length/mean 2.5" in detail and "38.5 vs 41" in detail
    status, detail = gc.judge_same_seed(a, {1: a[1]}, 2)
    assert status == "fail" and "run b logged steps [1]" in detail
    status, detail = gc.judge_same_seed({1: {}, 2: {}}, {1: {}, 2: {}}, 2)
    assert status == "fail" and "missing" in detail


def _train_rows(n, corr=0.999, loss=0.1):
    return {s: {"actor/pg_loss": loss, "actor/loss": loss, gc.CORR_KEY: corr, "critic/score/mean": 0.0,
                "timing_s/step": 10.0, "timing_s/update_weights": 0.5, "rollout_corr/k3_kl": 1e-5}
            for s in range(1, n + 1)}


def test_judge_train():
    status, detail = gc.judge_train(_train_rows(3), 3, min_corr=0.9)
    assert status == "pass", detail
    assert "3 step(s)" in detail and "corr 0.999/0.999/0.999" in detail and "update_weights s 0.5/0.5/0.5" in detail
    rows = _train_rows(3)
    rows[2][gc.CORR_KEY] = 0.05
    status, detail = gc.judge_train(rows, 3, min_corr=0.9)
    assert status == "fail" and "0.05 at step 2" in detail and "weight sync" in detail
    rows = _train_rows(3)
    del rows[1][gc.CORR_KEY]
    assert gc.judge_train(rows, 3, min_corr=0.9)[0] == "fail"
    assert gc.judge_train(rows, 3)[0] == "pass"  # correlation not asked for
    assert gc.judge_train(_train_rows(2), 3)[1].startswith("logged steps [1, 2]")
    status, detail = gc.judge_train(_train_rows(1, loss=math.nan), 1)
    assert status == "fail" and "actor/pg_loss=nan at step 1" in detail
    skipped = _train_rows(1, loss=math.nan)
    skipped[1]["filter/skipped_update"] = 1.0
    status, detail = gc.judge_train(skipped, 1)
    assert status == "pass" and "update skipped" in detail


def test_judge_eval():
    res = {"backend": "vllm", "metrics": {"gsm8k/avg@4": 0.0, "average/avg@4": 0.125, "average/pass@4": 0.25}}
    status, detail = gc.judge_eval(res, "vllm", 64, 64)
    assert status == "pass" and "average/avg@4 0.125" in detail
    assert gc.judge_eval(res, "hf", 64, 64)[0] == "fail"
    assert gc.judge_eval(res, "vllm", 64, 60)[1].startswith("60 samples, expected 64")
    assert gc.judge_eval({"backend": "vllm", "metrics": {"x": 1.5}}, "vllm", None, 0)[0] == "fail"
    assert gc.judge_eval(None, "vllm", 64, 0) == ("fail", "no results.json")


# ----------------------------------------------------------------------------- budget, selection
class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_budget():
    clock = Clock()
    b = gc.Budget(480, reserve_s=15, clock=clock)
    assert b.grant(300, 60) == 300
    clock.t += 200  # 280 left, 265 after the reserve
    assert b.remaining() == 280 and b.grant(300, 60) == 265
    clock.t += 230  # 50 left, 35 after the reserve
    assert b.grant(300, 60) is None and b.grant(300, 30) == 35
    clock.t += 100
    assert b.grant(10, 0) is None


def test_select():
    names = ["data", "models", "eval", "grpo_3steps", "same_seed", "recipe_grpo", "recipe_ppo"]
    assert gc.select(names, None, None) == names
    assert gc.select(names, "grpo_3steps,same_seed", None) == ["grpo_3steps", "same_seed"]
    assert gc.select(names, "recipe_*", "recipe_ppo") == ["recipe_grpo"]
    with pytest.raises(ValueError, match="recipe_nope"):
        gc.select(names, "recipe_nope", None)
    assert gc.missing_for(("torch", "vllm"), {"torch": True, "vllm": False}) == ["vllm"]


# ----------------------------------------------------------------------------- plan
def _overrides(plan, name, log=None):
    check = next(c for c in plan if c.name == name)
    cmd = check.cmds[0] if log is None else next(c for c in check.cmds if c.log == log)
    return cmd.argv[cmd.argv.index("recipe.main") + 1:] if "recipe.main" in cmd.argv else cmd.argv


def test_plan_gpu_two_ranks():
    plan = gc.build_plan(settings(ranks=2))
    names = [c.name for c in plan]
    assert names[:5] == ["data", "models", "eval", "grpo_3steps", "same_seed"]
    assert names[5:-1] == [f"recipe_{r}" for r in RECIPES] and names[-1] == "same_seed_fd"
    fd = _overrides(plan, "same_seed_fd", "same_seed_fd_a.log")
    assert set(gc.FULL_DETERMINISM) <= set(fd) and "seed=7" in fd
    for r in RECIPES:
        o = _overrides(plan, f"recipe_{r}")
        assert f"recipe={r}" in o and "trainer.n_gpus_per_node=2" in o and "trainer.total_training_steps=1" in o
        assert "device=gpu" in o and "actor_rollout_ref.rollout.name=vllm" in o and "model=tiny" in o
    g3 = _overrides(plan, "grpo_3steps")
    assert "trainer.n_gpus_per_node=1" in g3 and "model=tiny_qwen" in g3 and "trainer.total_training_steps=3" in g3
    assert "++actor_rollout_ref.model.override_config.attn_implementation=sdpa" in g3  # no flash_attn
    assert any(o.startswith("++actor_rollout_ref.rollout.engine_kwargs.vllm.kv_cache_memory_bytes=") for o in g3)
    a, b = _overrides(plan, "same_seed", "same_seed_a.log"), _overrides(plan, "same_seed", "same_seed_b.log")
    assert "seed=7" in a and [x for x in a if "same_seed" not in x] == [x for x in b if "same_seed" not in x]
    ev = next(c for c in plan if c.name == "eval")
    assert ev.exclusive and "backend=vllm" in ev.cmds[0].argv
    models = next(c for c in plan if c.name == "models")
    assert [c.argv[c.argv.index("--tokenizer") + 1] for c in models.cmds] == ["local", "qwen2.5"]
    assert all(c.argv[c.argv.index("--hidden-size") + 1] == "256" for c in models.cmds)  # head size 64 for vLLM


def test_plan_user_overrides_come_last():
    plan = gc.build_plan(settings(overrides=["actor_rollout_ref.actor.optim.lr=5e-4"],
                                  same_seed_overrides=["actor_rollout_ref.rollout.full_determinism=true"]))
    g3 = _overrides(plan, "grpo_3steps")
    assert g3[-1] == "actor_rollout_ref.actor.optim.lr=5e-4" and "actor_rollout_ref.actor.optim.lr=1e-3" in g3
    ss = _overrides(plan, "same_seed", "same_seed_b.log")
    assert ss[-1] == "actor_rollout_ref.rollout.full_determinism=true"
    assert "full_determinism" not in " ".join(_overrides(plan, "recipe_grpo"))


def test_plan_cpu():
    plan = gc.build_plan(settings(gpu=False, hidden=64, qwen_model="tiny", flash_attn=True, kv_cache_bytes=0))
    o = _overrides(plan, "grpo_3steps")
    assert "device=cpu" in o and "actor_rollout_ref.rollout.name=hf" in o and "model=tiny" in o
    assert not any(x.startswith("++") for x in o)
    ev = next(c for c in plan if c.name == "eval")
    assert not ev.exclusive and "backend=hf" in ev.cmds[0].argv


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A small model folder (verl's start-up check loads config and tokenizer)."""
    from recipe.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("gc") / "tiny256", hidden_size=256, num_heads=4, num_kv_heads=2,
                            intermediate_size=128, vocab_size=512, max_train_rows=200)


@pytest.mark.parametrize("ranks", [1, 2])
def test_gpu_overrides_pass_startup_checks(tmp_path, tiny_model, ranks):
    """Every training command of the GPU plan composes, passes recipe.main's start-up checks
    (micro-batches tiling each rank's rows, stage nodes) and verl's validate_config."""
    import copy

    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    from recipe.main import check_stages

    plan = gc.build_plan(settings(tmp_path, ranks=ranks))
    commands = [(c.name, cmd) for c in plan for cmd in c.cmds if "recipe.main" in cmd.argv]
    assert len(commands) == 5 + len(RECIPES)
    with hydra.initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        try:
            for name, cmd in commands:
                overrides = _overrides(plan, name, cmd.log) + [f"actor_rollout_ref.model.path={tiny_model}"]
                cfg = hydra.compose("config", overrides=overrides, return_hydra_config=True)
                check_stages(cfg)
                HydraConfig.instance().set_config(cfg)
                cfg = copy.deepcopy(cfg)
                with open_dict(cfg):
                    del cfg["hydra"]
                OmegaConf.resolve(cfg)
                validate_config(config=cfg, use_reference_policy=need_reference_policy(cfg),
                                use_critic=need_critic(cfg))
                want = ranks if name.startswith("recipe_") else 1
                assert cfg.trainer.n_gpus_per_node == want and cfg.trainer.device == "cuda"
                assert cfg.actor_rollout_ref.rollout.engine_kwargs.vllm.kv_cache_memory_bytes == 1 << 30
        finally:
            HydraConfig.instance().cfg = None


# ----------------------------------------------------------------------------- scheduler
def _sh(script):
    return [sys.executable, "-c", script]


def test_runner_statuses_dependencies_and_budget(tmp_path):
    def ok(check, rcs):
        return "pass", "fine"

    plan = [
        gc.Check("a", [gc.Cmd(_sh("print('hi')"), "a.log")], want_s=30, need_s=1, judge=ok),
        gc.Check("b", [gc.Cmd(_sh("import sys; print('ValueError: boom'); sys.exit(3)"), "b.log")], want_s=30,
                 need_s=1, judge=ok),
        gc.Check("c", [gc.Cmd(_sh("print(1)"), "c.log")], after=("b",), want_s=30, need_s=1, judge=ok),
        gc.Check("d", [gc.Cmd(_sh("import time; time.sleep(30)"), "d.log")], want_s=1, need_s=1, judge=ok),
        gc.Check("e", [gc.Cmd(_sh("print(1)"), "e.log")], want_s=30, need_s=10_000, judge=ok),
        gc.Check("f", [gc.Cmd(_sh("print(1)"), "f1.log"), gc.Cmd(_sh("print(2)"), "f2.log")], want_s=30, need_s=1,
                 judge=lambda c, rcs: ("differs", f"{len(rcs)} runs")),
        gc.Check("g", [], want_s=30, need_s=1, judge=ok),  # nothing to do (e.g. data already prepared)
        gc.Check("h", [gc.Cmd(["/nonexistent/python"], "h.log")], want_s=30, need_s=1, judge=ok),
        gc.Check("i", [gc.Cmd(_sh("print(1)"), "i.log")], want_s=30, need_s=1, judge=lambda c, rcs: 1 / 0),
    ]
    seen = []
    runner = gc.Runner(plan, gc.Budget(600, reserve_s=0), 2, None, tmp_path / "logs", tmp_path, seen.append)
    runner.stagger_s = 0
    res = {r.check: r for r in runner.run()}
    assert res["a"].status == "pass" and res["a"].detail == "fine"
    assert res["b"].status == "fail" and res["b"].detail == "b.log: exit 3; ValueError: boom"
    assert res["c"].status == "skip" and res["c"].detail == "skip: needs b"
    assert res["d"].status == "fail" and "timeout after 1 s" in res["d"].detail and res["d"].seconds < 25
    assert res["e"].status == "skip" and res["e"].detail.startswith("skip: budget")
    assert res["f"].status == "differs" and res["f"].detail == "2 runs"
    assert res["g"].status == "pass"
    assert res["h"].status == "fail" and res["h"].detail.startswith("h.log: exit 127")
    assert res["i"].status == "fail" and "ZeroDivisionError" in res["i"].detail
    assert sorted(r.check for r in seen) == list("abcdefghi")
    assert (tmp_path / "logs" / "a.log").read_text().splitlines()[-1] == "hi"
