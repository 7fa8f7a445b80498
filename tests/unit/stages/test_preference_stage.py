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
from recipe.stages.rows import REUSED, SKIP_UPDATE

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

    def recipe_reference_save(self, folder):
        self.events.append(("save_ref", folder))
        return ["cafe", "cafe"]

    def recipe_reference_load(self, folder):
        self.events.append(("load_ref", folder))
        return [self.reference_file, self.reference_file]

    reference_file = "cafe"  # fingerprint recipe_reference_load answers (None: no file)


@pytest.fixture
def fake_tq(monkeypatch):
    fake = FakeTQ()
    monkeypatch.setattr(pref_mod, "tq", fake)
    monkeypatch.setattr(padding_utils, "tq", fake)
    return fake


LORR_OFF = {"enable": False}


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


def lorr_cfg(replays=3, every=3, unit="replays", reset=True, reuse=False, ratio=0.5, sft=True, reset_optimizer=False):
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
    assert metrics == {"lorr/reused_initial": 0, "dpo/pairs": 2, "dpo/skipped_groups": 1, "dpo/fresh_rollouts": 7,
                       "dpo/fresh_score_mean": pytest.approx((1 + 0 + 1 + 0.5 + 0.5 - 1 + 2) / 7)}
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
    # a batch the filter already skipped passes through untouched
    metrics = {}
    assert stage.sample(ctx(), out, metrics) is out
    assert metrics == {"lorr/reused_initial": 0, "dpo/pairs": 0, "dpo/skipped_groups": 0, "dpo/fresh_rollouts": 3}


# ----------------------------------------------------------------------------- plan + reuse of the initial pairs
def test_plan_reuses_initial_pairs_only_after_a_reset_per_seeded_rng(fake_tq):
    stage = make_stage({"seed": 3}, lorr_cfg(replays=1, every=1, unit="iterations", reuse=True, ratio=0.5, sft=False))
    h = Handles(config=stage.config, step=1)
    fresh_state = np.random.default_rng(4).bit_generator.state  # the reuse rng is seeded seed + 1
    assert stage.plan(h, 4) == (4, {})
    assert stage.rng.bit_generator.state == fresh_state  # no draw before a reset / initial pairs
    stage.resets = 1
    assert stage.plan(h, 4) == (4, {}) and stage.rng.bit_generator.state == fresh_state  # no initial pairs yet
    stage.resets = 0

    first = stage.sample(ctx(1), put_rollouts(fake_tq, groups()), {})
    init_keys = list(first.keys)
    assert stage.initial["keys"] == init_keys and len(stage.initial["rows"]) == 4
    assert stage.plan(h, 4) == (4, {}) and stage.rng.bit_generator.state == fresh_state  # initial but no reset
    wg = FakeWG(fake_tq)
    stage.update(wg, first, {})
    assert stage.resets == 1 and wg.events == ["update", "reset"]
    fake_tq.clear_partition()

    # from now on: reuse iff numpy's draw >= rollout_ratio
    ref = np.random.default_rng(4)
    seen = []
    for step in range(2, 8):
        reuse = ref.random() >= 0.5
        seen.append(reuse)
        n, m = stage.plan(h, 4)
        assert (n, m) == ((0, {}) if reuse else (4, {}))
        assert stage.reuse_next is reuse
        metrics = {}
        if reuse:
            out = stage.sample(ctx(step), KVBatchMeta(partition_id=P, keys=[], tags=[]), metrics)
            assert out.keys == init_keys
            assert all(t[REUSED] is True for t in out.tags)
            assert metrics == {"dpo/pairs": 2, "dpo/skipped_groups": 0, "dpo/fresh_rollouts": 0,
                               "lorr/reused_initial": 1}
            for k, row in zip(init_keys, stage.initial["rows"]):  # the stored rows are back in TQ
                assert torch.equal(fake_tq.field(k, "responses"), row["responses"])
                assert int(fake_tq.field(k, "pair_id")) == int(row["pair_id"])
        else:
            fresh = [response(f"s{step}", 0, [1.0]), response(f"s{step}", 1, [0.0])]
            out = stage.sample(ctx(step), put_rollouts(fake_tq, fresh, step), metrics)
            assert out.keys == [f"s{step}_pair0chosen_0", f"s{step}_pair0rejected_0"]
            assert metrics["lorr/reused_initial"] == 0 and metrics["dpo/fresh_rollouts"] == 2
        assert stage.reuse_next is False
        assert stage.initial["keys"] == init_keys  # the first step's pairs stay the initial ones
        assert not any(REUSED in t for t in stage.initial["tags"])
        fake_tq.clear_partition()
    # numpy's draws from default_rng(4): .943 .511 .976 .081 .607 .376 -> both branches ran
    assert seen == [True, True, True, False, True, False]


