"""LoRR-DPO against iterative DPO at equal numbers of rollouts, and LoRR with each part
switched off, on the CPU learning task, over paired seeds.

    python benchmarks/lorr.py --dry-run                # the runs and a cost estimate, nothing run
    python benchmarks/lorr.py --quick                  # smoke check: 1 seed, 3 short iterations (~7 min)
    python benchmarks/lorr.py                          # full: 3 seeds x 5 variants, 5 iterations (~33 min on 2 cores)
    python benchmarks/lorr.py --report-only            # table and curves from the runs already there

**Task and model**: the learning benchmark's (``benchmarks/learning_setup.py``: a tiny
warm-started Qwen2 on the arithmetic task, cached), its measured RL settings
(:data:`benchmarks.learning_setup.RECOMMENDED_RL_OVERRIDES`: 16 prompts x n = 4 = 64
rollouts per step, lr 1e-4) and its validation (``--val-samples`` samples per test prompt at
T = 1: avg@k).

**Iterations** (issue 13, PAPERS.md §3; ``recipe/stages/preference.py``): one iteration =
``--rollout-steps`` steps of rollouts by the iteration-start policy (their pairs kept), then
the iteration's epochs over all of its pairs in mini-batches of ``--mini-batch-pairs``
pairs, one optimizer step each, against the reference = the iteration-start policy.

**Variants** (:data:`VARIANTS`), each run for the same number of steps with the same seed
(same warm start, prompt order and sampling seeds wherever the variants do not differ by
design):

* ``iterative_dpo``: one epoch per iteration, no reset, no reuse, no SFT term;
* ``lorr_dpo``: LoRR's defaults: L = 3 epochs, lambda_k = min(0.5, 0.25 k), a reset of the
  ``down_proj`` weights half way to theta_0 after each iteration's epochs, and after a
  reset each iteration reuses all of iteration 1's pairs with probability 0.5;
* ``lorr_no_reset`` / ``lorr_no_reuse`` / ``lorr_no_sft``: LoRR with one part off
  (``lorr.reset.enable=false`` / ``lorr.reuse.enable=false`` / ``lorr.sft.enable=false``:
  no lambda schedule).

**Equal rollouts**: a reuse iteration generates nothing, so at equal steps LoRR has used
fewer rollouts. The comparison is made on the rollout axis (``dpo/fresh_rollouts`` summed
over steps): accuracy at the largest budget every run of a seed reached (the last validation
within it), rollouts to a target accuracy, and the final numbers.

**Claims and diagnostics** (:func:`claims`): "LoRR-DPO ends at or above iterative DPO at
equal rollouts" on the per-seed differences of accuracy at the budget (holds / does not
hold / inconclusive within the spread: the larger of the sd of the per-seed differences and
twice the sampling standard error of one difference); "LoRR never collapses" (no seed's
final accuracy below its start by more than twice the sampling standard error); for each
ablation whether the part measurably helps. Beside them: resets, reuse iterations, optimizer
steps, the DPO reward accuracy, the chosen / rejected log-probs at the end (both falling is
DPO's failure mode), the fresh rollouts' training score. Outputs under ``--out`` (default
``artifacts/bench/lorr``): ``lorr_results.md`` / ``.json``, ``lorr_curves.png``, ``runs/``,
``logs/``. A stopped benchmark resumes (finished runs of the same command are reused).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.runs import RunFailed, preset, read_curve, run_name, series  # noqa: E402

#: label -> (recipe, overrides). The base for the comparison is the first entry.
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "iterative_dpo": ("iterative_dpo", ()),
    "lorr_dpo": ("lorr_dpo", ()),
    "lorr_no_reset": ("lorr_dpo", ("lorr.reset.enable=false",)),
    "lorr_no_reuse": ("lorr_dpo", ("lorr.reuse.enable=false",)),
    "lorr_no_sft": ("lorr_dpo", ("lorr.sft.enable=false",)),
}
COLORS = {"iterative_dpo": "tab:blue", "lorr_dpo": "tab:red", "lorr_no_reset": "tab:orange",
          "lorr_no_reuse": "tab:green", "lorr_no_sft": "tab:purple"}
#: What each ablation switches off (for the findings).
PARTS = {"lorr_no_reset": "the reset", "lorr_no_reuse": "the reuse of the initial data",
         "lorr_no_sft": "the lambda_k SFT schedule"}

#: Full and quick settings (``--quick``); every one can be given on the command line too.
#: Full: 5 iterations of 4 rollout steps (20 steps, 1,280 rollouts per run; the paper runs
#: 3 iterations), measured 32.9 min for the 15 runs on 2 cores.
FULL = {"seeds": [0, 1, 2], "iterations": 5, "rollout_steps": 4, "mini_batch_pairs": 8, "val_samples": 2}
QUICK = {"seeds": [0], "iterations": 3, "rollout_steps": 2, "mini_batch_pairs": 8, "val_samples": 1}

#: Cost model (2 cores, seconds), fitted to the full setting's 15 runs (iterative DPO ~122 s
#: a run, the LoRR variants 131-139 s): start-up and shut-down of a run, a rollout step,
#: one optimizer step on a tiny model, a validation of 200 prompts x k samples (~4.5 s for
#: k = 2: the preference recipes' answers are short).
COST_STARTUP_S = 65.0
COST_COLLECT_S = 1.5
COST_OPT_STEP_S = 0.25
COST_VAL_S = 1.5
COST_VAL_S_PER_SAMPLE = 0.0075
PAIRS_PER_STEP = 8  # about half of the 16 groups have a reward gap at the start


def variant_overrides(label: str, rollout_steps: int, mini_batch_pairs: int | None) -> tuple[str, list[str]]:
    """``(recipe, overrides)`` of one variant with the iteration settings.

    Raises:
        KeyError: unknown label (names the known ones).
    """
    if label not in VARIANTS:
        raise KeyError(f"unknown variant {label!r}; known: {list(VARIANTS)}")
    recipe, extra = VARIANTS[label]
    it = [f"preference.iteration.rollout_steps={rollout_steps}",
          f"preference.iteration.mini_batch_pairs={'null' if mini_batch_pairs is None else mini_batch_pairs}"]
    return recipe, [*it, *extra]


def estimate_run_seconds(label: str, steps: int, rollout_steps: int, test_freq: int, val_samples: int,
                         mini_batch_pairs: int | None, n_test: int = 200) -> float:
    """Cost model of one run (:data:`COST_STARTUP_S` ...); LoRR variants train 3 epochs."""
    epochs = 1 if VARIANTS[label][0] == "iterative_dpo" else 3
    pairs = PAIRS_PER_STEP * rollout_steps
    opt_steps = epochs * math.ceil(pairs / (mini_batch_pairs or pairs))
    iterations = steps // rollout_steps
    vals = 1 + steps // test_freq + (1 if steps % test_freq else 0)
    return (COST_STARTUP_S + steps * COST_COLLECT_S + iterations * opt_steps * COST_OPT_STEP_S
            + vals * (COST_VAL_S + n_test * val_samples * COST_VAL_S_PER_SAMPLE))


# --------------------------------------------------------------------------- per-run numbers


def cumulative_rollouts(curve: dict) -> dict[int, float]:
    """step -> responses generated up to and including that step (``dpo/fresh_rollouts``;
    0 at step 0, the validation before training)."""
    fresh = series(curve, "dpo/fresh_rollouts")
    out, total = {}, 0.0
    for step in curve["steps"]:
        total += fresh.get(step, 0.0) if step > 0 else 0.0
        out[step] = total
    return out


def acc_at_budget(curve: dict, budget: float) -> tuple[float | None, int | None]:
    """Validation accuracy at the last validated step whose cumulative rollouts are within
    ``budget``, and that step (``(None, None)`` when none is)."""
    roll = cumulative_rollouts(curve)
    best = None
    for step in sorted(curve["val"]):
        if roll.get(step, float("inf")) <= budget + 1e-9:
            best = step
    return (curve["val"][best], best) if best is not None else (None, None)


def rollouts_to_target(curve: dict, target: float) -> float | None:
    """Cumulative rollouts at the first validated step (> 0) reaching ``target``."""
    roll = cumulative_rollouts(curve)
    for step in sorted(curve["val"]):
        if step > 0 and curve["val"][step] >= target - 1e-9:
            return roll[step]
    return None


def _last(s: Mapping[int, float]) -> float | None:
    return s[max(s)] if s else None


def run_stats(curve: dict, budget: float, target: float) -> dict:
    """The table's numbers for one run (see the module docstring)."""
    roll = cumulative_rollouts(curve)
    acc, step = acc_at_budget(curve, budget)
    last = max(curve["val"])
    resets = series(curve, "lorr/resets")
    reused = series(curve, "lorr/reused_initial")
    ra = series(curve, "dpo/reward_accuracy")
    opt = series(curve, "lorr/optimizer_steps")
    it = series(curve, "lorr/iteration")
    return {
        "start_acc": curve["val"].get(0), "final_acc": curve["val"][last], "best_acc": max(curve["val"].values()),
        "rollouts_total": roll[max(roll)], "acc_at_budget": acc, "budget_step": step,
        "rollouts_to_target": rollouts_to_target(curve, target),
        "resets": max(resets.values()) if resets else 0,
        # a reuse iteration is one step with lorr/reused_initial = 1
        "reused_steps": int(sum(reused.values())),
        "iterations": max(it.values()) if it else None,
        "optimizer_steps": sum(opt.values()) if opt else None,
        "reward_accuracy_mean": sum(ra.values()) / len(ra) if ra else None,
        "chosen_logps_last": _last(series(curve, "dpo/chosen_logps")),
        "rejected_logps_last": _last(series(curve, "dpo/rejected_logps")),
        "fresh_score_last": _last(series(curve, "dpo/fresh_score_mean")),
        "wall_s": curve["wall"][max(curve["wall"])],
    }


