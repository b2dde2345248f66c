"""`ngram`: a fastText-like text classifier over hashed n-grams (the student of the `reviews` task).

Reads the task's n-gram views (int matrices of stable 31-bit hashes, padded with -1), folds each hash
into `buckets` rows of ONE shared embedding table, mean-pools a row's n-grams (an embedding bag),
and runs an optional small MLP and a linear head. The same class with more buckets, a wider table and
more n-gram kinds is the complementary `wide` teacher; the parameter count is about buckets x dim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from fmtransfer.config import ModelConfig
from fmtransfer.data.base import TaskData
from fmtransfer.errors import ConfigError, DataError
from fmtransfer.models.base import TaskModel, mlp, output_dim, squeeze_regression
from fmtransfer.registry import MODELS


@dataclass
class NgramConfig(ModelConfig):
    name: str = "ngram"
    views: list[str] | None = None
    """N-gram views of the task to read (e.g. [words1, words2]); null = every integer view."""
    buckets: int = 8192
    """Hash buckets of the shared embedding table (the model's own, independent of the task)."""
    dim: int = 64
    hidden: list[int] = field(default_factory=list)
    """Optional MLP on the pooled embedding; [] = a linear head on it (fastText)."""
    pooling: Literal["mean", "sum"] = "mean"
    dropout: float = 0.0
    """Dropout on the pooled embedding (and between MLP layers)."""
    token_dropout: float = 0.0
    """While training, drop each n-gram of a row with this probability (a cheap augmentation)."""
    init_std: float = 0.1
    """Standard deviation of the embedding table's normal initialisation (the padding row stays 0)."""

    def __post_init__(self) -> None:
        if self.buckets < 1 or self.dim < 1:
            raise ConfigError(f"student.buckets and student.dim must be >= 1, got {self.buckets}, {self.dim}")
        if not 0 <= self.token_dropout < 1 or not 0 <= self.dropout < 1:
            raise ConfigError("student.dropout and student.token_dropout must be in [0, 1)")


class NgramModel(TaskModel):
    """Embedding bag over hashed n-grams -> optional MLP -> linear head."""

    def __init__(self, cfg: NgramConfig, task: TaskData) -> None:
        super().__init__()
        ints = [k for k, v in task.features.items() if not v.is_floating_point() and v.dim() == 2]
        self.views = cfg.views or ints
        missing = [v for v in self.views if v not in ints]
        if missing or not self.views:
            raise ConfigError(f"model ngram: {missing[0] if missing else 'no view'!r} is not an n-gram view of "
                              f"task {task.name} (allowed: {', '.join(ints) or 'none'})")
        self.task_type = task.task_type
        self.buckets, self.token_dropout = cfg.buckets, cfg.token_dropout
        # row 0 is padding (excluded from the pooling); hash h lands in row 1 + h % buckets
        self.bag = nn.EmbeddingBag(cfg.buckets + 1, cfg.dim, mode=cfg.pooling, padding_idx=0)
        nn.init.normal_(self.bag.weight, std=cfg.init_std)
        with torch.no_grad():
            self.bag.weight[0].zero_()
        self.drop = nn.Dropout(cfg.dropout)
        self.trunk = mlp([cfg.dim, *cfg.hidden], cfg.dropout) if cfg.hidden else nn.Identity()
        self.act = nn.GELU() if cfg.hidden else nn.Identity()
        self.rep_dim = cfg.hidden[-1] if cfg.hidden else cfg.dim
        self.out_dim = output_dim(task)
        self.out = nn.Linear(self.rep_dim, self.out_dim)
        mean = task.y[task.splits["train"]].float().mean() if task.task_type == "regression" else torch.tensor(0.0)
        self.register_buffer("mean", mean.reshape(1))

    def bucket_ids(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, L) bucket rows of every chosen view side by side, 0 for padding (trimmed to the longest row)."""
        ids = bucket_ids(batch, self.views, self.buckets, "model ngram")
        if self.training and self.token_dropout > 0:
            keep = torch.rand(ids.shape, device=ids.device) >= self.token_dropout
            ids = ids * keep
        return ids

    def body(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        ids = self.bucket_ids(batch)
        return self.act(self.trunk(self.drop(pool(self.bag, ids))))

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return squeeze_regression(self.out(z), self.task_type)

    def offset(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | float:
        return self.mean if self.task_type == "regression" else 0.0


def pool(bag: nn.EmbeddingBag, ids: torch.Tensor) -> torch.Tensor:
    """The bag's pooled rows of `ids` (0 = padding): the EmbeddingBag itself when eager; in an exported graph a
    gather and a masked sum or mean (torch exports EmbeddingBag to ONNX as a loop over rows, which onnxruntime
    runs slowly); equal up to float rounding. Shared by `ngram` and `tabular`."""
    if _eager():
        return bag(ids)
    emb = nn.functional.embedding(ids, bag.weight)
    keep = (ids != 0).unsqueeze(-1).to(emb.dtype)  # row 0 is padding, never pooled
    total = (emb * keep).sum(1)
    return total if bag.mode == "sum" else total / keep.sum(1).clamp(min=1.0)


def bucket_ids(batch: dict[str, torch.Tensor], views: list[str], buckets: int, reader: str) -> torch.Tensor:
    """(B, L) embedding-bag rows of the n-gram `views` side by side: hash h -> 1 + h % buckets, padding -> 0.

    Shared by `ngram` and the n-gram bag of `tabular`, so both fold a task's hashes the same way."""
    parts = []
    for v in views:
        h = batch.get(v)
        if h is None or h.dim() != 2:
            raise DataError(f"{reader}: the batch has no (B, L) n-gram view {v!r}")
        if _eager():  # trimming padding is only a speed-up (padding rows are not pooled); a traced or
            # exported graph must not freeze the example batch's width
            width = int((h >= 0).sum(1).max()) if h.numel() else 0
            h = h[:, :max(width, 1)]
        h = h.long()
        parts.append(torch.where(h >= 0, h % buckets + 1, torch.zeros_like(h)))
    return torch.cat(parts, dim=1)


def _eager() -> bool:
    return not (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()
                or torch.onnx.is_in_onnx_export())


MODELS.register("ngram", NgramConfig, NgramModel)
