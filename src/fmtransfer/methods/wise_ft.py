"""`wise_ft`: weight-space ensembling of the probe and the fine-tuned model (Wortsman et al.'s WiSE-FT; our
settings).

- theta_0: the zero-shot backbone with a linear probe head (the probe stage of `lp_ft`, in `build_model`).
- theta_1: the weights after the run's last planned step. Training is `lp_ft`'s (from theta_0; default) or,
  with `start: fresh`, `finetune`'s (a fresh head; the head then has no shared starting point with the probe).
- After the last step, theta_alpha = (1 - alpha) theta_0 + alpha theta_1 is scored on the validation split
  for every alpha of `alphas` (default 0, 0.1, ..., 1); the best alpha (first on ties) is loaded before the
  loop's final validation, so the loop's validation-based selection ships it unless an earlier epoch's
  fine-tuned weights scored higher on validation (metrics.json says which: `shipped`). Test and OOD rows
  are never read for the choice.
- `report` adds the whole curve (val, test, each OOD suite, their mean) to metrics.json["method_diagnostics"];
  `curve_rows` caps the test/OOD rows scored per alpha (the first of a fixed permutation; null: all) because
  every alpha re-runs the backbone over them. The shipped model's own test/OOD scores use every row.

Needs `train.patience: null` (the interpolation happens after the last planned step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fmtransfer.data.base import TaskData
from fmtransfer.errors import ConfigError
from fmtransfer.methods.base import BuildContext, Built
from fmtransfer.methods.finetune_base import FMFinetuneMethod, build_probed_model
from fmtransfer.models.base import TaskModel
from fmtransfer.models.fm_finetune import ProbeStageConfig
from fmtransfer.registry import METHODS
from fmtransfer.train.loop import predict_rows


@dataclass
class WiseFTConfig(ProbeStageConfig):
    name: str = "wise_ft"
    start: Literal["probe", "fresh"] = "probe"
    """Fine-tune from theta_0 (probe head, as lp_ft) or from a fresh head (as finetune)."""
    alphas: list[float] = field(default_factory=lambda: [round(0.1 * k, 1) for k in range(11)])
    curve_rows: int | None = None
    """Test/OOD rows scored per alpha for the reported curve (null: all)."""

    def __post_init__(self) -> None:
        if not self.alphas or any(not 0.0 <= a <= 1.0 for a in self.alphas):
            raise ConfigError(f"method.alphas: a non-empty list of values in [0, 1], got {self.alphas}")


def interpolate(theta0: dict[str, torch.Tensor], theta1: dict[str, torch.Tensor],
                alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) theta_0 + alpha theta_1 for floating tensors (exactly theta_0 at 0 and theta_1 at 1);
    integer entries (BatchNorm counters) come from theta_1."""
    out = {}
    for k, v1 in theta1.items():
        v0 = theta0[k]
        if not v1.is_floating_point() or alpha == 1.0:
            out[k] = v1.clone()
        elif alpha == 0.0:
            out[k] = v0.clone()
        else:
            out[k] = (1.0 - alpha) * v0 + alpha * v1
    return out


def _slot(key: str) -> str:
    return key.replace(".", "__")


