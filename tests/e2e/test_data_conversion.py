"""Bring-your-own data end to end: a user's file converts with one ``python -m recipe.data``
command and trains 2 steps through verl's V1 trainer on CPU (tiny model, 1 rank, one run
for the four files).

Four shapes (the issue's "done when"): a JSONL with answers, a JSONL whose answers are only
in the solutions' last ``\\boxed{}``, a JSON list and a parquet with other column names
(numbers and OlympiadBench-style lists as answers). The rows are 8 short real problems of
``../shared/data`` each (short: the CPU default prompt length is 256 tokens). Validation at
step 2 on the same files checks that each converted ``data_source`` and its ground truths reach
the grader (``val-core/<data_source>/acc/mean@1``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recipe.data import answer_value
from recipe.reward.answers import last_boxed
from recipe.reward.golds import normalise_gold
from tests.e2e.test_main_job import read_metrics, run_job

ROOT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ["RECIPE_SHARED_DIR"]) if os.environ.get("RECIPE_SHARED_DIR") else ROOT.parent / "shared"
DATA = SHARED / "data"
ROWS = 8  # two steps of conf/device/cpu.yaml's train_batch_size 4
MAX_CHARS = 120  # problems short enough for the CPU default max_prompt_length (256 tokens)


def _short(path: Path, key: str) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if len(r[key]) <= MAX_CHARS][:ROWS]


def _jsonl_answers(d: Path):
    rows = [{"problem": r["problem"], "answer": r["answer"]} for r in _short(DATA / "math500" / "test.jsonl", "problem")]
    src = d / "answers.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return src, [], "answers", [r["answer"] for r in rows]


def _jsonl_solutions(d: Path):
    rows = [{"problem": r["problem"], "solution": r["solution"]}
            for r in _short(DATA / "math500" / "test.jsonl", "problem")]
    src = d / "worked.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return src, ["--solution-key", "solution"], "worked", [last_boxed(r["solution"]) for r in rows]


def _json_list(d: Path):
    rows = [{"prompt_text": r["question"], "gold": r["answer"]} for r in _short(DATA / "amc23" / "test.jsonl", "question")]
    assert all(isinstance(r["gold"], float) for r in rows)  # AMC floats such as 27.0
    src = d / "amc.json"
    src.write_text(json.dumps(rows), encoding="utf-8")
    return src, ["--problem-key", "prompt_text", "--answer-key", "gold", "--split", "test"], "amc", [
        answer_value(r["gold"]) for r in rows]


def _parquet_other_columns(d: Path):
    rows = _short(DATA / "olympiadbench" / "test.jsonl", "question")
    src = d / "olymp.parquet"
    pq.write_table(pa.table({"Problem Statement": [r["question"] for r in rows],
                             "Answers": [r["final_answer"] for r in rows]}), src)  # lists of strings
    return src, ["--problem-key", "Problem Statement", "--answer-key", "Answers", "--data-source", "olymp"], "olymp", [
        answer_value(r["final_answer"]) for r in rows]


CASES = {
    "jsonl_answers": _jsonl_answers,
    "jsonl_solutions": _jsonl_solutions,
    "json_list": _json_list,
    "parquet_other_columns": _parquet_other_columns,
}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("artifacts_data")


def test_four_files_convert_then_train_two_steps(artifacts, tmp_path):
    """Each file converts with one command; then ONE run (CI budget: one verl start-up, not
    four) trains 2 steps of 16 prompts on the four converted files together (4 x 8 rows: every
    row of every file in the 2 steps, whatever the order) and validates on them at step 2."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    outs, sources = [], []
    for case, make in CASES.items():
        d = tmp_path / case
        d.mkdir()
        src, options, data_source, answers = make(d)
        out = d / "converted.parquet"
        proc = subprocess.run([sys.executable, "-m", "recipe.data", "--input", str(src), "--out", str(out), *options],
                              cwd=d, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{case}: {proc.stderr}"
        split = "test" if "--split" in options else "train"
        assert proc.stdout.strip() == f"{src}: {data_source}/{split}: wrote {ROWS} rows, skipped 0 -> {out}", case
        table = pq.read_table(out).to_pylist()
        assert [r["data_source"] for r in table] == [data_source] * ROWS, case
        assert [r["reward_model"]["ground_truth"] for r in table] == [normalise_gold(a, data_source) for a in answers]
        outs.append(str(out))
        sources.append(data_source)
    assert sources == ["answers", "worked", "amc", "olymp"]

    files = "[" + ",".join(f"'{o}'" for o in outs) + "]"
    name = "e2e_data_conversion"
    run_job(
        artifacts,
        f"data.train_files={files}",
        f"data.val_files={files}",
        f"data.train_batch_size={2 * ROWS}",
        "data.val_max_samples=-1",
        f"trainer.experiment_name={name}",
        "trainer.total_training_steps=2",
        "trainer.test_freq=2",
        "trainer.save_freq=-1",
    )
    rows = read_metrics(artifacts / "runs" / name / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert 0.0 <= r["data"]["reward/acc"] <= 1.0 and r["data"]["response_length/mean"] > 0
    # every file's rows reached the grader under their own data_source
    for data_source in sources:
        assert 0.0 <= rows[1]["data"][f"val-core/{data_source}/acc/mean@1"] <= 1.0, data_source
