"""recipe.data: any file in (JSON lines, JSON, parquet), the papers' named sets read from small
local files of their hub shape, and the prompt-length filter (real Qwen2.5 tokenizer)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recipe import data as rd
from recipe.reward.golds import normalise_gold

REPO_ROOT = Path(__file__).resolve().parents[3]
SHARED = Path(os.environ["RECIPE_SHARED_DIR"]) if os.environ.get("RECIPE_SHARED_DIR") else REPO_ROOT.parent / "shared"
QWEN_TOKENIZER = SHARED / "tokenizers" / "qwen2.5"
INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def _jsonl(path: Path, rows: list, extra_lines: tuple[str, ...] = ()) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _truths(path: Path) -> list[str]:
    return [r["ground_truth"] for r in pq.read_table(path).column("reward_model").to_pylist()]


def _gold(value: str, source: str) -> str:
    """Expected ground truth: the extracted answer after recipe.reward.golds (issue 16's rules)."""
    return normalise_gold(value, source)


# ------------------------------------------------------------------------ answer shapes


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("025", "25"),  # AIME string
        (27.0, "27"),  # AMC float
        (-1.0, "-1"),
        (0.5, "0.5"),
        (7, "7"),
        ("27.0", "27"),
        ("\\frac{1}{2}", "\\frac{1}{2}"),
        ("  x = 3 ", "x = 3"),
        (["$69$,$84$"], "69, 84"),  # OlympiadBench list
        (["$2^{-2 / 3}$", "$8$"], "2^{-2 / 3}, 8"),
        (None, None),
        ("", None),
        (float("nan"), None),
        ([], None),
    ],
)
def test_answer_value_shapes(value, expected):
    assert rd.answer_value(value) == expected


# ---------------------------------------------------------------------- any file in


def test_jsonl_with_answers_and_bad_rows(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="recipe.data")
    src = _jsonl(
        tmp_path / "aime2025.jsonl",
        [
            {"problem": "Find x.", "answer": "070", "id": "I-1"},
            {"problem": "AMC style", "answer": 27.0},
            {"problem": "  ", "answer": "3"},  # row 2: empty problem
            {"problem": "Olympiad style", "answer": ["$69$,$84$"]},
            {"problem": "no answer here"},  # row 4
        ],
        extra_lines=("{not json",),  # line 6
    )
    out = tmp_path / "out" / "aime2025.parquet"
    res = rd.convert_file(src, out, split="test")
    assert res.rows_written == 3 and res.dataset == "aime2025"
    assert dict(res.skipped) == {"missing_problem": 1, "missing_answer": 1, "malformed_json": 1}
    assert _truths(out) == [_gold("70", "aime2025"), _gold("27", "aime2025"), _gold("69, 84", "aime2025")]
    table = pq.read_table(out).to_pylist()
    assert table[0]["data_source"] == "aime2025"
    assert table[0]["prompt"] == [{"role": "user", "content": "Find x.\n" + INSTRUCTION}]
    assert table[0]["extra_info"] == {"split": "test", "index": 0, "question": "Find x.", "answer": "070"}
    assert table[2]["extra_info"]["index"] == 3 and table[2]["extra_info"]["answer"] == "$69$,$84$"
    text = caplog.text
    assert f"{src}: skipped row 2 (missing_problem)" in text
    assert f"{src}: skipped row 4 (missing_answer)" in text
    assert f"{src}: skipped line 6" in text and "(malformed_json)" in text
    assert [p.name for p in out.parent.iterdir()] == ["aime2025.parquet"]  # atomic: no temporary left


