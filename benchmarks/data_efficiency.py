"""GRPO + DOTS + rollout replay against GRPO, and each part alone, in the DOTS + RR paper's
regime (arXiv 2506.05316, PAPERS.md §2), over paired seeds: steps and wall time to GRPO's
final validation accuracy, with the diagnostics that could show each part failing.

    python benchmarks/data_efficiency.py --quick        # smoke check: seed 0, GRPO vs GRPO + DOTS + RR, 10 steps
    python benchmarks/data_efficiency.py                # full: seeds 0 1 2, 4 variants, 30 steps (~2.3 h on 2 cores)
    python benchmarks/data_efficiency.py --dry-run      # the commands and a cost estimate only

**Task** (``benchmarks/learning_setup.py --task spread``): addition and multiplication of
1- to 4-digit numbers after one SFT warm start of a tiny Qwen2 (hidden 64), so that plain
GRPO starts with an effective ratio well below 0.5 (measured: 14 % of the groups all
correct, 56 % all wrong, effective ratio 0.30 with 8 samples at T = 1) and the question
text carries its difficulty (operation, operand lengths), as the paper's regime needs.

**Regime** (:data:`REGIME_OVERRIDES`, the paper's ratios at CPU scale): B = 72 groups per
step of G = 8 responses (paper: 512 x 8); GRPO generates all 72 fresh, GRPO + RR 36 fresh
(delta = 0.5) plus 36 replayed from a buffer of C = 2 x 36 = 72 groups (paper: 256 fresh, C
256-512), the first mu = 2 steps all fresh; 8 optimiser steps per training step (mini-batch
B / 8 = 9 prompts, paper 512 / 64); DOTS re-selects every mu = 2 steps from K = 36 reference
questions x 8 rollouts, half the 2 x 36 x 8 fresh rollouts of a round (the paper's ratio:
256 x 8 per 2 x 256 x 8), predicting with a difficulty adapter trained offline, as the paper
does, on rollouts of other policies of the task (``--adapter auto``: two other SFT
checkpoints, :mod:`benchmarks.dots_adapter`; measured held-out Pearson on the warm start, a
policy it never saw: 0.74 with 256 references, 0.69 ± 0.04 with 36; ``--adapter none``: the
identity projection). B = 72 is the smallest batch at which the paper's reference ratio
gives K >= 32: with 16 of the 36 held out per round (each predicted from the other 20) the
per-round Pearson has 16 points and the pooled one 16 x rounds; holding out 32 would leave 4
references to predict from, a diagnostic far more pessimistic than the method it measures.
lr 1e-4 (the tiny model's measured scale; paper 1e-6 for 1.5B), T = 1 (the warm start's;
paper T = 0.6, top-p 0.95), no KL, no entropy term, clip 0.2.

**Pairing**: a seed is the one top-level ``seed`` key (:func:`benchmarks.runs.recipe_command`):
every variant of a seed shares the warm start, data order and sampling seeds wherever it does
not differ by design.

**Measures** per seed: the target is GRPO's final validation accuracy (avg@2 at T = 1);
for every other variant the first validated step reaching it and the training wall time up
to it (the sum of ``timing_s/step``, DOTS reference rounds included, validation excluded),
as a ratio of GRPO's; beside it, when GRPO itself first reached its final value before its
last step, that share of its own wall time (``grpo_self_ratio``: below 1 the target is in the
noise of a plateau, and the time ratio cannot separate the methods). Diagnostics:
``dots/effective_ratio`` (fresh groups with 0 < acc < 1), replay ages (``replay/mean_age``, ``replay/max_age``, steps), the spread of the
behaviour weights (``replay/is_weight_std``, ``_min``, ``_ess``) and ``replay/truncated_frac``,
DOTS's per-round and pooled held-out Pearson. **Claims** (:func:`claims`): time ratio <=
0.75 on every seed; DOTS raises the effective ratio by >= 0.15; pooled Pearson >= 0.5.

Writes ``results.md`` / ``results.json`` and ``curves.png`` under ``--out``; runs under
``<out>/runs/<variant>_s<seed>`` (finished runs of the same command are reused).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import runs  # noqa: E402

#: Every variant is ``recipe=grpo_dots_rr`` with parts switched off (same loss, advantages, lr).
VARIANTS: dict[str, list[str]] = {
    "grpo": ["replay.enable=false", "dots.enable=false"],
    "grpo_dots_rr": [],
    "replay_only": ["dots.enable=false"],
    "dots_only": ["replay.enable=false"],
}
BASELINE = "grpo"
COLORS = {"grpo": "tab:blue", "grpo_dots_rr": "tab:red", "replay_only": "tab:green", "dots_only": "tab:orange"}

#: The paper's batch ratios at CPU scale (module docstring).
REGIME_OVERRIDES: tuple[str, ...] = (
    "data.train_batch_size=72",
    "actor_rollout_ref.rollout.n=8",
    "actor_rollout_ref.actor.ppo_mini_batch_size=9",
    "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=24",
    "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=24",
    "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=24",
    "actor_rollout_ref.actor.optim.lr=1e-4",
    "replay.fresh_fraction=0.5",
    "replay.capacity_ratio=2.0",
    "replay.warmup_steps=2",
    "dots.every=2",
    "dots.ref_size=null",
    "dots.reference_ratio=0.5",
    "dots.ref_samples=8",
    "dots.holdout_size=16",
)
#: Validation sampled at the RL temperature, 2 samples per question.
VAL_OVERRIDES: tuple[str, ...] = (
    "actor_rollout_ref.rollout.val_kwargs.do_sample=true",
    "actor_rollout_ref.rollout.val_kwargs.temperature=1.0",
    "actor_rollout_ref.rollout.val_kwargs.n=2",
)
#: Targets of the issue (the paper's claims at this scale).
MAX_TIME_RATIO = 0.75
MIN_EFFECTIVE_GAIN = 0.15
MIN_POOLED_PEARSON = 0.5

#: Per-run diagnostics: column -> (metric, how steps are reduced).
DIAGNOSTICS: dict[str, tuple[str, str]] = {
    "effective_ratio": ("dots/effective_ratio", "mean"),
    "replay_mean_age": ("replay/mean_age", "mean"),
    "replay_max_age": ("replay/max_age", "max"),
    "is_weight_std": ("replay/is_weight_std", "mean"),
    "is_weight_min": ("replay/is_weight_min", "min"),
    "is_weight_ess": ("replay/is_weight_ess", "mean"),
    "truncated_frac": ("replay/truncated_frac", "mean"),
    "pearson_round_mean": ("dots/pred_pearson", "mean"),
    "pearson_rounds": ("dots/pred_pearson", "count"),
    "pearson_undefined": ("dots/pred_pearson_undefined", "last"),
    "pearson_pooled": ("dots/pred_pearson_pooled", "last"),
    "calibration_fallback": ("dots/calibration_fallback", "mean"),
    "reference_rollouts": ("dots/reference_rollouts", "sum"),
}


def reduce_metric(curve: dict, key: str, how: str) -> float:
    """One number from a metric's per-step values: ``mean`` / ``max`` / ``min`` / ``sum`` /
    ``last`` / ``count`` (NaN when the metric was never logged; ``count`` then 0)."""
    values = list(runs.series(curve, key).values())
    if how == "count":
        return float(len(values))
    if not values:
        return float("nan")
    return {"mean": statistics.fmean, "max": max, "min": min, "sum": sum, "last": lambda v: v[-1]}[how](values)


def run_row(variant: str, seed: int, curve: dict, base: dict) -> dict:
    """The measures of one run against its seed's GRPO run (module docstring)."""
    last = max(base["val"])
    target, base_wall = base["val"][last], base["wall"][last]
    _, base_first_wall = runs.first_reach(base, target)
    if variant == BASELINE:
        step, wall = last, base_wall
    else:
        step, wall = runs.first_reach(curve, target)
    final = max(curve["val"])
    row = {
        "seed": seed, "variant": variant, "target": target, "grpo_steps": last, "grpo_wall_s": base_wall,
        "steps": step, "wall_s": wall, "start_val": curve["val"].get(0), "final_val": curve["val"][final],
        "best_val": max(curve["val"].values()),
        "step_ratio": None if step is None else step / last,
        "time_ratio": None if wall is None else wall / base_wall,
        # GRPO's own first validated step at its final value, as a share of its run: below 1 the
        # target sits in the noise of a plateau that GRPO had already reached
        "grpo_self_ratio": None if base_first_wall is None else base_first_wall / base_wall,
        "s_per_step": curve["wall"][curve["steps"][-1]] / max(1, curve["steps"][-1]),
    }
    for col, (key, how) in DIAGNOSTICS.items():
        row[col] = reduce_metric(curve, key, how)
    return row


