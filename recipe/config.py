"""This project's configuration: errors, paths, one validated dataclass per config node it
adds to verl's (``group_filter``, ``replay``, ``dots``, ``preference``, ``lorr``), and the
start-up checks across nodes.

Every node is a :class:`ConfigNode` dataclass: ``Node.from_config(x)`` takes a dict, an
omegaconf ``DictConfig``, an instance or None (defaults), refuses unknown keys (all named)
and validates each field by the :func:`rule` in its metadata, so every error names the key
at fault (``replay.capacity must be an integer > 0, got 0``). Cross-field rules of one node
live in its ``check()``; rules across nodes and verl's own keys live in
:func:`check_config`, :func:`configure_replay` and :func:`configure_preference`, which
``recipe.main`` runs before Ray starts.

This module imports nothing of the project except :mod:`recipe.algos` lookups done lazily
(the preference-loss registry), so algorithms, stages and tools can all use it.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

logger = logging.getLogger(__name__)


class ConfigError(ValueError):
    """The composed config cannot run (the message names the key at fault)."""


# ----------------------------------------------------------------------------- paths


def abs_path(path: str | os.PathLike) -> str:
    """``path`` with ``~`` expanded, made absolute (relative to the working directory)."""
    return str(Path(os.path.expanduser(str(path))).resolve())


def as_files(value: Any) -> list[str]:
    """A data-files value (None, one path, or a list of paths) as a list of strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def setup_paths(cfg) -> None:
    """Make ``paths.artifacts`` absolute and export ``paths.shared`` as ``RECIPE_SHARED_DIR``
    for subprocesses (Ray workers, tools)."""
    cfg.paths.artifacts = abs_path(cfg.paths.artifacts)
    if cfg.paths.get("shared"):
        os.environ["RECIPE_SHARED_DIR"] = abs_path(cfg.paths.shared)


# ----------------------------------------------------------------------------- the validation helper


def is_int(v: Any) -> bool:
    """An integer that is not a bool (numpy integers included)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def is_real(v: Any) -> bool:
    """A finite real number that is not a bool (numpy numbers included)."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_)) \
        and math.isfinite(v)


def is_bool(v: Any) -> bool:
    """A Python or numpy bool."""
    return isinstance(v, (bool, np.bool_))


_KINDS: dict[str, tuple[Callable[[Any], bool], Callable[[Any], Any], str]] = {
    "bool": (is_bool, bool, "true or false"),
    "int": (is_int, int, "an integer"),
    "real": (is_real, float, "a number"),
    "str": (lambda v: isinstance(v, str) and bool(v), str, "a non-empty string"),
}


def rule(kind: str, ok: Callable[[Any], bool] | None = None, what: str | None = None, *,
         choices: tuple | None = None, optional: bool = False) -> dict:
    """Field metadata for :class:`ConfigNode` validation.

    Args:
        kind: "bool", "int", "real" (finite float) or "str" (non-empty); the value is
            coerced to that Python type.
        ok: extra predicate on the coerced value (e.g. ``lambda v: v >= 1``).
        what: how the message describes a valid value (e.g. "an integer >= 1").
        choices: the allowed values (message: "one of (...)").
        optional: None is allowed (and kept).

    Returns:
        ``{"rule": ...}`` for ``dataclasses.field(metadata=...)``.
    """
    return {"rule": (kind, ok, what, choices, optional)}


def check_value(prefix: str, key: str, value: Any, kind: str, ok: Callable[[Any], bool] | None = None,
                what: str | None = None, choices: tuple | None = None, optional: bool = False) -> Any:
    """Validate and coerce one value (the one helper every node uses).

    Raises:
        ValueError: ``"{prefix}.{key} must be {what}, got {value!r}"``.
    """
    if value is None and optional:
        return None
    test, coerce, default_what = _KINDS[kind]
    if choices is not None:
        what = what or f"one of {choices}"
        good = test(value) and value in choices
    else:
        what = what or default_what
        good = test(value) and (ok is None or ok(coerce(value)))
    if not good:
        tail = " or null" if optional else ""
        raise ValueError(f"{prefix}.{key} must be {what}{tail}, got {value!r}")
    return coerce(value)


def to_mapping(node: Any, prefix: str) -> Mapping[str, Any]:
    """A config node as a plain mapping (omegaconf nodes resolved).

    Raises:
        ValueError: ``node`` is not a mapping (names ``prefix``).
    """
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    if not isinstance(node, Mapping):
        raise ValueError(f"{prefix} must be a mapping or null, got {type(node).__name__}")
    return node