class WiseFT(FMFinetuneMethod):
    """Fine-tunes like lp_ft/finetune, then swaps in the best interpolation with theta_0 after the last step."""

    def __init__(self, cfg: WiseFTConfig, student: TaskModel, task: TaskData, teachers: dict[str, Any],
                 built: Built | None = None) -> None:
        super().__init__(cfg, student, task, teachers, built)
        extras = built.extras if built is not None else {}
        theta0 = extras.get("theta0") or student.state_dict()
        self.theta0 = nn.Module()  # persistent buffers: theta_0 survives checkpoint/resume
        for k, v in theta0.items():
            self.theta0.register_buffer(_slot(k), v.detach().clone())
        self.total_steps: int | None = extras.get("total_steps")
        self.eval_batch_size = int(extras.get("eval_batch_size", 8192))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("alpha", torch.full((), -1.0))  # the chosen alpha; -1 until the sweep ran
        self._task = task
        self._theta1: dict[str, torch.Tensor] | None = None
        self.val_curve: list[float] = []
        self.chosen_alpha: float | None = None  # the buffer `alpha` goes back to -1 when an earlier epoch is loaded

    @classmethod
    def build_model(cls, cfg: WiseFTConfig, ctx: BuildContext,  # type: ignore[override]
                    task: TaskData) -> Built | None:
        """theta_0 (the probed model) and the loop's planned steps, after which the sweep runs."""
        if ctx.planned_steps is None:
            raise ConfigError("method wise_ft interpolates after the last planned step: set train.patience: null")
        built = build_probed_model(cfg, ctx, task)
        model = built.model
        theta0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if cfg.start == "fresh":
            gen = torch.Generator().manual_seed(ctx.seed + 1)
            head: nn.Linear = model.out  # type: ignore[assignment]
            with torch.no_grad():
                bound = 1.0 / head.in_features ** 0.5
                head.weight.copy_((torch.rand(head.weight.shape, generator=gen) * 2 - 1) * bound)
                head.bias.zero_()
        extras = {"theta0": theta0, "total_steps": ctx.planned_steps, "eval_batch_size": ctx.eval_batch_size}
        return Built(model, info=built.info, extras=extras)

    def theta0_state(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self.theta0, _slot(k)) for k in self.student.state_dict()}

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.training and torch.is_grad_enabled():
            self.steps_done += 1
        return super().losses(batch)

    def on_epoch_end(self) -> None:
        """Once the last planned step ran, sweep alpha, so the epoch's validation (and the best-epoch choice)
        reads the chosen interpolation (the epoch's timing is taken first: the sweep is not training)."""
        super().on_epoch_end()
        if self.total_steps is not None and int(self.steps_done) >= self.total_steps and float(self.alpha) < 0:
            self.eval()
            self._sweep()

    def _score(self, rows: torch.Tensor) -> float:
        device = next(self.student.parameters()).device
        return self._task.score(predict_rows(self.student, self._task, rows, self.eval_batch_size, device),
                                rows)[self._task.metric]

    @torch.no_grad()
    def _sweep(self) -> None:
        """Score every alpha on validation, load the best (the loop's last validation then reads it)."""
        task = self._task
        self._theta1 = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
        theta0 = self.theta0_state()
        sign = 1.0 if task.higher_is_better else -1.0
        self.val_curve = []
        for a in self.cfg.alphas:
            self.student.load_state_dict(interpolate(theta0, self._theta1, a))
            self.val_curve.append(self._score(task.splits["val"]))
        best = max(range(len(self.val_curve)), key=lambda k: (sign * self.val_curve[k], -k))
        self.alpha.fill_(self.cfg.alphas[best])
        self.chosen_alpha = float(self.cfg.alphas[best])
        self.student.load_state_dict(interpolate(theta0, self._theta1, self.cfg.alphas[best]))

    @torch.no_grad()
    def report(self, task: TaskData, history: list[dict[str, Any]], out_dir: Path,
               device: torch.device) -> dict[str, Any]:
        out = super().report(task, history, out_dir, device)
        alpha = self.chosen_alpha
        best_epochs = [h["epoch"] for h in history if h.get("best")]
        shipped = ("no interpolation ran" if alpha is None else
                   f"alpha {alpha:g}" if history and history[-1].get("best") else
                   f"epoch {best_epochs[-1] if best_epochs else '?'} fine-tuned weights (better on validation than "
                   f"alpha {alpha:g})")
        out["wise_ft"] = {"alpha": alpha, "alphas": list(self.cfg.alphas), "shipped": shipped}
        if self._theta1 is None:
            out["wise_ft"]["curve"] = None  # the sweep ran in an earlier process (resumed run) or never
            return out
        shipped_state = {k: v.clone() for k, v in self.student.state_dict().items()}
        theta0, n = self.theta0_state(), self.cfg.curve_rows
        perm = torch.randperm(task.num_rows, generator=torch.Generator().manual_seed(0))
        rank = torch.empty_like(perm)
        rank[perm] = torch.arange(len(perm))

        def capped(rows: torch.Tensor) -> torch.Tensor:  # the first n rows of a fixed permutation
            return rows if n is None or len(rows) <= n else torch.sort(rows[torch.argsort(rank[rows])[:n]]).values

        suites = {"test": capped(task.splits["test"])} | {
            f"ood/{s}": capped(task.splits[f"ood/{s}"]) for s in task.ood_suites}
        curve: dict[str, list[float]] = {"val": list(self.val_curve)} | {k: [] for k in suites}
        self.eval()
        for a in self.cfg.alphas:
            self.student.load_state_dict(interpolate(theta0, self._theta1, a))
            for k, rows in suites.items():
                curve[k].append(self._score(rows))
        ood = [curve[k] for k in suites if k.startswith("ood/")]
        if ood:
            curve["ood_mean"] = [sum(v) / len(v) for v in zip(*ood, strict=True)]
        self.student.load_state_dict(shipped_state)
        out["wise_ft"] |= {"curve": curve, "curve_rows": {k: len(r) for k, r in suites.items()}}
        if any(math.isnan(v) for v in curve["val"]):
            out["wise_ft"]["warning"] = "nan in the validation curve"
        return out


METHODS.register("wise_ft", WiseFTConfig, WiseFT)
