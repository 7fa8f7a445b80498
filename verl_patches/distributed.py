"""Distributed backend on CPU: ``gloo`` instead of verl's ``cpu:gloo,<device>:<backend>``.

verl 0.9.1 initialises its process groups with ``f"cpu:gloo,{device}:{backend}"``. With
the ``cpu`` platform that string is ``cpu:gloo,cpu:gloo``, which torch rejects
("Duplicate device type cpu"). Both initialisers (``initialize_global_process_group_ray``
used by the Ray workers, ``initialize_global_process_group`` used by torchrun entry
points such as the SFT trainer) are wrapped: when the platform's device is ``cpu`` the
torch call gets ``backend="gloo"``; otherwise they are unchanged.
"""

from __future__ import annotations

import functools

from ._util import rebind


def _gloo_on_cpu(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import torch.distributed as dist

        from verl.utils.device import get_device_name

        if get_device_name() != "cpu":
            return fn(*args, **kwargs)
        # verl reaches torch through the module attribute, so swapping it for the
        # duration of the call changes the backend of exactly this initialisation.
        real_init = dist.init_process_group

        def init_gloo(backend=None, *a, **kw):
            return real_init("gloo", *a, **kw)

        dist.init_process_group = init_gloo
        try:
            return fn(*args, **kwargs)
        finally:
            dist.init_process_group = real_init

    return wrapper


def apply() -> None:
    """Make verl's process-group initialisers use ``gloo`` on CPU (idempotent)."""
    rebind("verl.utils.distributed", "initialize_global_process_group_ray", _gloo_on_cpu)
    rebind("verl.utils.distributed", "initialize_global_process_group", _gloo_on_cpu)
