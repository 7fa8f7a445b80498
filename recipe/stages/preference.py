"""Iterative (online) DPO and LoRR inside verl's V1 trainer: the preference stage.

One training step is one iteration of online preference optimisation:

1. **Rollouts** (verl's agent loop): ``n`` responses per prompt, verifier rewards.
2. **Pairs** (``sample`` hook, after the group filter): each group (one
   ``uid``) gives preference pairs by ``preference.pairs`` (:func:`recipe.algos.preference.build_pairs`;
   groups without a reward gap are skipped). The pairs' rows replace the group's rows in
   TransferQueue, laid out ``[c_0, r_0, c_1, r_1, ...]`` with the per-row fields
   ``pair_id`` / ``is_chosen``.
3. **Reference**: verl's reference worker computes ``ref_log_prob``. With
   ``preference.reference: iteration_start`` its weights are first set to the current policy
   by this project's worker method
   (:meth:`recipe.stages.workers.RecipeActorRolloutRefWorker.recipe_sync_reference`) every
   ``preference.iteration_steps`` steps; with ``initial`` it stays the initial model.
4. **Updates** (``update_actor`` hook, replacing verl's): the pairs are trained on ``L`` times
   (``lorr.replays``; 1 for plain iterative DPO), each pass one optimizer step per
   mini-batch of all pairs (rows padded with zero-weight rows to a multiple of
   2 x pairs per micro-batch (half of ``ppo_micro_batch_size_per_gpu``, at most
   the step's pairs per rank) x data-parallel size, and verl's ``force_group_size=2`` keeps each pair in
   one micro-batch and on one rank). Pass ``k`` (0-based) adds ``lambda_k`` times the NLL of
   the chosen response (``lorr.sft``).
5. **Reset** (``lorr.reset``): after every ``every`` replay passes (or iterations) the
   matching parameters are pulled towards the initial weights,
   theta <- alpha * theta + (1 - alpha) * theta_0
   (:meth:`~recipe.stages.workers.RecipeActorRolloutRefWorker.recipe_lorr_reset`;
   arithmetic in :mod:`recipe.algos.lorr`).
6. **Reuse** (``lorr.reuse``): the first step's pairs are kept; once a reset has happened,
   each step draws fresh rollouts with probability ``rollout_ratio`` and otherwise trains on
   the initial pairs again (no generation that step).

State (replay counter, resets, the initial pairs, the RNG, theta_0 per rank) is saved with
verl's checkpoints and restored on resume (``state_dict`` / ``save`` / ``load`` hooks).
Settings: :class:`recipe.config.PreferenceConfig`, :class:`recipe.config.LorrConfig`; the
actor worker is :class:`recipe.stages.workers.RecipeActorRolloutRefWorker` (``worker_class``).

Metrics: ``dpo/pairs``, ``dpo/skipped_groups``, ``dpo/fresh_rollouts``, ``dpo/fresh_score_mean``, ``dpo/reward_margin``,
``dpo/reward_accuracy``, ``dpo/chosen_logps``, ``dpo/rejected_logps``, ``dpo/loss``,
``lorr/resets``, ``lorr/replay_index``, ``lorr/sft_weight``, ``lorr/sft_loss``,
``lorr/reused_initial``, ``lorr/reset_delta_norm``.
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

from recipe.algos.lorr import reset_due, reuse_initial
from recipe.algos.preference import build_pairs
from recipe.config import LorrConfig, PreferenceConfig
from recipe.stages.base import Handles, SampleContext, Stage, register_stage
from recipe.stages.rows import (
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
        self.lorr = LorrConfig.from_config(config.get("lorr"))
        self.pair_rng = np.random.default_rng(self.pref.seed)  # "random" pairs
        self.rng = np.random.default_rng(self.pref.seed + 1)  # reuse draws
        self.initial: dict[str, list] | None = None  # the first step's pairs (LoRR reuse)
        self.reuse_next = False
        self.replays = 0      # update passes so far (the reset schedule's counter in unit "replays")
        self.iterations = 0   # steps with an update so far
        self.resets = 0
        self.theta0: dict[str, Any] = {}
        self.micro_pairs = 1  # pairs per micro-batch of the current step (pad_multiple)

    # ------------------------------------------------------------------ set-up
    @property
    def passes(self) -> int:
        """Update passes per collected batch: ``lorr.replays`` with LoRR on, else 1."""
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
        """Fresh prompts of this step: 0 when LoRR reuses the initial pairs, else ``n_fresh``."""
        reuse = self.reuse_on and reuse_initial(self.rng, self.lorr.reuse.rollout_ratio, self.resets,
                                                self.initial is not None)
        self.reuse_next = bool(reuse)
        return (0 if reuse else n_fresh), {}

    def sample(self, ctx: SampleContext, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        """The step's groups become preference pairs (or the initial pairs come back)."""
        if self.reuse_next and self.initial:
            self.reuse_next = False
            return self._reuse_initial(ctx.partition_id, metrics)
        self.reuse_next = False
        metrics["lorr/reused_initial"] = 0
        if is_skipped(batch):
            metrics.update({"dpo/pairs": 0, "dpo/skipped_groups": 0,
                            "dpo/fresh_rollouts": sum(not is_padding(t) for t in batch.tags)})
            return batch

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
        if not pairs:
            logger.warning("step %d: no group has a reward gap; no preference pair, no update", ctx.step)
            mark_skipped(batch.tags)
            return batch

        keys, prows, ptags = pair_rows(rows, list(batch.keys), list(batch.tags), pairs)
        # the source rows leave TransferQueue; verl clears the pair rows at the end of the step
        tq.kv_clear(keys=list(batch.keys), partition_id=partition_id)
        ctx.forget(batch.keys)
        tq.kv_batch_put(keys=keys, partition_id=partition_id, fields=list_of_dict_to_tensordict(prows), tags=ptags)
        if self.initial is None and self.reuse_on:
            self.initial = {"keys": list(keys), "rows": prows, "tags": [dict(t) for t in ptags]}
        return KVBatchMeta(partition_id=partition_id, keys=keys, tags=ptags)

    def _reuse_initial(self, partition_id: str, metrics: dict) -> KVBatchMeta:
        """The stored initial pairs, written back into TransferQueue and tagged ``lorr_reused``."""
        init = self.initial
        tags = [dict(t, **{REUSED: True}) for t in init["tags"]]
        rows = [clone_row(r) for r in init["rows"]]
        tq.kv_batch_put(keys=list(init["keys"]), partition_id=partition_id,
                        fields=list_of_dict_to_tensordict(rows), tags=tags)
        metrics.update({"dpo/pairs": len(rows) // 2, "dpo/skipped_groups": 0, "dpo/fresh_rollouts": 0,
                        "lorr/reused_initial": 1})
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
        """Micro-batches of whole pairs; the reference := policy at an iteration's start."""
        self._pair_micro_batches(batch)
        if self.refresh_reference(h.worker_group, h.step):
            metrics["dpo/reference_refreshed"] = 1

    def refresh_reference(self, worker_group, global_steps: int) -> bool:
        """With ``reference: iteration_start``: reference := policy at the first step of each
        block of ``iteration_steps`` steps. Returns whether it was refreshed."""
        if self.pref.reference != "iteration_start" or not self.pref.needs_reference:
            return False
        if (global_steps - 1) % self.pref.iteration_steps:
            return False
        worker_group.recipe_sync_reference()
        return True

    def pad_multiple(self, dp_size: int, n_pairs: int) -> int:
        """Rows per update are padded to a multiple of 2 x (pairs per micro-batch) x dp size.

        Pairs per micro-batch: half of ``ppo_micro_batch_size_per_gpu`` (a micro-batch holds
        about as many rows as configured), at most the pairs one rank gets, so that a small
        step is not padded up to a large micro-batch. Stored for :meth:`update`.
        """
        actor = self.config.actor_rollout_ref.actor
        micro_rows = 2 if actor.get("use_dynamic_bsz", False) else int(actor.ppo_micro_batch_size_per_gpu or 2)
        per_rank = max(1, math.ceil(n_pairs / dp_size))
        self.micro_pairs = max(1, min(micro_rows // 2, per_rank))
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

    def update(self, wg, batch: KVBatchMeta, metrics: dict) -> None:
        """``L`` update passes over the step's pairs (lambda_k per pass), resets when due."""
        from verl.utils.metric import reduce_metrics

        actor = self.config.actor_rollout_ref.actor
        passes: list[dict] = []
        weights = []
        for k in range(self.passes):
            lam = self.lorr.sft_lambda(k)  # 0 unless LoRR and its SFT term are on
            weights.append(lam)
            put_all(batch, {"sft_weight": torch.full((len(batch),), float(lam))})
            batch.extra_info.update({
                "calculate_entropy": False,
                "global_batch_size": len(batch),
                "mini_batch_size": len(batch),
                "epochs": 1,
                "seed": actor.data_loader_seed,
                "dataloader_kwargs": {"shuffle": False},
                "force_group_size": 2,
                # with force_group_size 2 verl's micro-batch holds 2 x this many rows
                "micro_batch_size_per_gpu": self.micro_pairs,
                "temperature": self.config.actor_rollout_ref.rollout.temperature,
            })
            output = wg.update_actor(batch)
            out = dict(output["metrics"])
            out.pop("mfu", None)
            passes.append(reduce_metrics({key if key.startswith(("dpo/", "lorr/", "actor/")) else f"actor/{key}": v
                                          for key, v in out.items()}))
            self.replays += 1
            if self.reset_on and self.lorr.reset.unit == "replays" and reset_due(self.replays, self.lorr.reset.every):
                metrics.update(self.reset(wg))
        self.iterations += 1
        if self.reset_on and self.lorr.reset.unit == "iterations" and reset_due(self.iterations, self.lorr.reset.every):
            metrics.update(self.reset(wg))
        for key in dict.fromkeys(k for p in passes for k in p):  # every pass's keys, first-seen order
            vals = [float(p[key]) for p in passes
                    if isinstance(p.get(key), (int, float, np.integer, np.floating)) and not isinstance(p[key], bool)]
            if vals:
                metrics[key] = float(np.mean(vals))
        # the last pass's pair statistics (how far the passes moved the margin)
        for key in ("dpo/reward_margin", "dpo/reward_accuracy"):
            if key in passes[-1]:
                metrics[f"{key}_last_pass"] = float(passes[-1][key])
        metrics.update({"lorr/replay_index": self.replays, "lorr/resets": self.resets,
                        "lorr/sft_weight": float(np.mean(weights))})

    def reset(self, worker_group) -> dict:
        """Apply the LoRR reset on every rank; returns ``lorr/reset_delta_norm``."""
        r = self.lorr.reset
        out = worker_group.recipe_lorr_reset(r.alpha, r.pattern, r.reset_optimizer)
        self.resets += 1
        delta = float(sum(o["delta_norm"] ** 2 for o in out) ** 0.5)
        print(f"[recipe] LoRR reset #{self.resets} after {self.replays} replay passes: alpha={r.alpha}, "
              f"{len(out[0]['changed'])} tensors per rank, ||delta||={delta:.4g}", flush=True)
        return {"lorr/reset_delta_norm": delta}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Counters, both RNGs, the initial pairs and the pending reuse decision."""
        return {"replays": self.replays, "iterations": self.iterations, "resets": self.resets,
                "rng": self.rng.bit_generator.state, "pair_rng": self.pair_rng.bit_generator.state,
                "initial": self.initial, "reuse_next": self.reuse_next}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; also reads the layout written before the stage
        protocol (``{"stage": counters + rng, "sampler": pair rng + initial pairs}``)."""
        if not state:
            return
        if "stage" in state or "sampler" in state:  # checkpoints of the pre-stage layout
            stage, sampler = state.get("stage") or {}, state.get("sampler") or {}
            state = {**stage, "pair_rng": sampler.get("rng"), "initial": sampler.get("initial"),
                     "reuse_next": sampler.get("reuse_next", False)}
        self.replays, self.iterations, self.resets = int(state["replays"]), int(state["iterations"]), \
            int(state["resets"])
        self.rng.bit_generator.state = state["rng"]
        if state.get("pair_rng") is not None:
            self.pair_rng.bit_generator.state = state["pair_rng"]
        self.initial = state.get("initial")
        self.reuse_next = bool(state.get("reuse_next", False))

    def mid_iteration(self, step: int) -> bool:
        """Whether a checkpoint taken after ``step`` lies inside an iteration whose reference
        is the policy of its start (``reference: iteration_start``, ``iteration_steps`` > 1):
        step ``step + 1`` is then not an iteration start, so a resume must restore that
        reference instead of refreshing it."""
        return (self.pref.reference == "iteration_start" and self.pref.needs_reference
                and self.pref.iteration_steps > 1 and step % self.pref.iteration_steps != 0)

    def save(self, h: Handles, folder: str) -> None:
        """theta_0 of every rank beside the checkpoint (``lorr_theta0_rank{r}.pt``) and, inside
        an iteration, the reference model (``reference_rank{r}.pt``)."""
        if self.reset_on:
            h.worker_group.recipe_lorr_save(folder)
        if self.mid_iteration(h.step):
            h.worker_group.recipe_reference_save(folder)

    def load(self, h: Handles, folder: str) -> None:
        """theta_0 and, inside an iteration, the reference model of every rank from the
        checkpoint; prints what was restored.

        A checkpoint inside an iteration without the reference files (written before they
        were saved) resumes with a warning: the reference is then the initial model until
        the next iteration starts.
        """
        fp = h.worker_group.recipe_lorr_load(folder) if self.reset_on else None
        print(f"[recipe] restored preference state: {self.replays} replay passes, {self.resets} resets, "
              f"initial pairs {'kept' if self.initial else 'none'}, theta_0 fingerprint {fp and fp[0]}", flush=True)
        if self.mid_iteration(h.step):
            ref = h.worker_group.recipe_reference_load(folder)
            if ref is None or ref[0] is None:
                logger.warning("%s: resuming inside an iteration (step %d, preference.iteration_steps=%d) but the "
                               "checkpoint has no reference_rank*.pt: the reference is the initial model until the "
                               "next iteration starts", folder, h.step, self.pref.iteration_steps)
                return
            print(f"[recipe] restored reference model of the iteration's start (fingerprint {ref[0]})", flush=True)


def put_all(batch: KVBatchMeta, fields: dict[str, torch.Tensor]) -> None:
    """Write per-row ``fields`` (``[B]`` tensors) for every key of ``batch`` and add them to
    ``batch.fields`` (the field list verl's workers read)."""
    meta = tq.kv_batch_put(keys=list(batch.keys), partition_id=batch.partition_id,
                           fields=TensorDict(fields, batch_size=len(batch)))
    batch.fields = meta.fields


def _plain(node) -> dict:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
