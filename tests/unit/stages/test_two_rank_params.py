"""The worker's parameter methods on 2 FSDP2 ranks (torch.multiprocessing + gloo, no Ray):
reference sync, reference save / load and the LoRR snapshot / reset, checked against full
tensors (``DTensor.full_tensor()``).

The models are tiny Qwen2 causal LMs with tied embeddings (as ``recipe.models`` builds
them), sharded as verl 0.9.1's FSDP2 engine does (``verl.utils.fsdp_utils.apply_fsdp2``:
``fully_shard`` on each decoder layer, then on the root; the reference with a CPU offload
policy, as verl's ``forward_only`` engines). The root unit holds
``model.embed_tokens.weight`` (= ``lm_head.weight``) and ``model.norm.weight``. Every
method is called right after a no-grad forward (verl's old-log-prob / reference passes;
verl reshards the root after an eval pass only when ``fsdp_size > 1``, default -1), in
each of the three states ``fully_shard``'s ``reshard_after_forward`` leaves the modules in
(:data:`MODES`, torch 2.13):

- ``True``, verl's default (``fsdp_config.reshard_after_forward: true``): every unit,
  the root included, is sharded again;
- ``None``, torch's default: the root unit stays unsharded (its parameters full-size
  plain tensors, whose writes the next reshard drops);
- ``False`` (``fsdp_config.reshard_after_forward=false``): every unit stays unsharded.

Before the worker resharded first, the last two failed: the sync's writes into unsharded
parameters were lost, theta_0 and the saved reference held full tensors, not shards.

The worker is built without ``__init__`` with ``actor`` / ``ref`` handles around the two
modules, as in ``test_workers.py``.
"""

from __future__ import annotations

import datetime
import os
import re
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
PATTERN = r"down_proj|model\.norm\.weight"  # per-layer units and a root parameter
ROOT = ("model.norm.weight", "model.embed_tokens.weight")
LAYER = "model.layers.0.mlp.down_proj.weight"
#: fully_shard's reshard_after_forward: what a no-grad forward leaves sharded
MODES = {True: "every unit sharded", None: "the root unit unsharded", False: "every unit unsharded"}


