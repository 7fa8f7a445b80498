"""Reward metrics of every run: the reward function's fields and the effective ratio.

:class:`RewardMetricsStage` is always on (``metrics`` hook, last in the order). After
verl's own step metrics it adds, over the step's fresh rollouts (verl's padding copies and
replayed groups left out):

- ``reward/<key>``: the batch mean of every numeric field the reward function returns
  (``acc``, ``has_answer``, ``grader_timeout``, ...), next to verl's ``critic/score/*``;
  validation already reports them as ``val-core/<data_source>/acc/mean@1`` etc.
- ``dots/effective_ratio``: the share of fresh groups with 0 < accuracy < 1 (the DOTS +
  RR paper's "effective" questions), logged for every run so that DOTS can be compared
  with its baseline.
"""

from __future__ import annotations

from recipe.algos.metrics import effective_ratio, reward_metrics
from recipe.stages.base import Handles, Stage, register_stage
from recipe.stages.rows import real_indices, reward_info, uid_of


def fresh_reward_metrics(keys: list[str], tags: list[dict], extra_fields: list) -> dict[str, float]:
    """``reward/*`` and ``dots/effective_ratio`` of a batch's fresh rows.

    Args:
        keys: ``[B]`` TransferQueue row keys (``{uid}_{session}_{index}``).
        tags: ``[B]`` row tags (padding and replayed rows are skipped).
        extra_fields: ``[B]`` verl ``extra_fields`` of the rows (holding ``reward_extra_info``).

    Returns:
        The metrics (no ``dots/effective_ratio`` when no row carries ``acc``).
    """
    fresh = real_indices(tags, fresh_only=True)
    infos = [reward_info(extra_fields[i]) for i in fresh]
    out = reward_metrics(infos)
    with_acc = [(uid_of(keys[i]), float(info["acc"])) for i, info in zip(fresh, infos) if "acc" in info]
    ratio = effective_ratio([u for u, _ in with_acc], [a for _, a in with_acc])
    if ratio is not None:
        out["dots/effective_ratio"] = ratio
    return out


@register_stage
class RewardMetricsStage(Stage):
    """``reward/*`` and ``dots/effective_ratio`` of the fresh rows (module docstring)."""

    name = "reward_metrics"
    order = 90

    @classmethod
    def enabled(cls, cfg, config) -> bool:
        return True

    def metrics(self, h: Handles, batch, metrics: dict) -> None:
        import transfer_queue as tq

        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_fields"])
        extra = data.pop("extra_fields", None)
        if extra is not None:
            metrics.update(fresh_reward_metrics(list(batch.keys), list(batch.tags), extra.tolist()))
