"""Wall time, step times and peak memory of the main job (``./run.sh``) on this machine.

Runs ``./run.sh`` (default CPU config unless overrides are given) in a fresh artifacts
directory, samples the resident memory of every process of the run (the driver, Ray's
raylet/GCS and all Ray workers started during the run) every 0.5 s, and prints a
markdown table.

Usage: ``python benchmarks/main_job_resources.py [--keep DIR] [HYDRA OVERRIDES...]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def tree_rss(root: psutil.Process, baseline_pids: set[int]) -> int:
    """Resident bytes of ``root``'s tree plus any process started since the baseline
    (Ray daemons re-parent to init, so they are not in the tree)."""
    total = 0
    seen = set()
    procs = [root]
    try:
        procs += root.children(recursive=True)
    except psutil.Error:
        pass
    for p in psutil.process_iter(["pid"]):
        if p.pid not in baseline_pids:
            procs.append(p)
    for p in procs:
        if p.pid in seen:
            continue
        seen.add(p.pid)
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--keep", help="artifacts dir to use (default: a temp dir, removed)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    art = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_main_"))
    env = dict(os.environ, RECIPE_ARTIFACTS=str(art))
    baseline = {p.pid for p in psutil.process_iter()}
    free_before = psutil.virtual_memory().available
    start = time.monotonic()
    proc = subprocess.Popen([str(ROOT / "run.sh"), *args.overrides], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(proc.pid)
    peak = {"rss": 0, "used": 0}
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak["rss"] = max(peak["rss"], tree_rss(root, baseline))
            peak["used"] = max(peak["used"], free_before - psutil.virtual_memory().available)
            time.sleep(0.5)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out = proc.communicate()[0]
    done.set()
    t.join()
    wall = time.monotonic() - start
    (art / "bench_log.txt").write_text(out)
    if proc.returncode != 0:
        print(out[-3000:])
        sys.exit(f"run.sh failed with {proc.returncode}; log in {art / 'bench_log.txt'}")
    metrics = list((art / "runs").glob("*/metrics.jsonl"))
    rows = [json.loads(line) for line in metrics[0].read_text().splitlines()] if metrics else []
    steps = [r["data"]["timing_s/step"] for r in rows if "timing_s/step" in r["data"]]
    gen = [r["data"].get("timing_s/gen", float("nan")) for r in rows]
    upd = [r["data"].get("timing_s/update_actor", float("nan")) for r in rows]
    print("| run | steps | wall (s) | first step (s) | later steps, median (s) | gen / update, median (s) | peak RSS of the run (GiB) | peak system memory increase (GiB) |")
    print("|---|---|---|---|---|---|---|---|")
    later = statistics.median(steps[1:]) if len(steps) > 1 else float("nan")
    print(
        f"| ./run.sh {' '.join(args.overrides)} | {len(steps)} | {wall:.0f} | {steps[0]:.1f} | {later:.1f} | "
        f"{statistics.median(gen[1:] or gen):.2f} / {statistics.median(upd[1:] or upd):.2f} | "
        f"{peak['rss'] / 2**30:.2f} | {peak['used'] / 2**30:.2f} |"
    )
    if not args.keep:
        import shutil

        shutil.rmtree(art, ignore_errors=True)


if __name__ == "__main__":
    main()