def test_plan_never_draws_without_reuse(fake_tq):
    stage = make_stage({"seed": 3}, lorr_cfg(reuse=False))
    stage.resets, stage.initial = 5, {"keys": ["a"], "rows": [{}], "tags": [{}]}
    state = stage.rng.bit_generator.state
    for _ in range(3):
        assert stage.plan(Handles(config=stage.config, step=2), 8) == (8, {})
    assert stage.rng.bit_generator.state == state and stage.reuse_next is False


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
    ({"iteration_steps": 3}, [1, 4, 7]),
    ({"iteration_steps": 1}, [1, 2, 3, 4, 5, 6, 7, 8]),
    ({"iteration_steps": 2}, [1, 3, 5, 7]),
    ({"iteration_steps": 3, "loss": "simpo", "beta": 2.0}, []),  # reference free
    ({"iteration_steps": 1, "reference": "initial"}, []),
])
def test_refresh_reference_schedule(pref, refreshed):
    stage = make_stage(pref)
    wg = FakeWG()
    got = []
    for step in range(1, 9):
        batch = KVBatchMeta(partition_id=P, keys=["a", "b"], tags=[{}, {}])
        metrics = {}
        stage.before_ref_log_prob(Handles(config=stage.config, step=step, worker_group=wg), batch, metrics)
        if metrics.get("dpo/reference_refreshed") == 1:
            got.append(step)
        assert batch.extra_info["micro_batch_size_per_gpu"] == 2 * stage.micro_pairs
    assert got == refreshed
    assert wg.events == ["sync"] * len(refreshed)


# ----------------------------------------------------------------------------- update passes, lambda_k, resets
PASS_METRICS = [
    {"dpo/loss": [0.5, 0.7], "dpo/reward_margin": [0.1, 0.3], "dpo/reward_accuracy": [0.5, 1.0],
     "grad_norm": [2.0, 4.0], "actor/lr": [1e-6], "mfu": [0.4]},
    {"dpo/loss": [0.3, 0.5], "dpo/reward_margin": [0.4, 0.6], "dpo/reward_accuracy": [1.0, 1.0],
     "grad_norm": [1.0, 1.0], "actor/lr": [1e-6], "mfu": [0.4]},
    {"dpo/loss": [0.2, 0.2], "dpo/reward_margin": [0.8, 1.0], "dpo/reward_accuracy": [1.0, 0.5],
     "grad_norm": [0.5, 1.5], "actor/lr": [1e-6], "mfu": [0.4]},
]


def pair_batch(fake_tq, stage):
    batch = stage.sample(ctx(), put_rollouts(fake_tq, groups()), {})
    stage.pad_multiple(1, 2)  # micro_pairs = min(4 // 2, 2) = 2
    return batch


