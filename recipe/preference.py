"""Iterative (online) DPO and LoRR inside verl's V1 trainer: the sampler and the trainer glue.

One training step is one iteration of online preference optimisation:

1. **Rollouts** (verl's agent loop): ``n`` responses per prompt, verifier rewards.
2. **Pairs** (:class:`PreferencePairSampler`, verl's sampling stage): each group (one
   ``uid``) gives preference pairs by ``preference.pairs`` (:func:`recipe.algos.preference.build_pairs`;
   groups without a reward gap are skipped). The pairs' rows replace the group's rows in
   TransferQueue, laid out ``[c_0, r_0, c_1, r_1, ...]`` with the per-row fields
   ``pair_id`` / ``is_chosen``.
3. **Reference**: verl's reference worker computes ``ref_log_prob``. With
   ``preference.reference: iteration_start`` its weights are first set to the current policy
   by this project's worker method
   (:meth:`recipe.workers.RecipeActorRolloutRefWorker.recipe_sync_reference`) every
   ``preference.iteration_steps`` steps; with ``initial`` it stays the initial model.
4. **Updates** (:class:`PreferenceStage`): the pairs are trained on ``L`` times
   (``lorr.replays``; 1 for plain iterative DPO), each pass one optimizer step per
   mini-batch of all pairs (rows padded with zero-weight rows to a multiple of
   2 x pairs per micro-batch (half of ``ppo_micro_batch_size_per_gpu``, at most
   the step's pairs per rank) x data-parallel size, and verl's ``force_group_size=2`` keeps each pair in
   one micro-batch and on one rank). Pass ``k`` (0-based) adds ``lambda_k`` times the NLL of
   the chosen response (``lorr.sft``).
5. **Reset** (``lorr.reset``): after every ``every`` replay passes (or iterations) the
   matching parameters are pulled towards the initial weights,
   theta <- alpha * theta + (1 - alpha) * theta_0
   (:meth:`~recipe.workers.RecipeActorRolloutRefWorker.recipe_lorr_reset`).
6. **Reuse** (``lorr.reuse``): the first step's pairs are kept; once a reset has happened,
   each step draws fresh rollouts with probability ``rollout_ratio`` and otherwise trains on
   the initial pairs again (no generation that step).

State (replay counter, resets, the initial pairs, the RNG, theta_0 per rank) is saved with
verl's checkpoints and restored on resume (:class:`recipe.trainer.RecipeTrainer`).

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

from recipe.algos.preference import LorrConfig, PreferenceConfig, build_pairs, reset_due
from recipe.rollout_replay import STAGE_FIELDS, sample_dicts
from recipe.sampler import SKIP_UPDATE, GroupFilterReplayBuffer, response_metric
from verl.utils.tensordict_utils import list_of_dict_to_tensordict

logger = logging.getLogger(__name__)

#: Sample-tag flag of rows that are the stored initial pairs (LoRR reuse).
REUSED = "lorr_reused"
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
            row = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in rows[idx].items()
                   if k not in STAGE_FIELDS}
            row[PAIR_ID] = torch.tensor(j, dtype=torch.int64)
            row[IS_CHOSEN] = torch.tensor(role == "chosen")
            # verl's key layout {uid}_{session}_{index}: one session per pair row
            out_keys.append(f"{keys[idx].split('_')[0]}_pair{j}{role}_0")
            out_rows.append(row)
            out_tags.append(dict(tags[idx]))
    return out_keys, out_rows, out_tags


class PreferencePairSampler(GroupFilterReplayBuffer):
    """verl sampler: group filter, then preference pairs from each group (module docstring).

    Args:
        sampler_kwargs: as :class:`~recipe.sampler.GroupFilterReplayBuffer`, plus
            ``preference`` (:class:`~recipe.algos.preference.PreferenceConfig`) and ``lorr``
            (:class:`~recipe.algos.preference.LorrConfig`).

    Raises:
        ValueError: on an invalid ``preference`` / ``lorr`` node (naming the key).
    """

    enabled = False  # not a rollout-replay sampler (RecipeTrainer._replay)

    def __init__(self, *args, sampler_kwargs=None, **kwargs):
        super().__init__(*args, sampler_kwargs=sampler_kwargs, **kwargs)
        opts = dict(sampler_kwargs or {})
        self.pref_cfg = PreferenceConfig.from_config(opts.get("preference"))
        self.lorr_cfg = LorrConfig.from_config(opts.get("lorr"))
        self.rng = np.random.default_rng(self.pref_cfg.seed)
        self.initial: dict[str, list] | None = None  # the first step's pairs (LoRR reuse)
        self.reuse_next = False

    # ------------------------------------------------------------------ sample
    def sample(self, global_steps: int, partition_id: str, batch_size: int) -> tuple[KVBatchMeta, dict]:
        if partition_id == "val":
            return super().sample(global_steps, partition_id, batch_size)
        if self.reuse_next and self.initial:
            self.reuse_next = False
            return self._reuse_initial(partition_id)
        self.reuse_next = False
        batch, metrics = super().sample(global_steps, partition_id, batch_size)
        metrics["lorr/reused_initial"] = 0
        if len(batch) == 0 or all(tag.get(SKIP_UPDATE, False) for tag in batch.tags):
            metrics.update({"dpo/pairs": 0, "dpo/skipped_groups": 0,
                            "dpo/fresh_rollouts": sum(not t.get("is_padding", False) for t in batch.tags)})
            return batch, metrics

        data = tq.kv_batch_get(keys=batch.keys, partition_id=partition_id)
        rows = sample_dicts(data)
        real = [i for i, tag in enumerate(batch.tags) if not tag.get("is_padding", False)]
        uids = [batch.keys[i].split("_")[0] for i in real]
        scores = [row_score(rows[i], self.pref_cfg.score_key) for i in real]
        rng = self.rng if self.pref_cfg.pairs == "random" else None
        pairs, stats = build_pairs(uids, scores, self.pref_cfg.pairs, rng=rng)
        pairs = [(real[c], real[r]) for c, r in pairs]
        metrics.update({"dpo/pairs": len(pairs), "dpo/skipped_groups": stats.skipped_no_gap,
                        "dpo/fresh_rollouts": len(real), "dpo/fresh_score_mean": float(np.mean(scores))})
        if not pairs:
            logger.warning("step %d: no group has a reward gap; no preference pair, no update", global_steps)
            for tag in batch.tags:
                tag[SKIP_UPDATE] = True
            return batch, metrics

        keys, prows, ptags = pair_rows(rows, list(batch.keys), list(batch.tags), pairs)
        # the source rows leave TransferQueue; verl clears the pair rows at the end of the step
        tq.kv_clear(keys=list(batch.keys), partition_id=partition_id)
        for key in batch.keys:
            self.partitions[partition_id].pop(key, None)
        tq.kv_batch_put(keys=keys, partition_id=partition_id, fields=list_of_dict_to_tensordict(prows), tags=ptags)
        if self.initial is None and self.lorr_cfg.enable and self.lorr_cfg.reuse.enable:
            self.initial = {"keys": list(keys), "rows": prows, "tags": [dict(t) for t in ptags]}
        return KVBatchMeta(partition_id=partition_id, keys=keys, tags=ptags), metrics

    def _reuse_initial(self, partition_id: str) -> tuple[KVBatchMeta, dict]:
        """The stored initial pairs, written back into TransferQueue and tagged ``lorr_reused``."""
        init = self.initial
        tags = [dict(t, **{REUSED: True}) for t in init["tags"]]
        rows = [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in r.items()} for r in init["rows"]]
        tq.kv_batch_put(keys=list(init["keys"]), partition_id=partition_id,
                        fields=list_of_dict_to_tensordict(rows), tags=tags)
        metrics = {"dpo/pairs": len(rows) // 2, "dpo/skipped_groups": 0, "dpo/fresh_rollouts": 0,
                   "lorr/reused_initial": 1}
        return KVBatchMeta(partition_id=partition_id, keys=list(init["keys"]), tags=tags), metrics

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """RNG state, the initial pairs and the pending reuse decision."""
        return {"rng": self.rng.bit_generator.state, "initial": self.initial, "reuse_next": self.reuse_next}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.rng.bit_generator.state = state["rng"]
        self.initial = state.get("initial")
        self.reuse_next = bool(state.get("reuse_next", False))


class PreferenceStage:
    """Trainer side of iterative DPO / LoRR (module docstring): the plan of each step, the
    pair fields, the ``L`` update passes with lambda_k, resets, reference refreshes, state.

    Args:
        config: the full trainer config (reads ``preference``, ``lorr``,
            ``actor_rollout_ref``).

    Raises:
        ValueError: on an invalid ``preference`` / ``lorr`` node.
    """

    def __init__(self, config):
        self.config = config
        self.pref = PreferenceConfig.from_config(config.get("preference"))
        self.lorr = LorrConfig.from_config(config.get("lorr"))
        self.rng = np.random.default_rng(self.pref.seed + 1)
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

    def setup_workers(self, worker_group) -> dict:
        """Switch the actor to the preference loss and, with resets, snapshot theta_0 (the
        weights loaded from ``actor_rollout_ref.model.path``, before any checkpoint)."""
        worker_group.recipe_set_preference_loss(_plain(self.config.preference))
        if self.reset_on:
            snaps = worker_group.recipe_lorr_snapshot(self.lorr.reset.pattern)
            self.theta0 = snaps[0]
            print(f"[recipe] LoRR theta_0: {snaps[0]['tensors']} tensors matching "
                  f"{self.lorr.reset.pattern!r} per rank (fingerprint {snaps[0]['fingerprint']})", flush=True)
        return self.theta0

    # ------------------------------------------------------------------ step
    def plan_step(self, sampler: PreferencePairSampler, batch_size: int) -> int:
        """Fresh prompts of this step: 0 when LoRR reuses the initial pairs, else ``batch_size``."""
        reuse = (self.lorr.enable and self.lorr.reuse.enable and self.resets > 0 and sampler.initial is not None
                 and self.rng.random() >= self.lorr.reuse.rollout_ratio)
        sampler.reuse_next = bool(reuse)
        return 0 if reuse else batch_size

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
        pad = [k for k, t in zip(batch.keys, batch.tags) if t.get("is_padding", False)]
        n_pairs = (len(batch) - len(pad)) // 2
        if pad:
            tq.kv_batch_put(keys=pad, partition_id=batch.partition_id, fields=TensorDict(
                {PAIR_ID: torch.full((len(pad),), -1, dtype=torch.int64),
                 IS_CHOSEN: torch.zeros(len(pad), dtype=torch.bool)}, batch_size=len(pad)))
        put_all(batch, {"num_pairs": torch.full((len(batch),), float(n_pairs))})
        return n_pairs

    def update(self, trainer, batch: KVBatchMeta, metrics: dict) -> None:
        """``L`` update passes over the step's pairs (lambda_k per pass), resets when due."""
        from verl.utils.metric import reduce_metrics

        wg = trainer.actor_rollout_wg
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
        for key in passes[0]:
            vals = [p[key] for p in passes if isinstance(p.get(key), (int, float))]
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
        return {"replays": self.replays, "iterations": self.iterations, "resets": self.resets,
                "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        self.replays, self.iterations, self.resets = int(state["replays"]), int(state["iterations"]), \
            int(state["resets"])
        self.rng.bit_generator.state = state["rng"]


def put_all(batch: KVBatchMeta, fields: dict[str, torch.Tensor]) -> None:
    """Write per-row ``fields`` (``[B]`` tensors) for every key of ``batch`` and add them to
    ``batch.fields`` (the field list verl's workers read)."""
    meta = tq.kv_batch_put(keys=list(batch.keys), partition_id=batch.partition_id,
                           fields=TensorDict(fields, batch_size=len(batch)))
    batch.fields = meta.fields


def _plain(node) -> dict:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node or {})
