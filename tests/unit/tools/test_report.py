"""Tests of recipe.report on synthetic metrics.jsonl files (fast, no training)."""

from __future__ import annotations

import json
import logging
import math
import struct
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from recipe import report as rp

REPO_ROOT = Path(__file__).resolve().parents[3]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
VAL = "val-core/gsm8k/acc/mean@1"
VAL_MATH = "val-core/math500/acc/mean@4"


def _rec(step, score, acc, entropy, kl, length, t, val=None, **extra):
    data = {
        "critic/score/mean": score,
        "reward/acc": acc,
        "actor/entropy": entropy,
        "response_length/mean": length,
        "timing_s/step": t,
        "training/global_step": step,
    }
    if kl is not None:
        data["actor/kl_loss"] = kl
    if val is not None:
        data[VAL] = val
    data.update(extra)
    return json.dumps({"step": step, "data": data})


def _filt(kept):
    return {"filter/kept_groups": kept, "filter/dropped_all_correct": 1.0, "filter/dropped_all_wrong": 8.0 - kept}


# Run "grpo": steps 1-4, a crash that leaves a truncated line, then a resume from the
# step-2 checkpoint that logs steps 3-6 again (the later records must win). Validation
# every 2nd step; group-filter metrics only in this run.
GRPO_LINES = [
    _rec(1, 0.20, 0.25, 1.5, 0.000, 100, 10, **_filt(4)),
    _rec(2, 0.30, 0.35, 1.4, 0.010, 110, 10, val=0.30, **_filt(5)),
    _rec(3, 0.90, 0.95, 9.0, 0.500, 999, 99, **_filt(7)),  # superseded
    _rec(4, 0.95, 0.96, 9.0, 0.500, 999, 99, val=0.99, **_filt(7)),  # superseded
    '{"step": 5, "data": {"critic/score/mean": 0.4, "reward/a',  # line 5: cut short by the crash
    _rec(3, 0.35, 0.40, 1.3, 0.020, 120, 12, **_filt(5)),
    _rec(4, 0.50, 0.55, 1.2, 0.015, 115, 12, val=0.45, **_filt(6)),
    _rec(5, 0.45, 0.50, 1.1, 0.030, 130, 13, **_filt(6)),
    _rec(6, 0.42, 0.48, 1.0, 0.025, 125, 13, val=0.40, **_filt(6)),
]
MALFORMED_LINENO = 5

# Run "raft": steps 1-4, no KL loss, validation on steps 2 and 4 (math500 only at 4),
# a DPO metric (a generic extra plot group), no filter and no replay metrics.
RAFT_LINES = [
    _rec(1, 0.10, 0.15, 2.0, None, 200, 20, **{"dpo/reward_margin": 0.1}),
    _rec(2, 0.20, 0.22, 1.9, None, 190, 20, val=0.20, **{"dpo/reward_margin": 0.3}),
    _rec(3, 0.30, 0.33, 1.8, None, 180, 20, **{"dpo/reward_margin": 0.2}),
    _rec(4, 0.25, 0.28, 1.7, None, 185, 20, val=0.15, **{VAL_MATH: 0.05, "dpo/reward_margin": 0.4}),
]


@pytest.fixture
def run_dirs(tmp_path):
    """Two run directories with metrics.jsonl files: (grpo_dir, raft_dir)."""
    dirs = []
    for name, lines in (("grpo", GRPO_LINES), ("raft", RAFT_LINES)):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        dirs.append(d)
    return tuple(dirs)


@pytest.fixture
def runs(run_dirs):
    return {d.name: rp.load_metrics(d) for d in run_dirs}


# --------------------------------------------------------------------------- load_metrics


def test_load_metrics_last_occurrence_wins_and_wall_time(run_dirs, caplog):
    grpo_dir, _ = run_dirs
    with caplog.at_level(logging.WARNING, logger="recipe.report"):
        df = rp.load_metrics(grpo_dir)

    assert df.index.name == "step"
    assert list(df.index) == [1, 2, 3, 4, 5, 6]
    assert df.index.is_unique
    # the resumed run's records replace the superseded steps 3 and 4
    assert list(df["critic/score/mean"]) == [0.20, 0.30, 0.35, 0.50, 0.45, 0.42]
    assert list(df["timing_s/step"]) == [10, 10, 12, 12, 13, 13]
    assert list(df["filter/kept_groups"]) == [4, 5, 5, 6, 6, 6]
    # cumulative wall time over the kept steps
    assert list(df[rp.WALL_TIME_COLUMN]) == [10, 20, 32, 44, 57, 70]
    # validation only where logged
    assert df[VAL].dropna().to_dict() == {2: 0.30, 4: 0.45, 6: 0.40}
    assert df[VAL].isna().sum() == 3
    assert "actor/kl_loss" in df.columns and rp.WALL_TIME_COLUMN == df.columns[-1]

    # the truncated line was skipped with a warning naming the file and the line
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert f"{grpo_dir / 'metrics.jsonl'}:{MALFORMED_LINENO}:" in warnings[0]
    assert "malformed" in warnings[0]


