"""Group filters inside verl's V1 sampling stage (a custom ``ReplayBuffer``).

verl's V1 trainer takes each training batch from a replay buffer that reads finished
rollout groups (rewards already computed) from TransferQueue; a custom one plugs in with
``trainer.v1.sampler.custom_sampler.{path,name}``. :class:`GroupFilterReplayBuffer` is
verl's synchronous ``ReplayBuffer`` with this project's group filter applied between
reward and advantage: whole groups (all responses of one prompt, one ``uid``) are kept or
dropped by their accuracy (:mod:`recipe.algos.filters`):

- ``mode: drop`` (the Minimalist paper's Reinforce-Rej): train on the groups that are left;
  if none is left the update is skipped with a warning (:class:`recipe.trainer.RecipeTrainer`).
- ``mode: refill`` (DAPO's dynamic sampling): generate more prompts until the batch holds
  ``train_batch_size`` kept groups, for at most ``max_gen_rounds`` generation rounds per
  step; at the cap it gives up, says so, and trains on what it has.

Options come from ``trainer.v1.sampler.sampler_kwargs`` (set from the top-level
``group_filter`` node by ``conf/config.yaml``): ``group_filter`` (see
:class:`~recipe.algos.filters.GroupFilterConfig`), ``gen_batch_size`` (refills are whole
multiples of it, as verl fetches prompts; ``data.gen_batch_size``, default the batch size) and ``poll_interval`` (seconds between polls of
TransferQueue; verl's default of 2 s adds up to 2 s per step).

Metrics (per step): ``filter/kept_groups``, ``filter/dropped_all_correct``,
``filter/dropped_all_wrong``, ``filter/dropped_band``, ``filter/gen_rounds``,
``filter/discarded_surplus``, ``filter/gave_up`` (1 when refill hit its cap short of a full
batch), ``filter/skipped_update`` (1 when nothing was left to train on).
"""

from __future__ import annotations

import logging
import math
import time

import transfer_queue as tq
from transfer_queue import KVBatchMeta

from recipe.algos.filters import GroupFilterConfig, decide_groups, group_accuracy
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

logger = logging.getLogger(__name__)

#: Sample-tag flag: the batch holds only dropped groups; do not train on it.
SKIP_UPDATE = "skip_update"


def reward_info(extra) -> dict:
    """The reward function's dict (``reward_extra_info``) of one sample's verl ``extra_fields``
    (a dict, a tensordict ``NonTensorData`` wrapping one, or None); ``{}`` when absent."""
    extra = getattr(extra, "data", extra)
    info = extra.get("reward_extra_info") if isinstance(extra, dict) else None
    return info or {}


def response_metric(extra, metric: str, key: str) -> float:
    """Per-response value ``reward_extra_info[metric]`` of one sample's ``extra_fields``.

    Args:
        extra: the sample's verl ``extra_fields``.
        metric: reward field name (e.g. ``acc``).
        key: the config key that chose ``metric``, named in the error.

    Raises:
        RuntimeError: the reward function did not return ``metric``.
    """
    info = reward_info(extra)
    if metric not in info:
        raise RuntimeError(
            f"{key}={metric!r} is not among the reward function's outputs {sorted(info)}; set {key} to one of them"
        )
    return float(info[metric])


