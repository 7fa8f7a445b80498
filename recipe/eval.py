"""Evaluation: avg@k and pass@k on math benchmarks (``python -m recipe.eval``).

Command line (Hydra, config ``conf/eval.yaml``)::

    python -m recipe.eval model_path=DIR [OVERRIDES]        # an HF model directory
    python -m recipe.eval checkpoint=DIR [OVERRIDES]        # a verl global_step_N (or its actor) folder
    python -m recipe.eval eval=minimalist checkpoint=DIR    # the Minimalist paper's avg@16 (GPU)
    python -m recipe.eval eval=dots checkpoint=DIR          # the DOTS paper's settings (GPU)

For each benchmark (``data_source`` names of :mod:`recipe.data`: ``math500``,
``minerva_math``, ``olympiadbench``, ``aime24``, ``amc23``, ``gsm8k``) it samples ``k``
responses per problem from the prepared test file ``${paths.data}/<benchmark>/test.parquet``
(converted on demand by :func:`recipe.data.convert_split`, with the training prompt
template), grades each with the training reward (:func:`recipe.reward.math_reward.compute_score`,
i.e. math-verify in the sandboxed grader pool; ``grading=strict`` as training, or
``grading=harness`` for the Qwen2.5-Math harness's conventions; OlympiadBench's ``error``
tolerance honoured) and reports, per benchmark and averaged
over benchmarks (unweighted, as the papers do):

* ``<bench>/avg@<k>``: mean accuracy over the k samples, averaged over problems
  (Minimalist paper, arXiv 2504.11343: avg@16 at T = 1.0);
* ``<bench>/pass@<j>`` for each ``j`` of ``pass_k``: the unbiased pass@j estimator of
  Chen et al. 2021 ("Evaluating Large Language Models Trained on Code", arXiv 2107.03374,
  Eq. 1) from the k samples, averaged over problems. pass@1 equals avg@k;
* ``average/avg@<k>``, ``average/pass@<j>``: the unweighted means over the benchmarks.

Training-time validation reports the same quantities under ``val/<source>/avg@<n>``,
``val/<source>/pass@<j>`` and ``val/average/...`` (:func:`validation_metrics`, n = the
validation samples per prompt): an evaluation key ``X`` is the validation key ``val/X``.

Generation goes through the same backends as training rollouts: ``hf``
(:class:`verl_patches.hf_rollout.HFGenerator`, batched HF ``generate`` on the CPU,
in-process, no Ray) or ``vllm`` (``vllm.LLM``, GPU; imported only when used);
``backend=auto`` picks vllm when CUDA and vllm are available. Prompts are the prepared
chat messages rendered with the model's chat template (``add_generation_prompt``), as
verl's agent loop does, with the step-by-step instruction said once (:func:`render_prompt`);
a response ends at an EOS id or the chat template's end-of-turn token (``<|im_end|>``,
:func:`verl_patches.hf_rollout.turn_stop_token_ids`); responses are decoded without special
tokens, as verl's reward loop does.

Written to ``out_dir`` (default ``${paths.artifacts}/eval/<model name>``):

* ``samples.jsonl``: one JSON line per sample: ``benchmark``, ``index`` (the problem's row
  in the source file, ``extra_info.index``), ``problem_id`` (``unique_id`` / ``id`` when the
  benchmark has one, else the index as a string), ``sample`` (0..k-1), ``prompt`` (rendered
  text), ``response``, ``pred`` (extracted answer), ``gold``, ``acc`` (0.0 / 1.0),
  ``has_answer``, ``grader_timeout``, ``grader_error``, ``grader_rejected``,
  ``finish_reason`` (``stop`` / ``length``), ``prompt_tokens``, ``response_tokens``;
* ``results.json``: the metrics, per-benchmark counts, the settings, timing;
* ``results.md``: the per-benchmark table with the average row (also printed);
* ``eval_settings.json``: what the samples depend on (model, k, sampling, template).

Resumable: with ``resume=true`` (default) problems whose k samples are already in
``samples.jsonl`` are not generated again (an incomplete problem is redone; the seed
restarts, so the new samples differ from those an uninterrupted run would draw); a file
written with other settings (``eval_settings.json`` differs) is an error naming the keys.

Errors (exit status 2, message on stderr): a missing ``model_path`` / ``checkpoint`` path,
a checkpoint folder without FSDP model shards, a missing benchmark source or data file, an
unknown benchmark name (the valid ones are listed), ``pass_k`` values above ``k``, a
benchmark file prepared with another prompt template.

Python API: :func:`pass_at_k`, :func:`avg_at_k`, :func:`benchmark_metrics`,
:func:`validation_metrics`, :func:`check_config`, :func:`resolve_model`,
:func:`merge_checkpoint`, :func:`load_benchmark`, :func:`evaluate`, :func:`markdown_table`.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import json
import logging
import os
import sys
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from omegaconf import DictConfig, OmegaConf

from recipe import data as data_mod
from recipe.algos.metrics import AVERAGE, avg_at_k, benchmark_metrics, check_pass_ks, pass_at_k, validation_metrics
from recipe.config import ConfigError, setup_paths
from recipe.io import atomic_dir, atomic_write_jsonl

logger = logging.getLogger("recipe.eval")

__all__ = [
    "AVERAGE",
    "BENCHMARKS",
    "EVAL_SPLIT",
    "HFBackend",
    "MERGED_DIR",
    "Problem",
    "VLLMBackend",
    "avg_at_k",
    "benchmark_file",
    "benchmark_metrics",
    "check_config",
    "check_pass_ks",
    "checkpoint_actor_dir",
    "evaluate",
    "load_benchmark",
    "main",
    "markdown_table",
    "merge_checkpoint",
    "pass_at_k",
    "pick_backend",
    "render_prompt",
    "resolve_model",
    "validation_metrics",
]

#: The split every benchmark is evaluated on.
EVAL_SPLIT = "test"

#: Benchmark names: the datasets of :mod:`recipe.data` that have a test split.
BENCHMARKS: tuple[str, ...] = tuple(n for n, s in data_mod.DATASETS.items() if EVAL_SPLIT in s.splits)

#: Folder (inside a checkpoint's ``actor`` folder) holding its merged HF model.
MERGED_DIR = "huggingface_merged"

SAMPLES_FILE = "samples.jsonl"
RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"
SETTINGS_FILE = "eval_settings.json"

#: What ends a response (recorded in ``eval_settings.json``): the EOS ids and the chat
#: template's end-of-turn token (:func:`verl_patches.hf_rollout.turn_stop_token_ids`).
STOPS = "eos+turn_end"

#: Keys of the grader's reward dict copied into each sample line.
GRADE_KEYS = ("acc", "has_answer", "grader_timeout", "grader_error", "grader_rejected")

_SHARD_GLOB = "model_world_size_*_rank_*.pt"


# ----------------------------------------------------------------------------- metrics


# ------------------------------------------------------------------------------ config


def check_config(cfg: DictConfig) -> None:
    """Start-up checks of an evaluation config, each error naming the key at fault.

    Raises:
        ConfigError: Unknown benchmark (the valid names are listed), no model or both,
            pass_k above k, a value out of range, an unknown backend or template.
    """
    benches = list(cfg.benchmarks or [])
    if not benches:
        raise ConfigError(f"benchmarks is empty; choose from {', '.join(BENCHMARKS)}")
    for b in benches:
        if b not in BENCHMARKS:
            raise ConfigError(f"benchmarks: unknown benchmark {b!r}; valid names: {', '.join(BENCHMARKS)}")
    if bool(cfg.model_path) == bool(cfg.checkpoint):
        raise ConfigError(
            "set exactly one of model_path=<HF model dir> or checkpoint=<verl global_step_N dir> "
            f"(got model_path={cfg.model_path}, checkpoint={cfg.checkpoint})"
        )
    k = cfg.k
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"k must be an integer >= 1, got {k!r}")
    check_pass_ks(cfg.pass_k or [], k)
    if not cfg.pass_k:
        raise ConfigError("pass_k is empty; use e.g. pass_k=[1]")
    if float(cfg.temperature) < 0:
        raise ConfigError(f"temperature must be >= 0, got {cfg.temperature}")
    if not 0 < float(cfg.top_p) <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {cfg.top_p}")
    for key in ("max_tokens", "batch_size"):
        if int(cfg[key]) < 1:
            raise ConfigError(f"{key} must be >= 1, got {cfg[key]}")
    if cfg.hf_num_threads is not None and int(cfg.hf_num_threads) < 1:
        raise ConfigError(f"hf_num_threads must be >= 1 or null (torch's default), got {cfg.hf_num_threads}")
    if cfg.max_problems is not None and int(cfg.max_problems) < 1:
        raise ConfigError(f"max_problems must be >= 1 or null (all), got {cfg.max_problems}")
    from recipe.reward.grader import GRADING_MODES

    if cfg.get("grading") not in GRADING_MODES:
        raise ConfigError(f"grading must be one of {', '.join(GRADING_MODES)}, got {cfg.get('grading')!r}")
    if cfg.backend not in ("auto", "hf", "vllm"):
        raise ConfigError(f"backend must be auto, hf or vllm, got {cfg.backend!r}")
    try:
        data_mod.resolve_template(cfg.template)
    except ValueError as e:
        raise ConfigError(f"template: {e}") from None


def pick_backend(name: str) -> str:
    """``auto`` -> ``vllm`` when CUDA and vllm are available, else ``hf``.

    Raises:
        ConfigError: ``vllm`` asked for without CUDA or without the vllm package.
    """
    import torch

    has_vllm = importlib.util.find_spec("vllm") is not None
    if name == "auto":
        return "vllm" if (torch.cuda.is_available() and has_vllm) else "hf"
    if name == "vllm" and not (torch.cuda.is_available() and has_vllm):
        raise ConfigError(
            "backend=vllm needs a CUDA GPU and the vllm package (pip install -e '.[gpu]'); "
            f"cuda available: {torch.cuda.is_available()}, vllm installed: {has_vllm}. Use backend=hf on CPU"
        )
    return name


# ------------------------------------------------------------------------------- model


def _is_hf_model_dir(path: Path) -> bool:
    if not (path / "config.json").is_file():
        return False
    weights = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
    return any((path / w).is_file() and (path / w).stat().st_size > 0 for w in weights)


def checkpoint_actor_dir(checkpoint: str | os.PathLike) -> Path:
    """Finds the folder holding a verl checkpoint's FSDP model shards.

    Args:
        checkpoint: A ``global_step_N`` folder (shards in its ``actor`` subfolder) or the
            ``actor`` folder itself.

    Returns:
        The absolute folder that holds ``model_world_size_<W>_rank_<r>.pt``.

    Raises:
        FileNotFoundError: The path does not exist, is not a folder, or holds no shards
            (the message names the path).
    """
    path = Path(os.path.expanduser(str(checkpoint))).resolve()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint: {path} does not exist")
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint: {path} is not a folder (expected a verl global_step_N folder)")
    for candidate in (path / "actor", path):
        if candidate.is_dir() and any(candidate.glob(_SHARD_GLOB)):
            return candidate
    raise FileNotFoundError(
        f"checkpoint: no FSDP model shards ({_SHARD_GLOB}) in {path} or {path / 'actor'}; "
        "expected a verl global_step_N folder or its actor folder"
    )


def merge_checkpoint(checkpoint: str | os.PathLike) -> Path:
    """Converts a verl FSDP checkpoint to an HF model directory (cached).

    Uses verl's own model merger (``verl.model_merger.fsdp_model_merger.FSDPModelMerger``,
    what ``python -m verl.model_merger merge --backend fsdp`` runs). The result goes to
    ``<actor>/huggingface_merged`` (written to a temporary folder, then renamed) and is
    reused by later calls. verl's merger stores the weights in bfloat16.

    Args:
        checkpoint: A ``global_step_N`` folder or its ``actor`` folder.

    Returns:
        The merged HF model directory.

    Raises:
        FileNotFoundError: No checkpoint, no shards, no ``huggingface`` config folder,
            no ``fsdp_config.json`` or a missing rank's shard (names the path).
    """
    actor = checkpoint_actor_dir(checkpoint)
    target = actor / MERGED_DIR
    if _is_hf_model_dir(target):
        return target
    hf_config = actor / "huggingface"
    if not (hf_config / "config.json").is_file():
        raise FileNotFoundError(
            f"checkpoint: {hf_config}/config.json not found (verl saves the model config and tokenizer there)"
        )
    fsdp_config = actor / "fsdp_config.json"
    if not fsdp_config.is_file():
        raise FileNotFoundError(f"checkpoint: {fsdp_config} not found (an FSDP checkpoint has one)")
    try:
        world_size = int(json.loads(fsdp_config.read_text())["world_size"])
    except (ValueError, KeyError, TypeError) as e:
        raise FileNotFoundError(f"checkpoint: {fsdp_config} has no valid world_size: {e}") from None
    for rank in range(world_size):
        shard = actor / f"model_world_size_{world_size}_rank_{rank}.pt"
        if not shard.is_file():
            raise FileNotFoundError(f"checkpoint: shard {shard} is missing (world_size {world_size})")

    from verl.model_merger.base_model_merger import ModelMergerConfig
    from verl.model_merger.fsdp_model_merger import FSDPModelMerger

    print(f"[eval] merging FSDP checkpoint {actor} -> {target}", flush=True)
    with atomic_dir(target) as tmp:  # an incomplete leftover at target is replaced
        merger = FSDPModelMerger(
            ModelMergerConfig(
                operation="merge",
                backend="fsdp",
                local_dir=str(actor),
                target_dir=str(tmp),
                hf_model_config_path=str(hf_config),
            )
        )
        merger.merge_and_save()
        merger.cleanup()
    return target


def resolve_model(cfg: DictConfig) -> Path:
    """The HF model directory to evaluate: ``model_path``, or ``checkpoint`` merged.

    Raises:
        FileNotFoundError: ``model_path`` missing or not an HF model directory, or a
            checkpoint error (see :func:`merge_checkpoint`); the message names the path.
    """
    if cfg.checkpoint:
        return merge_checkpoint(cfg.checkpoint)
    path = Path(os.path.expanduser(str(cfg.model_path))).resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"model_path: {path} does not exist or is not a folder")
    if not _is_hf_model_dir(path):
        raise FileNotFoundError(
            f"model_path: {path} is not an HF model directory (no config.json with weights); "
            "for a verl checkpoint use checkpoint=<global_step_N folder>"
        )
    return path


def _model_name(cfg: DictConfig) -> str:
    """Default out_dir name: ``<run>_<global_step_N>`` for checkpoints, the folder name otherwise."""
    if cfg.checkpoint:
        p = Path(os.path.expanduser(str(cfg.checkpoint))).resolve()
        if p.name == "actor":
            p = p.parent
        return f"{p.parent.name}_{p.name}"
    return Path(os.path.expanduser(str(cfg.model_path))).resolve().name


# -------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Problem:
    """One benchmark problem.

    Attributes:
        benchmark: ``data_source`` name.
        index: Row of the source file (``extra_info.index``).
        problem_id: ``unique_id`` / ``id`` of the benchmark, else ``str(index)``.
        messages: Chat messages (the prepared prompt).
        gold: Ground-truth answer string.
        tolerance: The gold's absolute numeric tolerance (OlympiadBench's ``error``,
            ``extra_info.error``), or None.
    """

    benchmark: str
    index: int
    problem_id: str
    messages: list
    gold: str
    tolerance: float | None = None


def benchmark_file(data_dir: str | os.PathLike, benchmark: str) -> Path:
    """``<data_dir>/<benchmark>/test.parquet``."""
    return Path(data_dir) / benchmark / f"{EVAL_SPLIT}.parquet"


def _check_template(path: Path, rows: list[dict], template: str) -> None:
    tmpl = data_mod.resolve_template(template)
    for i, row in enumerate(rows):
        question = (row.get("extra_info") or {}).get("question")
        if not isinstance(question, str):
            continue  # a file from elsewhere (recipe.data --input): nothing to compare with
        expected = tmpl.messages(question.strip())
        got = [{"role": m["role"], "content": m["content"]} for m in row["prompt"]]
        if got != expected:
            raise ConfigError(
                f"{path}: row {i} was prepared with another prompt template than template={template!r} "
                f"(its prompt: {got[-1]['content'][:120]!r}); delete the file to prepare it again, "
                "or set template= to the one it was prepared with"
            )


def load_benchmark(
    benchmark: str,
    data_dir: str | os.PathLike,
    template: str = "boxed",
    max_problems: int | None = None,
    prepare: bool = True,
) -> list[Problem]:
    """Loads (preparing it first when missing) a benchmark's test problems.

    Args:
        benchmark: A name in :data:`BENCHMARKS`.
        data_dir: ``paths.data``: the file is ``<data_dir>/<benchmark>/test.parquet``.
        template: Prompt template of :mod:`recipe.data` (the file must have been
            prepared with it).
        max_problems: Keep the first N problems (None: all).
        prepare: Convert a missing file with :func:`recipe.data.convert_split` from the
            shared source data.

    Returns:
        The problems, in file order.

    Raises:
        ConfigError: Unknown benchmark, or a file prepared with another template.
        FileNotFoundError: The benchmark file (``prepare=False``) or its source file is
            missing (names it).
        recipe.data.DataError: The file is not a valid verl parquet (names it).
    """
    if benchmark not in BENCHMARKS:
        raise ConfigError(f"benchmarks: unknown benchmark {benchmark!r}; valid names: {', '.join(BENCHMARKS)}")
    path = benchmark_file(data_dir, benchmark).resolve()
    if not path.exists():
        if not prepare:
            raise FileNotFoundError(
                f"benchmark {benchmark}: {path} does not exist (prepare_data=false); run "
                f"`python -m recipe.data --datasets {benchmark} --out-dir {Path(data_dir).resolve()}`"
            )
        print(f"[eval] preparing benchmark '{benchmark}' -> {path}", flush=True)
        try:
            data_mod.convert_split(benchmark, EVAL_SPLIT, Path(data_dir).resolve(), template=template)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"benchmark {benchmark}: {e}") from None
    data_mod.validate_verl_parquet(path)
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    _check_template(path, rows, template)
    if max_problems is not None:
        rows = rows[: int(max_problems)]
    from recipe.reward.golds import normalise_gold
    from recipe.reward.math_reward import gold_tolerance

    problems = []
    for i, row in enumerate(rows):
        extra = row.get("extra_info") or {}
        index = extra.get("index")
        index = int(index) if index is not None else i
        pid = extra.get("unique_id") or extra.get("id")
        problems.append(
            Problem(
                benchmark=benchmark,
                index=index,
                problem_id=str(pid) if pid is not None else str(index),
                messages=[{"role": m["role"], "content": m["content"]} for m in row["prompt"]],
                gold=normalise_gold(str(row["reward_model"]["ground_truth"]), benchmark),
                tolerance=gold_tolerance(extra),
            )
        )
    return problems


# ---------------------------------------------------------------------------- backends


class HFBackend:
    """k samples per prompt with HF ``generate`` on the CPU (the ``hf`` rollout's generator).

    A response ends at the first stop token of
    :func:`verl_patches.hf_rollout.turn_stop_token_ids` (the EOS ids of the generation
    config and tokenizer, and ``<|im_end|>`` when the chat template ends turns with it).

    Args:
        model_dir: HF model directory.
        tokenizer: Its tokenizer.
        temperature, top_p, max_tokens: Sampling parameters (temperature 0 = greedy).
        batch_size: Rows (prompt copies) per ``generate`` call.
        seed: ``torch.manual_seed`` before the first call.
        dtype: Weights dtype name (``float32`` / ``bfloat16``).
        num_threads: ``torch.set_num_threads`` (None: torch's default, all cores).
    """

    name = "hf"

    def __init__(self, model_dir, tokenizer, temperature, top_p, max_tokens, batch_size, seed, dtype="float32",
                 num_threads=None):
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        from verl_patches.hf_rollout import HFGenerator, turn_stop_token_ids

        if num_threads:
            torch.set_num_threads(int(num_threads))
        torch.manual_seed(int(seed))
        self.model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), dtype=getattr(torch, str(dtype)), attn_implementation="sdpa"
        )
        self.model.eval()
        ge = None
        try:
            ge = GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
        except OSError:
            pass
        eos = turn_stop_token_ids(tokenizer, ge)
        self.stop_token_ids = eos
        if not eos:
            raise ValueError(f"model at {model_dir} defines no eos token id (tokenizer or generation_config.json)")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
        self.generator = HFGenerator(self.model, eos, pad)
        self.max_model_len = int(getattr(self.model.config, "max_position_embeddings", 0) or 0) or None
        self.sampling = {"temperature": float(temperature), "top_p": float(top_p), "top_k": -1,
                         "max_tokens": int(max_tokens)}
        self.batch_size = int(batch_size)

    def generate(self, prompts: list[list[int]], k: int) -> list[list[tuple[list[int], str]]]:
        """``P`` prompts -> ``[P][k]`` ``(response token ids, finish_reason)``."""
        from verl_patches.hf_rollout import normalize_sampling_params

        rows = [(p, s) for p in range(len(prompts)) for s in range(k)]
        out: list[list[Any]] = [[None] * k for _ in prompts]
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            ids = [prompts[p] for p, _ in chunk]
            longest = max(len(x) for x in ids)
            params = normalize_sampling_params(
                self.sampling, longest, prompt_length=longest, response_length=self.sampling["max_tokens"],
                max_model_len=self.max_model_len,
            )
            for (p, s), (resp, _logprobs, reason) in zip(chunk, self.generator.generate_batch(ids, params)):
                out[p][s] = (resp, reason)
        return out


class VLLMBackend:  # pragma: no cover - needs a GPU; tests/gpu/test_eval_vllm.py
    """k samples per prompt with ``vllm.LLM`` (GPU). Imported only when used.

    ``SamplingParams.stop_token_ids`` are :func:`verl_patches.hf_rollout.turn_stop_token_ids`
    (vLLM adds the model's own EOS ids itself), as the Qwen2.5-Math evaluation does.

    Args:
        model_dir: HF model directory.
        tokenizer: Its tokenizer (for the stop ids).
        temperature, top_p, max_tokens: Sampling parameters.
        seed: vLLM engine seed.
        gpu_memory_utilization, max_model_len, tensor_parallel_size: vLLM engine options.
    """

    name = "vllm"

    def __init__(self, model_dir, tokenizer, temperature, top_p, max_tokens, seed, gpu_memory_utilization=0.85,
                 max_model_len=None, tensor_parallel_size=1):
        from transformers import GenerationConfig
        from vllm import LLM, SamplingParams

        from verl_patches.hf_rollout import turn_stop_token_ids

        ge = None
        try:
            ge = GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
        except OSError:
            pass
        self.stop_token_ids = turn_stop_token_ids(tokenizer, ge)

        self.llm = LLM(
            model=str(model_dir),
            dtype="bfloat16",
            seed=int(seed),
            gpu_memory_utilization=float(gpu_memory_utilization),
            max_model_len=max_model_len,
            tensor_parallel_size=int(tensor_parallel_size),
        )
        self._params = lambda k: SamplingParams(
            n=k, temperature=float(temperature), top_p=float(top_p), max_tokens=int(max_tokens),
            stop_token_ids=list(self.stop_token_ids),
        )

    def generate(self, prompts: list[list[int]], k: int) -> list[list[tuple[list[int], str]]]:
        """``P`` prompts -> ``[P][k]`` ``(response token ids, finish_reason)``."""
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], self._params(k), use_tqdm=False)
        return [[(list(o.token_ids), str(o.finish_reason)) for o in req.outputs] for req in outputs]


# ------------------------------------------------------------------------------ output


def _settings(cfg: DictConfig, model_dir: Path) -> dict[str, Any]:
    """What the samples depend on (a resumed run must match it)."""
    return {
        "model": str(model_dir),
        "k": int(cfg.k),
        "temperature": float(cfg.temperature),
        "top_p": float(cfg.top_p),
        "max_tokens": int(cfg.max_tokens),
        "template": str(cfg.template),
        "grading": str(cfg.grading),
        "stops": STOPS,
    }


def _read_samples(path: Path, k: int) -> tuple[list[dict], set[tuple[str, int]]]:
    """Complete problems of an existing samples.jsonl: (their lines, their keys)."""
    if not path.exists():
        return [], set()
    by_problem: dict[tuple[str, int], dict[int, dict]] = defaultdict(dict)
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            by_problem[(rec["benchmark"], int(rec["index"]))][int(rec["sample"])] = rec
        except (ValueError, KeyError, TypeError):
            logger.warning("%s: line %d is not a sample record; ignored (its problem is redone)", path, lineno)
    done = {key for key, samples in by_problem.items() if set(samples) == set(range(k))}
    lines = [by_problem[key][s] for key in sorted(done) for s in range(k)]
    return lines, done


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100.0 * v:.1f}"


def markdown_table(
    metrics: Mapping[str, float], counts: Mapping[str, Mapping[str, float]], k: int, pass_ks: Sequence[int]
) -> str:
    """Per-benchmark table with an average row, values in percent (1 decimal).

    Args:
        metrics: Output of :func:`benchmark_metrics`.
        counts: ``{bench: {"problems", "answered", "truncated", "tokens"}}`` (answered and
            truncated as shares, tokens as mean response tokens).
        k: Samples per problem.
        pass_ks: Budgets j shown as pass@j columns.

    Returns:
        The markdown table (no trailing newline).
    """
    cols = [f"avg@{k}"] + [f"pass@{j}" for j in pass_ks]
    head = ["benchmark", "problems", "k", *(f"{c} (%)" for c in cols), "answered (%)", "truncated (%)", "mean tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join([":---"] + ["---:"] * (len(head) - 1)) + "|"]
    for bench, c in counts.items():
        cells = [bench, str(int(c["problems"])), str(k)] + [_pct(metrics.get(f"{bench}/{col}")) for col in cols]
        cells += [_pct(c["answered"]), _pct(c["truncated"]), f"{c['tokens']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    if counts:
        total = sum(int(c["problems"]) for c in counts.values())
        avg = [np.mean([c[x] for c in counts.values()]) for x in ("answered", "truncated", "tokens")]
        cells = [f"**{AVERAGE}**", str(total), str(k)] + [_pct(metrics.get(f"{AVERAGE}/{col}")) for col in cols]
        cells += [_pct(avg[0]), _pct(avg[1]), f"{avg[2]:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -------------------------------------------------------------------------------- main


def render_prompt(tokenizer, messages: list[dict], instruction: str | None = None) -> str:
    """The prompt text: ``messages`` through the chat template (``add_generation_prompt``), said once.

    Qwen2.5-Math's chat template adds "Please reason step by step, and put your final
    answer within \\boxed{}." as the system message when there is none; the ``boxed``
    template puts the same sentence in the user turn, so it would appear twice. When the
    rendered text holds ``instruction`` more than once, it is removed from the user message
    (the chat template's system message keeps it once) and the messages are rendered again.

    Args:
        tokenizer: An HF tokenizer with a chat template.
        messages: Chat messages (``role``, ``content``).
        instruction: The sentence to keep once (default: :mod:`recipe.data`'s boxed instruction).

    Returns:
        The rendered prompt text.
    """
    instruction = instruction or data_mod.TEMPLATES["boxed"].user.replace("{problem}\n", "")
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if text.count(instruction) <= 1:
        return text
    fixed = []
    for m in messages:
        if m["role"] == "user" and instruction in m["content"]:
            m = {**m, "content": m["content"].replace("\n" + instruction, "").replace(instruction, "").strip()}
        fixed.append(m)
    return tokenizer.apply_chat_template(fixed, add_generation_prompt=True, tokenize=False)


def _grade(pool, problem: Problem, responses: list[str], grader_kwargs: dict, grading: str = "strict") -> list[dict]:
    """Grades one problem's responses with the training reward (``grading_mode=grading``) in parallel threads."""
    from recipe.reward.math_reward import compute_score

    extra = {"error": problem.tolerance} if problem.tolerance is not None else None
    futures = [
        pool.submit(compute_score, data_source=problem.benchmark, solution_str=r, ground_truth=problem.gold,
                    extra_info=extra, grading_mode=grading, **grader_kwargs)
        for r in responses
    ]
    return [f.result() for f in futures]


def _open_out_dir(out_dir: Path, settings: dict[str, Any], k: int, resume: bool) -> set[tuple[str, int]]:
    """Prepares ``out_dir`` for appending samples; returns the problems already complete.

    Raises:
        ConfigError: ``resume`` and the existing samples were drawn with other settings.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    samples_path, settings_path = out_dir / SAMPLES_FILE, out_dir / SETTINGS_FILE
    if resume and settings_path.exists() and samples_path.exists():
        old = json.loads(settings_path.read_text())
        diff = sorted(key for key in set(old) | set(settings) if old.get(key) != settings.get(key))
        if diff:
            changes = ", ".join(f"{d}: {old.get(d)!r} -> {settings.get(d)!r}" for d in diff)
            raise ConfigError(
                f"out_dir {out_dir} holds samples of other settings ({changes}); "
                "set out_dir= to another folder or resume=false to start over"
            )
    kept, done = _read_samples(samples_path, k) if resume else ([], set())
    atomic_write_jsonl(samples_path, kept)  # drops incomplete problems and unreadable lines
    settings_path.write_text(json.dumps(settings, indent=2) + "\n")
    return done


def _make_backend(cfg: DictConfig, name: str, model_dir: Path, tokenizer):
    if name == "vllm":  # pragma: no cover - GPU only
        return VLLMBackend(model_dir, tokenizer, cfg.temperature, cfg.top_p, cfg.max_tokens, cfg.seed,
                           **OmegaConf.to_container(cfg.vllm))
    return HFBackend(model_dir, tokenizer, cfg.temperature, cfg.top_p, cfg.max_tokens, cfg.batch_size, cfg.seed,
                     cfg.hf_dtype, cfg.hf_num_threads)


def _generate_and_grade(
    benches: list[str],
    problems: Mapping[str, list[Problem]],
    done: set[tuple[str, int]],
    backend,
    tokenizer,
    k: int,
    batch_size: int,
    grader_kwargs: dict,
    samples_path: Path,
    grading: str = "strict",
) -> tuple[int, int]:
    """Samples k responses for every problem not in ``done``, grades them, appends the lines.

    Problems go to the backend in chunks of ``batch_size // k`` (at least 1); each chunk is
    written and flushed when graded (what makes a run resumable), and logged with its rate.

    Returns:
        (samples written, response tokens generated).
    """
    per_chunk = max(1, batch_size // k)
    new_samples = new_tokens = 0
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(2, 2 * int(grader_kwargs.get("num_workers", 2))))
    try:
        with samples_path.open("a", encoding="utf-8") as out:
            for bench in benches:
                pending = [p for p in problems[bench] if (bench, p.index) not in done]
                for c0 in range(0, len(pending), per_chunk):
                    chunk = pending[c0 : c0 + per_chunk]
                    texts = [render_prompt(tokenizer, p.messages) for p in chunk]
                    ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
                    t0 = time.monotonic()
                    generated = backend.generate(ids, k)
                    chunk_tokens = sum(len(r) for samples in generated for r, _ in samples)
                    for p, text, prompt_ids, samples in zip(chunk, texts, ids, generated):
                        responses = [tokenizer.decode(r, skip_special_tokens=True) for r, _ in samples]
                        grades = _grade(pool, p, responses, grader_kwargs, grading)
                        for s, ((resp_ids, reason), resp, g) in enumerate(zip(samples, responses, grades)):
                            rec = {"benchmark": bench, "index": p.index, "problem_id": p.problem_id, "sample": s,
                                   "prompt": text, "response": resp, "pred": g.get("pred", ""), "gold": p.gold}
                            rec.update({key: g[key] for key in GRADE_KEYS})
                            rec.update({"finish_reason": reason, "prompt_tokens": len(prompt_ids),
                                        "response_tokens": len(resp_ids)})
                            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
                    out.flush()
                    new_samples += len(chunk) * k
                    new_tokens += chunk_tokens
                    dt = max(time.monotonic() - t0, 1e-9)
                    print(
                        f"[eval] {bench}: {c0 + len(chunk)}/{len(pending)} problems, {len(chunk) * k} samples "
                        f"in {dt:.1f} s ({len(chunk) * k / dt:.1f} samples/s, {chunk_tokens / dt:.0f} tok/s)",
                        flush=True,
                    )
    finally:
        pool.shutdown(wait=True)
    return new_samples, new_tokens


def _counts(records: list[dict], benches: list[str], k: int) -> dict[str, dict[str, float]]:
    """Per benchmark: problems, samples, answered / truncated shares, mean response tokens."""
    counts: dict[str, dict[str, float]] = {}
    for bench in benches:
        rs = [r for r in records if r["benchmark"] == bench]
        if rs:
            counts[bench] = {
                "problems": len(rs) // k,
                "samples": len(rs),
                "answered": float(np.mean([r["has_answer"] for r in rs])),
                "truncated": float(np.mean([r["finish_reason"] == "length" for r in rs])),
                "tokens": float(np.mean([r["response_tokens"] for r in rs])),
            }
    return counts


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Runs an evaluation (see the module docstring) and writes its outputs.

    Args:
        cfg: The composed ``conf/eval.yaml``.

    Returns:
        The content of ``results.json``: ``metrics``, ``benchmarks`` (counts), ``settings``,
        ``backend``, ``out_dir``, ``wall_s``, ``new_samples``, ``tokens_per_s``, ``config``.

    Raises:
        ConfigError, FileNotFoundError, recipe.data.DataError: see :func:`check_config`,
            :func:`resolve_model`, :func:`load_benchmark`; all raised before any generation.
    """
    setup_paths(cfg)
    check_config(cfg)
    k = int(cfg.k)
    pass_ks = check_pass_ks(cfg.pass_k, k)
    benches = list(dict.fromkeys(cfg.benchmarks))
    backend_name = pick_backend(cfg.backend)
    model_dir = resolve_model(cfg)
    problems = {
        b: load_benchmark(b, cfg.paths.data, cfg.template, cfg.max_problems, bool(cfg.prepare_data)) for b in benches
    }
    out_dir = Path(cfg.out_dir) if cfg.out_dir else Path(cfg.paths.artifacts) / "eval" / _model_name(cfg)
    out_dir = out_dir.expanduser().resolve()
    settings = _settings(cfg, model_dir)
    done = _open_out_dir(out_dir, settings, k, bool(cfg.resume))
    todo = sum(1 for b in benches for p in problems[b] if (b, p.index) not in done)
    print(
        f"[eval] model {model_dir} | backend {backend_name} | k={k} T={cfg.temperature} top_p={cfg.top_p} "
        f"max_tokens={cfg.max_tokens} | {todo} problems to generate "
        f"({sum(len(v) for v in problems.values()) - todo} done already) -> {out_dir}",
        flush=True,
    )

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    start = time.monotonic()
    new_samples = new_tokens = 0
    if todo:
        backend = _make_backend(cfg, backend_name, model_dir, tokenizer)
        grader_kwargs = OmegaConf.to_container(cfg.grader) if cfg.grader else {}
        new_samples, new_tokens = _generate_and_grade(
            benches, problems, done, backend, tokenizer, k, int(cfg.batch_size), grader_kwargs, out_dir / SAMPLES_FILE,
            str(cfg.grading),
        )
    wall = time.monotonic() - start

    wanted = {(b, p.index) for b in benches for p in problems[b]}
    records = [r for r in _read_samples(out_dir / SAMPLES_FILE, k)[0] if (r["benchmark"], r["index"]) in wanted]
    metrics = benchmark_metrics(records, pass_ks)
    counts = _counts(records, benches, k)
    table = markdown_table(metrics, counts, k, pass_ks)
    results = {
        "metrics": metrics,
        "benchmarks": counts,
        "settings": settings,
        "backend": backend_name,
        "out_dir": str(out_dir),
        "wall_s": wall,
        "new_samples": new_samples,
        "tokens_per_s": new_tokens / wall if wall > 0 else 0.0,
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    (out_dir / RESULTS_JSON).write_text(json.dumps(results, indent=2) + "\n")
    header = (
        f"# Evaluation: {model_dir}\n\n"
        f"k = {k} samples per problem, temperature {cfg.temperature}, top-p {cfg.top_p}, "
        f"{cfg.max_tokens} new tokens, template `{cfg.template}`, grading `{cfg.grading}`, backend `{backend_name}`. "
        f"avg@{k}: mean accuracy of the k samples; pass@j: unbiased estimator (Chen et al. 2021); "
        f"`{AVERAGE}`: unweighted mean over the benchmarks.\n\n"
    )
    (out_dir / RESULTS_MD).write_text(header + table + "\n")
    print(table, flush=True)
    print(f"[eval] {new_samples} new samples in {wall:.1f} s; results: {out_dir / RESULTS_MD}", flush=True)
    return results


@hydra.main(config_path="../conf", config_name="eval", version_base=None)
def main(cfg: DictConfig) -> None:
    """Hydra entry point: ``python -m recipe.eval [OVERRIDES]``; exit status 2 on a config,
    path or data error (message on stderr)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        evaluate(cfg)
    except (ConfigError, FileNotFoundError, data_mod.DataError) as e:
        print(f"[eval] error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