def test_update_three_passes_lambda_reset_and_metrics(fake_tq):
    stage = make_stage(lorr=lorr_cfg(replays=3, every=3, unit="replays"))
    wg = FakeWG(fake_tq, PASS_METRICS)
    batch = pair_batch(fake_tq, stage)
    metrics = {}
    assert stage.update_actor(Handles(config=stage.config, step=1, worker_group=wg), batch, metrics) is True
    assert wg.events == ["update", "update", "update", "reset"]
    assert wg.reset_args == [(0.5, "down_proj", False)]
    # lambda_k = min(0.5, 0.25 k), written on every row before pass k
    assert wg.sft_weights == [[0.0] * 4, [0.25] * 4, [0.5] * 4]
    assert "sft_weight" in batch.fields
    for info in wg.extra_infos:
        assert info == {"calculate_entropy": False, "global_batch_size": 4, "mini_batch_size": 4, "epochs": 1,
                        "seed": 7, "dataloader_kwargs": {"shuffle": False}, "force_group_size": 2,
                        "micro_batch_size_per_gpu": 2, "temperature": 0.9}
    # per pass (mean over the lists), then the mean over the passes:
    # loss .6 .4 .2 -> .4; margin .2 .5 .9 -> 1.6/3; acc .75 1 .75 -> 2.5/3; grad_norm 3 1 1 -> 5/3
    assert metrics == {
        "dpo/loss": pytest.approx(0.4), "dpo/reward_margin": pytest.approx(1.6 / 3),
        "dpo/reward_accuracy": pytest.approx(2.5 / 3), "actor/grad_norm": pytest.approx(5 / 3),
        "actor/lr": pytest.approx(1e-6),
        "dpo/reward_margin_last_pass": pytest.approx(0.9), "dpo/reward_accuracy_last_pass": pytest.approx(0.75),
        "lorr/reset_delta_norm": pytest.approx(0.5),  # sqrt(.3^2 + .4^2) over the two ranks
        "lorr/replay_index": 3, "lorr/resets": 1, "lorr/sft_weight": pytest.approx(0.25),
    }
    # second step: passes 4 5 6, reset after the 6th
    metrics = {}
    stage.update(wg, batch, metrics)
    assert wg.events == ["update"] * 3 + ["reset"] + ["update"] * 3 + ["reset"]
    assert metrics["lorr/replay_index"] == 6 and metrics["lorr/resets"] == 2 and stage.iterations == 2


def test_update_reset_every_two_replays_crosses_steps(fake_tq):
    stage = make_stage(lorr=lorr_cfg(replays=3, every=2, unit="replays"))
    wg = FakeWG(fake_tq, PASS_METRICS)
    batch = pair_batch(fake_tq, stage)
    m1, m2 = {}, {}
    stage.update(wg, batch, m1)
    assert wg.events == ["update", "update", "reset", "update"]  # after replay 2
    stage.update(wg, batch, m2)
    # replays 4 (reset) 5 6 (reset)
    assert wg.events[4:] == ["update", "reset", "update", "update", "reset"]
    assert (m1["lorr/resets"], m2["lorr/resets"], stage.resets) == (1, 3, 3)


def test_update_reset_unit_iterations(fake_tq):
    stage = make_stage(lorr=lorr_cfg(replays=2, every=2, unit="iterations", reset_optimizer=True))
    wg = FakeWG(fake_tq, PASS_METRICS)
    batch = pair_batch(fake_tq, stage)
    m1, m2 = {}, {}
    stage.update(wg, batch, m1)
    assert wg.events == ["update", "update"] and "lorr/reset_delta_norm" not in m1
    stage.update(wg, batch, m2)
    assert wg.events == ["update", "update", "update", "update", "reset"]  # after the 2nd iteration's passes
    assert wg.reset_args == [(0.5, "down_proj", True)]
    assert m2["lorr/reset_delta_norm"] == pytest.approx(0.5) and m2["lorr/resets"] == 1
    assert m2["lorr/replay_index"] == 4
    assert wg.sft_weights == [[0.0] * 4, [0.25] * 4] * 2
    assert m2["lorr/sft_weight"] == pytest.approx(0.125)


