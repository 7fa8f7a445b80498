"""Tests of benchmarks.sft: (prompt, boxed answer) pairs, the SFT loop and its accuracy check."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import sft
from benchmarks.tasks import arithmetic as ar
from recipe.models import build_tiny_model, is_complete_model_dir
from tests.paths import QWEN_TOK, require

require(QWEN_TOK / "tokenizer.json")

SPEC = ar.ArithmeticSpec(min_digits=2, max_digits=2, ops=("+",))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    return ar.write_splits(tmp_path_factory.mktemp("arith"), 64, 8, seed=0, spec=SPEC)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, data) -> Path:
    return build_tiny_model(
        tmp_path_factory.mktemp("models") / "m",
        tokenizer="local",
        train_text=data["train"],
        vocab_size=320,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=64,
    )


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def test_load_pairs_builds_boxed_targets(data):
    pairs = sft.load_pairs(data["test"])
    _, test = ar.make_splits(64, 8, seed=0, spec=SPEC)
    assert [p["ground_truth"] for p in pairs] == [str(p.answer) for p in test]
    assert [p["response"] for p in pairs] == [f"\\boxed{{{p.answer}}}" for p in test]
    assert pairs[0]["messages"] == [
        {"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."},
        {"role": "user", "content": f"What is {test[0].text}?"},
    ]
    assert {p["data_source"] for p in pairs} == {"arithmetic"}
    custom = sft.load_pairs(data["test"], "The answer is \\boxed{{answer}}.")
    assert custom[0]["response"] == f"The answer is \\boxed{{{test[0].answer}}}."
    worked = sft.load_pairs(data["test"], "{solution}")
    assert [p["response"] for p in worked] == [ar.solution(p) for p in test]
    with pytest.raises(ValueError, match="placeholder"):
        sft.load_pairs(data["test"], "no placeholder")


def test_solution_template_needs_the_field(tmp_path):
    from recipe.data import DataError, write_parquet

    rec = ar.to_record(ar.Problem(1, "+", 2), "train", 0)
    del rec["extra_info"]["solution"]
    write_parquet([rec], tmp_path / "nosol.parquet")
    with pytest.raises(DataError, match="row 0: .*extra_info.solution"):
        sft.load_pairs(tmp_path / "nosol.parquet", "{solution}")


def test_load_pairs_rejects_a_non_verl_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recipe.data import DataError

    pq.write_table(pa.table({"x": [1]}), tmp_path / "bad.parquet")
    with pytest.raises(DataError, match="missing required column"):
        sft.load_pairs(tmp_path / "bad.parquet")


def test_encode_pair_masks_the_prompt_and_ends_with_eos(tokenizer):
    messages = ar.to_record(ar.Problem(37, "+", 58), "test", 0)["prompt"]
    enc = sft.encode_pair(tokenizer, messages, "\\boxed{95}")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    response = tokenizer("\\boxed{95}", add_special_tokens=False)["input_ids"]
    assert enc["input_ids"] == prompt + response + [tokenizer.eos_token_id]
    assert enc["labels"] == [-100] * len(prompt) + response + [tokenizer.eos_token_id]
    assert tokenizer.decode(enc["input_ids"][len(prompt):], skip_special_tokens=True) == "\\boxed{95}"
    assert tokenizer.eos_token == "<|im_end|>"  # what verl's rollout stops on


class _FixedModel:
    """Stands in for a causal LM: every prompt gets the same response tokens."""

    def __init__(self, tokenizer, response: str):
        self.response = tokenizer(response, add_special_tokens=False)["input_ids"]
        self.generation_config = type("G", (), {"eos_token_id": tokenizer.eos_token_id})()
        self.calls: list[dict] = []

    def eval(self):
        return self

    def generate(self, input_ids, attention_mask, **kwargs):
        self.calls.append(kwargs)
        tail = torch.tensor([self.response] * input_ids.shape[0])
        return torch.cat([input_ids, tail], dim=1)


def test_evaluate_accuracy_grades_with_the_math_grader(tokenizer):
    pairs = [
        {"messages": [{"role": "user", "content": f"What is {q}?"}], "ground_truth": gt, "data_source": "arithmetic"}
        for q, gt in (("37+58", "95"), ("3+4", "7"), ("90+5", "95"), ("1+1", "2"))
    ]
    model = _FixedModel(tokenizer, "\\boxed{95}")
    assert sft.evaluate_accuracy(model, tokenizer, pairs, temperature=1.0, samples=3) == 0.5
    assert model.calls[-1]["do_sample"] is True and model.calls[-1]["top_k"] == 0
    assert sft.evaluate_accuracy(model, tokenizer, pairs, temperature=0.0, samples=3) == 0.5
    assert model.calls[-1]["do_sample"] is False
    assert sft.evaluate_accuracy(_FixedModel(tokenizer, "95"), tokenizer, pairs) == 0.0  # no box
    assert sft.evaluate_accuracy(model, tokenizer, []) == 0.0


def test_sft_loss_decreases_and_saves_a_loadable_model(model_dir, data, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = sft.SFTConfig(steps=40, lr=3e-3, batch_size=16, warmup_steps=0, seed=0, threads=1)
    res = sft.train_sft(model_dir, data["train"], tmp_path / "warm", cfg, verbose=False)
    assert res.steps == 40 and not res.stopped_early
    losses = [loss for _, loss in res.losses]
    assert [s for s, _ in res.losses] == [25]  # logged every 25 steps
    # the logged loss (steps 1-25) is below the uniform-guess NLL ln(320) and the
    # model fits the 6-token boxed answers after 40 steps: check directly
    assert losses[0] < torch.log(torch.tensor(320.0)).item()
    out = tmp_path / "warm"
    assert is_complete_model_dir(out)
    info = json.loads((out / sft.INFO_FILE).read_text())
    assert info["steps"] == 40 and info["config"]["lr"] == 3e-3
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == len(AutoTokenizer.from_pretrained(str(model_dir)))

    def nll(path):
        model = AutoModelForCausalLM.from_pretrained(str(path))
        batch = [sft.encode_pair(tok, p["messages"], p["response"]) for p in sft.load_pairs(data["train"])[:16]]
        enc = sft._collate(tok.pad_token_id)(batch)
        with torch.no_grad():
            return model(**enc).loss.item()

    before, after = nll(model_dir), nll(out)
    assert after < 0.5 * before, (before, after)


def test_stop_at_acc_stops_at_the_first_evaluation(model_dir, data, tmp_path):
    cfg = sft.SFTConfig(
        steps=30, lr=1e-3, batch_size=8, eval_every=5, stop_at_acc=0.0, eval_max_new_tokens=4, threads=1
    )
    res = sft.train_sft(model_dir, data["train"], tmp_path / "w", cfg, eval_data=data["test"], verbose=False)
    assert res.steps == 5 and res.stopped_early
    assert [e["step"] for e in res.evals] == [5]
    assert 0.0 <= res.evals[0]["acc"] <= 1.0


def test_bad_settings_are_rejected(model_dir, data, tmp_path):
    with pytest.raises(ValueError, match="steps"):
        sft.SFTConfig(steps=0)
    with pytest.raises(ValueError, match="placeholder"):
        sft.SFTConfig(response_template="x")
    with pytest.raises(ValueError, match="eval_data"):
        sft.train_sft(model_dir, data["train"], tmp_path / "w", sft.SFTConfig(eval_every=5), verbose=False)
    with pytest.raises(FileNotFoundError, match="config.json"):
        sft.train_sft(tmp_path, data["train"], tmp_path / "w", verbose=False)
    argv = ["--model", str(model_dir), "--data", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "o")]
    assert sft.main(argv) == 1
    assert not (tmp_path / "o").exists()
