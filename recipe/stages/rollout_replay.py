"""Rollout replay inside verl's V1 sampling stage (DOTS + RR paper, arXiv 2506.05316, §4).

:class:`RolloutReplayStage` (``replay.enable``; settings :class:`recipe.config.ReplayConfig`)
keeps a replay buffer of whole groups (:class:`recipe.algos.rollout_replay.RolloutReplayBuffer`).
A training step of ``B`` groups is, through its hooks (:mod:`recipe.stages.base`):

1. ``plan``: how many fresh prompts to generate: ``round(delta * B)`` once the first
   ``warmup_steps`` steps are over (the public code's first round of mu steps is all fresh) and
   the buffer holds the other ``B - round(delta * B)`` groups, all ``B`` before that;
2. ``sample``: the fresh groups pass the group filter as before; their TransferQueue fields
   (prompt, responses, masks, rewards, rollout log-probs, ...) are snapshotted, then the
   replayed groups drawn from the buffer are written back into TransferQueue under their
   original keys and appended to the batch, tagged ``replayed``;
3. ``after_old_log_prob``: pi_old is recomputed for every sample by
   verl; for replayed samples the behaviour log-probs mu (pi_old of the step that generated
   them) give the off-policy correction:

   - ``correction: plain`` (the paper's Eq.): PPO-clip of pi_theta / mu, i.e. verl's loss
     with ``old_log_probs`` := mu on replayed rows (capped so that pi_old / anchor <= c with
     ``truncation: c``);
   - ``correction: decoupled`` (the public code): w * PPO-clip(pi_theta / pi_old) with the
     behaviour weight w = pi_old / mu: verl's own ``algorithm.rollout_correction``
     (token-level IS, ``rollout_is_threshold`` = c) applied with ``rollout_log_probs`` := mu
     on replayed rows; with ``correction_rows: replayed`` (default, as the public code) fresh
     rows get ``rollout_log_probs`` := pi_old, so verl's weight exp(pi_old - pi_old) is exactly
     1 on them; with ``correction_rows: all`` they keep the rollout engine's log-probs (verl's
     rollout-engine mismatch correction pi_old / pi_rollout on every row);
   - ``correction: none``: no correction (replayed groups treated as on-policy);
4. ``after_advantage``: with ``replay.reuse_advantages`` the stored advantages of replayed groups
   replace the recomputed ones (identical for group-relative estimators such as GRPO);
5. ``after_update_actor``: the step's fresh groups go into the buffer
   with their old log-probs (their behaviour policy: sync training is on-policy) and
   advantages; only groups with 0 < mean accuracy < 1 (``store_only_mixed``), deduplicated
   by prompt, FIFO capacity C groups (``capacity``, or ``capacity_ratio`` x the fresh groups
   per step, B being ``data.train_batch_size``).

The buffer is saved with verl's checkpoints (``state_dict``, in ``global_step_N/recipe_state.pt``). Metrics: ``replay/size``,
``replay/capacity``, ``replay/fresh_groups``, ``replay/replayed_groups``, ``replay/mean_age`` and
``replay/max_age`` (steps since the replayed groups were generated), the behaviour weights
w = min(pi_old / mu, c) over replayed response tokens (:func:`~recipe.algos.rollout_replay.behaviour_weight_stats`:
``replay/is_weight_mean`` (~1 by construction, no staleness signal), ``_std``, ``_min``,
``_max``, ``_ess``, and ``replay/truncated_frac``), ``replay/stored``, ``replay/evicted``.

Works with every recipe of ``conf/recipe/`` through config alone (it only changes which
groups are in the batch and, for replayed rows, ``old_log_probs`` / ``rollout_log_probs`` /
``advantages``); a batch the group filter emptied is trained on as before (not at all),
without replay, that step.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import torch
import transfer_queue as tq
from tensordict import TensorDict
from transfer_queue import KVBatchMeta

from recipe.algos.rollout_replay import ReplayGroup, RolloutReplayBuffer, behaviour_weight_stats, plain_old_log_prob
from recipe.config import ReplayConfig
from recipe.stages.base import Handles, SampleContext, Stage, register_stage
from recipe.stages.rows import (
    REPLAYED,
    STAGE_FIELDS,
    is_padding,
    is_skipped,
    response_metric,
    sample_dicts,
    uid_of,
)
from verl.utils.tensordict_utils import list_of_dict_to_tensordict

logger = logging.getLogger(__name__)


def prompt_key(prompt_ids: torch.Tensor) -> str:
    """Dedup key of a prompt: sha1 of its token ids (``prompts`` field, int64 ``[P]``)."""
    return hashlib.sha1(prompt_ids.to(torch.int64).numpy().tobytes()).hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return str(t.dtype).encode() + t.detach().cpu().to(torch.float64).contiguous().numpy().tobytes()


def state_fingerprint(state: dict) -> str:
    """sha1 of a replay buffer ``state_dict``: group order, ids, prompts, steps, keys and
    every payload tensor's bytes (what "restored exactly" means for the e2e resume test)."""
    h = hashlib.sha1()
    for g in (state or {}).get("groups", []):
        h.update(f"{g['uid']}|{g['prompt_key']}|{g['step']}|{g['mean_reward']:.6f}".encode())
        p = g["payload"]
        h.update("|".join(p["keys"]).encode())
        for t in [*p["behaviour_log_probs"], *p["advantages"]]:
            h.update(_tensor_bytes(t))
        for row in p["fields"]:
            for name in sorted(row):
                v = row[name]
                h.update(name.encode())
                h.update(_tensor_bytes(v) if isinstance(v, torch.Tensor) else repr(v).encode())
    return h.hexdigest()