def test_update_plain_dpo_one_pass_no_sft_no_reset(fake_tq):
    stage = make_stage(lorr={"enable": False, "replays": 3, "reset": {"every": 1}})
    wg = FakeWG(fake_tq, PASS_METRICS)
    batch = pair_batch(fake_tq, stage)
    for step in range(1, 4):
        metrics = {}
        stage.update(wg, batch, metrics)
        assert metrics["lorr/sft_weight"] == 0.0 and metrics["lorr/resets"] == 0
    assert wg.events == ["update"] * 3
    assert wg.sft_weights == [[0.0] * 4] * 3
    # one pass per step: the step's own pass values (the third step gets PASS_METRICS[2])
    assert metrics["dpo/loss"] == pytest.approx(0.2) and metrics["dpo/reward_margin_last_pass"] == pytest.approx(0.9)


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


def _assert_same_state(a: PreferenceStage, b: PreferenceStage):
    sa, sb = a.state_dict(), b.state_dict()
    assert (sb["replays"], sb["iterations"], sb["resets"], sb["reuse_next"]) == \
        (sa["replays"], sa["iterations"], sa["resets"], sa["reuse_next"])
    assert sb["rng"] == sa["rng"] and sb["pair_rng"] == sa["pair_rng"]
    assert sb["initial"]["keys"] == sa["initial"]["keys"] and sb["initial"]["tags"] == sa["initial"]["tags"]
    for ra, rb in zip(sa["initial"]["rows"], sb["initial"]["rows"], strict=True):
        assert ra.keys() == rb.keys()
        for k in ra:
            assert torch.equal(ra[k], rb[k]) if isinstance(ra[k], torch.Tensor) else ra[k] == rb[k]


def test_state_dict_round_trip_and_old_layout(fake_tq):
    lorr = lorr_cfg(replays=2, every=1, unit="iterations", reuse=True, ratio=0.5)
    a = make_stage({"seed": 3, "pairs": "random"}, lorr)
    h = Handles(config=a.config, step=1)
    wg = FakeWG(fake_tq, PASS_METRICS)
    first = a.sample(ctx(), put_rollouts(fake_tq, groups()), {})  # random pairs: pair_rng advances
    a.update(wg, first, {})
    fake_tq.clear_partition()
    assert a.plan(h, 4) == (0, {})  # default_rng(4).random() = .943 >= .5: reuse next
    assert (a.replays, a.iterations, a.resets, a.reuse_next) == (2, 1, 1, True)
    assert a.pair_rng.bit_generator.state != np.random.default_rng(3).bit_generator.state

    buf = io.BytesIO()
    torch.save({"stages": {"preference": a.state_dict()}}, buf)  # as recipe_state.pt
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)["stages"]["preference"]
    b = make_stage({"seed": 3, "pairs": "random"}, lorr)
    b.load_state_dict(saved)
    _assert_same_state(a, b)

    s = a.state_dict()  # the layout before the stage protocol
    old = {"stage": {"replays": s["replays"], "iterations": s["iterations"], "resets": s["resets"], "rng": s["rng"]},
           "sampler": {"rng": s["pair_rng"], "initial": s["initial"], "reuse_next": s["reuse_next"]}}
    c = make_stage({"seed": 3, "pairs": "random"}, lorr)
    c.load_state_dict(old)
    _assert_same_state(a, c)

    # the restored generators continue identically; the pending reuse is honoured
    assert [b.rng.random(), c.rng.random()] == [a.rng.random()] * 2
    assert [int(b.pair_rng.integers(1000)), int(c.pair_rng.integers(1000))] == [int(a.pair_rng.integers(1000))] * 2
    metrics = {}
    out = c.sample(ctx(2), KVBatchMeta(partition_id=P, keys=[], tags=[]), metrics)
    assert out.keys == s["initial"]["keys"] and metrics["lorr/reused_initial"] == 1

    d = make_stage({"seed": 3}, lorr)
    d.load_state_dict({})  # nothing saved: unchanged
    assert (d.replays, d.resets, d.initial) == (0, 0, None)


