"""TransferQueue row helpers of recipe.stages.rows: the group id of a row key, padding and
replayed rows, the skip-update tag, the reward fields of a row, splitting a TransferQueue
batch into per-row dicts."""

from __future__ import annotations

import pytest
import torch
from tensordict import NonTensorData
from transfer_queue import KVBatchMeta

from recipe.stages.rows import (
    PADDING,
    REPLAYED,
    SKIP_UPDATE,
    STAGE_FIELDS,
    clone_row,
    is_padding,
    key_order,
    make_uids,
    is_skipped,
    mark_skipped,
    real_indices,
    response_metric,
    reward_info,
    sample_dicts,
    uid_of,
    uid_order,
)
from verl.utils.tensordict_utils import assign_non_tensor_data, list_of_dict_to_tensordict


# ----------------------------------------------------------------------------- keys and tags
def test_uid_of_row_keys():
    # verl's agent loop writes {uid}_{session}_{index}; a uid is a uuid4 (hyphens, no underscores)
    assert uid_of("0b6f7a3e-91c2-4d1f-a1b5-2f1e3c4d5e6f_0_1") == "0b6f7a3e-91c2-4d1f-a1b5-2f1e3c4d5e6f"
    assert uid_of("ua_3_0") == "ua"
    assert uid_of("ua_3_0_extra") == "ua"  # everything after the first underscore is the session / index
    assert uid_of("lonely") == "lonely"  # a prompt key (no session / index yet)


def test_padding_and_real_indices():
    tags = [{}, {PADDING: True}, {REPLAYED: True}, {PADDING: False, REPLAYED: False}, {PADDING: True, REPLAYED: True},
            {"status": "finished"}]
    assert [is_padding(t) for t in tags] == [False, True, False, False, True, False]
    assert real_indices(tags) == [0, 2, 3, 5]
    assert real_indices(tags, fresh_only=True) == [0, 3, 5]
    assert real_indices([]) == [] and real_indices([{PADDING: True}], fresh_only=True) == []


def test_is_skipped_and_mark_skipped():
    def batch(tags):
        return KVBatchMeta(partition_id="train", keys=[f"u{i}_0_0" for i in range(len(tags))], tags=tags)

    assert is_skipped(batch([]))  # empty: nothing to train on
    assert is_skipped(batch([{SKIP_UPDATE: True}, {SKIP_UPDATE: True}]))
    assert not is_skipped(batch([{SKIP_UPDATE: True}, {}]))  # one row left to train on
    assert not is_skipped(batch([{SKIP_UPDATE: False}]))
    assert not is_skipped(batch([{"status": "finished"}]))
    tags = [{"status": "finished"}, {PADDING: True}]
    mark_skipped(tags)
    assert tags == [{"status": "finished", SKIP_UPDATE: True}, {PADDING: True, SKIP_UPDATE: True}]
    assert is_skipped(batch(tags))
    assert SKIP_UPDATE == "skip_update" and REPLAYED == "replayed" and PADDING == "is_padding"


# ----------------------------------------------------------------------------- reward fields
def test_reward_info_of_every_extra_fields_shape():
    info = {"acc": 1.0, "pred": "42"}
    assert reward_info({"reward_extra_info": info}) == info
    assert reward_info(NonTensorData({"reward_extra_info": info})) == info  # tensordict-wrapped
    assert reward_info(None) == {}
    assert reward_info({}) == {}
    assert reward_info({"reward_extra_info": None}) == {}
    assert reward_info({"other": 1}) == {}
    assert reward_info("not a dict") == {}


def test_response_metric_value_and_error_naming_the_key():
    extra = {"reward_extra_info": {"acc": True, "pred": "7", "len": 3}}
    assert response_metric(extra, "acc", "replay.metric") == 1.0 and type(response_metric(extra, "acc", "k")) is float
    assert response_metric(NonTensorData(extra), "len", "k") == 3.0
    with pytest.raises(RuntimeError) as exc:
        response_metric(extra, "correct", "group_filter.metric")
    msg = str(exc.value)
    assert msg.startswith("group_filter.metric='correct' is not among the reward function's outputs")
    assert "['acc', 'len', 'pred']" in msg and msg.endswith("set group_filter.metric to one of them")
    with pytest.raises(RuntimeError, match=r"^dots\.metric='acc' is not among the reward function's outputs \[\]"):
        response_metric(None, "acc", "dots.metric")


