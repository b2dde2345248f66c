"""The models the frozen-FM methods train and ship (`linear_probe`, `mlp_probe`, `levi`, `ensemble`) and their configs.

They live here, under models/, so that the serving loader can rebuild a shipped one without importing any
training code (methods/ register the methods that train them). Each reads the FM's pooled features at the
tapped layers through `taps` (cached tables while training; `FMModel.live` takes features computed from raw
inputs, which is how `models/fm_serve.py` serves them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from fmtransfer.config import ModelConfig
from fmtransfer.data.base import TaskData
from fmtransfer.errors import ConfigError
from fmtransfer.models.base import TaskModel, mlp, output_dim, squeeze_regression
from fmtransfer.models.fm_layers import FMFeatures, FMLayersConfig, TappedFeatures, describe


class FMModel(TaskModel):
    """A model that reads the cached tapped features; `body_with` takes them already normalised so that
    the live path (features computed from raw inputs) runs the very same layers."""

    taps: TappedFeatures
    fm_info: dict[str, Any]

    def body_with(self, batch: dict[str, torch.Tensor], ps: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def body(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.body_with(batch, self.taps(batch))

    def live(self, batch: dict[str, torch.Tensor], raw: list[torch.Tensor]) -> torch.Tensor:
        """The prediction from features the backbone computed just now (`raw`, before normalisation)."""
        return self.head(self.body_with(batch, self.taps.normalise(raw))) + self.offset(batch)


class ProbeModel(FMModel):
    """Normalised tapped features, concatenated -> optional MLP -> linear output."""

    def __init__(self, cfg: ProbeConfig, task: TaskData, taps: TappedFeatures, fm: FMFeatures) -> None:
        super().__init__()
        self.taps, self.fm_info, self.task_type = taps, describe(fm), task.task_type
        width = sum(taps.dims)
        self.drop = nn.Dropout(cfg.dropout)
        self.trunk = nn.Sequential(mlp([width, *cfg.hidden], cfg.dropout), nn.GELU()) if cfg.hidden else nn.Identity()
        self.rep_dim = cfg.hidden[-1] if cfg.hidden else width
        self.out_dim = output_dim(task)
        self.out = nn.Linear(self.rep_dim, self.out_dim)
        mean = task.y[task.splits["train"]].float().mean() if task.task_type == "regression" else torch.tensor(0.0)
        self.register_buffer("mean", mean.reshape(1))

    def body_with(self, batch: dict[str, torch.Tensor], ps: list[torch.Tensor]) -> torch.Tensor:
        return self.trunk(self.drop(torch.cat(ps, dim=-1)))

    def head(self, z: torch.Tensor) -> torch.Tensor:
        return squeeze_regression(self.out(z), self.task_type)

    def offset(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | float:
        return self.mean if self.task_type == "regression" else 0.0


@dataclass
class ProbeConfig(FMLayersConfig):
    name: str = "linear_probe"
    layers: list[float] = field(default_factory=lambda: [1.0])
    """The last layer by default; [0.5, 0.75, 1.0] reads the tapped layers concatenated."""
    hidden: list[int] = field(default_factory=list)
    """Empty: a linear head (the probe); `mlp_probe` sets hidden layers."""
    dropout: float = 0.0


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
            w = F.softmax(self.beta, dim=0).expand(h.shape[0], -1)  # shape[0]: a traced graph keeps it dynamic
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


@dataclass
class EnsembleConfig(ProbeConfig):
    name: str = "ensemble"
    layers: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0])
    """The probe member reads these layers (default: the same ones as `levi` and `mlp_probe`)."""
    hidden: list[int] = field(default_factory=lambda: [256])
    """The probe member's hidden layers ([] = a linear probe)."""
    dropout: float = 0.1
    small_weight: float = 0.5
    """Weight of the small model's probabilities (the probe's is 1 - small_weight)."""
    small: ModelConfig | None = None
    """The small model; null = the run's `student` section."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.small_weight <= 1:
            raise ConfigError(f"method.small_weight: must be in [0, 1], got {self.small_weight}")


class EnsembleModel(FMModel):
    """body = [u; probe representation]; head = the weighted mean of the two members' probabilities."""

    def __init__(self, cfg: EnsembleConfig, task: TaskData, taps: TappedFeatures, fm: FMFeatures,
                 small: TaskModel) -> None:
        super().__init__()
        self.small, self.probe = small, ProbeModel(cfg, task, taps, fm)
        self.taps, self.fm_info, self.task_type, self.w = taps, describe(fm), task.task_type, cfg.small_weight
        self.rep_dim = small.rep_dim + self.probe.rep_dim
        self.out_dim = self.probe.out_dim

    def body_with(self, batch: dict[str, torch.Tensor], ps: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([self.small.body(batch), self.probe.body_with(batch, ps)], dim=-1)

    def member_outputs(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        u, r = torch.split(h, [self.small.rep_dim, self.probe.rep_dim], dim=-1)
        return self.small.head(u), self.probe.head(r)

    def head(self, h: torch.Tensor) -> torch.Tensor:
        a, b = self.member_outputs(h)
        if self.task_type == "regression":
            return self.w * a + (1 - self.w) * b
        mix = self.w * a.float().softmax(-1) + (1 - self.w) * b.float().softmax(-1)
        return torch.log(mix.clamp(min=1e-12))

    def offset(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | float:
        if self.task_type != "regression":
            return 0.0
        return self.w * self.small.offset(batch) + (1 - self.w) * self.probe.offset(batch)  # type: ignore[operator]

    def penalty(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | float:
        return self.small.penalty(batch)
