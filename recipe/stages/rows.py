"""TransferQueue row helpers shared by the stages: one place for verl's row-key layout, the
tags this project sets, and the reward fields of a row.

verl's agent loop writes each response under the key ``{uid}_{session}_{index}`` in
TransferQueue (``uid`` = the prompt's group id; one key per response) and tags each row
with a dict (``is_padding`` marks the copies verl's balancing adds). Tags survive verl's
re-batching inside a step, so stages mark rows through them.

Group ids are deterministic (:func:`make_uids`: ``<kind><step>-<k>``, e.g. ``t3-12`` for the
13th training prompt submitted at step 3) instead of verl's random ``uuid4``: a response's
sampling seed derives from its uid (:mod:`verl_patches.seeding`), and rows are ordered by
:func:`key_order` rather than by arrival, so the same seed gives the same run.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from tensordict import NonTensorData, NonTensorStack

#: Tag: the batch holds only groups a filter dropped; every training stage skips it.
SKIP_UPDATE = "skip_update"
#: Tag: a row replayed from the rollout-replay buffer this step.
REPLAYED = "replayed"
#: Tag: a preference pair row reused from LoRR's initial data (no fresh rollout).
REUSED = "lorr_reused"
#: Tag (with :data:`SKIP_UPDATE`): a collection step of a preference iteration; its pairs are
#: kept for the iteration's training step, so the skipped update is planned, not a failure.
COLLECTING = "collecting"
#: verl's tag for padding copies added by its batch balancing.
PADDING = "is_padding"


def uid_of(key: str) -> str:
    """The group id (``uid``) of a TransferQueue row key ``{uid}_{session}_{index}``."""
    return key.split("_", 1)[0]


#: Kinds of deterministic uids: training prompts, DOTS reference rollouts, validation.
UID_KINDS = ("t", "r", "v")
_UID = re.compile(r"([a-z])(\d+)-(\d+)")


def make_uids(kind: str, step: int, start: int, n: int) -> list[str]:
    """``n`` group ids ``<kind><step>-<k>`` for ``k`` in ``[start, start + n)``.

    Args:
        kind: One of :data:`UID_KINDS` (``t`` training, ``r`` DOTS reference, ``v`` validation).
        step: The global step the prompts are submitted at.
        start: Prompts of this kind already submitted at this step.
        n: How many ids.

    Raises:
        ValueError: an unknown kind, or a negative step / start / n.
    """
    if kind not in UID_KINDS:
        raise ValueError(f"uid kind must be one of {UID_KINDS}, got {kind!r}")
    if min(step, start, n) < 0:
        raise ValueError(f"step, start and n must be >= 0, got {step}, {start}, {n}")
    return [f"{kind}{step}-{k}" for k in range(start, start + n)]


def uid_order(uid: str) -> tuple:
    """Sort key of a group id: ``make_uids`` ids by (kind, step, k), others after, by text."""
    m = _UID.fullmatch(uid)
    return (0, m.group(1), int(m.group(2)), int(m.group(3))) if m else (1, uid)


def key_order(key: str) -> tuple:
    """Sort key of a row key ``{uid}_{session}_{index}``: by group (:func:`uid_order`), then
    session and index (numerically when they are numbers)."""
    uid, _, rest = key.partition("_")
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in rest.split("_")) if rest else ()
    return (uid_order(uid), parts)


def is_padding(tag: dict) -> bool:
    """Whether a row is one of verl's padding copies."""
    return bool(tag.get(PADDING, False))


def real_indices(tags: list[dict], *, fresh_only: bool = False) -> list[int]:
    """Indices of the rows that are not padding (and, with ``fresh_only``, not replayed)."""
    return [i for i, tag in enumerate(tags)
            if not is_padding(tag) and not (fresh_only and tag.get(REPLAYED, False))]


def is_skipped(batch) -> bool:
    """True for an empty batch or one whose rows are all tagged :data:`SKIP_UPDATE`."""
    return len(batch) == 0 or all(tag.get(SKIP_UPDATE, False) for tag in batch.tags)


def mark_skipped(tags: list[dict]) -> None:
    """Tag every row :data:`SKIP_UPDATE` (in place)."""
    for tag in tags:
        tag[SKIP_UPDATE] = True


def reward_info(extra) -> dict:
    """The reward function's dict (``reward_extra_info``) of one row's verl ``extra_fields``
    (a dict, a tensordict ``NonTensorData`` wrapping one, or None); ``{}`` when absent."""
    extra = getattr(extra, "data", extra)
    info = extra.get("reward_extra_info") if isinstance(extra, dict) else None
    return info or {}


def response_metric(extra, metric: str, key: str) -> float:
    """Per-response value ``reward_extra_info[metric]`` of one row's ``extra_fields``.

    Args:
        extra: the row's verl ``extra_fields``.
        metric: reward field name (e.g. ``acc``).
        key: the config key that chose ``metric``, named in the error.

    Raises:
        RuntimeError: the reward function did not return ``metric``.
    """
    info = reward_info(extra)
    if metric not in info:
        raise RuntimeError(
            f"{key}={metric!r} is not among the reward function's outputs {sorted(info)}; set {key} to one of them"
        )
    return float(info[metric])


def sample_dicts(data) -> list[dict[str, Any]]:
    """Split a TransferQueue ``TensorDict`` (B rows, jagged or dense fields) into B dicts of
    per-row values (1-D tensors, python objects): the layout verl's agent loop puts."""
    out: list[dict[str, Any]] = [{} for _ in range(len(data))]
    for name, value in data.items():
        for i in range(len(out)):
            if isinstance(value, torch.Tensor):
                out[i][name] = value[i].clone()
            elif isinstance(value, NonTensorStack):
                out[i][name] = value[i].data
            elif isinstance(value, NonTensorData):
                out[i][name] = value.data
            else:
                out[i][name] = value[i]
    return out


def clone_row(row: dict[str, Any], drop: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    """A copy of one row's fields (tensors cloned) without the names in ``drop``."""
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in row.items() if k not in drop}


#: Fields the trainer's stages write after sampling (recomputed for replayed / paired rows).
STAGE_FIELDS = frozenset(
    {"old_log_probs", "entropy", "ref_log_prob", "values", "advantages", "returns", "token_level_rewards",
     "rollout_is_weights"}
)
