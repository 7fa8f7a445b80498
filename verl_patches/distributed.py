"""Distributed backend on CPU: ``gloo`` instead of verl's ``cpu:gloo,<device>:<backend>``.

verl 0.9.1 initialises its process group with ``f"cpu:gloo,{device}:{backend}"``. With
the ``cpu`` platform that string is ``cpu:gloo,cpu:gloo``, which torch rejects
("Duplicate device type cpu"). The patched initialisers pass ``gloo`` when the
platform's device is ``cpu`` and are unchanged otherwise.
"""

from __future__ import annotations

import functools

from ._util import rebind


def _cpu_backend(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from verl.utils.device import get_device_name

        if get_device_name() == "cpu" and kwargs.get("backend") is None and len(args) < 2:
            import os
            from datetime import timedelta

            import torch.distributed as dist

            if fn.__name__ == "initialize_global_process_group_ray":
                timeout_second = kwargs.get("timeout_second", args[0] if args else None)
                if not dist.is_initialized():
                    dist.init_process_group(
                        backend="gloo",
                        rank=int(os.environ.get("RANK", 0)),
                        world_size=int(os.environ.get("WORLD_SIZE", 1)),
                        timeout=timedelta(seconds=timeout_second) if timeout_second is not None else None,
                        init_method=os.environ.get("DIST_INIT_METHOD", None),
                    )
                return None
        return fn(*args, **kwargs)

    return wrapper


def apply() -> None:
    """Make verl's Ray process-group initialiser use ``gloo`` on CPU (idempotent)."""
    rebind("verl.utils.distributed", "initialize_global_process_group_ray", _cpu_backend)
