"""Tests of recipe.eval without generation: the metrics it re-exports, the config
(conf/eval.yaml and conf/eval/), errors naming what is wrong, benchmark loading, the
checkpoint merge (on a synthetic one-rank FSDP checkpoint) and the resume bookkeeping."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import hydra
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from recipe import data as rd
from recipe import eval as ev
from recipe.algos import metrics as metrics_mod
from recipe.config import ConfigError
from tests.paths import DATA, require

REPO_ROOT = Path(__file__).resolve().parents[3]
CONF_DIR = REPO_ROOT / "conf"
EVAL_YAMLS = [CONF_DIR / "eval.yaml", *sorted((CONF_DIR / "eval").glob("*.yaml"))]


def test_metric_functions_are_reexported_from_algos_metrics():
    """recipe.eval's metric names are recipe.algos.metrics' (tested in tests/unit/algos/test_metrics.py)."""
    for name in ("pass_at_k", "avg_at_k", "check_pass_ks", "benchmark_metrics", "validation_metrics", "AVERAGE"):
        assert getattr(ev, name) is getattr(metrics_mod, name), name


# --------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compose():
    GlobalHydra.instance().clear()
    with hydra.initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):

        def _compose(*overrides: str) -> DictConfig:
            return hydra.compose("eval", overrides=list(overrides))

        yield _compose


def test_benchmark_names_are_recipe_data_names():
    assert set(ev.BENCHMARKS) == {"gsm8k", "math500", "minerva_math", "olympiadbench", "aime24", "amc23"}
    assert all(rd.DATASETS[b].splits.get("test") for b in ev.BENCHMARKS)


def test_eval_yaml_defaults(compose, tmp_path):
    cfg = compose(f"model_path={tmp_path}")
    ev.check_config(cfg)
    assert list(cfg.benchmarks) == ["math500", "minerva_math", "olympiadbench", "aime24", "amc23", "gsm8k"]
    assert (cfg.k, list(cfg.pass_k), cfg.temperature, cfg.template, cfg.backend) == (4, [1, 4], 1.0, "boxed", "auto")
    assert cfg.max_problems == 8 and cfg.resume is True and cfg.paths.data.endswith("/data")
    assert cfg.hf_num_threads == 1 and cfg.hf_dtype == "float32" and cfg.out_dir is None


@pytest.mark.parametrize("preset", ["minimalist", "paper"])
def test_minimalist_preset(compose, tmp_path, preset):
    """The Minimalist paper's Table 1: avg@16, T = 1.0, 4096 tokens, its code's prompt, the Qwen harness's grading."""
    cfg = compose(f"eval={preset}", f"checkpoint={tmp_path}")
    ev.check_config(cfg)
    assert list(cfg.benchmarks) == ["math500", "minerva_math", "olympiadbench"]
    assert (cfg.k, cfg.temperature, cfg.top_p, cfg.max_tokens, cfg.max_problems) == (16, 1.0, 1.0, 4096, None)
    assert (cfg.template, cfg.grading) == ("minimal_rl", "harness")


def test_dots_preset(compose, tmp_path):
    """DOTS's sampling (T 0.6, top-p 0.95) and 3072-token budget (docs/PAPERS.md section 2)."""
    cfg = compose("eval=dots", f"checkpoint={tmp_path}")
    ev.check_config(cfg)
    assert list(cfg.benchmarks) == ["math500", "minerva_math", "olympiadbench", "aime24", "amc23"]
    assert (cfg.k, cfg.temperature, cfg.top_p, cfg.max_tokens) == (16, 0.6, 0.95, 3072)
    assert (cfg.template, cfg.grading) == ("qwen_math_cot", "harness")


def test_grading_key(compose, tmp_path):
    assert compose(f"model_path={tmp_path}").grading == "strict"
    with pytest.raises(ConfigError, match="grading must be one of strict, harness"):
        ev.check_config(compose(f"model_path={tmp_path}", "grading=loose"))


