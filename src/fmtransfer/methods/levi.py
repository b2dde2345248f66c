"""`levi`: a frozen foundation model ensembled layer-wise and adaptively with a small task model.

Our design (only the LEVI paper's abstract could be read; every choice below is an option, see
docs/levi.md):
- Tapped layers l (default 50%, 75%, 100% of the backbone's depth), pooled features p_l read from the
  cache (the backbone is frozen: models/fm_layers.py).
- The small task-specific model g is the task's student model (`run_cfg.student`: hashed n-grams on
  reviews, a tiny CNN on digits), trained from scratch: u = g.body(x).
- One adapter per tapped layer: z_l = A_l([LN(p_l); u]), an MLP to the outputs.
- Ensemble z = sum_m w_m z_m, with w = softmax(beta) (learned, `weighting: learned`), fixed uniform
  weights, or an input-dependent gate w(x) = softmax(G([u; LN(p_deepest)])). With `small_head: member`
  the small model's own head g.head(u) is one more member.
- Loss: task(z, y) + l_layer * mean_m task(z_m, y) (CE for classes, MSE for regression), labeled rows;
  `ensemble_grad: weights` lets the first term train only the weights (members learn from their own terms).
- Trainable: g, the adapters (with their LayerNorms), beta or the gate. The backbone's own weights never
  train. `method.lora: true` adds LoRA adapters (peft) to it: p_l are then computed live from the raw inputs
  by the adapted backbone (cut at the deepest tap) on every step and evaluation instead of read from the
  cache, and the LoRA weights train with the rest (models/fm_live.py: `live_taps`). `method.tune_backbone:
  true` does the same with every backbone weight up to the deepest tap trainable (full fine-tuning inside
  LEVI); `backbone_lr_scale` sets the backbone's lr relative to LEVI's own layers.
At inference the backbone runs only up to the deepest tapped layer (`LiveTaps`), then g and the adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fmtransfer.config import ModelConfig
from fmtransfer.data.base import TaskData
from fmtransfer.errors import ConfigError
from fmtransfer.methods.linear_probe import FMMethod, FMModel
from fmtransfer.methods.losses import masked_task_loss
from fmtransfer.models.base import TaskModel, mlp, output_dim
from fmtransfer.models.fm_layers import FMFeatures, FMLayersConfig, TappedFeatures, describe
from fmtransfer.registry import METHODS, MODELS
from fmtransfer.train.loop import predict_rows


@dataclass
class LEVIConfig(FMLayersConfig):
    name: str = "levi"
    adapter_hidden: list[int] = field(default_factory=lambda: [128])
    """Hidden layers of each adapter A_l ([] = linear)."""
    dropout: float = 0.1
    weighting: Literal["learned", "uniform", "gate"] = "learned"
    """learned: w = softmax(beta); uniform: w = 1/M fixed; gate: w(x) = softmax(G([u; LN(p_deepest)]))."""
    small_head: Literal["member", "aux", "none"] = "member"
    """The small model's own head g.head(u): an ensemble member, only a layer-wise (auxiliary) loss term,
    or unused."""
    small_view: bool = True
    """Adapters read [LN(p_l); u]; false: LN(p_l) alone (ablation: no small-model view in the adapters)."""
    small_grad: Literal["all", "own"] = "all"
    """all: g learns from every term; own: the adapters read stop-grad(u), so g learns only through its own
    head (keeps the small model an independent ensemble member; needs small_head member or aux)."""
    view_dropout: float = 0.0
    """While training, hide u from the adapters (zero it) for this fraction of rows, so each adapter must also
    stand on its FM layer alone instead of leaning on the small model's (memorising) features."""
    combine: Literal["logits", "probs"] = "logits"
    """Mix the members' logits, or their class probabilities (the loss is then the mixture's NLL)."""
    l_layer: float = 1.0
    """Weight of the layer-wise term mean_m task(z_m, y)."""
    ensemble_grad: Literal["all", "weights"] = "all"
    """all: the ensemble loss trains the members jointly; weights: it sees the members' outputs detached and
    trains only the weights (or gate), so each member learns from its own layer-wise term alone, as the
    independently trained members of the cheap `ensemble` do (needs l_layer > 0)."""
    small: ModelConfig | None = None
    """The small model; null = the run's `student` section (the teacher recipe must set it)."""
    small_lr_scale: float = 1.0
    """The small model trains at train.lr * small_lr_scale: trained from scratch, it may need a larger step than
    LEVI's adapters, above all beside a fine-tuned backbone whose lr sets the budget (`tune_backbone`)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.small_grad == "own" and self.small_head == "none":
            raise ConfigError("method.small_grad: 'own' trains g through its own head; set small_head member or aux")
        if not self.small_view and self.small_head == "none":
            raise ConfigError("method.small_view: false with small_head none leaves the small model unused")
        if not 0 <= self.view_dropout < 1:
            raise ConfigError(f"method.view_dropout: must be in [0, 1), got {self.view_dropout}")
        if self.small_lr_scale <= 0:
            raise ConfigError(f"method.small_lr_scale: must be > 0, got {self.small_lr_scale}")
        if self.l_layer < 0:
            raise ConfigError(f"method.l_layer: must be >= 0, got {self.l_layer}")
        if self.ensemble_grad == "weights" and self.l_layer <= 0:
            raise ConfigError("method.ensemble_grad: 'weights' leaves the members untrained without the layer-wise "
                              "term; set l_layer > 0")


class LEVIModel(FMModel):
    """body = [u; LN(p_1); ...; LN(p_L)]; head = the weighted ensemble of the members read from it. The p_l
    come from `taps`: cached tables, or (lora) the adapted backbone run on the batch."""

    def __init__(self, cfg: LEVIConfig, task: TaskData, taps: TappedFeatures, fm: FMFeatures,
                 small: TaskModel) -> None:
        super().__init__()
        self.cfg, self.task_type = cfg, task.task_type
        self.taps, self.fm_info, self.small = taps, describe(fm), small
        self.out_dim = output_dim(task)
        if cfg.combine == "probs" and task.task_type == "regression":
            raise ConfigError("method.combine: 'probs' needs a classification task; use logits")
        u = small.rep_dim if cfg.small_view else 0
        self.adapters = nn.ModuleList([mlp([d + u, *cfg.adapter_hidden, self.out_dim], cfg.dropout)
                                       for d in taps.dims])
        self.drop = nn.Dropout(cfg.dropout)
        self.members = len(taps.dims) + (1 if cfg.small_head == "member" else 0)
        self.member_names = [f"layer:{n}" for n in taps.names] + (["small"] if cfg.small_head == "member" else [])
        if cfg.weighting == "learned":
            self.beta = nn.Parameter(torch.zeros(self.members))
        else:
            self.register_buffer("beta", torch.zeros(self.members))
        self.gate = nn.Linear(small.rep_dim + taps.dims[-1], self.members) if cfg.weighting == "gate" else None
        if self.gate is not None:
            nn.init.zeros_(self.gate.weight)
            nn.init.zeros_(self.gate.bias)
        self.rep_dim = small.rep_dim + sum(taps.dims)

    def body_with(self, batch: dict[str, torch.Tensor], ps: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.small.body(batch), *ps], dim=-1)

    def split(self, h: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        parts = torch.split(h, [self.small.rep_dim, *self.taps.dims], dim=-1)
        return parts[0], list(parts[1:])

    def member_outputs(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(members' outputs (B, M, out_dim), weights (B, M), the small head's output when it is only aux)."""
        u, ps = self.split(h)
        u_in = u.detach() if self.cfg.small_grad == "own" else u
        if self.training and self.cfg.view_dropout > 0:
            u_in = u_in * (torch.rand(len(u_in), 1, device=u_in.device) >= self.cfg.view_dropout).to(u_in.dtype)
        zs = [a(self.drop(torch.cat([p, u_in], -1) if self.cfg.small_view else p)) for a, p in
              zip(self.adapters, ps, strict=True)]
        small_out = None
        if self.cfg.small_head != "none":
            small_out = self.small.head(u)
            small_out = small_out.unsqueeze(-1) if small_out.dim() == 1 else small_out
            if self.cfg.small_head == "member":
                zs.append(small_out)
        z = torch.stack(zs, dim=1)
        if self.gate is not None:
            w = F.softmax(self.gate(torch.cat([u, ps[-1]], -1)), dim=-1)
        else:
            w = F.softmax(self.beta, dim=0).expand(len(h), -1)
        return z, w, small_out if self.cfg.small_head == "aux" else None

    def combine(self, z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.cfg.combine == "probs":
            return torch.log((w.unsqueeze(-1) * F.softmax(z.float(), -1)).sum(1).clamp(min=1e-12))
        out = (w.unsqueeze(-1) * z).sum(1)
        return out.squeeze(-1) if self.task_type == "regression" else out

    def head(self, h: torch.Tensor) -> torch.Tensor:
        z, w, _ = self.member_outputs(h)
        return self.combine(z, w)

    def offset(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | float:
        return self.small.offset(batch)

    def penalty(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | float:
        return self.small.penalty(batch)


def levi_loss(ensemble: torch.Tensor, members: list[torch.Tensor], y: torch.Tensor, labeled: torch.Tensor,
              task_type: str, l_layer: float) -> dict[str, Any]:
    """task(z, y) + l_layer * mean_m task(z_m, y) over labeled rows; also each member's term."""
    ens = masked_task_loss(ensemble, y, labeled, task_type)
    per = [masked_task_loss(o, y, labeled, task_type) for o in members]
    layer = torch.stack(per).mean()
    return {"loss": ens + l_layer * layer, "ensemble": ens.detach(), "layerwise": layer.detach(), "per_member": per}


def levi_model(cfg: LEVIConfig, task: TaskData, taps: TappedFeatures, fm: FMFeatures,
               small_cfg: ModelConfig | None) -> LEVIModel:
    small_cfg = cfg.small or small_cfg
    if small_cfg is None:
        raise ConfigError("method.small: LEVI needs a small task model (set method.small or the run's student)")
    small = MODELS.get(small_cfg.name).impl(small_cfg, task)
    return LEVIModel(cfg, task, taps, fm, small)


class LEVI(FMMethod):
    """Ensemble loss + the layer-wise loss over every member (and the small head when it is auxiliary)."""

    model_cls = LEVIModel

    @classmethod
    def make_model(cls, cfg: Any, task: TaskData, taps: TappedFeatures, fm: FMFeatures, run_cfg: Any) -> FMModel:
        return levi_model(cfg, task, taps, fm, getattr(run_cfg, "student", None))

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        model: LEVIModel = self.student  # type: ignore[assignment]
        h = model.body(batch)
        z, w, aux = model.member_outputs(h)
        off = model.offset(batch)
        y, lab = batch["y"], batch["labeled"]
        reg = self.task_type == "regression"
        outs = [z[:, m] for m in range(z.shape[1])] + ([aux] if aux is not None else [])
        outs = [(o.squeeze(-1) if reg else o) + off for o in outs]
        z_ens = z.detach() if self.c.ensemble_grad == "weights" else z
        terms = levi_loss(model.combine(z_ens, w) + off, outs, y, lab, self.task_type, self.c.l_layer)
        names = model.member_names + (["small_aux"] if aux is not None else [])
        for name, v in zip(names, terms.pop("per_member"), strict=True):
            terms[f"member:{name}"] = v.detach()
        return terms

    def lr_scales(self) -> dict[float, list[nn.Parameter]]:
        """The backbone's scale (`FMMethod`) plus the small model's own (`small_lr_scale`)."""
        scales = super().lr_scales()
        if self.c.small_lr_scale != 1.0:
            small = [p for p in self.student.small.parameters() if p.requires_grad]  # type: ignore[union-attr]
            scales.setdefault(self.c.small_lr_scale, []).extend(small)
        return scales

    def report(self, task: TaskData, history: list[dict[str, Any]], out_dir: Path,
               device: torch.device) -> dict[str, Any]:
        """Ensemble weights (mean over validation rows), each member's validation score, and latency."""
        out = super().report(task, history, out_dir, device)
        model: LEVIModel = self.student  # type: ignore[assignment]
        model.eval()
        rows = task.splits["val"]
        with torch.no_grad():
            h = predict_rows(model.body, task, rows, 4096, device)
            z, w, _ = model.member_outputs(h)
        out["weights"] = {n: round(float(v), 4) for n, v in zip(model.member_names, w.mean(0), strict=True)}
        reg = self.task_type == "regression"
        off = model.offset(task.gather(rows)) if reg else 0.0
        out["member_val"] = {n: task.score((z[:, m].squeeze(-1) if reg else z[:, m]) + off, rows)[task.metric]
                             for m, n in enumerate(model.member_names)}
        return out


METHODS.register("levi", LEVIConfig, LEVI)
