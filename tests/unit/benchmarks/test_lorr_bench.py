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


def test_variants_switch_one_part_off_each():
    from benchmarks.lorr import variant_overrides

    it = ["preference.iteration.rollout_steps=4", "preference.iteration.mini_batch_pairs=8"]
    assert variant_overrides("iterative_dpo", 4, 8) == ("iterative_dpo", it)
    assert variant_overrides("lorr_dpo", 4, 8) == ("lorr_dpo", it)
    assert variant_overrides("lorr_no_reset", 4, 8) == ("lorr_dpo", [*it, "lorr.reset.enable=false"])
    assert variant_overrides("lorr_no_reuse", 4, 8) == ("lorr_dpo", [*it, "lorr.reuse.enable=false"])
    assert variant_overrides("lorr_no_sft", 2, None) == (
        "lorr_dpo", ["preference.iteration.rollout_steps=2", "preference.iteration.mini_batch_pairs=null",
                     "lorr.sft.enable=false"])
    import pytest

    with pytest.raises(KeyError, match="unknown variant"):
        variant_overrides("lorr", 1, None)


def test_paired_claim_and_collapse_by_hand():
    import math

    import pytest

    from benchmarks.lorr import collapse_claim, paired_claim

    stats = {("lorr_dpo", 0): {"acc_at_budget": 0.30}, ("iterative_dpo", 0): {"acc_at_budget": 0.25},
             ("lorr_dpo", 1): {"acc_at_budget": 0.20}, ("iterative_dpo", 1): {"acc_at_budget": 0.30}}
    c = paired_claim("x", "lorr_dpo", "iterative_dpo", stats, [0, 1], n_samples=400)
    # diffs +.05, -.10: mean -.025; sd = .15 / sqrt(2) = .1061; sampling SE per seed
    # sqrt((.3*.7 + .25*.75) / 400) = .03153, sqrt((.2*.8 + .3*.7) / 400) = .03041 -> 2 * .03097 / sqrt(2) = .0438
    assert c["diffs"] == pytest.approx([0.05, -0.10]) and c["mean"] == pytest.approx(-0.025)
    assert c["spread"] == pytest.approx(0.15 / math.sqrt(2))
    assert c["verdict"] == "inconclusive (within spread)"
    one = paired_claim("x", "lorr_dpo", "iterative_dpo", stats, [1], n_samples=400)
    # one seed: spread = 2 * .03041 = .0608 < .10 -> does not hold
    assert one["spread"] == pytest.approx(2 * math.sqrt(0.37 / 400)) and one["verdict"] == "does not hold"
    assert paired_claim("x", "lorr_dpo", "iterative_dpo", stats, [0], 400)["verdict"] == "holds"
    part = paired_claim("p", "lorr_dpo", "iterative_dpo", stats, [0], 10_000, at_least=False)
    assert part["verdict"] == "helps"  # +.05 > 2 * sqrt(.3975 / 10000) = .0126
    assert paired_claim("x", "a", "b", stats, [0], 400)["verdict"] == "no data"

    runs = {("lorr_dpo", 0): {"start_acc": 0.25, "final_acc": 0.13}, ("lorr_dpo", 1): {"start_acc": 0.25,
                                                                                     "final_acc": 0.22}}
    col = collapse_claim(runs, [0, 1], n_samples=400)
    # seed 0: drop .12 > 2 sqrt((.1875 + .1131) / 400) = .0548 -> collapse; seed 1: .03 < .0590
    assert col["verdict"] == "does not hold"
    assert [round(d, 3) for _, d, _ in col["falls"]] == [0.12, 0.03]
    assert collapse_claim(runs, [1], 400)["verdict"] == "holds"


def test_quick_settings_and_dry_run(capsys):
    from benchmarks.lorr import main, settings, _parser

    st = settings(_parser().parse_args(["--quick"]))
    assert (st["seeds"], st["iterations"], st["rollout_steps"], st["steps"], st["test_freq"]) == ([0], 3, 2, 6, 2)
    st = settings(_parser().parse_args(["--seeds", "3", "4", "--rollout-steps", "5"]))
    assert (st["seeds"], st["steps"], st["mini_batch_pairs"]) == ([3, 4], 25, 8)  # 5 iterations x 5
    assert main(["--quick", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "5 runs of 6 steps" in out and "lorr_no_reuse_s0: recipe=lorr_dpo" in out
    assert "lorr.reuse.enable=false" in out


def _write_run(folder, vals: dict[int, float], fresh: dict[int, float], reused=()):
    import json

    folder.mkdir(parents=True)
    with open(folder / "metrics.jsonl", "w") as f:
        for step in sorted({0, *fresh}):
            data = {"timing_s/step": 2.0} if step else {}
            if step:
                data.update({"dpo/fresh_rollouts": fresh[step], "lorr/reused_initial": float(step in reused),
                             "lorr/optimizer_steps": 3.0, "lorr/iteration": float(step),
                             "dpo/chosen_logps": -5.0, "dpo/rejected_logps": -9.0})
            if step in vals:
                data["val/arith/avg@1"] = vals[step]
            f.write(json.dumps({"step": step, "data": data}) + "\n")


def test_report_only_table_findings_and_curves(tmp_path, capsys):
    """--report-only over two hand-made runs of seed 0: LoRR reused the initial pairs at step
    2 (no rollouts), so the budget is 128 rollouts: iterative DPO's accuracy at 128 is its
    step-2 value 0.30, LoRR's its step-3 value 0.35 -> +0.05."""
    from benchmarks.lorr import main

    runs = tmp_path / "runs"
    _write_run(runs / "iterative_dpo_s0", {0: 0.2, 2: 0.3, 3: 0.32}, {1: 64, 2: 64, 3: 64})
    _write_run(runs / "lorr_dpo_s0", {0: 0.2, 2: 0.25, 3: 0.35}, {1: 64, 2: 0, 3: 64}, reused=(2,))
    assert main(["--report-only", "--out", str(tmp_path), "--seeds", "0", "--variants", "iterative_dpo",
                 "lorr_dpo"]) == 0
    text = (tmp_path / "lorr_results.md").read_text()
    assert "seed 0: 128" in text
    assert "| lorr_dpo | 0.200 | 0.350 | 0.350 | 0.350 |" in text
    assert "| iterative_dpo | 0.200 | 0.320 | 0.320 | 0.300 |" in text
    assert "mean difference +0.050" in text and "**holds**" in text
    assert (tmp_path / "lorr_curves.png").stat().st_size > 0
