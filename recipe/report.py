"""Training reports: a markdown summary table and plots from verl ``metrics.jsonl`` files.

Usage::

    python -m recipe.report RUN_DIR [RUN_DIR ...] [--out DIR] [--name LABEL ...]

Each ``RUN_DIR`` is a training run folder holding ``metrics.jsonl`` (the file that
verl's ``file`` logger writes, one JSON object per line:
``{"step": <int>, "data": {<metric name>: <number>, ...}}``); a path to a
``metrics.jsonl`` file is accepted as well. A resumed run appends to the same file, so
a step may appear more than once: the last logged value of each metric at each step
wins (see :func:`load_metrics`). Lines that cannot be parsed (a line cut short by a
crash, say) are skipped with a warning naming the file and line number.

Written to ``--out`` (default ``<RUN_DIR>/report`` for one run, ``./report`` for
several):

* ``report.md``: one table row per run (label, last step, wall time, final and best
  reward, training accuracy, every validation accuracy ``val-core/*/acc/mean@*``,
  entropy, KL and response length; ``-`` where a run did not log a metric) and one
  line per plot. The table is also printed to stdout.
* PNG plots, one per metric group present in at least one run, each metric drawn
  against the step (left) and against the cumulative wall time (right, the running sum
  of ``timing_s/step``), one line per run: ``reward.png`` (``critic/score/mean``,
  ``reward/acc``), ``val_acc.png``, ``entropy.png``, ``kl.png``, ``filter.png``
  (all ``filter/*``), ``replay.png`` (all ``replay/*``), ``lorr.png``, ``dpo.png``
  and ``dots.png``.

Runs are labelled by their directory name unless ``--name`` gives labels (one per run,
in order; ``--name a b`` or ``--name a --name b``).

Exit status: 0 on success, 2 on usage errors (a run directory or its
``metrics.jsonl`` missing, a wrong number of ``--name`` labels), 1 on other errors.

Python API: :func:`load_metrics`, :func:`summarize`, :func:`markdown_table`,
:func:`plot`, :func:`write_report` and :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger("recipe.report")

__all__ = [
    "METRICS_FILE",
    "PLOT_GROUPS",
    "STEP_TIME_KEY",
    "SUMMARY_METRICS",
    "VAL_ACC_PATTERN",
    "WALL_TIME_COLUMN",
    "PlotGroup",
    "find_metrics_file",
    "load_metrics",
    "main",
    "markdown_table",
    "plot",
    "summarize",
    "val_acc_keys",
    "write_report",
]

METRICS_FILE = "metrics.jsonl"
"""File name of the metrics log inside a run directory."""

STEP_TIME_KEY = "timing_s/step"
"""verl's per-step wall time in seconds; its running sum is the wall-time axis."""

WALL_TIME_COLUMN = "wall_time_s"
"""Column added by :func:`load_metrics`: cumulative ``timing_s/step`` up to each step."""

VAL_ACC_PATTERN = re.compile(r"^val-core/(?P<source>.+)/acc/mean@(?P<n>\d+)$")
"""Validation accuracy keys as verl logs them (``val-core/<data source>/acc/mean@<n>``)."""

SUMMARY_METRICS: tuple[tuple[str, str, str], ...] = (
    ("reward", "critic/score/mean", "max"),
    ("train acc", "reward/acc", "max"),
    # validation accuracies (one pair of columns per key found) are inserted here
    ("entropy", "actor/entropy", "max"),
    ("KL", "actor/kl_loss", "min"),
    ("response length", "response_length/mean", "max"),
)
"""``(column label, metric key, direction of "best")`` of the summary table, in order.

"best" is the highest value logged, except for KL where it is the lowest.
"""


