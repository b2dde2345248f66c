"""What every student and complementary teacher offers: body -> representation -> head."""

from __future__ import annotations

import itertools

import torch
from torch import nn

from fmtransfer.data.base import TaskData


class TaskModel(nn.Module):
    """A model of one task: `forward(batch)` = `head(body(batch))` + `offset(batch)`.

    `body` gives the representation that distillation methods align (the student's z_s); `offset` holds
    per-ID biases that are not a function of the representation (zero for most models).
    """

    out_dim: int
    rep_dim: int

    def body(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def head(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def offset(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | float:
        return 0.0

    def penalty(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | float:
        """A regulariser added to every method's loss during training (0.0: none)."""
        return 0.0

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.body(batch)) + self.offset(batch)


def output_dim(task: TaskData) -> int:
    return 1 if task.task_type == "regression" else int(task.num_classes or 0)


def squeeze_regression(out: torch.Tensor, task_type: str) -> torch.Tensor:
    return out.squeeze(-1) if task_type == "regression" else out


def mlp(sizes: list[int], dropout: float = 0.0, act: type[nn.Module] = nn.GELU) -> nn.Sequential:
    """Linear layers with an activation (and optional dropout) between them, none after the last."""
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        if k < len(sizes) - 2:
            layers.append(act())
            if dropout:
                layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)
