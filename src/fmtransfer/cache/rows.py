"""Row-gather over one field of a FeatureStore, shard by shard, without joining the shards.

`FeatureStore.load` joins every shard into one array (fine for a task that fits in memory). A streamed
task of 10^7+ rows instead reads rows through `ShardedRows`: a batch's row ids are grouped by shard,
each shard is memory-mapped on first use and kept in a small LRU, and an evicted shard is unmapped.
A batch plan that draws each batch from a few shards at a time (data/stream_plan.py) therefore keeps
the resident pages bounded by `cache_shards` shards per field, whatever the row count.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from fmtransfer.cache.store import FeatureStore
from fmtransfer.errors import ArtifactError


class ShardedRows:
    """`rows_view[row_ids] -> tensor`: the same gather interface as a tensor, read from memory-mapped shards."""

    def __init__(self, store: FeatureStore, name: str, cache_shards: int = 8,
                 as_dtype: torch.dtype | None = None) -> None:
        if name not in store.fields:
            raise KeyError(name)
        if not store.is_complete():
            raise ArtifactError(f"cache {store.key} is incomplete or corrupt; build it again (fmtransfer cache)")
        self.store, self.name, self.cache_shards = store, name, max(1, cache_shards)
        self.spec = store.fields[name]
        self.as_dtype = as_dtype
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()
        self.shards_opened = 0
        """How many times a shard was mapped (tests check that a pass maps each shard about once)."""

    # a tensor's metadata, so that models can size themselves from the view (FeatureModel, NgramModel)
    @property
    def shape(self) -> tuple[int, ...]:
        return (self.store.rows, *self.spec.shape)

    def __len__(self) -> int:
        return self.store.rows

    def dim(self) -> int:
        return 1 + len(self.spec.shape)

    def is_floating_point(self) -> bool:
        return self.spec.dtype.startswith("float")

    def shard(self, k: int) -> np.ndarray:
        """Shard k, memory-mapped (least recently used shards beyond `cache_shards` are dropped)."""
        a = self._open.get(k)
        if a is not None:
            self._open.move_to_end(k)
            return a
        a = np.load(self.store._shard_path(self.name, k), mmap_mode="r")
        self.shards_opened += 1
        self._open[k] = a
        while len(self._open) > self.cache_shards:
            self._open.popitem(last=False)
        return a

    def read(self, start: int, end: int) -> np.ndarray:
        """Rows [start, end) as a fresh array (a contiguous range: a whole-shard scan reads it once)."""
        n = self.store.shard_rows
        parts = []
        for k in range(start // n, (end - 1) // n + 1 if end > start else start // n):
            s = self.shard(k)
            lo, hi = max(start, k * n) - k * n, min(end, (k + 1) * n) - k * n
            parts.append(np.array(s[lo:hi]))
        return np.concatenate(parts) if parts else np.empty((0, *self.spec.shape), self.spec.dtype)

    def gather(self, rows: np.ndarray) -> np.ndarray:
        """The rows with these ids, in the given order."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), *self.spec.shape), dtype=self.spec.dtype)
        if len(rows) == 0:
            return out
        if rows.min() < 0 or rows.max() >= self.store.rows:
            raise IndexError(f"row ids outside [0, {self.store.rows})")
        shard_of = rows // self.store.shard_rows
        order = np.argsort(shard_of, kind="stable")
        bounds = np.flatnonzero(np.diff(shard_of[order])) + 1
        for part in np.split(order, bounds):
            k = int(shard_of[part[0]])
            out[part] = self.shard(k)[rows[part] - k * self.store.shard_rows]
        return out

    def __getitem__(self, rows: torch.Tensor | np.ndarray) -> torch.Tensor:
        idx = rows.numpy() if isinstance(rows, torch.Tensor) else rows
        t = torch.from_numpy(self.gather(idx))
        return t.to(self.as_dtype) if self.as_dtype is not None else t
