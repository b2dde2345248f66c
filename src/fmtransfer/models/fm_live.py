"""The live path of the tapped-layer methods: raw inputs -> the backbone, run only to the deepest tap -> pooled
features, computed at every step instead of read from the cache.

Three users: inference (`LiveTaps` inside `measure_latency`, the figure behind LEVI's inference-cost target),
`lora: true` (the backbone gets LoRA adapters that train) and `tune_backbone: true` (every backbone weight up to
the deepest tap trains). The cached path and the configuration live in `fm_layers.py`; `build_taps` here picks
one of the two paths. The backbone runs through `fmtransfer.backbones` (text: `TextBackbone`; images:
`ImageBackbone`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmtransfer.backbones.image import ImageBackbone, Preprocess, load_backbone, used_params
from fmtransfer.backbones.lora import lora_backbone
from fmtransfer.backbones.spec import text_view
from fmtransfer.backbones.text import TextBackbone, encoder_param_count, text_layer_paths, text_used_params
from fmtransfer.data.base import TaskData, image_view
from fmtransfer.models.fm_layers import (
    FMFeatures,
    FMLayersConfig,
    TappedFeatures,
    fit_rows,
    fm_features,
    modality_of,
    tap_depths,
)


def build_taps(cfg: FMLayersConfig, task: TaskData, cache_dir: str | Path,
               device: torch.device) -> tuple[TappedFeatures, FMFeatures]:
    """The tapped features a method reads: cached frozen features, or (`lora` / `tune_backbone`) the live path."""
    if cfg.lora or cfg.tune_backbone:
        return live_taps(cfg, task, device)
    fm = fm_features(cfg, task, cache_dir, device)
    return TappedFeatures(fm, cfg.standardize, fit_rows(task)), fm


def live_taps(cfg: FMLayersConfig, task: TaskData, device: torch.device) -> tuple[TappedFeatures, FMFeatures]:
    """`lora` / `tune_backbone`: taps computed live by the trainable backbone (no cache is read or written)."""
    from fmtransfer.train.loop import to_device

    modality = modality_of(cfg, task)
    spec = cfg.backbone_spec()
    if modality == "text":
        text_view(spec, task, f"method {cfg.name}")
        paths = text_layer_paths(cfg.encoder)
        n = len(paths)
        depths = tap_depths(cfg, n)
        names = [paths[d - 1] for d in depths]
        total = encoder_param_count(cfg.encoder)
        used = text_used_params(cfg.encoder, max(depths), total)
    else:
        image_view(task, spec.feature, "method.view")
        net = load_backbone(spec)
        n = len(net._blocks)
        depths = tap_depths(cfg, n)
        names = [f"block{d}" if d < n else "head" for d in depths]
        total, used = sum(p.numel() for p in net.parameters()), used_params(net, max(depths))
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
        spec = cfg.backbone_spec()
        if self.modality == "text":
            fm = TextBackbone(spec)
            self.tok, self.net, self._spec = fm.tok, fm.net, spec
            paths = fm.layer_paths
            fm.cut(deepest)
            if lora:
                self._add_lora(self.net, image=False)
            self.paths = [paths[n - 1]] if full else [paths[d - 1] for d in depths]
            self.view = text_view(spec, task, f"method {cfg.name}")
            self.texts = task.texts[self.view].texts
            self.index = task.texts[self.view].index
        else:
            net = load_backbone(spec)
            if lora:  # on the whole net (its module names are the targets'), before it is cut at the deepest tap
                self._add_lora(net, image=True)
            self.net = ImageBackbone(net, deepest).eval()
            self.pre = Preprocess.of(spec)
            self.feature = spec.feature
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
                texts = [self.texts[i] for i in idx]
                fm = TextBackbone(self._spec, self.tok, self.net)
                # one call in the batch's order while it fits a chunk (training); else shortest first
                return fm.encode(texts, self.paths, chunk=self.chunk,
                                 order="given" if len(texts) <= self.chunk else "shortest")
            x = batch[self.feature]
            if len(x) <= self.chunk:
                return self._image(x)
            parts = [self._image(x[s:s + self.chunk]) for s in range(0, len(x), self.chunk)]
            return [torch.cat(f) for f in zip(*parts, strict=True)]

    def _image(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.net.intermediates(self.pre(x.float()), self.depths)


def _drop_frozen(module: LiveTaps, state: dict[str, Any], prefix: str, _meta: Any) -> None:
    """State-dict hook: the frozen backbone weights are not saved (they equal the package's); the adapters are."""
    for k in module._frozen:
        state.pop(f"{prefix}net.{k}", None)


def _fill_frozen(module: LiveTaps, state: dict[str, Any], prefix: str, *_: Any) -> None:
    """Load hook: a state dict without the frozen backbone weights keeps the module's own (the package's)."""
    own = module.net.state_dict(keep_vars=True)
    for k in module._frozen:
        state.setdefault(f"{prefix}net.{k}", own[k].detach())


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
