"""benchmarks/data_efficiency.py: per-run measures against the paired GRPO run, and the claims."""

import math

import pytest

from benchmarks import data_efficiency as de


def _curve(val: dict[int, float], step_s: float, extra: dict[int, dict] | None = None) -> dict:
    steps = list(range(0, max(val) + 1))
    rows = {s: {"timing_s/step": step_s if s else 0.0, **(extra or {}).get(s, {})} for s in steps}
    wall = {s: step_s * s for s in steps}
    return {"steps": steps, "wall": wall, "val": val, "rows": rows}


def test_run_row_measures_against_the_paired_grpo_run():
    base = _curve({0: 0.30, 5: 0.35, 10: 0.40}, 2.0, {s: {"dots/effective_ratio": 0.3} for s in range(1, 11)})
    ours = _curve({0: 0.30, 5: 0.41, 10: 0.45}, 1.5, {
        1: {"dots/effective_ratio": 0.5, "replay/mean_age": 1.0, "replay/max_age": 2.0},
        2: {"dots/effective_ratio": 0.7, "replay/mean_age": 3.0, "replay/max_age": 5.0, "dots/pred_pearson": 0.2},
        4: {"dots/pred_pearson": 0.6, "dots/pred_pearson_pooled": 0.55},
    })
    row = de.run_row("grpo_dots_rr", 0, ours, base)
    # target = GRPO's final 0.40, first reached at step 5 after 7.5 s of 20 s
    assert (row["target"], row["steps"], row["wall_s"]) == (0.40, 5, 7.5)
    assert row["time_ratio"] == pytest.approx(0.375) and row["step_ratio"] == pytest.approx(0.5)
    assert row["effective_ratio"] == pytest.approx(0.6)
    assert (row["replay_mean_age"], row["replay_max_age"]) == (2.0, 5.0)
    assert row["pearson_round_mean"] == pytest.approx(0.4) and row["pearson_rounds"] == 2
    assert row["pearson_pooled"] == 0.55
    assert math.isnan(row["is_weight_std"])  # never logged: NaN, not 0
    base_row = de.run_row("grpo", 0, base, base)
    assert base_row["time_ratio"] == 1.0 and base_row["steps"] == 10
    assert row["grpo_self_ratio"] == base_row["grpo_self_ratio"] == 1.0  # GRPO first at 0.40 on its last step
    # a GRPO run that was at its final value already at step 5 (10 s of 20): the target is a plateau's
    plateau = _curve({0: 0.30, 5: 0.42, 10: 0.40}, 2.0)
    assert de.run_row("grpo", 0, plateau, plateau)["grpo_self_ratio"] == pytest.approx(0.5)
    assert de.run_row("grpo_dots_rr", 0, ours, plateau)["grpo_self_ratio"] == pytest.approx(0.5)


def test_claims_are_paired_per_seed_and_can_fail():
    rows = [
        {"variant": "grpo", "seed": 0, "effective_ratio": 0.30, "time_ratio": 1.0, "pearson_pooled": float("nan")},
        {"variant": "grpo", "seed": 1, "effective_ratio": 0.40, "time_ratio": 1.0, "pearson_pooled": float("nan")},
        {"variant": "grpo_dots_rr", "seed": 0, "effective_ratio": 0.50, "time_ratio": 0.6, "pearson_pooled": 0.7},
        {"variant": "grpo_dots_rr", "seed": 1, "effective_ratio": 0.45, "time_ratio": None, "pearson_pooled": 0.3},
    ]
    time_claim = next(c for c in de.claims(rows, [0, 1]) if "wall time" in c["claim"])
    assert time_claim["verdict"] == "does not hold" and time_claim["numbers"] == "0.60, not reached"
    rows[2]["grpo_self_ratio"], rows[3]["grpo_self_ratio"] = 0.5, 1.0  # seed 0's GRPO plateaued at half its run
    time_claim = next(c for c in de.claims(rows, [0, 1]) if "wall time" in c["claim"])
    assert time_claim["numbers"] == ("0.60, not reached; GRPO itself first reached its final value at 0.50, 1.00 "
                                     "of its own wall time")
    eff = next(c for c in de.claims(rows, [0, 1]) if c["claim"].startswith("grpo_dots_rr: effective"))
    # paired diffs +0.20 and +0.05: mean +0.125 < 0.15
    assert eff["verdict"] == "does not hold" and "+0.125" in eff["numbers"]
    pear = next(c for c in de.claims(rows, [0, 1]) if "Pearson" in c["claim"])
    assert pear["verdict"] == "does not hold" and pear["numbers"] == "0.70, 0.30"
    rows[3]["time_ratio"], rows[3]["effective_ratio"], rows[3]["pearson_pooled"] = 0.7, 0.60, 0.6
    verdicts = {c["claim"]: c["verdict"] for c in de.claims(rows, [0, 1])}
    assert set(verdicts.values()) == {"holds"}


def test_pearson_claim_not_measured_without_dots_runs():
    rows = [{"variant": "grpo", "seed": 0, "effective_ratio": 0.3, "time_ratio": 1.0, "pearson_pooled": float("nan")}]
    pear = [c for c in de.claims(rows, [0]) if "Pearson" in c["claim"]]
    assert pear[0]["verdict"] == "not measured"
