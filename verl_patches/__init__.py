"""What verl 0.9.1 lacks to run this project, as small idempotent patches.

Loaded by verl itself in every process that imports it (driver, task runner, FSDP
workers, agent-loop and reward workers, rollout servers) through the ``verl.plugins``
entry point declared in ``setup.py``. verl swallows plugin errors at DEBUG level, so
the entry-point module :mod:`verl_patches.plugin` calls :func:`load`, which logs its own failures at ERROR with the traceback, records them
(:func:`status`), and ``recipe.main`` refuses to start when a patch failed.

Always applied (cheap, harmless on GPU):
    - ``rollout``: registers the ``hf`` rollout backend (:mod:`verl_patches.hf_rollout`);
    - ``tracking``: verl's JSONL metrics logger appends on resume instead of truncating,
      and its console prints one short line per step with ``log.short``;
    - ``seeding``: every rollout response gets its own sampling seed
      (:mod:`verl_patches.seeding`).

Applied only in CPU mode (``VERL_PLATFORM=cpu``, set by ``device=cpu`` / ``run.sh``):
    - ``platform``: a ``cpu`` platform in verl's platform registry;
    - ``distributed``: ``gloo`` process groups;
    - ``fsdp``: FSDP engine lookup and unpinned CPU offload;
    - ``valuehead``: the PPO critic's value-head model loads with SDPA attention.

Every patch checks that the installed verl is exactly :data:`VERL_VERSION`.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback

VERL_VERSION = "0.9.1"

logger = logging.getLogger("verl_patches")

_STATUS: dict[str, object] = {"rollout": False, "cpu": False, "error": None}


class VerlVersionError(RuntimeError):
    """The installed verl is not the version these patches were written for."""


def check_verl_version() -> str:
    """Return the installed verl version.

    Raises:
        VerlVersionError: if it is not :data:`VERL_VERSION`.
    """
    from importlib.metadata import version

    installed = version("verl")
    if installed != VERL_VERSION:
        raise VerlVersionError(
            f"verl_patches targets verl=={VERL_VERSION} but verl=={installed} is installed; "
            f"install verl=={VERL_VERSION} (the patches touch verl internals)"
        )
    return installed


def cpu_mode() -> bool:
    """True when verl should run on the CPU (``VERL_PLATFORM=cpu``)."""
    return os.environ.get("VERL_PLATFORM", "").strip().lower() == "cpu"


def apply(cpu: bool | None = None) -> dict:
    """Apply the patches (idempotent).

    Args:
        cpu: Apply the CPU patches; default: :func:`cpu_mode`.

    Returns:
        :func:`status`.

    Raises:
        VerlVersionError: on a verl version mismatch.
        verl_patches._util.PatchError: when a patch target is missing.
    """
    check_verl_version()
    from . import hf_rollout

    from . import seeding, tracking

    hf_rollout.register()
    tracking.apply()
    seeding.apply()
    _STATUS["rollout"] = True
    if cpu if cpu is not None else cpu_mode():
        from . import distributed, fsdp, platform, valuehead

        platform.apply()
        distributed.apply()
        fsdp.apply()
        valuehead.apply()
        _STATUS["cpu"] = True
    _STATUS["error"] = None
    return status()


def status() -> dict:
    """Which patch groups are active and the last error (a formatted traceback or None)."""
    return dict(_STATUS)


def load() -> None:
    """``verl.plugins`` entry point: :func:`apply`, logging any failure loudly.

    verl catches and hides exceptions raised here, so the traceback is logged at ERROR
    and written to stderr, and kept for :func:`status`; then the exception is re-raised.
    """
    try:
        apply()
    except Exception:
        _STATUS["error"] = traceback.format_exc()
        msg = f"verl_patches FAILED to apply in pid {os.getpid()}:\n{_STATUS['error']}"
        logger.error(msg)
        print(msg, file=sys.stderr, flush=True)
        raise
