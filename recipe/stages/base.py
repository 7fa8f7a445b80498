"""The Stage protocol: how this project's pieces hook into verl's V1 training step.

verl's sync V1 trainer runs one step as ``prepare_step`` (submit prompts) -> ``sample``
(the sampler reads finished groups from TransferQueue) -> balance -> old log-prob ->
reference log-prob -> values -> advantage -> critic update -> actor update -> metrics.
A :class:`Stage` is one capability (rollout replay, DOTS, preference pairs, ...) that
overrides only the hooks it needs; :class:`recipe.stages.trainer.RecipeTrainer` calls the
enabled stages' hooks in :data:`ORDER` at those points. A stage never sees the trainer:
it gets :class:`Handles` (worker group, dataset, agent-loop manager, step, config) and,
while sampling, a :class:`SampleContext`.

Hooks (all optional; the base class does nothing):

=====================  ===========================================================  ==========================
hook                   when                                                          returns
=====================  ===========================================================  ==========================
``setup``              workers exist, before a checkpoint is loaded                  None
``plan``               ``prepare_step``, before prompts are submitted                (fresh prompts, metrics)
``next_prompts``       verl fetches a chunk of prompts (``_fetch_one_gen_batch``)    a collated batch or None
``sample``             after the group filter picked the fresh groups                the batch
``balance``            instead of verl's length balancing (first non-None wins)      the batch or None
``before_old_log_prob`` / ``after_old_log_prob``  around verl's old log-prob pass    None
``before_ref_log_prob``  before verl's reference log-prob pass                       None
``after_advantage``    after verl computed advantages                                None
``update_actor``       instead of verl's actor update (first True wins)              True if it updated
``after_update_actor`` after the actor update                                         None
``metrics``            after verl's step metrics                                      None
``state_dict`` / ``load_state_dict``  with verl's checkpoints (``recipe_state.pt``)  dict / None
``save`` / ``load``    with verl's checkpoints, for files of the workers              None
=====================  ===========================================================  ==========================

Metric-writing hooks get the step's ``metrics`` dict and add ``<area>/<name>`` entries.

Adding a stage = its module (a :class:`Stage` subclass decorated with
:func:`register_stage`), its config dataclass (:class:`recipe.config.ConfigNode`), and one
line in :data:`BUILTIN` (or, outside this package, its module in the ``stages.extra``
config list). Nothing in the trainer or the entry point changes.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

#: Modules of the built-in stages (imported by :func:`load_stages`; each registers itself).
BUILTIN = (
    "recipe.stages.dots",
    "recipe.stages.rollout_replay",
    "recipe.stages.preference",
    "recipe.stages.reward_metrics",
)

#: name -> stage class, filled by :func:`register_stage`.
STAGES: dict[str, type[Stage]] = {}


@dataclass
class Handles:
    """The narrow handles a stage gets from the trainer (never the trainer itself).

    Attributes:
        config: the full run config (read-only by convention).
        step: the current global step (1-based; 0 before training).
        worker_group: verl's actor / rollout / reference worker group (``actor_rollout_wg``).
        dataset: verl's training dataset (``RLHFDataset``).
        agent_loop_manager: verl's agent-loop manager (rollouts through the rollout servers).
        tokenizer: the policy's tokenizer.
        new_uids: ``new_uids(n, kind)`` -> the step's next ``n`` deterministic group ids of
            ``kind`` (``"t"`` training, ``"r"`` reference rollouts; see
            :func:`recipe.stages.rows.make_uids`); None outside the trainer (then stages
            fall back to random uuids).
    """

    config: Any
    step: int
    worker_group: Any = None
    dataset: Any = None
    agent_loop_manager: Any = None
    tokenizer: Any = None
    new_uids: Any = None


@dataclass
class SampleContext:
    """What a ``sample`` hook may use besides the batch.

    Attributes:
        step: the current global step.
        partition_id: TransferQueue partition of the batch (``"train"``).
        batch_size: the groups the step trains on (``data.train_batch_size``).
        forget: callback telling the sampler that rows (keys) left TransferQueue.
    """

    step: int
    partition_id: str
    batch_size: int
    forget: Callable[[Iterable[str]], None]


class Stage:
    """Base class of a stage: every hook is a no-op (see the module docstring).

    Class attributes:
        name: the stage's name (registry key).
        node: its config node (default: ``name``).
        config_cls: its :class:`recipe.config.ConfigNode` dataclass, built from ``config[node]``.
        order: position among the stages (lower runs first; :data:`ORDER`).
        worker_class: ``"module:Class"`` of an actor worker extension this stage needs
            (None: verl's worker).
    """

    name: ClassVar[str] = ""
    node: ClassVar[str | None] = None
    config_cls: ClassVar[Any] = None
    order: ClassVar[int] = 50
    worker_class: ClassVar[str | None] = None

    def __init__(self, cfg: Any, config: Any):
        self.cfg = cfg
        self.config = config

    # ------------------------------------------------------------------ selection
    @classmethod
    def load_config(cls, config: Any) -> Any:
        """``config_cls.from_config(config[node])`` (None without a config class)."""
        if cls.config_cls is None:
            return None
        return cls.config_cls.from_config(config.get(cls.node or cls.name) if config is not None else None)

    @classmethod
    def enabled(cls, cfg: Any, config: Any) -> bool:
        """Whether the stage runs: its node's ``enable`` by default."""
        return bool(getattr(cfg, "enable", False))

    @classmethod
    def check_config(cls, config: Any) -> None:
        """Start-up checks of an enabled stage (raise :class:`recipe.config.ConfigError`)."""

    # ------------------------------------------------------------------ hooks
    def setup(self, h: Handles) -> None:
        pass

    def plan(self, h: Handles, n_fresh: int) -> tuple[int, dict]:
        return n_fresh, {}

    def next_prompts(self, h: Handles, size: int):
        return None

    def sample(self, ctx: SampleContext, batch, metrics: dict):
        return batch

    def balance(self, h: Handles, batch, metrics: dict):
        return None

    def before_old_log_prob(self, h: Handles, batch, metrics: dict) -> None:
        pass

    def after_old_log_prob(self, h: Handles, batch, metrics: dict) -> None:
        pass

    def before_ref_log_prob(self, h: Handles, batch, metrics: dict) -> None:
        pass

    def after_advantage(self, h: Handles, batch, metrics: dict) -> None:
        pass

    def update_actor(self, h: Handles, batch, metrics: dict) -> bool:
        return False

    def after_update_actor(self, h: Handles, batch, metrics: dict) -> None:
        pass

    def metrics(self, h: Handles, batch, metrics: dict) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def save(self, h: Handles, folder: str) -> None:
        pass

    def load(self, h: Handles, folder: str) -> None:
        pass


def register_stage(cls: type[Stage]) -> type[Stage]:
    """Class decorator: add ``cls`` to :data:`STAGES` under ``cls.name``.

    Raises:
        ValueError: no name, or another class already registered under it.
    """
    if not cls.name:
        raise ValueError(f"{cls.__name__}: a stage needs a name")
    other = STAGES.get(cls.name)
    if other is not None and other.__qualname__ != cls.__qualname__:
        raise ValueError(f"stage {cls.name!r} is already registered by {other.__module__}.{other.__qualname__}")
    STAGES[cls.name] = cls
    return cls


def load_stages(extra: Iterable[str] = ()) -> list[type[Stage]]:
    """Import the built-in stage modules and ``extra`` ones; returns every registered class
    in :data:`ORDER`."""
    for module in (*BUILTIN, *extra):
        importlib.import_module(module)
    return sorted(STAGES.values(), key=lambda c: (c.order, c.name))


def extra_modules(config: Any) -> list[str]:
    """The ``stages.extra`` config list (modules of out-of-tree stages)."""
    node = config.get("stages") if config is not None else None
    return [str(m) for m in ((node or {}).get("extra") or [])]


def build_stages(config: Any) -> list[Stage]:
    """The enabled stages of ``config``, constructed, in :data:`ORDER`.

    Raises:
        ValueError: a stage's config node is invalid (names the key).
    """
    out = []
    for cls in load_stages(extra_modules(config)):
        cfg = cls.load_config(config)
        if cls.enabled(cfg, config):
            out.append(cls(cfg, config))
    return out


def enabled_stage_classes(config: Any) -> list[type[Stage]]:
    """The classes of the enabled stages (for start-up checks before Ray starts)."""
    return [cls for cls in load_stages(extra_modules(config)) if cls.enabled(cls.load_config(config), config)]


#: Documented order (``Stage.order``): DOTS picks prompts (10), rollout replay adds replayed
#: groups (20), preference turns groups into pairs and replaces the update (30), reward
#: metrics read the fresh rows last (90).
ORDER = {"dots": 10, "rollout_replay": 20, "preference": 30, "reward_metrics": 90}
