"""The sampler every recipe uses (recipe/stages/group_filter.py), without Ray or a verl run.

``sample`` = the group filter for the step's fresh groups (``fresh_size``, set by the
trainer's ``prepare_step``), then each stage's ``sample`` hook in order; ``filter_sample``
keeps or drops whole groups (drop mode), or asks for more prompts (refill mode).

TransferQueue is :class:`FakeTQ`: prompts (``is_prompt`` tags with a status) and their
rows ``{uid}_0_{j}`` with the reward's ``extra_fields``, read through the same calls
verl's own replay buffer makes (``kv_list``, ``kv_batch_get``, ``kv_clear``).
"""

from __future__ import annotations

import pytest
from transfer_queue import KVBatchMeta

import recipe.stages.group_filter as gf
import verl.trainer.ppo.v1.replay_buffer as verl_rb
from recipe.stages.base import SampleContext, Stage
from recipe.stages.group_filter import GroupFilterSampler
from recipe.stages.rows import SKIP_UPDATE
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer
from verl.utils.tensordict_utils import list_of_dict_to_tensordict

P = "train"


class FakeTQ:
    """``partition -> key -> tag`` plus the rows' ``extra_fields``."""

    def __init__(self):
        self.tags: dict[str, dict[str, dict]] = {P: {}}
        self.extra: dict[str, dict] = {}
        self.cleared: list[str] = []

    def add_group(self, uid: str, accs: list[float], step: int = 1, status: str = "finished"):
        self.tags[P][uid] = {"is_prompt": True, "status": status, "global_steps": step}
        for j, acc in enumerate(accs):
            key = f"{uid}_0_{j}"
            self.tags[P][key] = {"status": "finished", "global_steps": step}
            self.extra[key] = {"reward_extra_info": {"acc": float(acc), "pred": "1"}}

    def kv_list(self, partition_id=None):
        return {p: {k: dict(t) for k, t in items.items()} for p, items in self.tags.items()}

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        assert select_fields == ["extra_fields"]
        return list_of_dict_to_tensordict([{"extra_fields": self.extra[k]} for k in keys])

    def kv_clear(self, keys, partition_id):
        for k in [keys] if isinstance(keys, str) else keys:
            self.tags[partition_id].pop(k, None)
            self.cleared.append(k)

    def rows(self, uid):
        return sorted(k for k in self.tags[P] if k.startswith(f"{uid}_"))


@pytest.fixture
def fake_tq(monkeypatch):
    fake = FakeTQ()
    monkeypatch.setattr(gf, "tq", fake)
    monkeypatch.setattr(verl_rb, "tq", fake)
    return fake


def make_sampler(group_filter=None, refill_fn=None, gen_batch_size=None, **kwargs) -> GroupFilterSampler:
    return GroupFilterSampler(trainer_mode=kwargs.pop("trainer_mode", "sync"), trainer_config={},
                              max_off_policy_threshold=None, max_off_policy_strategy="drop",
                              sampler_kwargs={"group_filter": group_filter, "gen_batch_size": gen_batch_size,
                                              "poll_interval": 0.0},
                              refill_fn=refill_fn, **kwargs)


DROP_UNIFORM = {"drop_all_correct": True, "drop_all_wrong": True}


# ----------------------------------------------------------------------------- construction
def test_construction_options_and_errors():
    s = make_sampler(DROP_UNIFORM, gen_batch_size=2)
    assert isinstance(s, ReplayBuffer) and s.filter_cfg.enabled and s.refill_unit == 2
    assert s.poll_interval == 0.0 and s.stages == [] and s.fresh_size is None
    assert make_sampler().poll_interval == 0.0
    assert GroupFilterSampler(trainer_mode="sync", trainer_config={}, max_off_policy_threshold=None,
                              max_off_policy_strategy="drop", sampler_kwargs=None).poll_interval == 0.2
    with pytest.raises(ValueError, match="sync only, got async"):
        make_sampler(trainer_mode="async")
    with pytest.raises(ValueError, match=r"group_filter\.mode must be one of"):
        make_sampler({"mode": "resample"})


