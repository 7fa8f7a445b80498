"""This project's trainer: verl's sync V1 trainer running the enabled stages' hooks.

:class:`RecipeTrainer` is verl's synchronous V1 trainer (``PPOTrainerSync``), registered
with verl's ``register_trainer`` as ``recipe_sync`` and selected by
``trainer.v1.trainer_mode=recipe_sync`` (the default of ``conf/config.yaml``). It behaves
exactly like ``sync`` (the mode is set back to ``sync`` on construction, so verl's sampler
and parameter-sync settings are the sync ones) and, at each of verl's step stages, runs the
hooks of the enabled stages (:mod:`recipe.stages.base`, in ``Stage.order``):

==========================  ====================================================
verl stage                  stage hooks
==========================  ====================================================
``prepare_step``            ``plan`` (fresh prompts of the step), then verl submits them
``_fetch_one_gen_batch``    ``next_prompts`` (first non-None replaces verl's dataloader)
sampler (``sample``)        the group filter, then ``sample`` (:mod:`recipe.stages.group_filter`)
``_balance_batch``          ``balance`` (first non-None replaces verl's balancing)
``_compute_old_log_prob``   ``before_old_log_prob``, verl, ``after_old_log_prob``
``_compute_ref_log_prob``   ``before_ref_log_prob``, verl
``_compute_advantage``      verl, ``after_advantage``
``_update_actor``           ``update_actor`` (first True replaces verl's), ``after_update_actor``
``_compute_metrics``        verl, ``metrics``
``_save_checkpoint``        ``state_dict`` -> ``recipe_state.pt``, ``save``, verl
``_load_checkpoint``        ``setup``, verl, ``load_state_dict``, ``load``
``_init_resource_pool_mgr`` verl's worker mapping with a stage's ``worker_class``
==========================  ====================================================

Stages get :class:`~recipe.stages.base.Handles` (worker group, dataset, agent-loop manager,
step, tokenizer), never this object. Adding a stage needs no edit here.

Empty batches: when a group filter leaves nothing to train on (rows tagged
``skip_update``), every stage of the step (balance, log-probs, values, advantages, updates,
data metrics) is skipped for that step, with a warning; weights, checkpoints and
validation proceed, and the step's ``timing_s/*`` (generation, step) are still logged, so
that wall time summed over steps counts it (a preference iteration's collection steps).

State: ``global_step_N/recipe_state.pt`` = ``{"global_steps": N, "stages": {name:
stage.state_dict()}}``, written (atomically) before verl's own checkpoint so that verl's
``latest_checkpointed_iteration.txt`` never points at a step without it.

Publication: verl writes its checkpoint file by file and then its tracker
(``latest_checkpointed_iteration.txt``, truncated and rewritten in place). Once verl's save
returns, the trainer writes ``global_step_N/COMPLETE`` (atomically): a checkpoint is
published when that marker exists. At start-up (:func:`repair_tracker`) a tracker that is
unreadable, or names a folder without the marker while an older published one exists (a
kill during a save), is rewritten to the newest published checkpoint, with a warning; runs
whose folders carry no marker at all (older versions) are left to verl. Checkpoints of
the layout before stages (top-level ``replay`` / ``dots`` / ``preference`` keys) are read
too (:func:`stage_states`).

Same seed, same run: group ids are deterministic (``t<step>-<k>`` for training prompts,
``r<step>-<k>`` for DOTS reference rollouts, ``v<step>-<k>`` for validation;
:func:`recipe.stages.rows.make_uids`) instead of verl's ``uuid4``, so each response's
sampling seed (:mod:`verl_patches.seeding`, derived from the uid) is the same in every run
with the same ``seed``; the sampler orders rows by key, not by arrival.

Importing this module also imports :mod:`recipe.algos`, registering this project's
advantage estimators in the trainer process (policy losses are registered in the workers
through ``actor_rollout_ref.model.external_lib: recipe.algos``).

:class:`RecipeTaskRunner` is verl's ``TaskRunnerV1`` that imports this module first, so
the registration happens in the Ray process that builds the trainer.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
from types import SimpleNamespace

import ray
import torch
from omegaconf import open_dict

import recipe.algos  # noqa: F401  (registers advantage estimators and policy losses)
from recipe.algos.metrics import validation_metrics
from recipe.io import atomic_torch_save, atomic_write_text
from recipe.stages.base import Handles, Stage, build_stages
from recipe.stages.rows import COLLECTING, is_skipped, make_uids
from verl.trainer.main_ppo import TaskRunnerV1
from verl.trainer.ppo.v1 import trainer_base
from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY, register_trainer
from verl.trainer.ppo.v1.trainer_sync import PPOTrainerSync

TRAINER_MODE = "recipe_sync"
#: Per-checkpoint state of the stages (in ``global_step_N/``).
STATE_FILE = "recipe_state.pt"
#: Written into ``global_step_N/`` once the whole checkpoint is on disk.
COMPLETE_FILE = "COMPLETE"
#: verl's checkpoint tracker in ``trainer.default_local_dir``.
TRACKER_FILE = "latest_checkpointed_iteration.txt"
#: Stage names of the checkpoint layout before the stage protocol.
LEGACY_STATE_KEYS = {"replay": "rollout_replay", "dots": "dots", "preference": "preference"}

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


def stage_states(state: dict) -> dict[str, dict]:
    """Stage name -> saved state of a ``recipe_state.pt`` dict, in either layout.

    The layout before the stage protocol kept ``replay``, ``dots`` and ``preference``
    (``{"stage": ..., "sampler": ...}``) at the top level; they map to the stages
    ``rollout_replay``, ``dots`` and ``preference`` (whose ``load_state_dict`` reads the old
    preference layout).
    """
    if "stages" in state:
        return dict(state["stages"])
    return {new: state[old] for old, new in LEGACY_STATE_KEYS.items() if state.get(old)}


@contextlib.contextmanager
def uuid4_from(new_uid):
    """Inside the block, verl's V1 trainer module draws ``uuid.uuid4()`` from ``new_uid()``
    (verl's ``_validate`` names its prompts with ``str(uuid.uuid4())`` inline)."""
    original = trainer_base.uuid
    trainer_base.uuid = SimpleNamespace(uuid4=new_uid)
    try:
        yield
    finally:
        trainer_base.uuid = original


def published_steps(root: str) -> list[int]:
    """Steps ``N`` whose ``root/global_step_N/`` holds :data:`COMPLETE_FILE`, ascending."""
    steps = []
    for entry in os.listdir(root) if os.path.isdir(root) else []:
        name, _, step = entry.partition("global_step_")
        if not name and step.isdigit() and os.path.exists(os.path.join(root, entry, COMPLETE_FILE)):
            steps.append(int(step))
    return sorted(steps)


def repair_tracker(root: str) -> str | None:
    """Point verl's tracker in ``root`` at the newest published checkpoint when it names an
    unpublished one (see the module doc).

    Returns:
        A message saying what was changed, or None when the tracker was left as it is (it is
        readable and names a published checkpoint, or no checkpoint carries the marker).
    """
    published = published_steps(root)
    if not published:
        return None
    tracker = os.path.join(root, TRACKER_FILE)
    try:
        with open(tracker) as f:
            named: int | str | None = int(f.read().strip())
    except FileNotFoundError:
        named = None
    except ValueError:
        named = "unreadable"
    if named in published:
        return None
    atomic_write_text(tracker, str(published[-1]))
    return (f"{tracker} named {'no checkpoint' if named is None else named!r}, which was not completely "
            f"written (no {COMPLETE_FILE} marker: the run was killed while saving it?); resuming from the newest "
            f"complete checkpoint, global_step_{published[-1]}")


def _load_class(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


class RecipeTrainer(PPOTrainerSync):
    """verl's sync V1 trainer plus the enabled stages' hooks (module docstring)."""

    def __init__(self, config):
        with open_dict(config):
            config.trainer.v1.trainer_mode = "sync"
        self.stages = build_stages(config)
        self._uids_issued: dict[tuple[str, int], int] = {}
        super().__init__(config)
        # the sampler (recipe.stages.group_filter) runs the stages' sample hooks
        if hasattr(self.replay_buffer, "stages"):
            self.replay_buffer.stages = list(self.stages)
        elif any(type(s).sample is not Stage.sample for s in self.stages):
            raise RuntimeError("stages with a sample hook need trainer.v1.sampler.custom_sampler = "
                               "recipe.stages.group_filter.GroupFilterSampler (conf/config.yaml sets it)")

    def handles(self) -> Handles:
        """The narrow handles stages get."""
        return Handles(config=self.config, step=getattr(self, "global_steps", 0),
                       worker_group=getattr(self, "actor_rollout_wg", None),
                       dataset=getattr(self, "train_dataset", None),
                       agent_loop_manager=getattr(self, "agent_loop_manager", None),
                       tokenizer=getattr(self, "tokenizer", None), new_uids=self.new_uids)

    def new_uids(self, n: int, kind: str = "t") -> list[str]:
        """The next ``n`` group ids of ``kind`` at this step (:func:`recipe.stages.rows.make_uids`)."""
        step = int(getattr(self, "global_steps", 0))
        start = self._uids_issued.get((kind, step), 0)
        self._uids_issued = {k: v for k, v in self._uids_issued.items() if k[1] >= step}
        self._uids_issued[(kind, step)] = start + n
        return make_uids(kind, step, start, n)

    def _init_resource_pool_mgr(self):
        """verl's worker mapping; an enabled stage's ``worker_class`` replaces verl's actor /
        reference worker (it must subclass verl's ``ActorRolloutRefWorker``)."""
        super()._init_resource_pool_mgr()
        wanted = {s.worker_class for s in self.stages if s.worker_class}
        if not wanted:
            return
        if len(wanted) > 1:
            raise RuntimeError(f"enabled stages ask for different actor workers: {sorted(wanted)}")
        from verl.workers.engine_workers import ActorRolloutRefWorker

        worker = _load_class(wanted.pop())
        for role, cls in list(self.role_worker_mapping.items()):
            if getattr(cls, "__ray_actor_class__", None) is ActorRolloutRefWorker:
                self.role_worker_mapping[role] = ray.remote(worker)

    # ------------------------------------------------------------------ prompts
    def prepare_step(self) -> dict:
        """Run the stages' ``plan`` hooks (fresh prompts of this step), then submit them."""
        metrics: dict = {}
        h = self.handles()
        n_fresh = self.config.data.train_batch_size
        for stage in self.stages:
            n_fresh, m = stage.plan(h, n_fresh)
            metrics.update(m)
        if hasattr(self.replay_buffer, "fresh_size"):
            self.replay_buffer.fresh_size = n_fresh
        if n_fresh:
            self._add_prompts_to_generate(n_fresh)
        return metrics

    def _fetch_one_gen_batch(self):
        """The next chunk of prompts: a stage's ``next_prompts`` or verl's dataloader, named
        with deterministic uids."""
        from verl.utils import tensordict_utils as tu

        size = self.config.data.get("gen_batch_size", None) or self.config.data.train_batch_size
        h = self.handles()
        batch = next((b for b in (stage.next_prompts(h, size) for stage in self.stages) if b is not None), None)
        if batch is None:
            batch = super()._fetch_one_gen_batch()
        tu.assign_non_tensor_stack(batch, "uid", self.new_uids(len(batch)))
        return batch

    def _validate(self):
        """verl's validation, its prompts named ``v<step>-<k>`` (seeded responses)."""
        with uuid4_from(lambda: self.new_uids(1, "v")[0]):
            return super()._validate()

    # ------------------------------------------------------------------ step stages
    def _balance_batch(self, batch, metrics, logging_prefix="global_seqlen", keep_minibatch=False):
        h = self.handles()
        for stage in self.stages:
            out = stage.balance(h, batch, metrics)
            if out is not None:
                return out
        return super()._balance_batch(batch, metrics, logging_prefix=logging_prefix, keep_minibatch=keep_minibatch)

    def _compute_old_log_prob(self, batch, metrics):
        h = self.handles()
        for stage in self.stages:
            stage.before_old_log_prob(h, batch, metrics)
        batch = super()._compute_old_log_prob(batch, metrics)
        for stage in self.stages:
            stage.after_old_log_prob(h, batch, metrics)
        return batch

    def _compute_ref_log_prob(self, batch, metrics):
        h = self.handles()
        for stage in self.stages:
            stage.before_ref_log_prob(h, batch, metrics)
        return super()._compute_ref_log_prob(batch, metrics)

    def _compute_advantage(self, batch, metrics):
        batch = super()._compute_advantage(batch, metrics)
        h = self.handles()
        for stage in self.stages:
            stage.after_advantage(h, batch, metrics)
        return batch

    def _update_actor(self, batch, metrics):
        h = self.handles()
        if not any(stage.update_actor(h, batch, metrics) for stage in self.stages):
            batch = super()._update_actor(batch, metrics)
        for stage in self.stages:
            stage.after_update_actor(h, batch, metrics)
        return batch

    def _compute_metrics(self, batch, metrics, timing_raw, global_steps, epoch):
        if is_skipped(batch):
            if not batch.tags or not all(tag.get(COLLECTING, False) for tag in batch.tags):  # else planned
                logger.warning("step %d: no group left to train on, no update (see filter/* metrics)", global_steps)
            metrics.update({"training/global_step": global_steps, "training/epoch": epoch,
                            **{f"timing_s/{name}": float(sec) for name, sec in timing_raw.items()}})
            return
        super()._compute_metrics(batch, metrics, timing_raw, global_steps, epoch)
        h = self.handles()
        for stage in self.stages:
            stage.metrics(h, batch, metrics)

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
        """``recipe_state.pt`` and the stages' files, then verl's checkpoint."""
        path = self._state_path(self.global_steps)
        state = {"global_steps": self.global_steps,
                 "stages": {s.name: s.state_dict() for s in self.stages}}
        atomic_torch_save(state, path)
        h = self.handles()
        for stage in self.stages:
            stage.save(h, os.path.dirname(path))
        super()._save_checkpoint()
        atomic_write_text(os.path.join(os.path.dirname(path), COMPLETE_FILE), f"{self.global_steps}\n")

    def _load_checkpoint(self):
        h = self.handles()
        for stage in self.stages:  # workers exist, the checkpoint is not loaded yet
            stage.setup(h)
        if self.config.trainer.resume_mode == "auto":
            message = repair_tracker(self.config.trainer.default_local_dir)
            if message:
                logger.warning(message)
                print(f"[recipe] {message}", flush=True)
        super()._load_checkpoint()
        if self.global_steps <= 0:
            return
        folder = self.config.trainer.resume_from_path if self.config.trainer.resume_mode == "resume_path" else None
        path = os.path.join(folder, STATE_FILE) if folder else self._state_path(self.global_steps)
        if not os.path.exists(path):
            stateful = [s.name for s in self.stages if s.state_dict()]
            if stateful:
                logger.warning("resuming at step %d without %s: the state of %s starts empty",
                               self.global_steps, path, stateful)
            return
        states = stage_states(torch.load(path, weights_only=False))
        h = self.handles()
        for stage in self.stages:
            stage.load_state_dict(states.get(stage.name) or {})
            stage.load(h, os.path.dirname(path))


def _skip_when_empty(stage):
    @functools.wraps(stage)
    def guarded(self, batch, *args, **kwargs):
        if is_skipped(batch):
            return batch
        return stage(self, batch, *args, **kwargs)

    return guarded


for _stage in SKIP_WHEN_EMPTY:
    setattr(RecipeTrainer, _stage, _skip_when_empty(getattr(RecipeTrainer, _stage)))


if TRAINER_MODE not in TRAINER_REGISTRY:
    register_trainer(TRAINER_MODE)(RecipeTrainer)


class _RecipeTaskRunner(TaskRunnerV1.__ray_actor_class__):
    """verl's V1 task runner; importing this module registered :class:`RecipeTrainer`.

    verl's ``run`` pprints the whole resolved config (~1,000 lines) before it builds the
    trainer; here that call prints nothing (``recipe.main`` writes the config to
    ``config.yaml`` and prints it only with ``log.config_dump=true``). ``run`` looks
    ``pprint`` up in ``verl.trainer.main_ppo`` at call time, and that dump is the module's
    only use of it, so it is silenced for the duration of ``run`` and put back after.
    """

    def run(self, config):
        from verl.trainer import main_ppo

        verl_pprint = main_ppo.pprint
        main_ppo.pprint = lambda *args, **kwargs: None
        try:
            return super().run(config)
        finally:
            main_ppo.pprint = verl_pprint


RecipeTaskRunner = ray.remote(_RecipeTaskRunner)
