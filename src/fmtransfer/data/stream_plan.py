"""Batch plan of a streamed task: global batches drawn a few shards at a time, each rank taking a slice.

The in-memory `BatchPlan` permutes every training row id at once (memory grows with rows). Here an
epoch visits the shards in a random order, `buffer_shards` at a time: it reads only those shards'
split codes (a few bytes per row), permutes the wanted rows of the buffer, and cuts global batches of
`batch_size` rows (the remainder carries into the next buffer). Rank r of `world` takes `batch[r::world]`
and gathers only those rows, so the global batches, hence the student, do not depend on the rank count,
and each rank reads only its part. Everything depends on (seed, epoch): a resumed run replays the order.

Unlike `BatchPlan`, labeled and transfer rows are not drawn as two streams: a batch holds the buffer's
rows of both kinds in their natural proportion (the `labeled` mask marks the labeled ones), so that no
per-row id list of the labeled split is ever held in memory.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from fmtransfer.cache.rows import ShardedRows


class StreamPlan:
    """Yields (rows, labeled_mask) for this rank, epoch by epoch, `len(plan)` global batches per epoch."""

    def __init__(self, codes: ShardedRows, wanted: list[int], labeled_code: int, count: int, *, batch_size: int,
                 steps_per_epoch: int | None = None, seed: int = 0, rank: int = 0, world: int = 1,
                 buffer_shards: int = 4) -> None:
        if count <= 0:
            raise ValueError("no training rows")
        self.codes, self.wanted, self.labeled_code = codes, np.asarray(wanted, np.int32), labeled_code
        self.batch_size = min(batch_size, count)
        self.steps = steps_per_epoch or max(1, count // self.batch_size)
        self.seed, self.rank, self.world, self.buffer_shards = seed, rank, world, max(1, buffer_shards)

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int) -> _Epoch:
        return _Epoch(self, epoch)

    def _global_batches(self, epoch: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        store = self.codes.store
        emitted, cycle = 0, 0
        while True:  # more than one pass over the shards only when steps_per_epoch asks for it
            rng = np.random.default_rng([self.seed, epoch, cycle])
            order = rng.permutation(store.num_shards)
            rows_pool, codes_pool = np.empty(0, np.int64), np.empty(0, np.int32)
            for b in range(0, len(order), self.buffer_shards):
                ids, codes = [], []
                for k in order[b:b + self.buffer_shards]:
                    start, end = store.shard_range(int(k))
                    c = self.codes.read(start, end)
                    keep = np.flatnonzero(np.isin(c, self.wanted))
                    ids.append(keep + start)
                    codes.append(c[keep])
                perm = rng.permutation(sum(len(i) for i in ids))
                rows_pool = np.concatenate([rows_pool, np.concatenate(ids)[perm]])
                codes_pool = np.concatenate([codes_pool, np.concatenate(codes)[perm]])
                while len(rows_pool) >= self.batch_size:
                    yield rows_pool[:self.batch_size], codes_pool[:self.batch_size]
                    rows_pool, codes_pool = rows_pool[self.batch_size:], codes_pool[self.batch_size:]
                    emitted += 1
                    if emitted == self.steps:
                        return
            cycle += 1


class _Epoch:
    """One epoch's batches for this rank: iterable once, with a length (for progress bars and averages)."""

    def __init__(self, plan: StreamPlan, epoch: int) -> None:
        self.plan, self.epoch = plan, epoch

    def __len__(self) -> int:
        return self.plan.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        p = self.plan
        for rows, codes in p._global_batches(self.epoch):
            mine, c = rows[p.rank::p.world], codes[p.rank::p.world]
            yield torch.from_numpy(np.ascontiguousarray(mine)), torch.from_numpy(c == p.labeled_code)
