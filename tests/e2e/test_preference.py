"""Iterative DPO and LoRR through verl's V1 trainer on CPU, with a resume after a reset.

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
RANKS = 2  # trainer.n_gpus_per_node of test_iterative_dpo and test_lorr_reset_reuse_and_resume


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts_preference")



def test_iterative_dpo(artifacts):
    """One DPO pass per step against the policy at the start of the step, on 2 FSDP ranks
    (gloo): the reference is the policy itself when the loss is evaluated (synced shard by
    shard on each rank), so every reward margin is 0 and the DPO loss is exactly
    -log sigmoid(0) = log 2 (up to float32 noise), yet the gradient is not 0; at step 2 too,
    after step 1 moved the policy.

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
        assert m["dpo/reference_refreshed"] == 1
        assert abs(m["dpo/reward_margin"]) < 1e-4
        assert m["dpo/loss"] == pytest.approx(math.log(2.0), abs=1e-4)
        assert m["dpo/chosen_logps"] < 0 and m["dpo/rejected_logps"] < 0
        assert m["actor/grad_norm"] > 0
        assert m["lorr/replay_index"] == step and m["lorr/resets"] == 0 and m["lorr/sft_weight"] == 0.0
        assert "lorr/reset_delta_norm" not in m


def test_lorr_reset_reuse_and_resume(artifacts):
    """L = 2 passes per step, a reset after every 3rd pass (inside step 2), reuse of the
    first step's pairs as soon as a reset happened (rollout_ratio 0); then a resume from
    global_step_2 (taken after the reset) restores counters, the initial pairs and theta_0.

    On 2 FSDP ranks: theta_0 is kept per rank, each its own shard of the matching
    parameters; the two files together are exactly the initial model's tensors."""
    from safetensors.torch import load_file

    name = "e2e_lorr"
    common = ("recipe=lorr_dpo", "lorr.replays=2", "lorr.reset.every=3", "lorr.reuse.rollout_ratio=0.0",
              f"trainer.n_gpus_per_node={RANKS}")
    proc, steps = _run(artifacts, name, 2, *common)
    snap = re.search(r"LoRR theta_0: (\d+) tensors .*fingerprint ([0-9a-f]+)\)", proc.stdout)
    assert snap and int(snap.group(1)) == 2  # the tiny model's two layers' mlp.down_proj.weight
    s1, s2 = steps[1], steps[2]
    assert s1["lorr/replay_index"] == 2 and s1["lorr/resets"] == 0 and s1["lorr/reused_initial"] == 0
    # lambda_k = min(0.5, 0.25 k) for k = 0, 1
    assert s1["lorr/sft_weight"] == pytest.approx(0.125)
    # the second pass moved the margin away from 0 (the first sees reference == policy)
    assert abs(s1["dpo/reward_margin_last_pass"]) > 0
    assert s2["lorr/replay_index"] == 4 and s2["lorr/resets"] == 1 and s2["lorr/reset_delta_norm"] > 0
    assert s2["lorr/reused_initial"] == 0  # the reuse decision for step 2 came before the reset

    run_dir = artifacts / "runs" / name
    saved = torch.load(run_dir / "global_step_2" / "recipe_state.pt", weights_only=False)["stages"]["preference"]
    assert saved["replays"] == 4 and saved["resets"] == 1
    assert len(saved["initial"]["keys"]) == 2 * s1["dpo/pairs"]
    shards = [torch.load(run_dir / "global_step_2" / f"lorr_theta0_rank{r}.pt", weights_only=True)
              for r in range(RANKS)]
    models = list((artifacts / "models").glob("*/model.safetensors"))
    assert len(models) == 1, models
    initial = load_file(models[0])
    assert sorted(shards[0]) == sorted(shards[1]) == sorted(n for n in initial if "down_proj" in n)
    for n in shards[0]:  # FSDP2 shards along dim 0: rank 0 the first half, rank 1 the rest
        assert all(s[n].shape[0] < initial[n].shape[0] for s in shards), n
        assert torch.equal(torch.cat([s[n] for s in shards]), initial[n].to(shards[0][n].dtype)), n

    proc, steps = _run(artifacts, name, 3, *common)
    restored = re.search(r"restored preference state: (\d+) replay passes, (\d+) resets, initial pairs (\w+), "
                         r"theta_0 fingerprint ([0-9a-f]+)", proc.stdout)
    assert restored, "the resumed run did not report restoring the preference state"
    assert restored.groups() == ("4", "1", "kept", snap.group(2))
    s3 = steps[3]
    # step 3 trains on the initial pairs again (a reset happened, rollout_ratio 0) and
    # reaches pass 6: the second reset
    assert s3["lorr/reused_initial"] == 1 and s3["dpo/pairs"] == s1["dpo/pairs"]
    assert s3["dpo/fresh_rollouts"] == 0 and s2["dpo/fresh_rollouts"] == BATCH * 4
    assert s3["lorr/replay_index"] == 6 and s3["lorr/resets"] == 2
    assert math.isfinite(s3["dpo/loss"]) and s3["actor/grad_norm"] > 0



def test_resume_inside_an_iteration_restores_its_reference(artifacts):
    """preference.iteration_steps=3: steps 4-6 are iteration 2, whose reference is the policy
    after step 3. The checkpoint after step 4 lies inside it, so it keeps that reference
    (reference_rank0.pt) and a resume restores it instead of the initial model."""
    from recipe.stages.workers import theta0_fingerprint

    name = "e2e_idpo_iter"
    common = ("recipe=iterative_dpo", "preference.iteration_steps=3")
    _, steps = _run(artifacts, name, 4, *common)
    assert steps[1]["dpo/reference_refreshed"] == 1 and steps[4]["dpo/reference_refreshed"] == 1
    assert "dpo/reference_refreshed" not in steps[2] and "dpo/reference_refreshed" not in steps[3]
    run_dir = artifacts / "runs" / name
    ref2 = torch.load(run_dir / "global_step_2" / "reference_rank0.pt", weights_only=True)  # iteration 1's start
    ref4 = torch.load(run_dir / "global_step_4" / "reference_rank0.pt", weights_only=True)  # iteration 2's start
    assert theta0_fingerprint(ref2) != theta0_fingerprint(ref4)  # the policy moved in steps 1-3

    proc, steps = _run(artifacts, name, 5, *common)
    restored = re.search(r"restored reference model of the iteration's start \(fingerprint ([0-9a-f]+)\)",
                         proc.stdout)
    assert restored, "the resumed run did not restore the reference"
    assert restored.group(1) == theta0_fingerprint(ref4)
    assert "dpo/reference_refreshed" not in steps[5]  # step 5 is inside iteration 2
