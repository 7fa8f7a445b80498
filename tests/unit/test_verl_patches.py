"""Tests of verl_patches against the installed verl 0.9.1 (CPU only, no Ray).

What the patches do to a process is checked in fresh subprocesses (``VERL_PLATFORM`` is
read once, when verl's platform singleton is created, and the entry point must load the
patches by itself on ``import verl``). The in-process tests restore every binding they
change, so other test modules see verl as the entry point left it.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import verl  # noqa: F401  (loads the verl.plugins entry point, as every verl process does)
import verl_patches
from verl_patches import _util

REPO_ROOT = Path(__file__).resolve().parents[2]

# (module, attribute) pairs that the patches rebind
PATCHED = {
    "CPUOffloadPolicy": "verl.utils.fsdp_utils",
    "initialize_global_process_group_ray": "verl.utils.distributed",
    "FileLogger": "verl.utils.tracking",
}


def _verl_modules():
    return [(name, mod) for name, mod in list(sys.modules.items()) if name.split(".")[0] == "verl" and mod is not None]


def _is_patched(obj) -> bool:
    return bool(getattr(obj, "__verl_patches__", False))


@pytest.fixture
def restore_verl_patches():
    """Undo what ``verl_patches.apply`` did during a test: bindings, registry, env, status."""
    from verl.plugin.platform.platform_manager import PlatformRegistry

    was_patched = {
        attr: _is_patched(getattr(sys.modules[mod], attr, None)) if mod in sys.modules else False
        for attr, mod in PATCHED.items()
    }
    platforms = dict(PlatformRegistry._platforms)
    status = dict(verl_patches._STATUS)
    env = {k: os.environ.get(k) for k in ("VERL_ENGINE_DEVICE", "VERL_PLATFORM", "VERL_FILE_LOGGER_PATH")}
    yield
    for attr, before in was_patched.items():
        if before:
            continue
        for _, mod in _verl_modules():
            value = getattr(mod, attr, None)
            if _is_patched(value):
                setattr(mod, attr, value.__wrapped_original__)
    PlatformRegistry._platforms.clear()
    PlatformRegistry._platforms.update(platforms)
    verl_patches._STATUS.clear()
    verl_patches._STATUS.update(status)
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _start_python(code: str, env_updates: dict[str, str | None]) -> subprocess.Popen:
    """Start ``code`` in a fresh interpreter; it prints one JSON object on its last stdout line."""
    env = dict(os.environ)
    for k in ("VERL_PLATFORM", "VERL_ENGINE_DEVICE", "VERL_USE_EXTERNAL_PLUGINS", "VERL_USE_EXTERNAL_MODULES"):
        env.pop(k, None)
    for k, v in env_updates.items():
        if v is None:
            env.pop(k, None)
        else:
            env[k] = v
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=str(REPO_ROOT),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _result(proc: subprocess.Popen, timeout: float = 180) -> dict:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"subprocess timed out:\n{stdout}\n{stderr}")
    assert proc.returncode == 0, f"subprocess failed (rc={proc.returncode}):\n{stdout}\n{stderr}"
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON result printed:\n{stdout}\n{stderr}"
    return json.loads(lines[-1])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------------------
# version check
# --------------------------------------------------------------------------------------
def test_check_verl_version_accepts_installed():
    assert verl_patches.VERL_VERSION == "0.9.1"
    assert verl_patches.check_verl_version() == "0.9.1"


def test_check_verl_version_rejects_other_version(monkeypatch):
    real_version = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "0.9.2" if name == "verl" else real_version(name)
    )
    with pytest.raises(verl_patches.VerlVersionError) as exc:
        verl_patches.check_verl_version()
    msg = str(exc.value)
    assert "0.9.1" in msg and "0.9.2" in msg
    # apply() checks the version before touching anything
    with pytest.raises(verl_patches.VerlVersionError):
        verl_patches.apply(cpu=False)


# --------------------------------------------------------------------------------------
# loud failure
# --------------------------------------------------------------------------------------
def test_rebind_missing_target_raises_patch_error():
    import verl.utils.tracking as tracking

    with pytest.raises(_util.PatchError, match=r"verl\.utils\.tracking\.NoSuchThing"):
        _util.rebind("verl.utils.tracking", "NoSuchThing", lambda o: o)
    assert not hasattr(tracking, "NoSuchThing")


def _assert_loud(caplog, capsys, needle: str) -> None:
    errors = [r for r in caplog.records if r.name == "verl_patches" and r.levelno == logging.ERROR]
    assert errors, "load() did not log at ERROR"
    assert "FAILED" in errors[-1].getMessage() and needle in errors[-1].getMessage()
    err = capsys.readouterr().err
    assert "verl_patches FAILED" in err and needle in err
    tb = verl_patches.status()["error"]
    assert isinstance(tb, str) and tb.startswith("Traceback") and needle in tb


def test_load_failure_is_logged_printed_recorded_and_reraised(monkeypatch, caplog, capsys):
    monkeypatch.setitem(verl_patches._STATUS, "error", None)

    def boom(cpu=None):
        raise RuntimeError("simulated patch failure xyz")

    monkeypatch.setattr(verl_patches, "apply", boom)
    caplog.set_level(logging.ERROR, logger="verl_patches")
    with pytest.raises(RuntimeError, match="simulated patch failure xyz"):
        verl_patches.load()
    _assert_loud(caplog, capsys, "simulated patch failure xyz")


def test_load_reports_a_real_patch_error(monkeypatch, caplog, capsys, restore_verl_patches):
    """A patch module whose target is gone: the PatchError surfaces through load()."""
    from verl_patches import tracking

    monkeypatch.setitem(verl_patches._STATUS, "error", None)
    monkeypatch.setattr(tracking, "apply", lambda: _util.rebind("verl.utils.tracking", "NoSuchThing", lambda o: o))
    caplog.set_level(logging.ERROR, logger="verl_patches")
    with pytest.raises(_util.PatchError):
        verl_patches.load()
    _assert_loud(caplog, capsys, "NoSuchThing")


def test_load_reports_version_mismatch(monkeypatch, caplog, capsys):
    monkeypatch.setitem(verl_patches._STATUS, "error", None)
    real_version = importlib.metadata.version
    monkeypatch.setattr(
        importlib.metadata, "version", lambda name: "0.9.2" if name == "verl" else real_version(name)
    )
    caplog.set_level(logging.ERROR, logger="verl_patches")
    with pytest.raises(verl_patches.VerlVersionError):
        verl_patches.load()
    _assert_loud(caplog, capsys, "0.9.2")


# --------------------------------------------------------------------------------------
# idempotence
# --------------------------------------------------------------------------------------
def _bound():
    import verl.utils.distributed
    import verl.utils.fsdp_utils
    import verl.utils.tracking
    from verl.plugin.platform.platform_manager import PlatformRegistry

    return {
        "CPUOffloadPolicy": verl.utils.fsdp_utils.CPUOffloadPolicy,
        "initialize_global_process_group_ray": verl.utils.distributed.initialize_global_process_group_ray,
        "FileLogger": verl.utils.tracking.FileLogger,
        "platform_cpu": PlatformRegistry.get("cpu"),
    }


def test_apply_twice_is_idempotent(restore_verl_patches):
    st = verl_patches.apply(cpu=True)
    assert st["rollout"] is True and st["cpu"] is True
    first = _bound()
    for name in ("CPUOffloadPolicy", "initialize_global_process_group_ray", "FileLogger"):
        assert _is_patched(first[name]), name
        # wrapped exactly once: the original is not itself a patch
        assert not _is_patched(first[name].__wrapped_original__), name
    assert first["platform_cpu"] is not None and _is_patched(first["platform_cpu"])

    verl_patches.apply(cpu=True)
    second = _bound()
    for name, obj in first.items():
        assert second[name] is obj, f"{name} was re-wrapped by the second apply()"

    # modules that imported the names before the patch see the patched objects too
    import verl.checkpoint_engine.base as ckpt_base
    import verl.utils.tracking as tracking

    assert ckpt_base.initialize_global_process_group_ray is first["initialize_global_process_group_ray"]
    assert tracking.FileLogger is first["FileLogger"]


# --------------------------------------------------------------------------------------
# effects, in fresh processes (the entry point alone must load the patches)
# --------------------------------------------------------------------------------------
_CPU_SCRIPT = r"""
import json, os
import verl
import verl_patches
out = {"status": verl_patches.status()}
from verl.utils.device import get_device_name, get_nccl_backend, get_torch_device
out["device"] = get_device_name()
out["backend"] = get_nccl_backend()
get_torch_device().empty_cache()
get_torch_device().synchronize()
out["empty_cache"] = True
try:
    get_torch_device().no_such_attr
    out["missing_attr"] = "no error"
