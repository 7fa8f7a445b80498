"""This project's actor worker: verl's ``ActorRolloutRefWorker`` plus the methods iterative
DPO and LoRR need inside verl's FSDP worker graph (verl has none of them).

:class:`RecipeActorRolloutRefWorker` is used instead of verl's worker only when an enabled
stage asks for it (``Stage.worker_class``; the preference stage does).
Its extra methods are registered with verl's ``Dispatch.ONE_TO_ALL``: the trainer calls them
on the worker group and every rank acts on its own FSDP shard. The ones that read or write
parameters first reshard every FSDP2 unit (:func:`reshard_`; a no-grad forward can leave
units unsharded, see there), through the module-level functions
:func:`sharded_named_parameters`, :func:`copy_parameters_` and :func:`lorr_reset_module_`
(tested on 2 gloo ranks without Ray: ``tests/unit/stages/test_two_rank_params.py``).

- :meth:`~RecipeActorRolloutRefWorker.recipe_set_preference_loss`: replace verl's PPO loss
  (``verl.workers.utils.losses.ppo_loss``) by :func:`preference_loss` (DPO / IPO / SimPO +
  the LoRR SFT term, :mod:`recipe.algos.preference`).
- :meth:`~RecipeActorRolloutRefWorker.recipe_sync_reference`: reference model := current
  policy (iterative DPO's reference, "the policy at the start of the iteration").
- :meth:`~RecipeActorRolloutRefWorker.recipe_lorr_snapshot` /
  :meth:`~RecipeActorRolloutRefWorker.recipe_lorr_reset`: keep theta_0 of the parameters
  matching a pattern (each rank its own shard, in CPU memory) and apply
  theta <- alpha * theta + (1 - alpha) * theta_0 (LoRR, arXiv 2508.06412), optionally
  clearing the optimizer state of the reset parameters.
- :meth:`~RecipeActorRolloutRefWorker.recipe_lorr_save` / ``recipe_lorr_load``: theta_0 with
  verl's checkpoints (``global_step_N/lorr_theta0_rank{r}.pt``).
"""

from __future__ import annotations

import hashlib
import os
from functools import partial
from typing import Any

import torch

from recipe.algos.lorr import reset_named_parameters_, snapshot
from recipe.algos.preference import preference_microbatch_loss
from recipe.config import PreferenceConfig
from recipe.io import atomic_torch_save
from verl.single_controller.base.decorator import Dispatch, register
from verl.utils.metric import AggregationType, Metric
from verl.workers.engine_workers import ActorRolloutRefWorker
from verl.workers.utils.padding import no_padding_2_padding

#: Per-row fields the trainer writes for the preference loss (``[B]`` each).
PAIR_FIELDS = ("pair_id", "is_chosen", "sft_weight", "num_pairs")
THETA0_FILE = "lorr_theta0_rank{rank}.pt"
REFERENCE_FILE = "reference_rank{rank}.pt"


def preference_loss(config, model_output, data, dp_group=None, *, pref: PreferenceConfig):
    """verl actor loss (``loss_fn(config, model_output, data, dp_group)``, as ``ppo_loss``)
    for preference optimisation on one micro-batch.

    Args:
        config: verl ``ActorConfig`` (unused apart from the signature).
        model_output: ``{"log_probs": ...}`` from verl's engine (padded or remove-padding
            layout; converted with verl's ``no_padding_2_padding``).
        data: the micro-batch ``TensorDict``: ``response_mask`` ``[b, T]``, ``ref_log_prob``
            ``[b, T]`` (reference-based losses) and the per-row fields :data:`PAIR_FIELDS`:
            ``pair_id`` int64 (-1 on padding rows), ``is_chosen`` bool, ``sft_weight``
            float (lambda_k), ``num_pairs`` float (real pairs in the global mini-batch).
        pref: the preference settings.

    Returns:
        ``(loss, metrics)``: the micro-batch's share of the mini-batch mean loss (times the
        data-parallel size, as verl averages gradients over ranks) and ``dpo/*``,
        ``lorr/sft_loss`` metrics.

    Raises:
        ValueError: a pair split across micro-batches, or a missing reference.
    """
    log_prob = no_padding_2_padding(model_output["log_probs"], data)
    fields = ["response_mask", *PAIR_FIELDS] + (["ref_log_prob"] if pref.needs_reference else [])
    missing = [f for f in fields if f not in data.keys()]
    if missing:
        raise ValueError(f"preference loss: the micro-batch lacks {missing} (written by recipe.stages.preference)")
    td = data.select(*fields).to_padded_tensor()
    num_pairs = max(int(round(float(td["num_pairs"].reshape(-1)[0]))) if len(td) else 0, 1)
    dp_size = int(data["dp_size"]) if "dp_size" in data.keys() else 1
    loss, metrics = preference_microbatch_loss(
        log_prob=log_prob,
        ref_log_prob=td["ref_log_prob"] if pref.needs_reference else None,
        response_mask=td["response_mask"],
        pair_id=td["pair_id"].reshape(-1).long(),
        is_chosen=td["is_chosen"].reshape(-1).bool(),
        sft_weight=td["sft_weight"].reshape(-1).float(),
        cfg=pref,
        num_pairs=num_pairs,
        dp_size=dp_size,
    )
    return loss, micro_batch_metrics(metrics, loss, num_pairs=num_pairs, dp_size=dp_size)


