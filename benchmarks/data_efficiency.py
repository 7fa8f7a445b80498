"""GRPO + DOTS + rollout replay against GRPO: steps and wall time to reach GRPO's final
validation accuracy (the DOTS + RR paper's Table 1 measure, arXiv 2506.05316), on a task a
tiny model learns on CPU, several seeds, side by side.

    python benchmarks/data_efficiency.py          # defaults: seeds 0 1 (GRPO, GRPO + DOTS + RR), parts alone on seed 0
    python benchmarks/data_efficiency.py --seeds 0 1 2 --ablation-seeds 0 1 2 --steps 30

The task and the warm-started tiny model come from ``benchmarks/learning_setup.py`` (the CPU
learning benchmark's setup: multi-digit arithmetic, a tiny Qwen2 warm-started by a short
SFT to 10-50 % accuracy); ``--model/--train/--val`` point at another one. Every variant runs
``recipe=grpo_dots_rr`` (the paper's GRPO: clip 0.2, no KL, no entropy term): the baseline
with ``replay.enable=false dots.enable=false``, ``replay_only`` / ``dots_only`` with one part
off (on ``--ablation-seeds``, default the first seed); same batch and learning rate
(:data:`benchmarks.learning_setup.RECOMMENDED_RL_OVERRIDES`: 16 prompts x n = 4, lr 1e-4),
validation set (avg@2 sampled at T = 1, :data:`VAL_OVERRIDES`) and steps. Per seed, the target is the baseline's final validation
accuracy; for GRPO + DOTS + RR the script reports the first validated step (and the wall
time of training up to it: the sum of ``timing_s/step``, which includes DOTS reference
rounds, excluding validation) at which its accuracy reaches the target, and the savings
in percent. It prints a markdown table, writes ``results.md`` / ``results.json`` and
``curves.png`` (validation accuracy against step and against wall time) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {
    "grpo": ["recipe=grpo_dots_rr", "replay.enable=false", "dots.enable=false"],
    "grpo_dots_rr": ["recipe=grpo_dots_rr"],
    "replay_only": ["recipe=grpo_dots_rr", "dots.enable=false"],
    "dots_only": ["recipe=grpo_dots_rr", "replay.enable=false"],
}
BASELINE = "grpo"
COLORS = {"grpo": "tab:blue", "grpo_dots_rr": "tab:red", "replay_only": "tab:green", "dots_only": "tab:orange"}

#: Validation sampled at the RL temperature, k samples per question (the warm start is
#: already at ~0.66 greedy; sampled accuracy, ~0.24 at the start, is what RL moves).
VAL_OVERRIDES = (
    "actor_rollout_ref.rollout.val_kwargs.do_sample=true",
    "actor_rollout_ref.rollout.val_kwargs.temperature=1.0",
    "actor_rollout_ref.rollout.val_kwargs.n=2",
)
#: The two parts alone run on these seeds only (``--ablation-seeds``; default: the first seed).
ABLATIONS = ("replay_only", "dots_only")


def val_key(row: dict) -> str | None:
    """The validation accuracy key of a metrics row (``val/<source>/avg@n``)."""
    keys = [k for k in row if k.startswith("val/") and "/avg@" in k and not k.startswith("val/average")]
    return keys[0] if keys else None


def read_curve(metrics_file: Path) -> dict:
    """steps, cumulative training wall time (s) and validation accuracy from metrics.jsonl."""
    rows: dict[int, dict] = {}
    for line in metrics_file.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            rows[int(rec["step"])] = rec["data"]
    wall, t = {}, 0.0
    val: dict[int, float] = {}
    for step in sorted(rows):
        row = rows[step]
        t += float(row.get("timing_s/step", 0.0))
        wall[step] = t
        key = val_key(row)
        if key is not None:
            val[step] = float(row[key])
    return {"wall": wall, "val": val, "rows": rows}


def first_reach(curve: dict, target: float) -> tuple[int | None, float | None]:
    """First validated step with accuracy >= target, and the training wall time up to it."""
    for step in sorted(curve["val"]):
        if step > 0 and curve["val"][step] >= target - 1e-9:
            return step, curve["wall"].get(step)
    return None, None


def run(variant: str, seed: int, args, setup: dict) -> Path:
    """One training run; returns its run dir (skipped when its metrics are complete)."""
    name = f"{variant}_s{seed}"
    run_dir = Path(args.out) / "runs" / name
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        steps = {json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()}
        if args.steps in steps:
            print(f"[bench] {name}: done already, reusing {metrics}", flush=True)
            return run_dir
    cmd = [
        sys.executable, "-m", "recipe.main", *VARIANTS[variant], *setup["overrides"],
        f"trainer.experiment_name={name}", f"trainer.default_local_dir={run_dir}",
        f"trainer.total_training_steps={args.steps}", f"trainer.test_freq={args.test_freq}",
        "trainer.save_freq=-1", "trainer.val_before_train=true", "trainer.resume_mode=disable",
        f"data.seed={seed}", f"replay.seed={seed}", f"dots.seed={seed}", *args.override,
    ]
    print(f"[bench] {name}: {' '.join(cmd[2:])}", flush=True)
    t0 = time.time()
    if metrics.exists():
        metrics.unlink()
    log = Path(args.out) / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if proc.returncode != 0:
        raise SystemExit(f"[bench] {name} failed (exit {proc.returncode}); log: {log}")
    print(f"[bench] {name}: {time.time() - t0:.0f} s", flush=True)
    return run_dir


def summarise(curves: dict, seeds: list[int], variants: list[str]) -> tuple[list[dict], str]:
    """Per seed and variant: steps and training wall time to the baseline's final accuracy."""
    rows = []
    for seed in seeds:
        base = curves[(BASELINE, seed)]
        last = max(base["val"])
        target = base["val"][last]
        base_wall = base["wall"][last]
        for variant in variants:
            if (variant, seed) not in curves:
                continue
            ours = curves[(variant, seed)]
            step, wall = first_reach(ours, target)
            if variant == BASELINE:
                step, wall = last, base_wall
            ours_steps = sorted(ours["rows"])
            rows.append({
                "seed": seed, "variant": variant, "target": target, "grpo_steps": last, "grpo_wall_s": base_wall,
                "steps": step, "wall_s": wall, "start_val": ours["val"].get(0),
                "final_val": ours["val"][max(ours["val"])], "best_val": max(ours["val"].values()),
                "steps_saved_pct": None if step is None else 100.0 * (1 - step / last),
                "time_saved_pct": None if wall is None else 100.0 * (1 - wall / base_wall),
                "per_step_s": ours["wall"][ours_steps[-1]] / ours_steps[-1],
                "effective_ratio": _mean(ours, "dots/effective_ratio"),
                "is_weight_mean": _mean(ours, "replay/is_weight_mean"),
                "pred_pearson": _mean(ours, "dots/pred_pearson"),
            })

    def f(x, fmt="{:.1f}"):
        return "not reached" if x is None or x != x else fmt.format(x)

    lines = [
        "| seed | variant | start -> final val acc (best) | steps / wall (s) to GRPO's final | steps saved "
        "| time saved | s/step | effective ratio | replay IS weight | DOTS pred. Pearson |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['variant']} | {f(r['start_val'], '{:.3f}')} -> {r['final_val']:.3f} "
            f"({r['best_val']:.3f}) | {f(r['steps'], '{}')} / {f(r['wall_s'], '{:.0f}')} | "
            f"{f(r['steps_saved_pct'])} % | {f(r['time_saved_pct'])} % | {r['per_step_s']:.1f} | "
            f"{f(r['effective_ratio'], '{:.2f}')} | {f(r['is_weight_mean'], '{:.3f}').replace('not reached', '-')} | "
            f"{f(r['pred_pearson'], '{:.2f}').replace('not reached', '-')} |"
        )
    return rows, "\n".join(lines)