def _mean_sd(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else float("nan"))


def claims(rows: list[dict], seeds: list[int]) -> list[dict]:
    """The issue's targets, each with a verdict (``holds`` / ``does not hold`` / ``not measured``)
    and the numbers behind it (paired per seed)."""
    by = {(r["variant"], r["seed"]): r for r in rows}
    out = []
    dots_rr = [by[("grpo_dots_rr", s)] for s in seeds if ("grpo_dots_rr", s) in by]
    if dots_rr:
        ratios = [r["time_ratio"] for r in dots_rr]
        selfs = [r.get("grpo_self_ratio") for r in dots_rr]
        ok = all(r is not None and r <= MAX_TIME_RATIO for r in ratios)
        numbers = ", ".join("not reached" if r is None else f"{r:.2f}" for r in ratios)
        if any(x is not None and x < 1 for x in selfs):
            numbers += ("; GRPO itself first reached its final value at "
                        + ", ".join("-" if x is None else f"{x:.2f}" for x in selfs) + " of its own wall time")
        out.append({
            "claim": f"GRPO + DOTS + RR reaches GRPO's final accuracy in <= {MAX_TIME_RATIO}x its wall time, every seed",
            "verdict": "holds" if ok else "does not hold",
            "numbers": numbers,
        })
    for variant in ("dots_only", "grpo_dots_rr"):
        diffs = [by[(variant, s)]["effective_ratio"] - by[(BASELINE, s)]["effective_ratio"]
                 for s in seeds if (variant, s) in by and (BASELINE, s) in by]
        diffs = [d for d in diffs if not math.isnan(d)]
        if diffs:
            mean, sd = _mean_sd(diffs)
            out.append({
                "claim": f"{variant}: effective ratio >= GRPO's + {MIN_EFFECTIVE_GAIN}",
                "verdict": "holds" if mean >= MIN_EFFECTIVE_GAIN else "does not hold",
                "numbers": f"paired diff {mean:+.3f} (sd {sd:.3f}; per seed {', '.join(f'{d:+.3f}' for d in diffs)})",
            })
    pooled = [by[(v, s)]["pearson_pooled"] for v in ("dots_only", "grpo_dots_rr") for s in seeds if (v, s) in by]
    pooled = [p for p in pooled if not math.isnan(p)]
    out.append({
        "claim": f"DOTS's held-out Pearson (pooled over rounds) >= {MIN_POOLED_PEARSON}",
        "verdict": "not measured" if not pooled else ("holds" if min(pooled) >= MIN_POOLED_PEARSON else "does not hold"),
        "numbers": ", ".join(f"{p:.2f}" for p in pooled) or "-",
    })
    return out


