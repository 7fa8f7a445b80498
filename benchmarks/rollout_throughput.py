"""Throughput of the CPU ``hf`` rollout against plain batched HF ``model.generate``.

Same 16 GSM8K test prompts (chat template applied, Qwen2.5 math instruction), same
number of new tokens (128, sampled at T=1.0 with ``ignore_eos`` so that every method
generates exactly the same number of tokens), fp32, on tiny random Qwen2 models built
with :func:`recipe.models.build_tiny_model`:

- ``local``: local ~4k-token tokenizer, hidden 64, 2 layers;
- ``qwen``: the real Qwen2.5 tokenizer (151,665 tokens), hidden 64, 2 layers.

Methods:

(a) ``plain generate``: one ``model.generate`` call over the 16 left-padded rows (the
    reference, no log-probs);
(b) ``HFGenerator``: :meth:`verl_patches.hf_rollout.HFGenerator.generate_batch` on the
    same batch, recording per-token log-probs;
(c) ``HFRolloutServer``: the server class in-process (no Ray), 16 concurrent
    ``generate()`` requests through asyncio (request batching included);
(d) ``one at a time``: 16 sequential single-prompt ``generate_batch`` calls with
    log-probs (what a server without batching does), for reference.

Each measurement is repeated ``--repeats`` times after one warm-up run (for (d): one
single-prompt request); the median is reported as a markdown table (tokens, seconds, tokens/s, ratio to (a)).

Usage::

    python benchmarks/rollout_throughput.py            # both models (~4 min on 2 idle cores)
    python benchmarks/rollout_throughput.py --quick    # local-tokenizer model only
    python benchmarks/rollout_throughput.py --qwen     # Qwen2.5-tokenizer model only
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def load_prompts(tokenizer, path: Path, n: int) -> list[list[int]]:
    """The first ``n`` GSM8K questions as chat-templated prompt token ids."""
    prompts = []
    with path.open(encoding="utf-8") as fh:
        for line in fh:
            if len(prompts) >= n:
                break
            if not line.strip():
                continue
            question = json.loads(line)["question"]
            messages = [{"role": "user", "content": f"{question}\n{INSTRUCTION}"}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(prompts) < n:
        raise ValueError(f"{path} has only {len(prompts)} questions, need {n}")
    return prompts


def timed(
    fn: Callable[[], int], repeats: int, seed: int, warmup: Callable[[], Any] | None = None
) -> tuple[int, float, list[float]]:
    """Runs ``warmup`` (default ``fn``) once, then ``fn`` (returns generated tokens)
    ``repeats`` times.

    Returns:
        (tokens of one run, median seconds, all timed seconds).
    """
    import torch

    torch.manual_seed(seed)
    (warmup or fn)()
    tokens, times = None, []
    for i in range(repeats):
        torch.manual_seed(seed + 1 + i)
        start = time.perf_counter()
        t = fn()
        times.append(time.perf_counter() - start)
        if tokens is not None and t != tokens:
            raise RuntimeError(f"token count changed between runs: {tokens} vs {t}")
        tokens = t
    return tokens, statistics.median(times), times


def bench_model(
    name: str, model_dir: Path, prompts_path: Path, args: argparse.Namespace
) -> list[dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import HFModelConfig, RolloutConfig
    from verl_patches.hf_rollout import HFGenerator, HFRolloutServer, normalize_sampling_params

    dtype = getattr(torch, args.dtype)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, attn_implementation="sdpa")
    model.eval()
    prompts = load_prompts(tok, prompts_path, args.batch)
    width = max(len(p) for p in prompts)
    n_new = args.new_tokens
    expected = len(prompts) * n_new
    pad = tok.pad_token_id
    ge = model.generation_config.eos_token_id
    eos_ids = list(ge) if isinstance(ge, (list, tuple)) else [ge]
    print(
        f"[{name}] vocab {model.config.vocab_size:,}, {len(prompts)} prompts of "
        f"{min(len(p) for p in prompts)}-{width} tokens, {n_new} new tokens each",
        flush=True,
    )

    sampling = {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": -1,
        "max_tokens": n_new,
        "ignore_eos": True,
        "logprobs": True,
    }
    prompt_length = max(512, width)
    response_length = n_new
    params = normalize_sampling_params(sampling, width, prompt_length, response_length)
    assert params["max_tokens"] == n_new

    # (a) plain batched generate: same left padding, same sampling distribution (no top-k)
    input_ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, ids in enumerate(prompts):
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        attention_mask[i, width - len(ids) :] = 1

    @torch.no_grad()
    def plain() -> int:
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=n_new,
            eos_token_id=None,
            pad_token_id=pad,
            use_cache=True,
        )
        return int(out[:, width:].numel())

    generator = HFGenerator(model, eos_ids, pad)

    def check(results) -> int:
        n = 0
        for ids, lps, reason in results:
            if len(ids) != n_new or len(lps) != n_new or reason != "length":
                raise RuntimeError(f"expected {n_new} tokens with log-probs, got {len(ids)}/{len(lps)} ({reason})")
            n += len(ids)
        return n

    def batched() -> int:
        return check(generator.generate_batch(prompts, params))

    def one_at_a_time() -> int:
        return sum(check(generator.generate_batch([p], params)) for p in prompts)

    rollout_config = omega_conf_to_dataclass(
        {
            "name": "hf",
            "prompt_length": prompt_length,
            "response_length": response_length,
            "max_num_seqs": max(len(prompts), 1),
            "tensor_model_parallel_size": 1,
            "engine_kwargs": {"hf": {"dtype": args.dtype, "num_threads": args.threads}},
        },
        dataclass_type=RolloutConfig,
    )
    server = HFRolloutServer(rollout_config, HFModelConfig(path=str(model_dir)))

    def served() -> int:
        async def main():
            return await asyncio.gather(
                *[server.generate(p, dict(sampling), f"bench-{i}") for i, p in enumerate(prompts)]
            )

        before = server.stats["batches"]
        outs = asyncio.run(main())
        n = 0
        for o in outs:
            if len(o.token_ids) != n_new or o.log_probs is None or len(o.log_probs) != n_new:
                raise RuntimeError(f"server returned {len(o.token_ids)} tokens")
            n += len(o.token_ids)
        served.batches = server.stats["batches"] - before
        return n

    served.batches = 0
    # (d) is warmed up with a single request: the model is already warm by then, and a
    # full warm-up run would cost as much as the whole of (a)-(c) on the Qwen model.
    methods = [
        ("(a) plain batched generate", plain, None),
        ("(b) HFGenerator.generate_batch + logprobs", batched, None),
        (f"(c) HFRolloutServer, {len(prompts)} concurrent requests", served, None),
        ("(d) one request at a time + logprobs", one_at_a_time, lambda: generator.generate_batch(prompts[:1], params)),
    ]
    if args.skip_sequential:
        methods = methods[:3]

    rows = []
    for label, fn, warmup in methods:
        torch.set_num_threads(args.threads)  # the server's constructor may have changed it
        tokens, median, times = timed(fn, args.repeats, args.seed, warmup)
        if tokens != expected:
            raise RuntimeError(f"{label}: {tokens} tokens, expected {expected}")
        extra = f" ({served.batches} batch/run)" if fn is served else ""
        runs = [round(t, 3) for t in times]
        print(f"[{name}] {label}: {tokens} tokens, median {median:.3f}s of {runs}{extra}", flush=True)
        rows.append({"model": name, "method": label, "tokens": tokens, "seconds": median, "times": times})
    base = rows[0]["tokens"] / rows[0]["seconds"]
    for r in rows:
        r["tok_s"] = r["tokens"] / r["seconds"]
        r["ratio"] = r["tok_s"] / base
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | method | tokens | seconds | tok/s | ratio vs (a) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['method']} | {r['tokens']} | {r['seconds']:.3f} "
            f"| {r['tok_s']:.0f} | {r['ratio']:.2f}x |"
        )
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="local-tokenizer model only")
    p.add_argument("--qwen", action="store_true", help="Qwen2.5-tokenizer model only (with --local: both)")
    p.add_argument("--local", action="store_true", help="local-tokenizer model only (with --qwen: both)")
    p.add_argument("--model-dir", default=None, help="build/reuse the tiny models here (default: a temp dir)")
    p.add_argument("--data", default=None, help="GSM8K test jsonl (default: <shared>/data/gsm8k/test.jsonl)")
    p.add_argument("--batch", type=int, default=16, help="number of prompts")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed runs after one warm-up (median reported)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads for every method (default 1: the tiny models gain nothing from "
        "more, and on a shared 2-core machine competing OpenMP threads make timings erratic)",
    )
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-sequential", action="store_true", help="skip method (d)")
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from recipe.models import build_tiny_model, shared_dir

    torch.set_num_threads(args.threads)
    data = Path(args.data) if args.data else shared_dir() / "data" / "gsm8k" / "test.jsonl"
    if args.qwen or args.local:
        which = (["local"] if args.local else []) + (["qwen"] if args.qwen else [])
    else:
        which = ["local"] if args.quick else ["local", "qwen"]

    tmp = None
    if args.model_dir:
        root = Path(args.model_dir)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="rollout-bench-")
        root = Path(tmp.name)
    rows: list[dict[str, Any]] = []
    try:
        for name in which:
            start = time.perf_counter()
            tokenizer = "local" if name == "local" else "qwen2.5"
            model_dir = build_tiny_model(
                root / f"tiny-{name}", tokenizer=tokenizer, hidden_size=64, num_layers=2, seed=0
            )
            print(f"[{name}] model ready in {time.perf_counter() - start:.1f}s: {model_dir}", flush=True)
            rows += bench_model(name, model_dir, data, args)
    finally:
        if tmp is not None:
            tmp.cleanup()

    import transformers

    print()
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {args.dtype}, "
        f"{args.threads} thread(s), {os.cpu_count()} cores ({platform.processor() or platform.machine()}); "
        f"{args.batch} GSM8K prompts x {args.new_tokens} new tokens, T=1.0, ignore_eos; "
        f"median of {args.repeats} after 1 warm-up"
    )
    print()
    print(markdown(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
