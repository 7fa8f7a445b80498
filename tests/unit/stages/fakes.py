"""Fakes of verl's TransferQueue for the stage tests (no Ray, no TransferQueue service)."""

from __future__ import annotations

import torch
from transfer_queue import KVBatchMeta

from recipe.stages.rows import sample_dicts
from verl.utils.tensordict_utils import list_of_dict_to_tensordict

#: The training partition.
P = "train"


class FakeTQ:
    """In-memory TransferQueue: ``partition -> key -> {field: per-row value}`` plus tags.

    Records every put (``puts``: keys and field names) and clear (``cleared``: keys).
    """

    def __init__(self):
        self.data: dict[str, dict[str, dict]] = {}
        self.tags: dict[str, dict[str, dict]] = {}
        self.puts: list[tuple[list[str], list[str] | None]] = []
        self.cleared: list[list[str]] = []

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        part = self.data[partition_id]
        rows = [dict(part[k]) if select_fields is None else {f: part[k][f] for f in select_fields} for k in keys]
        return list_of_dict_to_tensordict(rows)

    def kv_batch_put(self, keys, partition_id, fields=None, tags=None):
        part = self.data.setdefault(partition_id, {})
        if fields is not None:
            rows = sample_dicts(fields)
            assert len(rows) == len(keys)
            for k, row in zip(keys, rows):
                part.setdefault(k, {}).update(row)
        if tags is not None:
            self.tags.setdefault(partition_id, {}).update({k: dict(t) for k, t in zip(keys, tags, strict=True)})
        self.puts.append((list(keys), None if fields is None else sorted(fields.keys())))
        names = sorted({f for k in keys for f in part.get(k, {})})
        return KVBatchMeta(partition_id=partition_id, keys=list(keys), tags=list(tags or [{} for _ in keys]),
                           fields=names)

    def kv_clear(self, keys, partition_id):
        keys = [keys] if isinstance(keys, str) else list(keys)
        self.cleared.append(keys)
        for k in keys:
            self.data.get(partition_id, {}).pop(k, None)
            self.tags.get(partition_id, {}).pop(k, None)

    # what the tests do in verl's place
    def clear_partition(self, partition_id=P):
        """verl's end of step: the partition is emptied."""
        self.data.pop(partition_id, None)
        self.tags.pop(partition_id, None)

    def write(self, field, values: dict[str, list[float]], partition_id=P):
        """A trainer stage writing ``field`` ([T_i] float32) for the given keys."""
        for k, v in values.items():
            self.data[partition_id][k][field] = torch.tensor(v, dtype=torch.float32)

    def get(self, key, field, partition_id=P):
        """One row's field."""
        return self.data[partition_id][key][field]

    field = get
