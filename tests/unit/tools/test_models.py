"""Tests for ``recipe.models``: tiny local Qwen2 models and the local tokenizer."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from recipe import models

from tests.paths import GSM8K_TRAIN, QWEN_TOK, require

require(GSM8K_TRAIN, QWEN_TOK / "tokenizer.json")

VOCAB = 1024
ROWS = 300
SIZES = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
MESSAGES = [{"role": "user", "content": "What is 2+2?"}]
ANSWER = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "So the answer is \\boxed{72}.\n#### 72"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "<|fim_pad|>", "<|file_sep|>"]


def _build(out: Path, **kwargs) -> Path:
    params = dict(SIZES, tokenizer="local", vocab_size=VOCAB, max_train_rows=ROWS, seed=0)
    params.update(kwargs)
    return models.build_tiny_model(out, **params)


def _expected_params(vocab: int, h: int, layers: int, heads: int, kv_heads: int, inter: int) -> int:
    head_dim = h // heads
    kv = kv_heads * head_dim
    attn = (h * h + h) + 2 * (h * kv + kv) + h * h  # q (bias), k/v (bias), o (no bias)
    mlp = 3 * h * inter  # gate, up, down (no bias)
    norms = 2 * h  # input + post-attention RMSNorm
    return vocab * h + layers * (attn + mlp + norms) + h  # tied lm_head, final norm


@pytest.fixture(scope="module")
def local_dir(tmp_path_factory) -> Path:
    return _build(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def qwen_tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(QWEN_TOK))


@pytest.fixture(scope="module")
def local_tok(local_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(local_dir))


@pytest.fixture(scope="module")
def local_model(local_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(local_dir)).eval()


def test_files_and_sizes(local_dir, local_tok, local_model):
    assert models.is_complete_model_dir(local_dir)
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (local_dir / name).is_file()
    assert len(local_tok) == VOCAB
    assert local_model.config.vocab_size == VOCAB
    assert local_model.config.model_type == "qwen2"
    assert local_model.config.tie_word_embeddings is True
    assert local_model.get_input_embeddings().weight.shape == (VOCAB, 64)
    config = json.loads((local_dir / "config.json").read_text())
    assert config["dtype"] == "float32"
    assert "flash" not in str(config.get("attn_implementation", "")) + str(config.get("_attn_implementation", ""))
    # no temp/backup directories left next to the model
    assert sorted(p.name for p in local_dir.parent.iterdir()) == ["tiny"]


def test_parameter_count(local_model, local_dir):
    expected = _expected_params(VOCAB, 64, 2, 4, 2, 128)
    assert expected == 336_448 - (4096 - VOCAB) * 64
    assert models.count_parameters(local_model) == expected
    assert local_model.num_parameters() == expected
    info = json.loads((local_dir / models.BUILD_INFO_FILE).read_text())
    assert info["num_parameters"] == expected


def test_chat_template_matches_qwen(local_tok, qwen_tok):
    got = local_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    want = qwen_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert got == want
    assert got.startswith("<|im_start|>system\n")
    assert got.endswith("<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n")
    with_system = [{"role": "system", "content": "Be brief."}, *MESSAGES]
    assert local_tok.apply_chat_template(
        with_system, add_generation_prompt=True, tokenize=False
    ) == qwen_tok.apply_chat_template(with_system, add_generation_prompt=True, tokenize=False)


def test_special_tokens(local_dir, local_tok, local_model):
    ids = {}
    for token in SPECIALS:
        enc = local_tok.encode(token, add_special_tokens=False)
        assert len(enc) == 1, token
        ids[token] = enc[0]
        assert enc[0] >= VOCAB - 22  # appended after the BPE vocabulary
    assert local_tok.eos_token == "<|im_end|>" and local_tok.eos_token_id == ids["<|im_end|>"]
    assert local_tok.pad_token == "<|endoftext|>" and local_tok.pad_token_id == ids["<|endoftext|>"]
    assert local_tok.bos_token is None
    cfg = local_model.config
    assert cfg.eos_token_id == ids["<|im_end|>"] and cfg.pad_token_id == ids["<|endoftext|>"]
    gen = json.loads((local_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [ids["<|im_end|>"], ids["<|endoftext|>"]]
    assert gen["pad_token_id"] == ids["<|endoftext|>"]
    # encoding a chat prompt keeps the special tokens whole
    prompt = local_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    enc = local_tok.encode(prompt, add_special_tokens=False)
    assert enc.count(ids["<|im_start|>"]) == 3 and enc.count(ids["<|im_end|>"]) == 2


def test_round_trip_and_digits(local_tok):
    ids = local_tok.encode(ANSWER, add_special_tokens=False)
    assert local_tok.decode(ids) == ANSWER
    tokens = local_tok.tokenize("#### 1234")
    assert [local_tok.convert_tokens_to_string([t]) for t in tokens][-4:] == ["1", "2", "3", "4"]
    odd = "Ünïcödé 日本 \\frac{1}{2} \t\n  $x^2$"
    assert local_tok.decode(local_tok.encode(odd, add_special_tokens=False)) == odd


def test_forward_and_generate(local_tok, local_model):
    import torch

    enc = local_tok.apply_chat_template(
        MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    with torch.no_grad():
        logits = local_model(**enc).logits
        out = local_model.generate(**enc, max_new_tokens=5, do_sample=False)
    assert logits.shape == (1, enc["input_ids"].shape[1], VOCAB)
    assert torch.isfinite(logits).all()
    assert out.shape[1] <= enc["input_ids"].shape[1] + 5
    assert out.shape[1] > enc["input_ids"].shape[1]


def test_seed_determinism(local_dir, tmp_path):
    from safetensors.torch import load_file

    same = _build(tmp_path / "same")
    other = _build(tmp_path / "other", seed=1)
    assert (same / "model.safetensors").read_bytes() == (local_dir / "model.safetensors").read_bytes()
    assert (same / "tokenizer.json").read_bytes() == (local_dir / "tokenizer.json").read_bytes()
    a, b = load_file(str(local_dir / "model.safetensors")), load_file(str(other / "model.safetensors"))
    assert a.keys() == b.keys()
    assert any(not a[k].equal(b[k]) for k in a)
    # tokenizer does not depend on the seed
    assert (other / "tokenizer.json").read_bytes() == (local_dir / "tokenizer.json").read_bytes()


def test_force_and_idempotence(tmp_path, capsys):
    out = _build(tmp_path / "m")
    weights = out / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    stamp = out / "stamp.txt"
    stamp.write_text("kept")

    assert _build(out, seed=5) == out  # no force: left alone
    assert weights.stat().st_mtime_ns == mtime and stamp.is_file()

    assert models.main([
        "--out", str(out), "--vocab-size", str(VOCAB), "--max-train-rows", str(ROWS),
    ]) == 0
    printed = capsys.readouterr().out
    assert "left alone" in printed and "parameters" in printed and "vocab size" in printed
    assert weights.stat().st_mtime_ns == mtime

    _build(out, force=True, seed=5)
    assert not stamp.exists()  # the whole directory was replaced
    assert models.is_complete_model_dir(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]


def test_incomplete_dir(local_dir, tmp_path):
    assert not models.is_complete_model_dir(tmp_path / "missing")
    broken = tmp_path / "broken"
    shutil.copytree(local_dir, broken)
    assert models.is_complete_model_dir(broken)
    (broken / "model.safetensors").unlink()
    assert not models.is_complete_model_dir(broken)
    (broken / "model.safetensors").write_bytes(b"")
    assert not models.is_complete_model_dir(broken)
    (broken / "model.safetensors").unlink()
    # an incomplete directory is rebuilt even without --force
    _build(broken)
    assert models.is_complete_model_dir(broken)
    assert (broken / "model.safetensors").read_bytes() == (local_dir / "model.safetensors").read_bytes()


def test_build_local_tokenizer_api(tmp_path):
    texts = ["The answer is \\boxed{42}.", "#### 42", "She has 3 apples and 4 pears."] * 20
    tok = models.build_local_tokenizer(texts, vocab_size=300, out_dir=tmp_path / "tok")
    assert 256 + 22 <= len(tok) <= 300
    assert tok.decode(tok.encode(texts[0], add_special_tokens=False)) == texts[0]
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert again.encode(texts[2]) == tok.encode(texts[2])
    with pytest.raises(ValueError):
        models.build_local_tokenizer(texts, vocab_size=100)


def test_iter_texts_formats(tmp_path):
    import pandas as pd

    txt = tmp_path / "a.txt"
    txt.write_text("line one\n\nline two\n")
    assert list(models.iter_texts(txt)) == ["line one", "line two"]
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps({"question": "Q?", "answer": "A #### 1", "id": 3}) + "\n")
    assert list(models.iter_texts(jsonl)) == ["Q?", "A #### 1"]
    parquet = tmp_path / "a.parquet"
    pd.DataFrame(
        {"prompt": [[{"role": "user", "content": "Solve 1+1."}]], "data_source": ["gsm8k"]}
    ).to_parquet(parquet)
    assert list(models.iter_texts(parquet)) == ["user", "Solve 1+1.", "gsm8k"]
    assert list(models.iter_texts(GSM8K_TRAIN, max_rows=2))[:1] == [
        json.loads(GSM8K_TRAIN.open().readline())["question"]
    ]


def test_shared_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RECIPE_SHARED_DIR", str(tmp_path))
    assert models.shared_dir() == tmp_path
    assert models.default_train_text_path() == tmp_path / "data" / "gsm8k" / "train.jsonl"
    monkeypatch.delenv("RECIPE_SHARED_DIR")
    import recipe

    assert models.shared_dir() == Path(recipe.__file__).resolve().parents[1].parent / "shared"


def test_qwen_tokenizer_model(tmp_path, qwen_tok):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = models.build_tiny_model(
        tmp_path / "qwen",
        tokenizer="qwen2.5",
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=32,
    )
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert len(tok) == len(qwen_tok) == 151_665
    assert model.config.vocab_size >= 151_665 and model.config.vocab_size % 64 == 0
    assert model.config.tie_word_embeddings is True
    assert model.config.eos_token_id == qwen_tok.eos_token_id == 151_645
    assert model.config.pad_token_id == qwen_tok.pad_token_id == 151_643
    assert models.count_parameters(model) == _expected_params(model.config.vocab_size, 16, 1, 2, 1, 32)
    sample = ANSWER + " Ünïcödé 日本 <|im_start|>user\nHi<|im_end|>"
    assert tok.encode(sample) == qwen_tok.encode(sample)
    assert tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False) == (
        qwen_tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    )
    for name in os.listdir(out):
        assert (out / name).stat().st_mode & 0o200  # copied from a read-only folder, still writable