# --------------------------------------------------------------------------- across seeds


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _sd(xs):
    xs = [x for x in xs if x is not None]
    return statistics.stdev(xs) if len(xs) > 1 else 0.0


def sampling_se(p_a: float, p_b: float, n_samples: int) -> float:
    """Standard error of the difference of two accuracies that are each a mean of
    ``n_samples`` Bernoulli outcomes: sqrt((p_a (1 - p_a) + p_b (1 - p_b)) / n_samples)."""
    if n_samples <= 0:
        return 0.0
    return math.sqrt(max(p_a * (1 - p_a) + p_b * (1 - p_b), 0.0) / n_samples)


def paired_claim(name: str, a: str, b: str, stats: Mapping[tuple[str, int], dict], seeds: Sequence[int],
                 n_samples: int, key: str = "acc_at_budget", at_least: bool = True) -> dict:
    """Per-seed differences ``a - b`` of ``key`` (seeds where both runs have it) and a verdict.

    Spread: the larger of the sd of the differences and twice the mean sampling standard
    error of one difference over sqrt(seeds). ``at_least`` (the claim "a >= b"): *holds* when
    the mean difference is >= 0, *does not hold* when it is < -spread, else *inconclusive*.
    Otherwise (the effect of a part, a = with it, b = without): *helps* when the mean is
    > spread, *hurts* when < -spread, else *no measurable effect*.

    Returns:
        ``{"claim", "verdict", "diffs", "mean", "spread"}`` (``verdict`` "no data" without pairs).
    """
    diffs, ses = [], []
    for s in seeds:
        x, y = stats.get((a, s), {}).get(key), stats.get((b, s), {}).get(key)
        if x is None or y is None:
            continue
        diffs.append(x - y)
        ses.append(sampling_se(x, y, n_samples))
    if not diffs:
        return {"claim": name, "verdict": "no data", "diffs": [], "mean": None, "spread": None}
    mean = sum(diffs) / len(diffs)
    spread = max(_sd(diffs), 2 * (sum(ses) / len(ses)) / math.sqrt(len(diffs)))
    if at_least:
        verdict = "holds" if mean >= 0 else ("does not hold" if mean < -spread else "inconclusive (within spread)")
    else:
        verdict = ("helps" if mean > spread else "hurts" if mean < -spread else "no measurable effect")
    return {"claim": name, "verdict": verdict, "diffs": diffs, "mean": mean, "spread": spread}


