"""`cnn`: the image application model: a small conv net on the task's 28x28 `image` view.

The default is the tiny student (three 3x3 conv stages of 12/24/32 channels, max-pooled, then a linear
head on the flattened 32x3x3 map: 12,638 parameters); with wide settings (e.g. channels [32, 64, 128],
two convs per stage, hidden [128]) the same class is the complementary teacher (`supervised` recipe).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from fmtransfer.config import ModelConfig
from fmtransfer.data.base import TaskData, image_view
from fmtransfer.errors import ConfigError
from fmtransfer.models.base import TaskModel, mlp, output_dim, squeeze_regression
from fmtransfer.registry import MODELS


@dataclass
class CNNConfig(ModelConfig):
    name: str = "cnn"
    feature: str = "image"
    """The task's image view: float (N, C, H, W)."""
    channels: list[int] = field(default_factory=lambda: [12, 24, 32])
    """Output channels of each conv stage (3x3 conv, optional batch norm, ReLU, 2x2 max pool)."""
    convs_per_stage: int = 1
    batchnorm: bool = True
    pool: Literal["flatten", "avg"] = "flatten"
    """How the last feature map becomes the representation: flattened (keeps position) or averaged."""
    hidden: list[int] = field(default_factory=list)
    """Fully connected layers between the pooled map and the output layer."""
    dropout: float = 0.0


class CNN(TaskModel):
    """Conv stages -> flattened or averaged map -> optional MLP -> linear output (logits)."""

    def __init__(self, cfg: CNNConfig, task: TaskData) -> None:
        super().__init__()
        x = image_view(task, cfg.feature, "model.feature")
        if not cfg.channels or cfg.convs_per_stage < 1:
            raise ConfigError("model.channels: give at least one stage, and convs_per_stage >= 1")
        self.feature, self.task_type = cfg.feature, task.task_type
        layers: list[nn.Module] = []
        c_in, h, w = x.shape[1], x.shape[2], x.shape[3]
        for c_out in cfg.channels:
            for _ in range(cfg.convs_per_stage):
                layers.append(nn.Conv2d(c_in, c_out, 3, padding=1, bias=not cfg.batchnorm))
                if cfg.batchnorm:
                    layers.append(nn.BatchNorm2d(c_out))
                layers.append(nn.ReLU())
                c_in = c_out
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise ConfigError(f"model.channels: {len(cfg.channels)} pooling stages shrink a "
                              f"{x.shape[2]}x{x.shape[3]} image to nothing; use fewer stages")
        self.convs = nn.Sequential(*layers)
        flat = c_in * h * w if cfg.pool == "flatten" else c_in
        self.pool = nn.Flatten() if cfg.pool == "flatten" else nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.drop = nn.Dropout(cfg.dropout)
        self.trunk = nn.Sequential(mlp([flat, *cfg.hidden], cfg.dropout), nn.ReLU()) if cfg.hidden else nn.Identity()
        self.rep_dim = cfg.hidden[-1] if cfg.hidden else flat
        self.out_dim = output_dim(task)
        self.out = nn.Linear(self.rep_dim, self.out_dim)

    def body(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.trunk(self.drop(self.pool(self.convs(batch[self.feature].float()))))

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return squeeze_regression(self.out(self.drop(z)), self.task_type)


MODELS.register("cnn", CNNConfig, CNN)
