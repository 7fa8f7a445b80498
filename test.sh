#!/usr/bin/env bash
# The test command: sets up .venv if needed (as run.sh does), then runs the whole suite
# (unit + end-to-end through verl on CPU). Extra args go to pytest: ./test.sh tests/unit -x
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[ -x "$ROOT/.venv/bin/python" ] && "$ROOT/.venv/bin/python" -c "import recipe, verl_patches, verl, pytest" 2>/dev/null \
  || bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "$ROOT/.venv/bin/python" -m pytest -q -p no:cacheprovider "${@:-tests}"
