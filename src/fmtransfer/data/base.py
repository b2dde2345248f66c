"""The in-memory form of a task: one table of rows, named feature views, splits and metrics.

A task is one table of N rows (train, val, test and every OOD suite together) so that a teacher's
outputs can be stored once per row and gathered by row index. Models read named views of the table
(`features`); foundation teachers read text views (`texts`), which may be indexed by an entity column
(one text per user or per movie) rather than by row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from fmtransfer.errors import ConfigError, DataError
from fmtransfer.evaluate import classification_metrics, regression_metrics
from fmtransfer.utils import hash_arrays, stable_hash


@dataclass
class TextView:
    """Texts a foundation model reads: `texts[i]` belongs to every row whose `index` feature equals i."""

    index: str
    texts: list[str]


@dataclass
class TaskData:
    """A prepared task: features, targets, splits and how to score predictions."""

    name: str
    task_type: Literal["regression", "classification"]
    features: dict[str, torch.Tensor]
    y: torch.Tensor
    splits: dict[str, torch.Tensor]
    """Row indices: 'train' (labeled), 'transfer' (unlabeled rest of train), 'val', 'test', 'ood/<suite>'."""
    metric: str
    higher_is_better: bool
    cardinalities: dict[str, int] = field(default_factory=dict)
    """Number of distinct values of each categorical feature (embedding table sizes)."""
    texts: dict[str, TextView] = field(default_factory=dict)
    num_classes: int | None = None
    target_range: tuple[float, float] | None = None
    """Regression predictions are clipped to this range when scored."""
    meta: dict[str, object] = field(default_factory=dict)
    segments: dict[str, tuple[torch.Tensor, list[str]]] = field(default_factory=dict)
    """Named row groupings for diagnostics: name -> (code per row, label per code), e.g. a movie's genre."""
    fingerprint: str = ""
    raw: Callable[[torch.Tensor], dict[str, Any]] | None = None
    """Row indices -> those rows' raw source columns (what `meta["preprocessing"]` turns into the features);
    None for tasks whose features are their raw columns. Export and the tests feed these to a predictor."""

    def __post_init__(self) -> None:
        n = len(self.y)
        for k, v in self.features.items():
            if len(v) != n:
                raise DataError(f"task {self.name}: feature {k!r} has {len(v)} rows, targets have {n}")
        if not self.fingerprint:
            self.fingerprint = self.compute_fingerprint()

    @property
    def num_rows(self) -> int:
        return len(self.y)

    @property
    def ood_suites(self) -> list[str]:
        return [k.split("/", 1)[1] for k in self.splits if k.startswith("ood/")]

    def output_shape(self) -> tuple[int, ...]:
        """Shape of one row's prediction: () for regression, (C,) for classification."""
        return () if self.task_type == "regression" else (int(self.num_classes or 0),)

    def compute_fingerprint(self) -> str:
        """Content hash of everything a teacher or student could learn from (features, targets, splits, texts)."""
        arrays = [self.y, *[self.features[k] for k in sorted(self.features)]]
        arrays += [self.splits[k] for k in sorted(self.splits)]
        text_hash = stable_hash({k: [v.index, stable_hash(v.texts, 32)] for k, v in sorted(self.texts.items())})
        return stable_hash([self.name, hash_arrays(arrays, 32), text_hash, sorted(self.splits)], 16)

    def gather(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The batch for `rows`: every feature view, the target, and the row ids."""
        batch = {k: v[rows] for k, v in self.features.items()}
        batch["y"] = self.y[rows]
        batch["row"] = rows
        return batch

    def score(self, pred: torch.Tensor, rows: torch.Tensor) -> dict[str, float]:
        """Metrics of predictions `pred` (aligned with `rows`)."""
        y = self.y[rows]
        if self.task_type == "regression":
            if self.target_range is not None:
                pred = pred.clamp(*self.target_range)
            positive = self.meta.get("positive_threshold")
            return regression_metrics(pred, y, positive_threshold=positive)  # type: ignore[arg-type]
        return classification_metrics(pred, y)


def image_view(task: TaskData, name: str, reader: str) -> torch.Tensor:
    """The task's float image view `name` (N, C, H, W); `reader` names the config key that asked for it."""
    if name not in task.features:
        raise ConfigError(f"{reader}: {name!r} is not a feature of task {task.name} "
                          f"(allowed: {', '.join(task.features)})")
    x = task.features[name]
    if x.dim() != 4 or not x.is_floating_point():
        raise DataError(f"{reader}: images are read as float (N, C, H, W); feature {name!r} has shape "
                        f"{tuple(x.shape)} and dtype {x.dtype}")
    return x


def labeled_subset(train_rows: np.ndarray, labels: int | float | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split the training rows into (labeled, transfer) by a count or fraction, reproducibly."""
    n = len(train_rows)
    if labels is None:
        return train_rows, train_rows[:0]
    k = round(labels * n) if isinstance(labels, float) else int(labels)
    if k > n:
        raise DataError(f"task.labels: asked for {k} labels but the training split has only {n} rows")
    k = max(1, k)
    perm = np.random.default_rng(seed + 7919).permutation(n)
    return np.sort(train_rows[perm[:k]]), np.sort(train_rows[perm[k:]])
