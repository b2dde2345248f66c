"""Image foundation-model teachers: EfficientNet-Lite0 (ImageNet) adapted to a task's `image` view.

- `image_probe`: the frozen backbone runs ONCE over every row (images upsampled to `resolution`, grey
  copied to 3 channels, `(x - 0.5) / 0.5`); its output (the final 1280-d map, or block `tap`'s map),
  averaged globally or to a `grid` x `grid` map, is cached on disk and a head trains on it.
- `image_finetune`: the backbone trains with the head. With `top_blocks: k` only the last k MBConv
  blocks (and the 1x1 head conv) train: the frozen lower part's output is computed once per row and
  cached like the probe's features, so each step runs only the top. With `top_blocks: null` every layer
  trains on live images (costly on CPU: docs/digits.md). The teacher's `train` section sets the budget:
  `epochs x steps_per_epoch x batch_size` images.

The backbone (loading, preprocessing, the block traversal) is `fmtransfer.backbones.image`, the feature cache
`fmtransfer.cache.image`, the task models `fmtransfer.models.image_heads`; this file holds the two recipes and
their configs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from fmtransfer.backbones.image import load_backbone, used_params, weights_hash, weights_path
from fmtransfer.backbones.spec import BackboneSpec
from fmtransfer.cache.image import cached_backbone_outputs
from fmtransfer.config import TeacherConfig
from fmtransfer.data.base import TaskData
from fmtransfer.errors import ConfigError
from fmtransfer.models.image_heads import FinetuneImageModel, FrozenFeatureModel, LiveImageProbe
from fmtransfer.registry import RECIPES
from fmtransfer.teachers.base import Recipe, TeacherBuild


@dataclass
class ImageFMConfig(TeacherConfig):
    recipe: str = "image_probe"
    kind: Literal["foundation", "complementary"] = "foundation"
    backbone: str = "efficientnet-lite0"
    weights: str | None = None
    """A local state-dict file for the backbone (default: the one shipped in the weights package)."""
    feature: str = "image"
    """The task's image view: float (N, C, H, W) in [0, 1]; one channel is copied to three."""
    resolution: int = 96
    """Images are upsampled (bilinear) to resolution x resolution before the backbone."""
    normalize: Literal["lite", "imagenet"] = "lite"
    """`lite`: (x - 0.5) / 0.5, the EfficientNet-Lite convention; `imagenet`: ImageNet mean/std."""
    tap: int | None = None
    """Probe only: read the output of MBConv block `tap` (0-based) instead of the final 1280-d map."""
    grid: int = 1
    """Probe only: average-pool the map to grid x grid cells and join them (1: global average; a larger
    grid keeps where in the image a feature fired, which digits need)."""
    hidden: list[int] = field(default_factory=list)
    """Layers of the head between the pooled features and the output (empty: a linear head)."""
    dropout: float = 0.0
    feature_batch_size: int = 128
    """Images per backbone call when features are computed, and per chunk when predicting."""
    bf16: bool = False
    """Run the frozen backbone under bf16 autocast when filling the feature cache (faster on a CPU with AMX,
    close to fp32: docs/performance.md); part of the cache key and fingerprint when on."""

    fingerprint_optional: ClassVar[dict[str, Any]] = {"bf16": False}
    """Options added after artifacts existed: left out of the teacher fingerprint at these defaults."""

    def backbone_spec(self) -> BackboneSpec:
        """These keys under the backbone's one name for each (`feature` -> view, `normalize` ->
        pixel_normalize, `feature_batch_size` -> batch_size)."""
        return BackboneSpec(modality="image", view=self.feature, backbone=self.backbone, weights=self.weights,
                            resolution=self.resolution, pixel_normalize=self.normalize,
                            batch_size=self.feature_batch_size, bf16=self.bf16,
                            drop_connect=getattr(self, "drop_connect", 0.0))


@dataclass
class ImageFinetuneConfig(ImageFMConfig):
    recipe: str = "image_finetune"
    top_blocks: int | None = 4
    """MBConv blocks to train, counted from the top (the 1x1 head conv always trains); null = all."""
    drop_connect: float = 0.2
    """Stochastic depth of the trained blocks (the backbone's own default)."""


# -------------------------------------------------------------------------------------------- recipes


def _stop(cfg: ImageFMConfig, net: Any) -> int:
    return len(net._blocks) if cfg.tap is None else cfg.tap + 1