# ----------------------------------------------------------------------------- sample: filter, then the stages
class Recorder(Stage):
    """A stage whose ``sample`` hook logs its call and appends one key."""

    name = "recorder"

    def __init__(self, tag, log):
        super().__init__(None, None)
        self.tag, self.log = tag, log

    def sample(self, ctx, batch, metrics):
        self.log.append((self.tag, ctx, list(batch.keys), dict(metrics)))
        metrics[f"{self.tag}/seen"] = len(batch.keys)
        return KVBatchMeta(partition_id=batch.partition_id, keys=[*batch.keys, f"{self.tag}_0_0"],
                           tags=[*batch.tags, {}])


def _fake_filter(monkeypatch, calls):
    def filter_sample(self, global_steps, partition_id, n):
        calls.append((global_steps, partition_id, n))
        keys = [f"u{i}_0_0" for i in range(n)]
        return KVBatchMeta(partition_id=partition_id, keys=keys, tags=[{} for _ in keys]), {"filter/kept_groups": n}

    monkeypatch.setattr(GroupFilterSampler, "filter_sample", filter_sample)


def test_sample_runs_the_filter_for_the_fresh_groups_then_each_stage_in_order(monkeypatch):
    calls, log = [], []
    _fake_filter(monkeypatch, calls)
    s = make_sampler()
    s.stages = [Recorder("a", log), Recorder("b", log)]
    s.fresh_size = 2  # what prepare_step set from the stages' plan hooks
    batch, metrics = s.sample(7, P, 4)
    assert calls == [(7, P, 2)] and s.fresh_size is None
    assert batch.keys == ["u0_0_0", "u1_0_0", "a_0_0", "b_0_0"]  # b got a's batch
    assert metrics == {"filter/kept_groups": 2, "a/seen": 2, "b/seen": 3}
    (tag_a, ctx_a, keys_a, seen_a), (tag_b, ctx_b, keys_b, seen_b) = log
    assert (tag_a, keys_a, seen_a) == ("a", ["u0_0_0", "u1_0_0"], {"filter/kept_groups": 2})
    assert (tag_b, keys_b, seen_b) == ("b", ["u0_0_0", "u1_0_0", "a_0_0"], {"filter/kept_groups": 2, "a/seen": 2})
    assert isinstance(ctx_a, SampleContext) and (ctx_a.step, ctx_a.partition_id, ctx_a.batch_size) == (7, P, 4)
    # not set by a plan: the whole batch is fresh
    s.sample(8, P, 4)
    assert calls[-1] == (8, P, 4)


def test_sample_with_no_fresh_groups_skips_the_filter(monkeypatch):
    calls, log = [], []
    _fake_filter(monkeypatch, calls)
    s = make_sampler()
    s.stages = [Recorder("a", log)]
    s.fresh_size = 0  # a stage supplies the whole batch (LoRR's reuse of the initial pairs)
    batch, metrics = s.sample(3, P, 4)
    assert calls == [] and log[0][2] == [] and batch.keys == ["a_0_0"] and metrics == {"a/seen": 0}


def test_validation_batches_are_verls_untouched(monkeypatch):
    got = []

    def verl_sample(self, global_steps, partition_id, batch_size):
        got.append((global_steps, partition_id, batch_size))
        return KVBatchMeta(partition_id=partition_id, keys=["v_0_0"], tags=[{}]), {"validation/x": 1}

    monkeypatch.setattr(ReplayBuffer, "sample", verl_sample)
    s = make_sampler(DROP_UNIFORM)
    s.stages = [Recorder("a", [])]
    s.fresh_size = 1
    batch, metrics = s.sample(2, "val", 8)
    assert got == [(2, "val", 8)] and batch.keys == ["v_0_0"] and metrics == {"validation/x": 1}
    assert s.fresh_size == 1  # the training step's setting is left for the training batch


