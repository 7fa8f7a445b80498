"""Iterative (online) DPO and LoRR inside verl's V1 trainer: the preference stage.

One **iteration** is a collection phase and then a training phase
(:func:`recipe.algos.lorr.schedule`; ``preference.iteration``):

1. **Collection** (``preference.iteration.rollout_steps`` steps, 1 by default): each step's
   rollouts (verl's agent loop, ``n`` responses per prompt, verifier rewards) become
   preference pairs in the ``sample`` hook (after the group filter): each group (one ``uid``)
   gives pairs by ``preference.pairs`` (:func:`recipe.algos.preference.build_pairs`; groups
   without a reward gap are skipped). No update happens until the iteration's last step, so
   every pair of the iteration comes from the iteration-start policy. The pairs of the
   steps before the last are kept by the stage (their step is skipped: no log-probs, no
   update); on the last step all of the iteration's pairs go into TransferQueue, laid out
   ``[c_0, r_0, c_1, r_1, ...]`` with the per-row fields ``pair_id`` / ``is_chosen``.
2. **Reference**: on the training step verl's reference worker computes ``ref_log_prob``
   once for all of the iteration's pairs. With ``preference.reference: iteration_start``
   its weights are first set to the current policy (which has not moved since the
   iteration began) by this project's worker method
   (:meth:`recipe.stages.workers.RecipeActorRolloutRefWorker.recipe_sync_reference`): the
   reference is fixed for the iteration; with ``initial`` it stays the initial model.
3. **Training** (``update_actor`` hook, replacing verl's): ``L`` epochs (``lorr.replays``;
   1 for plain iterative DPO) over the iteration's pairs, each epoch in mini-batches of
   ``preference.iteration.mini_batch_pairs`` pairs (shuffled per epoch), one
   ``update_actor`` call and so one optimizer step per mini-batch. verl steps the LR
   scheduler once per ``update_actor`` call (``update_lr_scheduler`` on its last mini-batch,
   ``verl/workers/engine_workers.py`` ``train_mini_batch``), so the scheduler, like AdamW's
   weight decay, advances once per optimizer step. Rows are padded with zero-weight rows to
   a multiple of 2 x pairs per micro-batch (half of ``ppo_micro_batch_size_per_gpu``, at most
   the pairs one rank gets) x data-parallel size; the padding rows go into the last
   mini-batch, and verl's ``force_group_size=2`` keeps each pair in one micro-batch and on
   one rank. Epoch ``k`` (0-based) adds ``lambda_k`` times the NLL of the chosen response
   (``lorr.sft``).
4. **Reset** (``lorr.reset``): after the iteration's last epoch (``unit: iterations``,
   every ``every`` iterations; or ``unit: epochs`` every ``every`` epochs over the run) the
   matching parameters are pulled towards the initial weights,
   theta <- alpha * theta + (1 - alpha) * theta_0
   (:meth:`~recipe.stages.workers.RecipeActorRolloutRefWorker.recipe_lorr_reset`;
   arithmetic in :mod:`recipe.algos.lorr`).
5. **Reuse** (``lorr.reuse``): all of iteration 1's pairs are kept; once a reset has
   happened, each iteration draws fresh rollouts with probability ``rollout_ratio`` and
   otherwise is one step that trains on the initial pairs again (no generation), with
   the reference refreshed to the policy of that iteration's start.

State (iteration, position in it, its pending pairs, epochs, optimizer steps, resets,
reference refreshes, the initial pairs, the RNGs, theta_0 per rank) is saved with verl's
checkpoints and restored on resume (``state_dict`` / ``save`` / ``load`` hooks); a
checkpoint inside a collection phase needs no reference (it is set on the training step).
Settings: :class:`recipe.config.PreferenceConfig`, :class:`recipe.config.LorrConfig`; the
actor worker is :class:`recipe.stages.workers.RecipeActorRolloutRefWorker` (``worker_class``).

Metrics: ``dpo/pairs``, ``dpo/skipped_groups``, ``dpo/fresh_rollouts``, ``dpo/fresh_score_mean``,
``dpo/iteration_pairs``, ``dpo/reward_margin``, ``dpo/reward_accuracy``, ``dpo/chosen_logps``,
``dpo/rejected_logps``, ``dpo/loss``, ``dpo/reference_refreshed``, ``dpo/reference_refreshes``,
``lorr/iteration``, ``lorr/epoch``, ``lorr/replay_index``, ``lorr/optimizer_steps``,
``lorr/resets``, ``lorr/sft_weight``, ``lorr/sft_loss``, ``lorr/reused_initial``,
``lorr/reset_delta_norm``.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import torch
import transfer_queue as tq
from tensordict import TensorDict
from transfer_queue import KVBatchMeta

from recipe.algos.lorr import epoch_lambdas, mini_batches, reset_epochs, reuse_initial, step_role
from recipe.algos.preference import build_pairs
from recipe.config import LorrConfig, PreferenceConfig
from recipe.stages.base import Handles, SampleContext, Stage, register_stage
from recipe.stages.rows import (
    COLLECTING,
    REUSED,
    STAGE_FIELDS,
    clone_row,
    is_padding,
    is_skipped,
    mark_skipped,
    real_indices,
    response_metric,
    sample_dicts,
    uid_of,
)
from verl.utils.tensordict_utils import list_of_dict_to_tensordict

logger = logging.getLogger(__name__)

#: Fields of a pair row that identify the pair.
PAIR_ID, IS_CHOSEN = "pair_id", "is_chosen"


def row_score(fields: dict, score_key: str | None) -> float:
    """A response's score for pairing: ``reward_extra_info[score_key]`` or, when
    ``score_key`` is None, its reward (sum of the token-level ``rm_scores``)."""
    if score_key:
        return response_metric(fields.get("extra_fields"), score_key, "preference.score_key")
    scores = fields.get("rm_scores")
    if scores is None:
        raise RuntimeError("preference pairs: a rollout has no rm_scores; set preference.score_key "
                           "to a reward_extra_info field (e.g. acc)")
    return float(torch.as_tensor(scores, dtype=torch.float64).sum())


def pair_rows(rows: list[dict], keys: list[str], tags: list[dict], pairs: list[tuple[int, int]]
              ) -> tuple[list[str], list[dict], list[dict]]:
    """Rows of the pair batch, ``[c_0, r_0, c_1, r_1, ...]``: copies of the chosen / rejected
    responses (a response may sit in several pairs) with ``pair_id`` / ``is_chosen`` added and
    the stage fields (log-probs, advantages, ...) removed.

    Args:
        rows / keys / tags: the fresh batch's per-row field dicts, TransferQueue keys, tags.
        pairs: ``(chosen_index, rejected_index)`` into ``rows``.

    Returns:
        New keys (``<uid>_pair<j>chosen_0`` / ``<uid>_pair<j>rejected_0``), their field dicts and tags.
    """
    out_keys, out_rows, out_tags = [], [], []
    for j, (c, r) in enumerate(pairs):
        for role, idx in (("chosen", c), ("rejected", r)):
            row = clone_row(rows[idx], drop=STAGE_FIELDS)
            row[PAIR_ID] = torch.tensor(j, dtype=torch.int64)
            row[IS_CHOSEN] = torch.tensor(role == "chosen")
            # verl's key layout {uid}_{session}_{index}: one session per pair row
            out_keys.append(f"{uid_of(keys[idx])}_pair{j}{role}_0")
            out_rows.append(row)
            out_tags.append(dict(tags[idx]))
    return out_keys, out_rows, out_tags


@register_stage
class PreferenceStage(Stage):
    """Iterative DPO / LoRR (module docstring): pairs, the plan of each step, the pair
    fields, the ``L`` update passes with lambda_k, resets, reference refreshes, state.
    Hooks: setup, plan, sample, balance, before_old_log_prob, before_ref_log_prob,
    update_actor, state, save / load.

    Args:
        cfg: :class:`recipe.config.PreferenceConfig`.
        config: the run config (reads ``lorr`` and ``actor_rollout_ref``).

    Raises:
        ValueError: on an invalid ``lorr`` node (naming the key).
    """

    name = "preference"
    config_cls = PreferenceConfig
    order = 30
    worker_class = "recipe.stages.workers:RecipeActorRolloutRefWorker"

    def __init__(self, cfg: PreferenceConfig, config):
        super().__init__(cfg, config)
        self.pref = cfg
        self.it = cfg.iteration
        self.lorr = LorrConfig.from_config(config.get("lorr"))
        self.pair_rng = np.random.default_rng(self.pref.seed)  # "random" pairs
        self.rng = np.random.default_rng(self.pref.seed + 1)  # reuse draws
        self.shuffle_rng = np.random.default_rng(self.pref.seed + 2)  # mini-batch order per epoch
        self.initial: dict[str, list] | None = None  # all of iteration 1's pairs (LoRR reuse)
        self.pending: dict[str, list] | None = None  # pairs of the current iteration's earlier steps
        self.iteration = 1        # the current (1-based) iteration
        self.position = 0         # steps of the current iteration done so far
        self.iteration_reuse = False  # the current iteration trains on the initial pairs
        self.replays = 0          # epochs trained so far over the run (lorr/replay_index)
        self.iterations = 0       # iterations trained so far
        self.optimizer_steps = 0  # optimizer steps so far
        self.resets = 0
        self.reference_refreshes = 0
        self.theta0: dict[str, Any] = {}
        self.micro_pairs = 1  # pairs per micro-batch of the current step (pad_multiple)
        self.dp_size = 1
        self._done_warned = False
        # the current step: its iteration, and whether it trains
        self.step_iteration, self.step_trains = 1, True

    # ------------------------------------------------------------------ set-up
    @property
    def passes(self) -> int:
        """Epochs over an iteration's pairs: ``lorr.replays`` with LoRR on, else 1."""
        return self.lorr.replays if self.lorr.enable else 1

    @property
    def reset_on(self) -> bool:
        return self.lorr.enable and self.lorr.reset.enable

    @property
    def reuse_on(self) -> bool:
        return self.lorr.enable and self.lorr.reuse.enable

    def setup(self, h: Handles) -> None:
        """Before a checkpoint is loaded: switch the actor to the preference loss and, with
        resets, snapshot theta_0 (the weights of ``actor_rollout_ref.model.path``)."""
        self.setup_workers(h.worker_group)

    def setup_workers(self, worker_group) -> dict:
        """Preference loss on every rank; theta_0 snapshot when resets are on. Returns it."""
        worker_group.recipe_set_preference_loss(_plain(self.config.preference))
        if self.reset_on:
            snaps = worker_group.recipe_lorr_snapshot(self.lorr.reset.pattern)
            self.theta0 = snaps[0]
            print(f"[recipe] LoRR theta_0: {snaps[0]['tensors']} tensors matching "
                  f"{self.lorr.reset.pattern!r} per rank (fingerprint {snaps[0]['fingerprint']})", flush=True)
        return self.theta0

    # ------------------------------------------------------------------ step
    def plan(self, h: Handles, n_fresh: int) -> tuple[int, dict]:
        """Fresh prompts of this step: 0 when the iteration reuses the initial pairs, else
        ``n_fresh``. The reuse draw is made at an iteration's first step."""
        if self.done:
            if not self._done_warned:
                logger.warning("preference.iteration.max_iterations=%d reached: the remaining steps generate and "
                               "train nothing", self.it.max_iterations)
                self._done_warned = True
            return 0, {}
        if self.position == 0:
            self.iteration_reuse = bool(self.reuse_on and reuse_initial(
                self.rng, self.lorr.reuse.rollout_ratio, self.resets, self.initial is not None))
        collect, _ = step_role(self.position, self.it.rollout_steps, self.iteration_reuse)
        return (n_fresh if collect else 0), {}

    @property
    def done(self) -> bool:
        """``preference.iteration.max_iterations`` iterations are complete."""
        return self.it.max_iterations is not None and self.iteration > self.it.max_iterations

    def _advance(self, metrics: dict) -> bool:
        """This step's place in the schedule: metrics, then move to the next step. Returns
        whether this step trains (the iteration's last step)."""
        _, train = step_role(self.position, self.it.rollout_steps, self.iteration_reuse)
        self.step_iteration, self.step_trains = self.iteration, train
        # counters as they stand (a training step overwrites them after its epochs)
        metrics.update({"lorr/iteration": self.iteration, "lorr/reused_initial": int(self.iteration_reuse),
                        "lorr/epoch": 0, "lorr/optimizer_steps": 0, "lorr/resets": self.resets,
                        "lorr/replay_index": self.replays, "dpo/reference_refreshes": self.reference_refreshes})
        if train:
            self.iteration, self.position = self.iteration + 1, 0
        else:
            self.position += 1
        return train

    def sample(self, ctx: SampleContext, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        """The step's groups become preference pairs: kept for the iteration's training step,
        or (on that step) put into TransferQueue with the iteration's earlier pairs; on a
        reuse iteration the initial pairs come back."""
        if self.done:  # after the last iteration: an empty batch, the step is skipped
            metrics.update({"lorr/iteration": self.iteration - 1, "lorr/epoch": 0, "lorr/optimizer_steps": 0,
                            "dpo/fresh_rollouts": 0, "dpo/pairs": 0})
            mark_skipped(batch.tags)
            return batch
        reuse = self.iteration_reuse and self.initial is not None
        train = self._advance(metrics)
        if reuse:
            return self._reuse_initial(ctx.partition_id, metrics)
        if is_skipped(batch):
            metrics.update({"dpo/pairs": 0, "dpo/skipped_groups": 0,
                            "dpo/fresh_rollouts": sum(not is_padding(t) for t in batch.tags)})
            return self._train_pending(ctx, batch, metrics) if train else batch

        partition_id = ctx.partition_id
        data = tq.kv_batch_get(keys=batch.keys, partition_id=partition_id)
        rows = sample_dicts(data)
        real = real_indices(batch.tags)
        uids = [uid_of(batch.keys[i]) for i in real]
        scores = [row_score(rows[i], self.pref.score_key) for i in real]
        rng = self.pair_rng if self.pref.pairs == "random" else None
        pairs, stats = build_pairs(uids, scores, self.pref.pairs, rng=rng)
        pairs = [(real[c], real[r]) for c, r in pairs]
        metrics.update({"dpo/pairs": len(pairs), "dpo/skipped_groups": stats.skipped_no_gap,
                        "dpo/fresh_rollouts": len(real), "dpo/fresh_score_mean": float(np.mean(scores))})
        keys, prows, ptags = pair_rows(rows, list(batch.keys), list(batch.tags), pairs)
        self.pending = _concat(self.pending, {"keys": keys, "rows": prows, "tags": ptags})
        if not train:  # collection only: the pairs wait for the iteration's last step
            metrics["dpo/iteration_pairs"] = len(self.pending["keys"]) // 2
            mark_skipped(batch.tags)
            for tag in batch.tags:
                tag[COLLECTING] = True  # a planned skip: the trainer does not warn
            return batch
        return self._train_pending(ctx, batch, metrics)

    def _train_pending(self, ctx: SampleContext, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        """All of the iteration's pairs (``pair_id`` renumbered 0..P-1) into TransferQueue in
        place of the step's rollouts ``batch`` (they leave TransferQueue and the sampler);
        iteration 1's become the initial pairs. Without any pair the step is skipped."""
        pending, self.pending = self.pending, None
        n = len(pending["keys"]) // 2 if pending else 0
        metrics["dpo/iteration_pairs"] = n
        if not n:
            logger.warning("step %d: iteration %d has no preference pair (no group with a reward gap); no update",
                           ctx.step, self.step_iteration)
            mark_skipped(batch.tags)
            return batch
        if batch.keys:  # the source rows go; verl clears the pair rows at the end of the step
            tq.kv_clear(keys=list(batch.keys), partition_id=ctx.partition_id)
            ctx.forget(batch.keys)
        for i, row in enumerate(pending["rows"]):
            row[PAIR_ID] = torch.tensor(i // 2, dtype=torch.int64)
        if self.initial is None and self.reuse_on and self.step_iteration == 1:
            self.initial = {"keys": list(pending["keys"]), "rows": [clone_row(r) for r in pending["rows"]],
                            "tags": [dict(t) for t in pending["tags"]]}
        tq.kv_batch_put(keys=pending["keys"], partition_id=ctx.partition_id,
                        fields=list_of_dict_to_tensordict(pending["rows"]), tags=pending["tags"])
        return KVBatchMeta(partition_id=ctx.partition_id, keys=pending["keys"], tags=pending["tags"])

    def _reuse_initial(self, partition_id: str, metrics: dict) -> KVBatchMeta:
        """The stored initial pairs, written back into TransferQueue and tagged ``lorr_reused``."""
        init = self.initial
        tags = [dict(t, **{REUSED: True}) for t in init["tags"]]
        rows = [clone_row(r) for r in init["rows"]]
        tq.kv_batch_put(keys=list(init["keys"]), partition_id=partition_id,
                        fields=list_of_dict_to_tensordict(rows), tags=tags)
        metrics.update({"dpo/pairs": len(rows) // 2, "dpo/iteration_pairs": len(rows) // 2, "dpo/skipped_groups": 0,
                        "dpo/fresh_rollouts": 0})
        return KVBatchMeta(partition_id=partition_id, keys=list(init["keys"]), tags=tags)

    def balance(self, h: Handles, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        """Pairs keep their ``[c_0, r_0, ...]`` layout: padded (zero-weight rows) to a multiple
        of 2 x micro-batch x dp size instead of verl's length balancing."""
        from verl.trainer.ppo.padding_utils import upsample_batch_to_divisible_size

        wg = h.worker_group
        if "actor" not in wg._dispatch_info:
            wg._dispatch_info["actor"] = wg._query_dispatch_info("actor")
        dp_size = max(wg._dispatch_info["actor"]) + 1
        n_pairs = len(real_indices(batch.tags)) // 2
        batch = upsample_batch_to_divisible_size(batch, self.pad_multiple(dp_size, n_pairs), h.tokenizer.eos_token_id)
        self.write_pair_fields(batch)
        return batch

    def _pair_micro_batches(self, batch: KVBatchMeta) -> None:
        """Log-prob passes over pairs: micro-batches of whole pairs that divide each rank's
        rows (verl's infer path needs rows % micro == 0, which the configured log-prob micro
        size need not satisfy). Set per pass: verl's stages hand on the ``KVBatchMeta`` that
        ``kv_batch_put`` returns, without ``extra_info``."""
        batch.extra_info["micro_batch_size_per_gpu"] = 2 * self.micro_pairs

    def before_old_log_prob(self, h: Handles, batch: KVBatchMeta, metrics: dict) -> None:
        self._pair_micro_batches(batch)

    def before_ref_log_prob(self, h: Handles, batch: KVBatchMeta, metrics: dict) -> None:
        """Micro-batches of whole pairs; the reference := policy at the iteration's start."""
        self._pair_micro_batches(batch)
        if self.refresh_reference(h.worker_group):
            metrics["dpo/reference_refreshed"] = 1
        metrics["dpo/reference_refreshes"] = self.reference_refreshes

    def refresh_reference(self, worker_group) -> bool:
        """With ``reference: iteration_start``: reference := policy, on the training step of
        each iteration (the only step that computes reference log-probs; the policy has not
        moved since the iteration started). Returns whether it was refreshed."""
        if self.pref.reference != "iteration_start" or not self.pref.needs_reference or not self.step_trains:
            return False
        worker_group.recipe_sync_reference()
        self.reference_refreshes += 1
        return True

    def pad_multiple(self, dp_size: int, n_pairs: int) -> int:
        """Rows per update are padded to a multiple of 2 x (pairs per micro-batch) x dp size.

        Pairs per micro-batch: half of ``ppo_micro_batch_size_per_gpu`` (a micro-batch holds
        about as many rows as configured), at most the pairs one rank gets, so that a small
        step is not padded up to a large micro-batch, and at most one rank's share of
        ``preference.iteration.mini_batch_pairs`` (a mini-batch is whole micro-batches on
        every rank). Stored for :meth:`update`.
        """
        actor = self.config.actor_rollout_ref.actor
        micro_rows = 2 if actor.get("use_dynamic_bsz", False) else int(actor.ppo_micro_batch_size_per_gpu or 2)
        per_rank = max(1, math.ceil(n_pairs / dp_size))
        if self.it.mini_batch_pairs is not None:
            per_rank = min(per_rank, max(1, self.it.mini_batch_pairs // dp_size))
        self.micro_pairs = max(1, min(micro_rows // 2, per_rank))
        self.dp_size = dp_size
        return 2 * self.micro_pairs * dp_size

    def write_pair_fields(self, batch: KVBatchMeta) -> int:
        """After verl's padding: ``pair_id = -1`` on padding rows, ``num_pairs`` on all rows.
        Returns the number of real pairs."""
        pad = [k for k, t in zip(batch.keys, batch.tags) if is_padding(t)]
        n_pairs = (len(batch) - len(pad)) // 2
        if pad:
            tq.kv_batch_put(keys=pad, partition_id=batch.partition_id, fields=TensorDict(
                {PAIR_ID: torch.full((len(pad),), -1, dtype=torch.int64),
                 IS_CHOSEN: torch.zeros(len(pad), dtype=torch.bool)}, batch_size=len(pad)))
        put_all(batch, {"num_pairs": torch.full((len(batch),), float(n_pairs))})
        return n_pairs

    def update_actor(self, h: Handles, batch: KVBatchMeta, metrics: dict) -> bool:
        """Replaces verl's actor update: :meth:`update`."""
        self.update(h.worker_group, batch, metrics)
        return True

    def mini_batch_keys(self, batch: KVBatchMeta, order: list[int], sizes: list[int]) -> list[tuple[list[str], list[dict], int]]:
        """``(keys, tags, real pairs)`` of each mini-batch of one epoch: the pairs in ``order``
        (indices of the real pairs, in row order ``[c_0, r_0, ...]``) cut into ``sizes``; the
        padding rows join the last mini-batch (so every mini-batch's rows divide into whole
        micro-batches on every rank)."""
        real = real_indices(batch.tags)
        pad = [i for i, t in enumerate(batch.tags) if is_padding(t)]
        out, start = [], 0
        for j, size in enumerate(sizes):
            rows = [r for p in order[start:start + size] for r in (real[2 * p], real[2 * p + 1])]
            if j == len(sizes) - 1:
                rows += pad
            out.append(([batch.keys[i] for i in rows], [batch.tags[i] for i in rows], size))
            start += size
        return out

    def update(self, wg, batch: KVBatchMeta, metrics: dict) -> None:
        """The iteration's training phase: ``L`` epochs over its pairs in mini-batches, one
        ``update_actor`` call (one optimizer step, one LR-scheduler step) each, lambda_k per
        epoch, resets when due (module docstring)."""
        from verl.utils.metric import reduce_metrics

        actor = self.config.actor_rollout_ref.actor
        n_pairs = len(real_indices(batch.tags)) // 2
        sizes = mini_batches(n_pairs, self.it.mini_batch_pairs, self.micro_pairs * self.dp_size)
        eff = self.lorr.effective()
        lambdas = epoch_lambdas(self.passes, eff.sft.growth, eff.sft.cap, eff.sft.enable)
        r = self.lorr.reset
        resets_after = reset_epochs(self.passes, self.step_iteration, self.replays, r.every, r.unit, self.reset_on)
        epochs: list[dict] = []
        steps = 0
        for k, lam in enumerate(lambdas):
            put_all(batch, {"sft_weight": torch.full((len(batch),), float(lam))})
            order = list(range(n_pairs))
            if self.it.shuffle and len(sizes) > 1:
                order = [int(i) for i in self.shuffle_rng.permutation(n_pairs)]
            per_mb: list[tuple[dict, int]] = []
            for keys, tags, size in self.mini_batch_keys(batch, order, sizes):
                mb = KVBatchMeta(partition_id=batch.partition_id, keys=keys, tags=tags, fields=list(batch.fields or []))
                put_all(mb, {"num_pairs": torch.full((len(keys),), float(size))})
                mb.extra_info.update({
                    "calculate_entropy": False,
                    "global_batch_size": len(mb),
                    "mini_batch_size": len(mb),
                    "epochs": 1,
                    "seed": actor.data_loader_seed,
                    "dataloader_kwargs": {"shuffle": False},
                    "force_group_size": 2,
                    # with force_group_size 2 verl's micro-batch holds 2 x this many rows
                    "micro_batch_size_per_gpu": self.micro_pairs,
                    "temperature": self.config.actor_rollout_ref.rollout.temperature,
                })
                output = wg.update_actor(mb)
                out = dict(output["metrics"])
                out.pop("mfu", None)
                per_mb.append((reduce_metrics({key if key.startswith(("dpo/", "lorr/", "actor/")) else f"actor/{key}": v
                                               for key, v in out.items()}), size))
                steps += 1
                self.optimizer_steps += 1
            epochs.append(_weighted_mean(per_mb))
            self.replays += 1
            if k in resets_after:
                metrics.update(self.reset(wg))
        self.iterations += 1
        for key in dict.fromkeys(k for e in epochs for k in e):  # every epoch's keys, first-seen order
            vals = [e[key] for e in epochs if key in e]
            if vals:
                metrics[key] = float(np.mean(vals))
        # the last epoch's pair statistics (how far the epochs moved the margin)
        for key in ("dpo/reward_margin", "dpo/reward_accuracy"):
            if key in epochs[-1]:
                metrics[f"{key}_last_pass"] = float(epochs[-1][key])
        metrics.update({"lorr/replay_index": self.replays, "lorr/epoch": len(epochs), "lorr/resets": self.resets,
                        "lorr/optimizer_steps": steps, "lorr/sft_weight": float(np.mean(lambdas))})

    def reset(self, worker_group) -> dict:
        """Apply the LoRR reset on every rank; returns ``lorr/reset_delta_norm``."""
        r = self.lorr.reset
        out = worker_group.recipe_lorr_reset(r.alpha, r.pattern, r.reset_optimizer)
        self.resets += 1
        delta = float(sum(o["delta_norm"] ** 2 for o in out) ** 0.5)
        print(f"[recipe] LoRR reset #{self.resets} after {self.replays} epochs (iteration {self.step_iteration}): "
              f"alpha={r.alpha}, {len(out[0]['changed'])} tensors per rank, ||delta||={delta:.4g}", flush=True)
        return {"lorr/reset_delta_norm": delta}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Counters, the schedule position, the RNGs, the initial and pending pairs."""
        return {"replays": self.replays, "iterations": self.iterations, "resets": self.resets,
                "iteration": self.iteration, "position": self.position, "iteration_reuse": self.iteration_reuse,
                "optimizer_steps": self.optimizer_steps, "reference_refreshes": self.reference_refreshes,
                "rng": self.rng.bit_generator.state, "pair_rng": self.pair_rng.bit_generator.state,
                "shuffle_rng": self.shuffle_rng.bit_generator.state,
                "initial": self.initial, "pending": self.pending}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; also reads the layout written before the stage
        protocol (``{"stage": counters + rng, "sampler": pair rng + initial pairs}``) and
        before real iterations (one step per iteration: ``iteration`` = steps trained + 1)."""
        if not state:
            return
        if "stage" in state or "sampler" in state:  # checkpoints of the pre-stage layout
            stage, sampler = state.get("stage") or {}, state.get("sampler") or {}
            state = {**stage, "pair_rng": sampler.get("rng"), "initial": sampler.get("initial")}
        self.replays, self.iterations, self.resets = int(state["replays"]), int(state["iterations"]), \
            int(state["resets"])
        self.iteration = int(state.get("iteration", self.iterations + 1))
        self.position = int(state.get("position", 0))
        self.iteration_reuse = bool(state.get("iteration_reuse", False))
        self.optimizer_steps = int(state.get("optimizer_steps", 0))
        self.reference_refreshes = int(state.get("reference_refreshes", 0))
        self.rng.bit_generator.state = state["rng"]
        if state.get("pair_rng") is not None:
            self.pair_rng.bit_generator.state = state["pair_rng"]
        if state.get("shuffle_rng") is not None:
            self.shuffle_rng.bit_generator.state = state["shuffle_rng"]
        self.initial = state.get("initial")
        self.pending = state.get("pending")

    def save(self, h: Handles, folder: str) -> None:
        """theta_0 of every rank beside the checkpoint (``lorr_theta0_rank{r}.pt``)."""
        if self.reset_on:
            h.worker_group.recipe_lorr_save(folder)

    def load(self, h: Handles, folder: str) -> None:
        """theta_0 of every rank from the checkpoint; prints what was restored."""
        fp = h.worker_group.recipe_lorr_load(folder) if self.reset_on else None
        pending = len(self.pending["keys"]) // 2 if self.pending else 0
        print(f"[recipe] restored preference state: {self.replays} replay passes, {self.resets} resets, "
              f"initial pairs {'kept' if self.initial else 'none'}, theta_0 fingerprint {fp and fp[0]}; "
              f"iteration {self.iteration} step {self.position + 1}, {pending} pending pairs", flush=True)


def _concat(a: dict[str, list] | None, b: dict[str, list]) -> dict[str, list]:
    """Pair rows of ``a`` then ``b`` (``{"keys", "rows", "tags"}``)."""
    if not a:
        return {k: list(v) for k, v in b.items()}
    return {k: list(a[k]) + list(b[k]) for k in ("keys", "rows", "tags")}


def _weighted_mean(per_mb: list[tuple[dict, int]]) -> dict[str, float]:
    """Per-key mean over one epoch's mini-batches, weighted by their pairs (numeric values only)."""
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for m, _ in per_mb for k in m):
        vals = [(float(m[key]), w) for m, w in per_mb
                if isinstance(m.get(key), (int, float, np.integer, np.floating)) and not isinstance(m[key], bool)]
        total = sum(w for _, w in vals)
        if vals and total > 0:
            out[key] = sum(v * w for v, w in vals) / total
        elif vals:
            out[key] = float(np.mean([v for v, _ in vals]))
    return out


def put_all(batch: KVBatchMeta, fields: dict[str, torch.Tensor]) -> None:
    """Write per-row ``fields`` (``[B]`` tensors) for every key of ``batch`` and add them to
    ``batch.fields`` (the field list verl's workers read)."""
    meta = tq.kv_batch_put(keys=list(batch.keys), partition_id=batch.partition_id,
                           fields=TensorDict(fields, batch_size=len(batch)))
    batch.fields = meta.fields


def _plain(node) -> dict:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
