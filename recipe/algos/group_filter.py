"""Group filters: which prompt groups of a rollout batch to train on (pure, no Ray).

Minimalist paper (Xiong et al., arXiv 2504.11343, docs/PAPERS.md §1): "Reinforce + remove
all wrong" drops groups whose n responses are all wrong, "+ remove all correct" drops
all-correct groups, and Reinforce-Rej drops both; the paper then trains on what is left
(``mode="drop"``). DAPO's dynamic sampling (arXiv 2503.14476) instead generates more prompts
until the batch is full again (``mode="refill"``). ``band`` keeps only groups whose accuracy
lies in [lo, hi] (e.g. DOTS-style "neither too easy nor too hard").

This module decides; the trainer hook applies the decision to the batch and runs the extra
generation rounds. Per-response correctness comes from ``reward_extra_info[cfg.metric]``
(values in [0, 1]; 1 = correct).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from recipe.config import GroupFilterConfig

__all__ = [
    "GroupDecision",
    "GroupFilterConfig",
    "decide_groups",
    "filter_metrics",
    "group_accuracy",
    "keep_mask",
]

#: Tolerance for "all correct" (acc == 1), "all wrong" (acc == 0) and the band edges.
ACC_TOL = 1e-6
@dataclass
class GroupDecision:
    """Outcome of :func:`decide_groups`; every uid is in exactly one list, in input order."""

    kept: list[str] = field(default_factory=list)
    dropped_all_correct: list[str] = field(default_factory=list)
    dropped_all_wrong: list[str] = field(default_factory=list)
    dropped_band: list[str] = field(default_factory=list)

    @property
    def num_dropped(self) -> int:
        return len(self.dropped_all_correct) + len(self.dropped_all_wrong) + len(self.dropped_band)


def _as_list(values: Any) -> list[Any]:
    if isinstance(values, (torch.Tensor, np.ndarray)):
        return values.tolist()
    return list(values)


def group_accuracy(index: Sequence[str], correct: Sequence[float]) -> dict[str, float]:
    """Mean correctness per group: acc_g = (1/n_g) sum_{i in g} correct_i.

    Args:
        index: ``B`` group labels (verl's ``uid``), list/numpy/tensor.
        correct: ``B`` correctness values in [0, 1] (bool, int or float).

    Returns:
        uid -> accuracy, in order of first appearance.

    Raises:
        ValueError: lengths differ, or a value lies outside [0, 1] (e.g. a +-1 score was given
            instead of correctness).
    """
    labels = _as_list(index)
    values = [float(v) for v in _as_list(correct)]
    if len(labels) != len(values):
        raise ValueError(f"index has {len(labels)} entries but correct has {len(values)}")
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for uid, v in zip(labels, values, strict=True):
        if not (0.0 <= v <= 1.0):
            raise ValueError(f"correctness must lie in [0, 1], got {v} for uid {uid!r}")
        sums[uid] = sums.get(uid, 0.0) + v
        counts[uid] = counts.get(uid, 0) + 1
    return {uid: sums[uid] / counts[uid] for uid in sums}


def decide_groups(
    group_acc: Mapping[str, float], cfg: GroupFilterConfig | Mapping[str, Any] | None
) -> GroupDecision:
    """Split groups into kept and dropped (with the reason), preserving input order.

    Rules, checked in this order for each group with accuracy acc:
    1. ``drop_all_correct`` and acc == 1 -> ``dropped_all_correct``;
    2. ``drop_all_wrong`` and acc == 0 -> ``dropped_all_wrong``;
    3. ``band = (lo, hi)`` and not lo <= acc <= hi -> ``dropped_band`` (also an all-correct or
       all-wrong group that only the band removes);
    4. otherwise kept.
    Comparisons use a tolerance of ``ACC_TOL``.

    Args:
        group_acc: uid -> accuracy in [0, 1] (from :func:`group_accuracy`).
        cfg: a GroupFilterConfig, or a mapping / None for :meth:`GroupFilterConfig.from_config`.

    Returns:
        A :class:`GroupDecision`.
    """
    cfg = GroupFilterConfig.from_config(cfg)
    decision = GroupDecision()
    for uid, acc in group_acc.items():
        if cfg.drop_all_correct and acc >= 1.0 - ACC_TOL:
            decision.dropped_all_correct.append(uid)
        elif cfg.drop_all_wrong and acc <= ACC_TOL:
            decision.dropped_all_wrong.append(uid)
        elif cfg.band is not None and not (cfg.band[0] - ACC_TOL <= acc <= cfg.band[1] + ACC_TOL):
            decision.dropped_band.append(uid)
        else:
            decision.kept.append(uid)
    return decision


def keep_mask(
    index: Sequence[str], correct: Sequence[float], cfg: GroupFilterConfig | Mapping[str, Any] | None
) -> torch.Tensor:
    """Per-response keep mask: True where the response's group is kept.

    Args:
        index: ``B`` group labels (uids).
        correct: ``B`` correctness values in [0, 1].
        cfg: the filter config (see :func:`decide_groups`).

    Returns:
        ``[B]`` torch.bool, 1 = keep.
    """
    labels = _as_list(index)
    kept = set(decide_groups(group_accuracy(labels, correct), cfg).kept)
    return torch.tensor([uid in kept for uid in labels], dtype=torch.bool)


def filter_metrics(decision: GroupDecision, gen_rounds: int) -> dict[str, int]:
    """Metrics for the logger (README glossary).

    Returns:
        ``filter/kept_groups``, ``filter/dropped_all_correct``, ``filter/dropped_all_wrong``,
        ``filter/dropped_band`` (group counts) and ``filter/gen_rounds`` (generation rounds
        used this step, 1 without refill).
    """
    return {
        "filter/kept_groups": len(decision.kept),
        "filter/dropped_all_correct": len(decision.dropped_all_correct),
        "filter/dropped_all_wrong": len(decision.dropped_all_wrong),
        "filter/dropped_band": len(decision.dropped_band),
        "filter/gen_rounds": int(gen_rounds),
    }
