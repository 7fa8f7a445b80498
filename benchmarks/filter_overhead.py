"""Overhead of this project's trainer path: GRPO with the group-filter stage on, against
stock verl GRPO, on the same CPU config, side by side.

Variants (each a real ``./run.sh`` through verl's V1 trainer, same seed and data):

- ``stock``: verl's own sync trainer and sampler (``trainer.v1.trainer_mode=sync``, no
  custom sampler; verl polls TransferQueue every 2 s);
- ``ours@2s``: ``RecipeTrainer`` + ``GroupFilterReplayBuffer`` with the filter on but
  keeping every group (``group_filter.band=[0,1]``: every group is classified, none is
  dropped, so both train on the same amount of data) and verl's 2 s poll interval: the
  apples-to-apples overhead;
- ``ours``: the same with this project's default 0.2 s poll interval.

The per-step wall time is ``timing_s/step`` (steps after the first, which includes
warm-up), median over steps and repeats. Target: ours@2s / stock <= 1.02.

Usage: ``python benchmarks/filter_overhead.py [--steps 6] [--repeats 2]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = {
    "stock": ["trainer.v1.trainer_mode=sync", "trainer.v1.sampler.custom_sampler.path=null",
              "trainer.v1.sampler.custom_sampler.name=null"],
    "ours@2s": ["group_filter.band=[0.0,1.0]", "trainer.v1.sampler.sampler_kwargs.poll_interval=2.0"],
    "ours": ["group_filter.band=[0.0,1.0]"],
}


def run(art: Path, name: str, steps: int, extra: list[str]) -> list[float]:
    cmd = [str(ROOT / "run.sh"), f"trainer.experiment_name={name}", f"trainer.total_training_steps={steps}",
           "trainer.test_freq=-1", "trainer.save_freq=-1", "trainer.resume_mode=disable", *extra]
    proc = subprocess.run(cmd, env=dict(os.environ, RECIPE_ARTIFACTS=str(art)), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (art / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    return [r["data"]["timing_s/step"] for r in rows][1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    art = Path(tempfile.mkdtemp(prefix="bench_filter_"))
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for rep in range(args.repeats):  # interleaved, so drift hits every variant alike
        for name, extra in VARIANTS.items():
            times[name] += run(art, f"{name.replace('@', '_')}_{rep}", args.steps, extra)
            print(f"repeat {rep} {name}: {times[name][-(args.steps - 1):]}", flush=True)
    base = statistics.median(times["stock"])
    print(f"\nGRPO, CPU config, {args.steps} steps x {args.repeats} repeats (first step of each run excluded)\n")
    print("| variant | median step (s) | mean step (s) | vs stock |")
    print("|---|---:|---:|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.2f} | {statistics.mean(ts):.2f} | {med / base:.3f}x |")


if __name__ == "__main__":
    main()
