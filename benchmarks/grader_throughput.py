"""Throughput of the safe grading pool vs in-process math-verify on MATH500 answers.

Predictions are built from the 500 real MATH500 gold answers: ``\\boxed{<gold>}`` for even
items and a perturbed (wrong) answer for odd items (last digit changed, or ``+1`` appended).

* **in-process**: ``math_verify.parse`` + ``verify`` on the main thread of this process, the
  way an unprotected reward function would do it (math-verify's own signal timeouts on).
* **safe grader**: :class:`recipe.reward.grader.SafeGrader` with N worker processes, all items
  submitted at once with ``grade_batch`` (extraction, caps, pickling and IPC included).

Both sides parse the gold answer the same way (``$gold$``, falling back to ``\\boxed{gold}``).
Gold caching applies to both or to neither (``--gold-cache``): with ``--items <= 500`` every
gold answer is used once, so the cache cannot help either side. Pool start-up (forkserver,
worker import of math-verify) is excluded from the timed run and reported separately.

Usage::

    python benchmarks/grader_throughput.py [--items N] [--workers 2] [--gold-cache on|off]
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import multiprocessing
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from recipe.reward.grader import SafeGrader, _warm_up_math_verify, _wrap_gold, last_boxed  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "math500" / "test.jsonl"


def load_answers(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["answer"] for line in f if line.strip()]


def perturb(answer: str) -> str:
    digits = list(re.finditer(r"[0-9]", answer))
    if digits:
        m = digits[-1]
        return answer[: m.start()] + str((int(m.group()) + 1) % 10) + answer[m.end() :]
    return answer + "+1"


def build_items(answers: list[str], n: int) -> list[tuple[str, str, bool]]:
    items = []
    for i in range(n):
        gold = answers[i % len(answers)]
        pred = gold if i % 2 == 0 else perturb(gold)
        items.append((f"The final answer is $\\boxed{{{pred}}}$.", gold, i % 2 == 0))
    return items


def run_in_process(items, gold_cache: bool, extracted: bool = False) -> tuple[float, float, list[bool]]:
    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)

    def parse_gold(gold: str):
        res = parse(_wrap_gold(gold))
        if not res and "\\boxed" not in gold:
            res = parse(f"\\boxed{{{gold.strip()}}}")
        return res

    if gold_cache:
        parse_gold = functools.lru_cache(maxsize=1024)(parse_gold)
    _warm_up_math_verify()  # the same warm-up the pool's workers get (untimed on both sides)
    t0 = time.perf_counter()
    c0 = time.process_time()
    verdicts = []
    for pred, gold, _ in items:
        if extracted:  # the same input the pool's workers get: \boxed{<last box content>}
            pred = f"\\boxed{{{last_boxed(pred)}}}"
        g = parse_gold(gold)
        p = parse(pred)
        verdicts.append(bool(g) and bool(p) and bool(verify(g, p)))
    return time.perf_counter() - t0, time.process_time() - c0, verdicts


def _cpu_seconds(pid: int) -> float:
    """User+system CPU seconds of a process (Linux /proc; 0.0 where unavailable)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def run_pool(items, workers: int, gold_cache: bool) -> tuple[float, float, float, list[bool], dict]:
    t0 = time.perf_counter()
    grader = SafeGrader(num_workers=workers, gold_cache_size=1024 if gold_cache else 0)
    grader.warmup()
    startup = time.perf_counter() - t0
    try:
        pids = grader.worker_pids()
        cpu0 = sum(_cpu_seconds(p) for p in pids) + time.process_time()
        t0 = time.perf_counter()
        results = grader.grade_batch([(pred, gold, "boxed") for pred, gold, _ in items])
        elapsed = time.perf_counter() - t0
        same = grader.worker_pids() == pids
        cpu = sum(_cpu_seconds(p) for p in pids) + time.process_time() - cpu0 if same else float("nan")
        stats = grader.stats()
    finally:
        grader.close()
    return elapsed, cpu, startup, [r.correct for r in results], stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=500, help="items to grade (cycles over MATH500)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes of the safe grader")
    ap.add_argument("--gold-cache", choices=("on", "off"), default="on", help="gold parse cache, both sides")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MATH500 test.jsonl")
    ap.add_argument("--repeat", type=int, default=1, help="runs per method; the median time is reported")
    ap.add_argument("--no-single-worker-row", action="store_true", help="skip the 1-worker pool row")
    args = ap.parse_args(argv)

    answers = load_answers(args.data)
    items = build_items(answers, args.items)
    gold_cache = args.gold_cache == "on"
    expected = [want for *_, want in items]

    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2]

    worker_counts = [args.workers]
    if args.workers > 1 and not args.no_single_worker_row:
        worker_counts.insert(0, 1)
    # Every method starts cold (fresh processes: math-verify's parser warms up as it goes) and
    # the repetitions are interleaved so that load drift on a shared machine hits all alike.
    ctx = multiprocessing.get_context("spawn")
    times: dict[str, list[float]] = {}
    cpus: dict[str, list[float]] = {}
    verdicts: dict[str, list[bool]] = {}
    stats: dict[str, dict] = {}
    startups: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        for extracted in (False, True):
            key = f"in-process-{extracted}"
            with ctx.Pool(1) as p:
                s, c, v = p.apply(run_in_process, (items, gold_cache, extracted))
            times.setdefault(key, []).append(s)
            cpus.setdefault(key, []).append(c)
            verdicts.setdefault(key, v)
        for w in worker_counts:
            key = f"pool-{w}"
            s, c, startup, v, st = run_pool(items, w, gold_cache)
            times.setdefault(key, []).append(s)
            cpus.setdefault(key, []).append(c)
            startups.setdefault(key, []).append(startup)
            verdicts.setdefault(key, v)
            stats.setdefault(key, st)
    base_s, base_v = median(times["in-process-False"]), verdicts["in-process-False"]
    rows = [
        ("in-process math-verify, full response (main thread)", 1, base_s, median(cpus["in-process-False"]), base_v, None),
        (
            "in-process math-verify, pre-extracted box (main thread)",
            1,
            median(times["in-process-True"]),
            median(cpus["in-process-True"]),
            verdicts["in-process-True"],
            None,
        ),
    ]
    for w in worker_counts:
        key = f"pool-{w}"
        first, later = startups[key][0], median(startups[key][1:] or startups[key])
        name = f"SafeGrader pool (start-up excluded: {first:.2f} s first run, {later:.2f} s later)"
        rows.append((name, w, median(times[key]), median(cpus[key]), verdicts[key], stats[key]))

    n = len(items)
    print(f"\nMATH500 answers, {n} items, median of {args.repeat} run(s) ({sum(expected)} exact-gold, {n - sum(expected)} perturbed); "
          f"os.cpu_count()={os.cpu_count()}; gold parse cache: {args.gold_cache} for both methods"
          + (" (no effect: every gold is used once)" if n <= len(answers) else "") + "\n")
    print("| method | workers | items | seconds | items/s | speed-up vs in-process | CPU s (all processes) | verdict agreement with in-process |")
    print("|---|---|---|---|---|---|---|---|")
    for name, w, s, c, verdict, _ in rows:
        agree = sum(a == b for a, b in zip(verdict, base_v)) / n
        print(f"| {name} | {w} | {n} | {s:.2f} | {n / s:.0f} | {base_s / s:.2f}x | {c:.2f} | {agree:.1%} |")
    print()
    try:
        load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"- load average (1/5/15 min) at the end: {load} on {os.cpu_count()} CPUs")
    except OSError:
        pass
    for name, w, s, c, verdict, st in rows:
        right = sum(v == e for v, e in zip(verdict, expected))
        extra = ""
        if st:
            extra = f"; statuses: timeouts={st['timeout']} errors={st['error']} rejected={st['rejected']} no_answer={st['no_answer']}"
        print(f"- {name}, {w} worker(s): verdict == construction label on {right}/{n}{extra}")
    disagreements = [i for i, (a, b) in enumerate(zip(rows[-1][4], base_v)) if a != b]
    for i in disagreements[:10]:
        print(f"  disagreement #{i}: gold={items[i][1]!r} pred={items[i][0]!r} in-process={base_v[i]} pool={rows[-1][4][i]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