@register_stage
class RolloutReplayStage(Stage):
    """Rollout replay (module docstring). Hooks: plan, sample, after_old_log_prob,
    after_advantage, after_update_actor, state.

    Args:
        cfg: :class:`recipe.config.ReplayConfig`.
        config: the run config; ``data.train_batch_size`` (B, groups per step) sizes the
            buffer with ``replay.capacity_ratio``.

    Raises:
        ValueError: ``replay.capacity_ratio`` set and no ``data.train_batch_size`` to size it by.
    """

    name = "rollout_replay"
    node = "replay"
    config_cls = ReplayConfig
    order = 20

    def __init__(self, cfg: ReplayConfig, config=None):
        super().__init__(cfg, config)
        self.replay_cfg = cfg
        batch = config.get("data", {}).get("train_batch_size") if config is not None else None
        self.buffer = RolloutReplayBuffer(cfg, batch_groups=int(batch) if batch is not None else None)
        self._plan: tuple[int, int] | None = None
        self._fresh: list[tuple[str, list[str], list[dict], list[dict[str, Any]]]] = []
        self._replayed: dict[str, ReplayGroup] = {}  # key -> its group
        self._step_metrics: dict[str, float] = {}

    # ------------------------------------------------------------------ prepare
    def plan(self, h: Handles, n_fresh: int) -> tuple[int, dict]:
        """Decide this step's fresh / replayed split of ``n_fresh`` groups; returns the fresh count."""
        self._plan = self.buffer.plan(n_fresh, step=h.step)
        return self._plan[0], {}

    # ------------------------------------------------------------------ sample
    def sample(self, ctx: SampleContext, batch: KVBatchMeta, metrics: dict) -> KVBatchMeta:
        """Snapshot the fresh groups, then append the replayed ones (written back into
        TransferQueue under their original keys, tagged ``replayed``)."""
        global_steps, partition_id = ctx.step, ctx.partition_id
        _, n_replay = self._plan or (ctx.batch_size, 0)
        self._plan = None
        self._fresh, self._replayed = [], {}
        if is_skipped(batch):
            metrics.update(self.buffer.metrics(global_steps, 0, []))
            return batch

        # 1. snapshot the fresh groups (what verl's agent loop wrote) for the buffer
        data = tq.kv_batch_get(keys=batch.keys, partition_id=partition_id)
        by_uid: dict[str, tuple[list[str], list[dict], list[dict]]] = {}
        for key, tag, fields in zip(batch.keys, batch.tags, sample_dicts(data), strict=True):
            if is_padding(tag):
                continue
            keys, tags, rows = by_uid.setdefault(uid_of(key), ([], [], []))
            keys.append(key)
            tags.append(dict(tag))
            rows.append(fields)
        fresh_prompts = set()
        for uid, (keys, tags, rows) in by_uid.items():
            pkey = prompt_key(rows[0]["prompts"])
            fresh_prompts.add(pkey)
            self._fresh.append((uid, keys, tags, rows))

        # 2. replayed groups back into TransferQueue under their original keys
        eligible = sum(g.prompt_key not in fresh_prompts for g in self.buffer.groups)
        if eligible < n_replay:
            logger.info("replay: %d of %d planned groups eligible (the others share a prompt with a fresh group)",
                        eligible, n_replay)
        n_replay = min(n_replay, eligible)
        groups = self.buffer.sample(n_replay, exclude_prompt_keys=fresh_prompts) if n_replay else []
        keys, tags = list(batch.keys), list(batch.tags)
        for group in groups:
            p = group.payload
            rows = [dict(r) for r in p["fields"]]
            if self.replay_cfg.correction == "decoupled":
                for row, mu in zip(rows, p["behaviour_log_probs"], strict=True):
                    row["rollout_log_probs"] = mu.clone()
            rtags = [dict(t, **{REPLAYED: True}) for t in p["tags"]]
            tq.kv_batch_put(keys=list(p["keys"]), partition_id=partition_id,
                            fields=list_of_dict_to_tensordict(rows), tags=rtags)
            keys.extend(p["keys"])
            tags.extend(rtags)
            for k in p["keys"]:
                self._replayed[k] = group
        self._step_metrics = self.buffer.metrics(global_steps, len(self._fresh), groups)
        metrics.update(self._step_metrics)
        return KVBatchMeta(partition_id=partition_id, keys=keys, tags=tags)

    # ------------------------------------------------------------------ stages
    def _replayed_rows(self, batch: KVBatchMeta) -> list[tuple[str, torch.Tensor]]:
        """(key, mu) for the replayed samples of ``batch``; mu = stored behaviour log-probs [T_i]."""
        out = []
        for key in batch.keys:
            group = self._replayed.get(key)
            if group is not None:
                out.append((key, group.payload["behaviour_log_probs"][group.payload["keys"].index(key)]))
        return out

    def after_old_log_prob(self, h: Handles, batch: KVBatchMeta, metrics: dict) -> None:
        """Off-policy correction of replayed rows once verl wrote pi_old (``old_log_probs``).

        Adds the ``replay/is_weight_*`` and ``replay/truncated_frac`` statistics of
        w = min(pi_old / mu, c) over replayed response tokens
        (:func:`~recipe.algos.rollout_replay.behaviour_weight_stats`); none when nothing was
        replayed (no fake on-policy values diluting a run's means).
        """
        metrics.update(self.correct_replayed(batch))

    def _fresh_weights_one(self, batch: KVBatchMeta) -> None:
        """``correction=decoupled, correction_rows=replayed``: ``rollout_log_probs`` := pi_old on
        every row that is not replayed, so verl's token-level weight is exp(0) = 1 exactly there."""
        keys = [k for k in batch.keys if k not in self._replayed]
        if not keys:
            return
        data = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id, select_fields=["old_log_probs"])
        tq.kv_batch_put(keys=keys, partition_id=batch.partition_id,
                        fields=TensorDict({"rollout_log_probs": data["old_log_probs"]}, batch_size=len(keys)))

    def correct_replayed(self, batch: KVBatchMeta) -> dict[str, float]:
        """:meth:`after_old_log_prob`'s work; returns its metrics."""
        if self.replay_cfg.correction == "decoupled" and self.replay_cfg.correction_rows == "replayed":
            self._fresh_weights_one(batch)
        rows = self._replayed_rows(batch)
        if not rows:
            return {}
        keys = [k for k, _ in rows]
        data = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id, select_fields=["old_log_probs"])
        pad = torch.nn.utils.rnn.pad_sequence  # rows: pi_old and mu [T_i] of each replayed sample
        old = pad([data["old_log_probs"][i] for i in range(len(rows))], batch_first=True)
        mu = pad([m.to(old.dtype) for _, m in rows], batch_first=True)
        lengths = [int(m.numel()) for _, m in rows]
        mask = pad([torch.ones(n, dtype=old.dtype) for n in lengths], batch_first=True)
        stats = behaviour_weight_stats(old, mu, mask, truncation=self.replay_cfg.truncation)
        metrics = {f"replay/{k}": v for k, v in stats.items()}
        if self.replay_cfg.correction == "plain":
            anchor = plain_old_log_prob(old, mu, torch.ones(len(rows), dtype=torch.bool),
                                        truncation=self.replay_cfg.truncation)
            nested = torch.nested.as_nested_tensor([anchor[i, :n] for i, n in enumerate(lengths)],
                                                   layout=torch.jagged)
            tq.kv_batch_put(keys=keys, partition_id=batch.partition_id,
                            fields=TensorDict({"old_log_probs": nested}, batch_size=len(keys)))
        return metrics

    def after_advantage(self, h: Handles | None, batch: KVBatchMeta, metrics: dict | None = None) -> None:
        """With ``replay.reuse_advantages``: put the stored advantages of replayed rows back."""
        if not self.replay_cfg.reuse_advantages:
            return
        rows = [(k, g) for k in batch.keys if (g := self._replayed.get(k)) is not None]
        if not rows:
            return
        adv = [g.payload["advantages"][g.payload["keys"].index(k)] for k, g in rows]
        tq.kv_batch_put(keys=[k for k, _ in rows], partition_id=batch.partition_id,
                        fields=TensorDict({"advantages": torch.nested.as_nested_tensor(adv, layout=torch.jagged)},
                                          batch_size=len(rows)))

    def after_update_actor(self, h: Handles, batch: KVBatchMeta, metrics: dict) -> None:
        """Store this step's fresh groups in the buffer (``replay/stored``, ``evicted``, ``size``)."""
        metrics.update(self.store_fresh(batch, h.step))

    def store_fresh(self, batch: KVBatchMeta, global_steps: int) -> dict[str, float]:
        """Add this step's fresh groups (with pi_old as behaviour log-probs and their
        advantages) to the buffer; returns ``replay/stored`` and ``replay/evicted``."""
        if not self._fresh:
            return {}
        keys = [k for _, ks, _, _ in self._fresh for k in ks]
        data = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id,
                               select_fields=["old_log_probs", "advantages"])
        per_key = {k: (data["old_log_probs"][i].clone(), data["advantages"][i].clone()) for i, k in enumerate(keys)}
        groups = []
        for uid, ks, tags, rows in self._fresh:
            accs = [response_metric(r.get("extra_fields"), self.replay_cfg.metric, "replay.metric") for r in rows]
            payload = {
                "keys": list(ks),
                "tags": [{k: v for k, v in t.items() if k != REPLAYED} for t in tags],
                "fields": [{k: v for k, v in r.items() if k not in STAGE_FIELDS} for r in rows],
                "behaviour_log_probs": [per_key[k][0] for k in ks],
                "advantages": [per_key[k][1] for k in ks],
            }
            groups.append(ReplayGroup(prompt_key=prompt_key(rows[0]["prompts"]), uid=uid, step=global_steps,
                                      mean_reward=float(np.mean(accs)), payload=payload))
        self._fresh = []
        counts = self.buffer.add(groups, global_steps)
        return {"replay/stored": counts.get("stored", 0), "replay/evicted": counts.get("evicted", 0),
                "replay/size": len(self.buffer)}

    def is_replayed(self, key: str) -> bool:
        """Whether ``key`` is a replayed sample of the current step."""
        return key in self._replayed

    # ------------------------------------------------------------------ state
    def fingerprint(self) -> str:
        """sha1 over the buffer's groups (order, uid, prompt, step, keys, payload tensors):
        equal fingerprints mean an exactly restored buffer."""
        return state_fingerprint(self.state_dict())

    def state_dict(self) -> dict:
        """The replay buffer's state."""
        return self.buffer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; ignores an empty state (replay was off when saved)."""
        if state:
            self.buffer.load_state_dict(state)
            print(f"[recipe] restored replay buffer: {len(self.buffer)} groups "
                  f"(fingerprint {self.fingerprint()})", flush=True)
