"""Tests of the preference stage (recipe/stages/preference.py) without Ray or a verl run.

TransferQueue is replaced by :class:`FakeTQ` (an in-memory ``partition -> key -> fields``
store with the calls the stage makes, monkeypatched into the module); verl's actor worker
group by :class:`FakeWG`, which records every call and answers like verl's
``update_actor`` (``{"metrics": {name: [values]}}``). Expected values are computed by hand
in the comments (or with numpy's own generator for the reuse draws), not with the module's
helpers.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from transfer_queue import KVBatchMeta

import recipe.stages.preference as pref_mod
import verl.trainer.ppo.padding_utils as padding_utils
from recipe.config import PreferenceConfig
from recipe.stages.base import Handles, SampleContext
from recipe.stages.preference import PreferenceStage
from recipe.stages.rows import COLLECTING, REUSED, SKIP_UPDATE

from tests.unit.stages.fakes import P, FakeTQ


# ----------------------------------------------------------------------------- fakes
class FakeWG:
    """verl's actor worker group: records calls in ``events``; ``update_actor`` answers the
    next entry of ``pass_metrics`` (cycled) and notes the ``sft_weight`` it would train on."""

    def __init__(self, fake_tq: FakeTQ | None = None, pass_metrics=None, delta_norms=(0.3, 0.4),
                 dispatch=(0, 1)):
        self.tq = fake_tq
        self.pass_metrics = pass_metrics or [{"dpo/loss": [0.5]}]
        self.delta_norms = delta_norms
        self.events: list = []
        self.reset_args: list = []
        self.sft_weights: list[list[float]] = []
        self.extra_infos: list[dict] = []
        self._dispatch_info: dict = {}
        self._dispatch = list(dispatch)

    def _query_dispatch_info(self, role):
        assert role == "actor"
        return self._dispatch

    def update_actor(self, batch):
        self.events.append("update")
        self.sft_weights.append([float(self.tq.field(k, "sft_weight", batch.partition_id)) for k in batch.keys])
        self.extra_infos.append(dict(batch.extra_info))
        m = self.pass_metrics[(len(self.sft_weights) - 1) % len(self.pass_metrics)]
        return {"metrics": {k: list(v) for k, v in m.items()}}

    def recipe_lorr_reset(self, alpha, pattern, reset_optimizer=False):
        self.events.append("reset")
        self.reset_args.append((alpha, pattern, reset_optimizer))
        return [{"changed": ["model.layers.0.mlp.down_proj.weight"], "delta_norm": d} for d in self.delta_norms]

    def recipe_sync_reference(self):
        self.events.append("sync")
        return [3 for _ in self.delta_norms]

    def recipe_set_preference_loss(self, pref):
        loss = PreferenceConfig.from_config(pref).loss  # what the worker method parses
        self.events.append(("set_loss", loss))
        return [loss] * 2

    def recipe_lorr_snapshot(self, pattern):
        self.events.append(("snapshot", pattern))
        return [{"tensors": 2, "numel": 8, "fingerprint": "f00d"}] * 2

    def recipe_lorr_save(self, folder):
        self.events.append(("save", folder))
        return [f"{folder}/lorr_theta0_rank0.pt", f"{folder}/lorr_theta0_rank1.pt"]

    def recipe_lorr_load(self, folder):
        self.events.append(("load", folder))
        return ["beef", "beef"]



@pytest.fixture
def fake_tq(monkeypatch):
    fake = FakeTQ()
    monkeypatch.setattr(pref_mod, "tq", fake)
    monkeypatch.setattr(padding_utils, "tq", fake)
    return fake


LORR_OFF = {"enable": False}


#: Counters every step reports from ``sample`` (a fresh stage's first step).
FIRST_STEP = {"lorr/iteration": 1, "lorr/reused_initial": 0, "lorr/epoch": 0, "lorr/optimizer_steps": 0,
              "lorr/resets": 0, "lorr/replay_index": 0, "dpo/reference_refreshes": 0}


def make_config(pref=None, lorr=None, micro=4, dynamic=False):
    return OmegaConf.create({
        "preference": {"enable": True, **(pref or {})},
        "lorr": LORR_OFF if lorr is None else lorr,
        "actor_rollout_ref": {
            "actor": {"ppo_micro_batch_size_per_gpu": micro, "use_dynamic_bsz": dynamic, "data_loader_seed": 7},
            "rollout": {"temperature": 0.9},
        },
    })


def make_stage(pref=None, lorr=None, micro=4, dynamic=False) -> PreferenceStage:
    config = make_config(pref, lorr, micro, dynamic)
    return PreferenceStage(PreferenceConfig.from_config(config.preference), config)


def lorr_cfg(replays=3, every=1, unit="iterations", reset=True, reuse=False, ratio=0.5, sft=True, reset_optimizer=False):
    return {"enable": True, "replays": replays,
            "reset": {"enable": reset, "alpha": 0.5, "pattern": "down_proj", "every": every, "unit": unit,
                      "reset_optimizer": reset_optimizer},
            "reuse": {"enable": reuse, "rollout_ratio": ratio},
            "sft": {"enable": sft, "growth": 0.25, "cap": 0.5}}


def response(uid, j, rm, acc=None, length=None, extra_fields=True):
    """One row as verl's agent loop puts it (rm_scores token-level; responses distinct per row)."""
    t = length or len(rm)
    row = {
        "prompts": torch.tensor([1, 2, 3], dtype=torch.int64),
        "responses": torch.arange(10 * (j + 1), 10 * (j + 1) + t, dtype=torch.int64),
        "response_mask": torch.ones(t, dtype=torch.int64),
        "rm_scores": torch.tensor(rm, dtype=torch.float32),
    }
    if extra_fields:
        row["extra_fields"] = {"reward_extra_info": {"acc": float(acc if acc is not None else sum(rm))}}
    return f"{uid}_{j}_0", row


