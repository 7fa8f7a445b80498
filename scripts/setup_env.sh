#!/usr/bin/env bash
# Create .venv with everything the project needs on a CPU machine. Order matters: the
# torch CPU wheel first (a bare `torch` requirement would pull several GB of CUDA
# packages), then verl 0.9.1 and this package (editable, with the test extra).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
[ -x "$ROOT/.venv/bin/python" ] || "$PY" -m venv "$ROOT/.venv"
VPY="$ROOT/.venv/bin/python"
"$VPY" -m pip install -q --upgrade pip setuptools wheel
"$VPY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
# setuptools' default editable mode: setup.py's package_dir={"": "."} makes it a static
# .pth holding $ROOT (a sys.path entry), so our regular `recipe` package wins over the
# `recipe` namespace folder that TransferQueue installs into site-packages, from any cwd
# (tests/install checks it in a fresh venv). No editable_mode=compat (deprecated).
"$VPY" -m pip install -q -e "$ROOT[test]"
# checked from another directory: from $ROOT itself the checkout wins through sys.path[0]
(cd / && "$VPY" - "$ROOT" <<'PY'
import os, sys
import torch, verl, verl_patches, recipe
root = sys.argv[1]
for mod in (recipe, verl_patches):
    want = os.path.join(root, mod.__name__, "__init__.py")
    if os.path.realpath(mod.__file__ or "") != os.path.realpath(want):
        sys.exit(f"setup_env: {mod.__name__} imports from {mod.__file__}, not {want}")
print("env ok: torch", torch.__version__, "verl", verl.__version__, "recipe", recipe.__file__)
PY
)