def test_jsonl_answers_only_in_solutions(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="recipe.data")
    src = _jsonl(
        tmp_path / "math_test" / "test.jsonl",
        [
            {"problem": "p0", "solution": "so \\boxed{1} then \\boxed{\\frac{3}{4}}."},
            {"problem": "p1", "solution": "no box at all"},
            {"problem": "p2", "solution": "\\boxed{\\{1, 2\\}}"},
            {"problem": "p3", "solution": "unclosed \\boxed{5"},
        ],
    )
    out = tmp_path / "o.parquet"
    res = rd.convert_file(src, out, solution_key="solution", split="test")
    assert res.dataset == "math_test"  # generic stem "test": the folder's name
    assert res.rows_written == 2 and dict(res.skipped) == {"no_boxed_answer": 2}
    assert _truths(out) == [_gold("\\frac{3}{4}", "math_test"), _gold("\\{1, 2\\}", "math_test")]
    assert "skipped row 1 (no_boxed_answer)" in caplog.text and "skipped row 3 (no_boxed_answer)" in caplog.text
    # default keys find `solution` too, when there is no answer column
    assert rd.convert_file(src, tmp_path / "o2.parquet").rows_written == 2


def test_answer_key_falls_back_to_solution_box(tmp_path):
    src = _jsonl(tmp_path / "d.jsonl", [{"q": "a", "ans": "", "sol": "\\boxed{4}"}, {"q": "b", "ans": "5", "sol": "x"}])
    res = rd.convert_file(src, tmp_path / "o.parquet", problem_key="q", answer_key="ans", solution_key="sol")
    assert res.rows_written == 2 and _truths(res.path) == [_gold("4", "d"), _gold("5", "d")]


def test_json_list_and_rows_key(tmp_path):
    rows = [{"question_text": "What is 2+2?", "gt": 4}, {"question_text": "Half?", "gt": 0.5}]
    src = tmp_path / "custom.json"
    src.write_text(json.dumps(rows), encoding="utf-8")
    res = rd.convert_file(src, tmp_path / "a.parquet", problem_key="question_text", answer_key="gt",
                          data_source="mine", template="qwen_math_cot")
    assert res.rows_written == 2 and _truths(res.path) == [_gold("4", "mine"), _gold("0.5", "mine")]
    first = pq.read_table(res.path).to_pylist()[0]
    assert first["data_source"] == "mine"
    assert first["prompt"] == [{"role": "system", "content": INSTRUCTION}, {"role": "user", "content": "What is 2+2?"}]

    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 1, "data": rows}), encoding="utf-8")
    with pytest.raises(rd.DataError, match=r"wrapped.json: expected a JSON list.*\['data'\]: pass --rows-key"):
        rd.convert_file(wrapped, tmp_path / "b.parquet", problem_key="question_text", answer_key="gt")
    res = rd.convert_file(wrapped, tmp_path / "b.parquet", problem_key="question_text", answer_key="gt",
                          rows_key="data")
    assert res.rows_written == 2
    with pytest.raises(rd.DataError, match=r"wrapped.json: --rows-key 'rows' not found"):
        rd.convert_file(wrapped, tmp_path / "c.parquet", rows_key="rows")
    assert not (tmp_path / "c.parquet").exists()


def test_json_file_holding_json_lines(tmp_path):
    src = _jsonl(tmp_path / "lines.json", [{"problem": "a", "answer": "1"}, {"problem": "b", "answer": "2"}])
    assert rd.convert_file(src, tmp_path / "o.parquet").rows_written == 2


def test_parquet_with_other_column_names(tmp_path):
    src = tmp_path / "comp.parquet"
    pq.write_table(pa.table({"Question": ["q0", "q1", None], "Final Answer": [12.0, 2.5, 1.0],
                             "topic": ["a", "b", "c"]}), src)
    assert not rd.is_verl_parquet(src)
    res = rd.convert_file(src, tmp_path / "o.parquet", problem_key="Question", answer_key="Final Answer")
    assert res.rows_written == 2 and dict(res.skipped) == {"missing_problem": 1}
    assert _truths(res.path) == [_gold("12", "comp"), _gold("2.5", "comp")]
    assert rd.validate_verl_parquet(res.path) == 2


