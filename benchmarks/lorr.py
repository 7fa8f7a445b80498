"""LoRR-DPO against iterative DPO at equal numbers of rollouts, on the CPU learning task.

    python benchmarks/lorr.py                                  # runs what is missing, then the table
    python benchmarks/lorr.py --runs-from artifacts/bench/learning   # reuse the learning benchmark's runs

The runs are the learning benchmark's (``benchmarks/learning.py``: 2-digit addition, tiny
warm-started Qwen2, 64 rollouts per step = 16 prompts x n = 4, lr 1e-4, validation avg@4
sampled at T = 1, several seeds) for ``recipe=iterative_dpo`` and ``recipe=lorr_dpo``
(LoRR's defaults: L = 3 passes, a reset of the ``down_proj`` weights half way to theta_0
after every 3 passes, reuse of the first pairs after a reset with probability 0.5,
lambda_k = min(0.5, 0.25 k)). Missing runs are made by calling ``benchmarks/learning.py
--recipes iterative_dpo lorr_dpo`` into ``--runs-from`` (default ``artifacts/bench/lorr``).

LoRR generates no rollouts on the steps that reuse the initial pairs, so at equal steps it
has used fewer rollouts. The comparison is therefore made on the rollout axis
(``dpo/fresh_rollouts`` summed over steps): accuracy at the largest budget both recipes
reached (the last validation of each within it), the rollouts each needed to reach a
target accuracy, and the final numbers. Writes ``results.md`` / ``results.json`` and
``curves.png`` (validation accuracy and training reward against rollouts; chosen /
rejected log-probs, DPO reward accuracy and margin, NLL of the chosen responses against
step, resets marked) under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.runs import read_curve, run_name, series  # noqa: E402

RECIPES = ("iterative_dpo", "lorr_dpo")
COLORS = {"iterative_dpo": "tab:blue", "lorr_dpo": "tab:red"}


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


def run_stats(curve: dict, budget: float, target: float) -> dict:
    """The table's numbers for one run (see the module docstring)."""
    roll = cumulative_rollouts(curve)
    acc, step = acc_at_budget(curve, budget)
    last = max(curve["val"])
    resets = series(curve, "lorr/resets")
    reused = series(curve, "lorr/reused_initial")
    ra = series(curve, "dpo/reward_accuracy")
    return {
        "start_acc": curve["val"].get(0), "final_acc": curve["val"][last], "best_acc": max(curve["val"].values()),
        "rollouts_total": roll[max(roll)], "acc_at_budget": acc, "budget_step": step,
        "rollouts_to_target": rollouts_to_target(curve, target),
        "resets": max(resets.values()) if resets else 0, "reused_steps": int(sum(reused.values())),
        "reward_accuracy_mean": sum(ra.values()) / len(ra) if ra else None,
        "wall_s": curve["wall"][max(curve["wall"])],
    }


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def table(stats: dict, seeds: list[int], budget: float, target: float) -> str:
    def f(x, fmt="{:.3f}"):
        return "-" if x is None else fmt.format(x)

    lines = [
        f"| recipe | start acc | final acc (best) | acc at {budget:.0f} rollouts | rollouts to {target:.3f} "
        "| rollouts used | resets | reuse steps | DPO reward acc | train wall (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in RECIPES:
        rows = [stats[(r, s)] for s in seeds if (r, s) in stats]
        if not rows:
            continue
        m = {k: _mean([x[k] for x in rows]) for k in rows[0] if k != "budget_step"}
        reached = sum(x["rollouts_to_target"] is not None for x in rows)
        lines.append(
            f"| {r} | {f(m['start_acc'])} | {f(m['final_acc'])} ({f(m['best_acc'])}) | {f(m['acc_at_budget'])} | "
            f"{f(m['rollouts_to_target'], '{:.0f}')} ({reached}/{len(rows)} seeds) | {f(m['rollouts_total'], '{:.0f}')} | "
            f"{f(m['resets'], '{:.1f}')} | {f(m['reused_steps'], '{:.1f}')} | {f(m['reward_accuracy_mean'])} | "
            f"{f(m['wall_s'], '{:.0f}')} |"
        )
    return "\n".join(lines)


def plot(curves: dict, out: Path) -> Path:
    """Validation accuracy and training reward (``dpo/fresh_score_mean``) against rollouts;
    chosen / rejected log-probs, DPO reward accuracy and margin, chosen NLL against step
    (resets marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(16, 7))
    for (r, seed), c in sorted(curves.items()):
        roll = cumulative_rollouts(c)
        kw = {"color": COLORS[r], "alpha": 0.8, "label": f"{r} s{seed}", "marker": "o", "ms": 3}
        vs = sorted(c["val"])
        ax[0, 0].plot([roll[s] for s in vs], [c["val"][s] for s in vs], **kw)
        score = series(c, "dpo/fresh_score_mean")  # training reward of the fresh rollouts
        ax[0, 2].plot([roll[s] for s in score], list(score.values()), **kw)
        for key, ls in (("dpo/chosen_logps", "-"), ("dpo/rejected_logps", "--")):
            s_ = series(c, key)
            ax[0, 1].plot(list(s_), list(s_.values()), **dict(kw, ls=ls, label=f"{r} s{seed} {key.split('/')[1]}"))
        for key, a in (("dpo/reward_accuracy", ax[1, 0]), ("dpo/reward_margin", ax[1, 1])):
            s_ = series(c, key)
            a.plot(list(s_), list(s_.values()), **kw)
        resets = series(c, "lorr/resets")
        prev = 0.0
        for step, n in resets.items():
            if n > prev:
                for a in (ax[1, 0], ax[1, 1]):
                    a.axvline(step, color=COLORS[r], alpha=0.15, lw=1)
            prev = n
    ax[0, 0].set(xlabel="rollouts generated", ylabel="validation accuracy (avg@k, T = 1)")
    ax[0, 1].set(xlabel="step", ylabel="sequence log-prob: chosen (solid), rejected (dashed)")
    ax[1, 0].set(xlabel="step", ylabel="dpo/reward_accuracy (mean over passes)")
    ax[1, 1].set(xlabel="step", ylabel="dpo/reward_margin (lines: LoRR resets)")
    ax[0, 2].set(xlabel="rollouts generated", ylabel="training reward (fresh rollouts' mean score)")
    sft = {k: series(c, "lorr/sft_loss") for k, c in curves.items()}
    for (r, seed), s_ in sorted(sft.items()):
        ax[1, 2].plot(list(s_), list(s_.values()), color=COLORS[r], marker="o", ms=3, label=f"{r} s{seed}")
    ax[1, 2].set(xlabel="step", ylabel="lorr/sft_loss: per-token NLL of the chosen responses")
    for a in ax.flat:
        a.grid(alpha=0.3)
    ax[0, 0].legend(fontsize=7)
    fig.suptitle("LoRR-DPO vs iterative DPO (CPU, tiny model, arithmetic)")
    fig.tight_layout()
    path = out / "curves.png"
    fig.savefig(path, dpi=110)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs-from", default=str(REPO / "artifacts" / "bench" / "lorr"),
                   help="benchmarks/learning.py output folder holding runs/<recipe>_s<seed> (missing ones are run)")
    p.add_argument("--out", default=None, help="where results go (default: --runs-from)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--target-delta", type=float, default=0.05, help="target = mean start accuracy + this")
    p.add_argument("learning_args", nargs="*", help="extra arguments for benchmarks/learning.py (after --)")
    args = p.parse_args(argv)
    src = Path(args.runs_from).resolve()
    out = Path(args.out).resolve() if args.out else src
    out.mkdir(parents=True, exist_ok=True)
    missing = [(r, s) for r in RECIPES for s in args.seeds if not (src / "runs" / run_name(r, s) / "metrics.jsonl").exists()]
    if missing:
        print(f"[lorr] running {missing} through benchmarks/learning.py into {src}", flush=True)
        cmd = [sys.executable, str(REPO / "benchmarks" / "learning.py"), "--recipes", *RECIPES,
               "--seeds", *map(str, args.seeds), "--out", str(src), *args.learning_args]
        subprocess.run(cmd, check=True)
    curves = {(r, s): read_curve(src / "runs" / run_name(r, s)) for r in RECIPES for s in args.seeds}
    starts = [c["val"][0] for c in curves.values() if 0 in c["val"]]
    target = sum(starts) / len(starts) + args.target_delta
    budget = min(cumulative_rollouts(c)[max(c["steps"])] for c in curves.values())
    stats = {k: run_stats(c, budget, target) for k, c in curves.items()}
    md = table(stats, args.seeds, budget, target)
    png = plot(curves, out)
    text = (f"{md}\n\nMeans over seeds {args.seeds}. Budget: the fewest rollouts any run generated "
            f"({budget:.0f}); target: mean start accuracy + {args.target_delta}. Runs: {src / 'runs'}. "
            f"Curves: {png}\n")
    (out / "lorr_results.md").write_text(text)
    (out / "lorr_results.json").write_text(json.dumps({f"{r}_s{s}": v for (r, s), v in stats.items()}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