def put_rollouts(fake, rows: list[tuple[str, dict]], step=1, tags=None):
    """The agent loop's rows in TransferQueue; returns the batch the group filter hands on."""
    for k, row in rows:
        fake.data.setdefault(P, {})[k] = dict(row)
    keys = [k for k, _ in rows]
    tags = tags or [{"status": "finished", "global_steps": step, "src": k} for k in keys]
    return KVBatchMeta(partition_id=P, keys=keys, tags=tags)


class Forget:
    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, keys):
        self.calls.append(list(keys))


def ctx(step=1):
    return SampleContext(step=step, partition_id=P, batch_size=4, forget=Forget())


def groups():
    """Three groups: ua has a gap (scores 1, 0, 1), ub none (0.5, 0.5), uc a gap (-1, 2)."""
    return [
        response("ua", 0, [0.0, 1.0]),
        response("ua", 1, [0.0, 0.0, 0.0]),
        response("ua", 2, [1.0, 0.0]),
        response("ub", 0, [0.25, 0.25]),
        response("ub", 1, [0.5]),
        response("uc", 0, [-0.5, -0.5]),
        response("uc", 1, [2.0]),
    ]


# ----------------------------------------------------------------------------- sample: pairs
def test_sample_builds_pairs_layout_keys_fields_and_forgets_sources(fake_tq):
    stage = make_stage()
    rows = dict(groups())
    for row in rows.values():  # a stage field (e.g. left by a replayed row): dropped from the pair rows
        row["ref_log_prob"] = -torch.ones_like(row["rm_scores"])
    batch = put_rollouts(fake_tq, list(rows.items()))
    c, metrics = ctx(), {}
    out = stage.sample(c, batch, metrics)

    # best_worst: ua -> (ua_0 first max 1.0, ua_1 min 0.0); ub no gap; uc -> (uc_1 2.0, uc_0 -1.0)
    assert out.keys == ["ua_pair0chosen_0", "ua_pair0rejected_0", "uc_pair1chosen_0", "uc_pair1rejected_0"]
    assert out.partition_id == P
    src = ["ua_0_0", "ua_1_0", "uc_1_0", "uc_0_0"]
    assert [t["src"] for t in out.tags] == src  # tags copied from the source rows
    assert metrics == {**FIRST_STEP, "dpo/pairs": 2, "dpo/skipped_groups": 1, "dpo/fresh_rollouts": 7,
                       "dpo/iteration_pairs": 2, "dpo/fresh_score_mean": pytest.approx((1 + 0 + 1 + 0.5 + 0.5 - 1 + 2) / 7)}
    # the source rows left TransferQueue and the sampler was told so
    assert set(fake_tq.data[P]) == set(out.keys)
    assert c.forget.calls == [list(rows)]
    assert fake_tq.cleared == [list(rows)]
    for key, s, pid, chosen in zip(out.keys, src, [0, 0, 1, 1], [True, False, True, False]):
        row = fake_tq.data[P][key]
        assert torch.equal(row["responses"], rows[s]["responses"])
        assert torch.equal(row["rm_scores"], rows[s]["rm_scores"])
        assert int(row["pair_id"]) == pid and bool(row["is_chosen"]) is chosen
        assert "ref_log_prob" not in row
        assert fake_tq.tags[P][key]["src"] == s
    assert stage.initial is None  # reuse off: nothing kept


def test_sample_score_key_and_all_mode_repeats_responses(fake_tq):
    stage = make_stage({"score_key": "acc", "pairs": "all"})
    # acc (not rm_scores) decides: [1, 0, 1, 0] -> pairs (0,1), (0,3), (2,1), (2,3)
    rows = [response("ux", j, [9.0 * (j == 1)], acc=a) for j, a in enumerate([1, 0, 1, 0])]
    batch = put_rollouts(fake_tq, rows)
    metrics = {}
    out = stage.sample(ctx(), batch, metrics)
    assert out.keys == [f"ux_pair{j}{r}_0" for j in range(4) for r in ("chosen", "rejected")]
    src = [0, 1, 0, 3, 2, 1, 2, 3]
    for key, s in zip(out.keys, src):
        assert torch.equal(fake_tq.field(key, "responses"), rows[s][1]["responses"])
    assert [int(fake_tq.field(k, "pair_id")) for k in out.keys] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert metrics["dpo/pairs"] == 4 and metrics["dpo/fresh_score_mean"] == 0.5


def test_sample_without_rm_scores_or_score_key_field_raises(fake_tq):
    key, row = response("uz", 0, [1.0])
    del row["rm_scores"]
    with pytest.raises(RuntimeError, match="score_key"):
        make_stage().sample(ctx(), put_rollouts(fake_tq, [(key, row), response("uz", 1, [0.0])]), {})
    with pytest.raises(RuntimeError, match="preference.score_key='nope'"):
        make_stage({"score_key": "nope"}).sample(ctx(), put_rollouts(fake_tq, [response("uz", 0, [1.0])]), {})


