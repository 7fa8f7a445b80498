"""One Ray cluster for the whole e2e package.

Each e2e test runs ``./run.sh`` (a fresh driver); starting a Ray cluster of its own costs
each run ~13 s on the 2-core CI machine. The fixture starts one head node (8 CPUs, 2
logical GPUs for 2 FSDP ranks) before the first e2e test and stops it after the last; runs
join it through ``RAY_ADDRESS`` (``recipe.main.join_existing_cluster``). A driver's actors
and workers end with the driver, so runs do not see each other's. Tests that check what a
driver leaves behind start their own cluster (they drop ``RAY_ADDRESS``).

``RECIPE_E2E_OWN_RAY=1`` turns this off (every run starts its own Ray, as users' runs do).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

PLUGINS = Path(__file__).with_name("plugins")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="package", autouse=True)
def shared_ray_cluster():
    if os.environ.get("RECIPE_E2E_OWN_RAY") == "1" or os.environ.get("RAY_ADDRESS"):
        yield os.environ.get("RAY_ADDRESS")
        return
    from recipe.slurm import ray_auth_env

    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray_e2e_", dir="/tmp")  # short: Ray's socket paths
    # Ray >= 2.52 guards a `ray start` head with a token once one exists (~/.ray/auth_token):
    # the cluster gets its own, and the runs present it (RAY_AUTH_MODE / RAY_AUTH_TOKEN)
    auth = ray_auth_env(secrets.token_hex(32))
    # the workers' environment is this one: the toy stage of tests/e2e/plugins importable,
    # verl's CPU platform (also sent by recipe.main through the job's runtime_env)
    env = dict(os.environ, VERL_PLATFORM="cpu", **auth,
               PYTHONPATH=os.pathsep.join(filter(None, [str(PLUGINS), os.environ.get("PYTHONPATH")])))
    ray = str(Path(sys.executable).with_name("ray"))
    head = subprocess.Popen(
        [ray, "start", "--head", "--block", f"--port={port}", "--num-cpus=8", "--num-gpus=2",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 120
    while subprocess.run([ray, "status", f"--address={address}"], capture_output=True, env=env).returncode != 0:
        if head.poll() is not None or time.time() > deadline:
            out = head.stdout.read() if head.poll() is not None else ""
            head.kill()
            pytest.fail(f"the shared Ray head did not start: {out[-2000:]}")
        time.sleep(1)
    os.environ.update(RAY_ADDRESS=address, **auth)
    try:
        yield address
    finally:
        for key in ("RAY_ADDRESS", *auth):
            os.environ.pop(key, None)
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` stops its processes on SIGTERM
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