class ConfigNode:
    """Mix-in of every config dataclass: :meth:`from_config` and rule-driven validation.

    Subclasses are dataclasses with ``PREFIX`` (the config path, named in errors), fields
    whose metadata holds a :func:`rule` (fields without one, e.g. nested nodes, are left to
    ``check``), and optionally ``check()`` for cross-field rules.
    """

    PREFIX: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            spec = f.metadata.get("rule")
            if spec is not None:
                kind, ok, what, choices, optional = spec
                value = check_value(self.PREFIX, f.name, getattr(self, f.name), kind, ok, what, choices, optional)
                object.__setattr__(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Cross-field rules (none by default)."""

    @classmethod
    def from_config(cls, node: Any):
        """Build from a dict, an omegaconf DictConfig, an instance or None (defaults).

        Raises:
            ValueError: unknown keys (all named, ``{PREFIX}.<key>``) or a bad value.
        """
        if node is None:
            return cls()
        if isinstance(node, cls):
            return node
        node = to_mapping(node, cls.PREFIX)
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in node if k not in known)
        if unknown:
            raise ValueError(f"unknown option(s) {', '.join(cls.PREFIX + '.' + k for k in unknown)}; "
                             f"known: {sorted(known)}")
        return cls(**node)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Field name -> default value (for docs and config-file parity tests)."""
        out = {}
        for f in fields(cls):
            if f.default is not MISSING:
                out[f.name] = f.default
            elif f.default_factory is not MISSING:  # type: ignore[misc]
                out[f.name] = f.default_factory()  # type: ignore[misc]
        return out


def _positive(v) -> bool:
    return v > 0


def _at_least_one(v) -> bool:
    return v >= 1


def _unit(v) -> bool:
    return 0.0 <= v <= 1.0


# ----------------------------------------------------------------------------- group_filter

FILTER_MODES = ("drop", "refill")


@dataclass
class GroupFilterConfig(ConfigNode):
    """The ``group_filter`` node: which groups to drop, and what to do about the missing ones
    (Minimalist paper, arXiv 2504.11343, Reinforce-Rej; DAPO's dynamic sampling for refill).

    Attributes:
        drop_all_correct: drop groups whose responses are all correct (acc == 1).
        drop_all_wrong: drop groups whose responses are all wrong (acc == 0); the paper's
            largest single gain.
        band: keep only groups with lo <= acc <= hi (inclusive); None = no band.
        mode: "drop" = train on what is left (Minimalist paper); "refill" = generate more
            prompts until the batch is full (DAPO dynamic sampling).
        max_gen_rounds: refill mode: generation rounds per step, the first one included.
        metric: ``reward_extra_info`` key with per-response correctness in [0, 1].
        oversample: refill mode: ask for ceil(missing * oversample) new prompts.
    """

    PREFIX: ClassVar[str] = "group_filter"

    drop_all_correct: bool = field(default=False, metadata=rule("bool"))
    drop_all_wrong: bool = field(default=False, metadata=rule("bool"))
    band: tuple[float, float] | None = None
    mode: str = field(default="drop", metadata=rule("str", choices=FILTER_MODES))
    max_gen_rounds: int = field(default=4, metadata=rule("int", _at_least_one, "an integer >= 1"))
    metric: str = field(default="acc", metadata=rule("str"))
    oversample: float = field(default=1.0, metadata=rule("real", _at_least_one, "a number >= 1"))

    def check(self) -> None:
        if self.band is None:
            return
        bad = f"{self.PREFIX}.band must be two numbers [lo, hi] with 0 <= lo <= hi <= 1, or null, got {self.band!r}"
        if isinstance(self.band, (str, bytes, Mapping)):
            raise ValueError(bad)
        try:
            band = list(self.band)
        except TypeError:
            raise ValueError(bad) from None
        if len(band) != 2 or not all(is_real(v) for v in band) or not 0.0 <= band[0] <= band[1] <= 1.0:
            raise ValueError(bad)
        self.band = (float(band[0]), float(band[1]))

    @property
    def enabled(self) -> bool:
        """True when some group can be dropped."""
        return self.drop_all_correct or self.drop_all_wrong or self.band is not None


# ----------------------------------------------------------------------------- replay

CORRECTIONS = ("plain", "decoupled", "none")
#: Which rows verl's token-level weights reach with ``correction=decoupled``.
CORRECTION_ROWS = ("replayed", "all")


def replay_fresh_count(fresh_fraction: float, batch_groups: int) -> int:
    """Fresh groups of a B-group step once replay runs: max(1, floor(delta * B + 0.5)) (half
    rounds up), at most B (:func:`recipe.algos.rollout_replay.fresh_count`)."""
    return min(batch_groups, max(1, math.floor(fresh_fraction * batch_groups + 0.5)))


@dataclass
class ReplayConfig(ConfigNode):
    """The ``replay`` node: rollout replay (DOTS + RR paper, arXiv 2506.05316, §4).

    Attributes:
        enable: replay at all; False = every step all fresh (plain GRPO).
        capacity: C, absolute buffer size in groups (the oldest group is evicted); null:
            ``capacity_ratio`` sizes it. Exactly one of the two is set.
        capacity_ratio: C = ceil(ratio x fresh groups per step), the fresh groups being
            ``round(fresh_fraction x data.train_batch_size)``. Default 2.0: the public code's
            ``buffer_size`` 512 with 256 fresh groups per step (the paper: C = 256-512 with 256
            fresh groups, ratio 1-2). Keeps the replayed groups 1-2 steps old whatever the batch.
        fresh_fraction: delta in (0, 1], fraction of the B groups of a step generated fresh (0.5).
        warmup_steps: the first mu steps are all fresh (public code: its first selection round
            of mu = 2 steps); replay starts at step ``warmup_steps + 1`` at the earliest.
        store_only_mixed: store only groups with 0 < mean correctness < 1 (paper).
        dedup_by_prompt: a new group of a stored prompt replaces the old one (public code).
        correction: off-policy correction of replayed rows: "plain" (paper), "decoupled"
            (public code) or "none".
        correction_rows: with ``correction=decoupled``, the rows verl's token-level weights
            reach: "replayed" (public code: fresh rows weight exactly 1) or "all" (fresh rows
            also get pi_old / pi_rollout, verl's rollout-engine mismatch correction).
        truncation: c >= 1 caps the behaviour weight pi_old / mu (None = no cap, as paper/code).
        reuse_advantages: replayed groups keep the advantages stored with them (paper) instead of
            recomputed ones (identical for group-relative estimators such as GRPO).
        seed: seed of the sampling generator.
        metric: ``reward_extra_info`` key with per-response correctness in [0, 1].

    Raises:
        ValueError: a bad value, or both / neither of ``capacity`` and ``capacity_ratio`` set.
    """

    PREFIX: ClassVar[str] = "replay"

    enable: bool = field(default=False, metadata=rule("bool"))
    capacity: int | None = field(default=None, metadata=rule("int", _positive, "an integer > 0", optional=True))
    capacity_ratio: float | None = field(default=2.0, metadata=rule("real", _positive, "a number > 0",
                                                                    optional=True))
    fresh_fraction: float = field(default=0.5, metadata=rule("real", lambda v: 0.0 < v <= 1.0, "in (0, 1]"))
    warmup_steps: int = field(default=2, metadata=rule("int", lambda v: v >= 0, "an integer >= 0"))
    store_only_mixed: bool = field(default=True, metadata=rule("bool"))
    dedup_by_prompt: bool = field(default=True, metadata=rule("bool"))
    correction: str = field(default="decoupled", metadata=rule("str", choices=CORRECTIONS))
    correction_rows: str = field(default="replayed", metadata=rule("str", choices=CORRECTION_ROWS))
    truncation: float | None = field(default=None, metadata=rule("real", _at_least_one, "a number >= 1",
                                                                 optional=True))
    reuse_advantages: bool = field(default=True, metadata=rule("bool"))
    seed: int = field(default=0, metadata=rule("int"))
    metric: str = field(default="acc", metadata=rule("str"))

    def check(self) -> None:
        if self.capacity is not None and self.capacity_ratio is not None:
            raise ValueError(f"replay.capacity={self.capacity} and replay.capacity_ratio={self.capacity_ratio} are "
                             "both set; keep one (replay.capacity_ratio=null for an absolute size)")
        if self.capacity is None and self.capacity_ratio is None:
            raise ValueError("replay.capacity and replay.capacity_ratio are both null; set one "
                             "(replay.capacity_ratio=2.0: C = 2 x the fresh groups per step)")
        if self.correction_rows == "all" and self.correction != "decoupled":
            raise ValueError(f"replay.correction_rows=all puts verl's token-level weights on every row and needs "
                             f"replay.correction=decoupled, got replay.correction={self.correction}")

    def buffer_capacity(self, batch_groups: int | None) -> int:
        """C in groups: ``capacity``, else ceil(``capacity_ratio`` x fresh groups per step).

        Args:
            batch_groups: B, groups (prompts) per step (``data.train_batch_size``); needed
                only with ``capacity_ratio``.

        Raises:
            ValueError: ``capacity_ratio`` without ``batch_groups`` (an integer >= 1).
        """
        if self.capacity is not None:
            return int(self.capacity)
        if not is_int(batch_groups) or batch_groups < 1:
            raise ValueError(f"replay.capacity_ratio={self.capacity_ratio} sizes the buffer from the groups per "
                             f"step (data.train_batch_size), got {batch_groups!r}")
        n_fresh = replay_fresh_count(self.fresh_fraction, int(batch_groups))
        return max(1, math.ceil(self.capacity_ratio * n_fresh - 1e-9))


# ----------------------------------------------------------------------------- dots

IDENTITY_TEMPERATURE = 0.1


@dataclass
class DotsConfig(ConfigNode):
    """The ``dots`` node (defaults: the DOTS + RR paper's, arXiv 2506.05316 §3, PAPERS.md §2).

    Attributes:
        enable: turn DOTS on.
        every: mu, steps between reference rounds (paper 2).
        ref_size: K, reference questions per round (paper 256); null (default): sized from
            the batch by ``reference_ratio`` (:func:`dots_reference_size`).
        reference_ratio: reference rollouts per round / fresh training rollouts of the
            ``every`` steps it serves, used when ``ref_size`` is null (public code: 0.5).
        ref_samples: G, rollouts per reference question (paper 8).
        holdout_size: reference questions held out each round and predicted from the others
            to report ``dots/pred_pearson`` (0: off; else >= 3; the reference set must keep
            ``DOTS_MIN_FIT`` more).
        selection: ``per_round`` (public code: each round samples from the whole training
            set) or ``per_epoch`` (no question repeats before every question was served).
        tau: selection temperature (paper 1e-3: "closest to 0.5 first").
        target: preferred difficulty (0.5 maximises p(1-p), the expected gradient signal).
        encoder: HF model path for the embeddings (null: the policy's base model).
        adapter: path of an adapter from ``python -m recipe.dots train-adapter`` (null: identity).
        temperature: identity projection only: softmax(cosine / temperature) over the
            reference set (embeddings standardised per dimension over the training set).
        cache_dir: where embeddings are cached.
        max_length, batch_size: embedding tokenisation / batch size.
        metric: ``reward_extra_info`` key with per-response correctness in [0, 1].
        seed: seeds the reference draws and the selection.
        rounds_file: JSONL log of every reference round (the adapter's training data; null: off).
    """

    PREFIX: ClassVar[str] = "dots"

    enable: bool = field(default=False, metadata=rule("bool"))
    every: int = field(default=2, metadata=rule("int", _at_least_one, "an integer >= 1"))
    ref_size: int | None = field(default=None, metadata=rule("int", lambda v: v >= 2, "an integer >= 2",
                                                             optional=True))
    reference_ratio: float = field(default=0.5, metadata=rule("real", _positive, "a number > 0"))
    ref_samples: int = field(default=8, metadata=rule("int", _at_least_one, "an integer >= 1"))
    holdout_size: int = field(default=32, metadata=rule("int", lambda v: v == 0 or v >= 3, "0 or an integer >= 3"))
    selection: str = field(default="per_round", metadata=rule("str", choices=("per_round", "per_epoch")))
    tau: float = field(default=1e-3, metadata=rule("real", _positive, "a number > 0"))
    target: float = field(default=0.5, metadata=rule("real", _unit, "in [0, 1]"))
    encoder: str | None = field(default=None, metadata=rule("str", optional=True))
    adapter: str | None = field(default=None, metadata=rule("str", optional=True))
    temperature: float = field(default=IDENTITY_TEMPERATURE, metadata=rule("real", _positive, "a number > 0"))
    cache_dir: str = field(default="artifacts/cache/dots", metadata=rule("str"))
    max_length: int = field(default=512, metadata=rule("int", _positive, "an integer > 0"))
    batch_size: int = field(default=32, metadata=rule("int", _positive, "an integer > 0"))
    metric: str = field(default="acc", metadata=rule("str"))
    seed: int = field(default=0, metadata=rule("int"))
    rounds_file: str | None = field(default=None, metadata=rule("str", optional=True))

    def check(self) -> None:
        if self.ref_size is not None:
            check_dots_reference(self.ref_size, self.holdout_size, "dots.ref_size")


#: References a round keeps besides its ``dots.holdout_size`` held-out questions.
DOTS_MIN_FIT = 4


def check_dots_reference(ref_size: int, holdout_size: int, origin: str) -> None:
    """The reference set must hold ``holdout_size`` + :data:`DOTS_MIN_FIT` questions when held-out
    Pearson is on. Raises ConfigError naming ``origin`` (the key or arithmetic that set K)."""
    if holdout_size and ref_size < holdout_size + DOTS_MIN_FIT:
        raise ConfigError(
            f"{origin}: K = {ref_size} reference questions cannot hold dots.holdout_size={holdout_size} held-out "
            f"questions plus {DOTS_MIN_FIT} to predict them from; need K >= {holdout_size + DOTS_MIN_FIT}: raise "
            "dots.ref_size (or dots.reference_ratio / the batch), lower dots.holdout_size, or set it to 0 to turn "
            "the per-round Pearson off")


def dots_reference_size(cfg) -> int:
    """K of every reference round: ``dots.ref_size``, or, when null, :func:`recipe.algos.dots.reference_size`
    of ``dots.reference_ratio``, ``dots.every``, the fresh prompts per step (``data.train_batch_size``,
    times ``replay.fresh_fraction`` rounded half up when replay is on), ``actor_rollout_ref.rollout.n``
    and ``dots.ref_samples``, raised (with a warning naming the resulting ratio) to
    ``dots.holdout_size`` + :data:`DOTS_MIN_FIT` when smaller, so the held-out Pearson always has
    its questions; the run logs the real cost as ``dots/reference_ratio``.

    Raises:
        ConfigError: an explicit ``dots.ref_size`` too small for ``dots.holdout_size``
            (:func:`check_dots_reference`).
    """
    from recipe.algos.dots import reference_size

    dots = load_node(cfg, "dots")
    if dots.ref_size is not None:
        return dots.ref_size
    batch, n = int(cfg.data.train_batch_size), int(cfg.actor_rollout_ref.rollout.n)
    replay = load_node(cfg, "replay")
    fresh = max(1, int(math.floor(replay.fresh_fraction * batch + 0.5))) if replay.enable else batch
    k = max(2, reference_size(dots.reference_ratio, dots.every, fresh, n, dots.ref_samples))
    floor = dots.holdout_size + DOTS_MIN_FIT if dots.holdout_size else 2
    if k < floor:
        logger.warning(
            "dots.ref_size=null: K = ceil(dots.reference_ratio %s x dots.every %d x %d fresh prompts per step x "
            "rollout.n %d / dots.ref_samples %d) = %d is below dots.holdout_size %d + %d; using K = %d, i.e. "
            "reference rollouts = %.2f x the fresh ones (see dots/reference_ratio); a larger batch restores the ratio",
            dots.reference_ratio, dots.every, fresh, n, dots.ref_samples, k, dots.holdout_size, DOTS_MIN_FIT, floor,
            floor * dots.ref_samples / (dots.every * fresh * n))
        k = floor
    return k


# ----------------------------------------------------------------------------- preference / lorr

PAIR_MODES = ("best_worst", "random", "all")
REFERENCES = ("iteration_start", "initial")
RESET_UNITS = ("iterations", "epochs", "replays")


def _valid_regex(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


@dataclass(frozen=True)
class PreferenceIterationConfig(ConfigNode):
    """``preference.iteration``: what one iteration of iterative DPO / LoRR is
    (:func:`recipe.algos.lorr.schedule`).

    Attributes:
        rollout_steps: >= 1, training steps whose rollouts (all by the iteration-start policy:
            no update in between) form one iteration's pairs; the last of them trains.
        mini_batch_pairs: pairs per optimizer step (rounded down to whole micro-batches on every
            rank); null = all of the iteration's pairs in one optimizer step per epoch.
        shuffle: shuffle the pairs before every epoch (seeded by ``preference.seed``).
        max_iterations: stop after this many iterations (reuse iterations included): the steps
            after it generate and train nothing; null = as many as ``trainer.total_training_steps``
            allows (an unfinished last iteration trains nothing).
    """

    PREFIX: ClassVar[str] = "preference.iteration"

    rollout_steps: int = field(default=1, metadata=rule("int", _at_least_one, "an integer >= 1"))
    mini_batch_pairs: int | None = field(default=None, metadata=rule("int", _at_least_one, "an integer >= 1",
                                                                     optional=True))
    shuffle: bool = field(default=True, metadata=rule("bool"))
    max_iterations: int | None = field(default=None, metadata=rule("int", _at_least_one, "an integer >= 1",
                                                                   optional=True))


@dataclass(frozen=True)
class PreferenceConfig(ConfigNode):
    """The ``preference`` node (iterative DPO pairs and loss; Minimalist paper, PAPERS.md §1).

    Attributes:
        enable: train with preference pairs (``recipe=iterative_dpo`` / ``lorr_dpo``).
        loss: registered preference loss (:mod:`recipe.algos.preference`): "dpo" (default),
            "ipo", "simpo".
        beta: > 0, DPO / IPO / SimPO beta (SimPO's paper uses 2.0 to 2.5).
        label_smoothing: in [0, 0.5), conservative DPO / SimPO (Online-DPO-R1 uses 0.1); must be
            0 for ipo.
        simpo_gamma_beta_ratio: >= 0, SimPO's gamma / beta.
        pairs: pair construction, one of :data:`PAIR_MODES` ("best_worst", paper).
        reference: "iteration_start" (reference = the policy at the start of the iteration, i.e.
            the previous iterate, paper) or "initial" (the initial model throughout).
        length_normalize: feed length-averaged log-probs to the loss; None = the loss's default
            (dpo: sums; ipo, simpo: averages).
        seed: seed of the ``random`` pair generator.
        score_key: ``reward_extra_info`` key whose per-response value scores responses for
            pairing; None = the sequence reward (sum of the token-level scores).
        iteration: :class:`PreferenceIterationConfig` (a mapping is converted): rollout steps
            per iteration, mini-batches of the training phase. (``iteration_steps``, the former
            reference-refresh period, is gone: the reference is refreshed once per iteration.)
    """

    PREFIX: ClassVar[str] = "preference"

    enable: bool = field(default=False, metadata=rule("bool"))
    loss: str = "dpo"
    beta: float = field(default=0.1, metadata=rule("real", _positive, "> 0"))
    label_smoothing: float = field(default=0.0, metadata=rule("real", lambda v: 0.0 <= v < 0.5, "in [0, 0.5)"))
    simpo_gamma_beta_ratio: float = field(default=0.5, metadata=rule("real", lambda v: v >= 0, ">= 0"))
    pairs: str = field(default="best_worst", metadata=rule("str", choices=PAIR_MODES))
    reference: str = field(default="iteration_start", metadata=rule("str", choices=REFERENCES))
    length_normalize: bool | None = field(default=None, metadata=rule("bool", optional=True))
    seed: int = field(default=0, metadata=rule("int"))
    score_key: str | None = field(default=None, metadata=rule("str", optional=True))
    iteration: PreferenceIterationConfig = field(default_factory=PreferenceIterationConfig)

    @classmethod
    def from_config(cls, node: Any):
        if node is not None and not isinstance(node, cls) and "iteration_steps" in to_mapping(node, cls.PREFIX):
            raise ValueError("preference.iteration_steps was replaced by preference.iteration.rollout_steps "
                             "(steps whose rollouts form one iteration; the reference is refreshed once per "
                             "iteration)")
        return super().from_config(node)

    def check(self) -> None:
        from recipe.algos.preference import PREFERENCE_LOSSES

        object.__setattr__(self, "iteration", PreferenceIterationConfig.from_config(self.iteration))
        check_value(self.PREFIX, "loss", self.loss, "str", choices=tuple(sorted(PREFERENCE_LOSSES)))
        if self.loss == "ipo" and self.label_smoothing != 0.0:
            raise ValueError(f"preference.label_smoothing must be 0 with preference.loss=ipo, "
                             f"got {self.label_smoothing!r}")

    @property
    def spec(self):
        """The registered :class:`recipe.algos.preference.PreferenceLossSpec` of ``loss``."""
        from recipe.algos.preference import get_preference_loss

        return get_preference_loss(self.loss)

    @property
    def needs_reference(self) -> bool:
        """Whether reference log-probs must be computed (False for simpo)."""
        return self.spec.needs_reference

    @property
    def length_normalized(self) -> bool:
        """The resolved ``length_normalize`` (the loss's default when null)."""
        return self.spec.length_normalized if self.length_normalize is None else self.length_normalize

    def loss_kwargs(self) -> dict[str, float]:
        """Hyper-parameters for ``spec.fn``, restricted to the names in its signature."""
        import inspect

        offered = {"beta": self.beta, "label_smoothing": self.label_smoothing,
                   "gamma_beta_ratio": self.simpo_gamma_beta_ratio}
        params = inspect.signature(self.spec.fn).parameters
        return {k: v for k, v in offered.items() if k in params}


@dataclass(frozen=True)
class LorrResetConfig(ConfigNode):
    """``lorr.reset``: periodic shrink-and-perturb reset (LoRR, PAPERS.md §3).

    Attributes:
        enable: reset at all.
        alpha: in [0, 1], theta <- alpha * theta + (1 - alpha) * theta_0 (paper 0.5).
        pattern: regular expression searched in parameter names (paper: MLP down projections).
        every: >= 1, reset after every ``every`` units (:func:`recipe.algos.lorr.reset_epochs`).
        unit: "iterations" (after the epochs of every ``every``-th iteration; default, every 1:
            after each iteration) or "epochs" (alias "replays": after every ``every``-th epoch
            over the run, possibly between an iteration's epochs).
        reset_optimizer: also clear the optimizer state of the reset parameters.
    """

    PREFIX: ClassVar[str] = "lorr.reset"

    enable: bool = field(default=True, metadata=rule("bool"))
    alpha: float = field(default=0.5, metadata=rule("real", _unit, "a number in [0, 1]"))
    pattern: str = field(default="down_proj", metadata=rule("str", _valid_regex, "a valid regular expression"))
    every: int = field(default=1, metadata=rule("int", _at_least_one, "an integer >= 1"))
    unit: str = field(default="iterations", metadata=rule("str", choices=RESET_UNITS))
    reset_optimizer: bool = field(default=False, metadata=rule("bool"))


@dataclass(frozen=True)
class LorrReuseConfig(ConfigNode):
    """``lorr.reuse``: train on the first-collected pairs again after a reset (LoRR, PAPERS.md §3).

    Attributes:
        enable: reuse at all.
        rollout_ratio: in [0, 1], probability of fresh rollouts (instead of reusing the initial
            pairs: all of iteration 1's pairs) for an iteration once a reset has happened.
    """

    PREFIX: ClassVar[str] = "lorr.reuse"

    enable: bool = field(default=True, metadata=rule("bool"))
    rollout_ratio: float = field(default=0.5, metadata=rule("real", _unit, "a number in [0, 1]"))


@dataclass(frozen=True)
class LorrSftConfig(ConfigNode):
    """``lorr.sft``: hybrid objective L_pref + lambda_k * NLL(chosen), lambda_k = min(cap, growth * k).

    Attributes:
        enable: add the SFT term at all (off: lambda = 0).
        growth: >= 0, lambda increase per replay index.
        cap: >= 0, maximum lambda (paper 0.5).
    """

    PREFIX: ClassVar[str] = "lorr.sft"

    enable: bool = field(default=True, metadata=rule("bool"))
    growth: float = field(default=0.25, metadata=rule("real", lambda v: v >= 0, "a number >= 0"))
    cap: float = field(default=0.5, metadata=rule("real", lambda v: v >= 0, "a number >= 0"))


@dataclass(frozen=True)
class LorrConfig(ConfigNode):
    """The ``lorr`` node (LoRR, arXiv 2508.06412, PAPERS.md §3).

    Attributes:
        enable: use LoRR; False = plain iterative DPO (see :meth:`effective`).
        replays: L >= 1, epochs over every iteration's pairs (paper 3).
        reset: :class:`LorrResetConfig` (a mapping is converted).
        reuse: :class:`LorrReuseConfig`.
        sft: :class:`LorrSftConfig`.
    """

    PREFIX: ClassVar[str] = "lorr"

    enable: bool = field(default=False, metadata=rule("bool"))
    replays: int = field(default=3, metadata=rule("int", _at_least_one, "an integer >= 1"))
    reset: LorrResetConfig = field(default_factory=LorrResetConfig)
    reuse: LorrReuseConfig = field(default_factory=LorrReuseConfig)
    sft: LorrSftConfig = field(default_factory=LorrSftConfig)

    def check(self) -> None:
        object.__setattr__(self, "reset", LorrResetConfig.from_config(self.reset))
        object.__setattr__(self, "reuse", LorrReuseConfig.from_config(self.reuse))
        object.__setattr__(self, "sft", LorrSftConfig.from_config(self.sft))

    @classmethod
    def disabled(cls) -> LorrConfig:
        """Plain iterative DPO: enable off, one replay, no reset, no reuse, no SFT term."""
        return cls(enable=False, replays=1, reset=LorrResetConfig(enable=False), reuse=LorrReuseConfig(enable=False),
                   sft=LorrSftConfig(enable=False))

    def effective(self) -> LorrConfig:
        """``self`` when enabled, else :meth:`disabled` (the trainer should read this one)."""
        return self if self.enable else self.disabled()

    def sft_lambda(self, k: int) -> float:
        """lambda_k of the effective config: :func:`recipe.algos.lorr.sft_weight` when LoRR and
        its SFT term are on, else 0."""
        from recipe.algos.lorr import sft_weight

        eff = self.effective()
        return sft_weight(k, eff.sft.growth, eff.sft.cap) if eff.sft.enable else 0.0


#: The config nodes this project adds to verl's, by top-level key.
NODES: dict[str, type[ConfigNode]] = {
    "group_filter": GroupFilterConfig,
    "replay": ReplayConfig,
    "dots": DotsConfig,
    "preference": PreferenceConfig,
    "lorr": LorrConfig,
}


def load_node(cfg, name: str, cls: type[ConfigNode] | None = None) -> Any:
    """``NODES[name].from_config(cfg.<name>)`` with a :class:`ConfigError` naming the key."""
    cls = cls or NODES[name]
    try:
        return cls.from_config(cfg.get(name))
    except ValueError as e:
        raise ConfigError(str(e)) from None


# ----------------------------------------------------------------------------- checks across nodes


def check_config(cfg) -> None:
    """Start-up checks that verl does not make itself, each naming the keys at fault.

    Raises:
        ConfigError: on an incompatible setting.
    """
    rollout = cfg.actor_rollout_ref.rollout
    if rollout.name == "hf" and cfg.trainer.device != "cpu":
        raise ConfigError(
            f"trainer.device={cfg.trainer.device}: actor_rollout_ref.rollout.name=hf is the CPU-only rollout; "
            "use actor_rollout_ref.rollout.name=vllm (device=gpu sets it)"
        )
    if cfg.trainer.device == "cpu" and rollout.name in ("vllm", "sglang", "trtllm"):
        raise ConfigError(
            f"trainer.device=cpu: actor_rollout_ref.rollout.name={rollout.name} needs a GPU; "
            "on CPU use actor_rollout_ref.rollout.name=hf (device=cpu sets it)"
        )
    gf = load_node(cfg, "group_filter")
    if gf.enabled and rollout.n < 2:
        raise ConfigError(
            "group_filter (drop_all_correct / drop_all_wrong / band) needs groups of several responses: "
            f"actor_rollout_ref.rollout.n={rollout.n}; set it >= 2 or turn the filter off"
        )
    sampler = cfg.trainer.v1.get("sampler", {})
    custom = (sampler.get("custom_sampler") or {}).get("path")
    if custom and (cfg.algorithm.get("filter_groups") or {}).get("enable", False):
        raise ConfigError(
            "algorithm.filter_groups.enable=true is verl's DAPO filter, which verl ignores with a custom sampler "
            f"(trainer.v1.sampler.custom_sampler.path={custom}); use group_filter.mode=refill instead"
        )
    if load_node(cfg, "dots").enable:
        dots_reference_size(cfg)  # warns when the batch is too small for reference_ratio and the holdout
    if cfg.algorithm.adv_estimator == "grpo" and rollout.n < 2:
        raise ConfigError(
            "algorithm.adv_estimator=grpo needs groups: set actor_rollout_ref.rollout.n >= 2 "
            f"(got {rollout.n})"
        )


def check_micro_batches(cfg) -> None:
    """Micro-batches must tile each rank's share of a mini-batch (without dynamic batch sizes).

    verl pads a step's batch to whole mini-batches (``ppo_mini_batch_size`` x
    ``rollout.n`` rows) split over the ranks, then asserts that every rank's rows divide by
    each micro-batch size, deep inside a worker. For example PPO (n = 1) on 2 CPU ranks
    gets 4 x 1 / 2 = 2 rows per rank, which micro-batches of 4 cannot tile. Preference
    recipes size their micro-batches per step (:mod:`recipe.stages.preference`) and are
    skipped.

    Raises:
        ConfigError: naming the micro-batch key, its value and the rows per rank.
    """
    if load_node(cfg, "preference").enable:
        return
    aro, trainer = cfg.actor_rollout_ref, cfg.trainer
    world = int(trainer.n_gpus_per_node) * int(trainer.get("nnodes", 1) or 1)
    n = int(aro.rollout.n)
    checks = []
    if not aro.actor.get("use_dynamic_bsz", False):
        rows = int(aro.actor.ppo_mini_batch_size) * n
        keys = ["actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu",
                "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu"]
        if aro.actor.get("use_kl_loss", False) or cfg.algorithm.get("use_kl_in_reward", False):
            keys.append("actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu")
        checks += [(key, "actor_rollout_ref.actor.ppo_mini_batch_size", rows) for key in keys]
    critic = cfg.get("critic") or {}
    if cfg.algorithm.adv_estimator == "gae" and not critic.get("use_dynamic_bsz", False):
        checks.append(("critic.ppo_micro_batch_size_per_gpu", "critic.ppo_mini_batch_size",
                       int(critic.ppo_mini_batch_size) * n))
    from omegaconf import OmegaConf

    for key, mini_key, rows in checks:
        micro = OmegaConf.select(cfg, key)
        if not micro or rows % world:
            continue  # unset (verl's defaults) / verl's own check on the mini-batch split
        per_rank = rows // world
        if per_rank % int(micro):
            raise ConfigError(
                f"{key}={micro} must divide the rows one rank gets per mini-batch: {mini_key} x "
                f"actor_rollout_ref.rollout.n / ranks (trainer.n_gpus_per_node x trainer.nnodes) = "
                f"{rows} / {world} = {per_rank}; set it to a divisor of {per_rank}")


def configure_replay(cfg) -> None:
    """Settings rollout replay needs from verl (``replay.enable``), each named on failure.

    - ``data.gen_batch_size``: the fresh prompts of a step (``round(delta * B)``) and a full
      batch (``B``) are fetched in whole ``gen_batch_size`` chunks; null becomes their gcd.
    - ``replay.correction=decoupled`` runs through verl's ``algorithm.rollout_correction``
      (token-level IS weight pi_old / mu times PPO-clip): ``rollout_is`` becomes ``token``
      and ``rollout_is_threshold`` the truncation (``inf`` for none),
      unless ``rollout_is`` was set explicitly; it needs
      ``actor_rollout_ref.rollout.calculate_log_probs=true``. With ``correction_rows=replayed``
      the stage sets fresh rows' ``rollout_log_probs`` to pi_old so that their weight is exactly 1,
      which ``rollout_is_batch_normalize`` would undo (refused).
    - the buffer must hold a step's replayed groups: C >= B - round(delta * B), else replay
      never starts.

    Raises:
        ConfigError: on an incompatible setting.
    """
    from omegaconf import open_dict

    rcfg = load_node(cfg, "replay")
    if not rcfg.enable:
        return
    from recipe.algos.rollout_replay import fresh_count

    batch = int(cfg.data.train_batch_size)
    n_fresh = fresh_count(rcfg.fresh_fraction, batch)
    capacity = rcfg.buffer_capacity(batch)
    if capacity < batch - n_fresh:
        what = (f"replay.capacity={rcfg.capacity}" if rcfg.capacity is not None else
                f"replay.capacity_ratio={rcfg.capacity_ratio} x {n_fresh} fresh groups = {capacity}")
        raise ConfigError(f"{what} cannot hold the {batch - n_fresh} replayed groups of a step "
                          f"(data.train_batch_size={batch}, replay.fresh_fraction={rcfg.fresh_fraction}): "
                          "replay would never start; raise it")
    gen = cfg.data.get("gen_batch_size", None)
    with open_dict(cfg):
        if gen is None:
            cfg.data.gen_batch_size = math.gcd(batch, n_fresh)
        elif n_fresh % int(gen) or batch % int(gen):
            raise ConfigError(
                f"replay.fresh_fraction={rcfg.fresh_fraction} gives {n_fresh} fresh prompts of "
                f"data.train_batch_size={batch}; data.gen_batch_size={gen} must divide both (null: automatic)"
            )
        if rcfg.correction == "decoupled":
            rc = cfg.algorithm.rollout_correction
            if not cfg.actor_rollout_ref.rollout.get("calculate_log_probs", False):
                raise ConfigError(
                    "replay.correction=decoupled needs the rollout's log-probs: "
                    "set actor_rollout_ref.rollout.calculate_log_probs=true"
                )
            if rc.get("bypass_mode", False):
                raise ConfigError(
                    "replay.correction=decoupled recomputes pi_old: algorithm.rollout_correction.bypass_mode must be false"
                )
            if rcfg.correction_rows == "replayed" and rc.get("rollout_is_batch_normalize", False):
                raise ConfigError(
                    "replay.correction_rows=replayed keeps fresh rows at weight 1, which "
                    "algorithm.rollout_correction.rollout_is_batch_normalize=true rescales: set it false "
                    "or replay.correction_rows=all"
                )
            if rc.get("rollout_is") is None:
                rc.rollout_is = "token"
                rc.rollout_is_threshold = float(rcfg.truncation) if rcfg.truncation else float("inf")


def configure_preference(cfg) -> None:
    """Settings iterative DPO / LoRR (``preference.enable``) need from verl, each named on failure.

    Raises:
        ConfigError: on an invalid ``preference`` / ``lorr`` node or an incompatible setting.
    """
    pcfg = load_node(cfg, "preference")
    if not pcfg.enable:
        return
    load_node(cfg, "lorr")
    actor = cfg.actor_rollout_ref.actor
    if load_node(cfg, "replay").enable:
        raise ConfigError("preference.enable=true and replay.enable=true: rollout replay is for policy-gradient "
                          "recipes; LoRR's replay is lorr.replays")
    if cfg.actor_rollout_ref.rollout.n < 2:
        raise ConfigError(f"preference pairs need groups: actor_rollout_ref.rollout.n={cfg.actor_rollout_ref.rollout.n};"
                          " set it >= 2")
    if actor.get("shuffle", False):
        raise ConfigError("preference.enable=true: actor_rollout_ref.actor.shuffle must be false "
                          "(pairs sit in consecutive rows)")
    if pcfg.needs_reference and not actor.use_kl_loss and not cfg.algorithm.get("use_kl_in_reward", False):
        raise ConfigError(f"preference.loss={pcfg.loss} needs a reference model: set "
                          "actor_rollout_ref.actor.use_kl_loss=true (verl builds its reference worker then; "
                          "the KL term itself is replaced by the preference loss)")
    lora = (cfg.actor_rollout_ref.model.get("lora") or {}).get("rank", 0) or cfg.actor_rollout_ref.model.get(
        "lora_rank", 0)
    if pcfg.needs_reference and pcfg.reference == "iteration_start" and lora:
        raise ConfigError("preference.reference=iteration_start refreshes a separate reference model; with LoRA "
                          "(actor_rollout_ref.model.lora.rank > 0) the reference is the base model: "
                          "use preference.reference=initial")
    if int(actor.get("ppo_epochs", 1)) != 1:
        logger.warning("actor_rollout_ref.actor.ppo_epochs=%s is not used by preference recipes "
                       "(epochs over an iteration's pairs: lorr.replays)", actor.ppo_epochs)


def check_all(cfg) -> None:
    """Every start-up check of this module, in order (what ``recipe.main`` runs before Ray).

    Raises:
        ConfigError: naming the key at fault.
    """
    for name in NODES:
        load_node(cfg, name)
    check_config(cfg)
    check_micro_batches(cfg)
    configure_replay(cfg)
    configure_preference(cfg)