def test_sample_no_reward_gap_tags_every_row_skip_update(fake_tq):
    stage = make_stage()
    rows = [response("ub", 0, [0.5]), response("ub", 1, [0.25, 0.25]), response("ue", 0, [0.0])]
    batch = put_rollouts(fake_tq, rows)
    c, metrics = ctx(), {}
    out = stage.sample(c, batch, metrics)
    assert out is batch and out.keys == [k for k, _ in rows]
    assert all(t[SKIP_UPDATE] is True for t in out.tags)
    assert metrics["dpo/pairs"] == 0 and metrics["dpo/skipped_groups"] == 2 and metrics["dpo/fresh_rollouts"] == 3
    assert c.forget.calls == [] and fake_tq.cleared == []
    assert set(fake_tq.data[P]) == {k for k, _ in rows}  # nothing moved
    # a batch the filter already skipped passes through untouched (iteration 2 has no pair either)
    metrics = {}
    assert stage.sample(ctx(), out, metrics) is out
    assert metrics == {**FIRST_STEP, "lorr/iteration": 2, "dpo/pairs": 0, "dpo/skipped_groups": 0,
                       "dpo/fresh_rollouts": 3, "dpo/iteration_pairs": 0}


# ----------------------------------------------------------------------------- iterations: collection, initial pairs, reuse
def step(stage, fake_tq, step_no, rows, h=None):
    """One step's plan + sample (as the trainer runs them); returns (fresh prompts, batch, metrics)."""
    h = h or Handles(config=stage.config, step=step_no)
    n, _ = stage.plan(h, 4)
    metrics = {}
    batch = put_rollouts(fake_tq, rows, step_no) if n else KVBatchMeta(partition_id=P, keys=[], tags=[])
    return n, stage.sample(ctx(step_no), batch, metrics), metrics


def fresh_pair(prefix):
    return [response(prefix, 0, [1.0]), response(prefix, 1, [0.0])]


def test_collection_steps_keep_pairs_and_the_last_step_trains_on_all(fake_tq):
    """rollout_steps = 3: steps 1 and 2 only collect (their batch is skipped: no log-probs, no
    update; the rollouts stay for verl's clean-up), step 3 hands on all 2 + 1 + 1 pairs with
    pair ids renumbered 0..3."""
    stage = make_stage({"iteration": {"rollout_steps": 3}})
    n, out1, m1 = step(stage, fake_tq, 1, groups())
    assert n == 4 and all(t[SKIP_UPDATE] is True for t in out1.tags) and fake_tq.cleared == []
    assert all(t[COLLECTING] is True for t in out1.tags)  # a planned skip: the trainer does not warn
    assert m1["lorr/iteration"] == 1 and m1["dpo/pairs"] == 2 and m1["dpo/iteration_pairs"] == 2
    n, out2, m2 = step(stage, fake_tq, 2, fresh_pair("s2"))
    assert all(t[SKIP_UPDATE] is True for t in out2.tags)
    assert m2["dpo/iteration_pairs"] == 3 and stage.position == 2 and stage.step_trains is False
    fake_tq.clear_partition()  # verl's end-of-step clean-up of the skipped steps
    n, out3, m3 = step(stage, fake_tq, 3, fresh_pair("s3"))
    assert n == 4 and m3["lorr/iteration"] == 1 and m3["dpo/iteration_pairs"] == 4 and m3["dpo/pairs"] == 1
    assert out3.keys == ["ua_pair0chosen_0", "ua_pair0rejected_0", "uc_pair1chosen_0", "uc_pair1rejected_0",
                         "s2_pair0chosen_0", "s2_pair0rejected_0", "s3_pair0chosen_0", "s3_pair0rejected_0"]
    assert [int(fake_tq.field(k, "pair_id")) for k in out3.keys] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [bool(fake_tq.field(k, "is_chosen")) for k in out3.keys] == [True, False] * 4
    assert stage.step_trains is True and (stage.iteration, stage.position, stage.pending) == (2, 0, None)
    assert fake_tq.cleared == [["s3_0_0", "s3_1_0"]]  # only the training step's rollouts leave


def test_initial_data_is_all_of_iteration_1s_pairs(fake_tq):
    stage = make_stage({"iteration": {"rollout_steps": 2}}, lorr_cfg(reuse=True))
    step(stage, fake_tq, 1, fresh_pair("s1"))
    assert stage.initial is None  # kept once iteration 1 is complete
    fake_tq.clear_partition()
    _, out, _ = step(stage, fake_tq, 2, fresh_pair("s2") + [response("s2b", 0, [3.0]), response("s2b", 1, [1.0])])
    keys = ["s1_pair0chosen_0", "s1_pair0rejected_0", "s2_pair0chosen_0", "s2_pair0rejected_0",
            "s2b_pair1chosen_0", "s2b_pair1rejected_0"]
    assert out.keys == keys and stage.initial["keys"] == keys
    assert [int(r["pair_id"]) for r in stage.initial["rows"]] == [0, 0, 1, 1, 2, 2]
    fake_tq.clear_partition()
    step(stage, fake_tq, 3, fresh_pair("s3"))
    step(stage, fake_tq, 4, fresh_pair("s4"))
    assert stage.initial["keys"] == keys  # iteration 2's pairs do not join


