"""Rollout replay inside verl's V1 sampling stage (DOTS + RR paper, arXiv 2506.05316, §4).

:class:`RolloutReplaySampler` is this project's group-filter sampler
(:class:`recipe.sampler.GroupFilterReplayBuffer`) plus a replay buffer of whole groups
(:class:`recipe.algos.replay.RolloutReplayBuffer`). With ``replay.enable=true`` a training
step of ``B`` groups is

1. ``prepare``: the trainer asks :meth:`RolloutReplaySampler.plan_step` how many fresh
   prompts to generate: ``round(delta * B)`` once the buffer holds the other
   ``B - round(delta * B)`` groups, all ``B`` before that (the paper's first round is all
   fresh);
2. ``sample``: the fresh groups pass the group filter as before; their TransferQueue fields
   (prompt, responses, masks, rewards, rollout log-probs, ...) are snapshotted, then the
   replayed groups drawn from the buffer are written back into TransferQueue under their
   original keys and appended to the batch, tagged ``replayed``;
3. ``old_log_prob`` (:meth:`after_old_log_prob`): pi_old is recomputed for every sample by
   verl; for replayed samples the behaviour log-probs mu (pi_old of the step that generated
   them) give the off-policy correction:

   - ``correction: plain`` (the paper's Eq.): PPO-clip of pi_theta / mu, i.e. verl's loss
     with ``old_log_probs`` := mu on replayed rows (capped so that pi_old / anchor <= c with
     ``truncation: c``);
   - ``correction: decoupled`` (the public code): w * PPO-clip(pi_theta / pi_old) with the
     behaviour weight w = pi_old / mu: verl's own ``algorithm.rollout_correction``
     (token-level IS, ``rollout_is_threshold`` = c) applied with ``rollout_log_probs`` := mu
     on replayed rows (fresh rows keep the rollout engine's log-probs, w ~ 1);
   - ``correction: none``: no correction (replayed groups treated as on-policy);
4. ``adv``: with ``replay.reuse_advantages`` the stored advantages of replayed groups
   replace the recomputed ones (identical for group-relative estimators such as GRPO);
5. after the actor update (:meth:`store_fresh`): the step's fresh groups go into the buffer
   with their old log-probs (their behaviour policy: sync training is on-policy) and
   advantages; only groups with 0 < mean accuracy < 1 (``store_only_mixed``), deduplicated
   by prompt, FIFO capacity ``capacity`` groups.

The buffer is saved with verl's checkpoints by :class:`recipe.trainer.RecipeTrainer`
(``recipe_state.pt`` in ``global_step_N/``). Metrics: ``replay/size``,
``replay/fresh_groups``, ``replay/replayed_groups``, ``replay/mean_age`` (steps since the
replayed groups were generated), ``replay/is_weight_mean`` (mean behaviour weight
pi_old / mu over replayed response tokens, after truncation), ``replay/stored``,
``replay/evicted``.

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
from tensordict import NonTensorData, NonTensorStack, TensorDict
from transfer_queue import KVBatchMeta

from recipe.algos.replay import (
    ReplayConfig,
    ReplayGroup,
    RolloutReplayBuffer,
    behaviour_weights,
    plain_old_log_prob,
)
from recipe.sampler import SKIP_UPDATE, GroupFilterReplayBuffer, response_metric
from verl.utils.tensordict_utils import list_of_dict_to_tensordict

logger = logging.getLogger(__name__)

#: Sample-tag flag of replayed samples (tags survive verl's re-batching in ``step()``).
REPLAYED = "replayed"
#: Fields the trainer's stages write after sampling; they are recomputed for replayed rows.
STAGE_FIELDS = frozenset(
    {"old_log_probs", "entropy", "ref_log_prob", "values", "advantages", "returns", "token_level_rewards",
     "rollout_is_weights"}
)


def sample_dicts(data) -> list[dict[str, Any]]:
    """Split a TransferQueue ``TensorDict`` (B samples, jagged or dense fields) into B dicts
    of per-sample values (1-D tensors, python objects), the layout verl's agent loop puts."""
    out: list[dict[str, Any]] = [{} for _ in range(len(data))]
    for name, value in data.items():
        for i in range(len(out)):
            if isinstance(value, torch.Tensor):
                out[i][name] = value[i].clone()
            elif isinstance(value, NonTensorStack):
                out[i][name] = value[i].data
            elif isinstance(value, NonTensorData):
                out[i][name] = value.data
            else:
                out[i][name] = value[i]
    return out


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