def collapse_claim(stats: Mapping[tuple[str, int], dict], seeds: Sequence[int], n_samples: int,
                   label: str = "lorr_dpo") -> dict:
    """"LoRR never collapses": no seed's final accuracy is below its start by more than twice
    the sampling standard error of the difference."""
    falls = []
    for s in seeds:
        st = stats.get((label, s))
        if not st or st["start_acc"] is None:
            continue
        drop = st["start_acc"] - st["final_acc"]
        falls.append((s, drop, 2 * sampling_se(st["start_acc"], st["final_acc"], n_samples)))
    if not falls:
        return {"claim": f"{label} never collapses", "verdict": "no data", "falls": []}
    bad = [f for f in falls if f[1] > f[2]]
    return {"claim": f"{label} never collapses (final >= start - 2 SE on every seed)",
            "verdict": "does not hold" if bad else "holds", "falls": falls}


def claims(stats: Mapping[tuple[str, int], dict], seeds: Sequence[int], n_samples: int) -> list[dict]:
    """The findings: LoRR vs iterative DPO at equal rollouts, no collapse, each part's effect."""
    out = [paired_claim("LoRR-DPO at or above iterative DPO at equal rollouts (accuracy at the budget)",
                        "lorr_dpo", "iterative_dpo", stats, seeds, n_samples),
           collapse_claim(stats, seeds, n_samples)]
    for label, part in PARTS.items():
        out.append(paired_claim(f"{part} (lorr_dpo - {label}, accuracy at the budget)", "lorr_dpo", label, stats,
                                seeds, n_samples, at_least=False))
    return out


