"""Tiny local Qwen2-architecture causal LMs for development, tests and CPU smoke runs.

``python -m recipe.models --out DIR`` builds a randomly initialised Qwen2 model
(``transformers.Qwen2ForCausalLM``) and saves it as an ordinary Hugging Face model
directory (``config.json``, ``model.safetensors``, ``generation_config.json`` and the
tokenizer files) that ``AutoModelForCausalLM.from_pretrained`` /
``AutoTokenizer.from_pretrained`` load offline and that verl 0.9.1 trains like any
Qwen2.5 checkpoint. Nothing is downloaded.

Two tokenizers are offered:

* ``qwen2.5``: the real Qwen2.5 tokenizer (151,665 tokens), copied from the shared
  folder. Prompts, chat template and token ids are exactly those of Qwen2.5, but the
  embedding/output layer has ~151.7k rows: with a tiny model that layer dominates
  everything, and one CPU training step (logits, log-softmax and their gradients over
  151k classes for every response token) takes ~60-90 s.
* ``local`` (default): a small byte-level BPE tokenizer (~4k tokens) trained here with
  the Hugging Face ``tokenizers`` library on GSM8K text. It uses the same normalizer and
  pre-tokenizer as Qwen2 (NFC, Qwen2's split regex with single-digit numbers, byte
  level), the same 22 special tokens, the same ChatML chat template, eos
  ``<|im_end|>`` and pad ``<|endoftext|>``, so the prompt *format* is identical to
  Qwen2.5 while the output layer is ~37x smaller (a CPU step is ~30x cheaper). Byte
  level BPE covers every string, so ``\\boxed{..}``, ``####`` and digits always
  tokenise and round-trip exactly.

The build is deterministic for a given seed and training text, and atomic: the model
is written to a temporary directory next to ``--out`` and renamed into place, so a
crash never leaves a half-written directory that :func:`is_complete_model_dir`
accepts. Without ``--force`` an existing complete model directory is left alone, which
lets scripts call the command idempotently.

Example::

    python -m recipe.models --out runs/models/tiny-qwen2 --tokenizer local
"""

from __future__ import annotations

from recipe.io import publish_dir

import argparse
import itertools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_VOCAB_SIZE",
    "FORMAT_TEXTS",
    "LOCAL_TOKENIZER_REGEX",
    "build_local_tokenizer",
    "build_tiny_model",
    "count_parameters",
    "default_qwen_tokenizer_path",
    "default_train_text_path",
    "iter_texts",
    "is_complete_model_dir",
    "main",
    "shared_dir",
]

DEFAULT_VOCAB_SIZE = 4096

#: Qwen2's pre-tokenizer split regex (numbers are split into single digits).
LOCAL_TOKENIZER_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: Files whose presence makes a model directory complete.
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "tokenizer_config.json",
    "tokenizer.json",
)

#: Extra file recording how the model was built (ignored by transformers).
BUILD_INFO_FILE = "recipe_build_info.json"

#: Tokenizer files copied from the Qwen2.5 tokenizer directory when present.
_QWEN_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)

#: Prompt/answer-format strings added (``FORMAT_TEXT_REPEATS`` times) to the local
#: tokenizer's training text by :func:`build_tiny_model`, so that the instruction
#: sentences of common math prompts, ``\\boxed{}``, ``####`` and frequent LaTeX
#: commands become few tokens even though GSM8K never contains them.
FORMAT_TEXTS = (
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "You are a helpful assistant.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Let's think step by step and output the final answer within \\boxed{}.",
    'Let\'s think step by step and output the final answer after "####".',
    "The final answer is \\boxed{72}. So the answer is $\\boxed{\\frac{1}{2}}$.",
    "#### 72",
    "$\\frac{3}{4}$ $\\dfrac{1}{2}$ $\\sqrt{2}$ $x^{2}$ $a_{n}$ $\\pi$ $2 \\cdot 3$ $2 \\times 3$ "
    "$\\left( x \\right)$ $\\le$ $\\ge$ $\\ne$ $\\infty$ $\\text{cm}$ $^\\circ$",
)
FORMAT_TEXT_REPEATS = 200