def test_reuse_drawn_at_iteration_starts_after_a_reset(fake_tq):
    """rollout_steps = 2, reset after every iteration, reuse with probability 1 - 0.5: the
    draw (numpy default_rng(seed + 1)) is made at an iteration's first step only; a reuse
    iteration is one step without rollouts."""
    stage = make_stage({"seed": 3, "iteration": {"rollout_steps": 2}},
                       lorr_cfg(replays=1, reuse=True, ratio=0.5, sft=False))
    fresh_state = np.random.default_rng(4).bit_generator.state
    wg = FakeWG(fake_tq)
    step(stage, fake_tq, 1, fresh_pair("s1"))
    fake_tq.clear_partition()
    _, first, _ = step(stage, fake_tq, 2, fresh_pair("s2"))
    assert stage.rng.bit_generator.state == fresh_state  # no draw before a reset
    stage.update(wg, first, {})
    assert stage.resets == 1 and wg.events == ["update", "reset"]
    fake_tq.clear_partition()

    ref = np.random.default_rng(4)  # .943 .511 .976 .081 .607 .376 -> reuse, reuse, reuse, fresh, reuse, fresh
    plan, s = [], 3
    for _ in range(6):
        reuse = ref.random() >= 0.5
        n, out, m = step(stage, fake_tq, s, fresh_pair(f"s{s}"))
        assert (n == 0) is reuse and m["lorr/reused_initial"] == int(reuse)
        if reuse:
            assert out.keys == stage.initial["keys"] and all(t[REUSED] is True for t in out.tags)
            assert m["dpo/fresh_rollouts"] == 0 and m["dpo/iteration_pairs"] == 2
            plan.append((s, "reuse"))
            s += 1
        else:
            state = stage.rng.bit_generator.state
            fake_tq.clear_partition()
            n2, out2, m2 = step(stage, fake_tq, s + 1, fresh_pair(f"s{s + 1}"))
            assert n2 == 4 and stage.rng.bit_generator.state == state  # no draw inside the iteration
            assert m2["lorr/reused_initial"] == 0 and len(out2.keys) == 4
            plan.append((s, "fresh"))
            s += 2
        fake_tq.clear_partition()
    assert plan == [(3, "reuse"), (4, "reuse"), (5, "reuse"), (6, "fresh"), (8, "reuse"), (9, "fresh")]
    assert stage.iteration == 8  # 1 + 1 (trained) + 6


def test_plan_never_draws_without_reuse(fake_tq):
    stage = make_stage({"seed": 3}, lorr_cfg(reuse=False))
    stage.resets, stage.initial = 5, {"keys": ["a"], "rows": [{}], "tags": [{}]}
    state = stage.rng.bit_generator.state
    for _ in range(3):
        assert stage.plan(Handles(config=stage.config, step=2), 8) == (8, {})
    assert stage.rng.bit_generator.state == state and stage.iteration_reuse is False

# ----------------------------------------------------------------------------- padding
@pytest.mark.parametrize("dp, n_pairs, micro, dynamic, micro_pairs, multiple", [
    (2, 5, 4, False, 2, 8),    # 4 rows -> 2 pairs per micro-batch; ceil(5/2) = 3 per rank -> 2; 2*2*2
    (4, 3, 8, False, 1, 8),    # 4 pairs per micro-batch but ceil(3/4) = 1 per rank -> 1; 2*1*4
    (1, 10, 8, True, 1, 2),    # dynamic bsz: 2 rows -> 1 pair; 2*1*1
    (2, 0, None, False, 1, 4),  # unset micro size: 2 rows -> 1; no pairs: per rank max(1, 0) = 1; 2*1*2
    (1, 7, 5, False, 2, 4),    # 5 // 2 = 2 pairs; per rank 7 -> 2; 2*2*1
    (3, 7, 1, False, 1, 6),    # 1 // 2 = 0 -> at least 1 pair; 2*1*3
    (8, 64, 16, False, 8, 128),  # 8 pairs; per rank 8; 2*8*8
])
def test_pad_multiple_by_hand(dp, n_pairs, micro, dynamic, micro_pairs, multiple):
    stage = make_stage(micro=micro, dynamic=dynamic)
    assert stage.pad_multiple(dp, n_pairs) == multiple
    assert stage.micro_pairs == micro_pairs


@pytest.mark.parametrize("dp, n_pairs, mini, micro_pairs", [
    (1, 40, 8, 8),   # 16 rows -> 8 pairs per micro-batch; mini-batch 8 pairs: 8
    (1, 40, 3, 3),   # capped at the mini-batch
    (2, 40, 8, 4),   # one rank's share of a mini-batch: 8 // 2
    (4, 40, 2, 1),   # at least one pair
])
def test_pad_multiple_capped_by_mini_batch(dp, n_pairs, mini, micro_pairs):
    stage = make_stage({"iteration": {"mini_batch_pairs": mini}}, micro=16)
    assert stage.pad_multiple(dp, n_pairs) == 2 * micro_pairs * dp and stage.micro_pairs == micro_pairs


def test_balance_pads_pairs_and_writes_pair_fields(fake_tq):
    stage = make_stage(micro=4)
    pairs = stage.sample(ctx(), put_rollouts(fake_tq, groups() + [response("ud", 0, [3.0]), response("ud", 1, [1.0])]),
                         {})
    assert len(pairs) == 6  # 3 pairs
    wg = FakeWG(fake_tq, dispatch=(0, 0, 1, 1))  # dp 2 (tp 2)
    h = Handles(config=stage.config, step=1, worker_group=wg, tokenizer=type("Tok", (), {"eos_token_id": 2})())
    out = stage.balance(h, pairs, {})
    # dp 2, 3 pairs, micro 4 rows: 2 pairs per micro-batch -> multiple 2*2*2 = 8: two padding rows
    assert len(out) == 8 and out.keys[:6] == pairs.keys and stage.micro_pairs == 2
    assert [bool(t.get("is_padding", False)) for t in out.tags] == [False] * 6 + [True] * 2
    assert [int(fake_tq.field(k, "pair_id")) for k in out.keys] == [0, 0, 1, 1, 2, 2, -1, -1]
    assert [bool(fake_tq.field(k, "is_chosen")) for k in out.keys] == [True, False] * 3 + [False, False]
    assert [float(fake_tq.field(k, "num_pairs")) for k in out.keys] == [3.0] * 8
    assert "num_pairs" in out.fields
    # the log-prob passes run whole pairs per micro-batch
    out.extra_info = {}
    stage.before_old_log_prob(h, out, {})
    assert out.extra_info["micro_batch_size_per_gpu"] == 4


