"""The group filter inside verl's V1 sampling stage: the sampler every recipe uses.

verl's V1 trainer takes each training batch from a sampler (a ``ReplayBuffer`` in verl's
words) that reads finished rollout groups (rewards already computed) from TransferQueue; a
custom one plugs in with ``trainer.v1.sampler.custom_sampler.{path,name}``
(``conf/config.yaml`` sets :class:`GroupFilterSampler`). It is verl's synchronous sampler
with this project's group filter applied between reward and advantage: whole groups (all
responses of one prompt, one ``uid``) are kept or dropped by their accuracy
(:mod:`recipe.algos.group_filter`, settings :class:`recipe.config.GroupFilterConfig`):

- ``mode: drop`` (the Minimalist paper's Reinforce-Rej): train on the groups that are left;
  if none is left the update is skipped with a warning (rows tagged ``skip_update``).
- ``mode: refill`` (DAPO's dynamic sampling): generate more prompts until the batch holds
  the step's fresh groups, for at most ``max_gen_rounds`` generation rounds per step; at the
  cap it gives up, says so, and trains on what it has.

Then it hands the batch to the enabled stages' ``sample`` hooks (:mod:`recipe.stages.base`;
rollout replay appends replayed groups, preference turns groups into pairs). The trainer
sets :attr:`GroupFilterSampler.stages` and, each step, :attr:`GroupFilterSampler.fresh_size`
(how many fresh groups were asked for; 0 when a stage supplies the whole batch).

Options come from ``trainer.v1.sampler.sampler_kwargs`` (set from the top-level
``group_filter`` node by ``conf/config.yaml``): ``group_filter``, ``gen_batch_size`` (refills
are whole multiples of it, as verl fetches prompts; ``data.gen_batch_size``, default the
batch size) and ``poll_interval`` (seconds between polls of TransferQueue; verl's default of
2 s adds up to 2 s per step).

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

from recipe.algos.group_filter import GroupDecision, decide_groups, filter_metrics, group_accuracy
from recipe.config import GroupFilterConfig
from recipe.stages.base import SampleContext
from recipe.stages.rows import key_order, mark_skipped, response_metric, uid_of, uid_order
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

logger = logging.getLogger(__name__)

class GroupFilterSampler(ReplayBuffer):
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
            raise ValueError(f"GroupFilterSampler supports trainer.v1.trainer_mode sync only, got {trainer_mode}")
        self.filter_cfg = GroupFilterConfig.from_config(opts.get("group_filter"))
        # None: refill in whole training batches, as verl fetches prompts by default
        self.refill_unit = opts.get("gen_batch_size")
        #: the enabled stages with a ``sample`` hook, in order (set by the trainer)
        self.stages: list = []
        #: fresh groups asked for this step (set by the trainer's prepare_step; None: batch_size)
        self.fresh_size: int | None = None

    # ------------------------------------------------------------------------------
    def _group_accuracy(self, partition_id: str, uids: set[str]) -> dict[str, float]:
        """uid -> mean of the filter metric (``reward_extra_info[metric]``) over the group's
        responses, for the groups of ``uids`` that have trajectories (via
        :func:`recipe.algos.group_filter.group_accuracy`)."""
        keys = [k for k in self.partitions[partition_id] if uid_of(k) in uids]
        if not keys:
            return {}
        data = tq.kv_batch_get(keys=keys, partition_id=partition_id, select_fields=["extra_fields"])
        correct = [response_metric(extra, self.filter_cfg.metric, "group_filter.metric")
                   for extra in list(data["extra_fields"])]
        return group_accuracy([uid_of(k) for k in keys], correct)

    def _wait_until_idle(self, partition_id: str) -> None:
        """Poll TransferQueue until no prompt of ``partition_id`` is pending or running."""
        last = time.time()
        while True:
            self._sync_metadata_from_transfer_queue()
            if not self.pending_keys[partition_id] and not self.running_keys[partition_id]:
                return
            last = self._wait_for_next_poll(partition_id, last)

    def sample(self, global_steps: int, partition_id: str, batch_size: int) -> tuple[KVBatchMeta, dict]:
        """verl's sampling hook: the step's fresh groups through the filter, then the stages.

        Returns:
            The batch and the ``filter/*`` metrics plus the stages' metrics. Validation
            batches are verl's, untouched.
        """
        if partition_id == "val":
            return super().sample(global_steps, partition_id, batch_size)
        n_fresh = batch_size if self.fresh_size is None else self.fresh_size
        self.fresh_size = None
        if n_fresh > 0:
            batch, metrics = self.filter_sample(global_steps, partition_id, n_fresh)
        else:  # a stage supplies the whole batch (e.g. LoRR's reuse of the initial pairs)
            batch, metrics = KVBatchMeta(partition_id=partition_id, keys=[], tags=[]), {}
        ctx = SampleContext(step=global_steps, partition_id=partition_id, batch_size=batch_size,
                            forget=lambda keys: self._forget(partition_id, keys))
        for stage in self.stages:
            batch = stage.sample(ctx, batch, metrics)
        return batch, metrics

    # ------------------------------------------------------------------ deterministic order
    def _select_prompt_uids(self, partition_id: str, sampleable_keys: set[str], batch_size: int):
        """verl's selection (oldest step first) with ties broken by uid
        (:func:`recipe.stages.rows.uid_order`), not by set iteration order."""
        steps = dict(self.prompt_global_steps[partition_id])
        snapshot = dict(self.partitions[partition_id])
        ordered = sorted(sampleable_keys, key=lambda key: (steps.get(key, 0), uid_order(key)))
        return ordered[:batch_size], snapshot, steps

    def _materialize_batch(self, partition_id: str, selected_prompt_uids, partition_snapshot) -> KVBatchMeta:
        """verl's batch, its rows ordered by their prompt's step, then by key
        (:func:`recipe.stages.rows.key_order`) instead of by arrival: micro-batches and sums
        are then the same in every run."""
        steps = dict(self.prompt_global_steps[partition_id])  # read before verl clears the prompts
        batch = super()._materialize_batch(partition_id, selected_prompt_uids, partition_snapshot)
        order = sorted(range(len(batch.keys)),
                       key=lambda i: (steps.get(uid_of(batch.keys[i]), 0), key_order(batch.keys[i])))
        return KVBatchMeta(partition_id=partition_id, keys=[batch.keys[i] for i in order],
                           tags=[batch.tags[i] for i in order])

    def _forget(self, partition_id: str, keys) -> None:
        """Drop rows a stage removed from TransferQueue from this sampler's bookkeeping."""
        for key in keys:
            self.partitions[partition_id].pop(key, None)

    def filter_sample(self, global_steps: int, partition_id: str, batch_size: int) -> tuple[KVBatchMeta, dict]:
        """Sample ``batch_size`` groups that pass the filter (fewer in drop mode / at the cap).

        Returns:
            The batch and the ``filter/*`` metrics. When every group was dropped the batch
            holds the dropped groups, each tag flagged ``SKIP_UPDATE``: the trainer skips
            the update and verl frees them at the end of the step.
        """
        cfg = self.filter_cfg
        if not cfg.enabled:
            return super().sample(global_steps, partition_id, batch_size)

        kept: list[str] = []
        decided: set[str] = set()
        last_dropped: set[str] = set()  # the latest round's dropped groups, kept in TQ until the end
        totals = GroupDecision(kept=[], dropped_all_correct=[], dropped_all_wrong=[], dropped_band=[])
        rounds, gave_up = 1, False
        while True:
            self._wait_until_idle(partition_id)
            terminal = self.finished_keys[partition_id] | self.failure_keys[partition_id]
            new = terminal - decided
            if new:
                group_acc = self._group_accuracy(partition_id, new)
                steps = self.prompt_global_steps[partition_id]
                ordered = sorted(group_acc.items(), key=lambda kv: (steps.get(kv[0], 0), uid_order(kv[0])))
                decision = decide_groups(dict(ordered), cfg)
                totals.dropped_all_correct.extend(decision.dropped_all_correct)
                totals.dropped_all_wrong.extend(decision.dropped_all_wrong)
                totals.dropped_band.extend(decision.dropped_band)
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
        totals.kept = selected
        metrics: dict = filter_metrics(totals, rounds)
        metrics["filter/discarded_surplus"] = len(surplus)
        metrics["filter/gave_up"] = int(gave_up)
        metrics["filter/skipped_update"] = int(not selected)
        snapshot = dict(self.partitions[partition_id])
        if not selected:
            # Hand the dropped groups over marked `skip_update`: the trainer skips every stage
            # of the step for them, and verl's end-of-step cleanup frees them from TransferQueue.
            logger.warning("group_filter dropped every group of step %d (%s); skipping the update", global_steps,
                           {k: v for k, v in metrics.items() if k.startswith("filter/dropped")})
            batch = self._materialize_batch(partition_id, sorted(last_dropped), snapshot)
            mark_skipped(batch.tags)  # tags (unlike extra_info) survive verl's re-batching in step()
            return batch, metrics
        return self._materialize_batch(partition_id, selected, snapshot), metrics