class ImageProbe(Recipe):
    kind = "foundation"

    @classmethod
    def fingerprint_extra(cls, cfg: ImageFMConfig) -> str:
        return weights_hash(cfg.backbone_spec())

    @classmethod
    def build(cls, cfg: ImageFMConfig, task: TaskData, cache_dir: Path, device: torch.device) -> TeacherBuild:
        spec = cfg.backbone_spec()
        net = load_backbone(spec)
        n_blocks = len(net._blocks)
        if cfg.tap is not None and not 0 <= cfg.tap < n_blocks:
            raise ConfigError(f"teachers.*.tap: must be between 0 and {n_blocks - 1}, got {cfg.tap}")
        if cfg.grid < 1:
            raise ConfigError(f"teachers.*.grid: must be >= 1, got {cfg.grid}")
        stop = _stop(cfg, net)
        if cfg.grid == 1:
            feats, ran = cached_backbone_outputs(spec, task, cache_dir, stop, True, device)
        else:  # the whole map is cached (shared with image_finetune cut at the same block), pooled here
            maps, ran = cached_backbone_outputs(spec, task, cache_dir, stop, False, device)
            feats = torch.cat([F.adaptive_avg_pool2d(maps[s:s + 4096], cfg.grid).flatten(1)
                               for s in range(0, len(maps), 4096)])
        model = FrozenFeatureModel(task, feats, cfg.hidden, cfg.dropout, cfg.feature_batch_size)
        return TeacherBuild(model, frozen_params=used_params(net, stop), encoder_forwards=ran)

    @classmethod
    def token_states(cls, cfg: ImageFMConfig, task: TaskData, cache_dir: Path,
                     device: torch.device) -> torch.Tensor | None:
        """Patch states: the tapped block's cached map average-pooled to grid x grid (at least 2 x 2), one
        token per cell, (rows, cells, channels) in fp16."""
        spec = cfg.backbone_spec()
        maps, _ = cached_backbone_outputs(spec, task, cache_dir, _stop(cfg, load_backbone(spec)), False, device)
        g = max(cfg.grid, 2)
        return torch.cat([F.adaptive_avg_pool2d(maps[s:s + 4096].float(), g).flatten(2).transpose(1, 2).half()
                          for s in range(0, len(maps), 4096)])

    @classmethod
    def live_model(cls, cfg: ImageFMConfig, task: TaskData) -> Any:
        """The probe as it would serve a request: the backbone runs live on the request's pixels (serve-bench)."""
        from fmtransfer.teachers.live import LiveSpec

        spec = cfg.backbone_spec()
        net = load_backbone(spec).eval()
        model = LiveImageProbe(spec, task, net, _stop(cfg, net), cfg.grid, cfg.hidden, cfg.dropout)
        return LiveSpec(model, backbone=cfg.backbone, backbone_files={"backbone weights": os.path.getsize(
            weights_path(spec))}, backbone_prefix="backbone.", cached_prefix="feats")


class ImageFinetune(ImageProbe):
    live_model = None  # type: ignore[assignment]  # the fine-tuned blocks have no live serving path yet

    @classmethod
    def build(cls, cfg: ImageFinetuneConfig, task: TaskData, cache_dir: Path,  # type: ignore[override]
              device: torch.device) -> TeacherBuild:
        spec = cfg.backbone_spec()
        net = load_backbone(spec)
        n_blocks = len(net._blocks)
        if cfg.tap is not None:
            raise ConfigError("teachers.*.tap: only the image_probe recipe taps an earlier block")
        if cfg.top_blocks is not None and not 0 <= cfg.top_blocks <= n_blocks:
            raise ConfigError(f"teachers.*.top_blocks: must be between 0 and {n_blocks}, got {cfg.top_blocks}")
        cut = 0 if cfg.top_blocks is None else n_blocks - cfg.top_blocks
        maps, ran = None, 0
        frozen = 0
        if cut > 0:
            maps, ran = cached_backbone_outputs(spec, task, cache_dir, cut, False, device)
            maps = maps.half()  # stored and held as fp16: the top blocks read them as fp32
            frozen = used_params(net, cut)
        net.train()
        model = FinetuneImageModel(spec, task, net, cut, maps, cfg.hidden, cfg.dropout)
        return TeacherBuild(model, frozen_params=frozen, encoder_forwards=ran)


RECIPES.register("image_probe", ImageFMConfig, ImageProbe)
RECIPES.register("image_finetune", ImageFinetuneConfig, ImageFinetune)