class RolloutReplaySampler(GroupFilterReplayBuffer):
    """verl sampler = group filter + rollout replay (module docstring).

    Args:
        sampler_kwargs: as :class:`~recipe.sampler.GroupFilterReplayBuffer`, plus ``replay``
            (see :class:`~recipe.algos.replay.ReplayConfig`).

    Raises:
        ValueError: on an invalid ``replay`` node (naming ``replay.<key>``).
    """

    def __init__(self, *args, sampler_kwargs=None, **kwargs):
        super().__init__(*args, sampler_kwargs=sampler_kwargs, **kwargs)
        self.replay_cfg = ReplayConfig.from_config((dict(sampler_kwargs or {})).get("replay"))
        self.buffer = RolloutReplayBuffer(self.replay_cfg) if self.replay_cfg.enable else None
        self._plan: tuple[int, int] | None = None
        self._fresh: list[tuple[str, list[str], list[dict], list[dict[str, Any]]]] = []
        self._replayed: dict[str, ReplayGroup] = {}  # key -> its group
        self._step_metrics: dict[str, float] = {}

    @property
    def enabled(self) -> bool:
        return self.buffer is not None

    # ------------------------------------------------------------------ prepare
    def plan_step(self, batch_size: int) -> int:
        """Decide this step's fresh/replayed split; returns the number of fresh prompts."""
        if not self.enabled:
            return batch_size
        self._plan = self.buffer.plan(batch_size)
        return self._plan[0]

    # ------------------------------------------------------------------ sample
    def sample(self, global_steps: int, partition_id: str, batch_size: int) -> tuple[KVBatchMeta, dict]:
        if partition_id == "val" or not self.enabled:
            return super().sample(global_steps, partition_id, batch_size)
        n_fresh, n_replay = self._plan or (batch_size, 0)
        self._plan = None
        batch, metrics = super().sample(global_steps, partition_id, n_fresh)
        self._fresh, self._replayed = [], {}
        if len(batch) == 0 or all(tag.get(SKIP_UPDATE, False) for tag in batch.tags):
            metrics.update(self.buffer.metrics(global_steps, 0, []))
            return batch, metrics

        # 1. snapshot the fresh groups (what verl's agent loop wrote) for the buffer
        data = tq.kv_batch_get(keys=batch.keys, partition_id=partition_id)
        by_uid: dict[str, tuple[list[str], list[dict], list[dict]]] = {}
        for key, tag, fields in zip(batch.keys, batch.tags, sample_dicts(data), strict=True):
            if tag.get("is_padding", False):
                continue
            keys, tags, rows = by_uid.setdefault(key.split("_")[0], ([], [], []))
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
        return KVBatchMeta(partition_id=partition_id, keys=keys, tags=tags), metrics

    # ------------------------------------------------------------------ stages
    def _replayed_rows(self, batch: KVBatchMeta) -> list[tuple[str, torch.Tensor]]:
        """(key, mu) for the replayed samples of ``batch``; mu = stored behaviour log-probs [T_i]."""
        out = []
        for key in batch.keys:
            group = self._replayed.get(key)
            if group is not None:
                out.append((key, group.payload["behaviour_log_probs"][group.payload["keys"].index(key)]))
        return out

    def after_old_log_prob(self, batch: KVBatchMeta) -> dict[str, float]:
        """Off-policy correction of replayed rows once verl wrote pi_old (``old_log_probs``).

        Returns:
            ``{"replay/is_weight_mean": mean of w = pi_old / mu over replayed response tokens}``
            (after truncation; 1.0 when nothing was replayed).
        """
        rows = self._replayed_rows(batch) if self.enabled else []
        if not rows:
            return {"replay/is_weight_mean": 1.0} if self.enabled else {}
        keys = [k for k, _ in rows]
        data = tq.kv_batch_get(keys=keys, partition_id=batch.partition_id, select_fields=["old_log_probs"])
        pad = torch.nn.utils.rnn.pad_sequence  # rows: pi_old and mu [T_i] of each replayed sample
        old = pad([data["old_log_probs"][i] for i in range(len(rows))], batch_first=True)
        mu = pad([m.to(old.dtype) for _, m in rows], batch_first=True)
        lengths = [int(m.numel()) for _, m in rows]
        mask = pad([torch.ones(n, dtype=old.dtype) for n in lengths], batch_first=True)
        w = behaviour_weights(old, mu, mask, truncation=self.replay_cfg.truncation)
        metrics = {"replay/is_weight_mean": float((w * mask).sum() / mask.sum().clamp_min(1.0))}
        if self.replay_cfg.correction == "plain":
            anchor = plain_old_log_prob(old, mu, torch.ones(len(rows), dtype=torch.bool),
                                        truncation=self.replay_cfg.truncation)
            nested = torch.nested.as_nested_tensor([anchor[i, :n] for i, n in enumerate(lengths)],
                                                   layout=torch.jagged)
            tq.kv_batch_put(keys=keys, partition_id=batch.partition_id,
                            fields=TensorDict({"old_log_probs": nested}, batch_size=len(keys)))
        return metrics

    def after_advantage(self, batch: KVBatchMeta) -> None:
        """With ``replay.reuse_advantages``: put the stored advantages of replayed rows back."""
        if not self.enabled or not self.replay_cfg.reuse_advantages:
            return
        rows = [(k, g) for k in batch.keys if (g := self._replayed.get(k)) is not None]
        if not rows:
            return
        adv = [g.payload["advantages"][g.payload["keys"].index(k)] for k, g in rows]
        tq.kv_batch_put(keys=[k for k, _ in rows], partition_id=batch.partition_id,
                        fields=TensorDict({"advantages": torch.nested.as_nested_tensor(adv, layout=torch.jagged)},
                                          batch_size=len(rows)))

    def store_fresh(self, batch: KVBatchMeta, global_steps: int) -> dict[str, float]:
        """Add this step's fresh groups (with pi_old as behaviour log-probs and their
        advantages) to the buffer; returns ``replay/stored`` and ``replay/evicted``."""
        if not self.enabled or not self._fresh:
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
        """The replay buffer's state (empty dict when replay is off)."""
        return self.buffer.state_dict() if self.enabled else {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`; ignores an empty state (replay was off)."""
        if self.enabled and state:
            self.buffer.load_state_dict(state)
