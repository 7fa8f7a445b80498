"""The reward-metrics stage (recipe/stages/reward_metrics.py): ``reward/*`` means and
``dots/effective_ratio`` over a step's fresh rows (padding and replayed rows left out; rows
without ``acc`` do not count as groups), on hand-computed batches; and its ``metrics`` hook
reading the rows from TransferQueue (faked)."""

from __future__ import annotations

import pytest
from tensordict import NonTensorData
from transfer_queue import KVBatchMeta

import transfer_queue
from recipe.stages.base import Handles, Stage
from recipe.stages.reward_metrics import RewardMetricsStage, fresh_reward_metrics
from recipe.stages.rows import PADDING, REPLAYED


def _fields(*accs):
    return [{"reward_extra_info": {"acc": a, "pred": "7"}} for a in accs]


def _keys(*uids):
    return [f"{u}_0_{i}" for i, u in enumerate(uids)]


def test_effective_ratio_hand_values():
    # groups: a [1, 0] mixed, b [1, 1] all correct, c [0, 0] all wrong, d [0.5, 0.5] partial credit (mixed)
    uids = ["a", "a", "b", "b", "c", "c", "d", "d"]
    fields = _fields(1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.5, 0.5)
    tags = [{} for _ in uids]
    assert fresh_reward_metrics(_keys(*uids), tags, fields)["dots/effective_ratio"] == 0.5
    assert fresh_reward_metrics(_keys(*uids[:6]), tags[:6], fields[:6])["dots/effective_ratio"] == pytest.approx(1 / 3)
    # bools; interleaved uids (a: 0.5, b: 0)
    assert fresh_reward_metrics(_keys("a", "b", "a"), [{}] * 3, _fields(True, False, False))[
        "dots/effective_ratio"] == 0.5


def test_rows_without_acc_are_not_counted():
    # samples without acc (or without reward fields at all) do not count; a group with none of them is no group
    fields = _fields(1.0, 1.0) + [{"reward_extra_info": {"score": 1.0}}, None, {}]
    assert fresh_reward_metrics(_keys("a", "a", "e", "e", "f"), [{}] * 5, fields)["dots/effective_ratio"] == 0.0
    fields = _fields(1.0, 0.0) + [{"reward_extra_info": {}}] * 2
    assert fresh_reward_metrics(_keys("a", "a", "e", "e"), [{}] * 4, fields)["dots/effective_ratio"] == 1.0


def test_no_effective_ratio_without_acc():
    assert fresh_reward_metrics([], [], []) == {}
    out = fresh_reward_metrics(_keys("a", "b"), [{}, {}], [{"reward_extra_info": {"score": 1.0}}, {}])
    assert "dots/effective_ratio" not in out and out == {}


def test_reward_means_skip_padding_and_replayed_rows():
    keys = _keys("a", "a", "b", "b", "a", "r")
    tags = [{}, {}, {}, {}, {PADDING: True}, {REPLAYED: True}]
    fields = [
        {"reward_extra_info": {"acc": 1.0, "has_answer": True, "score": 1.0, "pred": "1"}},
        NonTensorData({"reward_extra_info": {"acc": 0.0, "has_answer": True}}),  # tensordict-wrapped row
        {"reward_extra_info": {"acc": 1.0, "has_answer": False}},
        {"reward_extra_info": {"acc": 1.0}},
        {"reward_extra_info": {"acc": 0.0, "has_answer": False}},  # padding copy: not counted
        {"reward_extra_info": {"acc": 0.0, "has_answer": False}},  # replayed: not a fresh rollout
    ]
    out = fresh_reward_metrics(keys, tags, fields)
    # fresh rows: acc 1, 0, 1, 1 -> 0.75; has_answer 1, 1, 0 -> 2/3; groups a (0.5) mixed, b (1.0) not -> 0.5
    assert out == {"reward/acc": 0.75, "reward/has_answer": pytest.approx(2 / 3), "dots/effective_ratio": 0.5}


def test_stage_is_always_on_and_last():
    assert issubclass(RewardMetricsStage, Stage) and RewardMetricsStage.name == "reward_metrics"
    assert RewardMetricsStage.load_config({}) is None
    assert RewardMetricsStage.enabled(None, {}) and RewardMetricsStage.order == 90


def test_metrics_hook_reads_the_rows_from_transfer_queue(monkeypatch):
    rows = {"a_0_0": {"acc": 1.0}, "a_0_1": {"acc": 0.0}, "b_0_0": {"acc": 1.0, "len": 3}}
    calls = []

    def kv_batch_get(keys, partition_id, select_fields=None):
        from verl.utils.tensordict_utils import list_of_dict_to_tensordict

        calls.append((list(keys), partition_id, select_fields))
        return list_of_dict_to_tensordict([{"extra_fields": {"reward_extra_info": rows[k]}} for k in keys])

    monkeypatch.setattr(transfer_queue, "kv_batch_get", kv_batch_get)
    batch = KVBatchMeta(partition_id="train", keys=list(rows), tags=[{}, {}, {}])
    metrics = {"critic/score/mean": 0.5}
    RewardMetricsStage(None, None).metrics(Handles(config=None, step=3), batch, metrics)
    assert calls == [(list(rows), "train", ["extra_fields"])]
    assert metrics == {"critic/score/mean": 0.5, "reward/acc": pytest.approx(2 / 3), "reward/len": 3.0,
                       "dots/effective_ratio": 0.5}
