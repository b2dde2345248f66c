"""`FMFinetuneMethod`: the base of the fine-tuning baselines (`finetune`, `lp_ft`, `wise_ft`, `lora`).

It trains the model `build_model` returns (the foundation model with a linear head, models/fm_finetune.py)
with the task loss on labeled rows, times the training part of every epoch (from an epoch's first step to
its validation), and reports trainable parameters and the uncached inference cost per example into
metrics.json["method_diagnostics"]. `build_probed_model` is lp_ft's stage 1 (a linear probe on the frozen
backbone), which `lora` and `wise_ft` reuse.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from fmtransfer.data.base import TaskData
from fmtransfer.methods.base import BuildContext, Built, Method
from fmtransfer.methods.losses import masked_task_loss
from fmtransfer.models.base import TaskModel
from fmtransfer.models.fm_finetune import FMFinetuneConfig, ProbeStageConfig, build_fm_model, fit_probe_head
from fmtransfer.train.loop import predict_rows
from fmtransfer.utils import count_params


def build_probed_model(cfg: ProbeStageConfig, ctx: BuildContext, task: TaskData) -> Built:
    """The backbone with its linear head trained on the frozen features (stage 1); `info` says how."""
    model = build_fm_model(cfg, task, ctx.device)
    return Built(model, info=fit_probe_head(model, task, cfg, ctx.device, seed=ctx.seed))


class FMFinetuneMethod(Method):
    """Task loss on the labeled rows of the model `build_model` returns; timing and parameter diagnostics."""

    def __init__(self, cfg: FMFinetuneConfig, student: TaskModel, task: TaskData, teachers: dict[str, Any],
                 built: Built | None = None) -> None:
        super().__init__(cfg, student, task, teachers, built)
        self.build_info: dict[str, Any] = dict(built.info) if built is not None else {}
        self._epoch_t0: float | None = None
        self.epoch_seconds: list[float] = []

    @classmethod
    def build_model(cls, cfg: FMFinetuneConfig, ctx: BuildContext, task: TaskData) -> Built | None:  # type: ignore[override]
        return Built(build_fm_model(cfg, task, ctx.device))

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.training and self._epoch_t0 is None:
            self._epoch_t0 = time.perf_counter()
        pred = self.student(batch)
        task = masked_task_loss(pred, batch["y"], batch["labeled"], self.task_type)
        return {"loss": task, "task": task.detach()}

    def on_epoch_end(self) -> None:
        """The epoch's training seconds: from its first step to here, just before its validation."""
        if self._epoch_t0 is not None:
            self.epoch_seconds.append(time.perf_counter() - self._epoch_t0)
            self._epoch_t0 = None

    def diagnostics(self) -> dict[str, Any]:
        secs = self.epoch_seconds
        return {"trainable_params": count_params(self.student, trainable_only=True),
                "total_params": count_params(self.student),
                "train_s_per_epoch": round(sum(secs) / len(secs), 3) if secs else None,
                "train_s_epochs": [round(s, 3) for s in secs], **self.build_info}

    @torch.no_grad()
    def inference_ms(self, task: TaskData, device: torch.device) -> float | None:
        """Milliseconds per example of the shipped model on test rows, without any cached features."""
        n = int(getattr(self.cfg, "timing_rows", 0))
        rows = task.splits["test"][:n]
        if not n or not len(rows):
            return None
        cached = getattr(self.student, "cache_eval", None)
        if cached is not None:
            self.student.cache_eval = False  # type: ignore[assignment]
        self.eval()
        bs = int(getattr(self.cfg, "encode_batch_size", 64))
        predict_rows(self.predict, task, rows[:min(bs, len(rows))], bs, device)  # warm-up
        t0 = time.perf_counter()
        predict_rows(self.predict, task, rows, bs, device)
        ms = 1000 * (time.perf_counter() - t0) / len(rows)
        if cached is not None:
            self.student.cache_eval = cached  # type: ignore[assignment]
        return round(ms, 3)

    def report(self, task: TaskData, history: list[dict[str, Any]], out_dir: Path,
               device: torch.device) -> dict[str, Any]:
        return {"inference_ms_per_example": self.inference_ms(task, device)}
