#!/usr/bin/env bash
# Every recipe of conf/recipe/ for 2 steps on 2 FSDP ranks (CPU, gloo) with the e2e tests'
# parity reward; prints one line per recipe: exit status, steps logged, seconds, first error.
# Command: scripts/two_rank_sweep.sh [OUT_DIR] [EXTRA OVERRIDES...]   (~1 min per recipe on 2 cores)
#          RECIPES="grpo ppo" scripts/two_rank_sweep.sh      (a subset)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT/artifacts/two_rank_sweep}" && cd "${1:-$ROOT/artifacts/two_rank_sweep}" && pwd)"
shift || true
for r in ${RECIPES:-$(cd "$ROOT/conf/recipe" && ls *.yaml | sed 's/\.yaml$//')}; do
  start=$(date +%s)
  RECIPE_ARTIFACTS="$OUT" "$ROOT/run.sh" "recipe=$r" trainer.n_gpus_per_node=2 "trainer.experiment_name=r2_$r" \
    trainer.total_training_steps=2 trainer.test_freq=-1 trainer.save_freq=-1 \
    "reward.custom_reward_function.path=$ROOT/tests/e2e/parity_reward.py" "$@" > "$OUT/$r.log" 2>&1
  rc=$?
  steps=$(cat "$OUT/runs/r2_$r/metrics.jsonl" 2>/dev/null | wc -l)
  err=$(grep -m1 -E "\[recipe\] error:|[A-Za-z]+Error: " "$OUT/$r.log" | grep -v UserWarning | cut -c1-200)
  echo "$r rc=$rc steps=$steps secs=$(( $(date +%s) - start )) $err"
done
