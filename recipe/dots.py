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
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from recipe.algos.dots import Adapter, pearson

__all__ = ["embed_questions", "embedding_cache_path", "evaluate_adapter", "load_adapter", "main",
           "question_texts", "read_rounds", "save_adapter", "train_adapter", "write_round"]

logger = logging.getLogger(__name__)
ROUND_KEYS = {"step": int, "index": int, "prompt": str, "difficulty": float, "n": int}
ADAPTER_FORMAT = "recipe.dots.adapter/1"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".txt", ".model", ".jinja")


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_npy(path: Path, arr: np.ndarray) -> None:
    def write(tmp):
        with open(tmp, "wb") as fh:
            np.save(fh, arr)
    _atomic_write(Path(path), write)


def _resolve_model(model_path) -> Path:
    path = Path(model_path).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"embedding model not found: {path} (need a local HF model directory with "
                                "config.json; download a hub model first, e.g. `hf download ID --local-dir DIR`)")
    return path


def embedding_cache_path(texts: Sequence[str], model_path, cache_dir, max_length: int = 512,
                         dtype: str = "float32") -> Path:
    """The cache file :func:`embed_questions` uses for these inputs (see the module docstring)."""
    path = _resolve_model(model_path)
    h = hashlib.sha256()
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir()
                   if f.is_file() and f.suffix in _WEIGHT_SUFFIXES)
    head = {"model": str(path), "config": (path / "config.json").read_text(encoding="utf-8"), "files": files,
            "max_length": int(max_length), "dtype": dtype, "pooling": "mean_last_hidden/1"}
    h.update(json.dumps(head, sort_keys=True).encode())
    for t in texts:
        b = str(t).encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)
    return Path(cache_dir) / f"emb-{h.hexdigest()[:32]}.npy"


def _load_model(model_path: Path, device: str, dtype: str):
    """Loads (tokenizer, model) for mean pooling; tests monkeypatch this to prove a cache hit."""
    import transformers
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    major = int(transformers.__version__.split(".")[0])
    kw = {"dtype" if major >= 5 else "torch_dtype": getattr(torch, dtype)}
    model = AutoModel.from_pretrained(str(model_path), **kw).to(device).eval()
    return tok, model


