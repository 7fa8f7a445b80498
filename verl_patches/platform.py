"""A ``cpu`` platform for verl's platform registry.

verl 0.9.1 resolves its device through :mod:`verl.plugin.platform`; with no accelerator
it falls back to ``nvidia`` (cuda, nccl). This module registers a ``cpu`` platform
(device ``cpu``, backend ``gloo``, Ray resource ``GPU`` so that the logical GPU declared
to Ray by the CPU config is what workers ask for) selected with ``VERL_PLATFORM=cpu``.

The device module is a stand-in for ``torch.cuda``: cache, stream and memory calls are
no-ops or report host memory, and any other attribute raises ``AttributeError`` naming
itself, so a new verl call path fails loudly instead of silently doing nothing.
"""

from __future__ import annotations

import contextlib
import os
from types import ModuleType, SimpleNamespace
from typing import Any, Optional

import torch

PLATFORM_NAME = "cpu"


def _host_memory() -> tuple[int, int]:
    """Return ``(free_bytes, total_bytes)`` of host memory (from /proc/meminfo)."""
    info = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                info[key] = int(value.strip().split()[0]) * 1024
        return info.get("MemAvailable", info.get("MemFree", 0)), info.get("MemTotal", 0)
    except OSError:  # pragma: no cover - non-Linux
        return 0, 0


class CPUDeviceModule(ModuleType):
    """Stand-in for ``torch.cuda`` on a machine without an accelerator.

    Only the calls verl 0.9.1 makes through ``get_torch_device()`` exist; they are
    no-ops (cache, synchronisation), constants (one device, index ``"cpu"``) or host
    figures (``mem_get_info``). Memory counters return 0 bytes.

    Raises:
        AttributeError: for any attribute not listed here, naming it, so an
            unpatched verl code path is found at once.
    """

    def __init__(self) -> None:
        super().__init__("verl_patches.cpu_device")
        self.Stream = torch.cpu.Stream
        self.Event = getattr(torch.cpu, "Event", SimpleNamespace)

    # availability and placement -------------------------------------------------
    def is_available(self) -> bool:
        return True

    def is_initialized(self) -> bool:
        return True

    def device_count(self) -> int:
        return 1

    def current_device(self) -> str:
        return "cpu"

    def set_device(self, device: Any) -> None:
        return None

    def get_device_name(self, device: Any = None) -> str:
        return "cpu"

    # synchronisation and streams -------------------------------------------------
    def synchronize(self, device: Any = None) -> None:
        return None

    def current_stream(self, device: Any = None):
        return torch.cpu.current_stream()

    def stream(self, stream: Any = None):
        return contextlib.nullcontext()

    # memory ----------------------------------------------------------------------
    def empty_cache(self) -> None:
        return None

    def ipc_collect(self) -> None:
        return None

    def mem_get_info(self, device: Any = None) -> tuple[int, int]:
        return _host_memory()

    def memory_allocated(self, device: Any = None) -> int:
        return 0

    def memory_reserved(self, device: Any = None) -> int:
        return 0

    def max_memory_allocated(self, device: Any = None) -> int:
        return 0

    def max_memory_reserved(self, device: Any = None) -> int:
        return 0

    def reset_peak_memory_stats(self, device: Any = None) -> None:
        return None

    def memory_stats(self, device: Any = None) -> dict:
        return {}

    def set_per_process_memory_fraction(self, fraction: float, device: Any = None) -> None:
        return None

    # random numbers ----------------------------------------------------------------
    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def get_rng_state(self, device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(self, state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)

    def __getattr__(self, name: str):
        raise AttributeError(
            f"verl_patches: the CPU stand-in for torch.cuda has no '{name}'; "
            "a verl code path not covered by verl_patches.platform was reached"
        )


CPU_DEVICE_MODULE = CPUDeviceModule()


def make_platform_class():
    """Build and register the ``cpu`` ``PlatformBase`` subclass.

    Returns:
        The registered class (registration is idempotent: a second call returns the
        class already registered).
    """
    from verl.plugin.platform.platform_base import PlatformBase
    from verl.plugin.platform.platform_manager import PlatformRegistry

    existing = PlatformRegistry.get(PLATFORM_NAME)
    if existing is not None and getattr(existing, "__verl_patches__", False):
        return existing

    class PlatformCPU(PlatformBase):
        """verl platform for hosts without an accelerator (device ``cpu``, backend ``gloo``)."""

        __verl_patches__ = True

        @property
        def device_name(self) -> str:
            return "cpu"

        @property
        def vendor_name(self) -> str:
            return "cpu"

        @property
        def device_module(self) -> ModuleType:
            return CPU_DEVICE_MODULE

        def is_available(self) -> bool:
            return True

        def is_platform_available(self, use_smi_check: bool = False) -> bool:
            # Never auto-detected: selected explicitly with VERL_PLATFORM=cpu.
            return os.environ.get("VERL_PLATFORM", "").strip().lower() == PLATFORM_NAME

        def current_device(self) -> str:
            return "cpu"

        def device_count(self) -> int:
            return 1

        def set_device(self, device_index: int) -> None:
            return None

        def synchronize(self, device_index: Optional[int] = None) -> None:
            return None

        def manual_seed(self, seed: int) -> None:
            torch.manual_seed(seed)

        def manual_seed_all(self, seed: int) -> None:
            torch.manual_seed(seed)

        def set_allocator_settings(self, settings: str) -> None:
            return None

        def empty_cache(self) -> None:
            return None

        def get_device_capability(self, device_index: int = 0):
            return None, None

        def communication_backend_name(self) -> str:
            return "gloo"

        def visible_devices_envvar(self) -> str:
            return "CUDA_VISIBLE_DEVICES"

        @contextlib.contextmanager
        def nvtx_range(self, msg: str):
            yield

        def profiler_start(self) -> None:
            return None

        def profiler_stop(self) -> None:
            return None

        def ray_resource_name(self) -> str:
            # The CPU config declares logical GPUs to Ray (bookkeeping labels only).
            return "GPU"

        def ray_noset_envvars(self) -> list[str]:
            return ["RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"]

        def is_ipc_supported(self) -> bool:
            return False

        def cudart(self) -> Any:
            return None

    PlatformRegistry.register(platform=PLATFORM_NAME)(PlatformCPU)
    return PlatformCPU


def apply() -> None:
    """Register the ``cpu`` platform (idempotent)."""
    make_platform_class()