def _f(x, fmt: str = "{:.2f}", none: str = "-") -> str:
    return none if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def tables(rows: list[dict], seeds: list[int], variants: list[str]) -> str:
    """Markdown: the summary (mean ± sd over seeds), the claims, the per-run rows."""
    lines = ["| variant | seeds | final val acc | time ratio to GRPO's final | reached | s/step | effective ratio "
             "| replay mean / max age (steps) | IS weight sd / min / ESS | truncated | Pearson pooled (rounds) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for v in variants:
        rs = [r for r in rows if r["variant"] == v]
        if not rs:
            continue

        def ms(col, fmt="{:.3f}"):
            m, sd = _mean_sd([r[col] for r in rs])
            return _f(m, fmt) + ("" if math.isnan(sd) else " ± " + _f(sd, fmt))

        reached = sum(r["time_ratio"] is not None for r in rs)
        lines.append(
            f"| {v} | {len(rs)} | {ms('final_val')} | {ms('time_ratio', '{:.2f}')} | {reached}/{len(rs)} "
            f"| {ms('s_per_step', '{:.1f}')} | {ms('effective_ratio')} | {ms('replay_mean_age', '{:.1f}')} / "
            f"{ms('replay_max_age', '{:.0f}')} | {ms('is_weight_std')} / {ms('is_weight_min')} / {ms('is_weight_ess')} "
            f"| {ms('truncated_frac')} | {ms('pearson_pooled')} ({ms('pearson_rounds', '{:.0f}')}) |"
        )
    lines += ["", "| claim | verdict | numbers |", "|---|---|---|"]
    lines += [f"| {c['claim']} | **{c['verdict']}** | {c['numbers']} |" for c in claims(rows, seeds)]
    lines += ["", "| seed | variant | start -> final val (best) | steps / wall s to GRPO's final | time ratio "
              "| effective ratio | mean / max age | Pearson round mean / pooled | calibration fallback |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = _f(r["time_ratio"])
        if r["variant"] == BASELINE and r.get("grpo_self_ratio") is not None and r["grpo_self_ratio"] < 1:
            ratio += f" (itself first at {r['grpo_self_ratio']:.2f})"  # GRPO's own first reach of its final
        lines.append(
            f"| {r['seed']} | {r['variant']} | {_f(r['start_val'], '{:.3f}')} -> {r['final_val']:.3f} "
            f"({r['best_val']:.3f}) | {_f(r['steps'], '{}', 'not reached')} / {_f(r['wall_s'], '{:.0f}', '-')} "
            f"| {ratio} | {_f(r['effective_ratio'])} | {_f(r['replay_mean_age'], '{:.1f}')} / "
            f"{_f(r['replay_max_age'], '{:.0f}')} | {_f(r['pearson_round_mean'])} / {_f(r['pearson_pooled'])} "
            f"| {_f(r['calibration_fallback'])} |"
        )
    return "\n".join(lines)


def plot(curves: dict, seeds: list[int], out: Path) -> Path:
    """Validation accuracy against step and against training wall time; effective ratio and
    replay age against step; one line per run (the first seed opaque)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for (variant, seed), c in sorted(curves.items()):
        alpha = 1.0 if seed == seeds[0] else 0.45
        kw = dict(color=COLORS.get(variant), alpha=alpha, label=f"{variant} s{seed}")
        steps = sorted(c["val"])
        axes[0, 0].plot(steps, [c["val"][s] for s in steps], marker="o", **kw)
        axes[0, 1].plot([c["wall"].get(s, 0.0) for s in steps], [c["val"][s] for s in steps], marker="o", **kw)
        eff = runs.series(c, "dots/effective_ratio")
        axes[1, 0].plot(list(eff), list(eff.values()), **kw)
        age = runs.series(c, "replay/mean_age")
        if age:
            axes[1, 1].plot(list(age), list(age.values()), **kw)
    axes[0, 0].set(xlabel="step", ylabel="val accuracy (avg@2, T = 1)")
    axes[0, 1].set(xlabel="training wall time (s)", ylabel="val accuracy (avg@2, T = 1)")
    axes[1, 0].set(xlabel="step", ylabel="effective ratio (fresh groups, 0 < acc < 1)")
    axes[1, 1].set(xlabel="step", ylabel="replay mean age (steps)")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("GRPO vs GRPO + DOTS + RR and each part alone (CPU, tiny model, spread task)")
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke check: seed 0, grpo and grpo_dots_rr, 10 steps, validation every 5")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=30,
                   help="training steps of each run (GRPO plateaus from step ~15 on this task; the paper runs 60)")
    p.add_argument("--test-freq", type=int, default=5, help="validate every this many steps")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help=f"runs per seed ({BASELINE} is always run: it sets the target)")
    p.add_argument("--task", default="spread", help="named task of benchmarks/learning_setup.py")
    p.add_argument("--adapter", default="auto",
                   help="DOTS difficulty adapter: 'auto' (default: benchmarks/dots_adapter.py's, trained offline "
                        "on 2 other policies of the task, built or reused), 'none' (identity projection) or a file "
                        "(with --encoder)")
    p.add_argument("--encoder", help="embedding model of an adapter file (default: the task's warm start)")
    p.add_argument("--out", default=str(REPO / "artifacts" / "bench" / "data_efficiency"))
    p.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.test_freq = [0], 10, 5
        args.variants = [v for v in args.variants if v in ("grpo", "grpo_dots_rr")]
    from benchmarks.learning_setup import TASKS, build_setup, verl_overrides

    if args.task not in TASKS:
        raise SystemExit(f"--task {args.task!r}: not one of {sorted(TASKS)}")
    setup = build_setup(TASKS[args.task])
    overrides = [*verl_overrides(setup), *REGIME_OVERRIDES, *VAL_OVERRIDES]
    if args.adapter == "auto":
        from benchmarks.dots_adapter import TRAIN_POLICIES, AdapterBenchConfig, build_adapter, dots_overrides

        adapter = build_adapter(setup, AdapterBenchConfig(train_policies=TRAIN_POLICIES[:2]))
        overrides += dots_overrides(adapter)
    elif args.adapter != "none":
        if not Path(args.adapter).is_file():
            raise SystemExit(f"--adapter {args.adapter}: no such file")
        overrides += [f"dots.adapter={Path(args.adapter).resolve()}",
                      f"dots.encoder={Path(args.encoder or setup.warm_model).resolve()}"]
    overrides += args.override
    variants = [BASELINE] + [v for v in args.variants if v != BASELINE]
    out = Path(args.out)
    jobs = [(seed, v) for seed in args.seeds for v in variants]
    if args.dry_run:
        for seed, v in jobs:
            cmd = runs.recipe_command("grpo_dots_rr", [*overrides, *VARIANTS[v]], out / "runs" / runs.run_name(v, seed),
                                      args.steps, args.test_freq, seed)
            print(" ".join(cmd[2:]))
        print(f"{len(jobs)} runs x {args.steps} steps")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    curves: dict[tuple[str, int], dict] = {}
    for i, (seed, v) in enumerate(jobs, 1):
        print(f"[data_efficiency] run {i}/{len(jobs)}: {v} seed {seed} ({time.time() - t0:.0f} s so far)", flush=True)
        run_dir = runs.run_recipe("grpo_dots_rr", [*overrides, *VARIANTS[v]], out / "runs", args.steps,
                                  args.test_freq, seed, out / "logs", label=v)
        curves[(v, seed)] = runs.read_curve(run_dir)
    rows = [run_row(v, s, curves[(v, s)], curves[(BASELINE, s)]) for s, v in jobs]
    text = tables(rows, args.seeds, variants)
    png = plot(curves, args.seeds, out)
    text += (f"\n\nSettings: task {args.task} ({setup.root}), {args.steps} steps, validation every {args.test_freq}, "
             f"seeds {args.seeds}; overrides {overrides}; total {time.time() - t0:.0f} s on this machine. "
             f"Curves: {png}\n")
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"rows": rows, "claims": claims(rows, args.seeds)}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
