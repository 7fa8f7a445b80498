"""Tests of recipe.data against the real files in ../shared/data (no network)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recipe import data as rd
from recipe.reward.golds import normalise_gold

REPO_ROOT = Path(__file__).resolve().parents[3]
SHARED = Path(os.environ["RECIPE_SHARED_DIR"]) if os.environ.get("RECIPE_SHARED_DIR") else REPO_ROOT.parent / "shared"
DATA_DIR = SHARED / "data"
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."

EXPECTED_ROWS = {
    ("gsm8k", "train"): 7473,
    ("gsm8k", "test"): 1319,
    ("math", "train"): 7470,  # 7474 minus 4 with an empty answer
    ("math500", "test"): 500,
    ("minerva_math", "test"): 272,
    ("olympiadbench", "test"): 675,
    ("aime24", "test"): 30,
    ("amc23", "test"): 40,
}

# (dataset, split, source row index) -> ground truth, looked up by hand in the raw files.
KNOWN_TRUTHS = {
    ("gsm8k", "train", 0): "72",
    ("gsm8k", "train", 345): "1080",  # "#### 1,080"
    ("gsm8k", "train", 367): "850000",  # "#### 850,000"
    ("gsm8k", "test", 0): "18",
    ("gsm8k", "test", 146): "2125",  # "#### 2,125"
    ("gsm8k", "test", 1318): "14",
    ("math", "train", 0): "0",
    ("math", "train", 1): "98",
    ("math", "train", 887): "28",
    ("math", "train", 7473): "\\left( \\frac{8}{5}, -\\frac{35}{2} \\right)",
    ("math500", "test", 0): "\\left( 3, \\frac{\\pi}{2} \\right)",
    ("math500", "test", 1): "p - q",
    ("math500", "test", 499): "106^\\circ",
    ("minerva_math", "test", 0): "1.6",
    ("minerva_math", "test", 1): "4.5e33",
    (
        "minerva_math",
        "test",
        12,
    ): "\\frac{2 \\pi c^{2} R^{2}}{\\lambda^{5}\\left[e^{h c /(\\lambda k T)}-1\\right] d^{2}}",
    ("minerva_math", "test", 271): "10.1",
    ("olympiadbench", "test", 0): "2",
    ("olympiadbench", "test", 1): "\\frac{1}{2 n+2}",
    ("olympiadbench", "test", 5): "(1,8,19), (2,7,13), (4,5,7)",
    ("olympiadbench", "test", 13): "69, 84",  # "$69$,$84$"
    ("olympiadbench", "test", 21): "1,3,5",
    ("olympiadbench", "test", 76): "(-\\infty, 0) \\cup\\{1\\}",  # "$...$." trailing stop
    ("olympiadbench", "test", 104): "90^{\\circ}, 60^{\\circ}",
    ("olympiadbench", "test", 194): "221,8",  # malformed "$221,$8$"
    ("olympiadbench", "test", 281): "2^{-2 / 3}, 8",  # "$2^{-2 / 3}$, $8$"
    ("olympiadbench", "test", 316): "4.2",  # unit "%" not appended
    ("olympiadbench", "test", 674): "11",
    ("aime24", "test", 0): "204",
    ("aime24", "test", 7): "25",  # "025"
    ("aime24", "test", 15): "73",  # "073"
    ("aime24", "test", 29): "902",
    ("amc23", "test", 0): "27",  # 27.0
    ("amc23", "test", 15): "-1",  # -1.0
    ("amc23", "test", 34): "1625",
}


def _raw_rows(dataset: str, split: str) -> list[dict]:
    path = DATA_DIR / rd.DATASETS[dataset].splits[split]
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[tuple[str, str], pd.DataFrame]:
    """All datasets converted once with the default template and read back with pandas."""
    out = tmp_path_factory.mktemp("verl")
    frames = {}
    for name in rd.DATASETS:
        paths = rd.prepare(name, out, source_dir=DATA_DIR)
        assert set(paths) == set(rd.DATASETS[name].splits)
        for split, path in paths.items():
            assert Path(path) == out / name / f"{split}.parquet"
            frames[(name, split)] = pd.read_parquet(path)
    return frames


def _by_index(df: pd.DataFrame, index: int) -> pd.Series:
    hits = df[df["extra_info"].map(lambda e: e["index"]) == index]
    assert len(hits) == 1, f"no single row with extra_info.index {index}"
    return hits.iloc[0]


# ------------------------------------------------------------------------------ real data


def test_data_dir_present():
    assert (DATA_DIR / "README.md").is_file(), f"shared data not found at {DATA_DIR}"


def test_splits_constant():
    assert list(rd.DATASETS) == ["gsm8k", "math", "math500", "minerva_math", "olympiadbench", "aime24", "amc23"]
    assert list(rd.DATASETS["gsm8k"].splits) == ["train", "test"]
    assert list(rd.DATASETS["math"].splits) == ["train"]
    for name in ("math500", "minerva_math", "olympiadbench", "aime24", "amc23"):
        assert list(rd.DATASETS[name].splits) == ["test"]


@pytest.mark.parametrize(("dataset", "split"), sorted(EXPECTED_ROWS))
def test_row_counts(written, dataset, split):
    assert len(written[(dataset, split)]) == EXPECTED_ROWS[(dataset, split)]


@pytest.mark.parametrize(("dataset", "split", "index"), sorted(KNOWN_TRUTHS))
def test_known_ground_truths(written, dataset, split, index):
    """The extracted answer (KNOWN_TRUTHS) after recipe.reward.golds.normalise_gold, whose own
    rules are tested in tests/unit/reward/ (e.g. minerva's "4.5e33" -> "4.5 \\times 10^{33}")."""
    row = _by_index(written[(dataset, split)], index)
    expected = normalise_gold(KNOWN_TRUTHS[(dataset, split, index)], dataset)
    assert row["reward_model"] == {"style": "rule", "ground_truth": expected}


@pytest.mark.parametrize(("dataset", "split"), sorted(EXPECTED_ROWS))
def test_schema_and_prompt(written, dataset, split):
    df = written[(dataset, split)]
    assert list(df.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    raw = _raw_rows(dataset, split)
    problem_key = "question" if dataset in ("gsm8k", "olympiadbench") else "problem"
    previous = -1
    for rec in df.to_dict("records"):
        assert rec["data_source"] == dataset
        assert rec["ability"] == "math"
        assert rec["reward_model"]["style"] == "rule"
        gt = rec["reward_model"]["ground_truth"]
        assert isinstance(gt, str) and gt and gt == gt.strip()
        extra = rec["extra_info"]
        assert extra["split"] == split
        index = extra["index"]
        assert isinstance(index, int) and index > previous  # source order kept
        previous = index
        source_row = raw[index]
        assert extra["question"] == source_row[problem_key]
        assert isinstance(extra["answer"], str) and extra["answer"]
        prompt = list(rec["prompt"])
        assert len(prompt) == 1 and prompt[0]["role"] == "user"
        content = prompt[0]["content"]
        assert content == source_row[problem_key].strip() + "\n" + INSTRUCTION
    assert previous == len(raw) - 1 or dataset == "math"


def test_raw_answer_kept(written):
    g = _by_index(written[("gsm8k", "train")], 0)
    assert g["extra_info"]["answer"].endswith("#### 72")
    a = _by_index(written[("aime24", "test")], 7)
    assert a["extra_info"]["answer"] == "025"
    c = _by_index(written[("amc23", "test")], 0)
    assert c["extra_info"]["answer"] == "27.0"
    o = _by_index(written[("olympiadbench", "test")], 13)
    assert o["extra_info"]["answer"] == "$69$,$84$"
    assert _by_index(written[("olympiadbench", "test")], 316)["extra_info"]["unit"] == "%"
    m = _by_index(written[("minerva_math", "test")], 0)
    assert "\\boxed{1.6}" in m["extra_info"]["answer"]


def test_math_empty_answers_skipped_with_warning(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="recipe.data")
    res = rd.convert_split("math", "train", tmp_path, source_dir=DATA_DIR)
    assert res.rows_written == 7470
    assert dict(res.skipped) == {"missing_answer": 4}
    indices = set(pd.read_parquet(res.path)["extra_info"].map(lambda e: e["index"]))
    assert not indices & {886, 1009, 5328, 5330}
    text = caplog.text
    for i in (886, 1009, 5328, 5330):
        assert f"math.json: skipped row {i} (missing_answer)" in text
    assert "7470 rows" in res.summary() and "missing_answer=4" in res.summary()


def test_max_rows(tmp_path):
    res = rd.convert_split("math", "train", tmp_path, source_dir=DATA_DIR, max_rows=3)
    assert res.rows_written == 3
    assert len(pd.read_parquet(res.path)) == 3
    assert rd.load_records("gsm8k", "test", DATA_DIR, max_rows=0) == []


def test_load_records_api():
    recs = rd.load_records("aime24", "test", DATA_DIR)
    assert len(recs) == 30
    assert recs[7]["reward_model"]["ground_truth"] == "25"
    assert set(recs[0]) == set(rd.COLUMNS)


# ------------------------------------------------------------------------------ templates


def test_template_presets_and_literal():
    rec = rd.load_records("gsm8k", "test", DATA_DIR, template="Q: {problem}\nA:", max_rows=1)[0]
    problem = rec["extra_info"]["question"]
    assert rec["prompt"] == [{"role": "user", "content": f"Q: {problem}\nA:"}]
    qwen = rd.load_records("gsm8k", "test", DATA_DIR, template="qwen_math_cot", max_rows=1)[0]
    assert qwen["prompt"] == [
        {"role": "system", "content": INSTRUCTION},
        {"role": "user", "content": problem},
    ]
    # braces other than {problem} are literal
    lit = rd.resolve_template("{problem} answer in \\boxed{} {x}")
    assert lit.messages("P")[0]["content"] == "P answer in \\boxed{} {x}"


def test_template_errors(tmp_path):
    with pytest.raises(ValueError, match="problem"):
        rd.resolve_template("no placeholder here")
    with pytest.raises(ValueError, match="boxed"):  # message lists the presets
        rd.prepare("aime24", tmp_path, source_dir=DATA_DIR, template="nonexistent_preset")
    assert not (tmp_path / "aime24").exists()
    with pytest.raises(SystemExit):
        rd.main(["--datasets", "aime24", "--out-dir", str(tmp_path), "--template", "bad"])


# ------------------------------------------------------------------------------ bad rows


def test_bad_rows_skipped_and_counted(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="recipe.data")
    src = tmp_path / "src"
    (src / "gsm8k").mkdir(parents=True)
    lines = [
        json.dumps({"question": "What is 1+1?", "answer": "1+1=2\n#### 2"}),
        json.dumps({"question": "   ", "answer": "#### 3"}),  # empty problem
        json.dumps({"question": "What is 2+2?"}),  # missing answer
        "{not json",  # malformed line 4
        "",
        json.dumps({"question": "How many?", "answer": "lots\n#### 1,234"}),
        json.dumps({"question": "No marker", "answer": "just text"}),  # no ####
    ]
    (src / "gsm8k" / "test.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    res = rd.convert_split("gsm8k", "test", tmp_path / "out", source_dir=src)
    assert res.rows_written == 2
    assert dict(res.skipped) == {"missing_problem": 1, "missing_answer": 2, "malformed_json": 1}
    df = pd.read_parquet(res.path)
    assert [e["index"] for e in df["extra_info"]] == [0, 4]
    assert [r["ground_truth"] for r in df["reward_model"]] == ["2", "1234"]
    text = caplog.text
    assert "test.jsonl: skipped row 1 (missing_problem)" in text
    assert "test.jsonl: skipped row 2 (missing_answer)" in text
    assert "test.jsonl: skipped line 4" in text and "malformed_json" in text
    assert "test.jsonl: skipped row 5 (missing_answer)" in text
    assert "missing_problem=1" in res.summary()


def test_warnings_capped(caplog):
    caplog.set_level(logging.WARNING, logger="recipe.data")
    rows = [{"problem": "", "answer": "1"} for _ in range(25)] + [{"problem": "p", "answer": "2"}]
    res = rd.convert_rows("math500", "test", rows, source="many.jsonl")
    assert len(res.records) == 1 and res.skipped["missing_problem"] == 25
    per_row = [r for r in caplog.records if r.getMessage().endswith("(missing_problem)")]
    assert len(per_row) == rd.MAX_ROW_WARNINGS
    assert "15 more skipped rows" in caplog.text


def test_malformed_json_array_file(tmp_path):
    src = tmp_path / "src"
    (src / "math_train").mkdir(parents=True)
    (src / "math_train" / "math.json").write_text('[{"problem": "x", "answer": "1"},\n oops]', encoding="utf-8")
    with pytest.raises(rd.DataError, match=r"math\.json.*line 2"):
        rd.load_records("math", "train", src)


def test_missing_source_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="aime24"):
        rd.load_records("aime24", "test", tmp_path)


def test_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'gsm9k'.*gsm8k.*amc23"):
        rd.prepare("gsm9k", tmp_path)
    with pytest.raises(ValueError, match="split"):
        rd.load_records("math500", "train", DATA_DIR)
    with pytest.raises(SystemExit):
        rd.main(["--datasets", "gsm8k,nope", "--out-dir", str(tmp_path)])


# ---------------------------------------------------------------------- answer helpers


def test_boxed_gold_answers():
    """Gold answers from a solution's last box follow recipe.reward.answers (tests/unit/reward/test_answers.py)."""
    solutions = [
        "a \\boxed{1} b \\boxed{\\frac{1}{2}} c",
        "\\boxed{\\{1, 2\\}}",
        "\\boxed{\\left\\{ x \\right.}",
        "\\fbox{3}",
        "so $\\boxed 5$.",
        "\\boxed{2} then \\boxed{unterminated",  # unclosed last box: skipped, not "2"
        "\\boxed{}",
        "no box",
    ]
    res = rd.convert_rows("minerva_math", "test", [{"problem": "Q", "solution": s} for s in solutions])
    truths = {r["extra_info"]["index"]: r["reward_model"]["ground_truth"] for r in res.records}
    assert truths == {0: "\\frac{1}{2}", 1: "\\{1, 2\\}", 2: "\\left\\{ x \\right.", 3: "3", 4: "5"}
    assert res.skipped["no_boxed_answer"] == 3


def test_olympiadbench_answer_rules():
    assert rd.olympiadbench_answer(["$69$,$84$"]) == "69, 84"
    assert rd.olympiadbench_answer(["$x$", "$y$"]) == "x, y"
    assert rd.olympiadbench_answer(["$\\frac{1}{2}$"]) == "\\frac{1}{2}"
    assert rd.olympiadbench_answer(["\\$5"]) == "\\$5"
    assert rd.olympiadbench_answer([]) is None


def test_integer_answers_from_rows():
    rows = [{"problem": "p", "answer": a} for a in (27.0, 0.5, -3.0, "025", "12.0", "x+1")]
    gts = [r["reward_model"]["ground_truth"] for r in rd.convert_rows("amc23", "test", rows).records]
    assert gts == ["27", "0.5", "-3", "25", "12", "x+1"]


# --------------------------------------------------------------------------------- hub


def test_hub_rows_use_same_mapping(monkeypatch):
    """--source hub feeds the hub rows through convert_rows, like local rows."""
    assert rd.DATASETS["gsm8k"].hub_id == "openai/gsm8k" and rd.DATASETS["gsm8k"].hub_config == "main"
    assert rd.DATASETS["math500"].hub_id == "HuggingFaceH4/MATH-500"
    seen = []

    def fake_hub_rows(spec, split):
        seen.append((spec.hub_id, spec.hub_config, spec.hub_splits[split]))
        return iter(_raw_rows(spec.name, split))

    monkeypatch.setattr(rd, "_hub_rows", fake_hub_rows)
    for name in ("gsm8k", "olympiadbench", "amc23"):
        split = list(rd.DATASETS[name].splits)[-1]
        assert rd.load_records(name, split, source="hub") == rd.load_records(name, split, DATA_DIR)
    assert seen[0] == ("openai/gsm8k", "main", "test")


def test_hub_style_rows():
    """Rows shaped like the hub copies (different field names) map correctly."""
    lighteval = [{"problem": "P", "solution": "so $\\boxed{\\frac{a}{b}}$.", "level": "Level 2", "type": "Algebra"}]
    rec = rd.convert_rows("math", "train", lighteval).records[0]
    assert rec["reward_model"]["ground_truth"] == "\\frac{a}{b}"
    assert rec["extra_info"]["level"] == "Level 2"
    minerva = [{"question": "Q", "answer": "3.5"}]
    assert rd.convert_rows("minerva_math", "test", minerva).records[0]["reward_model"]["ground_truth"] == "3.5"
    h4 = [{"id": 60, "problem": "Q", "solution": "s", "answer": "204", "url": "u", "year": "2024"}]
    assert rd.convert_rows("aime24", "test", h4).records[0]["reward_model"]["ground_truth"] == "204"
    amc = [{"id": 0, "question": "Q", "answer": 27.0, "url": "u"}]
    rec = rd.convert_rows("amc23", "test", amc).records[0]
    assert rec["reward_model"]["ground_truth"] == "27" and rec["extra_info"]["question"] == "Q"
    oly = [{"id": 1, "context": "Ctx.", "question": "Q?", "final_answer": ["$3$"], "solution": ["s"]}]
    rec = rd.convert_rows("olympiadbench", "test", oly).records[0]
    assert rec["extra_info"]["question"] == "Ctx.\n\nQ?" and rec["reward_model"]["ground_truth"] == "3"


# ------------------------------------------------------------------------- passthrough


def test_passthrough_round_trip(written, tmp_path):
    src = tmp_path / "good.parquet"
    pq.write_table(pa.Table.from_pandas(written[("amc23", "test")], preserve_index=False), src)
    out = tmp_path / "sub" / "copy.parquet"
    assert rd.passthrough(src, out) == 40
    assert out.read_bytes() == src.read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(out), pd.read_parquet(src))
    assert [p.name for p in out.parent.iterdir()] == ["copy.parquet"]
    # CLI form
    out2 = tmp_path / "copy2.parquet"
    assert rd.main(["--input", str(src), "--out", str(out2)]) == 0
    assert out2.read_bytes() == src.read_bytes()


def _verl_rows(**override):
    row = {
        "data_source": "gsm8k",
        "prompt": [{"role": "user", "content": "q"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "1"},
        "extra_info": {"split": "test", "index": 0},
    }
    row.update(override)
    return [row]


@pytest.mark.parametrize(
    ("rows", "missing"),
    [
        ([{k: v for k, v in _verl_rows()[0].items() if k != "reward_model"}], "reward_model"),
        ([{k: v for k, v in _verl_rows()[0].items() if k != "prompt"}], "prompt"),
        (_verl_rows(reward_model={"style": "rule"}), "reward_model.ground_truth"),
        (_verl_rows(reward_model={"style": "rule", "ground_truth": None}), "reward_model.ground_truth"),
        (_verl_rows(prompt=[{"role": "user"}]), "content"),
        (_verl_rows(prompt="just a string"), "prompt"),
        (_verl_rows(prompt=[]), "prompt"),
    ],
)
def test_passthrough_rejects_wrong_schema(tmp_path, rows, missing, capsys):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), bad)
    out = tmp_path / "out.parquet"
    with pytest.raises(rd.DataError) as err:
        rd.passthrough(bad, out)
    assert str(bad) in str(err.value) and missing in str(err.value)
    assert not out.exists()
    assert rd.main(["--input", str(bad), "--out", str(out)]) == 1
    assert missing in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [bad]