def test_write_pair_fields_without_padding(fake_tq):
    stage = make_stage()
    pairs = stage.sample(ctx(), put_rollouts(fake_tq, groups()), {})
    assert stage.write_pair_fields(pairs) == 2
    assert [float(fake_tq.field(k, "num_pairs")) for k in pairs.keys] == [2.0] * 4
    assert [int(fake_tq.field(k, "pair_id")) for k in pairs.keys] == [0, 0, 1, 1]


# ----------------------------------------------------------------------------- reference refresh
@pytest.mark.parametrize("pref, refreshed", [
    ({"iteration": {"rollout_steps": 3}}, [3, 6]),
    ({"iteration": {"rollout_steps": 1}}, [1, 2, 3, 4, 5, 6]),
    ({"iteration": {"rollout_steps": 2}}, [2, 4, 6]),
    ({"iteration": {"rollout_steps": 3}, "loss": "simpo", "beta": 2.0}, []),  # reference free
    ({"reference": "initial"}, []),
])
def test_refresh_reference_once_per_iteration_on_its_training_step(pref, refreshed):
    """The reference log-probs are computed on an iteration's training step only (collection
    steps are skipped), after the reference is set to the policy, which has not moved since
    the iteration started."""
    stage = make_stage(pref)
    wg = FakeWG()
    got = []
    for s in range(1, 7):
        m = {}
        stage._advance(m)  # what sample does first
        assert m["dpo/reference_refreshes"] == len(got)
        batch = KVBatchMeta(partition_id=P, keys=["a", "b"], tags=[{}, {}])
        metrics = {}
        stage.before_ref_log_prob(Handles(config=stage.config, step=s, worker_group=wg), batch, metrics)
        if metrics.get("dpo/reference_refreshed") == 1:
            got.append(s)
        assert metrics["dpo/reference_refreshes"] == len(got)
        assert batch.extra_info["micro_batch_size_per_gpu"] == 2 * stage.micro_pairs
    assert got == refreshed and stage.reference_refreshes == len(refreshed)
    assert wg.events == ["sync"] * len(refreshed)


# ----------------------------------------------------------------------------- training phase
PASS_METRICS = [
    {"dpo/loss": [0.5, 0.7], "dpo/reward_margin": [0.1, 0.3], "dpo/reward_accuracy": [0.5, 1.0],
     "grad_norm": [2.0, 4.0], "actor/lr": [1e-6], "mfu": [0.4]},
    {"dpo/loss": [0.3, 0.5], "dpo/reward_margin": [0.4, 0.6], "dpo/reward_accuracy": [1.0, 1.0],
     "grad_norm": [1.0, 1.0], "actor/lr": [1e-6], "mfu": [0.4]},
    {"dpo/loss": [0.2, 0.2], "dpo/reward_margin": [0.8, 1.0], "dpo/reward_accuracy": [1.0, 0.5],
     "grad_norm": [0.5, 1.5], "actor/lr": [1e-6], "mfu": [0.4]},
]


