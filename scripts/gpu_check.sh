#!/usr/bin/env bash
# GPU smoke check in <= 8 minutes, printing a table check | status | seconds | detail:
# vLLM rollout + weight sync over 3 GRPO steps (tiny model, real Qwen2.5 tokenizer), 1 step of
# every recipe (2 GPUs when there are 2), the vLLM evaluation, the same-seed check. No internet
# needed: tiny models are built locally; missing packages are installed only if pip reaches an
# index, else their checks say "skip: <why>". Logs: $OUT if set, else artifacts/gpu_check/.
# Command: scripts/gpu_check.sh [--dry-run] [--cpu] [--only grpo_3steps,same_seed] [--budget 480] [--list]
#          scripts/gpu_check.sh --bundle   (copy ../shared's data + tokenizer into the ignored
#                                           artifacts/gpu_check/bundle, to carry to a GPU machine)
# The driver (scripts/gpu_check.py) needs only the standard library; the checks run under the
# interpreter that holds torch and verl (.venv, python3, or --python PY).
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${GPU_CHECK_DRIVER_PYTHON:-}"
if [ -z "$PY" ]; then
  for c in python3 "$ROOT/.venv/bin/python" python; do
    if command -v "$c" >/dev/null 2>&1; then PY="$c"; break; fi
  done
fi
[ -n "$PY" ] || { echo "gpu_check: no python3 found" >&2; exit 2; }
exec "$PY" "$ROOT/scripts/gpu_check.py" "$@"
