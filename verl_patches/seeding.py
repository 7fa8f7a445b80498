"""Per-response sampling seeds for verl's agent loop (what verl 0.9.1 lacks for same-seed runs).

verl's agent loop sends each response (one ``session`` of a prompt's ``n``) to the rollout
server with the step's sampling parameters and no seed: vLLM then draws from one engine-wide
generator, and which random numbers a response gets depends on what else is in the batch and
on arrival order; verl's ``rollout.full_determinism`` gives every request of a replica the
same seed. This patch gives every response its own seed,

    seed = sha256(f"{rollout.seed}:{uid}:{session}")[:8] (63 bits),

where ``uid`` is the prompt's group id and ``session`` the sample index in ``[0, n)``. The
trainer (:mod:`recipe.stages.trainer`) makes uids deterministic (``t<step>-<k>``, ``v<step>-<k>``
for validation), so the same run seed gives the same seeds in every run, and a response
does not depend on batch composition or arrival order. The seed travels in
``sampling_params["seed"]``: vLLM's ``SamplingParams.seed`` (verl's vLLM server passes
unknown keys through) and the ``hf`` backend's per-row generators
(:mod:`verl_patches.hf_rollout`).

The wrap is at ``AgentLoopWorker._run_agent_loop``, so every agent loop (single-turn, tool)
gets it; a seed already in the sampling parameters is kept. Off with
``actor_rollout_ref.rollout.custom.per_response_seeds=false``.

The same wrap adds the end-of-turn stop ids (issue 16): ``sampling_params["stop_token_ids"]``
gets :func:`verl_patches.hf_rollout.turn_stop_token_ids` of the worker's tokenizer and
generation config (the EOS ids plus ``<|im_end|>`` when the chat template ends turns with
it), merged with any ids already there. verl 0.9.1 sends no stop ids, so vLLM stops only on
the model's EOS, which for Qwen2.5 base models is ``<|endoftext|>`` alone: a ChatML-prompted
base model could run past ``<|im_end|>`` into an invented next turn. vLLM's server passes
the key through to ``SamplingParams.stop_token_ids``; the ``hf`` backend adds them to its
own stop ids. Off with ``actor_rollout_ref.rollout.custom.stop_at_turn_end=false``.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

#: ``rollout.custom`` key switching the patch off for a run.
SWITCH = "per_response_seeds"
#: ``rollout.custom`` key switching the end-of-turn stop ids off for a run.
STOP_SWITCH = "stop_at_turn_end"


def response_seed(run_seed: int, uid: str, session: int) -> int:
    """The sampling seed of one response.

    Args:
        run_seed: ``actor_rollout_ref.rollout.seed`` (the run seed by default).
        uid: The prompt's group id (``uid`` column).
        session: Sample index of the response within its group, ``0 <= session < n``.

    Returns:
        An int in ``[0, 2**63)`` (fits vLLM's ``SamplingParams.seed`` and ``torch.Generator``).
    """
    digest = hashlib.sha256(f"{int(run_seed)}:{uid}:{int(session)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def seeded_params(sampling_params: dict[str, Any], rollout_config, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``sampling_params`` plus ``seed`` for the response described by the agent-loop
    ``kwargs`` (``uid``, ``session_id``); unchanged when a seed is already set, the row has
    no uid, or the patch is switched off in ``rollout.custom``."""
    custom = _get(rollout_config, "custom") or {}
    if "seed" in sampling_params or "uid" not in kwargs or not _get(custom, SWITCH, True):
        return sampling_params
    run_seed = _get(rollout_config, "seed", 0)
    run_seed = 0 if run_seed is None else run_seed
    return dict(sampling_params, seed=response_seed(run_seed, str(kwargs["uid"]), int(kwargs.get("session_id", 0))))


def stop_params(sampling_params: dict[str, Any], rollout_config, stop_ids: list[int]) -> dict[str, Any]:
    """``sampling_params`` with ``stop_token_ids`` = its own ids plus ``stop_ids`` (order kept,
    no duplicates); unchanged when ``stop_ids`` is empty or ``rollout.custom.stop_at_turn_end``
    is false."""
    custom = _get(rollout_config, "custom") or {}
    if not stop_ids or not _get(custom, STOP_SWITCH, True):
        return sampling_params
    merged = list(dict.fromkeys([int(t) for t in (sampling_params.get("stop_token_ids") or [])] + list(stop_ids)))
    return dict(sampling_params, stop_token_ids=merged)


def worker_stop_ids(worker) -> list[int]:
    """The end-of-turn stop ids of an ``AgentLoopWorker`` (its tokenizer and generation config), cached."""
    cached = getattr(worker, "_recipe_turn_stop_ids", None)
    if cached is None:
        from verl_patches.hf_rollout import turn_stop_token_ids

        model_config = getattr(worker, "model_config", None)
        gen_cfg = getattr(model_config, "generation_config", None)
        cached = turn_stop_token_ids(getattr(worker, "tokenizer", None), getattr(gen_cfg, "eos_token_id", None))
        worker._recipe_turn_stop_ids = cached
    return cached


def _get(node, key: str, default=None):
    if node is None:
        return default
    if isinstance(node, dict):
        return node.get(key, default)
    return node.get(key, default) if hasattr(node, "get") else getattr(node, key, default)


def _seeding(original):
    @functools.wraps(original)
    async def _run_agent_loop(self, sampling_params, trajectory, *args, **kwargs):
        params = seeded_params(sampling_params, self.rollout_config, kwargs)
        params = stop_params(params, self.rollout_config, worker_stop_ids(self))
        return await original(self, params, trajectory, *args, **kwargs)

    return _run_agent_loop


def apply() -> None:
    """Wrap ``AgentLoopWorker._run_agent_loop`` to add per-response seeds and end-of-turn stop ids (idempotent)."""
    from verl.experimental.agent_loop import agent_loop

    method = agent_loop.AgentLoopWorker._run_agent_loop
    if getattr(method, "__verl_patches__", False):
        return
    wrapped = _seeding(method)
    wrapped.__verl_patches__ = True
    agent_loop.AgentLoopWorker._run_agent_loop = wrapped
