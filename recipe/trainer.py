"""This project's narrow hooks on verl's V1 trainer.

:class:`RecipeTrainer` is verl's synchronous V1 trainer (``PPOTrainerSync``), registered
with verl's ``register_trainer`` as ``recipe_sync`` and selected by
``trainer.v1.trainer_mode=recipe_sync`` (the default of ``conf/config.yaml``). It
behaves exactly like ``sync`` (the mode is set back to ``sync`` on construction, so
verl's replay buffer and parameter-sync settings are the sync ones) and adds:

- ``reward/<key>`` training metrics: the batch mean of every numeric field the reward
  function returns (``acc``, ``has_answer``, ``grader_timeout``, ...), next to verl's own
  ``critic/score/*`` (the reward). Validation already reports them as
  ``val-core/<data_source>/acc/mean@1`` etc.
  They are averaged over the step's fresh rollouts (replayed groups left out), as is
  ``dots/effective_ratio`` (share of fresh groups with 0 < accuracy < 1, logged for every
  run so that DOTS can be compared with its baseline).
- Empty batches: when a group filter (:mod:`recipe.sampler`) leaves nothing to train on,
  every stage of the step (balance, log-probs, values, advantages, updates, data metrics)
  is skipped for that step, with a warning; weights, checkpoints and validation proceed.
- Rollout replay (:mod:`recipe.rollout_replay`, ``replay.enable``): ``prepare_step``
  generates only the fresh share of the batch; the old-log-prob, advantage and actor-update
  stages call the sampler's replay hooks (off-policy correction, stored advantages, adding
  the fresh groups to the buffer).
- DOTS (:mod:`recipe.selection`, ``dots.enable``): ``prepare_step`` runs a reference round
  every ``dots.every`` steps and ``_fetch_one_gen_batch`` serves the selected questions
  instead of verl's dataloader.
- Iterative DPO / LoRR (:mod:`recipe.preference`, ``preference.enable``): the actor worker
  is :class:`recipe.workers.RecipeActorRolloutRefWorker` (preference loss, reference refresh,
  LoRR reset); ``prepare_step`` may reuse the initial pairs instead of generating; the batch
  keeps its pair layout (padding instead of verl's length balancing); the reference is
  refreshed before the reference log-probs; the actor update runs ``L`` passes with resets.
- State: ``global_step_N/recipe_state.pt`` (replay buffer, DOTS selector, preference / LoRR
  counters and initial pairs) and ``lorr_theta0_rank{r}.pt`` are written with verl's
  checkpoints and restored on resume.

Importing this module also imports :mod:`recipe.algos`, registering this project's
advantage estimators in the trainer process (policy losses are registered in the workers
through ``actor_rollout_ref.model.external_lib: recipe.algos``).

:class:`RecipeTaskRunner` is verl's ``TaskRunnerV1`` that imports this module first, so
the registration happens in the Ray process that builds the trainer.
"""

from __future__ import annotations

import functools
import logging
import numbers
import os
from collections import defaultdict

import numpy as np
import ray
import torch
from omegaconf import open_dict

import recipe.algos  # noqa: F401  (registers advantage estimators and policy losses)
from recipe.eval import validation_metrics
from recipe.rollout_replay import REPLAYED
from recipe.algos.filters import group_accuracy
from recipe.sampler import SKIP_UPDATE, reward_info
from recipe.preference import PreferenceStage
from recipe.selection import DotsConfig, DotsStage
from verl.trainer.main_ppo import TaskRunnerV1
from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY, register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

TRAINER_MODE = "recipe_sync"
#: Per-checkpoint state of this project's stateful pieces (in ``global_step_N/``).
STATE_FILE = "recipe_state.pt"

logger = logging.getLogger(__name__)

#: Stages of verl's V1 step that are skipped when the sampled batch is empty.
SKIP_WHEN_EMPTY = (
    "_balance_batch",
    "_compute_reward_colocate",
    "_compute_old_log_prob",
    "_compute_ref_log_prob",
    "_compute_values",
    "_compute_advantage",
    "_update_critic",
    "_update_actor",
)