def test_missing_keys_name_file_and_key(tmp_path, capsys):
    src = _jsonl(tmp_path / "d.jsonl", [{"problem": "a", "answer": "1"}])
    out = tmp_path / "o.parquet"
    with pytest.raises(rd.DataError, match=r"d.jsonl: no row has the key 'final' \(--answer-key\); "
                                           r"the first row's keys: \['problem', 'answer'\]"):
        rd.convert_file(src, out, answer_key="final")
    odd = _jsonl(tmp_path / "odd.jsonl", [{"text": "a", "label": "1"}])
    with pytest.raises(rd.DataError, match=r"odd.jsonl: no row has a problem key \(tried problem, question\)"):
        rd.convert_file(odd, out)
    with pytest.raises(rd.DataError, match=r"odd.jsonl: no row has an answer key"):
        rd.convert_file(odd, out, problem_key="text")
    # every row skipped: an error naming the reasons, no file written
    empty = _jsonl(tmp_path / "e.jsonl", [{"problem": "a", "answer": ""}, {"problem": "b", "answer": None}])
    with pytest.raises(rd.DataError, match=r"e.jsonl: no row could be converted \(2 rows read; skipped: missing_answer=2\)"):
        rd.convert_file(empty, out)
    assert not out.exists()
    # the CLI prints the same message and exits 1
    assert rd.main(["--input", str(src), "--out", str(out), "--answer-key", "final"]) == 1
    assert "no row has the key 'final' (--answer-key)" in capsys.readouterr().err
    assert not out.exists()


def test_malformed_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('[{"problem": "a",', encoding="utf-8")
    with pytest.raises(rd.DataError, match=r"bad.json: malformed JSON at line 1"):
        rd.convert_file(bad, tmp_path / "o.parquet")
    notpq = tmp_path / "np.parquet"
    notpq.write_text("nope")
    with pytest.raises(rd.DataError, match=r"np.parquet: not a readable parquet file"):
        list(rd.read_source_rows(notpq))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        rd.convert_file(tmp_path / "missing.jsonl", tmp_path / "o.parquet")
    scalars = _jsonl(tmp_path / "s.jsonl", [1, 2])
    with pytest.raises(rd.DataError, match=r"s.jsonl: no records \(read 2 rows"):
        rd.convert_file(scalars, tmp_path / "o.parquet")