# ----------------------------------------------------------------------------- rows
def test_clone_row_copies_tensors_and_drops_names():
    row = {"responses": torch.tensor([1, 2]), "old_log_probs": torch.tensor([-1.0]), "extra": {"a": 1}}
    out = clone_row(row, drop=STAGE_FIELDS)
    assert set(out) == {"responses", "extra"} and torch.equal(out["responses"], row["responses"])
    out["responses"][0] = 9
    assert row["responses"][0] == 1  # a copy
    assert out["extra"] is row["extra"]  # python objects are shared, not copied
    assert set(clone_row(row)) == set(row)
    assert {"old_log_probs", "advantages", "ref_log_prob", "values", "returns", "token_level_rewards",
            "entropy", "rollout_is_weights"} == STAGE_FIELDS


def test_sample_dicts_jagged_dense_non_tensor_and_bf16():
    rows = [
        {"ids": torch.tensor([1, 2, 3]), "dense": torch.tensor([1.0, 2.0]),
         "lp": torch.tensor([-0.5, -1.0], dtype=torch.bfloat16), "extra": {"reward_extra_info": {"acc": 1.0}}},
        {"ids": torch.tensor([4]), "dense": torch.tensor([3.0, 4.0]),
         "lp": torch.tensor([-2.0, -0.25, -8.0, -0.125], dtype=torch.bfloat16),
         "extra": {"reward_extra_info": {"acc": 0.0, "pred": None}}},
    ]
    td = list_of_dict_to_tensordict(rows)
    assert td["ids"].is_nested and not td["dense"].is_nested  # the two layouts are exercised
    assign_non_tensor_data(td, "global_steps", 7)  # a batch-wide NonTensorData
    out = sample_dicts(td)
    assert len(out) == 2
    for got, want in zip(out, rows):
        assert set(got) == {"ids", "dense", "lp", "extra", "global_steps"}
        for name in ("ids", "dense", "lp"):
            assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
        assert got["extra"] == want["extra"]
        assert got["global_steps"] == 7
    out[0]["dense"][0] = 99.0  # copies, not views into the batch
    assert td["dense"][0, 0].item() == 1.0
    # round trip: dicts -> TensorDict -> dicts
    again = sample_dicts(list_of_dict_to_tensordict([{k: v for k, v in r.items() if k != "global_steps"} for r in out]))
    assert torch.equal(again[1]["lp"], rows[1]["lp"]) and again[1]["extra"] == rows[1]["extra"]


def test_sample_dicts_single_sample():
    out = sample_dicts(list_of_dict_to_tensordict([{"ids": torch.tensor([5, 6]), "s": "text"}]))
    assert len(out) == 1 and torch.equal(out[0]["ids"], torch.tensor([5, 6])) and out[0]["s"] == "text"


def test_make_uids_and_their_order():
    assert make_uids("t", 3, 8, 3) == ["t3-8", "t3-9", "t3-10"]
    assert make_uids("v", 0, 0, 1) == ["v0-0"]
    for bad in (("x", 1, 0, 1), ("t", -1, 0, 1), ("t", 1, -1, 1)):
        with pytest.raises(ValueError):
            make_uids(*bad)
    uids = ["t3-10", "t3-9", "t12-0", "t2-5", "0f3a-uuid", "r3-1"]
    assert sorted(uids, key=uid_order) == ["r3-1", "t2-5", "t3-9", "t3-10", "t12-0", "0f3a-uuid"]
    keys = ["t1-2_10_0", "t1-2_2_0", "t1-10_0_0", "t1-2_pair1chosen_0", "t1-2_2_1"]
    assert sorted(keys, key=key_order) == ["t1-2_2_0", "t1-2_2_1", "t1-2_10_0", "t1-2_pair1chosen_0", "t1-10_0_0"]
    assert all(uid_of(k) == k.split("_")[0] for k in make_uids("t", 1, 0, 3))
