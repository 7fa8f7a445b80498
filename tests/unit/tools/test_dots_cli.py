"""``python -m recipe.dots`` (the DOTS tool): ``embed`` and ``train-adapter`` through ``main``,
and the library names it re-exports from :mod:`recipe.stages.dots` / :mod:`recipe.algos.dots`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import recipe.algos.dots as algos_dots
import recipe.stages.dots as stage_dots
from recipe import dots as cli
from tests.paths import GSM8K_TRAIN, QWEN_TOK, require
from tests.unit.algos.test_dots import _one_torch_thread, _synthetic_rounds  # noqa: F401  (autouse fixture)
from tests.unit.stages.test_dots import TEXTS, _prompt_parquet


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    require(GSM8K_TRAIN, QWEN_TOK / "tokenizer.json")
    from recipe.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("dots_cli") / "tiny", vocab_size=1024, max_train_rows=300,
                            hidden_size=32, intermediate_size=64)


def test_reexports_are_the_library_functions():
    for name in ("embed_questions", "embedding_cache_path", "question_texts", "read_rounds", "write_round",
                 "save_npy", "ROUND_KEYS"):
        assert getattr(cli, name) is getattr(stage_dots, name), name
    for name in ("train_adapter", "evaluate_adapter", "save_adapter", "load_adapter", "ADAPTER_FORMAT"):
        assert getattr(cli, name) is getattr(algos_dots, name), name
    assert set(cli.__all__) <= set(dir(cli))


def test_embed_cli(tiny_model, tmp_path):
    f = _prompt_parquet(tmp_path / "t.parquet", [[{"role": "user", "content": t}] for t in TEXTS])
    assert cli.main(["embed", "--data", str(f), "--model", str(tiny_model), "--cache-dir", str(tmp_path / "c"),
                     "--out", str(tmp_path / "e.npy")]) == 0
    direct = stage_dots.embed_questions(TEXTS, tiny_model, tmp_path / "c", device="cpu")
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), direct)


def test_train_adapter_cli(tmp_path):
    emb, diff, groups = _synthetic_rounds(n=60)
    np.save(tmp_path / "emb.npy", emb)
    rounds = tmp_path / "rounds.jsonl"
    for s in range(3):
        idx = np.flatnonzero(groups == s)
        stage_dots.write_round(rounds, s, idx.tolist(), [f"q{i}" for i in idx], diff[idx].tolist(), 8)
    out = tmp_path / "adapter.pt"
    assert cli.main(["train-adapter", "--rounds", str(rounds), "--embeddings", str(tmp_path / "emb.npy"),
                     "--out", str(out), "--epochs", "2", "--hidden", "8", "--batch-size", "16"]) == 0
    a = algos_dots.load_adapter(out)
    assert a.in_dim == 16 and a.hidden == 8
    blob = torch.load(out, weights_only=True)
    assert len(blob["history"]["epoch_loss"]) == 2
    with pytest.raises(SystemExit, match="exactly one"):
        cli.main(["train-adapter", "--rounds", str(rounds), "--out", str(out)])
    stage_dots.write_round(rounds, 9, [60], ["q60"], [0.5], 8)
    with pytest.raises(SystemExit, match="index 60 out of range"):
        cli.main(["train-adapter", "--rounds", str(rounds), "--embeddings", str(tmp_path / "emb.npy"),
                  "--out", str(out)])