def reward_extra_metrics(extra_fields: list, prefix: str = "reward/") -> dict[str, float]:
    """Average the numeric ``reward_extra_info`` entries of a training batch.

    Args:
        extra_fields: One dict per sample (``B`` = prompts x n) as stored by verl's agent
            loop; the reward function's dict lives under ``"reward_extra_info"``.
        prefix: Metric name prefix.

    Returns:
        ``{prefix + key: mean}`` over the samples that carry ``key`` with a number or bool
        value (strings such as the extracted answer are skipped). ``score`` is skipped:
        verl reports it as ``critic/score/mean``.
    """
    values: dict[str, list[float]] = defaultdict(list)
    for field in extra_fields:
        for key, value in reward_info(field).items():
            if key == "score" or isinstance(value, str):
                continue
            if isinstance(value, (bool, np.bool_, numbers.Number)):
                values[key].append(float(value))
    return {f"{prefix}{k}": float(np.mean(v)) for k, v in values.items() if v}


class RecipeTrainer(PPOTrainerSync):
    """verl's sync V1 trainer plus the hooks listed in the module docstring."""

    def __init__(self, config):
        with open_dict(config):
            config.trainer.v1.trainer_mode = "sync"
        super().__init__(config)
        dots_cfg = DotsConfig.from_config(config.get("dots"))
        self.dots = DotsStage(dots_cfg, config) if dots_cfg.enable else None
        pref = config.get("preference") or {}
        self.preference = PreferenceStage(config) if pref.get("enable", False) else None

    def _init_resource_pool_mgr(self):
        """verl's worker mapping; with ``preference.enable`` the actor / reference worker is
        :class:`recipe.workers.RecipeActorRolloutRefWorker` (verl's plus our methods)."""
        super()._init_resource_pool_mgr()
        if self.preference is None:
            return
        from recipe.workers import RecipeActorRolloutRefWorker
        from verl.workers.engine_workers import ActorRolloutRefWorker

        for role, cls in list(self.role_worker_mapping.items()):
            if getattr(cls, "__ray_actor_class__", None) is ActorRolloutRefWorker:
                self.role_worker_mapping[role] = ray.remote(RecipeActorRolloutRefWorker)

    # ------------------------------------------------------------------ prompts
    @property
    def _replay(self):
        """The sampler when it does rollout replay (:mod:`recipe.rollout_replay`), else None."""
        sampler = getattr(self, "replay_buffer", None)
        return sampler if getattr(sampler, "enabled", False) else None

    def prepare_step(self) -> dict:
        """Submit this step's fresh prompts: ``B``, or ``round(delta * B)`` once rollout replay
        has enough groups; with DOTS, run a reference round first when one is due."""
        metrics: dict = {}
        batch_size = self.config.data.train_batch_size
        n_fresh = self._replay.plan_step(batch_size) if self._replay else batch_size
        if self.preference is not None:
            n_fresh = self.preference.plan_step(self.replay_buffer, batch_size)
        if self.dots is not None:
            metrics.update(self.dots.maybe_round(self, self.global_steps))
        if n_fresh:
            self._add_prompts_to_generate(n_fresh)
        if self.dots is not None:
            metrics.update(self.dots.step_metrics())
        return metrics

    def _fetch_one_gen_batch(self):
        """With DOTS, the next ``gen_batch_size`` prompts are the selected questions."""
        if self.dots is None:
            return super()._fetch_one_gen_batch()
        size = self.config.data.get("gen_batch_size", None) or self.config.data.train_batch_size
        return self.dots.next_batch(self, size)

    # ------------------------------------------------------------------ stages
    def _balance_batch(self, batch, metrics, logging_prefix="global_seqlen", keep_minibatch=False):
        """Preference pairs keep their ``[c_0, r_0, ...]`` layout: padded (zero-weight rows)
        to a multiple of 2 x micro-batch x dp size instead of verl's length balancing."""
        if self.preference is None:
            return super()._balance_batch(batch, metrics, logging_prefix=logging_prefix, keep_minibatch=keep_minibatch)
        from verl.trainer.ppo.padding_utils import upsample_batch_to_divisible_size

        wg = self.actor_rollout_wg
        if "actor" not in wg._dispatch_info:
            wg._dispatch_info["actor"] = wg._query_dispatch_info("actor")
        dp_size = max(wg._dispatch_info["actor"]) + 1
        n_pairs = sum(not t.get("is_padding", False) for t in batch.tags) // 2
        batch = upsample_batch_to_divisible_size(batch, self.preference.pad_multiple(dp_size, n_pairs),
                                                 self.tokenizer.eos_token_id)
        self.preference.write_pair_fields(batch)
        return batch

    def _pair_micro_batches(self, batch):
        """Log-prob passes over preference pairs: micro-batches of whole pairs that divide
        each rank's rows (verl's infer path needs rows % micro == 0, which the configured
        log-prob micro size need not satisfy). Set per stage: verl's stages hand on the
        ``KVBatchMeta`` that ``kv_batch_put`` returns, without ``extra_info``."""
        if self.preference is not None:
            batch.extra_info["micro_batch_size_per_gpu"] = 2 * self.preference.micro_pairs
        return batch

    def _compute_ref_log_prob(self, batch, metrics):
        batch = self._pair_micro_batches(batch)
        if self.preference is not None and self.preference.refresh_reference(self.actor_rollout_wg,
                                                                             self.global_steps):
            metrics["dpo/reference_refreshed"] = 1
        return super()._compute_ref_log_prob(batch, metrics)

    def _compute_old_log_prob(self, batch, metrics):
        batch = super()._compute_old_log_prob(self._pair_micro_batches(batch), metrics)
        if self._replay:
            metrics.update(self._replay.after_old_log_prob(batch))
        return batch

    def _compute_advantage(self, batch, metrics):
        batch = super()._compute_advantage(batch, metrics)
        if self._replay:
            self._replay.after_advantage(batch)
        return batch

    def _update_actor(self, batch, metrics):
        if self.preference is not None:
            self.preference.update(self, batch, metrics)
            return batch
        batch = super()._update_actor(batch, metrics)
        if self._replay:
            metrics.update(self._replay.store_fresh(batch, self.global_steps))
        return batch

    def _compute_metrics(self, batch, metrics, timing_raw, global_steps, epoch):
        if skip_update(batch):
            logger.warning("step %d: no group left to train on, no update (see filter/* metrics)", global_steps)
            metrics.update({"training/global_step": global_steps, "training/epoch": epoch})
            return
        super()._compute_metrics(batch, metrics, timing_raw, global_steps, epoch)
        import transfer_queue as tq

        data = tq.kv_batch_get(keys=batch.keys, partition_id=batch.partition_id, select_fields=["extra_fields"])
        extra = data.pop("extra_fields", None)
        if extra is not None:
            # fresh rollouts only: padding copies and replayed groups are left out
            fresh = [i for i, tag in enumerate(batch.tags) if not tag.get("is_padding", False)
                     and not tag.get(REPLAYED, False)]
            fields = extra.tolist()
            fields = [fields[i] for i in fresh]
            metrics.update(reward_extra_metrics(fields))
            ratio = effective_ratio([batch.keys[i].split("_")[0] for i in fresh], fields)
            if ratio is not None:
                metrics["dots/effective_ratio"] = ratio

    def _val_metrics_update(self, data_sources, sample_uids, reward_extra_infos_dict, sample_turns,
                            expected_acc_counts=None):
        """verl's validation metrics plus ``val/<data_source>/avg@n`` and ``pass@j`` (j in 1, n;
        n = ``rollout.val_kwargs.n``): the names ``python -m recipe.eval`` reports (without ``val/``)."""
        metrics = super()._val_metrics_update(data_sources, sample_uids, reward_extra_infos_dict, sample_turns,
                                              expected_acc_counts=expected_acc_counts)
        accs = reward_extra_infos_dict.get("acc")
        if accs is not None and len(accs) == len(sample_uids) and None not in accs:
            n = int(self.config.actor_rollout_ref.rollout.val_kwargs.n)
            try:
                metrics.update(validation_metrics(list(data_sources), list(sample_uids), [float(a) for a in accs],
                                                  pass_ks=sorted({1, n})))
            except ValueError as e:  # e.g. prompts with unequal response counts
                logger.warning("val/* avg@k / pass@k metrics skipped: %s", e)
        return metrics

    # ------------------------------------------------------------------ state
    def _state_path(self, global_steps: int) -> str:
        return os.path.join(self.config.trainer.default_local_dir, f"global_step_{global_steps}", STATE_FILE)

    def _save_checkpoint(self):
        """verl's checkpoint plus ``recipe_state.pt`` (replay buffer, DOTS state), written
        first so that verl's ``latest_checkpointed_iteration.txt`` never points at a step
        without it."""
        path = self._state_path(self.global_steps)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        state = {
            "global_steps": self.global_steps,
            "replay": self._replay.state_dict() if self._replay else {},
            "dots": self.dots.state_dict() if self.dots is not None else {},
            "preference": self._preference_state(),
        }
        torch.save(state, path + ".tmp")
        os.replace(path + ".tmp", path)
        if self.preference is not None and self.preference.reset_on:
            self.actor_rollout_wg.recipe_lorr_save(os.path.dirname(path))
        super()._save_checkpoint()

    def _preference_state(self) -> dict:
        if self.preference is None:
            return {}
        return {"stage": self.preference.state_dict(), "sampler": self.replay_buffer.state_dict()}

    def _load_checkpoint(self):
        if self.preference is not None:  # workers exist, the checkpoint is not loaded yet
            self.preference.setup_workers(self.actor_rollout_wg)
        super()._load_checkpoint()
        if self.global_steps <= 0:
            return
        folder = self.config.trainer.resume_from_path if self.config.trainer.resume_mode == "resume_path" else None
        path = os.path.join(folder, STATE_FILE) if folder else self._state_path(self.global_steps)
        if not os.path.exists(path):
            if self._replay or self.dots is not None:
                logger.warning("resuming at step %d without %s: replay buffer / DOTS state start empty",
                               self.global_steps, path)
            return
        state = torch.load(path, weights_only=False)
        if self._replay:
            self._replay.load_state_dict(state.get("replay") or {})
            print(f"[recipe] restored replay buffer: {len(self._replay.buffer)} groups "
                  f"(fingerprint {self._replay.fingerprint()}) from {path}", flush=True)
        if self.dots is not None:
            self.dots.load_state_dict(state.get("dots") or {})
        if self.preference is not None:
            pstate = state.get("preference") or {}
            self.preference.load_state_dict(pstate.get("stage") or {})
            self.replay_buffer.load_state_dict(pstate.get("sampler") or {})
            fp = self.actor_rollout_wg.recipe_lorr_load(os.path.dirname(path)) if self.preference.reset_on else None
            print(f"[recipe] restored preference state: {self.preference.state_dict()['replays']} replay passes, "
                  f"{self.preference.resets} resets, initial pairs "
                  f"{'kept' if self.replay_buffer.initial else 'none'}, theta_0 fingerprint {fp and fp[0]}",
                  flush=True)