class SchedWG(FakeWG):
    """FakeWG that also counts optimizer and LR-scheduler steps the way verl's
    ``train_mini_batch`` takes them: one optimizer step per mini-batch of
    ``extra_info["mini_batch_size"]`` rows per epoch, one scheduler step per call (on the
    call's last mini-batch, ``update_lr_scheduler``)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.optimizer_steps = self.scheduler_steps = 0
        self.calls: list[tuple[list[str], float]] = []

    def update_actor(self, batch):
        info = batch.extra_info
        self.optimizer_steps += len(batch) // info["mini_batch_size"] * info["epochs"]
        self.scheduler_steps += 1
        self.calls.append((list(batch.keys), float(self.tq.field(batch.keys[0], "num_pairs", batch.partition_id))))
        return super().update_actor(batch)


def pair_batch(fake_tq, n_pairs, n_pad=0):
    """A balanced pair batch in TransferQueue: ``p<j>c`` / ``p<j>r`` then ``n_pad`` padding rows."""
    from tensordict import TensorDict

    keys = [f"p{j}{r}" for j in range(n_pairs) for r in "cr"] + [f"pad{i}" for i in range(n_pad)]
    tags = [{}] * (2 * n_pairs) + [{"is_padding": True}] * n_pad
    fake_tq.kv_batch_put(keys, P, fields=TensorDict({"x": torch.zeros(len(keys))}, batch_size=len(keys)))
    return KVBatchMeta(partition_id=P, keys=keys, tags=[dict(t) for t in tags], fields=["x"])


def test_training_phase_epochs_mini_batches_lambda_scheduler_reset(fake_tq):
    """5 pairs, mini-batches of 2 pairs, L = 3: per epoch 3 optimizer steps of 2, 2, 1 pairs
    (the 2 padding rows join the last), each one update_actor call, so 9 optimizer steps and
    exactly 9 LR-scheduler steps; lambda 0, .25, .5 per epoch; the reset after epoch 3."""
    stage = make_stage({"seed": 5, "iteration": {"mini_batch_pairs": 2}}, lorr_cfg(replays=3))
    stage.micro_pairs, stage.dp_size = 1, 2  # whole mini-batches: multiples of 1 pair x 2 ranks
    wg = SchedWG(fake_tq, PASS_METRICS)
    batch = pair_batch(fake_tq, 5, n_pad=2)
    metrics = {}
    assert stage.update_actor(Handles(config=stage.config, step=1, worker_group=wg), batch, metrics) is True
    assert wg.events == ["update"] * 9 + ["reset"]
    assert wg.optimizer_steps == wg.scheduler_steps == 9 == stage.optimizer_steps
    assert [n for _, n in wg.calls] == [2.0, 2.0, 1.0] * 3  # num_pairs of each mini-batch
    assert [[w[0] for w in wg.sft_weights[3 * k:3 * k + 3]] for k in range(3)] == [[0.0] * 3, [0.25] * 3, [0.5] * 3]
    perm = np.random.default_rng(7)  # the shuffle generator: seed + 2
    for k in range(3):
        order = [int(i) for i in perm.permutation(5)]
        calls = [keys for keys, _ in wg.calls[3 * k:3 * k + 3]]
        assert calls == [[f"p{order[0]}c", f"p{order[0]}r", f"p{order[1]}c", f"p{order[1]}r"],
                         [f"p{order[2]}c", f"p{order[2]}r", f"p{order[3]}c", f"p{order[3]}r"],
                         [f"p{order[4]}c", f"p{order[4]}r", "pad0", "pad1"]]
    for info, (keys, _) in zip(wg.extra_infos, wg.calls):
        assert info == {"calculate_entropy": False, "global_batch_size": len(keys), "mini_batch_size": len(keys),
                        "epochs": 1, "seed": 7, "dataloader_kwargs": {"shuffle": False}, "force_group_size": 2,
                        "micro_batch_size_per_gpu": 1, "temperature": 0.9}
    # metrics: per epoch the pair-weighted mean over its mini-batches (PASS_METRICS cycle per call:
    # loss .6 .4 .2 with weights 2 2 1 -> (1.2 + .8 + .2) / 5 = .44 in every epoch), then the mean over epochs
    assert metrics["dpo/loss"] == pytest.approx(0.44)
    assert metrics["dpo/reward_margin"] == pytest.approx((0.2 * 2 + 0.5 * 2 + 0.9) / 5)
    assert metrics["dpo/reward_margin_last_pass"] == pytest.approx((0.2 * 2 + 0.5 * 2 + 0.9) / 5)
    assert metrics["lorr/reset_delta_norm"] == pytest.approx(0.5)  # sqrt(.3^2 + .4^2) over the two ranks
    assert {k: metrics[k] for k in ("lorr/epoch", "lorr/replay_index", "lorr/resets", "lorr/optimizer_steps")} == \
        {"lorr/epoch": 3, "lorr/replay_index": 3, "lorr/resets": 1, "lorr/optimizer_steps": 9}
    assert metrics["lorr/sft_weight"] == pytest.approx(0.25)
    assert "mfu" not in metrics and "actor/mfu" not in metrics


def test_training_phase_without_mini_batch_size_is_one_step_per_epoch(fake_tq):
    stage = make_stage(lorr=lorr_cfg(replays=3))
    wg = SchedWG(fake_tq, PASS_METRICS)
    batch = pair_batch(fake_tq, 2)
    stage.update(wg, batch, {})
    assert wg.optimizer_steps == wg.scheduler_steps == 3
    assert [keys for keys, _ in wg.calls] == [["p0c", "p0r", "p1c", "p1r"]] * 3  # one mini-batch: no shuffle
    assert wg.sft_weights == [[0.0] * 4, [0.25] * 4, [0.5] * 4]


def test_reset_every_two_epochs_crosses_iterations(fake_tq):
    stage = make_stage(lorr=lorr_cfg(replays=3, every=2, unit="epochs"))
    wg = FakeWG(fake_tq, PASS_METRICS)
    batch = pair_batch(fake_tq, 2)
    m1, m2 = {}, {}
    stage.update(wg, batch, m1)
    assert wg.events == ["update", "update", "reset", "update"]  # after epoch 2
    stage.step_iteration = 2
    stage.update(wg, batch, m2)
    assert wg.events[4:] == ["update", "reset", "update", "update", "reset"]  # epochs 4 and 6
    assert (m1["lorr/resets"], m2["lorr/resets"], stage.resets) == (1, 3, 3)


def test_reset_unit_iterations_every_two(fake_tq):
    stage = make_stage(lorr=lorr_cfg(replays=2, every=2, unit="iterations", reset_optimizer=True))
    wg = FakeWG(fake_tq, PASS_METRICS)
    batch = pair_batch(fake_tq, 2)
    m1, m2 = {}, {}
    stage.update(wg, batch, m1)
    assert wg.events == ["update", "update"] and "lorr/reset_delta_norm" not in m1
    stage.step_iteration = 2
    stage.update(wg, batch, m2)
    assert wg.events == ["update"] * 4 + ["reset"]  # after the 2nd iteration's epochs
    assert wg.reset_args == [(0.5, "down_proj", True)]
    assert m2["lorr/reset_delta_norm"] == pytest.approx(0.5) and m2["lorr/resets"] == 1
    assert m2["lorr/replay_index"] == 4 and m2["lorr/epoch"] == 2
    assert wg.sft_weights == [[0.0] * 4, [0.25] * 4] * 2
    assert m2["lorr/sft_weight"] == pytest.approx(0.125)


def test_update_plain_dpo_one_epoch_no_sft_no_reset(fake_tq):
    stage = make_stage(lorr={"enable": False, "replays": 3, "reset": {"every": 1}})
    wg = FakeWG(fake_tq, PASS_METRICS)
    batch = pair_batch(fake_tq, 2)
    for s in range(1, 4):
        metrics = {}
        stage.step_iteration = s
        stage.update(wg, batch, metrics)
        assert metrics["lorr/sft_weight"] == 0.0 and metrics["lorr/resets"] == 0 and metrics["lorr/epoch"] == 1
    assert wg.events == ["update"] * 3
    assert wg.sft_weights == [[0.0] * 4] * 3
    # one epoch per iteration: that epoch's values (the third gets PASS_METRICS[2])
    assert metrics["dpo/loss"] == pytest.approx(0.2) and metrics["dpo/reward_margin_last_pass"] == pytest.approx(0.9)


def test_iteration_end_to_end_reference_fixed_then_reset(fake_tq):
    """Three steps of one iteration through the hooks: the reference is synced once (on the
    training step, before its reference log-probs), the epochs come after it, and the reset
    after the last epoch; nothing touches the workers on the collection steps."""
    stage = make_stage({"iteration": {"rollout_steps": 3}}, lorr_cfg(replays=2))
    wg = FakeWG(fake_tq, PASS_METRICS)
    h = Handles(config=stage.config, step=1, worker_group=wg, tokenizer=type("Tok", (), {"eos_token_id": 2})())
    for s, rows in ((1, fresh_pair("s1")), (2, fresh_pair("s2"))):
        _, out, _ = step(stage, fake_tq, s, rows, h)
        assert all(t[SKIP_UPDATE] for t in out.tags)  # the trainer skips every worker call
    fake_tq.clear_partition()
    _, out, metrics = step(stage, fake_tq, 3, fresh_pair("s3"), h)
    out = stage.balance(h, out, metrics)
    stage.before_ref_log_prob(h, out, metrics)
    stage.update_actor(h, out, metrics)
    assert wg.events == ["sync", "update", "update", "reset"]
    assert metrics["lorr/iteration"] == 1 and metrics["dpo/reference_refreshes"] == 1
    assert metrics["dpo/iteration_pairs"] == 3 and stage.iteration == 2


# ----------------------------------------------------------------------------- setup, state, save / load
def test_setup_sets_loss_and_snapshots_only_with_resets():
    stage = make_stage(lorr=lorr_cfg())
    wg = FakeWG()
    stage.setup(Handles(config=stage.config, step=0, worker_group=wg))
    assert wg.events == [("set_loss", "dpo"), ("snapshot", "down_proj")]
    assert stage.theta0["fingerprint"] == "f00d"
    wg = FakeWG()
    make_stage({"loss": "ipo"}).setup(Handles(config=None, step=0, worker_group=wg))
    assert wg.events == [("set_loss", "ipo")]


COUNTERS = ("replays", "iterations", "resets", "iteration", "position", "iteration_reuse", "optimizer_steps",
            "reference_refreshes")


def _same_rows(a, b):
    if a is None or b is None:
        assert a is b
        return
    assert a["keys"] == b["keys"] and a["tags"] == b["tags"]
    for ra, rb in zip(a["rows"], b["rows"], strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert torch.equal(ra[k], rb[k]) if isinstance(ra[k], torch.Tensor) else ra[k] == rb[k]


def test_state_dict_round_trip_mid_iteration_and_old_layout(fake_tq):
    lorr = lorr_cfg(replays=2, reuse=True, ratio=0.5)
    a = make_stage({"seed": 3, "pairs": "random", "iteration": {"rollout_steps": 2}}, lorr)
    wg = FakeWG(fake_tq, PASS_METRICS)
    step(a, fake_tq, 1, groups())  # random pairs: pair_rng advances
    fake_tq.clear_partition()
    _, first, _ = step(a, fake_tq, 2, fresh_pair("s2"))
    a.update(wg, first, {})
    fake_tq.clear_partition()
    assert a.plan(Handles(config=a.config, step=3), 4) == (0, {})  # default_rng(4).random() = .943: reuse
    fake_tq.clear_partition()
    b0 = make_stage({"seed": 3, "iteration": {"rollout_steps": 2}}, lorr)
    step(b0, fake_tq, 1, fresh_pair("t1"))  # inside an iteration: one step's pairs pending
    assert (a.replays, a.iterations, a.resets, a.iteration, a.iteration_reuse) == (2, 1, 1, 2, True)

    for src in (a, b0):
        buf = io.BytesIO()
        torch.save({"stages": {"preference": src.state_dict()}}, buf)  # as recipe_state.pt
        buf.seek(0)
        saved = torch.load(buf, weights_only=False)["stages"]["preference"]
        b = make_stage({"seed": 3, "pairs": "random", "iteration": {"rollout_steps": 2}}, lorr)
        b.load_state_dict(saved)
        sa, sb = src.state_dict(), b.state_dict()
        assert {k: sb[k] for k in COUNTERS} == {k: sa[k] for k in COUNTERS}
        assert sb["rng"] == sa["rng"] and sb["pair_rng"] == sa["pair_rng"] and sb["shuffle_rng"] == sa["shuffle_rng"]
        _same_rows(sa["initial"], sb["initial"])
        _same_rows(sa["pending"], sb["pending"])
    assert b.position == 1 and len(b.pending["keys"]) == 2
    _, out, _ = step(b, fake_tq, 2, fresh_pair("t2"))  # the resumed iteration trains on both steps' pairs
    assert out.keys == ["t1_pair0chosen_0", "t1_pair0rejected_0", "t2_pair0chosen_0", "t2_pair0rejected_0"]
    fake_tq.clear_partition()

    s = a.state_dict()  # the layout before the stage protocol (one step per iteration)
    old = {"stage": {"replays": s["replays"], "iterations": s["iterations"], "resets": s["resets"], "rng": s["rng"]},
           "sampler": {"rng": s["pair_rng"], "initial": s["initial"], "reuse_next": False}}
    c = make_stage({"seed": 3, "pairs": "random"}, lorr)
    c.load_state_dict(old)
    assert (c.replays, c.iterations, c.resets, c.iteration, c.position) == (2, 1, 1, 2, 0)
    _same_rows(s["initial"], c.initial)
    assert c.rng.bit_generator.state == s["rng"]

    d = make_stage({"seed": 3}, lorr)
    d.load_state_dict({})  # nothing saved: unchanged
    assert (d.replays, d.resets, d.initial, d.iteration) == (0, 0, None, 1)


def test_save_and_load_call_workers_only_with_resets(tmp_path):
    on, off = make_stage(lorr=lorr_cfg()), make_stage({"iteration": {"rollout_steps": 3}}, lorr_cfg(reset=False))
    wg_on, wg_off = FakeWG(), FakeWG()
    folder = str(tmp_path / "global_step_3")
    on.save(Handles(config=on.config, step=3, worker_group=wg_on), folder)
    on.load(Handles(config=on.config, step=3, worker_group=wg_on), folder)
    off.position = 1  # inside a collection phase: the reference is set on the training step, nothing saved
    off.save(Handles(config=off.config, step=3, worker_group=wg_off), folder)
    off.load(Handles(config=off.config, step=3, worker_group=wg_off), folder)
    make_stage().save(Handles(config=None, step=3, worker_group=wg_off), folder)  # LoRR off altogether
    assert wg_on.events == [("save", folder), ("load", folder)]
    assert wg_off.events == []


def test_reset_delta_norm_over_ranks():
    stage = make_stage(lorr=lorr_cfg())
    wg = FakeWG(delta_norms=(1.0, 2.0, 2.0))
    assert stage.reset(wg) == {"lorr/reset_delta_norm": pytest.approx(3.0)}  # sqrt(1 + 4 + 4)
    assert stage.resets == 1 and math.isclose(stage.reset(FakeWG(delta_norms=(0.0,)))["lorr/reset_delta_norm"], 0.0)


def test_preference_iteration_config_errors():
    with pytest.raises(ValueError, match="preference.iteration.rollout_steps must be an integer >= 1"):
        PreferenceConfig.from_config({"iteration": {"rollout_steps": 0}})
    with pytest.raises(ValueError, match="preference.iteration.mini_batch_pairs"):
        PreferenceConfig.from_config({"iteration": {"mini_batch_pairs": 0}})
    with pytest.raises(ValueError, match="replaced by preference.iteration.rollout_steps"):
        PreferenceConfig.from_config({"iteration_steps": 3})
    with pytest.raises(ValueError, match="unknown option"):
        PreferenceConfig.from_config({"iteration": {"steps": 3}})
    assert PreferenceConfig.from_config({"iteration": {"mini_batch_pairs": None}}).iteration.mini_batch_pairs is None


def test_update_averages_numpy_numbers_and_keys_of_later_epochs(fake_tq, monkeypatch):
    """verl's reduce_metrics returns numpy numbers for some keys (e.g. max / min of ints) and
    an epoch may report a key the first did not: both are averaged over the epochs that have it."""
    import verl.utils.metric as verl_metric

    stage = make_stage(lorr=lorr_cfg(reset=False))
    batch = pair_batch(fake_tq, 1)
    reduced = iter([{"dpo/loss": np.float32(0.5), "actor/n": np.int64(2)},
                    {"dpo/loss": 0.7, "actor/n": np.int64(4), "dpo/late": 1.0},
                    {"dpo/loss": 0.9, "actor/n": 6, "dpo/late": 3.0}])
    monkeypatch.setattr(verl_metric, "reduce_metrics", lambda m: next(reduced))
    metrics: dict = {}
    stage.update(FakeWG(fake_tq), batch, metrics)
    assert metrics["dpo/loss"] == pytest.approx(0.7)
    assert metrics["actor/n"] == pytest.approx(4.0)
    assert metrics["dpo/late"] == pytest.approx(2.0)


def test_max_iterations_then_idle_steps(fake_tq):
    """max_iterations = 2 with 2 rollout steps: steps 1-4 are iterations 1-2, steps 5-6
    generate nothing (0 fresh prompts) and are skipped."""
    stage = make_stage({"iteration": {"rollout_steps": 2, "max_iterations": 2}})
    for s in range(1, 5):
        n, out, m = step(stage, fake_tq, s, fresh_pair(f"s{s}"))
        assert n == 4 and m["lorr/iteration"] == (s + 1) // 2
        fake_tq.clear_partition()
    for s in (5, 6):
        n, out, m = step(stage, fake_tq, s, [])
        assert n == 0 and len(out) == 0 and m["lorr/iteration"] == 2 and m["dpo/fresh_rollouts"] == 0
    assert stage.iteration == 3
