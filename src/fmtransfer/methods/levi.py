"""`levi`: a frozen foundation model ensembled layer-wise and adaptively with a small task model.

Our design (only the LEVI paper's abstract could be read; every choice below is an option, see
docs/levi.md):
- Tapped layers l (default 50%, 75%, 100% of the backbone's depth), pooled features p_l read from the
  cache (the backbone is frozen: models/fm_layers.py).
- The small task-specific model g is `method.small`, else the run's student model (`BuildContext.small`:
  hashed n-grams on reviews, a tiny CNN on digits), trained from scratch: u = g.body(x).
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

from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmtransfer.config import ModelConfig
from fmtransfer.data.base import TaskData
from fmtransfer.errors import ConfigError
from fmtransfer.methods.fm_base import FMMethod
from fmtransfer.methods.losses import masked_task_loss
from fmtransfer.models.fm_heads import FMModel, LEVIConfig, LEVIModel
from fmtransfer.models.fm_layers import FMFeatures, TappedFeatures
from fmtransfer.registry import METHODS, MODELS
from fmtransfer.train.loop import predict_rows


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
    def make_model(cls, cfg: Any, task: TaskData, taps: TappedFeatures, fm: FMFeatures,
                   small: ModelConfig | None) -> FMModel:
        return levi_model(cfg, task, taps, fm, small)

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
