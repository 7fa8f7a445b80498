"""Short supervised fine-tuning (SFT) warm start of a causal LM on verl-format prompts.

``python -m benchmarks.sft --model DIR --data PARQUET --out DIR --steps N`` trains on
(prompt, target response) pairs built from a verl-format parquet file (the columns of
:data:`recipe.data.COLUMNS`): the prompt is the row's chat messages rendered exactly as
verl's ``RLHFDataset`` / agent loop render them (``apply_chat_template(messages,
add_generation_prompt=True)``), the target is ``--response-template`` with ``{answer}``
replaced by ``reward_model.ground_truth`` (default ``\\boxed{{answer}}``, which
:mod:`recipe.reward.math_reward` grades as correct) and ``{solution}`` by the row's
``extra_info.solution`` (a worked solution, as :mod:`benchmarks.tasks.arithmetic` writes),
followed by the tokenizer's eos token so that generation stops. The loss is the mean token negative log-likelihood over
the response tokens only (prompt tokens are labelled -100). The result is an ordinary
Hugging Face model directory (weights, config, generation config, and the source
model's tokenizer files copied unchanged) usable as ``actor_rollout_ref.model.path``.

With ``--eval-data`` the model is evaluated every ``--eval-every`` steps: responses
are generated for the eval prompts and graded with the project's math grader
(:class:`recipe.reward.grader.SafeGrader`, the same grading as the RL reward); with
``--stop-at-acc A`` training stops at the first evaluation whose accuracy (sampled at
``--eval-temperature``, the RL rollout temperature) reaches ``A``. That is how
``benchmarks/learning_setup.py`` lands a warm start whose starting accuracy lies in a
target band (a partially trained model, so RL has something left to learn).

Why transformers' ``Trainer``: it is a maintained trainer that runs here as it is
(``accelerate`` comes with verl) and has the callback hook the accuracy-based stop needs.
verl 0.9.1's own SFT trainer (``verl.trainer.sft_trainer``) was considered first and not
used: it must run under ``torchrun`` (``initialize_global_process_group``) with verl's
FSDP engine, reads a different layout (a ``messages`` column holding the assistant turn,
``MultiTurnSFTDataset``), and its ``fit()`` is one loop without callbacks, so stopping
at an accuracy would mean forking it or relaunching it in chunks with resume. It was not
run on CPU here. A plain torch loop would re-implement what ``Trainer`` already does
(batching, AdamW, warm-up, seeding, logging).

Command line::

    python -m benchmarks.sft --model BASE --data arith/train.parquet --out warm \\
        --response-template '{solution}' --steps 1500 --lr 2e-3 --batch-size 32 \\
        [--eval-data arith/test.parquet --eval-every 10 --stop-at-acc 0.3 --eval-temperature 1.0]

Writes ``OUT`` atomically (a temporary folder renamed into place) with
``sft_info.json`` (settings, loss and accuracy history, the step it stopped at).
"""

from __future__ import annotations

from recipe.io import atomic_dir
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_RESPONSE_TEMPLATE",
    "SFTConfig",
    "SFTResult",
    "encode_pair",
    "evaluate_accuracy",
    "generate",
    "load_pairs",
    "main",
    "train_sft",
]

#: Target response; ``{answer}`` is replaced by the row's ground truth.
DEFAULT_RESPONSE_TEMPLATE = "\\boxed{{answer}}"

#: Written next to the weights: how the warm start was made.
INFO_FILE = "sft_info.json"

#: Files of the source model directory that are not copied (the weights are re-saved).
_WEIGHT_FILES = {"model.safetensors", "pytorch_model.bin", "config.json", "generation_config.json"}


@dataclass
class SFTConfig:
    """Settings of one SFT run.

    Attributes:
        steps: Optimizer steps at most (each on ``batch_size`` pairs).
        lr: AdamW learning rate (constant after ``warmup_steps`` linear warm-up).
        batch_size: Pairs per step.
        warmup_steps: Linear warm-up steps.
        weight_decay: AdamW weight decay.
        seed: Seed of the initial data order and of dropout (Trainer ``seed``).
        response_template: Target response; ``{answer}`` -> ground truth, ``{solution}``
            -> ``extra_info.solution``.
        eval_every: Evaluate every this many steps (0: never; needs eval pairs).
        eval_temperature: Sampling temperature of the evaluation (0: greedy).
        eval_samples: Responses per eval prompt.
        eval_max_new_tokens: Generation length limit of the evaluation, in tokens.
        eval_seed: ``torch.manual_seed`` for evaluation sampling (the training RNG
            state is saved and restored around each evaluation).
        stop_at_acc: Stop at the first evaluation whose accuracy is >= this (None: run
            all ``steps``).
        threads: torch intra-op threads (None: leave torch's default).
    """

    steps: int = 600
    lr: float = 1e-3
    batch_size: int = 32
    warmup_steps: int = 10
    weight_decay: float = 0.0
    seed: int = 0
    response_template: str = DEFAULT_RESPONSE_TEMPLATE
    eval_every: int = 0
    eval_temperature: float = 1.0
    eval_samples: int = 1
    eval_max_new_tokens: int = 16
    eval_seed: int = 1234
    stop_at_acc: float | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.eval_every < 0 or self.eval_samples < 1 or self.eval_temperature < 0:
            raise ValueError("eval_every must be >= 0, eval_samples >= 1, eval_temperature >= 0")
        _check_template(self.response_template)
        if self.stop_at_acc is not None and not 0 <= self.stop_at_acc <= 1:
            raise ValueError(f"stop_at_acc must be in [0, 1], got {self.stop_at_acc}")


