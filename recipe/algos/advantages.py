"""Outcome-reward advantage estimators of the Minimalist paper, registered with verl.

Paper: Xiong et al., "A Minimalist Approach to LLM Reasoning: from Rejection Sampling to
Reinforce", arXiv 2504.11343 (v2); public code RLHFlow/Minimal-RL. See docs/PAPERS.md §1.

Notation: a prompt x gets a *group* of n responses a_1..a_n (same ``uid``), each with one
outcome reward r_i (the sum of its token-level rewards). B = prompts x n responses, T =
response length. Every estimator returns the same scalar A_i on every valid token of
response i (``A_i * response_mask``), as verl's GRPO does.

Registered estimators (``algorithm.adv_estimator``), their option node and what they
reproduce (rows of the PAPERS.md §1 table):

* ``reinforce`` (options ``algorithm.reinforce.{baseline, std_norm, epsilon}``):
  "Reinforce" A = r with r in {-1, +1}; baseline=mean gives "Reinforce + mean-zero".
* ``reinforce_rej`` (same function, same ``algorithm.reinforce`` node): "Reinforce-Rej",
  A = r on the groups the group filter keeps; std_norm=true gives "Reinforce-Rej +
  std-norm"; baseline=mean with std_norm=true is "GRPO".
* ``raft`` (option ``algorithm.raft.threshold``): "RAFT", A = 1[r correct], used with the
  policy loss ``raft``.
* ``raft_pp`` (same function, same ``algorithm.raft`` node): "RAFT++", used with the policy
  loss ``raft_pp``.

The group filter of Reinforce-Rej (drop all-correct / all-wrong groups) is not an
advantage: it lives in ``recipe.algos.group_filter`` and runs on the batch before this.

verl calls a registered estimator as ``fn(token_level_rewards=[B, T], response_mask=[B, T],
config=<algorithm config>, index=<uid array, len B>)`` (``index`` only when the batch has a
``uid``; some estimators also get ``reward_baselines``) and stores the two returned tensors as
``advantages`` and ``returns``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, register_adv_est

__all__ = [
    "BASELINES",
    "compute_raft_advantage",
    "compute_reinforce_advantage",
    "outcome_rewards",
    "raft_advantage",
    "reinforce_advantage",
]

#: Accepted values of ``algorithm.reinforce.baseline``.
BASELINES = ("none", "mean")


def outcome_rewards(token_level_rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Sequence-level outcome reward r_i = sum_t token_level_rewards[i, t].

    The sum runs over all T positions, not only the masked ones, exactly as verl's GRPO
    (``compute_grpo_outcome_advantage``) does: verl puts the outcome reward on the last
    valid token, so both are the same for normal batches.

    Args:
        token_level_rewards: ``[B, T]`` float, the reward on each response token.
        response_mask: ``[B, T]`` (bool, int or float), 1 = response token. Used only to check
            the shape.

    Returns:
        ``[B]`` float32, r_i.
    """
    if token_level_rewards.shape != response_mask.shape:
        raise ValueError(
            f"token_level_rewards {tuple(token_level_rewards.shape)} and response_mask "
            f"{tuple(response_mask.shape)} must have the same [B, T] shape"
        )
    return token_level_rewards.sum(dim=-1).to(torch.float32)


def _group_ids(index: Sequence[Any] | np.ndarray, batch_size: int, device: torch.device) -> torch.Tensor:
    """Map group labels (uids) to contiguous ids 0..G-1 in order of first appearance; ``[B]`` long."""
    if index is None:
        raise ValueError("index (the uid of each response's prompt, len B) is required for reinforce")
    labels = index.tolist() if isinstance(index, (np.ndarray, torch.Tensor)) else list(index)
    if len(labels) != batch_size:
        raise ValueError(f"index has {len(labels)} entries but the batch has {batch_size} responses")
    ids: dict[Any, int] = {}
    gid = [ids.setdefault(label, len(ids)) for label in labels]
    return torch.tensor(gid, dtype=torch.long, device=device)