def embed_questions(texts: Sequence[str], model_path, cache_dir, batch_size: int = 32, max_length: int = 512,
                    device: str | None = None, log_every: int = 20) -> np.ndarray:
    """Mean-pooled last-hidden-state embeddings of ``texts`` with a frozen HF model, cached.

    Args:
        texts: N question strings (N >= 1).
        model_path: local HF model directory (a causal LM's directory works: ``AutoModel``
            loads the base model without the LM head).
        cache_dir: folder for ``emb-<sha256>.npy`` files (created if needed).
        batch_size: texts per forward pass (texts are sorted by length to limit padding).
        max_length: tokens kept per text (longer ones are truncated).
        device: torch device; default ``cuda`` when available, else ``cpu``.
        log_every: log progress (texts/s) every this many batches.

    Returns:
        [N, H] float32 embeddings, row i for ``texts[i]``.

    Raises:
        FileNotFoundError: ``model_path`` is not a model directory (names it).
        ValueError: ``texts`` is empty.
    """
    if len(texts) == 0:
        raise ValueError("embed_questions: no texts")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "float32" if str(device).startswith("cpu") else "bfloat16"
    path = _resolve_model(model_path)
    cache = embedding_cache_path(texts, path, cache_dir, max_length, dtype)
    if cache.is_file():
        emb = np.load(cache)
        if emb.ndim == 2 and emb.shape[0] == len(texts) and emb.dtype == np.float32:
            logger.info("dots embeddings: cache hit %s %s", cache, emb.shape)
            return emb
        logger.warning("dots embeddings: ignoring malformed cache file %s (shape %s)", cache, emb.shape)
    tok, model = _load_model(path, device, dtype)
    order = np.argsort([len(t) for t in texts], kind="stable")
    out: np.ndarray | None = None
    start = time.perf_counter()
    with torch.inference_mode():
        for b, lo in enumerate(range(0, len(texts), batch_size)):
            idx = order[lo:lo + batch_size]
            enc = tok([str(texts[i]) for i in idx], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt").to(device)
            hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            pooled = ((hidden.float() * m).sum(1) / m.sum(1).clamp_min(1.0)).cpu().numpy()
            if out is None:
                out = np.empty((len(texts), pooled.shape[1]), dtype=np.float32)
            out[idx] = pooled
            done = min(lo + batch_size, len(texts))
            if (b + 1) % log_every == 0 or done == len(texts):
                rate = done / max(time.perf_counter() - start, 1e-9)
                logger.info("dots embeddings: %d/%d texts (%.1f texts/s)", done, len(texts), rate)
    _save_npy(cache, out)
    return out


def question_texts(parquet) -> list[str]:
    """The user message of each row's ``prompt`` (verl parquet: a list of {role, content}).

    Raises:
        FileNotFoundError: missing file. ValueError: no ``prompt`` column, or a row without a
            user message (names the file and row).
    """
    import pandas as pd

    path = Path(parquet)
    if not path.is_file():
        raise FileNotFoundError(f"parquet file not found: {path}")
    frame = pd.read_parquet(path)
    if "prompt" not in frame.columns:
        raise ValueError(f"{path}: no 'prompt' column (columns: {list(frame.columns)})")
    texts = []
    for row, messages in enumerate(frame["prompt"]):
        users = [m.get("content") for m in (messages if messages is not None else []) if isinstance(m, dict)
                 and m.get("role") == "user" and isinstance(m.get("content"), str)]
        if not users:
            raise ValueError(f"{path}: row {row}: prompt has no user message with string content")
        texts.append(users[-1])
    return texts


def write_round(path, step: int, index: Sequence[int], prompt: Sequence[str], difficulty: Sequence[float],
                n: int | Sequence[int]) -> None:
    """Appends one selection round (one JSON line per question) to ``path``; see the module docstring.

    Raises:
        ValueError: lengths differ, difficulty outside [0, 1] or n < 1.
    """
    k = len(index)
    ns = [int(n)] * k if isinstance(n, (int, np.integer)) else [int(x) for x in n]
    if not (len(prompt) == len(difficulty) == len(ns) == k):
        raise ValueError(f"write_round: index/prompt/difficulty/n lengths differ: {k}, {len(prompt)}, "
                         f"{len(difficulty)}, {len(ns)}")
    lines = []
    for i, p, d, m in zip(index, prompt, difficulty, ns):
        if not 0.0 <= float(d) <= 1.0 or m < 1:
            raise ValueError(f"write_round: question {int(i)}: difficulty {d} not in [0, 1] or n {m} < 1")
        rec = {"step": int(step), "index": int(i), "prompt": str(p), "difficulty": float(d), "n": m}
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.writelines(lines)


def read_rounds(paths) -> list[dict]:
    """Reads logged rounds from one or more JSONL files (blank lines skipped).

    Raises:
        FileNotFoundError: a missing file. ValueError: a malformed line (names file and 1-based line).
    """
    records = []
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"rounds file not found: {path}")
        with path.open(encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    if not isinstance(rec, dict):
                        raise ValueError("not a JSON object")
                    for key, typ in ROUND_KEYS.items():
                        if key not in rec:
                            raise ValueError(f"missing key {key!r}")
                        if typ is float and isinstance(rec[key], int) and not isinstance(rec[key], bool):
                            rec[key] = float(rec[key])
                        if not isinstance(rec[key], typ) or isinstance(rec[key], bool):
                            raise ValueError(f"{key!r} must be {typ.__name__}, got {rec[key]!r}")
                    if not 0.0 <= rec["difficulty"] <= 1.0 or rec["n"] < 1 or rec["index"] < 0:
                        raise ValueError("need 0 <= difficulty <= 1, n >= 1, index >= 0")
                except ValueError as err:  # json.JSONDecodeError is a ValueError
                    raise ValueError(f"{path}:{line_no}: malformed round record: {err}") from None
                records.append(rec)
    return records


def _batches(groups: np.ndarray, batch_size: int, rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray]]:
    """[(query rows, rows of their group)] for one epoch, groups with >= 2 questions only."""
    out = []
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        if members.size < 2:
            continue
        perm = rng.permutation(members)
        out += [(perm[lo:lo + batch_size], members) for lo in range(0, perm.size, batch_size)]
    return [out[i] for i in rng.permutation(len(out))]