def _mean(curve: dict, key: str) -> float:
    vals = [row[key] for row in curve["rows"].values() if isinstance(row.get(key), (int, float))]
    return sum(vals) / len(vals) if vals else float("nan")


def plot(curves: dict, seeds: list[int], out: Path) -> Path:
    """Validation accuracy against step and against training wall time, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for (variant, seed), c in sorted(curves.items()):
        steps = sorted(c["val"])
        label = f"{variant} seed {seed}"
        axes[0].plot(steps, [c["val"][s] for s in steps], marker="o", color=COLORS[variant], alpha=0.5 + 0.5 * (seed == seeds[0]), label=label)
        axes[1].plot([c["wall"].get(s, 0.0) for s in steps], [c["val"][s] for s in steps], marker="o",
                     color=COLORS[variant], alpha=0.5 + 0.5 * (seed == seeds[0]), label=label)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training wall time (s)")
    for ax in axes:
        ax.set_ylabel("validation accuracy (avg@2, T = 1)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle("GRPO vs GRPO + DOTS + RR and each part alone (CPU, tiny model, arithmetic)")
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=30, help="training steps of each run")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                   help=f"runs per seed ({BASELINE} is always run: it sets the target)")
    p.add_argument("--test-freq", type=int, default=6, help="validate every this many steps")
    p.add_argument("--ablation-seeds", type=int, nargs="*", default=None,
                   help="seeds of the replay-only / DOTS-only runs (default: the first seed)")
    p.add_argument("--out", default=str(REPO / "artifacts" / "bench" / "data_efficiency"))
    p.add_argument("--model", help="warm-started model dir (default: benchmarks/learning_setup.py)")
    p.add_argument("--train", help="train parquet (default: learning_setup)")
    p.add_argument("--val", help="validation parquet (default: learning_setup)")
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run")
    args = p.parse_args(argv)

    if args.model and args.train and args.val:
        setup = {"overrides": [f"actor_rollout_ref.model.path={args.model}", f"data.train_files={args.train}",
                               f"data.val_files={args.val}", "tiny_model.build=false"]}
    else:
        from benchmarks.learning_setup import build_setup, verl_overrides

        setup = {"overrides": verl_overrides(build_setup())}
    from benchmarks.learning_setup import RECOMMENDED_RL_OVERRIDES

    setup["overrides"] += [*RECOMMENDED_RL_OVERRIDES, *VAL_OVERRIDES]
    variants = [BASELINE] + [v for v in args.variants if v != BASELINE]
    ablation_seeds = args.seeds[:1] if args.ablation_seeds is None else args.ablation_seeds
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    curves = {}
    for seed in args.seeds:
        for variant in variants:
            if variant in ABLATIONS and seed not in ablation_seeds:
                continue
            run_dir = run(variant, seed, args, setup)
            curves[(variant, seed)] = read_curve(run_dir / "metrics.jsonl")
    rows, table = summarise(curves, args.seeds, variants)
    png = plot(curves, args.seeds, out)
    text = (f"{table}\n\nSettings: {args.steps} steps, validation every {args.test_freq}, seeds {args.seeds}, "
            f"overrides {setup['overrides'] + args.override}; total {time.time() - t0:.0f} s. Curves: {png}\n")
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(rows, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
