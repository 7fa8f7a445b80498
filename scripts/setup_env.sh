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
# compat mode: a .pth path entry, so our regular `recipe` package wins over the
# `recipe` namespace folder that TransferQueue installs into site-packages
"$VPY" -m pip install -q -e "$ROOT[test]" --config-settings editable_mode=compat
"$VPY" -c "import torch, verl, verl_patches, recipe; print('env ok: torch', torch.__version__, 'verl', verl.__version__)"