@dataclass(frozen=True)
class PlotGroup:
    """One figure: a set of metrics selected by exact names and/or prefixes.

    Attributes:
        name: File stem of the figure (``<name>.png``).
        title: Figure title.
        keys: Exact metric names, plotted in this order.
        prefixes: Every metric starting with one of these is plotted too (sorted).
        matcher: Optional predicate on a metric name, for keys no prefix describes.
        markers: Draw a marker at every point (for sparse metrics such as validation).
    """

    name: str
    title: str
    keys: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    matcher: Callable[[str], bool] | None = None
    markers: bool = False

    def select(self, columns: Sequence[str]) -> list[str]:
        """Return the metrics of this group among ``columns``.

        Args:
            columns: Metric names present (in any run).

        Returns:
            The exact ``keys`` present, in their order, then the other matching names,
            sorted.
        """
        present = set(columns)
        out = [k for k in self.keys if k in present]
        extra = sorted(
            c
            for c in present - set(out)
            if (self.prefixes and c.startswith(self.prefixes)) or (self.matcher is not None and self.matcher(c))
        )
        return out + extra


PLOT_GROUPS: tuple[PlotGroup, ...] = (
    PlotGroup("reward", "Reward and training accuracy", keys=("critic/score/mean", "reward/acc")),
    PlotGroup("val_acc", "Validation accuracy", matcher=lambda k: VAL_ACC_PATTERN.match(k) is not None, markers=True),
    PlotGroup("entropy", "Policy entropy", keys=("actor/entropy",)),
    PlotGroup("kl", "KL to the reference policy", keys=("actor/kl_loss",)),
    PlotGroup("filter", "Group filter", prefixes=("filter/",)),
    PlotGroup("replay", "Rollout replay", prefixes=("replay/",)),
    PlotGroup("lorr", "LoRR", prefixes=("lorr/",)),
    PlotGroup("dpo", "DPO", prefixes=("dpo/",)),
    PlotGroup("dots", "DOTS", prefixes=("dots/",)),
)
"""The figures :func:`plot` may write, in order. A group with no metric present is skipped."""


# --------------------------------------------------------------------------- loading


def find_metrics_file(path: str | Path) -> Path:
    """Resolve a run directory (or a metrics file) to its ``metrics.jsonl``.

    Args:
        path: A run directory holding ``metrics.jsonl``, or the path of a metrics file.

    Returns:
        The metrics file.

    Raises:
        FileNotFoundError: ``path`` does not exist, or is a directory without
            ``metrics.jsonl``; the message names it.
    """
    p = Path(path)
    if p.is_dir():
        f = p / METRICS_FILE
        if not f.is_file():
            raise FileNotFoundError(f"{p}: run directory has no {METRICS_FILE}")
        return f
    if p.is_file():
        return p
    raise FileNotFoundError(f"{p}: no such run directory or metrics file")


def _as_number(v: object) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    return None


def _as_step(v: object) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def load_metrics(path: str | Path) -> pd.DataFrame:
    """Read a run's ``metrics.jsonl`` into a DataFrame, one row per step.

    A resumed run appends to the file, so a step can be logged more than once. The
    last logged value of each metric at a step wins: a later record of a step replaces
    every metric it carries, and metrics only the earlier record carried are kept. (When
    all records of a step carry the same metrics, as re-run training steps do, this is
    simply "the last occurrence of the step wins"; it also keeps a step's training
    metrics when a resumed run with ``val_before_train`` logs a validation-only record
    at its checkpoint step.)

    Blank lines are ignored. A line that is not valid JSON, or not an object with an
    integer ``step`` and a ``data`` object, is skipped with a warning (logger
    ``recipe.report``) naming the file and line number. Non-numeric values in ``data``
    are ignored; ``null`` becomes NaN.

    Args:
        path: A run directory holding ``metrics.jsonl``, or the path of the file.

    Returns:
        A float DataFrame indexed by step (``int``, sorted ascending, index name
        ``step``), one column per metric name (sorted), plus ``wall_time_s``: the
        cumulative sum of ``timing_s/step`` up to and including each step (steps that
        did not log it add 0; all NaN when the run never logged it).

    Raises:
        FileNotFoundError: The run directory or its ``metrics.jsonl`` is missing.
    """
    f = find_metrics_file(path)
    by_step: dict[int, dict[str, float]] = {}
    with open(f, encoding="utf-8", errors="replace") as fp:
        for lineno, line in enumerate(fp, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                logger.warning(
                    "%s:%d: skipping malformed line (invalid JSON: %s at column %d)", f, lineno, e.msg, e.colno
                )
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("data"), dict):
                logger.warning("%s:%d: skipping malformed line (not an object with a 'data' object)", f, lineno)
                continue
            step = _as_step(rec.get("step"))
            if step is None:
                logger.warning("%s:%d: skipping malformed line (missing or non-integer 'step')", f, lineno)
                continue
            row = by_step.setdefault(step, {})
            for k, v in rec["data"].items():
                if v is None:
                    row[str(k)] = math.nan
                    continue
                x = _as_number(v)
                if x is not None:
                    row[str(k)] = x
    steps = sorted(by_step)
    df = pd.DataFrame.from_records([by_step[s] for s in steps], index=pd.Index(steps, dtype="int64", name="step"))
    df = df.reindex(columns=sorted(df.columns)).astype("float64")
    if not by_step:
        logger.warning("%s: no metrics logged", f)
    if STEP_TIME_KEY in df.columns and df[STEP_TIME_KEY].notna().any():
        df[WALL_TIME_COLUMN] = df[STEP_TIME_KEY].fillna(0.0).cumsum()
    else:
        df[WALL_TIME_COLUMN] = np.nan
    return df


