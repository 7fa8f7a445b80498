"""Iterative DPO and LoRR (real iterations) through verl's V1 trainer on CPU, with a resume inside an iteration.

Reward: tests/e2e/parity_reward.py (mixed groups from a random tiny model, so that most
groups have a reward gap and give a pair).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from tests.e2e.test_main_job import run_parity_steps as _run

BATCH = 4  # data.train_batch_size of conf/device/cpu.yaml
RANKS = 2  # trainer.n_gpus_per_node of both tests


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts_preference")



def test_iterative_dpo(artifacts):
    """One iteration per step (rollout_steps 1), one epoch, one optimizer step, against the
    policy at the start of the iteration, on 2 FSDP ranks (gloo): the reference is the policy
    itself when the loss is evaluated (synced shard by shard on each rank), so every reward
    margin is 0 and the DPO loss is exactly -log sigmoid(0) = log 2 (up to float32 noise), yet
    the gradient is not 0; at step 2 too, after step 1 moved the policy.

    Micro-batches of one pair: an odd pair count leaves one rank a padding-only micro-batch,
    yet every rank reports the same metric keys (the old code crashed in verl's dp
    aggregation there: "same number of values ... [2, 1]"). Log-prob micro-batches of 64 rows
    (more than the step has) must still work: the trainer sizes them to whole pairs (verl's
    infer path asserts rows % micro == 0)."""
    _, steps = _run(artifacts, "e2e_idpo", 2, "recipe=iterative_dpo", f"trainer.n_gpus_per_node={RANKS}",
                    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2",
                    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=64",
                    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=64")
    for step in (1, 2):
        m = steps[step]
        assert 1 <= m["dpo/pairs"] <= BATCH
        assert m["dpo/pairs"] + m["dpo/skipped_groups"] == BATCH
        assert m["dpo/fresh_rollouts"] == BATCH * 4
        assert m["dpo/reference_refreshed"] == 1 and m["dpo/reference_refreshes"] == step
        assert abs(m["dpo/reward_margin"]) < 1e-4
        assert m["dpo/loss"] == pytest.approx(math.log(2.0), abs=1e-4)
        assert m["dpo/chosen_logps"] < 0 and m["dpo/rejected_logps"] < 0
        assert m["actor/grad_norm"] > 0
        assert (m["lorr/iteration"], m["lorr/epoch"], m["lorr/optimizer_steps"]) == (step, 1, 1)
        assert m["lorr/replay_index"] == step and m["lorr/resets"] == 0 and m["lorr/sft_weight"] == 0.0
        assert "lorr/reset_delta_norm" not in m


def _scheduler_steps(ckpt: Path) -> int:
    """LR-scheduler steps taken so far: ``last_epoch`` of the actor's scheduler in verl's
    checkpoint (rank 0's ``extra_state``)."""
    files = sorted((ckpt / "actor").glob("extra_state_world_size_*_rank_0.pt"))
    assert files, f"no extra_state file under {ckpt / 'actor'}"
    return int(torch.load(files[0], weights_only=False)["lr_scheduler"]["last_epoch"])


def test_lorr_iterations_reset_reuse_and_resume(artifacts):
    """LoRR with real iterations on 2 FSDP ranks: 3 rollout steps per iteration, L = 2 epochs
    in mini-batches of 2 pairs, a reset after each iteration, reuse of iteration 1's pairs as
    soon as a reset happened (rollout_ratio 0).

    Run A (2 steps): both collect only (no update, no optimizer or scheduler step); the
    checkpoint after step 2 lies inside iteration 1 and keeps its pending pairs. Run B resumes
    it: step 3 trains iteration 1 on the pairs of steps 1-3 (reference synced once, 2 epochs x
    ceil(P / 2) optimizer steps, then the reset), step 4 is iteration 2, which reuses all P
    pairs without rollouts. verl's LR scheduler took exactly one step per optimizer step."""
    from safetensors.torch import load_file

    name = "e2e_lorr"
    common = ("recipe=lorr_dpo", "lorr.replays=2", "preference.iteration.rollout_steps=3",
              "preference.iteration.mini_batch_pairs=2", "lorr.reuse.rollout_ratio=0.0",
              "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=2", f"trainer.n_gpus_per_node={RANKS}")
    proc, steps = _run(artifacts, name, 2, *common)
    snap = re.search(r"LoRR theta_0: (\d+) tensors .*fingerprint ([0-9a-f]+)\)", proc.stdout)
    assert snap and int(snap.group(1)) == 2  # the tiny model's two layers' mlp.down_proj.weight
    assert "no group left to train on" not in proc.stdout + proc.stderr  # planned skips: no warning
    s1, s2 = steps[1], steps[2]
    for s, m in ((1, s1), (2, s2)):
        assert (m["lorr/iteration"], m["lorr/epoch"], m["lorr/optimizer_steps"], m["lorr/resets"]) == (1, 0, 0, 0)
        assert m["dpo/fresh_rollouts"] == BATCH * 4 and m["dpo/reference_refreshes"] == 0
        assert "actor/grad_norm" not in m and "dpo/loss" not in m  # collection only
    assert s2["dpo/iteration_pairs"] == s1["dpo/pairs"] + s2["dpo/pairs"]

    run_dir = artifacts / "runs" / name
    saved = torch.load(run_dir / "global_step_2" / "recipe_state.pt", weights_only=False)["stages"]["preference"]
    assert (saved["iteration"], saved["position"], saved["replays"], saved["resets"]) == (1, 2, 0, 0)
    assert len(saved["pending"]["keys"]) == 2 * s2["dpo/iteration_pairs"] and saved["initial"] is None
    assert _scheduler_steps(run_dir / "global_step_2") == 0
    shards = [torch.load(run_dir / "global_step_2" / f"lorr_theta0_rank{r}.pt", weights_only=True)
              for r in range(RANKS)]
    models = list((artifacts / "models").glob("*/model.safetensors"))
    assert len(models) == 1, models
    initial = load_file(models[0])
    assert sorted(shards[0]) == sorted(shards[1]) == sorted(n for n in initial if "down_proj" in n)
    for n in shards[0]:  # FSDP2 shards along dim 0: rank 0 the first half, rank 1 the rest
        assert all(s[n].shape[0] < initial[n].shape[0] for s in shards), n
        assert torch.equal(torch.cat([s[n] for s in shards]), initial[n].to(shards[0][n].dtype)), n

    proc, steps = _run(artifacts, name, 4, *common)
    restored = re.search(r"restored preference state: (\d+) replay passes, (\d+) resets, initial pairs (\w+), "
                         r"theta_0 fingerprint ([0-9a-f]+); iteration (\d+) step (\d+), (\d+) pending pairs",
                         proc.stdout)
    assert restored, "the resumed run did not report restoring the preference state"
    assert restored.groups() == ("0", "0", "none", snap.group(2), "1", "3", str(int(s2["dpo/iteration_pairs"])))
    s3, s4 = steps[3], steps[4]
    n_pairs = s2["dpo/iteration_pairs"] + s3["dpo/pairs"]
    per_epoch = math.ceil(n_pairs / 2)
    assert s3["dpo/iteration_pairs"] == n_pairs >= 1
    assert (s3["lorr/iteration"], s3["lorr/epoch"], s3["lorr/replay_index"]) == (1, 2, 2)
    assert s3["lorr/optimizer_steps"] == 2 * per_epoch
    assert s3["lorr/resets"] == 1 and s3["lorr/reset_delta_norm"] > 0
    assert s3["dpo/reference_refreshed"] == 1 and s3["dpo/reference_refreshes"] == 1
    assert s3["lorr/sft_weight"] == pytest.approx(0.125)  # lambda 0, 0.25
    assert math.isfinite(s3["dpo/loss"]) and s3["actor/grad_norm"] > 0
    # iteration 2: all of iteration 1's pairs again, no rollouts, reference synced again
    assert s4["lorr/reused_initial"] == 1 and s4["dpo/fresh_rollouts"] == 0
    assert s4["dpo/iteration_pairs"] == n_pairs and s4["lorr/iteration"] == 2
    assert s4["lorr/optimizer_steps"] == 2 * per_epoch and s4["lorr/replay_index"] == 4
    assert s4["lorr/resets"] == 2 and s4["dpo/reference_refreshes"] == 2
    saved = torch.load(run_dir / "global_step_4" / "recipe_state.pt", weights_only=False)["stages"]["preference"]
    assert len(saved["initial"]["keys"]) == 2 * n_pairs and saved["optimizer_steps"] == 4 * per_epoch
    assert _scheduler_steps(run_dir / "global_step_4") == 4 * per_epoch