def effective_ratio(uids: list[str], fields: list) -> float | None:
    """Share of the groups (one ``uid`` each) whose accuracy lies strictly in (0, 1): the
    prompts that carry a GRPO gradient (DOTS paper's "effective" questions).

    Args:
        uids: ``[B]`` group id per fresh sample.
        fields: ``[B]`` verl ``extra_fields`` dicts with ``reward_extra_info["acc"]``.

    Returns:
        The share in [0, 1], or None when no sample carries ``acc``.
    """
    infos = [reward_info(field) for field in fields]
    if len(infos) != len(uids):
        raise ValueError(f"effective_ratio: {len(uids)} uids but {len(infos)} fields")
    kept = [(uid, float(info["acc"])) for uid, info in zip(uids, infos) if "acc" in info]
    if not kept:
        return None
    acc = group_accuracy([u for u, _ in kept], [a for _, a in kept])
    return float(np.mean([0.0 < a < 1.0 for a in acc.values()]))


def skip_update(batch) -> bool:
    """True for a batch the group filter emptied (:data:`recipe.sampler.SKIP_UPDATE`)."""
    return len(batch) == 0 or all(tag.get(SKIP_UPDATE, False) for tag in batch.tags)


def _skip_when_empty(stage):
    @functools.wraps(stage)
    def guarded(self, batch, *args, **kwargs):
        if skip_update(batch):
            return batch
        return stage(self, batch, *args, **kwargs)

    return guarded


for _stage in SKIP_WHEN_EMPTY:
    setattr(RecipeTrainer, _stage, _skip_when_empty(getattr(RecipeTrainer, _stage)))


if TRAINER_MODE not in TRAINER_REGISTRY:
    register_trainer(TRAINER_MODE)(RecipeTrainer)


class _RecipeTaskRunner(TaskRunnerV1.__ray_actor_class__):
    """verl's V1 task runner; importing this module registered :class:`RecipeTrainer`."""


RecipeTaskRunner = ray.remote(_RecipeTaskRunner)