# Used only when the shared Qwen2.5 tokenizer cannot be found (copied from it).
_FALLBACK_SPECIAL_TOKENS = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)


# --------------------------------------------------------------------------- paths


def shared_dir() -> Path:
    """Returns the shared data folder.

    Honours the ``RECIPE_SHARED_DIR`` environment variable; otherwise the folder
    ``shared`` next to the repository root (``<repo>/../shared``).

    Returns:
        Path of the shared folder (it may not exist).
    """
    env = os.environ.get("RECIPE_SHARED_DIR")
    if env:
        return Path(env).expanduser()
    import recipe

    return Path(recipe.__file__).resolve().parents[1].parent / "shared"


def default_train_text_path() -> Path:
    """Returns the default training text for the local tokenizer (GSM8K train)."""
    return shared_dir() / "data" / "gsm8k" / "train.jsonl"


def default_qwen_tokenizer_path() -> Path:
    """Returns the default path of the Qwen2.5 tokenizer in the shared folder."""
    return shared_dir() / "tokenizers" / "qwen2.5"


# --------------------------------------------------------------------------- text


def _record_texts(record: Any) -> Iterator[str]:
    """Yields the text of one data record.

    A ``text`` field wins; otherwise ``question`` + ``answer`` (GSM8K) or
    ``problem`` + ``solution`` (MATH); otherwise every string value, including the
    ``content`` of chat-message lists (verl parquet ``prompt`` columns).
    """
    if isinstance(record, str):
        yield record
        return
    if isinstance(record, dict):
        if isinstance(record.get("text"), str):
            yield record["text"]
            return
        for a, b in (("question", "answer"), ("problem", "solution")):
            if isinstance(record.get(a), str) and isinstance(record.get(b), str):
                yield record[a]
                yield record[b]
                return
        for value in record.values():
            yield from _record_texts(value)
        return
    if isinstance(record, (list, tuple)):
        for item in record:
            yield from _record_texts(item)
        return
    # numpy arrays (parquet list columns) and other iterables of records
    if hasattr(record, "tolist") and not isinstance(record, (int, float)):
        yield from _record_texts(record.tolist())