def test_load_metrics_accepts_file_merges_partial_record_and_skips_bad_lines(tmp_path, caplog):
    f = tmp_path / "exp1.jsonl"
    f.write_text(
        "\n".join(
            [
                _rec(1, 0.1, 0.1, 1.0, 0.0, 50, 5),
                _rec(2, 0.2, 0.2, 1.0, 0.0, 50, 5),
                "",  # blank: ignored silently
                '["not", "an", "object"]',  # line 4
                '{"data": {"reward/acc": 1.0}}',  # line 5: no step
                '{"step": "x", "data": {}}',  # line 6: bad step
                # resume with val_before_train: a validation-only record at the checkpoint
                # step replaces the values it carries, keeps the step's training metrics
                json.dumps({"step": 2, "data": {VAL: 0.7, "note": "text", "actor/kl_loss": None}}),
            ]
        )
        + "\n"
    )
    with caplog.at_level(logging.WARNING, logger="recipe.report"):
        df = rp.load_metrics(f)  # a metrics file given directly
    assert list(df.index) == [1, 2]
    assert df.loc[2, "critic/score/mean"] == 0.2
    assert df.loc[2, VAL] == 0.7
    assert math.isnan(df.loc[2, "actor/kl_loss"])  # null -> NaN
    assert "note" not in df.columns  # non-numeric values ignored
    assert list(df[rp.WALL_TIME_COLUMN]) == [5, 10]
    linenos = sorted(int(r.getMessage().split(":")[1]) for r in caplog.records if str(f) in r.getMessage())
    assert linenos == [4, 5, 6]