# --------------------------------------------------------------------------- summary


def _finite(df: pd.DataFrame, key: str) -> pd.Series:
    """The finite values of column ``key`` (an empty series when absent)."""
    if key not in df.columns:
        return pd.Series(dtype="float64")
    s = df[key]
    return s[np.isfinite(s.to_numpy(dtype="float64"))]


def val_acc_keys(runs: Mapping[str, pd.DataFrame]) -> list[str]:
    """Validation accuracy keys (``val-core/*/acc/mean@*``) logged by any run, sorted.

    Args:
        runs: Run label -> DataFrame from :func:`load_metrics`.

    Returns:
        The keys, sorted by data source then ``n``.
    """
    keys = {c for df in runs.values() for c in df.columns if VAL_ACC_PATTERN.match(c) and df[c].notna().any()}

    def order(k: str) -> tuple[str, int]:
        m = VAL_ACC_PATTERN.match(k)
        assert m is not None
        return m["source"], int(m["n"])

    return sorted(keys, key=order)


def _val_label(key: str) -> str:
    m = VAL_ACC_PATTERN.match(key)
    return f"val {m['source']} mean@{m['n']}" if m else key


def summarize(runs: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Summarize runs: length, wall time and final/best values of the key metrics.

    Args:
        runs: Run label -> DataFrame from :func:`load_metrics` (in display order).

    Returns:
        A DataFrame indexed by run label (index name ``run``) with columns ``steps``
        (the last step logged, int; 0 when nothing was logged), ``wall_time_s`` (sum of
        ``timing_s/step``; NaN when never logged), then ``"<metric> final"`` (the last
        finite value logged) and ``"<metric> best"`` for ``reward``
        (``critic/score/mean``), ``train acc`` (``reward/acc``), one
        ``val <source> mean@<n>`` pair per validation accuracy key logged by any run,
        ``entropy`` (``actor/entropy``), ``KL`` (``actor/kl_loss``) and
        ``response length`` (``response_length/mean``). "best" is the highest value,
        the lowest for KL. NaN where a run did not log a metric.
    """
    metrics: list[tuple[str, str, str]] = list(SUMMARY_METRICS[:2])
    metrics += [(_val_label(k), k, "max") for k in val_acc_keys(runs)]
    metrics += list(SUMMARY_METRICS[2:])
    rows = []
    for df in runs.values():
        row: dict[str, float] = {
            "steps": int(df.index.max()) if len(df.index) else 0,
            WALL_TIME_COLUMN: float(df[STEP_TIME_KEY].sum()) if _finite(df, STEP_TIME_KEY).size else math.nan,
        }
        for label, key, best in metrics:
            s = _finite(df, key)
            row[f"{label} final"] = float(s.iloc[-1]) if s.size else math.nan
            row[f"{label} best"] = float(s.max() if best == "max" else s.min()) if s.size else math.nan
        rows.append(row)
    columns = ["steps", WALL_TIME_COLUMN] + [f"{label} {w}" for label, _, _ in metrics for w in ("final", "best")]
    out = pd.DataFrame(rows, index=pd.Index(list(runs), name="run"), columns=columns)
    out["steps"] = out["steps"].astype("int64")
    out[columns[1:]] = out[columns[1:]].astype("float64")
    return out


def _fmt(col: str, v: object) -> str:
    if v is None or v is pd.NA or (isinstance(v, (float, np.floating)) and math.isnan(v)):
        return "-"
    if col == "steps":
        return str(int(v))  # type: ignore[arg-type]
    if col == WALL_TIME_COLUMN:
        return f"{float(v):.1f}"  # type: ignore[arg-type]
    return f"{float(v):.4g}"  # type: ignore[arg-type]


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(summary: pd.DataFrame) -> str:
    """Format :func:`summarize`'s result as a GitHub markdown table.

    Args:
        summary: The summary DataFrame.

    Returns:
        The table (header, separator, one row per run), without a trailing newline.
        Numbers have 4 significant digits, wall time 0.1 s; missing values are ``-``.
    """
    headers = ["run", "steps", "wall time (s)"] + [str(c) for c in summary.columns[2:]]
    lines = [
        "| " + " | ".join(_md_cell(h) for h in headers) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(headers) - 1)) + "|",
    ]
    for label, row in summary.iterrows():
        cells = [_md_cell(str(label))] + [_fmt(str(c), row[c]) for c in summary.columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def _time_unit(max_seconds: float) -> tuple[str, float]:
    if max_seconds >= 3 * 3600:
        return "h", 3600.0
    if max_seconds >= 180:
        return "min", 60.0
    return "s", 1.0


def plot(runs: Mapping[str, pd.DataFrame], out_dir: str | Path) -> list[Path]:
    """Write one PNG per metric group of :data:`PLOT_GROUPS` present in any run.

    Each figure has one row per metric of the group and two panels per row: the metric
    against the step and against the cumulative wall time (``wall_time_s``), one line
    per run with the run labels in the legend. Only steps where a metric was logged
    (finite values) are drawn, so sparse validation metrics connect their own points. A
    group none of whose metrics any run logged writes no file. Uses matplotlib's Agg
    canvas directly: no display, no pyplot state.

    Args:
        runs: Run label -> DataFrame from :func:`load_metrics` (in legend order).
        out_dir: Directory for the PNG files (created if needed).

    Returns:
        The paths written, in :data:`PLOT_GROUPS` order.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    present = sorted({c for df in runs.values() for c in df.columns if c != WALL_TIME_COLUMN and df[c].notna().any()})
    walls = [float(df[WALL_TIME_COLUMN].max()) for df in runs.values() if df[WALL_TIME_COLUMN].notna().any()]
    max_wall = max(walls, default=0.0)
    unit, scale = _time_unit(max_wall)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    written: list[Path] = []
    for group in PLOT_GROUPS:
        keys = group.select(present)
        if not keys:
            continue
        fig = Figure(figsize=(11, 2.9 * len(keys) + 0.6), dpi=100)
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(keys), 2, squeeze=False)
        for r, key in enumerate(keys):
            ax_step, ax_wall = axes[r]
            for (label, df), color in zip(runs.items(), colors):
                s = _finite(df, key)
                if s.empty:
                    continue
                style = {"color": color, "label": label, "linewidth": 1.4}
                if group.markers or len(s) <= 30:
                    style.update(marker="o", markersize=3.5)
                ax_step.plot(s.index.to_numpy(), s.to_numpy(), **style)
                wall = df.loc[s.index, WALL_TIME_COLUMN].to_numpy(dtype="float64")
                ok = np.isfinite(wall)
                if ok.any():
                    ax_wall.plot(wall[ok] / scale, s.to_numpy()[ok], **style)
            for ax, xlabel in ((ax_step, "step"), (ax_wall, f"wall time ({unit})")):
                ax.set_title(key, fontsize=10)
                ax.set_xlabel(xlabel)
                ax.grid(True, alpha=0.3)
                if ax is ax_step:
                    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                    lo, hi = ax.dataLim.intervalx
                    if ax.lines and lo == hi:  # a single step: keep integer ticks around it
                        ax.set_xlim(lo - 1, hi + 1)
                if ax.lines:
                    ax.legend(fontsize=8, loc="best")
                else:
                    ax.text(0.5, 0.5, f"no {STEP_TIME_KEY} logged", ha="center", va="center", transform=ax.transAxes)
        fig.suptitle(group.title)
        fig.tight_layout()
        path = out / f"{group.name}.png"
        fig.savefig(path, format="png")
        written.append(path)
    return written