@dataclass
class SFTResult:
    """What :func:`train_sft` did.

    Attributes:
        out: The saved model directory.
        steps: Optimizer steps taken.
        stopped_early: True when ``stop_at_acc`` was reached before ``steps``.
        losses: ``(step, mean response-token NLL in nats)`` as logged.
        evals: ``{"step", "acc", "seconds"}`` per evaluation.
        seconds: Wall-clock seconds of training (evaluations included).
    """

    out: Path
    steps: int
    stopped_early: bool
    losses: list[tuple[int, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------------------- data


def _check_template(response_template: str) -> None:
    if "{answer}" not in response_template and "{solution}" not in response_template:
        raise ValueError(
            f"response_template {response_template!r} lacks a placeholder ({{answer}} or {{solution}})"
        )


def load_pairs(
    path: str | os.PathLike, response_template: str = DEFAULT_RESPONSE_TEMPLATE
) -> list[dict[str, Any]]:
    """Reads (prompt messages, target response, ground truth) triples from a verl parquet.

    Args:
        path: A verl-format parquet file (``prompt``, ``reward_model.ground_truth``, ...).
        response_template: Target response: ``{answer}`` is replaced by the ground truth,
            ``{solution}`` by the row's ``extra_info.solution`` (a worked solution, e.g.
            :func:`benchmarks.tasks.arithmetic.solution`).

    Returns:
        One dict per row: ``messages`` (list of ``{"role", "content"}``), ``response``
        (str), ``ground_truth`` (str), ``data_source`` (str).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        recipe.data.DataError: The file is not verl-format (names the missing field), or
            ``{solution}`` is asked for and a row has no ``extra_info.solution`` (names
            the row).
        ValueError: ``response_template`` has neither placeholder.
    """
    import pyarrow.parquet as pq

    from recipe.data import DataError, validate_verl_parquet

    _check_template(response_template)
    validate_verl_parquet(path)
    table = pq.read_table(path, columns=["data_source", "prompt", "reward_model", "extra_info"]).to_pylist()
    pairs = []
    for i, row in enumerate(table):
        gt = str(row["reward_model"]["ground_truth"])
        response = response_template.replace("{answer}", gt)
        if "{solution}" in response_template:
            sol = (row.get("extra_info") or {}).get("solution")
            if not isinstance(sol, str) or not sol:
                raise DataError(
                    f"{path}: row {i}: the response template uses {{solution}} but extra_info.solution is missing"
                )
            response = response.replace("{solution}", sol)
        messages = [{"role": m["role"], "content": m["content"]} for m in row["prompt"]]
        pairs.append(
            {"messages": messages, "response": response, "ground_truth": gt, "data_source": row["data_source"]}
        )
    return pairs


def _prompt_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Prompt token ids exactly as verl's RLHFDataset / agent loop build them."""
    text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_pair(tokenizer: Any, messages: Sequence[dict[str, str]], response: str) -> dict[str, list[int]]:
    """Token ids and labels of one (prompt, response) pair.

    Args:
        tokenizer: A chat tokenizer with an eos token.
        messages: The prompt messages.
        response: The target response text (the eos token is appended).

    Returns:
        ``input_ids`` [L] and ``labels`` [L] (ints): the prompt ids (labels -100), then
        the response ids and eos (labels = ids), L = prompt + response + 1 tokens.

    Raises:
        ValueError: The tokenizer has no eos token.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token: the SFT target needs one to stop generation")
    prompt = _prompt_ids(tokenizer, messages)
    resp = list(tokenizer(response, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    return {"input_ids": prompt + resp, "labels": [-100] * len(prompt) + resp}


def _collate(pad_id: int):
    import torch

    def collate(batch: list[dict[str, list[int]]]) -> dict[str, Any]:
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), n), -100, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):  # right padding
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


# ---------------------------------------------------------------------- evaluation


def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[dict[str, str]]],
    temperature: float = 1.0,
    max_new_tokens: int = 16,
    batch_size: int = 64,
) -> list[str]:
    """Generates one response per prompt (left-padded batches, like verl's rollout).

    Sampling is plain temperature sampling (no top-k / top-p), as verl's rollout with
    ``top_k=-1, top_p=1``; ``temperature=0`` is greedy. Seed torch beforehand for
    reproducible samples.

    Args:
        model: A causal LM (put in eval mode here).
        tokenizer: Its tokenizer.
        prompts: Chat messages per prompt.
        temperature: Sampling temperature (0: greedy).
        max_new_tokens: Response length limit in tokens.
        batch_size: Prompts per ``generate`` call.

    Returns:
        The decoded responses (special tokens removed), in prompt order.
    """
    import torch

    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [_prompt_ids(tokenizer, m) for m in prompts[start : start + batch_size]]
        n = max(len(c) for c in chunk)
        ids = torch.tensor([[pad] * (n - len(c)) + c for c in chunk])
        mask = torch.tensor([[0] * (n - len(c)) + [1] * len(c) for c in chunk])
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=model.generation_config.eos_token_id
        )
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        out.extend(tokenizer.batch_decode(gen[:, n:], skip_special_tokens=True))
    return out


def evaluate_accuracy(
    model: Any,
    tokenizer: Any,
    pairs: Sequence[dict[str, Any]],
    temperature: float = 1.0,
    samples: int = 1,
    max_new_tokens: int = 16,
    seed: int | None = 1234,
) -> float:
    """Share of generated responses that the math grader marks correct.

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer.
        pairs: Rows of :func:`load_pairs` (``messages``, ``ground_truth``, ``data_source``).
        temperature: Sampling temperature (0: greedy; then ``samples`` is ignored).
        samples: Responses per prompt.
        max_new_tokens: Response length limit in tokens.
        seed: ``torch.manual_seed`` before sampling (the caller's RNG state is restored
            afterwards); None: use the current state.

    Returns:
        Accuracy in [0, 1] over ``len(pairs) x samples`` responses (0.0 for no pairs).
    """
    import torch

    from recipe.reward.grader import get_grader
    from recipe.reward.math_reward import answer_style

    if not pairs:
        return 0.0
    reps = 1 if temperature <= 0 else samples
    rows = [p for p in pairs for _ in range(reps)]
    state = torch.get_rng_state()
    try:
        if seed is not None:
            torch.manual_seed(seed)
        responses = generate(model, tokenizer, [r["messages"] for r in rows], temperature, max_new_tokens)
    finally:
        torch.set_rng_state(state)
    grades = get_grader().grade_batch(
        [(resp, r["ground_truth"], answer_style(r["data_source"])) for resp, r in zip(responses, rows)]
    )
    return sum(g.correct for g in grades) / len(grades)


# ------------------------------------------------------------------------ training


def _save(model: Any, src: Path, out: Path, info: dict[str, Any]) -> None:
    """Saves weights + the source directory's tokenizer files to ``out`` atomically."""
    with atomic_dir(out) as tmp:
        for child in src.iterdir():
            if child.is_file() and child.name not in _WEIGHT_FILES and child.name != INFO_FILE:
                shutil.copyfile(child, tmp / child.name)
        model.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        os.chmod(tmp, 0o755)


def train_sft(
    model_dir: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    config: SFTConfig = SFTConfig(),
    eval_data: str | os.PathLike | None = None,
    verbose: bool = True,
) -> SFTResult:
    """Fine-tunes ``model_dir`` on the (prompt, target) pairs of ``data``; saves to ``out``.

    Args:
        model_dir: Source HF model directory (with tokenizer).
        data: verl-format training parquet.
        out: Output model directory (replaced atomically if it exists).
        config: Settings.
        eval_data: verl-format parquet evaluated every ``config.eval_every`` steps.
        verbose: Print losses and evaluations.

    Returns:
        Steps taken, loss and accuracy history.

    Raises:
        FileNotFoundError: A path does not exist.
        ValueError: Bad settings (``stop_at_acc`` / ``eval_every`` without ``eval_data``).
        recipe.data.DataError: A parquet is not verl-format.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments
    from transformers.trainer_callback import PrinterCallback
    from transformers.utils import logging as hf_logging

    src = Path(model_dir)
    if not (src / "config.json").is_file():
        raise FileNotFoundError(f"--model {src}: no config.json (not an HF model directory)")
    if (config.eval_every or config.stop_at_acc is not None) and eval_data is None:
        raise ValueError("eval_every / stop_at_acc need eval_data (--eval-data)")
    if config.stop_at_acc is not None and config.eval_every < 1:
        raise ValueError("stop_at_acc needs eval_every >= 1")
    if config.threads:
        torch.set_num_threads(config.threads)
    hf_logging.set_verbosity_error()

    tokenizer = AutoTokenizer.from_pretrained(str(src))
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    pairs = load_pairs(data, config.response_template)
    if not pairs:
        raise ValueError(f"--data {data}: no rows")
    examples = [encode_pair(tokenizer, p["messages"], p["response"]) for p in pairs]
    eval_pairs = load_pairs(eval_data, config.response_template) if eval_data is not None else []

    result = SFTResult(out=Path(out), steps=0, stopped_early=False)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        if verbose:
            print(f"[benchmarks.sft] {msg}", flush=True)

    class _Monitor(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):  # noqa: D102
            if logs and "loss" in logs:
                result.losses.append((state.global_step, float(logs["loss"])))
                log(f"step {state.global_step}: loss {float(logs['loss']):.4f}")

        def on_step_end(self, args, state, control, model=None, **kw):  # noqa: D102
            step = state.global_step
            if not config.eval_every or step % config.eval_every:
                return
            te = time.perf_counter()
            acc = evaluate_accuracy(
                model,
                tokenizer,
                eval_pairs,
                config.eval_temperature,
                config.eval_samples,
                config.eval_max_new_tokens,
                config.eval_seed,
            )
            model.train()
            result.evals.append({"step": step, "acc": acc, "seconds": time.perf_counter() - te})
            log(f"step {step}: eval acc@T={config.eval_temperature} {acc:.3f} ({len(eval_pairs)} prompts)")
            if config.stop_at_acc is not None and acc >= config.stop_at_acc:
                result.stopped_early = step < config.steps
                control.should_training_stop = True

    with tempfile.TemporaryDirectory(prefix="recipe-sft-") as scratch:
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=config.steps,
            per_device_train_batch_size=config.batch_size,
            learning_rate=config.lr,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=config.warmup_steps,
            weight_decay=config.weight_decay,
            optim="adamw_torch",
            logging_steps=max(1, min(25, config.eval_every or 25)),
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            seed=config.seed,
            data_seed=config.seed,
            dataloader_num_workers=0,
            disable_tqdm=True,
            remove_unused_columns=False,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=examples,
            data_collator=_collate(tokenizer.pad_token_id),
            callbacks=[_Monitor()],
        )
        trainer.remove_callback(PrinterCallback)  # _Monitor logs instead
        state = trainer.train()
        result.steps = trainer.state.global_step
    result.seconds = time.perf_counter() - t0
    info = {
        "source_model": str(src.resolve()),
        "data": str(Path(data).resolve()),
        "eval_data": str(Path(eval_data).resolve()) if eval_data is not None else None,
        "config": asdict(config),
        "steps": result.steps,
        "stopped_early": result.stopped_early,
        "train_loss": float(state.training_loss),
        "losses": result.losses,
        "evals": result.evals,
        "seconds": round(result.seconds, 2),
    }
    _save(trainer.model, src, Path(out), info)
    log(f"{result.steps} steps in {result.seconds:.1f}s -> {out}")
    return result


# ----------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
    d = SFTConfig()
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.sft",
        description="Short SFT warm start on (prompt, boxed answer) pairs of a verl parquet file.",
    )
    p.add_argument("--model", required=True, help="source HF model directory (with tokenizer)")
    p.add_argument("--data", required=True, help="verl-format training parquet")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--response-template",
        default=d.response_template,
        help="target response; {answer} -> ground truth, {solution} -> extra_info.solution",
    )
    p.add_argument("--eval-data", default=None, help="verl-format parquet evaluated during training")
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-temperature", type=float, default=d.eval_temperature)
    p.add_argument("--eval-samples", type=int, default=d.eval_samples)
    p.add_argument("--eval-max-new-tokens", type=int, default=d.eval_max_new_tokens)
    p.add_argument("--stop-at-acc", type=float, default=None, help="stop once eval accuracy >= this")
    p.add_argument("--threads", type=int, default=None, help="torch threads")
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (1 on a data error, 2 on usage)."""
    from recipe.data import DataError

    parser = _parser()
    a = parser.parse_args(argv)
    try:
        cfg = SFTConfig(
            steps=a.steps,
            lr=a.lr,
            batch_size=a.batch_size,
            warmup_steps=a.warmup_steps,
            weight_decay=a.weight_decay,
            seed=a.seed,
            response_template=a.response_template,
            eval_every=a.eval_every,
            eval_temperature=a.eval_temperature,
            eval_samples=a.eval_samples,
            eval_max_new_tokens=a.eval_max_new_tokens,
            stop_at_acc=a.stop_at_acc,
            threads=a.threads,
        )
    except ValueError as e:
        parser.error(str(e))
    try:
        train_sft(a.model, a.data, a.out, cfg, a.eval_data)
    except (FileNotFoundError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
