"""Every recipe for 2 steps through verl's V1 trainer on CPU, on 2 FSDP ranks (gloo), with
the group-filter metrics.

The reward is tests/e2e/parity_reward.py (mixed groups from a random tiny model); the
real math reward is exercised by test_main_job.py.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.e2e.test_main_job import read_metrics, run_job

PARITY_REWARD = str(Path(__file__).with_name("parity_reward.py"))
BATCH = 4  # data.train_batch_size in conf/device/cpu.yaml
RANKS = 2  # trainer.n_gpus_per_node of test_recipe_two_steps: batch splits and dp metric aggregation
#: PPO (n = 1) gets BATCH x 1 / RANKS = 2 rows per rank per mini-batch: micro-batches of 2
#: (recipe.config.check_micro_batches stops the run at start-up with the default 4)
PPO_MICRO = tuple(f"{key}=2" for key in ("actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu",
                                         "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu",
                                         "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu",
                                         "critic.ppo_micro_batch_size_per_gpu"))

# every recipe of conf/recipe/ but those that set a stage node (replay / dots / preference /
# lorr): test_dots_replay.py and test_preference.py run them with their own checks
STAGE_NODES = ("replay:", "dots:", "preference:", "lorr:")
RECIPES = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "conf" / "recipe").glob("*.yaml")
                 if not any(line.startswith(STAGE_NODES) for line in p.read_text().splitlines()))


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts_recipes")


def run_recipe(artifacts: Path, recipe: str, name: str, *extra: str) -> list[dict]:
    run_job(
        artifacts,
        f"recipe={recipe}",
        f"trainer.experiment_name={name}",
        "trainer.total_training_steps=2",
        "trainer.test_freq=-1",
        "trainer.save_freq=-1",
        f"reward.custom_reward_function.path={PARITY_REWARD}",
        *extra,
    )
    rows = read_metrics(artifacts / "runs" / name / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    return [r["data"] for r in rows]


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_two_steps(artifacts, recipe):
    """2 steps on 2 ranks: the batch is split over both (verl balances whole rows: each
    rank's tokens, ``global_seqlen/*``, sum to the step's), and every worker metric is
    aggregated over them."""
    steps = run_recipe(artifacts, recipe, f"e2e_{recipe}", f"trainer.n_gpus_per_node={RANKS}",
                       *(PPO_MICRO if recipe == "ppo" else ()))
    for m in steps:
        assert 0.0 <= m["reward/acc"] <= 1.0
        assert "filter/kept_groups" not in m or recipe == "reinforce_rej"
        if m.get("filter/skipped_update"):
            continue  # every group was uniform: no update this step (checked below)
        if "filter/kept_groups" not in m:  # (a filtered batch is padded with rows of its own)
            assert m["global_seqlen/mean"] * RANKS == m["perf/total_num_tokens"]
        assert m["global_seqlen/min"] <= m["global_seqlen/mean"] <= m["global_seqlen/max"]
        assert math.isfinite(m["actor/loss"])
        assert math.isfinite(m["actor/pg_loss"])
    if recipe in ("raft", "raft_pp"):
        assert all(0.0 <= m["actor/raft_kept_frac"] <= 1.0 for m in steps)
    if recipe in ("reinforce", "reinforce_rej"):
        # rewards in {-1, +1} for the Reinforce family
        assert all(-1.0 <= m["critic/score/min"] and m["critic/score/max"] <= 1.0 for m in steps)
        assert any(m["critic/score/min"] == -1.0 for m in steps)
    if recipe == "reinforce_rej":
        for m in steps:
            kept, wrong, right = m["filter/kept_groups"], m["filter/dropped_all_wrong"], m["filter/dropped_all_correct"]
            assert kept + wrong + right == BATCH
            assert m["filter/gen_rounds"] == 1
            if kept:
                assert m["actor/grad_norm"] > 0
    if recipe == "ppo":
        assert all(math.isfinite(m["critic/vf_loss"]) for m in steps)
    if recipe != "reinforce_rej":
        assert all(m["actor/grad_norm"] > 0 for m in steps)


def test_filter_refill_mode(artifacts):
    steps = run_recipe(
        artifacts, "reinforce_rej", "e2e_refill", "group_filter.mode=refill", "group_filter.max_gen_rounds=3"
    )
    for m in steps:
        assert 1 <= m["filter/gen_rounds"] <= 3
        # refill fills the batch unless it gave up at the cap
        assert m["filter/kept_groups"] == BATCH or m["filter/gave_up"] == 1
        assert m["filter/gen_rounds"] == 3 or m["filter/kept_groups"] == BATCH


def test_filter_drops_everything_skips_update(artifacts):
    # a band no group can reach with 4 responses: every group dropped, the update skipped
    steps = run_recipe(artifacts, "reinforce_rej", "e2e_all_dropped", "group_filter.band=[0.1,0.2]")
    for m in steps:
        assert m["filter/kept_groups"] == 0
        assert m["filter/skipped_update"] == 1
        assert "actor/loss" not in m
