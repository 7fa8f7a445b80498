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
- Empty batches: when a group filter (:mod:`recipe.sampler`) leaves nothing to train on,
  every stage of the step (balance, log-probs, values, advantages, updates, data metrics)
  is skipped for that step, with a warning; weights, checkpoints and validation proceed.

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
from collections import defaultdict

import numpy as np
import ray
from omegaconf import open_dict

import recipe.algos  # noqa: F401  (registers advantage estimators and policy losses)
from recipe.sampler import SKIP_UPDATE
from verl.trainer.main_ppo import TaskRunnerV1
from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY, register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

TRAINER_MODE = "recipe_sync"

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
        info = field.get("reward_extra_info", {}) if isinstance(field, dict) else {}
        for key, value in (info or {}).items():
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
            keep = [i for i, tag in enumerate(batch.tags) if not tag.get("is_padding", False)]
            fields = extra.tolist()
            metrics.update(reward_extra_metrics([fields[i] for i in keep] if keep else fields))


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
    setattr(RecipeTrainer, _stage, _skip_when_empty(getattr(PPOTrainerSync, _stage)))


if TRAINER_MODE not in TRAINER_REGISTRY:
    register_trainer(TRAINER_MODE)(RecipeTrainer)


class _RecipeTaskRunner(TaskRunnerV1.__ray_actor_class__):
    """verl's V1 task runner; importing this module registered :class:`RecipeTrainer`."""


RecipeTaskRunner = ray.remote(_RecipeTaskRunner)
