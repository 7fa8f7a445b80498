"""Group filter decisions of recipe.algos.group_filter (Minimalist paper Reinforce-Rej, DAPO refill).
The ``group_filter`` node itself: tests/unit/config/test_nodes.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recipe.algos.group_filter import (
    GroupDecision,
    decide_groups,
    filter_metrics,
    group_accuracy,
    keep_mask,
)
from recipe.config import GroupFilterConfig

# groups of 4 responses: all-correct, all-wrong, 1/4, 1/2, 3/4 correct
INDEX = ["c"] * 4 + ["w"] * 4 + ["q1"] * 4 + ["h"] * 4 + ["q3"] * 4
CORRECT = [1, 1, 1, 1] + [0, 0, 0, 0] + [1, 0, 0, 0] + [0, 1, 1, 0] + [1, 1, 0, 1]
ACC = {"c": 1.0, "w": 0.0, "q1": 0.25, "h": 0.5, "q3": 0.75}


def test_group_accuracy_mean_and_first_appearance_order():
    idx = ["b", "a", "b", "a", "c"]
    acc = group_accuracy(idx, [1, 0, 0, 0, True])
    assert list(acc) == ["b", "a", "c"]
    assert acc == {"b": 0.5, "a": 0.0, "c": 1.0}
    assert group_accuracy(np.array(INDEX, dtype=object), torch.tensor(CORRECT, dtype=torch.float32)) == ACC


def test_group_accuracy_rejects_bad_input():
    with pytest.raises(ValueError, match="entries"):
        group_accuracy(["a", "b"], [1.0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        group_accuracy(["a", "a"], [1.0, -1.0])  # a +-1 score is not a correctness value


def test_disabled_keeps_everything():
    cfg = GroupFilterConfig()
    assert not cfg.enabled
    d = decide_groups(ACC, cfg)
    assert d.kept == list(ACC) and d.num_dropped == 0
    assert decide_groups(ACC, None).kept == list(ACC)


def test_drop_all_correct_alone():
    d = decide_groups(ACC, GroupFilterConfig(drop_all_correct=True))
    assert d.dropped_all_correct == ["c"] and d.dropped_all_wrong == [] and d.dropped_band == []
    assert d.kept == ["w", "q1", "h", "q3"]


def test_drop_all_wrong_alone():
    d = decide_groups(ACC, GroupFilterConfig(drop_all_wrong=True))
    assert d.dropped_all_wrong == ["w"] and d.dropped_all_correct == []
    assert d.kept == ["c", "q1", "h", "q3"]


def test_reinforce_rej_drops_both():
    d = decide_groups(ACC, {"drop_all_correct": True, "drop_all_wrong": True})
    assert d.kept == ["q1", "h", "q3"]
    assert (d.dropped_all_correct, d.dropped_all_wrong, d.dropped_band) == (["c"], ["w"], [])


def test_band_alone_edges_inclusive_and_reason():
    d = decide_groups(ACC, GroupFilterConfig(band=(0.25, 0.75)))
    assert d.kept == ["q1", "h", "q3"]  # 0.25 and 0.75 are inside
    # all-correct / all-wrong groups removed only by the band count as band drops
    assert d.dropped_band == ["c", "w"] and d.dropped_all_correct == [] and d.dropped_all_wrong == []
    d = decide_groups(ACC, GroupFilterConfig(band=(0.3, 0.7)))
    assert d.kept == ["h"] and d.dropped_band == ["c", "w", "q1", "q3"]
    d = decide_groups(ACC, GroupFilterConfig(band=(0.5, 0.5)))
    assert d.kept == ["h"]


def test_band_edges_tolerate_rounding():
    acc = {"x": 1 / 3, "y": 2 / 3}
    d = decide_groups(acc, GroupFilterConfig(band=(0.3333333, 0.6666666)))
    assert d.kept == ["x", "y"]


def test_band_combined_with_flags_reasons_separate():
    cfg = GroupFilterConfig(drop_all_correct=True, drop_all_wrong=True, band=(0.4, 1.0))
    d = decide_groups(ACC, cfg)
    assert d.dropped_all_correct == ["c"]  # the flag wins over the band
    assert d.dropped_all_wrong == ["w"]
    assert d.dropped_band == ["q1"]
    assert d.kept == ["h", "q3"]
    # every group in exactly one list
    assert sorted(d.kept + d.dropped_all_correct + d.dropped_all_wrong + d.dropped_band) == sorted(ACC)


def test_all_correct_uses_tolerance():
    d = decide_groups({"a": 1.0 - 1e-9, "b": 1e-9, "m": 0.999}, {"drop_all_correct": True, "drop_all_wrong": True})
    assert d.dropped_all_correct == ["a"] and d.dropped_all_wrong == ["b"] and d.kept == ["m"]


def test_order_preserved_for_interleaved_groups():
    idx = ["z", "a", "m", "z", "a", "m", "k", "k"]
    correct = [1, 0, 1, 0, 0, 1, 0, 1]
    d = decide_groups(group_accuracy(idx, correct), {"drop_all_wrong": True, "drop_all_correct": True})
    assert d.kept == ["z", "k"] and d.dropped_all_wrong == ["a"] and d.dropped_all_correct == ["m"]


def test_keep_mask():
    m = keep_mask(INDEX, CORRECT, {"drop_all_correct": True, "drop_all_wrong": True})
    assert m.dtype == torch.bool and m.shape == (len(INDEX),)
    assert m.tolist() == [False] * 8 + [True] * 12
    idx = np.array(["b", "a", "b", "a"], dtype=object)
    m = keep_mask(idx, np.array([1.0, 0.0, 0.0, 0.0]), {"drop_all_wrong": True})
    assert m.tolist() == [True, False, True, False]
    assert keep_mask(INDEX, CORRECT, None).all()


def test_filter_metrics():
    d = decide_groups(ACC, GroupFilterConfig(drop_all_correct=True, drop_all_wrong=True, band=(0.4, 1.0)))
    assert filter_metrics(d, gen_rounds=2) == {
        "filter/kept_groups": 2,
        "filter/dropped_all_correct": 1,
        "filter/dropped_all_wrong": 1,
        "filter/dropped_band": 1,
        "filter/gen_rounds": 2,
    }
    assert filter_metrics(GroupDecision(), 1)["filter/kept_groups"] == 0