def _group_mean_std(r: torch.Tensor, gid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-response group mean and std, ``[B]`` each, with verl GRPO's conventions.

    std is torch.std's unbiased estimate sqrt(sum_j (r_j - mean)^2 / (n - 1)). A group of
    one response gets mean = 0 and std = 1 (verl's ``compute_grpo_outcome_advantage`` does
    exactly this, so its single response keeps A = r / (1 + eps)).
    """
    num_groups = int(gid.max().item()) + 1 if gid.numel() else 0
    zeros = torch.zeros(num_groups, dtype=r.dtype, device=r.device)
    count = zeros.index_add(0, gid, torch.ones_like(r))
    mean = zeros.index_add(0, gid, r) / count
    sq_dev = zeros.index_add(0, gid, (r - mean[gid]) ** 2)
    std = torch.sqrt(sq_dev / (count - 1).clamp_min(1.0))
    single = count == 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    return mean[gid], std[gid]


def reinforce_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: Sequence[Any] | np.ndarray | None,
    baseline: str = "none",
    std_norm: bool = False,
    epsilon: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reinforce advantage A_i = (r_i - b_i) / s_i, the same on every token of response i.

    Minimalist paper (arXiv 2504.11343 §3, Table "Reinforce" rows):

    * ``baseline="none"``, ``std_norm=False``: A_i = r_i (Reinforce; with the group filter,
      Reinforce-Rej). The paper uses r in {-1, +1}; with {0, 1} wrong answers get A = 0.
    * ``baseline="mean"``: A_i = r_i - mean_group(r) ("Reinforce + mean-zero").
    * ``std_norm=True``: divide by std_group(r) + epsilon ("Reinforce-Rej + std-norm" with
      baseline none; GRPO with baseline mean).

    Group statistics follow verl's ``compute_grpo_outcome_advantage`` exactly: torch.std
    (unbiased, n - 1), and a group of size 1 gets mean 0 and std 1. So ``baseline="mean",
    std_norm=True`` equals verl's GRPO and ``baseline="mean", std_norm=False`` equals GRPO
    with ``norm_adv_by_std_in_grpo=False`` (Dr. GRPO). An all-same group gets A = 0 under
    the mean baseline. Warning: ``baseline="none", std_norm=True`` divides r_i by
    (0 + epsilon) on an all-same group (|A| = 1e6 with +-1 rewards); the paper applies it
    only after the filter has removed such groups, and a warning is raised if one is seen.

    Args:
        token_level_rewards: ``[B, T]`` float, B = prompts x n; outcome reward on the last
            valid token.
        response_mask: ``[B, T]`` (bool/int/float), 1 = response token, 0 = padding after EOS.
        index: ``B`` group labels (verl's ``uid`` numpy object array of str). Required.
        baseline: ``"none"`` (b_i = 0) or ``"mean"`` (b_i = mean of r over i's group).
        std_norm: divide by the group std (+ ``epsilon``).
        epsilon: added to the std, as verl's GRPO (1e-6).

    Returns:
        ``(advantages, returns)``: both ``[B, T]`` float32, A_i * response_mask (the same
        tensor twice, as verl's outcome-only estimators return).

    Raises:
        ValueError: ``index`` is None or has the wrong length, or ``baseline`` is unknown.
    """
    if baseline not in BASELINES:
        raise ValueError(f"algorithm.reinforce.baseline must be one of {BASELINES}, got {baseline!r}")
    with torch.no_grad():
        r = outcome_rewards(token_level_rewards, response_mask)  # [B]
        gid = _group_ids(index, r.shape[0], r.device)
        if r.numel() == 0:
            adv = torch.zeros_like(token_level_rewards, dtype=torch.float32)
            return adv, adv
        mean, std = _group_mean_std(r, gid)  # [B], [B]
        # A_i = r_i - b_i,  b_i = 0 ("none") or mean_{j in group(i)} r_j ("mean")
        scores = r - mean if baseline == "mean" else r
        if std_norm:
            if baseline == "none" and bool((std == 0).any()):
                warnings.warn(
                    "reinforce with baseline=none and std_norm=true met a group whose rewards are "
                    f"all equal: its advantages are r / {epsilon:g}. Enable the group filter "
                    "(drop_all_correct and drop_all_wrong) as Reinforce-Rej does.",
                    RuntimeWarning,
                    stacklevel=2,
                )
            # A_i = (r_i - b_i) / (std_{j in group(i)} r_j + epsilon)
            scores = scores / (std + epsilon)
        adv = scores.unsqueeze(-1) * response_mask  # [B, T], zero after EOS
    return adv, adv


def raft_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    threshold: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RAFT / RAFT++ advantage A_i = 1[r_i > threshold]: 1.0 on correct responses, else 0.

    Minimalist paper (arXiv 2504.11343 §2, Table "RAFT", "RAFT++"): RAFT trains only on the
    responses with the maximal (correct) reward. The indicator works for {0, 1} and {-1, +1}
    rewards with the default threshold 0.5. The policy losses ``raft`` (plain NLL) and
    ``raft_pp`` (PPO clip) keep exactly the tokens with A > 0. The Minimal-RL code instead
    keeps r == max over the batch; with binary rewards that is the same unless no response
    in the batch is correct.

    Args:
        token_level_rewards: ``[B, T]`` float, B = prompts x n.
        response_mask: ``[B, T]`` (bool/int/float), 1 = response token.
        threshold: a response counts as correct when r_i > threshold.

    Returns:
        ``(advantages, returns)``: both ``[B, T]`` float32, 1[r_i > threshold] * response_mask.
    """
    with torch.no_grad():
        r = outcome_rewards(token_level_rewards, response_mask)  # [B]
        # A_i = 1[r_i > threshold]
        correct = (r > threshold).to(torch.float32)
        adv = correct.unsqueeze(-1) * response_mask  # [B, T]
    return adv, adv


# ---------------------------------------------------------------------------------------
# verl registry wrappers
# ---------------------------------------------------------------------------------------


def _get(obj: Any, key: str) -> Any:
    """``obj[key]`` for a DictConfig, dict, verl BaseConfig or dataclass; None when absent."""
    if obj is None:
        return None
    if isinstance(obj, Mapping) or hasattr(obj, "get"):
        try:
            return obj.get(key)
        except Exception:  # e.g. a struct DictConfig refusing an unknown key
            return None
    return getattr(obj, key, None)


def _option(config: Any, node: str, key: str, default: Any) -> Any:
    """Read ``config.<node>.<key>`` robustly; ``default`` when any level is missing or None."""
    value = _get(_get(config, node), key)
    return default if value is None else value


def compute_reinforce_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray | None = None,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl estimator ``reinforce`` / ``reinforce_rej``: :func:`reinforce_advantage` with
    options from ``config.reinforce``.

    Args:
        token_level_rewards: ``[B, T]`` float.
        response_mask: ``[B, T]``, 1 = response token.
        index: ``B`` uids (verl passes ``non_tensor_batch["uid"]``). Required.
        config: the ``algorithm`` config (DictConfig, dict, AlgoConfig or None). Options read
            from ``config.reinforce``: ``baseline`` ("none"), ``std_norm`` (false),
            ``epsilon`` (1e-6).
        **kwargs: other arguments verl may pass (``reward_baselines``...), ignored.

    Returns:
        ``(advantages, returns)``, both ``[B, T]``.
    """
    return reinforce_advantage(
        token_level_rewards,
        response_mask,
        index,
        baseline=str(_option(config, "reinforce", "baseline", "none")),
        std_norm=bool(_option(config, "reinforce", "std_norm", False)),
        epsilon=float(_option(config, "reinforce", "epsilon", 1e-6)),
    )


def compute_raft_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray | None = None,
    config: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """verl estimator ``raft`` / ``raft_pp``: :func:`raft_advantage` with options from
    ``config.raft``.

    Args:
        token_level_rewards: ``[B, T]`` float.
        response_mask: ``[B, T]``, 1 = response token.
        index: unused (RAFT needs no groups); accepted because verl passes it.
        config: the ``algorithm`` config. Option read from ``config.raft``: ``threshold`` (0.5).
        **kwargs: other arguments verl may pass, ignored.

    Returns:
        ``(advantages, returns)``, both ``[B, T]``.
    """
    threshold = _option(config, "raft", "threshold", 0.5)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
        raise ValueError(f"algorithm.raft.threshold must be a number, got {threshold!r}")
    return raft_advantage(token_level_rewards, response_mask, threshold=float(threshold))


def _register(name: str, fn: Any) -> None:
    """Register ``fn`` under ``name`` once.

    A plain second import is a no-op (Python caches modules). After ``importlib.reload`` the
    function objects are new, and verl's ``register_adv_est`` would refuse them: our own stale
    entry (same module and qualified name) is replaced; any other owner of the name still
    makes verl raise.
    """
    old = ADV_ESTIMATOR_REGISTRY.get(name)
    if old is not None and old is not fn:
        ours = (getattr(old, "__module__", None), getattr(old, "__qualname__", None))
        if ours == (fn.__module__, fn.__qualname__):
            ADV_ESTIMATOR_REGISTRY[name] = fn
            return
    register_adv_est(name)(fn)


for _name in ("reinforce", "reinforce_rej"):
    _register(_name, compute_reinforce_advantage)
for _name in ("raft", "raft_pp"):
    _register(_name, compute_raft_advantage)
