"""DOTS I/O: question embeddings (frozen HF LM, cached), logged rounds, adapter training.

The math lives in :mod:`recipe.algos.dots` (paper: arXiv 2506.05316, ``docs/PAPERS.md`` §2).
This module reads and writes files and runs Hugging Face models.

Command line::

    python -m recipe.dots embed --data TRAIN.parquet --model PATH --cache-dir DIR [--out EMB.npy]
    python -m recipe.dots train-adapter --rounds R1.jsonl [R2.jsonl ...] \\
        (--embeddings EMB.npy | --model PATH --cache-dir DIR) --out adapter.pt [--epochs 20 ...]

**Embeddings** (:func:`embed_questions`): mean of the frozen model's last hidden state over
the non-pad tokens (``AutoModel``, no LM head; right padding, so a text's embedding does not
depend on its batch), float32 on CPU, bfloat16 weights on CUDA (pooled in float32). Cached as
``<cache_dir>/emb-<key>.npy`` where the key is a sha256 of the resolved model path, its
``config.json``, the names/sizes/mtimes of its weight and tokenizer files, ``max_length``,
the dtype and every text; a second call with the same inputs loads the file without
loading the model.

**Logged rounds** (JSON lines, one per measured question; :func:`write_round` /
:func:`read_rounds`): ``{"step": int, "index": int, "prompt": str, "difficulty": float,
"n": int}`` with ``step`` the trainer step whose policy was measured, ``index`` the question's
row in the training parquet (0-based; the row of ``--embeddings``), ``prompt`` the question
text as :func:`question_texts` returns it (the user message), ``difficulty`` = mean(1 - r)
over its ``n`` >= 1 rollouts, in [0, 1]. Extra keys are allowed and ignored.

**Adapter training** (:func:`train_adapter`; paper: BCE, 20 epochs, AdamW lr 1e-3, batch
256): questions are grouped by ``step`` (difficulty is relative to one policy, so a query is
predicted only from references measured under the same policy; ``--group-by none`` pools
all). For each batch of queries of a group, a random reference subset of that group of size
min(K_group, ``ref_size`` = 256) is drawn; a query never attends to its own entry; the loss is
BCE(calibrated prediction, measured difficulty).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from recipe.algos.dots import (  # noqa: F401  (re-exported: the tool's library surface)
    ADAPTER_FORMAT,
    evaluate_adapter,
    load_adapter,
    save_adapter,
    train_adapter,
)
from recipe.stages.dots import (  # noqa: F401
    ROUND_KEYS,
    embed_questions,
    embedding_cache_path,
    question_texts,
    read_rounds,
    save_npy,
    write_round,
)

__all__ = ["embed_questions", "embedding_cache_path", "evaluate_adapter", "load_adapter", "main",
           "question_texts", "read_rounds", "save_adapter", "train_adapter", "write_round"]

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m recipe.dots", description="DOTS embeddings and adapter training")
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("embed", help="embed the questions of a verl parquet (cached)")
    e.add_argument("--data", required=True, help="verl parquet with a 'prompt' column")
    e.add_argument("--model", required=True, help="local HF model directory (frozen embedder)")
    t = sub.add_parser("train-adapter", help="train the adapter on logged rounds")
    t.add_argument("--rounds", required=True, nargs="+", help="JSONL files written by write_round")
    t.add_argument("--embeddings", help="[N, H] .npy aligned with the parquet rows ('index' of the records)")
    t.add_argument("--model", help="embed the logged prompts with this model instead of --embeddings")
    t.add_argument("--out", required=True, help="output adapter .pt")
    t.add_argument("--epochs", type=int, default=20)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--batch-size", type=int, default=256)
    t.add_argument("--ref-size", type=int, default=256)
    t.add_argument("--hidden", type=int, default=896)
    t.add_argument("--dropout", type=float, default=0.1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--group-by", choices=("step", "none"), default="step")
    for q in (e, t):
        q.add_argument("--cache-dir", default=None, help="embedding cache folder")
        q.add_argument("--max-length", type=int, default=512)
        q.add_argument("--embed-batch-size", type=int, default=32)
    e.add_argument("--out", help="also write the [N, H] embeddings to this .npy")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    need_cache = args.cmd == "embed" or args.model is not None
    if need_cache and args.cache_dir is None:
        raise SystemExit("--cache-dir is required with --model")
    if args.cmd == "embed":
        emb = embed_questions(question_texts(args.data), args.model, args.cache_dir, args.embed_batch_size,
                              args.max_length)
        if args.out:
            save_npy(Path(args.out), emb)
        print(f"[recipe.dots] embeddings {emb.shape} of {args.data}" + (f" -> {args.out}" if args.out else ""))
        return 0
    if (args.embeddings is None) == (args.model is None):
        raise SystemExit("train-adapter: give exactly one of --embeddings and --model")
    records = read_rounds(args.rounds)
    if not records:
        raise SystemExit(f"train-adapter: no records in {args.rounds}")
    if args.embeddings is not None:
        table = np.load(args.embeddings)
        bad = [r["index"] for r in records if r["index"] >= table.shape[0]]
        if bad:
            raise SystemExit(f"train-adapter: index {bad[0]} out of range for {args.embeddings} ({table.shape[0]} rows)")
        emb = table[[r["index"] for r in records]]
    else:
        unique = sorted({r["prompt"] for r in records})
        table = embed_questions(unique, args.model, args.cache_dir, args.embed_batch_size, args.max_length)
        row = {p: i for i, p in enumerate(unique)}
        emb = table[[row[r["prompt"]] for r in records]]
    diff = np.array([r["difficulty"] for r in records], dtype=np.float32)
    groups = np.array([r["step"] if args.group_by == "step" else 0 for r in records])
    adapter, history = train_adapter(emb, diff, groups, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                     ref_size=args.ref_size, hidden=args.hidden, dropout=args.dropout, seed=args.seed)
    bce, r = evaluate_adapter(adapter, emb, diff, groups, args.ref_size, seed=args.seed)
    save_adapter(adapter, args.out, history=history, args={k: v if not isinstance(v, list) else list(map(str, v))
                                                            for k, v in vars(args).items()})
    first = history["epoch_loss"][0] if history["epoch_loss"] else float("nan")
    print(f"[recipe.dots] {len(records)} records: BCE epoch 1 (train) {first:.4f}, after training (eval, "
          f"same records) {bce:.4f}, Pearson {r:.3f} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
