"""Shared pieces of the CPU learning benchmarks: launch one training run, read its curve.

Used by ``benchmarks/learning.py`` (every recipe side by side, issue 6) and meant for
``benchmarks/data_efficiency.py`` (issue 5). A run is one ``python -m recipe.main`` process
(Ray, FSDP workers, rollout server) writing ``<run dir>/metrics.jsonl`` (verl's ``file``
logger: one ``{"step": int, "data": {metric: number}}`` object per line).

* :func:`recipe_command` / :func:`run_recipe`: the command of one run and its launch;
  a finished run of the same command (same steps and overrides, :func:`is_finished`) is
  reused, so a benchmark that was stopped resumes where it stopped (an unfinished run is
  started over: runs use ``trainer.resume_mode=disable`` and save no checkpoints).
* :func:`read_curve`: steps, cumulative training wall time (running sum of
  ``timing_s/step``, validation excluded), validation accuracy and every other metric.
* :func:`first_reach`: the first validated step (and its wall time) at a target accuracy.

Ray: runs start their own local Ray instance (``ray.init()`` without an address, verl's
default). ``ray_kwargs.ray_init.address`` is not a key of verl 0.9.1's ``ppo_trainer.yaml``
(Hydra rejects ``ray_kwargs.ray_init.address=local``: "Key 'address' is not in struct"),
so none is passed; a ``RAY_ADDRESS`` in the caller's environment would still be honoured.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

METRICS_FILE = "metrics.jsonl"
#: The command of a run (without the interpreter), written at launch: a finished run is
#: reused only by the same command.
COMMAND_FILE = "command.json"
STEP_TIME_KEY = "timing_s/step"

#: ``val/<source>/avg@<k>``: this project's validation accuracy (recipe/trainer.py), the
#: mean over the k samples per prompt (Minimalist paper, arXiv 2504.11343: avg@16).
VAL_AVG_PATTERN = re.compile(r"^val/(?P<source>[^/]+)/avg@(?P<k>\d+)$")
#: verl's own name for it, used when a run did not log the ``val/`` keys.
VAL_CORE_PATTERN = re.compile(r"^val-core/(?P<source>[^/]+)/acc/mean@(?P<k>\d+)$")
AVERAGE_SOURCE = "average"


class RunFailed(RuntimeError):
    """A training run exited with a non-zero status (the message names its log)."""


def preset(args, full: dict, quick: dict) -> dict:
    """A benchmark's settings: every key of ``full`` (or ``quick`` when ``args.quick``) whose
    command-line value (``args.<key>``) is ``None`` takes the preset's value; values given
    on the command line win. Lists are copied, so the presets are never mutated."""
    base = quick if args.quick else full
    return {k: getattr(args, k) if getattr(args, k) is not None else (list(v) if isinstance(v, list) else v)
            for k, v in base.items()}


def run_name(label: str, seed: int) -> str:
    """Folder / experiment name of one run: ``<label>_s<seed>``."""
    return f"{label}_s{seed}"


def logged_steps(metrics_file: str | os.PathLike) -> set[int]:
    """Steps present in a ``metrics.jsonl`` (empty when the file is missing).

    Lines that are blank or not JSON objects with an integer ``step`` (a line cut short
    by a killed run) are ignored.
    """
    path = Path(metrics_file)
    if not path.is_file():
        return set()
    steps = set()
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            steps.add(rec["step"])
    return steps


def is_finished(run_dir: str | os.PathLike, cmd: Sequence[str], steps: int) -> bool:
    """Whether ``run_dir`` holds a finished run of exactly this command.

    True when ``<run_dir>/command.json`` (written by :func:`run_recipe` at launch) equals
    ``cmd`` without the interpreter, and the last step in ``metrics.jsonl`` is ``steps``.
    A run of other settings (another step count, other overrides) is not reused.
    """
    run_dir = Path(run_dir)
    try:
        saved = json.loads((run_dir / COMMAND_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    logged = logged_steps(run_dir / METRICS_FILE)
    return saved == list(cmd[1:]) and bool(logged) and max(logged) == steps


def recipe_command(
    name: str,
    overrides: Sequence[str],
    run_dir: str | os.PathLike,
    steps: int,
    test_freq: int,
    seed: int,
    python: str = sys.executable,
) -> list[str]:
    """The command line of one run of ``recipe=<name>``.

    Order: ``recipe=<name>``, the run's own keys (experiment name, run dir, steps,
    validation every ``test_freq`` steps and before training, no checkpoints, no resume,
    seeds), then ``overrides`` (Hydra: the last value of a key wins, so ``overrides`` may
    replace any of the run's keys).

    Seeds: the top-level ``seed`` key, which feeds every seed of the run (``data.seed``: the
    order of the training prompts; ``actor_rollout_ref.rollout.seed``: each response's
    sampling seed, validation included; the actor's data-loader seed; ``replay.seed``,
    ``dots.seed``, ``preference.seed``): runs of different recipes with the same seed are
    paired (same warm start, data order and sampling seeds wherever they do not differ by
    design).

    Args:
        name: Recipe config name (``conf/recipe/<name>.yaml``).
        overrides: Extra Hydra overrides.
        run_dir: ``trainer.default_local_dir`` (``metrics.jsonl`` goes there).
        steps: ``trainer.total_training_steps`` (>= 1); ``trainer.total_epochs`` is set to
            the same number so that the data never ends a run early.
        test_freq: ``trainer.test_freq`` (>= 1; verl also validates at the last step).
        seed: The run's seed.
        python: Interpreter.

    Raises:
        ValueError: ``steps`` or ``test_freq`` < 1.
    """
    if steps < 1:
        raise ValueError(f"steps={steps}: a run needs at least one training step")
    if test_freq < 1:
        raise ValueError(f"test_freq={test_freq}: validate every >= 1 steps")
    run_dir = Path(run_dir)
    return [
        python, "-m", "recipe.main", f"recipe={name}",
        f"trainer.experiment_name={run_dir.name}", f"trainer.default_local_dir={run_dir}",
        # total_epochs = steps: the step count, not the data, ends the run (the CPU
        # config's total_epochs=1 stopped a 30-step run of 72-prompt batches over 1000
        # prompts after 13 steps; an epoch has at least one step, so this never binds)
        f"trainer.total_training_steps={steps}", f"trainer.total_epochs={steps}", f"trainer.test_freq={test_freq}",
        "trainer.save_freq=-1", "trainer.val_before_train=true", "trainer.resume_mode=disable",
        f"seed={seed}",
        *overrides,
    ]


def run_recipe(
    name: str,
    overrides: Sequence[str],
    out_dir: str | os.PathLike,
    steps: int,
    test_freq: int,
    seed: int,
    log_dir: str | os.PathLike,
    *,
    label: str | None = None,
    echo: Callable[[str], None] = print,
) -> Path:
    """Train ``recipe=<name>`` once (or reuse a finished run); returns the run directory.

    The run directory is ``<out_dir>/<label>_s<seed>`` (``label`` defaults to ``name``;
    give one to run a recipe under several settings, e.g. ``run_recipe("grpo_dots_rr",
    ["dots.enable=false"], ..., label="replay_only")``). When it holds a finished run of
    the same command (:func:`is_finished`) the run is not started again. Otherwise its
    ``metrics.jsonl`` is deleted, the command is saved to ``command.json`` and the run
    starts from step 0, its stdout and stderr going to ``<log_dir>/<label>_s<seed>.log``.

    Args:
        name: Recipe config name.
        overrides: Extra Hydra overrides (see :func:`recipe_command`).
        out_dir: Parent of the run directory.
        steps: Training steps.
        test_freq: Validate every this many steps (and at step 0 and the last step).
        seed: Seed of the run.
        log_dir: Folder of the run's log file.
        label: Run label (default ``name``).
        echo: Progress printer.

    Returns:
        The run directory (holding ``metrics.jsonl``).

    Raises:
        RunFailed: The run exited with a non-zero status, or ended without logging step
            ``steps``; the message names the log file and quotes its last lines.
    """
    run = run_name(label or name, seed)
    run_dir = Path(out_dir).resolve() / run
    metrics = run_dir / METRICS_FILE
    cmd = recipe_command(name, overrides, run_dir, steps, test_freq, seed)
    cmd_file = run_dir / COMMAND_FILE
    if is_finished(run_dir, cmd, steps):
        echo(f"[runs] {run}: done already, reusing {metrics}")
        return run_dir
    log = Path(log_dir).resolve() / f"{run}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    if metrics.exists():
        metrics.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    cmd_file.write_text(json.dumps(cmd[1:]) + "\n")
    echo(f"[runs] {run}: {' '.join(cmd[2:])}  (log {log})")
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if proc.returncode != 0 or steps not in logged_steps(metrics):
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        why = f"exit status {proc.returncode}" if proc.returncode else f"no step {steps} in {metrics}"
        raise RunFailed(f"{run} failed ({why}); log: {log}\n{tail}")
    echo(f"[runs] {run}: finished in {time.time() - t0:.0f} s")
    return run_dir


def val_key(columns: Sequence[str]) -> str | None:
    """The validation accuracy key among a run's metric names.

    ``val/<source>/avg@<k>`` when one data source is validated, ``val/average/avg@<k>``
    when several are; verl's ``val-core/<source>/acc/mean@<k>`` when no ``val/`` key was
    logged. ``None`` when the run never validated.

    Raises:
        ValueError: Several candidate keys and no average among them (names them).
    """
    for pattern in (VAL_AVG_PATTERN, VAL_CORE_PATTERN):
        keys = sorted(k for k in columns if pattern.match(k))
        per_source = [k for k in keys if pattern.match(k)["source"] != AVERAGE_SOURCE]
        if len(per_source) == 1:
            return per_source[0]
        average = [k for k in keys if pattern.match(k)["source"] == AVERAGE_SOURCE]
        if len(average) == 1:
            return average[0]
        if keys:
            raise ValueError(f"ambiguous validation accuracy keys {keys}: expected one data source or one average")
    return None


def read_curve(metrics_file: str | os.PathLike) -> dict:
    """A run's curves from its ``metrics.jsonl`` (resumed runs: the last value logged wins).

    Parsing is :func:`recipe.report.load_metrics` (malformed lines are skipped with a
    warning naming file and line; non-numeric values are dropped).

    Args:
        metrics_file: The file, or the run directory holding it.

    Returns:
        A dict with

        * ``steps``: every logged step, ascending (``list[int]``; 0 is the validation
          before training).
        * ``wall``: step -> training wall time in seconds up to and including that step,
          the running sum of ``timing_s/step`` (validation time is not in it; 0.0 at step 0).
        * ``val``: step -> validation accuracy in [0, 1] at the validated steps.
        * ``val_key``: the metric it comes from (:func:`val_key`), or ``None``.
        * ``rows``: step -> {metric: value} of every finite number logged at that step.
        * ``file``: the metrics file (str).

    Raises:
        FileNotFoundError: No such file or run directory.
        ValueError: Ambiguous validation keys (see :func:`val_key`).
    """
    from recipe.report import WALL_TIME_COLUMN, find_metrics_file, load_metrics

    path = find_metrics_file(metrics_file)
    df = load_metrics(path).drop(columns=[WALL_TIME_COLUMN])
    rows: dict[int, dict[str, float]] = {}
    for step, values in zip(df.index.tolist(), df.to_dict("records")):
        rows[int(step)] = {k: float(v) for k, v in values.items() if isinstance(v, float) and math.isfinite(v)}
    steps = sorted(rows)
    wall, total = {}, 0.0
    for step in steps:
        total += rows[step].get(STEP_TIME_KEY, 0.0)
        wall[step] = total
    key = val_key([c for c in df.columns if df[c].notna().any()])
    val = {s: rows[s][key] for s in steps if key is not None and key in rows[s]}
    return {"steps": steps, "wall": wall, "val": val, "val_key": key, "rows": rows, "file": str(path)}


def series(curve: dict, key: str) -> dict[int, float]:
    """step -> value of metric ``key`` at the steps that logged it (empty if never)."""
    return {s: row[key] for s, row in sorted(curve["rows"].items()) if key in row}


def first_reach(curve: dict, target: float) -> tuple[int | None, float | None]:
    """First validated training step (> 0) with accuracy >= ``target``, and its wall time.

    Args:
        curve: From :func:`read_curve`.
        target: Accuracy in [0, 1] (compared with a 1e-9 tolerance).

    Returns:
        ``(step, training wall time in s up to it)``, or ``(None, None)`` when no
        validation after step 0 reached it.
    """
    for step in sorted(curve["val"]):
        if step > 0 and curve["val"][step] >= target - 1e-9:
            return step, curve["wall"].get(step)
    return None, None