def _batch_loss(adapter: Adapter, emb: torch.Tensor, diff: torch.Tensor, queries, members, ref_size: int,
                rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ref = rng.choice(members, size=min(ref_size, members.size), replace=False)
    mask = torch.as_tensor(ref[None, :] != queries[:, None])
    pred = adapter(emb[queries], emb[ref], diff[ref], mask)
    return torch.nn.functional.binary_cross_entropy(pred, diff[queries]), pred


def evaluate_adapter(adapter: Adapter, emb, difficulty, groups=None, ref_size: int = 256, seed: int = 0):
    """Mean BCE and Pearson of adapter predictions vs measured difficulty, eval mode, fixed references.

    Args: as :func:`train_adapter`. Returns: (bce, pearson) floats.
    """
    e, d = torch.as_tensor(np.asarray(emb, np.float32)), torch.as_tensor(np.asarray(difficulty, np.float32))
    g = np.zeros(len(d), dtype=np.int64) if groups is None else np.asarray(groups)
    rng, was = np.random.default_rng(seed), adapter.training
    adapter.eval()
    preds, targets, total = [], [], 0.0
    with torch.no_grad():
        for queries, members in _batches(g, 256, rng):
            loss, pred = _batch_loss(adapter, e, d, queries, members, ref_size, rng)
            total += float(loss) * len(queries)
            preds.append(pred.numpy())
            targets.append(d[queries].numpy())
    adapter.train(was)
    n = sum(len(t) for t in targets)
    if n == 0:
        raise ValueError("evaluate_adapter: no group has 2 or more questions")
    return total / n, pearson(np.concatenate(preds), np.concatenate(targets))


def train_adapter(emb, difficulty, groups=None, epochs: int = 20, lr: float = 1e-3, batch_size: int = 256,
                  ref_size: int = 256, hidden: int = 896, dropout: float = 0.1, weight_decay: float = 0.01,
                  seed: int = 0) -> tuple[Adapter, dict]:
    """Trains an :class:`Adapter` with BCE on logged difficulties (paper: 20 epochs, AdamW lr 1e-3, batch 256).

    Args:
        emb: [M, H] embeddings of the M logged (question, step) records.
        difficulty: [M] measured difficulties in [0, 1].
        groups: [M] group ids (the records' ``step``); None = one group.
        epochs, lr, batch_size, weight_decay: optimiser settings. ref_size: references per batch
            (>= 2). hidden, dropout: adapter size. seed: torch + numpy seed.

    Returns:
        (trained adapter in eval mode, {"epoch_loss": [mean BCE per epoch]}).

    Raises:
        ValueError: shape mismatch, ref_size < 2, or no group with >= 2 questions.
    """
    e, d = np.asarray(emb, np.float32), np.asarray(difficulty, np.float32).reshape(-1)
    g = np.zeros(len(d), dtype=np.int64) if groups is None else np.asarray(groups).reshape(-1)
    if e.ndim != 2 or e.shape[0] != d.shape[0] or g.shape[0] != d.shape[0] or ref_size < 2:
        raise ValueError(f"train_adapter: emb [M, H], difficulty [M], groups [M], ref_size >= 2; got "
                         f"{e.shape}, {d.shape}, {g.shape}, {ref_size}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    adapter = Adapter(e.shape[1], hidden=hidden, dropout=dropout)
    adapter.set_input_stats(e)
    opt = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=weight_decay)
    te, td = torch.from_numpy(e), torch.from_numpy(d)
    history: dict = {"epoch_loss": []}
    adapter.train()
    for epoch in range(epochs):
        batches = _batches(g, batch_size, rng)
        if not batches:
            raise ValueError("train_adapter: no group has 2 or more questions")
        total, count, start = 0.0, 0, time.perf_counter()
        for queries, members in batches:
            loss, _ = _batch_loss(adapter, te, td, queries, members, ref_size, rng)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, count = total + float(loss.detach()) * len(queries), count + len(queries)
        history["epoch_loss"].append(total / count)
        logger.info("dots adapter: epoch %d/%d BCE %.4f (%.1fs)", epoch + 1, epochs, total / count,
                    time.perf_counter() - start)
    adapter.eval()
    return adapter, history


def save_adapter(adapter: Adapter, path, **extra) -> None:
    """Saves {"format", "state_dict", "in_dim", "hidden", "layers", "dropout", **extra} atomically."""
    blob = {"format": ADAPTER_FORMAT, "state_dict": adapter.state_dict(), "in_dim": adapter.in_dim,
            "hidden": adapter.hidden, "layers": adapter.layers, "dropout": adapter.dropout, **extra}
    _atomic_write(Path(path), lambda tmp: torch.save(blob, tmp))


def load_adapter(path, map_location: str = "cpu") -> Adapter:
    """Loads a :func:`save_adapter` file into an :class:`Adapter` (eval mode).

    Raises:
        FileNotFoundError: missing file. ValueError: not an adapter file, a missing key or
            mismatched weights (names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable adapter checkpoint: {err}") from None
    if not isinstance(blob, dict) or blob.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path}: not an adapter checkpoint (format {ADAPTER_FORMAT!r} expected)")
    for key in ("state_dict", "in_dim", "hidden", "layers", "dropout"):
        if key not in blob:
            raise ValueError(f"{path}: adapter checkpoint lacks key {key!r}")
    adapter = Adapter(int(blob["in_dim"]), int(blob["hidden"]), int(blob["layers"]), float(blob["dropout"]))
    try:
        adapter.load_state_dict(blob["state_dict"])
    except RuntimeError as err:
        raise ValueError(f"{path}: adapter weights do not match its sizes: {err}") from None
    return adapter.eval()


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
            _save_npy(Path(args.out), emb)
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