# --------------------------------------------------------------------------- report + CLI


def write_report(
    runs: Mapping[str, pd.DataFrame],
    out_dir: str | Path,
    sources: Mapping[str, str | Path] | None = None,
) -> tuple[Path, str, list[Path]]:
    """Write ``report.md`` and the plots of :func:`plot` into ``out_dir``.

    Args:
        runs: Run label -> DataFrame from :func:`load_metrics`.
        out_dir: Output directory (created if needed).
        sources: Optional run label -> metrics file, listed in the report.

    Returns:
        The path of ``report.md``, the markdown table and the PNG paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(summarize(runs))
    pngs = plot(runs, out)
    lines = ["# Training report", ""]
    if sources:
        lines += [f"- `{label}`: `{sources[label]}`" for label in runs if label in sources] + [""]
    lines += [
        table,
        "",
        "Final = last logged value; best = highest value (lowest for KL). "
        'Wall time = sum of `timing_s/step`. "-" = not logged.',
        "",
        "## Plots",
        "",
    ]
    lines += [f"- ![{p.stem}]({p.name})" for p in pngs] or ["(no plottable metrics)"]
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return md, table, pngs


def _unique_labels(labels: Sequence[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        n = seen.get(lab, 0) + 1
        seen[lab] = n
        out.append(lab if n == 1 else f"{lab} ({n})")
    return out


def _default_label(metrics_file: Path) -> str:
    """The run directory's name; the file's stem for a metrics file not named ``metrics.jsonl``."""
    if metrics_file.name != METRICS_FILE:
        return metrics_file.stem
    return metrics_file.resolve().parent.name or str(metrics_file.parent)


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m recipe.report",
        description="Summary table (report.md) and plots of one or more training runs' metrics.jsonl.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directory holding metrics.jsonl (or the file)")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output directory (default: <RUN_DIR>/report for one run, ./report for several)",
    )
    p.add_argument(
        "--name",
        action="extend",
        nargs="+",
        default=None,
        metavar="LABEL",
        help="run labels, one per RUN_DIR in order (default: the directory names)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 on success, 2 on usage errors (missing run directory or
        ``metrics.jsonl``, wrong number of ``--name`` labels, bad arguments), 1 on
        other errors (e.g. the output directory cannot be written).
    """
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed its message
        return int(e.code) if isinstance(e.code, int) else 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.name is not None and len(args.name) != len(args.runs):
        print(
            f"error: --name gives {len(args.name)} label(s) for {len(args.runs)} run(s); give one per RUN_DIR",
            file=sys.stderr,
        )
        return 2
    files: list[Path] = []
    missing: list[str] = []
    for r in args.runs:
        try:
            files.append(find_metrics_file(r))
        except FileNotFoundError as e:
            missing.append(str(e))
    if missing:
        for m in missing:
            print(f"error: {m}", file=sys.stderr)
        return 2
    default_labels = [_default_label(f) for f in files]
    labels = _unique_labels(args.name if args.name is not None else default_labels)
    if args.out is not None:
        out_dir = args.out
    elif len(args.runs) == 1:
        out_dir = files[0].parent / "report"
    else:
        out_dir = Path("report")
    try:
        runs = {label: load_metrics(f) for label, f in zip(labels, files)}
        md, table, pngs = write_report(runs, out_dir, sources=dict(zip(labels, files)))
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(table)
    print(f"\nwrote {md} and {len(pngs)} plot(s): {', '.join(p.name for p in pngs) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
