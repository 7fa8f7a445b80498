"""Two "hosts" on one machine for the multi-node tests: the namespaces of scripts/netns.sh.

The session fixture brings up recipe-n1 (10.213.0.11) and recipe-n2 (10.213.0.12) on the
bridge recipe-br0 and removes them afterwards (what still runs in them is stopped by
``scripts/netns.sh down``), unless they were up before (they are then left as found). Without root / CAP_NET_ADMIN, or where ``ip netns add`` is
refused, every test here is skipped with the script's reason (its exit status 3).

They took ~25 min on 2 loaded cores (3 tests, 6 jobs), too long for CI's budget: a plain ``./test.sh`` (CI) skips
them; they run when named (``./test.sh tests/multinode``) or with ``RECIPE_MULTINODE=1``.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NETNS = ROOT / "scripts" / "netns.sh"
#: scripts/netns.sh's exit status for "cannot run here"
UNAVAILABLE = 3


def multinode_selected(config: pytest.Config, marker: str) -> bool:
    """Whether this pytest run asked for the multi-node tests: a command-line path naming
    ``marker`` (e.g. ``tests/multinode``) or ``RECIPE_MULTINODE=1``."""
    return os.environ.get("RECIPE_MULTINODE") == "1" or any(marker in str(a) for a in config.args)


def pytest_collection_modifyitems(config, items):
    if multinode_selected(config, "multinode"):
        return
    skip = pytest.mark.skip(reason="two-node runs (~15-25 min on 2 cores): run them with ./test.sh tests/multinode "
                                   "or RECIPE_MULTINODE=1")
    for item in items:
        if "tests/multinode/" in str(item.fspath):
            item.add_marker(skip)


def netns(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run(["bash", str(NETNS), *args], capture_output=True, text=True, timeout=timeout)
    print(proc.stdout, proc.stderr, sep="\n")
    return proc


@pytest.fixture(scope="session")
def two_nodes() -> list[tuple[str, str]]:
    """``[("recipe-n1", "10.213.0.11"), ("recipe-n2", "10.213.0.12")]``, up for the session."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces unavailable: needs root (scripts/netns.sh: ip netns add, veth, bridge)")
    had_netns = netns("status").returncode == 0  # someone else's (e.g. a running two-node Slurm): kept
    t = time.monotonic()
    proc = netns("up")
    if proc.returncode == UNAVAILABLE:
        pytest.skip(f"network namespaces unavailable: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, f"scripts/netns.sh up failed:\n{proc.stdout}\n{proc.stderr}"
    print(f"[multinode] namespaces up in {time.monotonic() - t:.1f} s")
    nodes = [tuple(line.split()) for line in netns("nodes").stdout.splitlines()]
    try:
        yield nodes
    finally:
        if not had_netns:
            proc = netns("down")
            assert proc.returncode == 0, f"scripts/netns.sh down failed:\n{proc.stderr}"