def iter_texts(path: str | os.PathLike[str], max_rows: int | None = None) -> Iterator[str]:
    """Yields training texts from a jsonl, json, parquet or plain-text file.

    Args:
        path: ``.jsonl`` (one JSON record per line), ``.json`` (a list of records or a
            dict of records), ``.parquet`` (one record per row) or any other file
            (read as text, one text per non-empty line).
        max_rows: Read at most this many records (lines for text files).

    Yields:
        Text strings (for GSM8K: each question and each answer).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training text file not found: {path}")
    suffix = path.suffix.lower()
    rows = 0
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if max_rows is not None and rows >= max_rows:
                    return
                line = line.strip()
                if not line:
                    continue
                rows += 1
                yield from _record_texts(json.loads(line))
    elif suffix == ".json":
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
        records = data.values() if isinstance(data, dict) else data
        for record in records:
            if max_rows is not None and rows >= max_rows:
                return
            rows += 1
            yield from _record_texts(record)
    elif suffix == ".parquet":
        import pandas as pd

        frame = pd.read_parquet(path)
        if max_rows is not None:
            frame = frame.head(max_rows)
        for record in frame.to_dict(orient="records"):
            yield from _record_texts(record)
    else:
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                if max_rows is not None and rows >= max_rows:
                    return
                if line.strip():
                    rows += 1
                    yield line.rstrip("\n")


# --------------------------------------------------------------------------- tokenizer


def _qwen_tokenizer_settings(qwen_path: Path | None) -> dict[str, Any]:
    """Reads the special tokens and chat template of the Qwen2.5 tokenizer.

    Args:
        qwen_path: Qwen2.5 tokenizer directory; ``None`` uses the shared default.

    Returns:
        Dict with ``special_tokens`` (list of ``(content, special)`` in id order),
        ``additional_special_tokens``, ``eos_token``, ``pad_token``,
        ``chat_template`` and ``model_max_length``.

    Raises:
        FileNotFoundError: If the directory or its chat template cannot be found.
    """
    qwen_path = Path(qwen_path) if qwen_path is not None else default_qwen_tokenizer_path()
    config_file = qwen_path / "tokenizer_config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"Qwen2.5 tokenizer_config.json not found in {qwen_path} "
            "(set RECIPE_SHARED_DIR or pass --qwen-tokenizer-path)"
        )
    config = json.loads(config_file.read_text(encoding="utf-8"))
    decoder = config.get("added_tokens_decoder") or {}
    special_tokens = [
        (entry["content"], bool(entry.get("special", True)))
        for _, entry in sorted(decoder.items(), key=lambda kv: int(kv[0]))
    ] or list(_FALLBACK_SPECIAL_TOKENS)

    chat_template = config.get("chat_template")
    if chat_template is None and (qwen_path / "chat_template.jinja").is_file():
        chat_template = (qwen_path / "chat_template.jinja").read_text(encoding="utf-8")
    if chat_template is None and (qwen_path / "chat_template.json").is_file():
        chat_template = json.loads((qwen_path / "chat_template.json").read_text(encoding="utf-8"))[
            "chat_template"
        ]
    if chat_template is None:
        raise FileNotFoundError(f"no chat template found in {qwen_path}")

    def _content(tok: Any) -> str | None:
        return tok.get("content") if isinstance(tok, dict) else tok

    return {
        "special_tokens": special_tokens,
        "additional_special_tokens": list(config.get("additional_special_tokens") or []),
        "eos_token": _content(config.get("eos_token")) or "<|im_end|>",
        "pad_token": _content(config.get("pad_token")) or "<|endoftext|>",
        "chat_template": chat_template,
        "model_max_length": int(config.get("model_max_length", 131072)),
    }


def build_local_tokenizer(
    texts: Iterable[str],
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    out_dir: str | os.PathLike[str] | None = None,
    qwen_tokenizer_path: str | os.PathLike[str] | None = None,
    min_frequency: int = 2,
):
    """Trains a small byte-level BPE tokenizer with Qwen2.5's format.

    The tokenizer mirrors Qwen2's pipeline (NFC normalizer, Qwen2's split regex which
    isolates single digits, byte-level pre-tokenizer and decoder) and carries the
    Qwen2.5 special tokens (appended after the BPE vocabulary, in Qwen's order), chat
    template, eos ``<|im_end|>`` and pad ``<|endoftext|>``. Training is deterministic
    for the same texts.

    Args:
        texts: Training texts.
        vocab_size: Target size including the special tokens (at least 256 byte
            tokens + the specials). May end up smaller when the text has too few
            distinct merges.
        out_dir: If given, ``save_pretrained`` the tokenizer there.
        qwen_tokenizer_path: Qwen2.5 tokenizer directory whose special tokens and chat
            template are copied; ``None`` uses the shared default.
        min_frequency: Minimum pair frequency for a BPE merge.

    Returns:
        The tokenizer as a ``transformers.PreTrainedTokenizerFast``. When saved (via
        ``out_dir``) its ``tokenizer_config.json`` names ``Qwen2Tokenizer``, so
        ``AutoTokenizer.from_pretrained`` reloads it as that class with the same ids.

    Raises:
        ValueError: If ``vocab_size`` is too small.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    settings = _qwen_tokenizer_settings(
        Path(qwen_tokenizer_path) if qwen_tokenizer_path is not None else None
    )
    specials = settings["special_tokens"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    bpe_size = vocab_size - len(specials)
    if bpe_size < len(alphabet):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: need >= {len(alphabet) + len(specials)}"
        )

    tok = Tokenizer(models.BPE(byte_fallback=False, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LOCAL_TOKENIZER_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size,
        min_frequency=min_frequency,
        special_tokens=[],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator((t for t in texts if t), trainer=trainer)
    # Same order and ``special`` flags as Qwen2.5 (``<tool_call>``, FIM tokens etc. are
    # added but not special there): appended after the BPE vocabulary.
    for content, special in specials:
        added = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False)
        if special:
            tok.add_special_tokens([added])
        else:
            tok.add_tokens([added])

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=settings["eos_token"],
        pad_token=settings["pad_token"],
        bos_token=None,
        unk_token=None,
        additional_special_tokens=settings["additional_special_tokens"],
        chat_template=settings["chat_template"],
        model_max_length=settings["model_max_length"],
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        add_prefix_space=False,
        errors="replace",
    )
    if out_dir is not None:
        _save_local_tokenizer(
            hf_tok,
            Path(out_dir),
            Path(qwen_tokenizer_path) if qwen_tokenizer_path is not None else None,
        )
    return hf_tok


def _save_local_tokenizer(tokenizer: Any, out_dir: Path, qwen_tokenizer_path: Path | None = None) -> None:
    """Saves a local tokenizer so it reloads as ``Qwen2Tokenizer``.

    ``tokenizer_config.json`` is the Qwen2.5 one with the local ids in
    ``added_tokens_decoder`` (``tokenizer_class`` ``Qwen2Tokenizer``,
    ``additional_special_tokens`` list, ``extra_special_tokens`` dict): transformers
    4.x then loads ``tokenizer.json`` as ``Qwen2TokenizerFast`` and transformers 5.x
    rebuilds the same pipeline from the saved vocabulary and merges.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    qwen_path = qwen_tokenizer_path if qwen_tokenizer_path is not None else default_qwen_tokenizer_path()
    qwen_config_file = Path(qwen_path) / "tokenizer_config.json"
    config_file = out_dir / "tokenizer_config.json"
    saved = json.loads(config_file.read_text(encoding="utf-8"))
    if qwen_config_file.is_file():
        config = json.loads(qwen_config_file.read_text(encoding="utf-8"))
    else:  # pragma: no cover - the settings above already required the file
        config = dict(saved)
    vocab = tokenizer.backend_tokenizer.get_added_tokens_decoder()
    config["added_tokens_decoder"] = {
        str(idx): {
            "content": tok.content,
            "lstrip": tok.lstrip,
            "normalized": tok.normalized,
            "rstrip": tok.rstrip,
            "single_word": tok.single_word,
            "special": tok.special,
        }
        for idx, tok in sorted(vocab.items())
    }
    config["tokenizer_class"] = "Qwen2Tokenizer"
    config["add_bos_token"] = False
    config["add_prefix_space"] = False
    config["bos_token"] = None
    config["unk_token"] = None
    config["eos_token"] = tokenizer.eos_token
    config["pad_token"] = tokenizer.pad_token
    config["model_max_length"] = saved.get("model_max_length", config.get("model_max_length"))
    if "chat_template" in config or not (out_dir / "chat_template.jinja").is_file():
        config["chat_template"] = tokenizer.chat_template
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _copy_qwen_tokenizer(src: Path, dst: Path) -> None:
    """Copies the Qwen2.5 tokenizer files unchanged (and writable) into ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in _QWEN_TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
    if not (dst / "tokenizer_config.json").is_file() or not (dst / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{src} lacks tokenizer.json / tokenizer_config.json")


# --------------------------------------------------------------------------- model


def is_complete_model_dir(path: str | os.PathLike[str]) -> bool:
    """Tells whether ``path`` holds a complete model directory.

    Complete means: config.json (valid JSON with a ``model_type``), a non-empty
    model.safetensors, generation_config.json, tokenizer_config.json and
    tokenizer.json all exist.

    Args:
        path: Directory to check.

    Returns:
        True if complete, False otherwise (including when it does not exist).
    """
    path = Path(path)
    if not path.is_dir():
        return False
    for name in REQUIRED_FILES:
        if not (path / name).is_file():
            return False
    if (path / "model.safetensors").stat().st_size == 0:
        return False
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and bool(config.get("model_type"))


def count_parameters(model: Any) -> int:
    """Counts unique parameters (tied embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def _print_existing_summary(out: Path) -> None:
    """Prints the parameter count and vocab size recorded for an existing model."""
    try:
        info = json.loads((out / BUILD_INFO_FILE).read_text(encoding="utf-8"))
        print(f"[recipe.models] parameters: {info['num_parameters']:,}")
        print(
            f"[recipe.models] vocab size: {info['tokenizer_size']:,} tokens "
            f"(model vocab_size {info['model_vocab_size']:,})"
        )
    except (OSError, ValueError, KeyError):
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
        print(f"[recipe.models] model vocab_size: {config.get('vocab_size')} (no {BUILD_INFO_FILE})")


def _round_up(n: int, multiple: int) -> int:
    return ((n + multiple - 1) // multiple) * multiple


def build_tiny_model(
    out_dir: str | os.PathLike[str],
    tokenizer: str = "local",
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    seed: int = 0,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    train_text: str | os.PathLike[str] | None = None,
    qwen_tokenizer_path: str | os.PathLike[str] | None = None,
    max_position_embeddings: int = 2048,
    force: bool = False,
    max_train_rows: int | None = None,
    verbose: bool = False,
) -> Path:
    """Builds (or reuses) a tiny random Qwen2 causal LM saved as an HF directory.

    Args:
        out_dir: Destination directory.
        tokenizer: ``"local"`` (small BPE trained on ``train_text``) or ``"qwen2.5"``
            (the real Qwen2.5 tokenizer).
        hidden_size: Model width.
        num_layers: Number of decoder layers.
        num_heads: Attention heads (must divide ``hidden_size``).
        num_kv_heads: Key/value heads (must divide ``num_heads``).
        intermediate_size: MLP width.
        seed: ``torch.manual_seed`` for the random weights.
        vocab_size: Local tokenizer size including specials (ignored for qwen2.5).
        train_text: Training text file for the local tokenizer (jsonl, json, parquet
            or txt); ``None`` uses GSM8K train from the shared folder.
        qwen_tokenizer_path: Qwen2.5 tokenizer directory; ``None`` uses the shared one.
        max_position_embeddings: Maximum sequence length of the model.
        force: Rebuild even if ``out_dir`` already holds a complete model.
        max_train_rows: Read at most this many records of ``train_text``.
        verbose: Print progress and a summary.

    Returns:
        Path of the model directory.

    Raises:
        ValueError: On an unknown tokenizer or inconsistent sizes.
        FileNotFoundError: If the training text or the Qwen tokenizer is missing.
    """
    out = Path(out_dir).expanduser().absolute()
    if tokenizer not in ("local", "qwen2.5"):
        raise ValueError(f"tokenizer must be 'local' or 'qwen2.5', got {tokenizer!r}")
    if hidden_size % num_heads != 0:
        raise ValueError(f"hidden_size={hidden_size} not divisible by num_heads={num_heads}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads={num_heads} not divisible by num_kv_heads={num_kv_heads}")
    if (hidden_size // num_heads) % 2 != 0:
        raise ValueError("head_dim (hidden_size // num_heads) must be even for RoPE")

    if not force and is_complete_model_dir(out):
        if verbose:
            print(f"[recipe.models] {out} already holds a complete model; left alone (use --force to rebuild)")
            _print_existing_summary(out)
        return out

    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    start = time.perf_counter()
    qwen_path = (
        Path(qwen_tokenizer_path).expanduser()
        if qwen_tokenizer_path is not None
        else default_qwen_tokenizer_path()
    )
    text_path = Path(train_text).expanduser() if train_text is not None else default_train_text_path()

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        # ---- tokenizer
        if tokenizer == "local":
            if verbose:
                print(f"[recipe.models] training a {vocab_size}-token BPE tokenizer on {text_path}")
            texts = itertools.chain(
                iter_texts(text_path, max_rows=max_train_rows),
                FORMAT_TEXTS * FORMAT_TEXT_REPEATS,
            )
            build_local_tokenizer(
                texts,
                vocab_size=vocab_size,
                out_dir=tmp,
                qwen_tokenizer_path=qwen_path,
            )
        else:
            _copy_qwen_tokenizer(qwen_path, tmp)
        tok = AutoTokenizer.from_pretrained(str(tmp))

        eos_id = tok.eos_token_id
        pad_id = tok.pad_token_id
        endoftext_id = tok.convert_tokens_to_ids("<|endoftext|>")
        if eos_id is None or pad_id is None:
            raise ValueError("tokenizer lacks eos/pad tokens")
        n_tokens = len(tok)
        model_vocab = _round_up(n_tokens, 64)

        # ---- model
        config = Qwen2Config(
            vocab_size=model_vocab,
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            max_position_embeddings=max_position_embeddings,
            max_window_layers=num_layers,
            tie_word_embeddings=True,
            use_sliding_window=False,
            rms_norm_eps=1e-6,
            bos_token_id=endoftext_id,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            dtype="float32",
        )
        config.architectures = ["Qwen2ForCausalLM"]
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config).to(torch.float32)
        model.eval()
        n_params = count_parameters(model)

        eos_ids = [eos_id] + ([endoftext_id] if endoftext_id not in (None, eos_id) else [])
        model.generation_config = GenerationConfig(
            bos_token_id=endoftext_id,
            eos_token_id=eos_ids,
            pad_token_id=pad_id,
        )
        model.save_pretrained(str(tmp), safe_serialization=True)

        # transformers 5 writes ``"dtype": "float32"``; an extra legacy ``torch_dtype`` key
        # would only trigger a deprecation warning on every load (and float32 is the
        # default dtype of older readers anyway), so none is added.

        info = {
            "tokenizer": tokenizer,
            "tokenizer_size": n_tokens,
            "model_vocab_size": model_vocab,
            "hidden_size": hidden_size,
            "num_layers": num_layers,
            "num_heads": num_heads,
            "num_kv_heads": num_kv_heads,
            "intermediate_size": intermediate_size,
            "max_position_embeddings": max_position_embeddings,
            "seed": seed,
            "num_parameters": n_params,
            "train_text": str(text_path) if tokenizer == "local" else None,
            "local_vocab_size": vocab_size if tokenizer == "local" else None,
            "max_train_rows": max_train_rows if tokenizer == "local" else None,
            "format_text_repeats": FORMAT_TEXT_REPEATS if tokenizer == "local" else None,
            "qwen_tokenizer_path": str(qwen_path),
        }
        (tmp / BUILD_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700
        for child in tmp.iterdir():
            if child.is_file():
                os.chmod(child, 0o644)
        if not force and is_complete_model_dir(out):
            # Another process finished the same build meanwhile: keep its result.
            shutil.rmtree(tmp, ignore_errors=True)
            if verbose:
                print(f"[recipe.models] {out} was completed by another process; left alone")
            return out
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    if verbose:
        elapsed = time.perf_counter() - start
        print(f"[recipe.models] saved {out} in {elapsed:.1f}s")
        print(f"[recipe.models] parameters: {n_params:,}")
        print(f"[recipe.models] vocab size: {n_tokens:,} tokens (model vocab_size {model_vocab:,})")
    return out


# --------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m recipe.models",
        description="Build a tiny random Qwen2 causal LM (HF directory) locally, no downloads.",
    )
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--tokenizer", choices=("qwen2.5", "local"), default="local")
    p.add_argument("--hidden-size", type=int, default=64)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--intermediate-size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="local tokenizer size incl. specials"
    )
    p.add_argument(
        "--train-text",
        default=None,
        help="jsonl/json/parquet/txt training text for the local tokenizer "
        "(default: <shared>/data/gsm8k/train.jsonl)",
    )
    p.add_argument("--max-train-rows", type=int, default=None, help="use at most N records of --train-text")
    p.add_argument(
        "--qwen-tokenizer-path", default=None, help="Qwen2.5 tokenizer dir (default: <shared>/tokenizers/qwen2.5)"
    )
    p.add_argument("--max-position-embeddings", type=int, default=2048)
    p.add_argument("--force", action="store_true", help="rebuild even if --out holds a complete model")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        Process exit status.
    """
    args = _parser().parse_args(argv)
    build_tiny_model(
        args.out,
        tokenizer=args.tokenizer,
        hidden_size=args.hidden_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        intermediate_size=args.intermediate_size,
        seed=args.seed,
        vocab_size=args.vocab_size,
        train_text=args.train_text,
        qwen_tokenizer_path=args.qwen_tokenizer_path,
        max_position_embeddings=args.max_position_embeddings,
        force=args.force,
        max_train_rows=args.max_train_rows,
        verbose=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
