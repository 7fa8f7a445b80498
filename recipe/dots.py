"""DOTS I/O: question embeddings (frozen HF LM, cached), logged rounds, adapter training.

The math lives in :mod:`recipe.algos.dots` (paper: arXiv 2506.05316, ``docs/PAPERS.md`` §2).
This module reads and writes files and runs Hugging Face models.

Command line::

    python -m recipe.dots embed --data TRAIN.parquet --model PATH --cache-dir DIR [--out EMB.npy]
    python -m recipe.dots train-adapter --rounds R1.jsonl [R2.jsonl ...] \\
        (--embeddings EMB.npy | --model PATH --cache-dir DIR) --out adapter.pt [--epochs 20 ...] \\
        [--holdout-questions 0.3 [--eval-rounds OTHER.jsonl ...] [--report heldout.json]]

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
BCE(calibrated prediction, measured difficulty). The paper trains on rollouts of *other*
policies than the one it later selects for; a group is one policy (a checkpoint, a seed, a
logged step).

**Held-out evaluation** (``--holdout-questions F``): a seeded share F of the distinct
questions (by prompt text) is left out of training; afterwards, per group, those questions
are predicted from up to ``ref_size`` measured training questions of the same group, as a
run predicts its training set from a reference round (:func:`recipe.algos.dots.evaluate_heldout`),
for the adapter and for the identity projection (the no-adapter baseline). ``--eval-rounds``
adds groups of policies the adapter never saw (evaluated the same way, not trained on).
The pooled Pearson r is printed, stored in the adapter file (``heldout``) and written to
``--report`` as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

from recipe.algos.dots import (  # noqa: F401  (re-exported: the tool's library surface)
    ADAPTER_FORMAT,
    evaluate_adapter,
    evaluate_heldout,
    pool_stats,
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

__all__ = ["embed_questions", "embedding_cache_path", "evaluate_adapter", "evaluate_heldout", "load_adapter", "main",
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
    t.add_argument("--holdout-questions", type=float, default=0.0,
                   help="share of the distinct questions left out of training and used to report held-out Pearson")
    t.add_argument("--eval-rounds", nargs="*", default=[],
                   help="JSONL rounds of policies not trained on, evaluated on the held-out questions")
    t.add_argument("--report", help="write the held-out evaluation as JSON here")
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
    if not 0.0 <= args.holdout_questions < 1.0:
        raise SystemExit(f"train-adapter: --holdout-questions must be in [0, 1), got {args.holdout_questions}")
    if args.eval_rounds and not args.holdout_questions:
        raise SystemExit("train-adapter: --eval-rounds needs --holdout-questions > 0 (the questions to predict)")
    records = read_rounds(args.rounds)
    if not records:
        raise SystemExit(f"train-adapter: no records in {args.rounds}")
    extra = read_rounds(args.eval_rounds) if args.eval_rounds else []
    emb_of = _embedder(args, records + extra)
    group_of = (lambda r: r["step"]) if args.group_by == "step" else (lambda r: 0)

    held: set[str] = set()
    if args.holdout_questions:
        prompts = sorted({r["prompt"] for r in records})
        perm = np.random.default_rng(args.seed).permutation(len(prompts))
        held = {prompts[i] for i in perm[:int(round(args.holdout_questions * len(prompts)))]}
        if not held or len(held) == len(prompts):
            raise SystemExit(f"train-adapter: --holdout-questions {args.holdout_questions} of {len(prompts)} "
                             "questions leaves none held out or none to train on")
    train = [r for r in records if r["prompt"] not in held]
    emb = emb_of(train)
    diff = np.array([r["difficulty"] for r in train], dtype=np.float32)
    groups = np.array([group_of(r) for r in train])
    adapter, history = train_adapter(emb, diff, groups, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                                     ref_size=args.ref_size, hidden=args.hidden, dropout=args.dropout, seed=args.seed)
    bce, r = evaluate_adapter(adapter, emb, diff, groups, args.ref_size, seed=args.seed)
    first = history["epoch_loss"][0] if history["epoch_loss"] else float("nan")
    print(f"[recipe.dots] {len(train)} training records ({len(records) - len(train)} held out): BCE epoch 1 "
          f"(train) {first:.4f}, after training (eval, training records) {bce:.4f}, Pearson {r:.3f}")
    report: dict = {"train_records": len(train), "train_bce": bce, "train_pearson": r, "heldout": {}}
    if held:
        stats = pool_stats(emb_of(records + extra))
        for name, recs in (("trained_policies", records), ("unseen_policies", extra)):
            if not recs:
                continue
            e = emb_of(recs)
            d = np.array([x["difficulty"] for x in recs])
            g = np.array([group_of(x) for x in recs])
            q = np.array([x["prompt"] in held for x in recs])
            res = {}
            for label, model in (("adapter", adapter), ("identity", None)):
                out = evaluate_heldout(model, e, d, g, q, args.ref_size, seed=args.seed, stats=stats)
                res[label] = {k: out[k] for k in ("pearson", "pearson_group_mean", "n_queries", "n_groups")}
            report["heldout"][name] = res
            print(f"[recipe.dots] held-out Pearson, {name.replace('_', ' ')} ({res['adapter']['n_queries']} predictions "
                  f"of {len(held)} questions not trained on, {res['adapter']['n_groups']} groups): adapter "
                  f"{res['adapter']['pearson']:.3f} (per-group mean {res['adapter']['pearson_group_mean']:.3f}), "
                  f"identity projection {res['identity']['pearson']:.3f}")
    save_adapter(adapter, args.out, history=history, heldout=json.loads(json.dumps(report["heldout"])),
                 args={k: v if not isinstance(v, list) else list(map(str, v)) for k, v in vars(args).items()})
    if args.report:
        Path(args.report).parent.mkdir(parents=True, exist_ok=True)
        Path(args.report).write_text(json.dumps(report, indent=1) + "\n")
    print(f"[recipe.dots] adapter -> {args.out}")
    return 0


def _embedder(args, records: list[dict]):
    """records -> [M, H] embeddings: rows of ``--embeddings`` by ``index``, or ``--model``
    embeddings of the prompts (computed once for every record given here)."""
    if args.embeddings is not None:
        table = np.load(args.embeddings)
        bad = [r["index"] for r in records if r["index"] >= table.shape[0]]
        if bad:
            raise SystemExit(f"train-adapter: index {bad[0]} out of range for {args.embeddings} ({table.shape[0]} rows)")
        return lambda recs: table[[r["index"] for r in recs]]
    unique = sorted({r["prompt"] for r in records})
    table = embed_questions(unique, args.model, args.cache_dir, args.embed_batch_size, args.max_length)
    row = {p: i for i, p in enumerate(unique)}
    return lambda recs: table[[row[r["prompt"]] for r in recs]]


if __name__ == "__main__":
    sys.exit(main())