def findings_markdown(found: Sequence[dict]) -> str:
    lines = []
    for c in found:
        if "falls" in c:
            detail = ", ".join(f"seed {s}: drop {d:+.3f} (2 SE {e:.3f})" for s, d, e in c["falls"])
        elif c["mean"] is None:
            detail = "no runs"
        else:
            detail = (f"mean difference {c['mean']:+.3f}, spread {c['spread']:.3f}, per seed "
                      f"{', '.join(f'{d:+.3f}' for d in c['diffs'])}")
        lines.append(f"- {c['claim']}: {detail} -> **{c['verdict']}**")
    return "\n".join(lines)


def table(stats: dict, labels: Sequence[str], seeds: Sequence[int], budgets: Mapping[int, float],
          target: float) -> str:
    def f(x, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x)

    def pm(xs, fmt="{:.3f}"):
        m = _mean(xs)
        return "-" if m is None else (f"{fmt.format(m)} ± {fmt.format(_sd(xs))}" if len(seeds) > 1 else fmt.format(m))

    lines = [
        f"| variant | start acc | final acc | best acc | acc at budget | rollouts to {target:.3f} | rollouts used "
        "| iterations | reuse iterations | resets | optimizer steps | DPO reward acc | chosen / rejected logp (end) "
        "| fresh score (end) | train wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in labels:
        rows = [stats[(r, s)] for s in seeds if (r, s) in stats]
        if not rows:
            continue

        def col(k):
            return [x[k] for x in rows]

        reached = sum(x["rollouts_to_target"] is not None for x in rows)
        lines.append(
            f"| {r} | {pm(col('start_acc'))} | {pm(col('final_acc'))} | {pm(col('best_acc'))} | "
            f"{pm(col('acc_at_budget'))} | {f(_mean(col('rollouts_to_target')), '{:.0f}')} ({reached}/{len(rows)}) | "
            f"{f(_mean(col('rollouts_total')), '{:.0f}')} | {f(_mean(col('iterations')), '{:.1f}')} | "
            f"{f(_mean(col('reused_steps')), '{:.1f}')} | {f(_mean(col('resets')), '{:.1f}')} | "
            f"{f(_mean(col('optimizer_steps')), '{:.0f}')} | {f(_mean(col('reward_accuracy_mean')))} | "
            f"{f(_mean(col('chosen_logps_last')), '{:.1f}')} / {f(_mean(col('rejected_logps_last')), '{:.1f}')} | "
            f"{f(_mean(col('fresh_score_last')))} | {f(_mean(col('wall_s')), '{:.0f}')} |"
        )
    budget_text = ", ".join(f"seed {s}: {b:.0f}" for s, b in sorted(budgets.items()))
    return "\n".join(lines) + f"\n\nBudget (the fewest rollouts any variant of the seed generated): {budget_text}."


def plot(curves: dict, out: Path) -> Path:
    """Validation accuracy and training score against rollouts; chosen / rejected log-probs,
    DPO reward accuracy and margin, chosen NLL against step (resets marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(16, 7))
    for (r, seed), c in sorted(curves.items()):
        roll = cumulative_rollouts(c)
        kw = {"color": COLORS.get(r, "k"), "alpha": 0.8, "label": f"{r} s{seed}", "marker": "o", "ms": 3}
        vs = sorted(c["val"])
        ax[0, 0].plot([roll[s] for s in vs], [c["val"][s] for s in vs], **kw)
        score = series(c, "dpo/fresh_score_mean")
        ax[0, 2].plot([roll[s] for s in score], list(score.values()), **kw)
        for key, ls in (("dpo/chosen_logps", "-"), ("dpo/rejected_logps", "--")):
            s_ = series(c, key)
            ax[0, 1].plot(list(s_), list(s_.values()), **dict(kw, ls=ls, label=f"{r} s{seed} {key.split('/')[1]}"))
        for key, a in (("dpo/reward_accuracy", ax[1, 0]), ("dpo/reward_margin", ax[1, 1]),
                       ("lorr/sft_loss", ax[1, 2])):
            s_ = series(c, key)
            a.plot(list(s_), list(s_.values()), **kw)
        prev = 0.0
        for step, n in series(c, "lorr/resets").items():
            if n > prev:
                for a in (ax[1, 0], ax[1, 1]):
                    a.axvline(step, color=COLORS.get(r, "k"), alpha=0.15, lw=1)
            prev = n
    ax[0, 0].set(xlabel="rollouts generated", ylabel="validation accuracy (avg@k, T = 1)")
    ax[0, 1].set(xlabel="step", ylabel="sequence log-prob: chosen (solid), rejected (dashed)")
    ax[0, 2].set(xlabel="rollouts generated", ylabel="training score (fresh rollouts' mean)")
    ax[1, 0].set(xlabel="step", ylabel="dpo/reward_accuracy (mean over epochs)")
    ax[1, 1].set(xlabel="step", ylabel="dpo/reward_margin (lines: resets)")
    ax[1, 2].set(xlabel="step", ylabel="lorr/sft_loss: per-token NLL of the chosen")
    for a in ax.flat:
        a.grid(alpha=0.3)
    ax[0, 0].legend(fontsize=6)
    fig.suptitle("LoRR-DPO, its ablations and iterative DPO (CPU, tiny model, arithmetic)")
    fig.tight_layout()
    path = out / "lorr_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"smoke setting {QUICK} (~7 min)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=None, help=f"default {FULL['seeds']}")
    p.add_argument("--iterations", type=int, default=None,
                   help=f"steps = iterations x rollout steps (default {FULL['iterations']})")
    p.add_argument("--rollout-steps", type=int, default=None, help=f"default {FULL['rollout_steps']}")
    p.add_argument("--mini-batch-pairs", type=int, default=None, help=f"default {FULL['mini_batch_pairs']}")
    p.add_argument("--val-samples", type=int, default=None, help=f"default {FULL['val_samples']}")
    p.add_argument("--target-delta", type=float, default=0.05, help="target = mean start accuracy + this")
    p.add_argument("--out", default=str(REPO / "artifacts" / "bench" / "lorr"))
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run")
    p.add_argument("--dry-run", action="store_true", help="print the runs and the cost estimate, run nothing")
    p.add_argument("--report-only", action="store_true", help="table and curves from the runs under --out")
    return p


def settings(args) -> dict:
    """The run settings: ``--quick`` or full defaults, command-line values winning."""
    out = preset(args, FULL, QUICK)
    if out["iterations"] < 1 or out["rollout_steps"] < 1:
        raise SystemExit("--iterations and --rollout-steps must be >= 1")
    out["steps"] = out["iterations"] * out["rollout_steps"]
    out["test_freq"] = out["rollout_steps"]  # validate after each fresh iteration of the baseline
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    st = settings(args)
    seeds, labels = st["seeds"], list(args.variants)
    if "iterative_dpo" not in labels or "lorr_dpo" not in labels:
        print("[lorr] note: the main comparison needs both iterative_dpo and lorr_dpo", flush=True)
    jobs = [(seed, label) for seed in seeds for label in labels]
    est = {label: estimate_run_seconds(label, st["steps"], st["rollout_steps"], st["test_freq"], st["val_samples"],
                                       st["mini_batch_pairs"]) for label in labels}
    total = sum(est[label] for _, label in jobs)
    print(f"[lorr] {len(labels)} variants x {len(seeds)} seeds = {len(jobs)} runs of {st['steps']} steps "
          f"({st['iterations']} iterations x {st['rollout_steps']} rollout steps, mini-batches of "
          f"{st['mini_batch_pairs']} pairs, validation every {st['test_freq']} steps on {st['val_samples']} "
          f"sample(s) per test prompt); estimated {total / 60:.0f} min for runs not done yet", flush=True)
    if args.dry_run:
        for seed, label in jobs:
            recipe, ov = variant_overrides(label, st["rollout_steps"], st["mini_batch_pairs"])
            print(f"  {run_name(label, seed)}: recipe={recipe} {' '.join(ov)} ~{est[label]:.0f} s")
        return 0

    from benchmarks.learning import VAL_OVERRIDES, write_val_copies
    from benchmarks.learning_setup import RECOMMENDED_RL_OVERRIDES, build_setup, verl_overrides

    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    run_dirs: dict[tuple[str, int], Path] = {}
    failed: dict[tuple[str, int], str] = {}
    t0 = time.time()
    if args.report_only:
        for seed, label in jobs:
            d = out / "runs" / run_name(label, seed)
            if (d / "metrics.jsonl").is_file():
                run_dirs[(label, seed)] = d
        n_test = None
    else:
        import pandas as pd

        from benchmarks.runs import run_recipe

        setup = build_setup()
        val_file = write_val_copies(setup.data["test"], st["val_samples"], out / "data")
        n_test = len(pd.read_parquet(setup.data["test"]))
        common = [*verl_overrides(setup), *RECOMMENDED_RL_OVERRIDES, f"data.val_files={val_file}", *VAL_OVERRIDES]
        for i, (seed, label) in enumerate(jobs):
            print(f"[lorr] run {i + 1}/{len(jobs)}: {label} seed {seed}; elapsed {(time.time() - t0) / 60:.1f} min",
                  flush=True)
            recipe, ov = variant_overrides(label, st["rollout_steps"], st["mini_batch_pairs"])
            try:
                run_dirs[(label, seed)] = run_recipe(recipe, [*common, *ov, *args.override], out / "runs",
                                                     st["steps"], st["test_freq"], seed, out / "logs", label=label)
            except RunFailed as e:
                print(f"[lorr] {e}", flush=True)
                failed[(label, seed)] = str(e).splitlines()[0]
    if not run_dirs:
        print("[lorr] no finished run", flush=True)
        return 1
    curves = {k: read_curve(d) for k, d in run_dirs.items()}
    starts = [c["val"][0] for c in curves.values() if 0 in c["val"]]
    target = (sum(starts) / len(starts) if starts else 0.0) + args.target_delta
    budgets = {s: min(cumulative_rollouts(c)[max(c["steps"])] for (r, s2), c in curves.items() if s2 == s)
               for s in seeds if any(s2 == s for _, s2 in curves)}
    stats = {(r, s): run_stats(c, budgets[s], target) for (r, s), c in curves.items()}
    n_samples = (n_test or 200) * st["val_samples"]
    found = claims(stats, seeds, n_samples)
    md = table(stats, labels, seeds, budgets, target)
    png = plot(curves, out)
    text = "\n".join([
        "# LoRR-DPO vs iterative DPO at equal rollouts, and LoRR's ablations", "", md, "",
        f"Means over seeds {seeds} (± sample sd); target = mean start accuracy + {args.target_delta} = {target:.3f}; "
        f"rollouts to target: mean over the seeds that reached it (reached/seeds). Accuracy: avg@{st['val_samples']} "
        f"at T = 1. Wall = training (sum of timing_s/step), validation excluded.", "",
        "## Findings", "", findings_markdown(found), "",
        "## Settings", "",
        f"{st['iterations']} iterations x {st['rollout_steps']} rollout steps = {st['steps']} steps of 16 prompts x "
        f"n = 4, mini-batches of {st['mini_batch_pairs']} pairs, validation every {st['test_freq']} steps; "
        f"variants {dict((k, VARIANTS[k]) for k in labels)}; extra {args.override}; "
        f"failed runs {failed or 'none'}; total {(time.time() - t0) / 60:.1f} min.", "",
        f"Curves: {png}", "",
    ])
    (out / "lorr_results.md").write_text(text)
    (out / "lorr_results.json").write_text(json.dumps({
        "settings": st, "target": target, "budgets": budgets, "findings": found,
        "runs": [{"variant": r, "seed": s, **v} for (r, s), v in stats.items()], "failed": list(map(str, failed)),
    }, indent=1, default=str))
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