#: Per-pair metrics of :func:`recipe.algos.preference.preference_microbatch_loss` (means over
#: a micro-batch's pairs there).
PAIR_METRICS = ("dpo/reward_margin", "dpo/reward_accuracy", "dpo/chosen_logps", "dpo/rejected_logps", "dpo/loss",
                "lorr/sft_loss", "lorr/sft_weight")


def micro_batch_metrics(metrics: dict[str, float], loss: torch.Tensor, num_pairs: int, dp_size: int) -> dict:
    """verl ``Metric`` objects of one micro-batch whose aggregation is the mean over every
    pair of the mini-batch, on any number of ranks.

    verl aggregates a ``SUM`` metric as the sum over micro-batches of the mean over data-
    parallel ranks, and requires every rank to report every key the same number of times.
    So each per-pair metric is reported as this micro-batch's share, mean x pairs here /
    ``num_pairs`` x ``dp_size`` (0 for a micro-batch of padding rows only): summed over
    micro-batches and averaged over ranks it is the mean over all ``num_pairs`` pairs, even
    when the ranks hold different numbers of real pairs (2 ranks, 3 pairs).

    Args:
        metrics: :func:`preference_microbatch_loss`'s metrics (per-pair means, and
            ``dpo/pairs_in_micro_batch``).
        loss: the micro-batch loss (reported as ``actor/pg_loss``, summed).
        num_pairs: real pairs of the global mini-batch (>= 1).
        dp_size: data-parallel ranks.

    Returns:
        ``{name: Metric}`` with the same keys for every micro-batch.
    """
    n = float(metrics.get("dpo/pairs_in_micro_batch", 0.0))
    share = n / num_pairs * dp_size
    out = {key: Metric(value=float(metrics.get(key, 0.0)) * share, aggregation=AggregationType.SUM)
           for key in PAIR_METRICS}
    out["dpo/pairs_in_micro_batch"] = Metric(value=n, aggregation=AggregationType.MEAN)
    out["actor/pg_loss"] = Metric(value=loss.detach().item(), aggregation=AggregationType.SUM)
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of an FSDP2 ``DTensor`` parameter (the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


def reshard_(module: torch.nn.Module) -> None:
    """Reshard every FSDP2 unit of ``module`` (``FSDPModule.reshard()``, not recursive itself,
    so on each unit); no-op for units already sharded and for modules without FSDP2.

    After a no-grad forward FSDP2 leaves units unsharded unless they reshard after forward:
    with torch's default ``reshard_after_forward=None`` the root unit (embeddings, final
    norm), with verl's ``fsdp_config.reshard_after_forward=false`` every unit. Their
    parameters are then full-size plain tensors whose storage the next reshard frees, so
    writes into them are lost and their shapes are not the shards'.
    """
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def sharded_named_parameters(module: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """``(name, this rank's shard)`` of every parameter, after :func:`reshard_`: the local
    tensors are views of the sharded parameters' storage (writes go through)."""
    reshard_(module)
    return [(name, _local(p.data)) for name, p in module.named_parameters()]


@torch.no_grad()
def copy_parameters_(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str,
                     target: str = "the reference model", hint: str = "") -> int:
    """Copy ``state`` (name -> this rank's shard, e.g. another module's
    :func:`sharded_named_parameters` or a saved file) into ``module``'s shards, in place.

    Args:
        module: the destination (FSDP2 or plain).
        state: a tensor for every parameter of ``module``, each the shape of its local shard
            (any dtype / device: cast on copy).
        source, target: what ``state`` and ``module`` are, for the error messages.
        hint: appended to the shape-mismatch message (a likely cause).

    Returns:
        The number of tensors copied.

    Raises:
        RuntimeError: the names differ (the first 5 of the symmetric difference are named), or
            a shard's shape does.
    """
    dst = sharded_named_parameters(module)
    diff = sorted(set(state) ^ {n for n, _ in dst})
    if diff:
        raise RuntimeError(f"{source} and {target} differ in parameters: {diff[:5]}")
    for name, t in dst:
        if t.shape != state[name].shape:
            raise RuntimeError(f"{name}: shard of shape {tuple(state[name].shape)} in {source}, {tuple(t.shape)} in "
                               f"{target}{hint}")
    for name, t in dst:
        t.copy_(state[name])
    return len(dst)


@torch.no_grad()
def lorr_reset_module_(module: torch.nn.Module, theta0: dict[str, torch.Tensor], alpha: float, pattern: str,
                       optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """LoRR's reset on ``module``'s shards: theta <- alpha * theta + (1 - alpha) * theta_0 on
    the parameters matching ``pattern`` (:func:`recipe.algos.lorr.reset_named_parameters_`),
    after :func:`reshard_`.

    Args:
        module: the actor (FSDP2 or plain).
        theta0: this rank's shards of theta_0 (:func:`recipe.algos.lorr.snapshot` of
            :func:`sharded_named_parameters`).
        alpha: in [0, 1]. pattern: regex searched in parameter names.
        optimizer: when given, the state (Adam moments, step) of the reset parameters is
            cleared.

    Returns:
        ``{"changed": names, "delta_norm": ||theta_new - theta_old||_2 over this rank's
        shards}`` (the squares add up over ranks to the full tensors').
    """
    named = sharded_named_parameters(module)
    before = {n: t.detach().clone() for n, t in named if n in theta0}
    changed = reset_named_parameters_(named, theta0, alpha, pattern)
    now = dict(named)
    delta = sum(float((now[n].float() - before[n].float()).pow(2).sum()) for n in changed) ** 0.5
    if optimizer is not None:
        params = dict(module.named_parameters())  # resharded: the optimizer's keys
        for name in changed:
            optimizer.state.pop(params[name], None)
    return {"changed": changed, "delta_norm": delta}


def theta0_fingerprint(theta0: dict[str, torch.Tensor]) -> str:
    """sha1 over the names and bytes of a snapshot of parameters (theta_0, the reference
    model): equal on an exact restore."""
    h = hashlib.sha1()
    for name in sorted(theta0):
        h.update(name.encode())
        h.update(theta0[name].detach().cpu().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class RecipeActorRolloutRefWorker(ActorRolloutRefWorker):
    """verl's actor / rollout / reference worker plus the methods listed in the module doc."""

    _theta0: dict[str, torch.Tensor] | None = None

    def _shard_rank(self) -> int:
        return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def recipe_set_preference_loss(self, pref: dict[str, Any]) -> str:
        """Train the actor with :func:`preference_loss` instead of verl's PPO loss.

        Args:
            pref: the ``preference`` config node as a dict (:class:`PreferenceConfig`).

        Returns:
            The loss name.
        """
        cfg = PreferenceConfig.from_config(pref)
        actor_config = self.loss_fn.keywords.get("config") if isinstance(self.loss_fn, partial) else None
        self.loss_fn = partial(preference_loss, config=actor_config, pref=cfg)
        self.actor.set_loss_fn(self.loss_fn)
        return cfg.loss

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    @torch.no_grad()
    def recipe_sync_reference(self) -> int:
        """Copy the actor's parameters into the reference model (same names and shards).

        Returns:
            The number of parameter tensors copied.

        Raises:
            RuntimeError: no colocated reference model, or the two models differ.
        """
        if getattr(self, "ref", None) is None or getattr(self, "actor", None) is None:
            raise RuntimeError("recipe_sync_reference: this worker holds no reference model next to the actor "
                               "(preference.reference=iteration_start needs actor_rollout_ref.actor.use_kl_loss=true "
                               "and the reference colocated with the actor)")
        src = dict(sharded_named_parameters(self.actor.engine.module))
        return copy_parameters_(self.ref.engine.module, src, source="the actor (recipe_sync_reference)",
                                hint=" (sharded differently)")

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    @torch.no_grad()
    def recipe_reference_save(self, folder: str) -> str:
        """Write this rank's shards of the reference model to ``folder/reference_rank{r}.pt``
        (a checkpoint taken inside an iteration: the reference is then the policy of the
        iteration's start, which no other file holds).

        Returns:
            The saved tensors' fingerprint.
        """
        state = {name: t.detach().cpu().clone() for name, t in sharded_named_parameters(self.ref.engine.module)}
        atomic_torch_save(state, os.path.join(folder, REFERENCE_FILE.format(rank=self._shard_rank())))
        return theta0_fingerprint(state)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    @torch.no_grad()
    def recipe_reference_load(self, folder: str) -> str | None:
        """Copy ``folder/reference_rank{r}.pt`` (:meth:`recipe_reference_save`) into this rank's
        reference shards.

        Returns:
            The fingerprint of the restored tensors, or None when the file is absent.

        Raises:
            RuntimeError: the file's parameters or shard shapes differ from the reference's.
        """
        path = os.path.join(folder, REFERENCE_FILE.format(rank=self._shard_rank()))
        if not os.path.exists(path):
            return None
        state = torch.load(path, weights_only=True)
        copy_parameters_(self.ref.engine.module, state, source=path, hint=" (saved with another number of ranks?)")
        return theta0_fingerprint(state)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    @torch.no_grad()
    def recipe_lorr_snapshot(self, pattern: str) -> dict[str, Any]:
        """Keep theta_0: CPU copies of this rank's shards of the actor parameters whose name
        matches ``pattern`` (regex search).

        Returns:
            ``{"tensors": n, "numel": elements, "fingerprint": sha1}`` of this rank's snapshot.

        Raises:
            ValueError: no parameter matches ``pattern`` (names ``lorr.reset.pattern``).
        """
        self._theta0 = snapshot(sharded_named_parameters(self.actor.engine.module), pattern)
        if not self._theta0:
            names = [n for n, _ in self.actor.engine.module.named_parameters()][:8]
            raise ValueError(f"lorr.reset.pattern={pattern!r} matches no actor parameter (e.g. {names})")
        return {"tensors": len(self._theta0), "numel": sum(t.numel() for t in self._theta0.values()),
                "fingerprint": theta0_fingerprint(self._theta0)}

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    @torch.no_grad()
    def recipe_lorr_reset(self, alpha: float, pattern: str, reset_optimizer: bool = False) -> dict[str, Any]:
        """theta <- alpha * theta + (1 - alpha) * theta_0 on the matching parameters (LoRR's
        shrink-and-perturb reset towards the initial weights).

        Args:
            alpha: interpolation weight of the current weights in [0, 1] (1: no change).
            pattern: regex on parameter names (default ``down_proj``).
            reset_optimizer: also clear the optimizer state (Adam moments, step) of the reset
                parameters.

        Returns:
            ``{"changed": names, "delta_norm": ||theta_new - theta_old||_2 on this rank}``.

        Raises:
            RuntimeError: no snapshot was taken.
        """
        if self._theta0 is None:
            raise RuntimeError("recipe_lorr_reset before recipe_lorr_snapshot")
        return lorr_reset_module_(self.actor.engine.module, self._theta0, alpha, pattern,
                                  self.actor.engine.optimizer if reset_optimizer else None)

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def recipe_lorr_save(self, folder: str) -> str:
        """Write this rank's theta_0 to ``folder/lorr_theta0_rank{r}.pt``; returns the path."""
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, THETA0_FILE.format(rank=self._shard_rank()))
        atomic_torch_save(self._theta0 or {}, path)
        return path

    @register(dispatch_mode=Dispatch.ONE_TO_ALL)
    def recipe_lorr_load(self, folder: str) -> str | None:
        """Restore this rank's theta_0 from ``folder`` (written by :meth:`recipe_lorr_save`).

        Returns:
            The snapshot's fingerprint, or None when the file is absent (the snapshot taken at
            start-up, from ``actor_rollout_ref.model.path``, is kept).
        """
        path = os.path.join(folder, THETA0_FILE.format(rank=self._shard_rank()))
        if not os.path.exists(path):
            return None
        self._theta0 = torch.load(path, weights_only=True)
        return theta0_fingerprint(self._theta0)
