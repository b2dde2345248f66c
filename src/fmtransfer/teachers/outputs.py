"""A prepared teacher's pass over every row: its outputs and its representations from ONE forward.

The representation (`reps.npy`, the model's body output) is recorded while the prediction runs, so
preparation costs one teacher forward per row rather than two. Rows go through in batches sized for
throughput, not as one split-sized batch: a 5,000-image batch through a CNN runs several times slower
per image than batches of ~100 (activations no longer fit the CPU caches), see
docs/performance.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

from fmtransfer.data.base import TaskData
from fmtransfer.models.base import TaskModel
from fmtransfer.train.loop import to_device

PREPARE_BATCH_ROWS = 128
"""Rows per batch of the preparation pass (at most the teacher's `train.eval_batch_size`)."""


def prepare_batch_size(eval_batch_size: int) -> int:
    return max(1, min(eval_batch_size, PREPARE_BATCH_ROWS))


@contextmanager
def record_body(model: TaskModel) -> Iterator[list[torch.Tensor]]:
    """Within the block, every call of `model.body` also appends its output to the yielded list.

    `body` is a method, not a submodule, so a module forward hook cannot see it: the instance attribute
    shadows the class method for the duration of the block and is removed after (no model edits remain).
    """
    seen: list[torch.Tensor] = []
    original = model.body

    def body(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        z = original(batch)
        seen.append(z)
        return z

    model.body = body  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        del model.body


@torch.inference_mode()
def outputs_and_reps(predict: Callable[[dict[str, torch.Tensor]], torch.Tensor], model: TaskModel,
                     task: TaskData, rows: torch.Tensor, batch_size: int,
                     device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """(outputs fp32, representations fp16) of `predict` and `model.body` for `rows`, one forward per batch.

    When `predict` does not call `model.body` exactly once on the batch (a method with its own prediction
    path), the body runs apart for that batch, so the result never depends on how predict is written.
    """
    n = len(rows)
    outputs: np.ndarray | None = None
    reps: np.ndarray | None = None
    for s in range(0, n, batch_size):
        r = rows[s:s + batch_size]
        batch = to_device(task.gather(r), device)
        with record_body(model) as seen:
            out = predict(batch)
        z = seen[0] if len(seen) == 1 and seen[0].shape[:1] == (len(r),) else model.body(batch)
        out_np, z_np = out.float().cpu().numpy(), z.float().cpu().numpy()
        if outputs is None or reps is None:
            outputs = np.empty((n, *out_np.shape[1:]), np.float32)
            reps = np.empty((n, *z_np.shape[1:]), np.float16)
        outputs[s:s + len(r)] = out_np
        reps[s:s + len(r)] = z_np
    if outputs is None or reps is None:
        return np.empty((0,), np.float32), np.empty((0,), np.float16)
    return outputs, reps
