"""Pure parts of the trainer (recipe/stages/trainer.py), without Ray or a verl run: the
``recipe_state.pt`` layouts it reads, and the step stages it skips for a batch the group
filter emptied."""

from __future__ import annotations

from omegaconf import OmegaConf
from transfer_queue import KVBatchMeta

from recipe.stages.base import ORDER
from recipe.stages.rows import SKIP_UPDATE
from recipe.stages.trainer import (
    COMPLETE_FILE,
    LEGACY_STATE_KEYS,
    SKIP_WHEN_EMPTY,
    TRACKER_FILE,
    TRAINER_MODE,
    RecipeTrainer,
    stage_states,
)
from verl.trainer.ppo.v1.trainer_base import TRAINER_REGISTRY


def test_stage_states_current_layout():
    state = {"global_steps": 4,
             "stages": {"rollout_replay": {"groups": []}, "dots": {"rounds": 2}, "reward_metrics": {}}}
    assert stage_states(state) == {"rollout_replay": {"groups": []}, "dots": {"rounds": 2}, "reward_metrics": {}}
    assert stage_states(state) is not state["stages"]  # a copy


def test_stage_states_layout_before_stages():
    old = {"global_steps": 4, "replay": {"groups": [1]}, "dots": {"rounds": 2},
           "preference": {"stage": {"iteration": 1}, "sampler": {"initial": []}}}
    assert stage_states(old) == {"rollout_replay": {"groups": [1]}, "dots": {"rounds": 2},
                                 "preference": {"stage": {"iteration": 1}, "sampler": {"initial": []}}}
    # parts that were off when saved (empty / None) are left out
    assert stage_states({"global_steps": 2, "replay": {}, "dots": None, "preference": {"stage": {}}}) == {
        "preference": {"stage": {}}}
    assert stage_states({"global_steps": 1}) == {}
    assert set(LEGACY_STATE_KEYS.values()) <= set(ORDER)


def test_trainer_is_registered_under_its_mode():
    assert TRAINER_REGISTRY[TRAINER_MODE] is RecipeTrainer and TRAINER_MODE == "recipe_sync"


def test_a_skipped_batch_skips_every_training_stage_and_its_metrics():
    trainer = RecipeTrainer.__new__(RecipeTrainer)  # no workers: a stage that ran would fail
    skipped = KVBatchMeta(partition_id="train", keys=["a_0_0", "a_0_1"], tags=[{SKIP_UPDATE: True}] * 2)
    empty = KVBatchMeta(partition_id="train", keys=[], tags=[])
    for name in SKIP_WHEN_EMPTY:
        for batch in (skipped, empty):
            assert getattr(trainer, name)(batch, {}) is batch, name
    metrics = {}
    trainer._compute_metrics(skipped, metrics, {}, 5, 0)
    assert metrics == {"training/global_step": 5, "training/epoch": 0}
    # the step's time is still logged (verl's timing_s/<name>): wall time summed over steps counts it
    metrics = {}
    trainer._compute_metrics(skipped, metrics, {"gen": 1.25, "step": 1.5}, 6, 1)
    assert metrics == {"training/global_step": 6, "training/epoch": 1, "timing_s/gen": 1.25, "timing_s/step": 1.5}


def test_uids_are_deterministic_per_step_and_kind(monkeypatch):
    """The trainer names prompts t<step>-<k> (verl's dataloader and stages alike) and
    validation prompts v<step>-<k> through verl's own _validate."""
    import numpy as np
    from verl.trainer.ppo.v1 import trainer_base
    from verl.utils import tensordict_utils as tu

    from recipe.stages.trainer import PPOTrainerSync, uuid4_from

    trainer = RecipeTrainer.__new__(RecipeTrainer)
    trainer._uids_issued, trainer.stages, trainer.global_steps = {}, [], 3
    trainer.config = OmegaConf.create({"data": {"train_batch_size": 2}})

    def verls_fetch(self):  # verl's dataloader chunk with its random uuids
        return tu.get_tensordict({"index": np.arange(2), "uid": np.array(["x", "y"], dtype=object)})

    monkeypatch.setattr(PPOTrainerSync, "_fetch_one_gen_batch", verls_fetch)
    assert list(trainer._fetch_one_gen_batch()["uid"]) == ["t3-0", "t3-1"]
    assert list(trainer._fetch_one_gen_batch()["uid"]) == ["t3-2", "t3-3"]  # a refill round
    assert trainer.new_uids(2, "r") == ["r3-0", "r3-1"]
    trainer.global_steps = 4
    assert list(trainer._fetch_one_gen_batch()["uid"]) == ["t4-0", "t4-1"]
    assert set(trainer._uids_issued) == {("t", 4)}, "counters of past steps are dropped"

    def verls_validate(self):
        return [str(trainer_base.uuid.uuid4()) for _ in range(3)]

    monkeypatch.setattr(PPOTrainerSync, "_validate", verls_validate)
    assert trainer._validate() == ["v4-0", "v4-1", "v4-2"]
    assert trainer_base.uuid.uuid4 is not None and trainer_base.uuid.__name__ == "uuid", "module restored"
    try:
        with uuid4_from(lambda: "z"):
            raise KeyError
    except KeyError:
        pass
    assert trainer_base.uuid.__name__ == "uuid"


def _checkpoint(root, step, complete=True):
    folder = root / f"global_step_{step}"
    (folder / "actor").mkdir(parents=True)
    if complete:
        (folder / COMPLETE_FILE).write_text(f"{step}\n")


def test_tracker_repaired_after_a_kill_during_a_save(tmp_path):
    from recipe.stages.trainer import published_steps, repair_tracker

    tracker = tmp_path / TRACKER_FILE
    assert repair_tracker(str(tmp_path / "missing")) is None
    _checkpoint(tmp_path, 2)
    _checkpoint(tmp_path, 4)
    _checkpoint(tmp_path, 6, complete=False)  # killed while verl wrote it
    assert published_steps(str(tmp_path)) == [2, 4]
    tracker.write_text("4")
    assert repair_tracker(str(tmp_path)) is None and tracker.read_text() == "4"
    tracker.write_text("6")  # verl wrote the tracker, the marker is missing
    assert "global_step_4" in repair_tracker(str(tmp_path)) and tracker.read_text() == "4"
    tracker.write_text("")  # killed while verl truncated and rewrote the tracker
    assert "unreadable" in repair_tracker(str(tmp_path)) and tracker.read_text() == "4"
    tracker.unlink()
    assert "no checkpoint" in repair_tracker(str(tmp_path)) and tracker.read_text() == "4"


def test_tracker_of_runs_without_markers_is_left_to_verl(tmp_path):
    from recipe.stages.trainer import repair_tracker

    _checkpoint(tmp_path, 2, complete=False)
    (tmp_path / TRACKER_FILE).write_text("2")
    assert repair_tracker(str(tmp_path)) is None and (tmp_path / TRACKER_FILE).read_text() == "2"
