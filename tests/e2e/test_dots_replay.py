"""GRPO + DOTS + rollout replay through verl's V1 trainer on CPU, with a resume (on 2 FSDP
ranks).

Reward: tests/e2e/parity_reward.py (mixed groups from a random tiny model). The buffer
stores every group here (``replay.store_only_mixed=false``) so that replay is certain to
start right after the warm-up (``replay.warmup_steps``, default 2) whatever the sampled
responses are. The buffer has the default size C = ``replay.capacity_ratio`` 2 x the 2 fresh
groups of a replay step = 4 groups.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from recipe.stages.rollout_replay import state_fingerprint
from tests.e2e.test_main_job import run_parity_steps as _run

BATCH = 4  # data.train_batch_size of conf/device/cpu.yaml
REF_SIZE = 16  # dots.ref_size of conf/device/cpu.yaml
HOLDOUT = 8  # dots.holdout_size of conf/device/cpu.yaml
N = 4  # actor_rollout_ref.rollout.n of recipe=grpo_dots_rr on CPU
RANKS = 2
CAPACITY = 2 * (BATCH // 2)  # replay.capacity_ratio x round(replay.fresh_fraction x BATCH)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts_dots_rr")



def test_grpo_dots_rr_rounds_replay_and_resume(artifacts):
    """On 2 ranks: each step's fresh and replayed rows are split over both ranks for the old
    log-probs and the update, and every row comes back with its pi_old (stored as mu). The
    replay defaults: steps 1-2 all fresh (warm-up), fresh rows weight exactly 1, a buffer of
    C = 4 groups; step 3 (after a resume) replays 2 groups of step 2."""
    name = "e2e_dots_rr"
    common = ("recipe=grpo_dots_rr", "replay.store_only_mixed=false", f"trainer.n_gpus_per_node={RANKS}")
    _, steps = _run(artifacts, name, 2, *common)
    run_dir = artifacts / "runs" / name
    s1, s2 = steps[1], steps[2]

    # step 1: a DOTS reference round, all fresh (empty buffer), then every group stored
    assert s1["dots/rounds"] == 1 and s1["dots/ref_rollout_s"] > 0
    assert 0.0 <= s1["dots/ref_difficulty_mean"] <= 1.0
    assert 0.0 <= s1["dots/selected_mean_difficulty"] <= 1.0
    assert "dots/pred_pearson" in s1  # nan when the held-out difficulties are all equal
    assert s1["dots/pred_holdout_n"] == HOLDOUT and s1["dots/pred_pooled_n"] == HOLDOUT
    pearson = s1["dots/pred_pearson"]  # NaN is written to metrics.jsonl as null
    assert s1["dots/pred_pearson_undefined"] == float(pearson is None or not math.isfinite(pearson))
    assert s1["dots/calibration_fallback"] in (0.0, 1.0)
    # reference cost: K x G rollouts against the step's BATCH x N fresh ones
    assert s1["dots/reference_rollouts"] == REF_SIZE * N and s1["dots/reference_ratio"] == REF_SIZE / BATCH
    assert s2["dots/pred_pooled_n"] == HOLDOUT and "dots/pred_pearson_pooled" in s2  # carried between rounds
    # steps 1 and 2: the warm-up, all fresh; every group stored, C = 4 evicts step 1's at step 2
    for m in (s1, s2):
        assert m["replay/capacity"] == CAPACITY
        assert m["replay/fresh_groups"] == BATCH and m["replay/replayed_groups"] == 0
        assert m["replay/stored"] == BATCH and m["replay/size"] == CAPACITY
        assert not {"replay/mean_age", "replay/max_age", "replay/is_weight_ess"} & set(m)  # logged when replaying
        # verl's token-level weights are on (decoupled); fresh rows get exactly 1 (correction_rows=replayed)
        assert m["rollout_corr/rollout_is_min"] == m["rollout_corr/rollout_is_max"] == 1.0
    assert s1["replay/evicted"] == 0 and s2["replay/evicted"] == BATCH
    assert s2["dots/rounds"] == 1  # next round at step 3 (dots.every=2)
    for m in (s1, s2):
        assert math.isfinite(m["actor/pg_loss"]) and m["actor/grad_norm"] > 0
        assert 0.0 <= m["dots/effective_ratio"] <= 1.0
        assert m["global_seqlen/mean"] * RANKS == m["perf/total_num_tokens"]  # the rows split over 2 ranks

    rounds = [json.loads(line) for line in (run_dir / "dots_rounds.jsonl").read_text().splitlines()]
    assert len(rounds) == REF_SIZE and {r["step"] for r in rounds} == {1}
    assert all(0.0 <= r["difficulty"] <= 1.0 and r["n"] == 4 for r in rounds)
    assert list((artifacts / "cache" / "dots").glob("emb-*.npy")), "question embeddings were not cached"

    # resume from global_step_2: the buffer comes back exactly (same fingerprint) and step 3
    # replays from it right away (a fresh buffer would make step 3 all fresh)
    saved = torch.load(run_dir / "global_step_2" / "recipe_state.pt", weights_only=False)["stages"]
    assert [g["step"] for g in saved["rollout_replay"]["groups"]] == [2] * CAPACITY
    # every stored row has the pi_old the workers computed, whichever rank held it
    mus = [mu for g in saved["rollout_replay"]["groups"] for mu in g["payload"]["behaviour_log_probs"]]
    assert len(mus) == CAPACITY * N
    assert all(mu.numel() > 0 and torch.isfinite(mu).all() and (mu <= 0).all() and (mu < 0).any() for mu in mus)
    proc, steps = _run(artifacts, name, 3, *common)
    restored = re.search(r"restored replay buffer: (\d+) groups \(fingerprint ([0-9a-f]+)\)", proc.stdout)
    assert restored, "the resumed run did not report restoring the replay buffer"
    assert int(restored.group(1)) == len(saved["rollout_replay"]["groups"])
    assert restored.group(2) == state_fingerprint(saved["rollout_replay"])
    s3 = steps[3]
    assert s3["replay/replayed_groups"] == BATCH // 2 and s3["replay/fresh_groups"] == BATCH // 2
    # the buffer holds step 2's groups only (C = 2 x fresh): every replayed group is 1 step old
    assert s3["replay/mean_age"] == s3["replay/max_age"] == 1.0
    # behaviour weights pi_old(step 3) / mu(step 2) after one update: spread, no truncation
    w = {k: s3[f"replay/{k}"] for k in ("is_weight_mean", "is_weight_std", "is_weight_min", "is_weight_max",
                                        "is_weight_ess", "truncated_frac")}
    assert 0 < w["is_weight_min"] <= w["is_weight_mean"] <= w["is_weight_max"] < math.inf, w
    assert w["is_weight_std"] > 0 and 0 < w["is_weight_ess"] < 1 and w["truncated_frac"] == 0.0, w
    # verl's weights include the replayed ones; verl computes them from the bf16 log-probs of
    # the CPU actor, ours in float64 from the same values: equal up to one bf16 rounding (2^-8)
    assert s3["rollout_corr/rollout_is_max"] >= w["is_weight_max"] * (1 - 2**-7)
    assert math.isfinite(s3["actor/pg_loss"]) and s3["global_seqlen/mean"] * RANKS == s3["perf/total_num_tokens"]
    assert s3["dots/rounds"] == 2  # restored round counter + the round due at step 3
    rounds = [json.loads(line) for line in (run_dir / "dots_rounds.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rounds} == {1, 3}


def test_replay_alone_on_another_recipe_plain_correction(artifacts):
    """Replay through config alone on RAFT++, with the paper's plain correction, truncated."""
    _, steps = _run(
        artifacts, "e2e_rr_raft_pp", 2, "recipe=raft_pp", "replay.enable=true", "replay.correction=plain",
        "replay.truncation=2.0", "replay.store_only_mixed=false", "replay.warmup_steps=1",
    )
    s1, s2 = steps[1], steps[2]
    assert "dots/rounds" not in s1  # DOTS stays off
    assert s1["replay/replayed_groups"] == 0 and s2["replay/replayed_groups"] == BATCH // 2
    assert 0.0 < s2["replay/is_weight_mean"] <= s2["replay/is_weight_max"] <= 2.0  # truncated at c = 2
    assert 0.0 <= s2["replay/truncated_frac"] <= 1.0 and s2["replay/mean_age"] == s2["replay/max_age"] == 1.0
    assert "rollout_corr/rollout_is_mean" not in s2  # plain: verl's IS weights stay off
    assert math.isfinite(s2["actor/pg_loss"]) and s2["actor/grad_norm"] > 0
