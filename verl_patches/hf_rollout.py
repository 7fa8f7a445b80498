"""``hf``: a CPU rollout backend for verl 0.9.1 built on HF ``generate``.

verl generates only through its agent loop and an async rollout server (vLLM, SGLang,
TRT-LLM). None runs without a GPU, so this module provides a server with the same
token-in/token-out protocol:

- :class:`HFRolloutServer` (a Ray actor) holds an HF copy of the policy and answers
  ``generate(prompt_ids, sampling_params, request_id, ...) -> TokenOutput`` like
  ``vLLMHttpServer.generate``. Concurrent requests are **batched**: requests that arrive
  within ``batch_wait_ms`` of each other (and while a batch is running) are grouped by
  sampling parameters and generated in one left-padded ``model.generate`` call of at
  most ``max_num_seqs`` rows. Token log-probs are recorded during generation (no second
  forward pass).
- :class:`HFReplica` (a ``RolloutReplica``) launches one server per replica, registered
  as ``hf`` in verl's ``RolloutReplicaRegistry``.
- :class:`HFServerAdapter` (a ``BaseRollout``) lives inside the FSDP training worker and
  receives the weights after every update: every rank drains verl's weight generator
  (the gather is collective), rank 0 sends the state dict to its server.

Sampling parameters honoured: ``temperature`` (0 = greedy), ``top_p``, ``top_k`` (-1 =
off), ``max_tokens`` / ``max_new_tokens`` (default ``rollout.response_length``, capped by
``prompt_length + response_length - len(prompt)``), ``repetition_penalty``,
``logprobs``, ``ignore_eos``, ``seed``; ``n`` arrives as n separate requests (verl's agent
loop).

Seeded sampling (``seed``, set per response by :mod:`verl_patches.seeding`): each row of a
batch draws its tokens from its own ``torch.Generator`` seeded with the request's seed, by
the Gumbel-max trick on the temperature / top-k / top-p processed logits (argmax of
``logits + Gumbel noise`` is a draw from their softmax). A response's random numbers
therefore depend only on its seed, not on which requests share its batch or in what order
they arrived; the logits themselves may differ between batch compositions in the last
float32 bits (left padding changes the matmul shapes), which can flip a draw only at a
near-tie. Requests without a seed get one from the server's generator (seeded by
``rollout.seed + replica``).

Log-prob semantics (``rollout.logprobs_mode``, as verl's vLLM server): with
``processed_logprobs`` (verl's default) the log-softmax of the logits after temperature,
top-k and top-p (the distribution the token was drawn from: renormalised over the nucleus,
so with top-p < 1 they are >= the actor's recomputed ``old_log_prob`` and the fresh-row
weight pi_old / mu is <= 1, as on a GPU); with ``raw_logprobs`` the log-softmax of the
logits divided by the temperature (temperature 1 when greedy), before top-k / top-p: what
verl's actor computes for ``old_log_prob``, so ``training/rollout_probs_diff_*`` measures
only the weight-sync and numerical difference (vLLM's ``raw_logprobs`` also leaves out the
temperature). With top-k off and top-p = 1 the two are equal.

Stop tokens: a response ends at the first of the model's EOS ids (generation config and
tokenizer) and the chat template's end-of-turn token (``<|im_end|>`` for ChatML; see
:func:`turn_stop_token_ids`), plus any ``stop_token_ids`` of the request.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Generator, Optional

import ray
import torch

logger = logging.getLogger(__name__)
logger.setLevel(os.getenv("VERL_LOGGING_LEVEL", "INFO"))

ROLLOUT_NAME = "hf"
_DEFAULT_BATCH_WAIT_MS = 20.0


# --------------------------------------------------------------------------------------
# Log-prob capture inside HF generate
# --------------------------------------------------------------------------------------
class _LogProbRecorder:
    """Logits processor (placed before HF's temperature/top-k/top-p warpers) that keeps
    ``log_softmax(scores / T)`` of the current step, shape ``[B, V]`` float32."""

    def __init__(self, temperature: float):
        self.temperature = temperature if temperature > 0 else 1.0
        self.last: Optional[torch.Tensor] = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.last = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores


#: End-of-turn tokens of common chat templates; one counts as a stop token when it is a
#: single token of the tokenizer and its chat template writes it.
TURN_END_TOKENS: tuple[str, ...] = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")

#: ``rollout.logprobs_mode`` values this backend implements.
LOGPROBS_MODES: tuple[str, ...] = ("processed_logprobs", "raw_logprobs")


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    return [int(value)]


def turn_stop_token_ids(tokenizer, eos_token_id: Any = None) -> list[int]:
    """The ids that end an assistant turn: EOS ids plus the chat template's end-of-turn token.

    A base model's generation config and tokenizer often name only its pre-training EOS
    (Qwen2.5 base: ``<|endoftext|>``, id 151643), while its ChatML chat template ends
    every turn with ``<|im_end|>`` (151645): without that stop a sample runs on into an
    invented next turn. The Qwen2.5-Math evaluation stops on both.

    Args:
        tokenizer: An HF tokenizer (``eos_token_id``, ``chat_template``,
            ``convert_tokens_to_ids``, ``unk_token_id``), or None.
        eos_token_id: The generation config's ``eos_token_id`` (an id, a list, or None).

    Returns:
        The ids in order (generation config EOS, tokenizer EOS, end-of-turn tokens of
        :data:`TURN_END_TOKENS` that are single tokens of the tokenizer and appear in its
        chat template), without duplicates. Empty when nothing defines one.
    """
    ids = _as_id_list(eos_token_id)
    if tokenizer is not None:
        ids += _as_id_list(getattr(tokenizer, "eos_token_id", None))
        template = getattr(tokenizer, "chat_template", None)
        if isinstance(template, dict):
            template = " ".join(str(v) for v in template.values())
        unk = getattr(tokenizer, "unk_token_id", None)
        for tok in TURN_END_TOKENS:
            if template is not None and tok not in str(template):
                continue
            tid = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid >= 0 and tid != unk:
                ids.append(tid)
    return list(dict.fromkeys(ids))


def processed_log_probs(logits: torch.Tensor, temperature: float, top_k: int = -1, top_p: float = 1.0) -> torch.Tensor:
    """``log_softmax`` of ``logits`` after temperature, top-k and top-p (vLLM's ``processed_logprobs``).

    Args:
        logits: ``[B, V]`` float logits.
        temperature: Sampling temperature (<= 0: greedy, treated as 1).
        top_k: Keep the k most likely tokens (<= 0: off).
        top_p: Keep the smallest set of most likely tokens with mass >= top_p (1: off).

    Returns:
        ``[B, V]`` float32 log-probs in nats; tokens outside the kept set are ``-inf``.
        Example: logits ``[2, 1, 0, -1]``, T = 1, top-p 0.7 keeps tokens 0 and 1 (0.644 <
        0.7 <= 0.881), so token 0 gets ``log(e^2 / (e^2 + e^1)) = -0.3133``.
    """
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    scores = logits.float()
    if temperature > 0:
        scores = TemperatureLogitsWarper(float(temperature))(None, scores)
    if top_k > 0:
        scores = TopKLogitsWarper(int(top_k))(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(float(top_p))(None, scores)
    return torch.log_softmax(scores, dim=-1)


class _GumbelNoise:
    """Logits processor (last in the list, after the temperature / top-k / top-p warpers)
    adding per-row Gumbel(0, 1) noise from each row's own generator: greedy decoding of the
    result samples from ``softmax(scores)`` row by row (the Gumbel-max trick).

    Args:
        seeds: One seed per row (``[B]`` ints in ``[0, 2**64)``).
    """

    def __init__(self, seeds: list[int]):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        vocab = scores.shape[-1]
        u = torch.stack([torch.rand(vocab, generator=g, dtype=torch.float64) for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp(min=1e-300)))
        return scores.double() + gumbel.to(scores.device)  # float64: no ties from rounding


class _LogProbGatherer:
    """Stopping criterion (called after each new token is appended) that gathers the
    chosen token's log-prob from the recorder; never stops generation itself."""

    def __init__(self, recorder: _LogProbRecorder):
        self.recorder = recorder
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        token = input_ids[:, -1:]
        self.steps.append(self.recorder.last.gather(-1, token).squeeze(-1))
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


# --------------------------------------------------------------------------------------
# Requests and batching
# --------------------------------------------------------------------------------------
@dataclass
class _Request:
    prompt_ids: list[int]
    params: dict[str, Any]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.monotonic)


def _sampling_key(params: dict[str, Any]) -> tuple:
    """Requests sharing this key can be generated in one ``generate`` call (the seed is
    per row, not part of the key)."""
    return (
        float(params["temperature"]),
        float(params["top_p"]),
        int(params["top_k"]),
        int(params["max_tokens"]),
        float(params["repetition_penalty"]),
        bool(params["ignore_eos"]),
        tuple(params.get("stop_token_ids", ())),
    )


def normalize_sampling_params(
    sampling_params: dict[str, Any],
    prompt_len: int,
    prompt_length: int,
    response_length: int,
    max_model_len: Optional[int] = None,
) -> dict[str, Any]:
    """Turn verl's sampling-parameter dict into the fields this server uses.

    Args:
        sampling_params: As sent by verl's agent loop (``temperature``, ``top_p``,
            ``top_k``, ``repetition_penalty``, ``logprobs``, optional ``max_tokens`` /
            ``max_new_tokens``, ``ignore_eos``, ``stop_token_ids``).
        prompt_len: Number of prompt tokens of this request.
        prompt_length: ``rollout.prompt_length``.
        response_length: ``rollout.response_length``.
        max_model_len: Optional context cap (``rollout.max_model_len``).

    Returns:
        A dict with ``temperature``, ``top_p``, ``top_k``, ``max_tokens``,
        ``repetition_penalty``, ``ignore_eos``, ``logprobs``, ``seed`` (int or None) and
        ``stop_token_ids`` (a sorted tuple of ints, added to the generator's stop ids).

    Raises:
        ValueError: if the prompt leaves no room for a single new token, or a value is
            out of range (negative temperature, top_p outside (0, 1]).
    """
    p = dict(sampling_params)
    if "max_tokens" in p:
        max_tokens = p.pop("max_tokens")
    elif "max_new_tokens" in p:
        max_tokens = p.pop("max_new_tokens")
    else:
        max_tokens = min(response_length, prompt_length + response_length - prompt_len)
    context = max_model_len or (prompt_length + response_length)
    room = context - prompt_len
    if room < 1:
        raise ValueError(
            f"prompt of {prompt_len} tokens leaves no room to generate within {context} tokens "
            "(rollout.prompt_length + rollout.response_length or rollout.max_model_len)"
        )
    max_tokens = max(1, min(int(max_tokens), room))
    temperature = float(p.get("temperature", 1.0))
    top_p = float(p.get("top_p", 1.0))
    top_k = p.get("top_k", -1)
    top_k = -1 if top_k is None else int(top_k)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    seed = p.get("seed")
    if seed is not None and not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return {
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "max_tokens": max_tokens,
        "repetition_penalty": float(p.get("repetition_penalty", 1.0) or 1.0),
        "ignore_eos": bool(p.get("ignore_eos", False)),
        "logprobs": bool(p.get("logprobs", False)),
        "seed": None if seed is None else int(seed),
        "stop_token_ids": tuple(sorted({int(t) for t in (p.get("stop_token_ids") or ())})),
    }


class HFGenerator:
    """Batched generation with per-token log-probs on an HF causal LM (no Ray).

    Args:
        model: An HF ``PreTrainedModel`` (eval mode, CPU).
        eos_token_ids: Token ids that end a response (:func:`turn_stop_token_ids`).
        pad_token_id: Id used for left padding.
        logprobs_mode: ``"raw_logprobs"`` (default here): log-softmax of logits / T before
            top-k / top-p; ``"processed_logprobs"``: after them (:func:`processed_log_probs`,
            verl's vLLM default). See the module doc.

    Raises:
        ValueError: Unknown ``logprobs_mode``.
    """

    def __init__(self, model, eos_token_ids: list[int], pad_token_id: int, logprobs_mode: str = "raw_logprobs"):
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {LOGPROBS_MODES}, got {logprobs_mode!r}")
        self.model = model
        self.eos_token_ids = list(dict.fromkeys(int(t) for t in eos_token_ids))
        self.pad_token_id = int(pad_token_id)
        self.logprobs_mode = logprobs_mode

    @torch.no_grad()
    def generate_batch(
        self, prompts: list[list[int]], params: dict[str, Any], seeds: Optional[list[int]] = None
    ) -> list[tuple[list[int], list[float], str]]:
        """Generate one response per prompt with shared sampling parameters.

        Args:
            prompts: ``B`` lists of prompt token ids (unpadded, any lengths).
            params: Output of :func:`normalize_sampling_params` (shared by the batch).
            seeds: ``B`` per-row seeds: row ``i`` samples with its own generator seeded
                ``seeds[i]`` (Gumbel-max, see the module doc). None: HF's sampling from
                torch's global generator (results depend on the batch).

        Returns:
            ``B`` tuples ``(response_ids, log_probs, finish_reason)``: response token ids
            up to and including the first EOS (or ``max_tokens`` ids), their log-probs in
            nats (float, same length), and ``"stop"`` or ``"length"``.
        """
        from transformers import LogitsProcessorList, StoppingCriteriaList

        batch = len(prompts)
        width = max(len(p) for p in prompts)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        for i, ids in enumerate(prompts):
            input_ids[i, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[i, width - len(ids) :] = 1
            if ids:
                # Pad with a token the row already holds (masked out anyway): HF's repetition
                # penalty counts every id in input_ids, and pad ids would penalise the pad
                # token (an EOS for Qwen) in the padded rows only.
                input_ids[i, : width - len(ids)] = ids[0]

        greedy = params["temperature"] <= 0
        seeded = not greedy and seeds is not None
        if seeded and len(seeds) != batch:
            raise ValueError(f"{len(seeds)} seeds for {batch} prompts")
        processed = self.logprobs_mode == "processed_logprobs" and not greedy
        recorder = _LogProbRecorder(params["temperature"])
        processors: list = [recorder]
        if seeded or processed:  # apply the warpers here (HF's run only in its sampling path)
            from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

            processors.append(TemperatureLogitsWarper(params["temperature"]))
            if params["top_k"] > 0:
                processors.append(TopKLogitsWarper(params["top_k"]))
            if params["top_p"] < 1.0:
                processors.append(TopPLogitsWarper(params["top_p"]))
            if processed:  # log-softmax of the processed scores (temperature already applied)
                recorder = _LogProbRecorder(1.0)
                processors.append(recorder)
            if seeded:
                processors.append(_GumbelNoise(seeds))
        gatherer = _LogProbGatherer(recorder)
        stop_ids = list(dict.fromkeys(self.eos_token_ids + [int(t) for t in params.get("stop_token_ids", ())]))
        gen_kwargs: dict[str, Any] = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=params["max_tokens"],
            do_sample=not greedy and not seeded,
            pad_token_id=self.pad_token_id,
            eos_token_id=None if params["ignore_eos"] else stop_ids,
            logits_processor=LogitsProcessorList(processors),
            stopping_criteria=StoppingCriteriaList([gatherer]),
            use_cache=True,
            repetition_penalty=params["repetition_penalty"],
            return_dict_in_generate=False,
        )
        if greedy or seeded:
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        elif processed:  # our warpers above; HF's must be no-ops (not the model's defaults)
            gen_kwargs.update(temperature=1.0, top_p=1.0, top_k=0)
        else:
            gen_kwargs.update(
                temperature=params["temperature"],
                top_p=params["top_p"],
                top_k=params["top_k"] if params["top_k"] > 0 else 0,
            )
        if params["ignore_eos"]:
            gen_kwargs["min_new_tokens"] = params["max_tokens"]
        out = self.model.generate(**gen_kwargs)
        new_tokens = out[:, width:]
        logprobs = torch.stack(gatherer.steps, dim=1) if gatherer.steps else torch.zeros((batch, 0))
        eos = set(stop_ids) if not params["ignore_eos"] else set()
        results = []
        for i in range(batch):
            ids = new_tokens[i].tolist()
            end, reason = len(ids), "length"
            for j, t in enumerate(ids):
                if t in eos:
                    end, reason = j + 1, "stop"
                    break
            results.append((ids[:end], logprobs[i, :end].tolist(), reason))
        return results


# --------------------------------------------------------------------------------------
# The server (a Ray actor)
# --------------------------------------------------------------------------------------
class HFRolloutServer:
    """Token-in/token-out rollout server answering like verl's vLLM server, on CPU.

    Args:
        config: verl ``RolloutConfig``. Reads ``prompt_length``, ``response_length``,
            ``max_model_len``, ``max_num_seqs`` (largest batch), ``seed`` and
            ``engine_kwargs.hf`` (``batch_wait_ms``: how long to wait for more requests
            before starting a batch, default 20; ``num_threads``: torch threads, default
            all cores; ``dtype``: ``float32`` (default) or ``bfloat16``).
        model_config: verl ``HFModelConfig`` (``local_path``, tokenizer, generation config).
        replica_rank: Replica index (names the actor, logs).
    """

    def __init__(self, config, model_config, replica_rank: int = 0):
        from transformers import AutoModelForCausalLM, GenerationConfig
        from verl.utils.config import omega_conf_to_dataclass
        from verl.workers.config import HFModelConfig

        config = omega_conf_to_dataclass(config)
        if not isinstance(model_config, HFModelConfig):
            model_config = omega_conf_to_dataclass(model_config, dataclass_type=HFModelConfig)
        self.config = config
        self.model_config = model_config
        self.replica_rank = replica_rank
        hf_kwargs = dict((config.engine_kwargs or {}).get(ROLLOUT_NAME, {}) or {})
        self.batch_wait_s = float(hf_kwargs.get("batch_wait_ms", _DEFAULT_BATCH_WAIT_MS)) / 1000.0
        num_threads = hf_kwargs.get("num_threads")
        if num_threads:
            torch.set_num_threads(int(num_threads))
        dtype = getattr(torch, str(hf_kwargs.get("dtype", "float32")))
        self.max_batch = max(1, int(config.max_num_seqs))
        torch.manual_seed(int(config.seed) + replica_rank)
        #: seeds for requests that bring none (verl_patches.seeding gives every response one)
        self._seed_source = torch.Generator().manual_seed(int(config.seed) + replica_rank)

        path = model_config.local_path
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
        self.model.eval()
        tokenizer = model_config.tokenizer
        ge = None
        try:
            ge = GenerationConfig.from_pretrained(path).eos_token_id
        except OSError:
            pass
        eos_ids = turn_stop_token_ids(tokenizer, ge)
        if not eos_ids:
            raise ValueError(f"model at {path} defines no eos token id (tokenizer or generation_config.json)")
        pad = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else eos_ids[0]
        logprobs_mode = str(getattr(config, "logprobs_mode", None) or "processed_logprobs")
        if logprobs_mode not in LOGPROBS_MODES:
            raise ValueError(
                f"rollout.logprobs_mode={logprobs_mode!r} is not supported by the hf backend; use one of {LOGPROBS_MODES}"
            )
        self.generator = HFGenerator(self.model, eos_ids, pad, logprobs_mode)
        self._weights_lock = threading.Lock()
        self._pending: list[_Request] = []
        self._batcher: Optional[asyncio.Task] = None
        self.global_steps: Optional[int] = None
        self.stats = {"requests": 0, "batches": 0, "tokens": 0, "generate_s": 0.0}

    # -- protocol -------------------------------------------------------------------
    async def generate(
        self,
        prompt_ids: list[int],
        sampling_params: dict[str, Any],
        request_id: str,
        image_data: Optional[list[Any]] = None,
        video_data: Optional[list[Any]] = None,
        **kwargs,
    ):
        """Generate one response (see ``vLLMHttpServer.generate``); batched with
        concurrent requests. Returns a verl ``TokenOutput``."""
        from verl.workers.rollout.replica import TokenOutput

        if image_data is not None or video_data is not None:
            raise NotImplementedError("the hf rollout backend is text-only")
        prompt_ids = [int(t) for t in (prompt_ids.tolist() if hasattr(prompt_ids, "tolist") else prompt_ids)]
        params = normalize_sampling_params(
            sampling_params,
            len(prompt_ids),
            self.config.prompt_length,
            self.config.response_length,
            getattr(self.config, "max_model_len", None),
        )
        loop = asyncio.get_running_loop()
        req = _Request(prompt_ids, params, loop.create_future())
        self._pending.append(req)
        if self._batcher is None or self._batcher.done():
            self._batcher = loop.create_task(self._batch_loop())
        token_ids, log_probs, reason = await req.future
        return TokenOutput(
            token_ids=token_ids,
            log_probs=log_probs if params["logprobs"] else None,
            stop_reason="completed",
            extra_fields={"global_steps": self.global_steps, "finish_reason": reason},
        )

    async def _batch_loop(self) -> None:
        while self._pending:
            # Let concurrent requests arrive: wait until no new one came for batch_wait_s.
            seen = -1
            while len(self._pending) != seen and len(self._pending) < self.max_batch:
                seen = len(self._pending)
                await asyncio.sleep(self.batch_wait_s)
            key = _sampling_key(self._pending[0].params)
            group = [r for r in self._pending if _sampling_key(r.params) == key][: self.max_batch]
            taken = {id(r) for r in group}
            self._pending = [r for r in self._pending if id(r) not in taken]
            start = time.monotonic()
            try:
                seeds = [r.params["seed"] if r.params["seed"] is not None else self._draw_seed() for r in group]
                results = await asyncio.to_thread(self._generate_locked, [r.prompt_ids for r in group],
                                                  group[0].params, seeds)
            except Exception as e:  # deliver the error to every waiting request
                for r in group:
                    if not r.future.done():
                        r.future.set_exception(e)
                continue
            self.stats["batches"] += 1
            self.stats["requests"] += len(group)
            self.stats["tokens"] += sum(len(r[0]) for r in results)
            self.stats["generate_s"] += time.monotonic() - start
            for r, res in zip(group, results, strict=True):
                if not r.future.done():
                    r.future.set_result(res)

    def _draw_seed(self) -> int:
        return int(torch.randint(0, 2**62, (1,), generator=self._seed_source))

    def _generate_locked(self, prompts, params, seeds=None):
        with self._weights_lock:
            return self.generator.generate_batch(prompts, params, seeds)

    def update_weights(self, state_dict: dict[str, torch.Tensor], global_steps: Optional[int] = None) -> int:
        """Load full (gathered) weights sent by the training worker.

        Args:
            state_dict: HF parameter names -> full tensors (any float dtype).
            global_steps: Weight version, reported back in ``TokenOutput.extra_fields``.

        Returns:
            Number of tensors loaded.

        Raises:
            KeyError: if a name is unknown to the model (a mismatch between the actor's
                and the rollout's architecture).
        """
        own = self.model.state_dict()
        unknown = [k for k in state_dict if k not in own]
        if unknown:
            raise KeyError(f"hf rollout: weights not in the rollout model: {unknown[:5]} (of {len(unknown)})")
        with self._weights_lock, torch.no_grad():
            for name, tensor in state_dict.items():
                own[name].copy_(tensor.to(own[name].dtype))
        if global_steps is not None:
            self.global_steps = global_steps
        return len(state_dict)

    def get_stats(self) -> dict[str, float]:
        """Counters since start: requests, batches, generated tokens, seconds generating."""
        return dict(self.stats)

    async def set_global_steps(self, global_steps: int):
        self.global_steps = global_steps

    # -- lifecycle calls verl makes on every server: nothing to do on CPU ---------------
    async def wake_up(self, tags: Optional[list[str]] = None):
        return None

    async def sleep(self):
        return None

    async def clear_kv_cache(self):
        return None

    async def release_kv_cache(self):
        return None

    async def resume_kv_cache(self):
        return None

    async def wait_for_requests_to_drain(self):
        while self._pending or (self._batcher is not None and not self._batcher.done()):
            await asyncio.sleep(0.01)

    async def abort_all_requests(self, reset_prefix_cache: bool = True, reject_request: bool = False):
        return {"aborted_count": 0, "request_ids": []}

    async def abort_request(self, request_id: str, reset_prefix_cache: bool = True):
        return {"aborted": False, "request_id": request_id}

    async def resume_generation(self):
        return None

    async def start_profile(self, **kwargs):
        return None

    async def stop_profile(self):
        return None


# --------------------------------------------------------------------------------------
# Replica and in-worker adapter
# --------------------------------------------------------------------------------------
def _server_name(replica_rank: int, suffix: str = "") -> str:
    return f"{ROLLOUT_NAME}_server_{replica_rank}_0{suffix}"


def _replica_class():
    from verl.workers.rollout.replica import RolloutReplica

    class HFReplica(RolloutReplica):
        """One :class:`HFRolloutServer` per replica (``tensor_model_parallel_size`` must be 1)."""

        async def launch_servers(self):
            if self.world_size != 1:
                raise ValueError(
                    "the hf rollout backend runs one process per replica: set "
                    "actor_rollout_ref.rollout.tensor_model_parallel_size=1 (and data/pipeline parallel 1); "
                    f"got world size {self.world_size}"
                )
            if self.is_reward_model:
                name = _server_name(self.replica_rank, "_reward" + self.name_suffix)
            elif self.is_teacher_model:
                name = _server_name(self.replica_rank, "_teacher" + self.name_suffix)
            else:
                name = _server_name(self.replica_rank, self.name_suffix)
            server_cls = ray.remote(HFRolloutServer)
            server = server_cls.options(name=name, num_cpus=0, max_concurrency=self.max_concurrency).remote(config=self.config, model_config=self.model_config, replica_rank=self.replica_rank)
            await server.get_stats.remote()  # wait for the model to load
            self.servers = [server]
            self._server_handle = server
            self._server_address = name

        def rollout_worker_use_gpu(self) -> bool:
            return False

    return HFReplica


def _adapter_class():
    from verl.workers.rollout.base import BaseRollout

    class HFServerAdapter(BaseRollout):
        """In the FSDP training worker: forwards weight updates to the replica's server.

        Every rank iterates the weight generator (the FSDP2 full-tensor gather is
        collective); only rank 0 of each replica keeps the tensors and sends them.
        """

        def __init__(self, config, model_config, device_mesh, replica_rank: int = -1):
            super().__init__(config, model_config, device_mesh)
            rank = int(os.environ.get("RANK", 0))
            world = self.config.tensor_model_parallel_size * self.config.data_parallel_size
            self.replica_rank = rank // world if replica_rank == -1 else replica_rank
            self.rollout_rank = rank % world
            self.is_leader_rank = self.rollout_rank == 0
            self._server = None

        def _server_handle(self):
            if self._server is None:
                self._server = ray.get_actor(_server_name(self.replica_rank))
            return self._server

        async def resume(self, tags: list[str]):
            return None

        async def release(self):
            return None

        @torch.no_grad()
        async def update_weights(
            self,
            weights: Generator[tuple[str, torch.Tensor], None, None],
            wire_format: str = "named_tensors",
            global_steps: Optional[int] = None,
            peft_config=None,
            **kwargs,
        ):
            if wire_format != "named_tensors":
                raise NotImplementedError(f"hf rollout supports wire_format='named_tensors' only, got {wire_format!r}")
            if peft_config is not None:
                raise NotImplementedError("hf rollout: LoRA adapters are not supported; set model.lora.merge=True")
            state: dict[str, torch.Tensor] = {}
            for name, tensor in weights:
                if self.is_leader_rank:
                    state[name] = tensor.detach().to("cpu", copy=True).contiguous()
            if self.is_leader_rank:
                await self._server_handle().update_weights.remote(state, global_steps)

    return HFServerAdapter


def __getattr__(name: str):
    # Classes that subclass verl types are built lazily so that importing this module
    # (done while verl itself is importing, through the plugin entry point) stays cheap.
    if name == "HFReplica":
        return _cached(_replica_class)()
    if name == "HFServerAdapter":
        return _cached(_adapter_class)()
    raise AttributeError(name)


def register() -> None:
    """Register ``hf`` in verl's rollout registries (idempotent, cheap: loaders are lazy).

    - ``RolloutReplicaRegistry`` -> :class:`HFReplica` (used by ``LLMServerManager``);
    - ``verl.workers.rollout.base._ROLLOUT_REGISTRY[("hf", "async")]`` ->
      :class:`HFServerAdapter` (built inside the training worker).
    """
    from verl.workers.rollout import base as rollout_base
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    RolloutReplicaRegistry.register(ROLLOUT_NAME, _cached(_replica_class))
    rollout_base._ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = f"{__name__}.HFServerAdapter"


_CACHE: dict = {}


def _cached(factory):
    def load():
        if factory not in _CACHE:
            _CACHE[factory] = factory()
        return _CACHE[factory]

    return load
