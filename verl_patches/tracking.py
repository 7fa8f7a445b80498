"""verl's metrics loggers: the ``file`` logger appends, the ``console`` one can be one short line.

**Appending file logger.** verl 0.9.1's ``FileLogger`` opens its JSONL file with mode ``"wb"``:
a resumed run wipes the metrics of the steps before the crash. The replacement resolves the
path the same way (``VERL_FILE_LOGGER_PATH``, else
``VERL_FILE_LOGGER_ROOT/<project>/<experiment>.jsonl``) and opens it with ``"ab"``, so a
resumed run continues the same file.

**Short console line.** verl's ``console`` backend prints every metric of a step (~120 keys,
~4 KB) on one line. With ``log.short: true`` in the config that verl's trainer hands to
``Tracking`` (a plain dict: ``OmegaConf.to_container(config)``, in the Ray actor that runs the
trainer), :class:`Tracking` swaps that backend for :class:`ShortConsoleLogger`, which prints
:func:`short_line`::

    step 3/10 | reward 0.41 | acc 0.38 | val acc 0.40 | entropy 1.23 | kl 0.0012 | 12.3 s/step

Every other backend (``file``, wandb, tensorboard, ...) still gets every metric. Without a
``log`` node (verl used without this project's config) the console is verl's.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from typing import Any

from ._util import rebind

#: The step's reward: the task score, else the reward after in-reward KL (verl's names).
REWARD_KEYS = ("critic/score/mean", "critic/rewards/mean")
#: The step's accuracy (the reward's ``acc`` entry, averaged by verl).
ACC_KEYS = ("reward/acc",)
#: KL shown as ``kl`` (to the reference, the KL loss) or, without a KL loss, ``ppo_kl``
#: (new policy vs the rollout's old policy).
KL_KEYS = (("actor/kl_loss", "kl"), ("actor/ppo_kl", "ppo_kl"))
ENTROPY_KEY = "actor/entropy"
STEP_TIME_KEY = "timing_s/step"
#: Validation per data source, first family found: verl's core metric (``acc``), this
#: project's ``val/<source>/avg@n`` (the same number), verl's core metric of a reward without
#: ``acc``. The largest n of a source is shown.
VAL_PATTERNS = (
    (re.compile(r"^val-core/(?P<source>.+)/acc/mean@(?P<n>\d+)$"), "val acc"),
    (re.compile(r"^val/(?P<source>.+)/avg@(?P<n>\d+)$"), "val acc"),
    (re.compile(r"^val-core/(?P<source>.+)/reward/mean@(?P<n>\d+)$"), "val reward"),
)


def _number(data: Mapping[str, Any], key: str) -> float | None:
    value = data.get(key)
    if value is None or isinstance(value, (bool, str, bytes)):
        return None
    try:  # int, float, numpy / torch scalars
        return float(value)
    except (TypeError, ValueError):
        return None


def _first(data: Mapping[str, Any], keys) -> float | None:
    for key in keys:
        value = _number(data, key)
        if value is not None:
            return value
    return None


def _validation(data: Mapping[str, Any]) -> tuple[str, dict[str, float]]:
    """``(label, {source: value})`` of the step's validation (see :data:`VAL_PATTERNS`;
    ``val/average`` is not a source)."""
    for pattern, label in VAL_PATTERNS:
        found: dict[str, tuple[int, float]] = {}
        for key in data:
            m = pattern.match(key)
            value = _number(data, key) if m else None
            if value is None or m["source"] == "average":
                continue
            n = int(m["n"])
            if n > found.get(m["source"], (-1, 0.0))[0]:
                found[m["source"]] = (n, value)
        if found:
            return label, {source: value for source, (_, value) in sorted(found.items())}
    return "", {}


def short_line(data: Mapping[str, Any], step: int, total_steps: int | None = None) -> str:
    """One short console line for a step's metrics; keys that are missing are left out.

    Args:
        data: The step's metrics as verl logs them (``{name: number}``).
        step: verl's global step.
        total_steps: ``trainer.total_training_steps`` (``None``: not shown).

    Returns:
        ``"step 3/10 | reward 0.41 | acc 0.38 | val acc 0.40 | entropy 1.23 | kl 0.0012 |
        12.3 s/step"``: reward = :data:`REWARD_KEYS`, acc = :data:`ACC_KEYS` (2 decimals);
        val = validation accuracy (2 decimals; ``val acc gsm8k 0.40 math500 0.22`` with
        several data sources); entropy (3 significant digits); ``kl`` / ``ppo_kl``
        (:data:`KL_KEYS`, 2 significant digits); seconds per step (1 decimal).
    """
    parts = [f"step {step}" + (f"/{total_steps}" if total_steps else "")]
    reward = _first(data, REWARD_KEYS)
    if reward is not None:
        parts.append(f"reward {reward:.2f}")
    acc = _first(data, ACC_KEYS)
    if acc is not None:
        parts.append(f"acc {acc:.2f}")
    label, val = _validation(data)
    if len(val) == 1:
        parts.append(f"{label} {next(iter(val.values())):.2f}")
    elif val:
        parts.append(f"{label} " + " ".join(f"{source} {v:.2f}" for source, v in val.items()))
    entropy = _number(data, ENTROPY_KEY)
    if entropy is not None:
        parts.append(f"entropy {entropy:.3g}")
    for key, label in KL_KEYS:
        kl = _number(data, key)
        if kl is not None:
            parts.append(f"{label} {kl:.2g}")
            break
    seconds = _number(data, STEP_TIME_KEY)
    if seconds is not None and math.isfinite(seconds):
        parts.append(f"{seconds:.1f} s/step")
    return " | ".join(parts)


class ShortConsoleLogger:
    """verl ``console`` backend printing :func:`short_line` (same ``log(data, step)`` API as
    verl's ``LocalLogger``)."""

    def __init__(self, total_steps: int | None = None):
        self.total_steps = total_steps

    def log(self, data: Mapping[str, Any], step: int) -> None:
        print(short_line(data, step, self.total_steps), flush=True)

    def flush(self) -> None:
        pass


def short_console_settings(config: Mapping[str, Any] | None) -> tuple[bool, int | None]:
    """``(log.short, trainer.total_training_steps)`` of the config verl gives ``Tracking``
    (``(False, None)`` without a ``log`` node)."""
    if not isinstance(config, Mapping):
        return False, None
    log = config.get("log")
    short = bool(log.get("short", False)) if isinstance(log, Mapping) else False
    trainer = config.get("trainer")
    total = trainer.get("total_training_steps") if isinstance(trainer, Mapping) else None
    return short, (int(total) if isinstance(total, (int, float)) and total > 0 else None)


def _short_console(cls):
    class Tracking(cls):
        """verl's ``Tracking``; its ``console`` backend is :class:`ShortConsoleLogger` when
        the config says ``log.short: true``."""

        def __init__(self, project_name, experiment_name, default_backend="console", config=None):
            super().__init__(project_name, experiment_name, default_backend=default_backend, config=config)
            short, total = short_console_settings(config)
            if short and "console" in self.logger:
                self.console_logger = self.logger["console"] = ShortConsoleLogger(total)

    Tracking.__qualname__ = cls.__qualname__
    Tracking.__module__ = cls.__module__
    return Tracking


def _appending(cls):
    class AppendingFileLogger(cls):
        """``FileLogger`` whose JSONL file is opened for appending."""

        def __init__(self, project_name: str, experiment_name: str):
            self.project_name = project_name
            self.experiment_name = experiment_name
            self.filepath = os.getenv("VERL_FILE_LOGGER_PATH", None)
            if self.filepath is None:
                root = os.path.expanduser(os.getenv("VERL_FILE_LOGGER_ROOT", "."))
                self.filepath = os.path.join(root, project_name, f"{experiment_name}.jsonl")
            os.makedirs(os.path.dirname(os.path.abspath(self.filepath)), exist_ok=True)
            print(f"Appending metrics to {os.path.abspath(self.filepath)}")
            self.fp = open(self.filepath, "ab", buffering=0)

    AppendingFileLogger.__name__ = "FileLogger"
    return AppendingFileLogger


def apply() -> None:
    """Make ``verl.utils.tracking.FileLogger`` append and ``Tracking`` honour ``log.short``
    (idempotent)."""
    rebind("verl.utils.tracking", "FileLogger", _appending)
    rebind("verl.utils.tracking", "Tracking", _short_console)