class GroupFilterReplayBuffer(ReplayBuffer):
    """verl's sync replay buffer plus a group filter (drop or refill).

    Args:
        trainer_mode: Must be ``"sync"``.
        sampler_kwargs: ``group_filter`` (dict), ``gen_batch_size`` (int),
            ``poll_interval`` (float, seconds).
        Other arguments: as verl's ``ReplayBuffer``.

    Raises:
        ValueError: on an asynchronous trainer mode or an invalid ``group_filter``.
    """

    def __init__(self, trainer_mode, trainer_config, max_off_policy_threshold, max_off_policy_strategy,
                 sampler_kwargs, refill_fn=None, **kwargs):
        opts = dict(sampler_kwargs or {})
        kwargs.setdefault("poll_interval", float(opts.get("poll_interval", 0.2)))
        super().__init__(
            trainer_mode=trainer_mode,
            trainer_config=trainer_config,
            max_off_policy_threshold=max_off_policy_threshold,
            max_off_policy_strategy=max_off_policy_strategy,
            sampler_kwargs=sampler_kwargs,
            refill_fn=refill_fn,
            **kwargs,
        )
        if trainer_mode != "sync":
            raise ValueError(f"GroupFilterReplayBuffer supports trainer.v1.trainer_mode sync only, got {trainer_mode}")
        self.filter_cfg = GroupFilterConfig.from_config(opts.get("group_filter"))
        # None: refill in whole training batches, as verl fetches prompts by default
        self.refill_unit = opts.get("gen_batch_size")

    # ------------------------------------------------------------------------------
    def _group_accuracy(self, partition_id: str, uids: set[str]) -> dict[str, float]:
        """uid -> mean of the filter metric (``reward_extra_info[metric]``) over the group's
        responses, for the groups of ``uids`` that have trajectories (via
        :func:`recipe.algos.filters.group_accuracy`)."""
        keys = [k for k in self.partitions[partition_id] if k.split("_")[0] in uids]
        if not keys:
            return {}
        data = tq.kv_batch_get(keys=keys, partition_id=partition_id, select_fields=["extra_fields"])
        correct = [response_metric(extra, self.filter_cfg.metric, "group_filter.metric")
                   for extra in list(data["extra_fields"])]
        return group_accuracy([k.split("_")[0] for k in keys], correct)

    def _wait_until_idle(self, partition_id: str) -> None:
        """Poll TransferQueue until no prompt of ``partition_id`` is pending or running."""
        last = time.time()
        while True:
            self._sync_metadata_from_transfer_queue()
            if not self.pending_keys[partition_id] and not self.running_keys[partition_id]:
                return
            last = self._wait_for_next_poll(partition_id, last)

    def sample(self, global_steps: int, partition_id: str, batch_size: int) -> tuple[KVBatchMeta, dict]:
        """Sample ``batch_size`` groups that pass the filter (fewer in drop mode / at the cap).

        Returns:
            The batch and the ``filter/*`` metrics. When every group was dropped the batch
            holds the dropped groups, each tag flagged ``SKIP_UPDATE``: the trainer skips
            the update and verl frees them at the end of the step.
        """
        cfg = self.filter_cfg
        if partition_id == "val" or not cfg.enabled:
            return super().sample(global_steps, partition_id, batch_size)

        kept: list[str] = []
        decided: set[str] = set()
        last_dropped: set[str] = set()  # the latest round's dropped groups, kept in TQ until the end
        totals = {"dropped_all_correct": 0, "dropped_all_wrong": 0, "dropped_band": 0}
        rounds, gave_up = 1, False
        while True:
            self._wait_until_idle(partition_id)
            terminal = self.finished_keys[partition_id] | self.failure_keys[partition_id]
            new = terminal - decided
            if new:
                group_acc = self._group_accuracy(partition_id, new)
                steps = self.prompt_global_steps[partition_id]
                decision = decide_groups(dict(sorted(group_acc.items(), key=lambda kv: steps.get(kv[0], 0))), cfg)
                totals["dropped_all_correct"] += len(decision.dropped_all_correct)
                totals["dropped_all_wrong"] += len(decision.dropped_all_wrong)
                totals["dropped_band"] += len(decision.dropped_band)
                self._clear_groups(partition_id, last_dropped | (new - set(group_acc)))
                last_dropped = set(decision.dropped_all_correct) | set(decision.dropped_all_wrong) | set(
                    decision.dropped_band
                )
                kept.extend(decision.kept)
                decided |= new
            if len(kept) >= batch_size or cfg.mode == "drop":
                break
            if rounds >= cfg.max_gen_rounds:
                gave_up = True
                logger.warning(
                    "group_filter refill gave up after %d generation rounds (group_filter.max_gen_rounds): "
                    "%d of %d groups kept; training on those",
                    rounds, len(kept), batch_size,
                )
                break
            missing = batch_size - len(kept)
            unit = int(self.refill_unit or batch_size)
            ask = math.ceil(missing * cfg.oversample / unit) * unit
            self.refill_fn(ask)
            rounds += 1

        selected, surplus = kept[:batch_size], kept[batch_size:]
        if surplus:
            self._clear_groups(partition_id, set(surplus))
        if selected and last_dropped:
            self._clear_groups(partition_id, last_dropped)
        # no re-sync needed: nothing is in flight and _clear_groups keeps self.partitions current
        metrics = {"filter/kept_groups": len(selected), "filter/gen_rounds": rounds}
        metrics.update({f"filter/{k}": v for k, v in totals.items()})
        metrics["filter/discarded_surplus"] = len(surplus)
        metrics["filter/gave_up"] = int(gave_up)
        metrics["filter/skipped_update"] = int(not selected)
        snapshot = dict(self.partitions[partition_id])
        if not selected:
            # Hand the dropped groups over marked `skip_update`: the trainer skips every stage
            # of the step for them, and verl's end-of-step cleanup frees them from TransferQueue.
            logger.warning(
                "group_filter dropped every group of step %d (%s); skipping the update", global_steps, totals
            )
            batch = self._materialize_batch(partition_id, sorted(last_dropped), snapshot)
            for tag in batch.tags:  # tags (unlike extra_info) survive verl's re-batching in step()
                tag[SKIP_UPDATE] = True
            return batch, metrics
        return self._materialize_batch(partition_id, selected, snapshot), metrics
