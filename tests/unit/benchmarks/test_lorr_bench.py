"""benchmarks/lorr.py: the rollout-axis comparison on hand-made curves."""

from __future__ import annotations

from benchmarks.lorr import acc_at_budget, cumulative_rollouts, rollouts_to_target, run_stats


def _curve(fresh: dict[int, float], val: dict[int, float], extra: dict[int, dict] | None = None) -> dict:
    steps = sorted({0, *fresh})
    rows = {s: {"dpo/fresh_rollouts": fresh.get(s, 0.0), **(extra or {}).get(s, {})} for s in steps}
    rows[0] = {}
    return {"steps": steps, "val": val, "rows": rows, "wall": {s: 2.0 * s for s in steps}}


def test_cumulative_rollouts_skip_reuse_steps():
    c = _curve({1: 64, 2: 64, 3: 0, 4: 64}, {0: 0.2, 2: 0.3, 4: 0.4})
    assert cumulative_rollouts(c) == {0: 0.0, 1: 64.0, 2: 128.0, 3: 128.0, 4: 192.0}


def test_acc_at_budget_takes_last_validation_within_budget():
    c = _curve({1: 64, 2: 64, 3: 0, 4: 64}, {0: 0.2, 2: 0.3, 3: 0.35, 4: 0.4})
    assert acc_at_budget(c, 128) == (0.35, 3)  # step 3 reused the initial pairs: still 128 rollouts
    assert acc_at_budget(c, 191) == (0.35, 3)
    assert acc_at_budget(c, 192) == (0.4, 4)
    assert acc_at_budget(c, -1) == (None, None)


def test_rollouts_to_target_and_stats():
    c = _curve({1: 64, 2: 64, 3: 0, 4: 64}, {0: 0.2, 2: 0.3, 4: 0.4},
               extra={2: {"lorr/resets": 1.0}, 3: {"lorr/resets": 1.0, "lorr/reused_initial": 1.0},
                      4: {"lorr/resets": 2.0, "dpo/reward_accuracy": 0.5}})
    assert rollouts_to_target(c, 0.3) == 128.0
    assert rollouts_to_target(c, 0.5) is None
    assert rollouts_to_target(c, 0.2) == 128.0  # step 0 never counts
    s = run_stats(c, budget=128, target=0.35)
    assert s["rollouts_total"] == 192.0 and s["acc_at_budget"] == 0.3 and s["rollouts_to_target"] == 192.0
    assert s["resets"] == 2.0 and s["reused_steps"] == 1 and s["final_acc"] == 0.4 and s["best_acc"] == 0.4
    assert s["reward_accuracy_mean"] == 0.5 and s["wall_s"] == 8.0
