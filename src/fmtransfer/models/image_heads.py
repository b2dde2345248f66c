"""Task models on the image backbone: the probe's head on cached features, the fine-tuned backbone, the live probe.

Used by the image teacher recipes (`image_probe`, `image_finetune`) and by the fine-tuning baselines
(`finetune`, `lp_ft`, `wise_ft`, `lora` on an image task): one `FinetuneImageModel` for both. The backbone
runs through `fmtransfer.backbones.image`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fmtransfer.backbones.image import ImageBackbone, Preprocess, run_blocks
from fmtransfer.backbones.spec import BackboneSpec
from fmtransfer.data.base import TaskData
from fmtransfer.models.base import TaskModel, mlp, output_dim, squeeze_regression


class ImageHead(TaskModel):
    """Standardised pooled features -> optional MLP -> output. Subclasses say where features come from."""

    def __init__(self, task: TaskData, dim: int, hidden: list[int], dropout: float, chunk: int) -> None:
        super().__init__()
        self.task_type = task.task_type
        self.chunk = chunk
        self.drop = nn.Dropout(dropout)
        self.trunk = nn.Sequential(mlp([dim, *hidden], dropout), nn.GELU()) if hidden else nn.Identity()
        self.rep_dim = hidden[-1] if hidden else dim
        self.out_dim = output_dim(task)
        self.out = nn.Linear(self.rep_dim, self.out_dim)

    def pooled(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def body(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.trunk(self.drop(self.pooled(batch)))

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return squeeze_regression(self.out(self.drop(z)), self.task_type)


class FrozenFeatureModel(ImageHead):
    """The probe: pooled backbone features of every row, held as a (non-saved) buffer, standardised with
    statistics of the training split (labeled + transfer rows: no label is read)."""

    def __init__(self, task: TaskData, feats: torch.Tensor, hidden: list[int], dropout: float, chunk: int) -> None:
        super().__init__(task, feats.shape[1], hidden, dropout, chunk)
        self.register_buffer("feats", feats.float(), persistent=False)
        fit_rows = torch.cat([task.splits["train"], task.splits.get("transfer", task.splits["train"][:0])])
        self.register_buffer("mu", feats[fit_rows].mean(0))
        self.register_buffer("sd", feats[fit_rows].std(0).clamp(min=1e-4))

    def pooled(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (self.feats[batch["row"]] - self.mu) / self.sd


class FinetuneImageModel(ImageHead):
    """Backbone blocks [cut, end) train with the head; the input is either the cached output of the frozen
    blocks [0, cut) (looked up by row) or, with cut 0, the live image. Predictions run in chunks.
    `freeze_bn` keeps BatchNorm in eval mode (the ImageNet running statistics; used with LoRA and by the
    fine-tuning baselines)."""

    cache_eval: bool = False  # nothing is cached: present so timing code can treat the text and image models alike

    def __init__(self, spec: BackboneSpec, task: TaskData, net: nn.Module, cut: int,
                 frozen_maps: torch.Tensor | None, hidden: list[int], dropout: float, freeze_bn: bool = False) -> None:
        super().__init__(task, int(net._bn1.num_features), hidden, dropout, spec.batch_size)
        self.cut, self.end, self.feature = cut, len(net._blocks), spec.feature
        self.drop_connect = spec.drop_connect
        self.freeze_bn = freeze_bn
        if cut == 0:
            self.pre: Preprocess | None = Preprocess.of(spec)
            self.backbone = net
        else:
            assert frozen_maps is not None
            self.pre = None
            # keep only the trainable part as parameters; the frozen part's output is a buffer
            net._conv_stem, net._bn0 = nn.Identity(), nn.Identity()
            for k in range(cut):
                net._blocks[k] = nn.Identity()
            self.backbone = net
            self.register_buffer("maps", frozen_maps, persistent=False)

    def train(self, mode: bool = True) -> FinetuneImageModel:
        super().train(mode)
        if self.freeze_bn:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def _pool_rows(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.pre(batch[self.feature]) if self.pre is not None else self.maps[batch["row"]].float()
        h = run_blocks(self.backbone, x, self.cut, self.end, self.drop_connect if self.training else 0.0)
        return h.mean(dim=(2, 3))

    def pooled(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        n = len(batch["row"])
        if self.training or n <= self.chunk:
            return self._pool_rows(batch)
        parts = [self._pool_rows({k: v[s:s + self.chunk] for k, v in batch.items()}) for s in range(0, n, self.chunk)]
        return torch.cat(parts)


class LiveImageProbe(ImageHead):
    """`image_probe` with the frozen backbone run on the batch's pixels instead of cached features."""

    def __init__(self, spec: BackboneSpec, task: TaskData, net: nn.Module, stop: int, grid: int,
                 hidden: list[int], dropout: float) -> None:
        backbone = ImageBackbone(net, stop).eval()
        pre = Preprocess.of(spec)
        with torch.no_grad():
            sample = backbone(pre(task.features[spec.feature][:1].float()))
        dim = sample.shape[1] * (grid * grid if grid > 1 else 1)
        super().__init__(task, dim, hidden, dropout, spec.batch_size)
        self.backbone, self.pre, self.grid, self.feature = backbone, pre, grid, spec.feature
        self.register_buffer("mu", torch.zeros(dim))
        self.register_buffer("sd", torch.ones(dim))

    def pooled(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.backbone(self.pre(batch[self.feature].float()))
        f = h.mean(dim=(2, 3)) if self.grid == 1 else F.adaptive_avg_pool2d(h, self.grid).flatten(1)
        return (f - self.mu) / self.sd