def test_filter_off_is_verls_sampling(monkeypatch):
    got = []
    monkeypatch.setattr(ReplayBuffer, "sample", lambda self, g, p, n: got.append(n) or (KVBatchMeta(
        partition_id=p, keys=[], tags=[]), {}))
    make_sampler({"drop_all_wrong": False}).filter_sample(1, P, 5)
    assert got == [5]


def test_forget_drops_rows_a_stage_removed(monkeypatch):
    _fake_filter(monkeypatch, [])
    s = make_sampler()
    s.partitions[P].update({"a_0_0": {}, "a_0_1": {}, "b_0_0": {}})

    class Forgetting(Stage):
        name = "forgetting"

        def sample(self, ctx, batch, metrics):
            ctx.forget(["a_0_0", "a_0_1", "zz_0_0"])  # unknown keys are fine
            return batch

    s.stages = [Forgetting(None, None)]
    s.sample(1, P, 1)
    assert dict(s.partitions[P]) == {"b_0_0": {}}


# ----------------------------------------------------------------------------- filter_sample: drop
def test_drop_mode_keeps_mixed_groups_and_clears_the_dropped(fake_tq):
    fake_tq.add_group("c", [1, 1])  # all correct
    fake_tq.add_group("w", [0, 0])  # all wrong
    fake_tq.add_group("m1", [1, 0])
    fake_tq.add_group("m2", [0, 1], step=0)  # older: comes first
    s = make_sampler(DROP_UNIFORM)
    batch, metrics = s.filter_sample(1, P, 4)
    assert batch.keys == ["m2_0_0", "m2_0_1", "m1_0_0", "m1_0_1"]  # older prompt first, then by key
    assert metrics == {"filter/kept_groups": 2, "filter/dropped_all_correct": 1, "filter/dropped_all_wrong": 1,
                       "filter/dropped_band": 0, "filter/gen_rounds": 1, "filter/discarded_surplus": 0,
                       "filter/gave_up": 0, "filter/skipped_update": 0}
    assert not any(SKIP_UPDATE in t for t in batch.tags)
    # the dropped groups left TransferQueue (prompt and rows); the kept ones keep their rows
    assert fake_tq.rows("c") == fake_tq.rows("w") == [] and "c" not in fake_tq.tags[P]
    assert fake_tq.rows("m1") == ["m1_0_0", "m1_0_1"] and "m1" not in fake_tq.tags[P]  # prompt consumed


@pytest.mark.parametrize("arrival", [[0, 1, 2, 3], [3, 1, 0, 2]])
def test_row_order_is_by_step_and_key_not_arrival(fake_tq, arrival):
    """Deterministic uids (make_uids) sort numerically: t1-10 after t1-2; sessions too."""
    groups = [("t1-10", [1, 0]), ("t1-2", [0, 1]), ("t0-7", [1, 0]), ("t1-3", [1, 1])]
    for i in arrival:
        fake_tq.add_group(*groups[i], step=0 if groups[i][0].startswith("t0") else 1)
    batch, metrics = make_sampler(DROP_UNIFORM).filter_sample(1, P, 4)
    assert batch.keys == ["t0-7_0_0", "t0-7_0_1", "t1-2_0_0", "t1-2_0_1", "t1-10_0_0", "t1-10_0_1"]
    assert metrics["filter/dropped_all_correct"] == 1


def test_older_groups_are_kept_first(fake_tq):
    fake_tq.add_group("new", [1, 0], step=3)
    fake_tq.add_group("old", [0, 1], step=1)
    fake_tq.add_group("mid", [0, 1], step=2)
    batch, metrics = make_sampler(DROP_UNIFORM).filter_sample(3, P, 2)
    assert batch.keys == ["old_0_0", "old_0_1", "mid_0_0", "mid_0_1"] and metrics["filter/discarded_surplus"] == 1
    assert fake_tq.rows("new") == [] and "new" not in fake_tq.tags[P]


