"""FSDP2 on CPU: engine lookup and CPU offload without pinned memory.

1. verl registers its FSDP engines for devices ``cuda`` and ``npu`` only. verl's own
   ``VERL_ENGINE_DEVICE`` override (read only by ``EngineRegistry.get_engine_cls``) is
   set to ``cuda`` so the lookup finds them; nothing else reads it.
2. The FSDP2 reference (``forward_only``) and offloaded actors use
   ``CPUOffloadPolicy(pin_memory=True)``; pinning needs an accelerator ("Cannot access
   accelerator device"). ``verl.utils.fsdp_utils.CPUOffloadPolicy`` is replaced by a
   subclass that forces ``pin_memory=False``; the engine module imports it by name
   from there.
"""

from __future__ import annotations

import os

from ._util import rebind


def _unpinned(cls):
    class UnpinnedCPUOffloadPolicy(cls):
        """``CPUOffloadPolicy`` with ``pin_memory`` forced to False (no accelerator)."""

        def __init__(self, pin_memory: bool = True, **kwargs):
            super().__init__(pin_memory=False, **kwargs)

    UnpinnedCPUOffloadPolicy.__name__ = "CPUOffloadPolicy"
    return UnpinnedCPUOffloadPolicy


def apply() -> None:
    """Apply both FSDP patches (idempotent)."""
    os.environ.setdefault("VERL_ENGINE_DEVICE", "cuda")
    rebind("verl.utils.fsdp_utils", "CPUOffloadPolicy", _unpinned)
