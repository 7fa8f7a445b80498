#!/usr/bin/env bash
# The main job: GRPO through verl's trainer on the embedded CPU default (tiny model, GSM8K).
# First run sets up .venv (torch CPU wheel first, then this package); data and the tiny
# model are prepared on demand. Any Hydra override works: ./run.sh trainer.total_training_steps=20 data=math
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[ -x "$ROOT/.venv/bin/python" ] && "$ROOT/.venv/bin/python" -c "import recipe, verl_patches, verl" 2>/dev/null \
  || bash "$ROOT/scripts/setup_env.sh"
export RECIPE_ARTIFACTS="${RECIPE_ARTIFACTS:-$ROOT/artifacts}"
exec "$ROOT/.venv/bin/python" -m recipe.main "$@"