def tiny_lm(seed: int) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                         tie_word_embeddings=True, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # Qwen2 initialises RMSNorm weights to 1: make the root's norm distinct
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def shard(model: torch.nn.Module, mesh, *, offload: bool, reshard_after_forward: bool | None) -> torch.nn.Module:
    """FSDP2 as verl 0.9.1's engine applies it (``apply_fsdp2``, float32 as conf/device/cpu.yaml)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy
    from verl.utils.fsdp_utils import apply_fsdp2

    kwargs = {"mesh": mesh, "reshard_after_forward": reshard_after_forward,
              "mp_policy": MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                                cast_forward_inputs=True),
              "offload_policy": CPUOffloadPolicy(pin_memory=False) if offload else None}
    apply_fsdp2(model, kwargs, {})
    return model


def reshard_all(module) -> None:
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def full(module) -> dict[str, torch.Tensor]:
    """Every parameter as a full tensor (collective: every rank calls it in the same order)."""
    reshard_all(module)
    return {n: p.full_tensor().detach().clone() for n, p in module.named_parameters()}


def eval_pass(module, ids, mode: bool | None) -> None:
    """A no-grad forward (verl's log-prob passes), leaving the units as :data:`MODES` says."""
    from torch.distributed.tensor import DTensor

    with torch.no_grad():
        module(input_ids=ids)
    params = dict(module.named_parameters())
    sharded = (isinstance(params["model.norm.weight"], DTensor), isinstance(params[LAYER], DTensor))
    assert sharded == (mode is True, mode is not False), f"reshard_after_forward={mode}: {sharded}"


def check(rank: int, folder: str, mode: bool | None) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from recipe.stages.workers import REFERENCE_FILE, RecipeActorRolloutRefWorker

    mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("fsdp",))
    actor = shard(tiny_lm(seed=1), mesh, offload=False, reshard_after_forward=mode)
    ref = shard(tiny_lm(seed=0), mesh, offload=True, reshard_after_forward=mode)
    optimizer = torch.optim.AdamW(actor.parameters(), lr=0.05)
    w = RecipeActorRolloutRefWorker.__new__(RecipeActorRolloutRefWorker)
    w.actor = SimpleNamespace(engine=SimpleNamespace(module=actor, optimizer=optimizer))
    w.ref = SimpleNamespace(engine=SimpleNamespace(module=ref, optimizer=None))
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(rank))
    names = [n for n, _ in actor.named_parameters()]
    assert set(ROOT) <= set(names)

    # --- reference sync: reference := actor, root parameters included
    before = full(ref)
    assert any(not torch.equal(before[n], v) for n, v in full(actor).items())
    eval_pass(actor, ids, mode)
    eval_pass(ref, ids, mode)
    assert w.recipe_sync_reference() == len(names)
    want = full(actor)
    got = full(ref)
    for n in names:
        assert torch.equal(got[n], want[n]), f"reference {n} differs from the actor's after the sync"
    eval_pass(ref, ids, mode)  # the copy survives the next pass and reshard
    got = full(ref)
    assert all(torch.equal(got[n], want[n]) for n in names)

    # --- LoRR: snapshot, one optimizer step, reset with alpha = 0.5
    eval_pass(actor, ids, mode)
    snap = w.recipe_lorr_snapshot(PATTERN)
    theta0 = full(actor)
    matching = [n for n in names if re.search(PATTERN, n)]
    assert "model.norm.weight" in matching and snap["tensors"] == len(matching)
    assert sorted(w._theta0) == sorted(matching)
    for n in matching:  # theta_0 holds this rank's shard, not a full tensor
        assert w._theta0[n].numel() < theta0[n].numel(), n
    actor(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    theta = full(actor)
    assert all(not torch.equal(theta[n], theta0[n]) for n in matching)
    eval_pass(actor, ids, mode)
    out = w.recipe_lorr_reset(0.5, PATTERN, reset_optimizer=True)
    assert sorted(out["changed"]) == sorted(matching)
    new = full(actor)
    for n in names:
        expected = 0.5 * theta[n] + 0.5 * theta0[n] if n in matching else theta[n]
        assert torch.equal(new[n], expected), f"{n} after the reset"
    # delta_norm is this rank's part: the squares over ranks add up to the full delta's
    sq = torch.tensor(out["delta_norm"] ** 2, dtype=torch.float64)
    dist.all_reduce(sq)
    full_sq = sum(float((new[n].double() - theta[n].double()).pow(2).sum()) for n in matching)
    assert float(sq) == pytest.approx(full_sq, rel=1e-5)
    params = dict(actor.named_parameters())  # the sharded parameters: the optimizer's keys
    assert all(params[n] not in optimizer.state for n in matching)
    assert all(params[n] in optimizer.state for n in names if n not in matching)

    # --- reference save / load inside an iteration: exact restore of the full tensors
    eval_pass(ref, ids, mode)
    saved = full(ref)
    eval_pass(ref, ids, mode)
    fp = w.recipe_reference_save(folder)
    state = torch.load(os.path.join(folder, REFERENCE_FILE.format(rank=rank)), weights_only=True)
    assert state["model.norm.weight"].shape == (16 // WORLD,), "the file holds a full tensor, not the shard"
    eval_pass(actor, ids, mode)
    w.recipe_sync_reference()  # reference := the reset actor: other weights
    assert any(not torch.equal(v, saved[n]) for n, v in full(ref).items())
    eval_pass(ref, ids, mode)
    assert w.recipe_reference_load(folder) == fp
    got = full(ref)
    for n in names:
        assert torch.equal(got[n], saved[n]), f"reference {n} not restored"
    eval_pass(ref, ids, mode)
    got = full(ref)
    assert all(torch.equal(got[n], saved[n]) for n in names)


def run_rank(rank: int, init_file: str, folder: str, modes: list[bool | None]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        for mode in modes:
            sub = os.path.join(folder, f"reshard_after_forward_{mode}")
            os.makedirs(sub, exist_ok=True)
            try:
                check(rank, sub, mode)
            except Exception as e:
                raise AssertionError(f"reshard_after_forward={mode} ({MODES[mode]} after a forward): {e}") from e
    finally:
        dist.destroy_process_group()


def test_parameter_methods_on_two_fsdp2_ranks(tmp_path):
    """One pair of processes runs the three modes (start-up dominates: ~10 s in all)."""
    mp.spawn(run_rank, args=(str(tmp_path / "pg_init"), str(tmp_path), list(MODES)), nprocs=WORLD, join=True)
