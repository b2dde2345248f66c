"""`synthetic`: a small generated task for tests and smoke runs (no data package needed).

Rows have a dense vector `x`, a categorical `user` and a short text per row built from words that
carry the label's sign, so a text teacher has something real to learn. The OOD suite 'shifted' adds a
constant offset to `x`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from fmtransfer.config import TaskConfig
from fmtransfer.data.base import TaskData, TextView, labeled_subset
from fmtransfer.registry import TASKS

WORDS_POS = ["good", "great", "fine", "nice"]
WORDS_NEG = ["bad", "poor", "awful", "weak"]


@dataclass
class SyntheticConfig(TaskConfig):
    default_student: ClassVar[dict[str, Any] | None] = {"name": "mlp"}
    name: str = "synthetic"
    rows: int = 600
    dim: int = 8
    users: int = 20
    kind: Literal["regression", "classification"] = "classification"
    num_classes: int = 2
    noise: float = 0.3
    ood_shift: float = 1.0


@TASKS.register("synthetic", SyntheticConfig)
def build_synthetic(cfg: SyntheticConfig) -> TaskData:
    rng = np.random.default_rng(cfg.split_seed)
    n = cfg.rows
    x = rng.normal(size=(n, cfg.dim)).astype(np.float32)
    user = rng.integers(0, cfg.users, size=n)
    w = rng.normal(size=(cfg.dim,)).astype(np.float32)
    user_effect = rng.normal(scale=0.5, size=cfg.users).astype(np.float32)
    n_ood = n // 6
    x[-n_ood:] += cfg.ood_shift
    signal = x @ w / np.sqrt(cfg.dim) + user_effect[user] + rng.normal(scale=cfg.noise, size=n)
    if cfg.kind == "regression":
        y = torch.from_numpy(signal.astype(np.float32))
        num_classes = None
    else:
        edges = np.quantile(signal[:-n_ood], np.linspace(0, 1, cfg.num_classes + 1)[1:-1])
        y = torch.from_numpy(np.digitize(signal, edges).astype(np.int64))
        num_classes = cfg.num_classes
    positive = signal > np.median(signal[:-n_ood])  # the words tell the upper half from the lower half
    texts = []
    for k in range(n):
        words = WORDS_POS if positive[k] else WORDS_NEG
        texts.append(" ".join(rng.choice(words, size=3)) + f" item {k % 7}")
    ids = np.arange(n - n_ood)
    perm = rng.permutation(ids)
    n_val = n_test = len(ids) // 6
    val, test, train = np.sort(perm[:n_val]), np.sort(perm[n_val:n_val + n_test]), np.sort(perm[n_val + n_test:])
    labeled, transfer = labeled_subset(train, cfg.labels, cfg.split_seed)
    return TaskData(
        name="synthetic", task_type=cfg.kind,
        features={"x": torch.from_numpy(x), "user": torch.from_numpy(user)},
        y=y,
        splits={"train": torch.from_numpy(labeled), "transfer": torch.from_numpy(transfer),
                "val": torch.from_numpy(val), "test": torch.from_numpy(test),
                "ood/shifted": torch.arange(n - n_ood, n)},
        metric="rmse" if cfg.kind == "regression" else "accuracy",
        higher_is_better=cfg.kind != "regression",
        cardinalities={"user": cfg.users},
        texts={"row": TextView("row", texts)},
        num_classes=num_classes,
    )
