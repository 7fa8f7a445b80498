"""The editable install makes *this checkout's* ``recipe`` package win the import from
any working directory, although TransferQueue (a verl dependency) installs a ``recipe/``
namespace folder (no ``__init__.py``) into site-packages.

The mechanism under test: ``package_dir={"": "."}`` in ``setup.py`` makes setuptools'
default editable mode write a static ``.pth`` holding the checkout root (a plain
``sys.path`` entry). A regular package found in any ``sys.path`` entry beats namespace
portions (those are used only when no entry holds a regular package or module), so the
order of entries does not matter. Without it, this flat layout gets setuptools' import
finder, appended to ``sys.meta_path`` after ``PathFinder``, which then never sees
``import recipe``: ``PathFinder`` has already returned the namespace folder.

The test builds a plain venv (no ``--system-site-packages``), installs a fake
TransferQueue-like wheel that drops ``recipe/simple_use_case/demo.py`` plus a
``fake_ray_worker`` module into site-packages, checks that the fake shadows as
TransferQueue does, then runs ``pip install --no-deps -e <checkout>`` as
``scripts/setup_env.sh`` does (pip's build isolation, no ``--config-settings``). The build
backend for the isolated build is setuptools as installed in the interpreter running the
test (the version ``setup_env.sh`` installs), repacked into a local wheel: everything runs
offline (``--no-index``). Skipped only when a venv cannot be created here.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata as md
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RECIPE_INIT = ROOT / "recipe" / "__init__.py"
PATCHES_INIT = ROOT / "verl_patches" / "__init__.py"

# what a process prints about where `recipe` and `verl_patches` come from (find_spec does
# not execute the packages, which import torch/verl that the fresh venv does not have)
PROBE = (
    "import importlib.util, os, sys\n"
    "r = importlib.util.find_spec('recipe')\n"
    "p = importlib.util.find_spec('verl_patches')\n"
    "print(r.origin if r else None)\n"
    "print(os.pathsep.join(r.submodule_search_locations or []) if r else None)\n"
    "print(p.origin if p else None)\n"
    "print(os.getcwd())\n"
)


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _write_wheel(path: Path, dist_info: str, files: dict[str, bytes]) -> Path:
    """A minimal wheel; ``files`` holds every member but RECORD, which is written here."""
    lines = [f"{name},{_record_hash(data)},{len(data)}" for name, data in files.items()]
    lines.append(f"{dist_info}/RECORD,,")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist_info}/RECORD", "\n".join(lines) + "\n")
    return path


def _fake_transfer_queue_wheel(dest: Path) -> Path:
    """What TransferQueue 0.1.11 does to site-packages: a ``recipe/`` namespace folder
    (sub-folder, modules, no ``__init__.py``); plus a worker module run with ``python -m``
    from a temp cwd, as Ray starts ``ray._private.workers.default_worker``."""
    di = "fake_transfer_queue-0.0.1.dist-info"
    files = {
        "recipe/simple_use_case/demo.py": b"X = 1\n",
        "fake_transfer_queue/__init__.py": b"",
        "fake_ray_worker.py": PROBE.encode(),
        f"{di}/METADATA": b"Metadata-Version: 2.1\nName: fake-transfer-queue\nVersion: 0.0.1\n",
        f"{di}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tests/install\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    return _write_wheel(dest / "fake_transfer_queue-0.0.1-py3-none-any.whl", di, files)


def _repack_installed(dist_name: str, dest: Path) -> Path:
    """Turn an installed distribution of the running interpreter back into a wheel (its
    RECORD lists the files, relative to site-packages), so the fresh venv's isolated build
    can install the build backend without an index."""
    dist = md.distribution(dist_name)
    di = next(p.parts[0] for p in dist.files if p.parts[0].endswith(".dist-info"))
    files: dict[str, bytes] = {}
    for rel in dist.files:
        name = rel.as_posix()
        if name.startswith("..") or "__pycache__" in rel.parts or name == f"{di}/RECORD":
            continue
        src = Path(dist.locate_file(rel))
        if src.is_file():
            files[name] = src.read_bytes()
    version = dist.version
    norm = dist.metadata["Name"].replace("-", "_").lower()
    return _write_wheel(dest / f"{norm}-{version}-py3-none-any.whl", di, files)


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH")
           and not k.startswith("PIP_")}
    # no pip config files either (they may add indexes or find-links): only our wheels
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1",
               PIP_NO_INDEX="1")
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_clean_env(), capture_output=True, text=True, timeout=timeout)


def _probe(py: Path, cwd: Path, *args: str) -> tuple[str, str, str, str]:
    res = _run([str(py), *args], cwd)
    assert res.returncode == 0, res.stdout + res.stderr
    origin, locations, patches, where = res.stdout.strip().splitlines()
    return origin, locations, patches, where


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    """A plain venv with the fake TransferQueue installed, and the checks on it before and
    after installing this project: {"py", "elsewhere", "shadowed", "install_output", "site"}."""
    base = tmp_path_factory.mktemp("install")
    venv = base / "venv"
    made = _run([sys.executable, "-m", "venv", str(venv)], base)
    py = venv / "bin" / "python"
    if made.returncode != 0 or not py.exists():
        pytest.skip(f"cannot create a venv here ({sys.executable} -m venv): {made.stderr.strip()[-500:]}")
    cfg = (venv / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = false" in cfg, cfg

    wheels = base / "wheels"
    wheels.mkdir()
    fake = _fake_transfer_queue_wheel(wheels)
    _repack_installed("setuptools", wheels)
    # pip < 24 (what ensurepip bundles with Python 3.11) also asks for `wheel` in the
    # isolated build of a project without pyproject.toml; wheel needs packaging
    for name in ("wheel", "packaging"):
        try:
            _repack_installed(name, wheels)
        except md.PackageNotFoundError:
            pass

    pip = [str(py), "-m", "pip", "install", "--no-index", "--find-links", str(wheels)]
    res = _run(pip + ["--no-deps", str(fake)], base)
    assert res.returncode == 0, res.stdout + res.stderr
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], base)
                .stdout.strip())
    assert (site / "recipe" / "simple_use_case" / "demo.py").is_file()
    assert not (site / "recipe" / "__init__.py").exists()

    elsewhere = base / "elsewhere"  # any directory but the checkout
    elsewhere.mkdir()
    shadowed = _probe(py, elsewhere, "-c", PROBE)

    # as scripts/setup_env.sh installs the project, less the dependencies (torch, verl, ...)
    res = _run(pip + ["--no-deps", "-e", str(ROOT)], elsewhere, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    return {"py": py, "elsewhere": elsewhere, "shadowed": shadowed,
            "install_output": res.stdout + res.stderr, "site": site}


def test_fake_transfer_queue_shadows_like_the_real_one(fresh_venv):
    """The fixture reproduces the problem: before our install, `recipe` is the namespace."""
    origin, locations, patches, _ = fresh_venv["shadowed"]
    assert origin in ("None", "namespace"), origin  # a namespace spec has no origin file
    assert locations == str(fresh_venv["site"] / "recipe")
    assert patches == "None"


def test_editable_install_is_a_plain_path_entry(fresh_venv):
    """The mechanism: a static .pth with the checkout root, no import finder, no compat mode."""
    site = fresh_venv["site"]
    pths = sorted(site.glob("__editable__.verl_recipe_sample_efficient-*.pth"))
    assert len(pths) == 1, sorted(p.name for p in site.iterdir())
    assert pths[0].read_text().strip() == str(ROOT)
    assert not list(site.glob("__editable___*_finder.py"))
    out = fresh_venv["install_output"]
    assert "compat" not in out.lower() and "transitional" not in out.lower(), out


def test_recipe_resolves_to_checkout_from_another_cwd(fresh_venv):
    origin, locations, patches, where = _probe(fresh_venv["py"], fresh_venv["elsewhere"], "-c", PROBE)
    assert Path(where) == fresh_venv["elsewhere"]
    assert origin == str(RECIPE_INIT)
    assert locations == str(ROOT / "recipe")  # a regular package, not merged with the namespace
    assert patches == str(PATCHES_INIT)


def test_recipe_resolves_to_checkout_in_a_ray_like_worker(fresh_venv, tmp_path):
    """Ray starts workers as `python -m ray._private.workers.default_worker` (a module in
    site-packages) with the cwd set to a temp dir, which becomes sys.path[0]."""
    worker_cwd = tmp_path / "session_worker"
    worker_cwd.mkdir()
    origin, locations, patches, where = _probe(fresh_venv["py"], worker_cwd, "-m", "fake_ray_worker")
    assert Path(where) == worker_cwd
    assert (origin, locations, patches) == (str(RECIPE_INIT), str(ROOT / "recipe"), str(PATCHES_INIT))


def test_subprocess_of_a_subprocess_with_another_cwd(fresh_venv, tmp_path):
    """A child started from a process running elsewhere, with yet another cwd."""
    child_cwd = tmp_path / "child"
    child_cwd.mkdir()
    code = ("import subprocess, sys\n"
            f"r = subprocess.run([sys.executable, '-c', {PROBE!r}], cwd={str(child_cwd)!r},"
            " capture_output=True, text=True, check=True)\n"
            "print(r.stdout, end='')\n")
    origin, locations, patches, where = _probe(fresh_venv["py"], fresh_venv["elsewhere"], "-c", code)
    assert Path(where) == child_cwd
    assert (origin, locations, patches) == (str(RECIPE_INIT), str(ROOT / "recipe"), str(PATCHES_INIT))
