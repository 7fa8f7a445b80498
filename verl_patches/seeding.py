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
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

#: ``rollout.custom`` key switching the patch off for a run.
SWITCH = "per_response_seeds"


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


def _get(node, key: str, default=None):
    if node is None:
        return default
    if isinstance(node, dict):
        return node.get(key, default)
    return node.get(key, default) if hasattr(node, "get") else getattr(node, key, default)


def _seeding(original):
    @functools.wraps(original)
    async def _run_agent_loop(self, sampling_params, trajectory, *args, **kwargs):
        return await original(self, seeded_params(sampling_params, self.rollout_config, kwargs), trajectory,
                              *args, **kwargs)

    return _run_agent_loop


def apply() -> None:
    """Wrap ``AgentLoopWorker._run_agent_loop`` to add per-response seeds (idempotent)."""
    from verl.experimental.agent_loop import agent_loop

    method = agent_loop.AgentLoopWorker._run_agent_loop
    if getattr(method, "__verl_patches__", False):
        return
    wrapped = _seeding(method)
    wrapped.__verl_patches__ = True
    agent_loop.AgentLoopWorker._run_agent_loop = wrapped