def test_save_and_load_call_workers_only_with_resets(tmp_path):
    on, off = make_stage(lorr=lorr_cfg()), make_stage(lorr=lorr_cfg(reset=False))
    wg_on, wg_off = FakeWG(), FakeWG()
    folder = str(tmp_path / "global_step_3")
    on.save(Handles(config=on.config, step=3, worker_group=wg_on), folder)
    on.load(Handles(config=on.config, step=3, worker_group=wg_on), folder)
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


@pytest.mark.parametrize("k,saved_at", [(1, []), (2, [1, 3, 5]), (3, [1, 2, 4, 5])])
def test_reference_saved_and_restored_inside_iterations(tmp_path, k, saved_at):
    """With iteration_steps k, a checkpoint after step s lies inside an iteration when step
    s + 1 is not an iteration start (1, 1 + k, ...), i.e. s % k != 0: the reference (the
    policy of the iteration's start) is saved then, and restored on resume."""
    stage = make_stage({"iteration_steps": k}, LORR_OFF)
    folder = str(tmp_path)
    got_save, got_load = [], []
    for step in range(1, 6):
        wg = FakeWG()
        stage.save(Handles(config=stage.config, step=step, worker_group=wg), folder)
        stage.load(Handles(config=stage.config, step=step, worker_group=wg), folder)
        got_save += [step for e in wg.events if e[0] == "save_ref"]
        got_load += [step for e in wg.events if e[0] == "load_ref"]
    assert got_save == saved_at and got_load == saved_at


def test_reference_not_saved_for_initial_reference_or_simpo(tmp_path):
    for pref in ({"iteration_steps": 2, "reference": "initial"}, {"iteration_steps": 2, "loss": "simpo"}):
        stage, wg = make_stage(pref, LORR_OFF), FakeWG()
        stage.save(Handles(config=stage.config, step=1, worker_group=wg), str(tmp_path))
        assert wg.events == []


def test_reference_missing_in_an_old_checkpoint_warns(tmp_path, caplog):
    stage, wg = make_stage({"iteration_steps": 2}, LORR_OFF), FakeWG()
    wg.reference_file = None
    stage.load(Handles(config=stage.config, step=3, worker_group=wg), str(tmp_path))
    assert "no reference_rank*.pt" in caplog.text


def test_update_averages_numpy_numbers_and_keys_of_later_passes(fake_tq, monkeypatch):
    """verl's reduce_metrics returns numpy numbers for some keys (e.g. max / min of ints) and
    a pass may report a key the first did not: both are averaged over the passes that have it."""
    import verl.utils.metric as verl_metric
    from tensordict import TensorDict

    stage = make_stage(lorr=lorr_cfg(reset=False))
    batch = KVBatchMeta(partition_id=P, keys=["a_pair0chosen_0", "a_pair0rejected_0"], tags=[{}, {}])
    fake_tq.kv_batch_put(batch.keys, P, fields=TensorDict({"x": torch.zeros(2)}, batch_size=2))
    reduced = iter([{"dpo/loss": np.float32(0.5), "actor/n": np.int64(2)},
                    {"dpo/loss": 0.7, "actor/n": np.int64(4), "dpo/late": 1.0},
                    {"dpo/loss": 0.9, "actor/n": 6, "dpo/late": 3.0}])
    monkeypatch.setattr(verl_metric, "reduce_metrics", lambda m: next(reduced))
    metrics: dict = {}
    stage.update(FakeWG(fake_tq), batch, metrics)
    assert metrics["dpo/loss"] == pytest.approx(0.7)
    assert metrics["actor/n"] == pytest.approx(4.0)
    assert metrics["dpo/late"] == pytest.approx(2.0)