def test_load_metrics_without_timing_has_nan_wall_time(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text(json.dumps({"step": 1, "data": {"filter/kept_groups": 0.0}}) + "\n")
    df = rp.load_metrics(tmp_path)
    assert df[rp.WALL_TIME_COLUMN].isna().all()
    assert math.isnan(rp.summarize({"r": df}).loc["r", rp.WALL_TIME_COLUMN])


def test_load_metrics_missing_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        rp.load_metrics(tmp_path / "nope")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty_run.*metrics\.jsonl"):
        rp.load_metrics(tmp_path / "empty_run")


# --------------------------------------------------------------------------- summary


def test_summarize_final_and_best(runs):
    s = rp.summarize(runs)
    assert list(s.index) == ["grpo", "raft"]
    assert list(s.columns) == [
        "steps",
        "wall_time_s",
        "reward final",
        "reward best",
        "train acc final",
        "train acc best",
        "val gsm8k mean@1 final",
        "val gsm8k mean@1 best",
        "val math500 mean@4 final",
        "val math500 mean@4 best",
        "entropy final",
        "entropy best",
        "KL final",
        "KL best",
        "response length final",
        "response length best",
    ]
    g, r = s.loc["grpo"], s.loc["raft"]
    assert g["steps"] == 6 and r["steps"] == 4
    assert g["wall_time_s"] == pytest.approx(70.0)
    assert r["wall_time_s"] == pytest.approx(80.0)
    # superseded steps 3/4 (score 0.9/0.95, val 0.99) must not count as best
    assert (g["reward final"], g["reward best"]) == (0.42, 0.50)
    assert (g["train acc final"], g["train acc best"]) == (0.48, 0.55)
    assert (g["val gsm8k mean@1 final"], g["val gsm8k mean@1 best"]) == (0.40, 0.45)
    assert math.isnan(g["val math500 mean@4 final"]) and math.isnan(g["val math500 mean@4 best"])
    assert (g["entropy final"], g["entropy best"]) == (1.0, 1.5)
    assert (g["KL final"], g["KL best"]) == (0.025, 0.0)  # best KL = lowest
    assert (g["response length final"], g["response length best"]) == (125, 130)

    assert (r["reward final"], r["reward best"]) == (0.25, 0.30)
    assert (r["val gsm8k mean@1 final"], r["val gsm8k mean@1 best"]) == (0.15, 0.20)
    assert (r["val math500 mean@4 final"], r["val math500 mean@4 best"]) == (0.05, 0.05)
    assert math.isnan(r["KL final"]) and math.isnan(r["KL best"])


def test_markdown_table(runs):
    table = rp.markdown_table(rp.summarize(runs))
    lines = table.splitlines()
    assert len(lines) == 4  # header, separator, two runs
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[:5] == ["run", "steps", "wall time (s)", "reward final", "reward best"]
    grpo = dict(zip(header, (c.strip() for c in lines[2].strip("|").split("|"))))
    raft = dict(zip(header, (c.strip() for c in lines[3].strip("|").split("|"))))
    assert grpo["run"] == "grpo" and grpo["steps"] == "6" and grpo["wall time (s)"] == "70.0"
    assert grpo["reward final"] == "0.42" and grpo["reward best"] == "0.5"
    assert grpo["val gsm8k mean@1 best"] == "0.45" and grpo["val math500 mean@4 final"] == "-"
    assert grpo["KL best"] == "0" and grpo["response length best"] == "130"
    assert raft["KL final"] == "-" and raft["KL best"] == "-"
    assert raft["val math500 mean@4 final"] == "0.05" and raft["wall time (s)"] == "80.0"


# --------------------------------------------------------------------------- plots


def _check_png(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert data[12:16] == b"IHDR"
    assert len(data) > 10_000, (path, len(data))  # axes, lines and text, not a blank canvas
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 500 and height >= 200
    return width, height


def test_plot_writes_only_groups_present(runs, tmp_path):
    out = tmp_path / "plots"
    written = rp.plot(runs, out)
    names = [p.name for p in written]
    assert names == ["reward.png", "val_acc.png", "entropy.png", "kl.png", "filter.png", "dpo.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for absent in ("replay.png", "lorr.png", "dots.png"):
        assert not (out / absent).exists()
    sizes = {p.name: _check_png(p) for p in written}
    # one row of (step, wall time) panels per metric: reward has 2 metrics, filter 3
    assert sizes["filter.png"][1] > sizes["reward.png"][1] > sizes["entropy.png"][1]


def test_plot_nothing_to_plot(tmp_path):
    df = pd.DataFrame({"other/metric": [1.0]}, index=pd.Index([1], name="step"))
    df[rp.WALL_TIME_COLUMN] = float("nan")
    assert rp.plot({"r": df}, tmp_path / "p") == []
    assert list((tmp_path / "p").iterdir()) == []


def test_plot_group_selection():
    cols = ["replay/size", "replay/replayed_groups", "lorr/resets", VAL, "val-core/gsm8k/acc/best@4/mean", "reward/acc"]
    by_name = {g.name: g.select(cols) for g in rp.PLOT_GROUPS}
    assert by_name["replay"] == ["replay/replayed_groups", "replay/size"]
    assert by_name["val_acc"] == [VAL]
    assert by_name["reward"] == ["reward/acc"]
    assert by_name["lorr"] == ["lorr/resets"]
    assert by_name["dots"] == [] and by_name["filter"] == []


# --------------------------------------------------------------------------- CLI


def test_cli_two_runs_with_names(run_dirs, tmp_path, capsys):
    out = tmp_path / "rep"
    rc = rp.main([str(run_dirs[0]), str(run_dirs[1] / "metrics.jsonl"), "--out", str(out), "--name", "GRPO", "RAFT"])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "| GRPO | 6 | 70.0 |" in stdout and "| RAFT | 4 | 80.0 |" in stdout
    md = (out / "report.md").read_text()
    assert "| GRPO | 6 | 70.0 | 0.42 | 0.5 |" in md
    assert "| run | steps | wall time (s) |" in md
    for name in ("reward", "val_acc", "entropy", "kl", "filter", "dpo"):
        assert f"- ![{name}]({name}.png)" in md
        _check_png(out / f"{name}.png")
    assert "replay.png" not in md and not (out / "replay.png").exists()


def test_cli_default_out_dir_and_labels(run_dirs):
    # the real entry point, in a subprocess: one run -> <RUN_DIR>/report
    proc = subprocess.run(
        [sys.executable, "-m", "recipe.report", str(run_dirs[0])],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "| grpo | 6 | 70.0 |" in proc.stdout
    assert f"metrics.jsonl:{MALFORMED_LINENO}:" in proc.stderr  # the warning reaches the user
    assert (run_dirs[0] / "report" / "report.md").is_file()
    assert (run_dirs[0] / "report" / "filter.png").is_file()
    assert not (run_dirs[0] / "report" / "dpo.png").exists()  # dpo only in the other run


def test_cli_usage_errors_exit_2(run_dirs, tmp_path, capsys):
    missing = tmp_path / "no_such_run"
    assert rp.main([str(run_dirs[0]), str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "error" in err
    assert not (tmp_path / "o").exists()  # nothing written

    bare = tmp_path / "bare_run"
    bare.mkdir()
    assert rp.main([str(bare)]) == 2
    assert str(bare) in capsys.readouterr().err

    assert rp.main([str(run_dirs[0]), "--name", "a", "b"]) == 2
    assert "--name" in capsys.readouterr().err

    assert rp.main([]) == 2  # argparse: RUN_DIR required


def test_empty_run_summarizes_as_missing(tmp_path, caplog):
    (tmp_path / "metrics.jsonl").write_text("\n")
    with caplog.at_level(logging.WARNING, logger="recipe.report"):
        df = rp.load_metrics(tmp_path)
    assert df.empty and "no metrics logged" in caplog.text
    s = rp.summarize({"empty": df})
    assert s.loc["empty", "steps"] == 0
    row = rp.markdown_table(s).splitlines()[2]
    assert row == "| empty | 0 | - | " + " | ".join(["-"] * (len(s.columns) - 2)) + " |"
