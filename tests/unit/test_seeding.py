"""Tests for ``verl_patches.seeding``: per-response sampling seeds in verl's agent loop."""

from __future__ import annotations

import asyncio
import hashlib

from omegaconf import OmegaConf

from verl_patches import seeding


def test_response_seed_formula_and_range():
    digest = hashlib.sha256(b"7:t3-12:2").digest()
    assert seeding.response_seed(7, "t3-12", 2) == int.from_bytes(digest[:8], "big") >> 1
    seeds = {seeding.response_seed(0, f"t1-{k}", s) for k in range(50) for s in range(8)}
    assert len(seeds) == 400, "distinct per (uid, session)"
    assert all(0 <= x < 2**63 for x in seeds)
    assert seeding.response_seed(1, "t1-0", 0) != seeding.response_seed(0, "t1-0", 0), "the run seed matters"


def test_seeded_params_adds_seed_once():
    cfg = OmegaConf.create({"seed": 5, "custom": None})
    sp = {"temperature": 1.0}
    out = seeding.seeded_params(sp, cfg, {"uid": "t1-0", "session_id": 3})
    assert out == {"temperature": 1.0, "seed": seeding.response_seed(5, "t1-0", 3)}
    assert sp == {"temperature": 1.0}, "the caller's dict is not mutated"
    assert seeding.seeded_params({"seed": 9}, cfg, {"uid": "t1-0", "session_id": 3}) == {"seed": 9}
    assert seeding.seeded_params(sp, cfg, {"session_id": 3}) is sp, "no uid: unchanged"
    off = OmegaConf.create({"seed": 5, "custom": {"per_response_seeds": False}})
    assert seeding.seeded_params(sp, off, {"uid": "t1-0", "session_id": 3}) is sp
    none_seed = OmegaConf.create({"seed": None})
    assert seeding.seeded_params(sp, none_seed, {"uid": "u", "session_id": 0})["seed"] == seeding.response_seed(0, "u", 0)


def test_patch_wraps_verls_agent_loop_worker():
    from verl.experimental.agent_loop import agent_loop

    seeding.apply()
    seeding.apply()  # idempotent
    method = agent_loop.AgentLoopWorker._run_agent_loop
    assert method.__verl_patches__
    seen = {}

    async def original(self, sampling_params, trajectory, *, agent_name, trace=True, **kwargs):
        seen.update(sampling_params=sampling_params, kwargs=kwargs, agent_name=agent_name)
        return "out"

    class Worker:
        rollout_config = OmegaConf.create({"seed": 1})

    wrapped = seeding._seeding(original)
    out = asyncio.run(wrapped(Worker(), {"temperature": 1.0}, {"step": 1}, agent_name="single_turn_agent",
                              uid="t1-4", session_id=2, raw_prompt=[]))
    assert out == "out" and seen["agent_name"] == "single_turn_agent"
    assert seen["sampling_params"]["seed"] == seeding.response_seed(1, "t1-4", 2)
    assert seen["kwargs"]["uid"] == "t1-4"