QWEN_MATH_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nPlease reason step by step, and put your "
    "final answer within \\boxed{}.<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_render_prompt_says_the_instruction_once():
    """Qwen2.5-Math's chat template adds the boxed instruction as its default system message;
    with the boxed template (instruction in the user turn) it would appear twice."""
    from transformers import AutoTokenizer

    from recipe import models

    require(models.default_qwen_tokenizer_path())
    tok = AutoTokenizer.from_pretrained(str(models.default_qwen_tokenizer_path()))
    tok.chat_template = QWEN_MATH_TEMPLATE
    instruction = "Please reason step by step, and put your final answer within \\boxed{}."
    boxed = rd.resolve_template("boxed").messages("What is 1+1?")
    raw = tok.apply_chat_template(boxed, add_generation_prompt=True, tokenize=False)
    assert raw.count(instruction) == 2
    text = ev.render_prompt(tok, boxed)
    assert text.count(instruction) == 1
    assert text == (f"<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\nWhat is 1+1?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    # the qwen_math_cot template renders the same text; a plain ChatML template is left alone
    assert ev.render_prompt(tok, rd.resolve_template("qwen_math_cot").messages("What is 1+1?")) == text
    plain = AutoTokenizer.from_pretrained(str(models.default_qwen_tokenizer_path()))
    assert ev.render_prompt(plain, boxed) == plain.apply_chat_template(boxed, add_generation_prompt=True, tokenize=False)


@pytest.mark.parametrize("path", EVAL_YAMLS, ids=lambda p: p.relative_to(CONF_DIR).as_posix())
def test_eval_yamls_start_with_their_command(path):
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    commands = [line for line in header if "python -m recipe.eval" in line]
    assert commands and any("Command:" in line for line in commands), path
    if path.parent.name == "eval":
        assert any(f"eval={path.stem}" in line for line in commands), path


def _err(compose, *overrides) -> str:
    with pytest.raises(ConfigError) as exc:
        ev.check_config(compose(*overrides))
    return str(exc.value)


def test_config_errors_name_the_key(compose, tmp_path):
    m = f"model_path={tmp_path}"
    msg = _err(compose, m, "benchmarks=[math500,minerva]")
    assert "unknown benchmark 'minerva'" in msg
    assert all(b in msg for b in ev.BENCHMARKS)
    msg = _err(compose, m, "k=4", "pass_k=[1,8]")
    assert "pass_k=[1, 8]" in msg and "k = 4" in msg
    assert "exactly one of model_path" in _err(compose)
    assert "exactly one of model_path" in _err(compose, m, f"checkpoint={tmp_path}")
    assert "k must be an integer >= 1, got 0" in _err(compose, m, "k=0")
    assert "top_p must be in (0, 1], got 0" in _err(compose, m, "top_p=0")
    assert "temperature must be >= 0" in _err(compose, m, "temperature=-1")
    assert "max_problems must be >= 1" in _err(compose, m, "max_problems=0")
    assert "hf_num_threads must be >= 1" in _err(compose, m, "hf_num_threads=0")
    assert "backend must be auto, hf or vllm, got 'sglang'" in _err(compose, m, "backend=sglang")
    assert "template: prompt template 'fancy'" in _err(compose, m, "template=fancy")
    assert "benchmarks is empty" in _err(compose, m, "benchmarks=[]")
    assert "pass_k is empty" in _err(compose, m, "pass_k=[]")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
def test_vllm_backend_needs_a_gpu():
    assert ev.pick_backend("auto") == "hf" and ev.pick_backend("hf") == "hf"
    with pytest.raises(ConfigError, match="backend=vllm needs a CUDA GPU"):
        ev.pick_backend("vllm")


def test_evaluate_bad_paths_fail_before_any_work(compose, tmp_path):
    missing = tmp_path / "runs" / "x" / "global_step_9"
    with pytest.raises(FileNotFoundError, match=re.escape(f"checkpoint: {missing} does not exist")):
        ev.evaluate(compose(f"checkpoint={missing}", f"paths.artifacts={tmp_path / 'art'}"))
    with pytest.raises(FileNotFoundError, match=re.escape(f"model_path: {missing} does not exist")):
        ev.evaluate(compose(f"model_path={missing}", f"paths.artifacts={tmp_path / 'art'}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(f"model_path: {tmp_path / 'empty'} is not an HF model")):
        ev.evaluate(compose(f"model_path={tmp_path / 'empty'}", f"paths.artifacts={tmp_path / 'art'}"))
    assert not (tmp_path / "art").exists()  # nothing prepared or written


# --------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------
def test_checkpoint_without_shards(tmp_path):
    step = tmp_path / "global_step_3"
    (step / "actor" / "huggingface").mkdir(parents=True)
    with pytest.raises(FileNotFoundError) as exc:
        ev.checkpoint_actor_dir(step)
    assert str(step) in str(exc.value) and "no FSDP model shards" in str(exc.value)
    f = tmp_path / "file.pt"
    f.write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        ev.checkpoint_actor_dir(f)


@pytest.fixture(scope="module")
def fake_checkpoint(tmp_path_factory):
    """A one-rank FSDP checkpoint as verl lays it out: plain (non-DTensor) shards of a tiny model."""
    from transformers import AutoModelForCausalLM

    from recipe.models import build_tiny_model

    require(DATA / "gsm8k" / "train.jsonl")
    root = tmp_path_factory.mktemp("ckpt")
    model_dir = build_tiny_model(root / "tiny", vocab_size=512, max_train_rows=100)
    actor = root / "run" / "global_step_2" / "actor"
    (actor / "huggingface").mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, actor / "huggingface" / f.name)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.save(model.state_dict(), actor / "model_world_size_1_rank_0.pt")
    (actor / "fsdp_config.json").write_text(json.dumps({"FSDP_version": 2, "world_size": 1}))
    return actor.parent, model


def test_merge_checkpoint_then_reuse(fake_checkpoint):
    from transformers import AutoModelForCausalLM

    step, original = fake_checkpoint
    merged = ev.merge_checkpoint(step)
    assert merged == step / "actor" / ev.MERGED_DIR
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
    assert not list((step / "actor").glob(f".{ev.MERGED_DIR}.tmp-*"))  # temporary folder renamed
    loaded = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    ref = original.state_dict()
    for name, tensor in loaded.state_dict().items():
        # verl's merger stores bfloat16: equal to the bf16 rounding of the original
        assert torch.equal(tensor, ref[name].to(torch.bfloat16).float()), name
    mtime = (merged / "model.safetensors").stat().st_mtime_ns
    assert ev.merge_checkpoint(step / "actor") == merged  # the actor folder works too; cached
    assert (merged / "model.safetensors").stat().st_mtime_ns == mtime


def test_merge_checkpoint_missing_pieces(fake_checkpoint, tmp_path):
    step, _ = fake_checkpoint
    broken = tmp_path / "global_step_2"
    shutil.copytree(step, broken, ignore=shutil.ignore_patterns(ev.MERGED_DIR))
    (broken / "actor" / "fsdp_config.json").write_text(json.dumps({"world_size": 2}))
    (broken / "actor" / "model_world_size_1_rank_0.pt").rename(broken / "actor" / "model_world_size_2_rank_0.pt")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{broken / 'actor'}/model_world_size_2_rank_1.pt")):
        ev.merge_checkpoint(broken)
    shutil.rmtree(broken / "actor" / "huggingface")
    with pytest.raises(FileNotFoundError, match=re.escape(f"{broken / 'actor' / 'huggingface'}/config.json")):
        ev.merge_checkpoint(broken)


# --------------------------------------------------------------------------------------
# benchmarks
# --------------------------------------------------------------------------------------
def test_load_benchmark_prepares_on_demand(tmp_path):
    require(DATA / "aime24" / "test.jsonl", DATA / "math500" / "test.jsonl")
    probs = ev.load_benchmark("aime24", tmp_path, max_problems=2)
    assert (tmp_path / "aime24" / "test.parquet").is_file()
    assert [(p.index, p.problem_id, p.gold) for p in probs] == [(0, "60", "204"), (1, "61", "113")]
    assert probs[0].messages[-1]["content"].endswith("put your final answer within \\boxed{}.")
    math500 = ev.load_benchmark("math500", tmp_path)
    assert len(math500) == 500 and math500[0].problem_id == "test/precalculus/807.json"
    assert math500[1].gold == "p - q"


def test_load_benchmark_reads_olympiadbench_tolerance(tmp_path):
    """OlympiadBench row 316 (gold 4.2, unit %, ``error`` "1e-1") carries its tolerance to the grader."""
    require(DATA / "olympiadbench" / "test.jsonl")
    problems = ev.load_benchmark("olympiadbench", tmp_path)
    by_index = {p.index: p for p in problems}
    assert (by_index[316].gold, by_index[316].tolerance) == ("4.2", 0.1)
    assert sum(p.tolerance is not None for p in problems) == 1


def test_load_benchmark_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as exc:
        ev.load_benchmark("amc23", tmp_path, prepare=False)
    assert str(tmp_path / "amc23" / "test.parquet") in str(exc.value)
    with pytest.raises(ConfigError, match="unknown benchmark 'minerva'; valid names: gsm8k"):
        ev.load_benchmark("minerva", tmp_path)
    # a missing source file is named
    monkeypatch.setenv("RECIPE_SHARED_DIR", str(tmp_path / "no_shared"))
    with pytest.raises(FileNotFoundError) as exc:
        ev.load_benchmark("amc23", tmp_path)
    assert "benchmark amc23" in str(exc.value) and str(tmp_path / "no_shared" / "data" / "amc23" / "test.jsonl") in str(
        exc.value
    )


def test_load_benchmark_rejects_another_template(tmp_path):
    require(DATA / "aime24" / "test.jsonl")
    ev.load_benchmark("aime24", tmp_path, template="boxed")
    path = tmp_path / "aime24" / "test.parquet"
    for template in ("plain", "qwen_math_cot"):
        with pytest.raises(ConfigError) as exc:
            ev.load_benchmark("aime24", tmp_path, template=template)
        assert str(path) in str(exc.value) and "row 0" in str(exc.value) and f"template={template!r}" in str(exc.value)


# --------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------
def test_read_samples_keeps_complete_problems_only(tmp_path, caplog):
    path = tmp_path / "samples.jsonl"
    lines = [
        {"benchmark": "gsm8k", "index": 0, "sample": 0, "acc": 1.0},
        {"benchmark": "gsm8k", "index": 0, "sample": 1, "acc": 0.0},
        {"benchmark": "gsm8k", "index": 1, "sample": 0, "acc": 0.0},  # sample 1 missing
        {"benchmark": "aime24", "index": 5, "sample": 1, "acc": 0.0},
        {"benchmark": "aime24", "index": 5, "sample": 0, "acc": 1.0},
    ]
    path.write_text("\n".join(json.dumps(r) for r in lines) + '\n{"benchmark": "gsm8k", "ind\n')
    with caplog.at_level("WARNING"):
        kept, done = ev._read_samples(path, k=2)
    assert done == {("gsm8k", 0), ("aime24", 5)}
    assert [(r["benchmark"], r["index"], r["sample"]) for r in kept] == [
        ("aime24", 5, 0), ("aime24", 5, 1), ("gsm8k", 0, 0), ("gsm8k", 0, 1)]
    assert "line 6 is not a sample record" in caplog.text
    assert ev._read_samples(tmp_path / "none.jsonl", 2) == ([], set())


def test_markdown_table():
    metrics = {"A/avg@4": 0.375, "A/pass@1": 0.375, "A/pass@2": 0.6667, "B/avg@4": 0.5, "B/pass@1": 0.5,
               "B/pass@2": 0.5, "average/avg@4": 0.4375, "average/pass@1": 0.4375, "average/pass@2": 0.58335}
    counts = {"A": {"problems": 2, "answered": 0.5, "truncated": 0.25, "tokens": 10.0},
              "B": {"problems": 3, "answered": 1.0, "truncated": 0.0, "tokens": 20.0}}
    lines = ev.markdown_table(metrics, counts, 4, [1, 2]).splitlines()
    assert lines[0] == ("| benchmark | problems | k | avg@4 (%) | pass@1 (%) | pass@2 (%) | answered (%) "
                        "| truncated (%) | mean tokens |")
    assert lines[2] == "| A | 2 | 4 | 37.5 | 37.5 | 66.7 | 50.0 | 25.0 | 10.0 |"
    assert lines[3] == "| B | 3 | 4 | 50.0 | 50.0 | 50.0 | 100.0 | 0.0 | 20.0 |"
    assert lines[4] == "| **average** | 5 | 4 | 43.8 | 43.8 | 58.3 | 75.0 | 12.5 | 15.0 |"