def test_passthrough_not_parquet(tmp_path):
    bad = tmp_path / "x.parquet"
    bad.write_text("not parquet")
    with pytest.raises(rd.DataError, match="x.parquet"):
        rd.validate_verl_parquet(bad)


# ------------------------------------------------------------------------------ output


def test_atomic_write_leaves_no_temp(tmp_path, monkeypatch):
    recs = rd.load_records("amc23", "test", DATA_DIR)
    out = tmp_path / "d" / "f.parquet"
    rd.write_parquet(recs, out)
    assert [p.name for p in out.parent.iterdir()] == ["f.parquet"]
    before = out.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(rd.pq, "write_table", boom)
    with pytest.raises(OSError, match="disk full"):
        rd.write_parquet(recs[:1], out)
    assert [p.name for p in out.parent.iterdir()] == ["f.parquet"]
    assert out.read_bytes() == before  # old file untouched


def test_empty_output_has_schema(tmp_path):
    path = rd.write_parquet([], tmp_path / "e.parquet")
    df = pd.read_parquet(path)
    assert len(df) == 0 and list(df.columns) == list(rd.COLUMNS)


# --------------------------------------------------------------------------------- CLI


def test_default_source_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("RECIPE_SHARED_DIR", raising=False)
    assert rd.default_source_dir() == REPO_ROOT.parent / "shared" / "data"
    fake = tmp_path / "shared"
    (fake / "data" / "aime24").mkdir(parents=True)
    (fake / "data" / "aime24" / "test.jsonl").write_text(
        json.dumps({"problem": "p", "answer": "007"}) + "\n", encoding="utf-8"
    )
    monkeypatch.setenv("RECIPE_SHARED_DIR", str(fake))
    assert rd.default_source_dir() == fake / "data"
    assert rd.load_records("aime24", "test")[0]["reward_model"]["ground_truth"] == "7"


def test_cli_in_process(tmp_path, capsys):
    assert rd.main(["--datasets", "gsm8k,aime24", "--out-dir", str(tmp_path), "--source-dir", str(DATA_DIR),
                    "--max-rows", "5"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("gsm8k/train: wrote 5 rows, skipped 0")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.parquet")) == [
        "aime24/test.parquet",
        "gsm8k/test.parquet",
        "gsm8k/train.parquet",
    ]


def test_cli_subprocess_any_cwd(tmp_path):
    """``python -m recipe.data`` from another directory, default source dir."""
    env = {k: v for k, v in os.environ.items() if k != "RECIPE_SHARED_DIR"}
    env["RECIPE_SHARED_DIR"] = str(SHARED)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, "-m", "recipe.data", "--datasets", "all", "--out-dir", str(tmp_path / "o"),
         "--max-rows", "2"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.strip().splitlines()) == 8
    assert len(pd.read_parquet(tmp_path / "o" / "olympiadbench" / "test.parquet")) == 2
