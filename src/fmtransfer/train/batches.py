"""Deterministic batch plans: the same global batches for any number of ranks, each rank taking a slice.

With a transfer set, every step holds a slice of unlabeled transfer rows (the main stream, which
defines the epoch) plus a slice of labeled rows cycled as often as needed; the task loss sees only
the labeled ones. Batches depend only on (seed, epoch), so a resumed run replays the same order.
"""

from __future__ import annotations

import math

import torch


def _cycled_perm(n: int, count: int, gen: torch.Generator) -> torch.Tensor:
    """`count` indices from back-to-back random permutations of range(n)."""
    reps = max(1, math.ceil(count / max(n, 1)))
    return torch.cat([torch.randperm(n, generator=gen) for _ in range(reps)])[:count]


class BatchPlan:
    """Yields (rows, labeled_mask) for this rank, epoch by epoch."""

    def __init__(self, labeled: torch.Tensor, transfer: torch.Tensor | None, *, batch_size: int,
                 labeled_batch_size: int | None = None, steps_per_epoch: int | None = None,
                 seed: int = 0, rank: int = 0, world: int = 1) -> None:
        if len(labeled) == 0:
            raise ValueError("no labeled training rows")
        self.labeled = labeled
        self.transfer = transfer if transfer is not None and len(transfer) else None
        self.batch_size = batch_size if self.transfer is not None else min(batch_size, len(labeled))
        self.labeled_batch_size = min(labeled_batch_size or batch_size, len(labeled))
        self.seed, self.rank, self.world = seed, rank, world
        main_n = len(self.transfer) if self.transfer is not None else len(labeled)
        self.steps = steps_per_epoch or max(1, math.ceil(main_n / self.batch_size))

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        out = []
        if self.transfer is None:
            perm = _cycled_perm(len(self.labeled), self.steps * self.batch_size, gen)
            for s in range(self.steps):
                idx = perm[s * self.batch_size:(s + 1) * self.batch_size]
                rows = self.labeled[idx][self.rank::self.world]
                out.append((rows, torch.ones(len(rows), dtype=torch.bool)))
            return out
        t_perm = _cycled_perm(len(self.transfer), self.steps * self.batch_size, gen)
        l_perm = _cycled_perm(len(self.labeled), self.steps * self.labeled_batch_size, gen)
        for s in range(self.steps):
            lab = self.labeled[l_perm[s * self.labeled_batch_size:(s + 1) * self.labeled_batch_size]]
            unl = self.transfer[t_perm[s * self.batch_size:(s + 1) * self.batch_size]]
            lab, unl = lab[self.rank::self.world], unl[self.rank::self.world]
            rows = torch.cat([lab, unl])
            mask = torch.cat([torch.ones(len(lab), dtype=torch.bool), torch.zeros(len(unl), dtype=torch.bool)])
            out.append((rows, mask))
        return out