def test_cli_converts_and_passes_verl_parquet_through(tmp_path, capsys):
    src = _jsonl(tmp_path / "mine.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "b"}])
    out = tmp_path / "verl.parquet"
    assert rd.main(["--input", str(src), "--out", str(out), "--split", "test", "--template", "plain"]) == 0
    assert capsys.readouterr().out.strip() == (
        f"{src}: mine/test: wrote 1 rows, skipped 1 (missing_answer=1) -> {out}"
    )
    assert pq.read_table(out).to_pylist()[0]["prompt"] == [{"role": "user", "content": "a"}]
    # the written file is a verl parquet: passed through unchanged
    assert rd.is_verl_parquet(out)
    copy = tmp_path / "copy.parquet"
    assert rd.main(["--input", str(out), "--out", str(copy)]) == 0
    assert copy.read_bytes() == out.read_bytes()
    # conversion options make no sense for a verl parquet: a usage error
    with pytest.raises(SystemExit) as e:
        rd.main(["--input", str(out), "--out", str(copy), "--data-source", "x"])
    assert e.value.code == 2 and "already a verl parquet" in capsys.readouterr().err
    # --input options are refused with --datasets
    with pytest.raises(SystemExit):
        rd.main(["--datasets", "aime24", "--out-dir", str(tmp_path), "--answer-key", "a"])


# ------------------------------------------------------------ the papers' named sets


def _write_parquet(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_paper_sets_registered():
    assert list(rd.PAPER_DATASETS) == [
        "numina_math", "deepscaler", "orz_math", "deepmath", "aime25", "math_full",
        "deepscaler_aime", "deepscaler_amc", "deepscaler_math", "deepscaler_minerva", "deepscaler_olympiad_bench",
    ]
    hub = {n: (s.hub_id, s.hub_config, s.hub_splits) for n, s in rd.PAPER_DATASETS.items() if s.hub_id}
    assert hub == {
        "numina_math": ("ScaleML-RLHF/numina_math", None, {"train": "train"}),
        "deepscaler": ("agentica-org/DeepScaleR-Preview-Dataset", None, {"train": "train"}),
        "deepmath": ("zwhe99/DeepMath-103K", None, {"train": "train"}),
        "aime25": ("math-ai/aime25", None, {"test": "test"}),
        "math_full": ("DigitalLearningGmbH/MATH-lighteval", "default", {"test": "test"}),
    }
    assert rd.PAPER_DATASETS["orz_math"].urls["train"].endswith("Open-Reasoner-Zero/raw/refs/heads/main/data/"
                                                                 "orz_math_57k_collected.json")
    # the built-in list (recipe.eval's benchmarks, recipe.main's auto-prepare) is unchanged
    assert "numina_math" not in rd.DATASETS and len(rd.DATASETS) == 7


def test_numina_from_local_parquet(tmp_path):
    _write_parquet(tmp_path / "numina_math" / "train.parquet", [
        {"problem": "Compute 3+4.", "answer": "7", "source": "synthetic_math", "solution": "\\boxed{7}"},
        {"problem": "CoT-shaped row", "answer": None, "source": "olympiads", "solution": "so \\boxed{\\sqrt{2}}"},
        {"problem": "no answer", "answer": "", "source": "amc_aime", "solution": "nothing"},
    ])
    res = rd.convert_split("numina_math", "train", tmp_path / "out", source_dir=tmp_path, template="minimal_rl")
    assert res.rows_written == 2 and dict(res.skipped) == {"no_boxed_answer": 1}
    rows = pq.read_table(res.path).to_pylist()
    assert res.path == tmp_path / "out" / "numina_math" / "train.parquet"
    assert [r["reward_model"]["ground_truth"] for r in rows] == [_gold("7", "numina_math"),
                                                                _gold("\\sqrt{2}", "numina_math")]
    assert rows[0]["prompt"] == [
        {"role": "system", "content": INSTRUCTION},
        {"role": "user", "content": "Compute 3+4. Let's think step by step and output the final answer within \\boxed{}."},
    ]
    assert rows[1]["extra_info"]["source"] == "olympiads"


def test_deepscaler_from_local_json(tmp_path):
    src = tmp_path / "deepscaler" / "deepscaler.json"
    src.parent.mkdir()
    src.write_text(json.dumps([
        {"problem": "p0", "answer": "\\frac{1}{2}", "solution": "..."},
        {"problem": "p1", "answer": "", "solution": "thus \\boxed{12}"},  # one of the rows without an answer
        {"problem": "p2", "answer": "", "solution": ""},
    ]), encoding="utf-8")
    res = rd.convert_split("deepscaler", "train", tmp_path / "o", source_dir=tmp_path)
    assert res.rows_written == 2 and dict(res.skipped) == {"missing_answer": 1}
    assert _truths(res.path) == [_gold("\\frac{1}{2}", "deepscaler"), _gold("12", "deepscaler")]


def test_orz_pairs_from_local_json(tmp_path):
    src = tmp_path / "orz_math" / "orz_math_57k_collected.json"
    src.parent.mkdir()
    src.write_text(json.dumps([
        [{"from": "human", "value": "How many primes below 10?"},
         {"from": "assistant", "ground_truth": {"value": "4", "pass_at_n": 0.75}}],
        [{"from": "human", "value": "Simplify 2/4."},
         {"from": "assistant", "ground_truth": {"value": "\\frac{1}{2}"}}],
        [{"from": "human", "value": "only a question"}],
        [{"from": "human", "value": "q"}, {"from": "assistant", "ground_truth": {"value": ""}}],
    ]), encoding="utf-8")
    res = rd.convert_split("orz_math", "train", tmp_path / "o", source_dir=tmp_path)
    assert res.rows_written == 2 and dict(res.skipped) == {"malformed_row": 1, "missing_answer": 1}
    rows = pq.read_table(res.path).to_pylist()
    assert [r["reward_model"]["ground_truth"] for r in rows] == [_gold("4", "orz_math"), _gold("\\frac{1}{2}", "orz_math")]
    assert rows[0]["extra_info"]["question"] == "How many primes below 10?"
    assert rows[0]["extra_info"]["pass_at_n"] == 0.75 and rows[1]["extra_info"]["pass_at_n"] is None


def test_deepmath_aime25_math_full_and_deepscaler_tests(tmp_path):
    _write_parquet(tmp_path / "deepmath" / "train.parquet", [
        {"question": "Evaluate the limit.", "final_answer": "0", "difficulty": 5.0, "topic": "Calculus",
         "r1_solution_1": "long", "r1_solution_2": "long", "r1_solution_3": "long"},
    ])
    _jsonl(tmp_path / "aime25" / "test.jsonl", [{"problem": "AIME", "answer": "070", "id": "0"}])
    _write_parquet(tmp_path / "math_full" / "test.parquet", [
        {"problem": "MATH", "level": "Level 5", "type": "Algebra", "solution": "$\\boxed{\\frac{\\sqrt{3}}{2}}$"},
    ])
    _jsonl(tmp_path / "deepscaler_test" / "amc.jsonl", [{"problem": "AMC", "answer": 27.0}])  # .jsonl beside .json
    got = {}
    for name, split in [("deepmath", "train"), ("aime25", "test"), ("math_full", "test"), ("deepscaler_amc", "test")]:
        rec = rd.load_records(name, split, tmp_path)
        assert len(rec) == 1 and rec[0]["data_source"] == name
        got[name] = rec[0]
    assert got["deepmath"]["reward_model"]["ground_truth"] == _gold("0", "deepmath")
    assert got["deepmath"]["extra_info"] == {"split": "train", "index": 0, "question": "Evaluate the limit.",
                                             "answer": "0", "difficulty": 5.0, "topic": "Calculus"}
    assert got["aime25"]["reward_model"]["ground_truth"] == _gold("70", "aime25")
    assert got["math_full"]["reward_model"]["ground_truth"] == _gold("\\frac{\\sqrt{3}}{2}", "math_full")
    assert got["math_full"]["extra_info"]["level"] == "Level 5"
    assert got["deepscaler_amc"]["reward_model"]["ground_truth"] == _gold("27", "deepscaler_amc")
    with pytest.raises(FileNotFoundError, match=r"deepscaler_aime/test: source file .*deepscaler_test/aime.json"):
        rd.load_records("deepscaler_aime", "test", tmp_path)


def test_hub_and_url_loading_use_the_same_mapping(tmp_path, monkeypatch):
    import datasets

    calls = []

    def fake_load(hub_id, config, split):
        calls.append((hub_id, config, split))
        return [{"question": "hub q", "final_answer": "3", "difficulty": 6.5, "topic": "Algebra"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    rec = rd.load_records("deepmath", "train", source="hub")
    assert calls == [("zwhe99/DeepMath-103K", None, "train")]
    assert rec[0]["reward_model"]["ground_truth"] == _gold("3", "deepmath") and rec[0]["extra_info"]["topic"] == "Algebra"

    # ORZ is one file on GitHub: downloaded once into the cache, then read like a local copy
    monkeypatch.setenv("RECIPE_DATA_CACHE", str(tmp_path / "cache"))
    payload = json.dumps([[{"from": "human", "value": "u"},
                           {"from": "assistant", "ground_truth": {"value": "9"}}]]).encode()
    fetched = []

    class Resp:
        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False

        def read(self):
            return payload

    def fake_urlopen(url, timeout):
        fetched.append(url)
        return Resp()

    import urllib.request

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    for _ in range(2):
        rec = rd.load_records("orz_math", "train", source="hub")
        assert rec[0]["reward_model"]["ground_truth"] == _gold("9", "orz_math")
    assert fetched == [rd.PAPER_DATASETS["orz_math"].urls["train"]]  # the second read used the cache
    assert (tmp_path / "cache" / "orz_math" / "orz_math_57k_collected.json").read_bytes() == payload


# -------------------------------------------------------------- prompt-length filter


@pytest.fixture(scope="module")
def qwen():
    if not QWEN_TOKENIZER.is_dir():
        pytest.skip(f"{QWEN_TOKENIZER} missing")
    return rd.PromptLengthFilter.load(QWEN_TOKENIZER, 5)


def test_token_counts_by_hand(qwen):
    """Qwen2's pre-tokenizer splits every digit into its own token; "hello world" is two
    tokens ("hello", " world"); no special token is added to a problem."""
    assert qwen.count("77777", []) == 5
    assert qwen.count("123456", []) == 6
    assert qwen.count("hello world", []) == 2


def test_length_filter_drops_long_problems(tmp_path, qwen, caplog, capsys):
    caplog.set_level(logging.WARNING, logger="recipe.data")
    src = _jsonl(tmp_path / "numina_math" / "train.jsonl", [
        {"problem": "777", "answer": "1"},  # 3 tokens: kept
        {"problem": "77777", "answer": "2"},  # 5 tokens: kept (<= 5)
        {"problem": "777777", "answer": "3"},  # 6 tokens: dropped
        {"problem": "hello world", "answer": "4"},  # 2 tokens: kept
    ])
    res = rd.convert_file(src, tmp_path / "o.parquet", length_filter=qwen)
    assert res.rows_written == 3 and dict(res.skipped) == {"prompt_too_long": 1}
    assert _truths(res.path) == [_gold(v, "numina_math") for v in ("1", "2", "4")]
    assert f"{src}: skipped row 2: 6 > 5 tokens (prompt_too_long)" in caplog.text
    # max_rows counts kept rows only
    assert rd.convert_file(src, tmp_path / "o.parquet", length_filter=qwen, max_rows=3).rows_written == 3
    # the named set, through the CLI with a tokenizer folder: the count is reported
    out = tmp_path / "out"
    assert rd.main(["--datasets", "numina_math", "--source-dir", str(tmp_path), "--out-dir", str(out),
                    "--max-prompt-tokens", "5", "--tokenizer", str(QWEN_TOKENIZER)]) == 0
    line = capsys.readouterr().out.strip()
    assert line == f"numina_math/train: wrote 3 rows, skipped 1 (prompt_too_long=1) -> {out}/numina_math/train.parquet"


def test_length_of_prompt_counts_the_chat_template(qwen):
    prompt_filter = rd.PromptLengthFilter(qwen.tokenizer, 5, "prompt")
    tmpl = rd.TEMPLATES["boxed"]
    short, long = prompt_filter.count("777", tmpl.messages("777")), prompt_filter.count("777777", tmpl.messages("777777"))
    assert long - short == 3  # three more digit tokens, the rest of the chat prompt is the same
    assert short > qwen.count("777", []) + 20  # the template's instruction and chat markers count


def test_length_filter_usage_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        rd.main(["--datasets", "aime24", "--out-dir", str(tmp_path), "--max-prompt-tokens", "700"])
    assert e.value.code == 2 and "--max-prompt-tokens and --tokenizer go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        rd.main(["--datasets", "aime24", "--out-dir", str(tmp_path), "--max-prompt-tokens", "0", "--tokenizer", "x"])
    src = _jsonl(tmp_path / "d.jsonl", [{"problem": "a", "answer": "1"}])
    assert rd.main(["--input", str(src), "--out", str(tmp_path / "o.parquet"), "--max-prompt-tokens", "9",
                    "--tokenizer", str(tmp_path / "no_such_tokenizer")]) == 1
    assert "could not load the tokenizer" in capsys.readouterr().err
    with pytest.raises(ValueError, match="length_of"):
        rd.PromptLengthFilter(object(), 5, "response")
