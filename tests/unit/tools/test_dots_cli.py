"""``python -m recipe.dots`` (the DOTS tool): ``embed`` and ``train-adapter`` through ``main``,
and the library names it re-exports from :mod:`recipe.stages.dots` / :mod:`recipe.algos.dots`."""

from __future__ import annotations

import json
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


def _policy_rounds(tmp_path, n=40, h=8, shifts=(-0.8, 0.0, 0.8, 0.4)):
    """n questions measured under len(shifts) policies: d = sigmoid(3 e.v + shift); the last
    policy is written to its own file (never trained on)."""
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(n, h)).astype(np.float32)
    v = rng.normal(size=h) / np.sqrt(h)
    np.save(tmp_path / "emb.npy", emb)
    d = {}
    for p, shift in enumerate(shifts):
        d[p] = 1.0 / (1.0 + np.exp(-(3.0 * emb @ v + shift)))
        f = tmp_path / ("unseen.jsonl" if p == len(shifts) - 1 else "train.jsonl")
        stage_dots.write_round(f, p, list(range(n)), [f"q{i}" for i in range(n)], d[p].tolist(), 8)
    return emb, d


def test_train_adapter_cli_heldout_questions_and_unseen_policies(tmp_path, capsys):
    emb, d = _policy_rounds(tmp_path)
    out, report = tmp_path / "adapter.pt", tmp_path / "r" / "heldout.json"
    assert cli.main(["train-adapter", "--rounds", str(tmp_path / "train.jsonl"), "--eval-rounds",
                     str(tmp_path / "unseen.jsonl"), "--embeddings", str(tmp_path / "emb.npy"), "--out", str(out),
                     "--holdout-questions", "0.25", "--epochs", "3", "--hidden", "8", "--batch-size", "16",
                     "--ref-size", "32", "--report", str(report)]) == 0
    rep = json.loads(report.read_text())
    assert rep["train_records"] == 3 * 30  # 10 of the 40 questions held out, under each of 3 policies
    trained, unseen = rep["heldout"]["trained_policies"], rep["heldout"]["unseen_policies"]
    assert (trained["adapter"]["n_queries"], trained["adapter"]["n_groups"]) == (30, 3)
    assert (unseen["adapter"]["n_queries"], unseen["adapter"]["n_groups"]) == (10, 1)
    # the identity baseline equals evaluate_heldout on the same split, done by hand here
    recs = stage_dots.read_rounds(tmp_path / "train.jsonl")
    prompts = sorted({r["prompt"] for r in recs})
    held = {prompts[i] for i in np.random.default_rng(0).permutation(40)[:10]}
    stats = algos_dots.pool_stats(np.concatenate([emb] * 4))
    idx = [r["index"] for r in recs]
    by_hand = algos_dots.evaluate_heldout(None, emb[idx], [r["difficulty"] for r in recs], [r["step"] for r in recs],
                                          [r["prompt"] in held for r in recs], 32, seed=0, stats=stats)
    assert trained["identity"]["pearson"] == pytest.approx(by_hand["pearson"], abs=1e-12)
    assert torch.load(out, weights_only=True)["heldout"] == rep["heldout"]  # stored with the adapter
    assert "held-out Pearson, unseen policies (10 predictions of 10 questions not trained on" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--eval-rounds needs --holdout-questions"):
        cli.main(["train-adapter", "--rounds", str(tmp_path / "train.jsonl"), "--eval-rounds",
                  str(tmp_path / "unseen.jsonl"), "--embeddings", str(tmp_path / "emb.npy"), "--out", str(out)])
    with pytest.raises(SystemExit, match="leaves none held out"):
        cli.main(["train-adapter", "--rounds", str(tmp_path / "train.jsonl"), "--embeddings",
                  str(tmp_path / "emb.npy"), "--out", str(out), "--holdout-questions", "0.01"])