def test_drop_mode_band_and_surplus(fake_tq):
    for uid, accs in (("q1", [1, 0, 0, 0]), ("h", [1, 1, 0, 0]), ("q3", [1, 1, 1, 0]), ("h2", [0, 1, 0, 1])):
        fake_tq.add_group(uid, accs)
    s = make_sampler({"band": [0.4, 0.6]})
    batch, metrics = s.filter_sample(1, P, 1)  # two groups pass the band, one is asked for
    assert metrics["filter/kept_groups"] == 1 and metrics["filter/dropped_band"] == 2
    assert metrics["filter/discarded_surplus"] == 1
    kept = {k.split("_")[0] for k in batch.keys}
    assert len(kept) == 1 and kept <= {"h", "h2"}
    other = ({"h", "h2"} - kept).pop()
    assert fake_tq.rows(other) == []  # the surplus group was cleared


def test_every_group_dropped_hands_them_over_marked_skip_update(fake_tq):
    fake_tq.add_group("c", [1, 1])
    fake_tq.add_group("w", [0, 0])
    s = make_sampler(DROP_UNIFORM)
    batch, metrics = s.filter_sample(4, P, 2)
    assert sorted(batch.keys) == ["c_0_0", "c_0_1", "w_0_0", "w_0_1"]
    assert all(t[SKIP_UPDATE] is True for t in batch.tags)
    assert metrics["filter/skipped_update"] == 1 and metrics["filter/kept_groups"] == 0


def test_missing_filter_metric_names_the_key(fake_tq):
    fake_tq.add_group("m", [1, 0])
    with pytest.raises(RuntimeError, match=r"group_filter\.metric='correct'"):
        make_sampler({**DROP_UNIFORM, "metric": "correct"}).filter_sample(1, P, 1)


# ----------------------------------------------------------------------------- filter_sample: refill
def test_refill_asks_for_whole_gen_batches_until_the_batch_is_full(fake_tq):
    asked = []
    later = iter([[("w2", [0, 0]), ("m2", [1, 0])]])

    def refill(n):
        asked.append(n)
        for uid, accs in next(later):
            fake_tq.add_group(uid, accs, step=2)

    fake_tq.add_group("c", [1, 1])
    fake_tq.add_group("m1", [0, 1])
    s = make_sampler({**DROP_UNIFORM, "mode": "refill", "max_gen_rounds": 3}, refill_fn=refill, gen_batch_size=2)
    batch, metrics = s.filter_sample(2, P, 2)
    assert asked == [2]  # 1 missing group, rounded up to a whole gen batch of 2
    assert sorted({k.split("_")[0] for k in batch.keys}) == ["m1", "m2"]
    assert metrics["filter/gen_rounds"] == 2 and metrics["filter/gave_up"] == 0
    assert metrics["filter/kept_groups"] == 2
    assert metrics["filter/dropped_all_correct"] == 1 and metrics["filter/dropped_all_wrong"] == 1
    assert fake_tq.rows("c") == [] and fake_tq.rows("w2") == []


def test_refill_gives_up_at_the_round_cap_and_trains_on_what_it_has(fake_tq, caplog):
    asked = []

    def refill(n):
        asked.append(n)
        fake_tq.add_group(f"w{len(asked)}", [0, 0, 0])

    fake_tq.add_group("m1", [0, 1, 1])
    fake_tq.add_group("c", [1, 1, 1])
    fake_tq.add_group("w0", [0, 0, 0])
    s = make_sampler({**DROP_UNIFORM, "mode": "refill", "max_gen_rounds": 2, "oversample": 1.5}, refill_fn=refill)
    with caplog.at_level("WARNING"):
        batch, metrics = s.filter_sample(1, P, 3)
    assert asked == [3]  # ceil(2 missing * 1.5) = 3 -> one whole batch of 3 (no gen_batch_size)
    assert {k.split("_")[0] for k in batch.keys} == {"m1"}
    assert metrics["filter/gave_up"] == 1 and metrics["filter/gen_rounds"] == 2 and metrics["filter/kept_groups"] == 1
    assert "gave up after 2 generation rounds" in caplog.text