except AttributeError as e:
    out["missing_attr"] = str(e)
import torch
import torch.distributed.fsdp as torch_fsdp
import verl.utils.fsdp_utils as fu
pol = fu.CPUOffloadPolicy()
out["pin_memory_default"] = pol.pin_memory
out["pin_memory_true"] = fu.CPUOffloadPolicy(pin_memory=True).pin_memory
out["subclass"] = issubclass(fu.CPUOffloadPolicy, torch_fsdp.CPUOffloadPolicy)
out["torch_replaced"] = bool(getattr(torch_fsdp.CPUOffloadPolicy, "__verl_patches__", False))
out["torch_pin_default"] = torch_fsdp.CPUOffloadPolicy().pin_memory
from verl.workers.engine import EngineRegistry
cls = EngineRegistry.get_engine_cls("language_model", "fsdp2")
out["engine"] = f"{cls.__module__}.{cls.__qualname__}"
import verl.workers.engine.fsdp.transformer_impl as ti
out["engine_sees_patch"] = ti.CPUOffloadPolicy is fu.CPUOffloadPolicy
from verl.utils.distributed import initialize_global_process_group_ray
initialize_global_process_group_ray(timeout_second=60)
import torch.distributed as dist
out["pg_initialized"] = dist.is_initialized()
out["pg_backend"] = str(dist.get_backend())
out["world"] = dist.get_world_size()
t = torch.ones(2)
dist.all_reduce(t)
out["all_reduce"] = t.tolist()
dist.destroy_process_group()
import tempfile
from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM
import verl.utils.model as vum
tmp = tempfile.mkdtemp()
Qwen2ForCausalLM(Qwen2Config(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                             num_key_value_heads=1, vocab_size=64)).save_pretrained(tmp)
vcfg = AutoConfig.from_pretrained(tmp, num_labels=1)
vm = vum.load_valuehead_model(tmp, torch.float32, vcfg, False)
out["valuehead"] = [type(vm).__name__, vm.config._attn_implementation, vm.config.num_labels]
print(json.dumps(out))
"""


def test_cpu_mode_effects_in_fresh_process(fresh_processes):
    out = _result(fresh_processes["cpu"])
    st = out["status"]
    assert st["rollout"] is True and st["cpu"] is True and st["error"] is None, st
    assert out["device"] == "cpu"
    assert out["backend"] == "gloo"
    assert out["empty_cache"] is True
    assert "no_such_attr" in out["missing_attr"]
    assert out["pin_memory_default"] is False and out["pin_memory_true"] is False
    assert out["subclass"] is True
    assert out["torch_replaced"] is False and out["torch_pin_default"] is True
    assert out["engine"].startswith("verl.workers.engine.fsdp."), out["engine"]
    assert out["engine_sees_patch"] is True
    assert out["pg_initialized"] is True and out["pg_backend"] == "gloo" and out["world"] == 1
    assert out["all_reduce"] == [1.0, 1.0]
    # the PPO critic's value-head model loads with SDPA (verl hard-codes flash_attention_2)
    assert out["valuehead"] == ["Qwen2ForTokenClassification", "sdpa", 1]


_DEFAULT_MODE_SCRIPT = r"""
import json, os
import verl
import verl_patches
import torch.distributed.fsdp as torch_fsdp
import verl.utils.fsdp_utils as fu
import verl.utils.distributed as vd
import verl.utils.tracking as vt
from verl.workers.rollout.replica import RolloutReplicaRegistry
from verl.workers.rollout import base as rollout_base
from verl.plugin.platform.platform_manager import PlatformRegistry
print(json.dumps({
    "status": verl_patches.status(),
    "hf_replica": "hf" in RolloutReplicaRegistry._registry,
    "hf_adapter": rollout_base._ROLLOUT_REGISTRY.get(("hf", "async")),
    "cpu_offload_is_torch": fu.CPUOffloadPolicy is torch_fsdp.CPUOffloadPolicy,
    "pg_init_patched": bool(getattr(vd.initialize_global_process_group_ray, "__verl_patches__", False)),
    "file_logger_patched": bool(getattr(vt.FileLogger, "__verl_patches__", False)),
    "cpu_platform_registered": PlatformRegistry.get("cpu") is not None,
    "engine_device": os.environ.get("VERL_ENGINE_DEVICE"),
}))
"""


def test_default_mode_in_fresh_process(fresh_processes):
    out = _result(fresh_processes["default"])
    st = out["status"]
    assert st["rollout"] is True and st["cpu"] is False and st["error"] is None, st
    assert out["hf_replica"] is True
    assert out["hf_adapter"] == "verl_patches.hf_rollout.HFServerAdapter"
    assert out["cpu_offload_is_torch"] is True
    assert out["pg_init_patched"] is False
    assert out["file_logger_patched"] is True  # always applied
    assert out["cpu_platform_registered"] is False
    assert out["engine_device"] is None


@pytest.fixture(scope="module")
def fresh_processes():
    """Both fresh interpreters, started together (each spends most of its time importing)."""
    port = _free_port()
    procs = {
        "cpu": _start_python(
            _CPU_SCRIPT,
            {
                "VERL_PLATFORM": "cpu",
                "RANK": "0",
                "WORLD_SIZE": "1",
                "LOCAL_RANK": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "DIST_INIT_METHOD": None,
            },
        ),
        "default": _start_python(_DEFAULT_MODE_SCRIPT, {}),
    }
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


# --------------------------------------------------------------------------------------
# tracking
# --------------------------------------------------------------------------------------
def test_file_logger_appends_across_instances(tmp_path, monkeypatch, restore_verl_patches):
    verl_patches.apply(cpu=False)
    import verl.utils.tracking as tracking

    path = tmp_path / "sub" / "metrics.jsonl"
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(path))
    first = tracking.FileLogger("p", "e")
    first.log({"a": 1.0}, step=1)
    first.finish()
    second = tracking.FileLogger("p", "e")  # a resumed run
    second.log({"a": 2.0}, step=2)
    second.finish()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["data"]["a"]) for r in lines] == [(1, 1.0), (2, 2.0)]


def test_file_logger_root_layout(tmp_path, monkeypatch, restore_verl_patches):
    """Without VERL_FILE_LOGGER_PATH: <root>/<project>/<experiment>.jsonl, as in verl."""
    verl_patches.apply(cpu=False)
    import verl.utils.tracking as tracking

    monkeypatch.delenv("VERL_FILE_LOGGER_PATH", raising=False)
    monkeypatch.setenv("VERL_FILE_LOGGER_ROOT", str(tmp_path))
    for step in (1, 2):
        logger = tracking.FileLogger("proj", "exp")
        logger.log({"x": step}, step=step)
        logger.finish()
    target = tmp_path / "proj" / "exp.jsonl"
    assert [json.loads(line)["step"] for line in target.read_text().splitlines()] == [1, 2]
