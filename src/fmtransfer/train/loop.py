"""The training loop shared by every method and by teacher preparation.

Selection is on the validation split only: the state with the best validation score is kept and
returned; test and OOD splits are never looked at here. A checkpoint is written atomically after
every epoch; `resume=True` continues from it with the same batches, optimizer and RNG state.
Progress: one line per epoch on stderr (rank 0), terminal or not; step bars only on a terminal and not
under TQDM_DISABLE.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from fmtransfer.config import TrainConfig
from fmtransfer.data.base import TaskData
from fmtransfer.errors import TrainingDiverged
from fmtransfer.train.batches import BatchPlan
from fmtransfer.train.checkpoint import load_checkpoint, save_checkpoint
from fmtransfer.train.distributed import DistContext
from fmtransfer.utils import bars_enabled

DEBUG_EXIT_ENV = "FMTRANSFER_DEBUG_EXIT_AFTER_EPOCH"
"""Tests set this to N to make the process die right after epoch N's checkpoint (a real kill)."""
DEBUG_EXIT_RANK_ENV = "FMTRANSFER_DEBUG_EXIT_RANK"
"""With DEBUG_EXIT_ENV: only this rank dies (its torchrun peers then lose it mid-job)."""


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_score: float
    last_state: dict[str, torch.Tensor]
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    teacher_rows_read: int = 0


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def make_batch(task: TaskData, rows: torch.Tensor, labeled: torch.Tensor | None,
               teacher_outputs: dict[str, torch.Tensor],
               teacher_reps: dict[str, np.ndarray | torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Gather features, target, labeled mask and each needed teacher's cached outputs (and
    representations, `teacher_rep:<name>`) for `rows`."""
    batch = task.gather(rows)
    batch["labeled"] = labeled if labeled is not None else torch.ones(len(rows), dtype=torch.bool)
    for name, out in teacher_outputs.items():
        batch[f"teacher:{name}"] = out[rows].float()
    idx = rows.numpy()
    for name, reps in (teacher_reps or {}).items():
        batch[f"teacher_rep:{name}"] = (reps.index_select(0, rows).float() if isinstance(reps, torch.Tensor)  # fit()
                                        else torch.from_numpy(np.asarray(reps[idx], dtype=np.float32)))
    return batch


@torch.no_grad()
def predict_rows(model: Callable[[dict[str, torch.Tensor]], torch.Tensor], task: TaskData,
                 rows: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    """Predictions for `rows` in batches, on CPU."""
    outs = []
    for s in range(0, len(rows), batch_size):
        r = rows[s:s + batch_size]
        outs.append(model(to_device(task.gather(r), device)).float().cpu())
    return torch.cat(outs) if outs else torch.empty(0)


def score_split(predict: Callable[[dict[str, torch.Tensor]], torch.Tensor], task: TaskData, split: str,
                batch_size: int, ctx: DistContext) -> dict[str, float]:
    """Metrics of `predict` on one split (a streamed task scores it by a pass over its shards)."""
    own = getattr(task, "score_split", None)
    if own is not None:
        return own(predict, split, batch_size, ctx.device, ctx.rank, ctx.world)
    rows = task.splits[split]
    return task.score(predict_rows(predict, task, rows, batch_size, ctx.device), rows)


def _score(task: TaskData, metrics: dict[str, float]) -> float:
    v = metrics[task.metric]
    return v if task.higher_is_better else -v


def _cpu_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def param_groups(method: nn.Module, lr: float) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: one at `lr`, unless the method's `lr_scales()` (methods/base.py) names
    parameters that train at `lr * scale` (LEVI's fine-tuned backbone beside its from-scratch layers)."""
    scales: dict[int, float] = {id(p): s for s, ps in method.lr_scales().items() for p in ps}
    groups: dict[float, list[nn.Parameter]] = {}
    for p in method.parameters():
        if p.requires_grad:
            groups.setdefault(scales.get(id(p), 1.0), []).append(p)
    return [{"params": ps, "lr": lr * s} for s, ps in groups.items()]


def batch_plan(task: TaskData, cfg: TrainConfig, uses_transfer: bool, seed: int = 0, rank: int = 0,
               world: int = 1) -> Any:
    """The loop's batches: a `BatchPlan` over the labeled (and transfer) rows, or a streamed task's own plan."""
    own_plan = getattr(task, "batch_plan", None)  # a streamed task (data/stream.py) plans its own batches
    if own_plan is not None:
        return own_plan(uses_transfer=uses_transfer, batch_size=cfg.batch_size, steps_per_epoch=cfg.steps_per_epoch,
                        seed=seed, rank=rank, world=world)
    transfer = task.splits.get("transfer") if uses_transfer else None
    return BatchPlan(task.splits["train"], transfer, batch_size=cfg.batch_size,
                     labeled_batch_size=cfg.labeled_batch_size, steps_per_epoch=cfg.steps_per_epoch,
                     seed=seed, rank=rank, world=world)


def planned_steps(task: TaskData, cfg: TrainConfig, uses_transfer: bool) -> int | None:
    """Optimizer steps `fit` will take (epochs x steps per epoch); None when `patience` may stop it sooner."""
    if cfg.patience is not None:
        return None
    return cfg.epochs * len(batch_plan(task, cfg, uses_transfer))


def epoch_line(desc: str, epoch: int, epochs: int, entry: dict[str, Any], metric: str, seconds: float) -> str:
    """'kd epoch 3/10: train loss 0.4123, val accuracy 0.8512 (best), 2.1s' (what stderr shows per epoch)."""
    loss = entry["train"].get("loss")
    val = entry["val"].get(metric)
    parts = [f"{desc} epoch {epoch}/{epochs}:", f"train loss {loss:.4f}," if loss is not None else "",
             f"val {metric} {val:.4f}{' (best)' if entry['best'] else ''}," if val is not None else "",
             f"{seconds:.1f}s"]
    return " ".join(p for p in parts if p)


def fit(method: nn.Module, task: TaskData, cfg: TrainConfig, *, seed: int, ctx: DistContext,
        teacher_outputs: dict[str, torch.Tensor] | None = None,
        teacher_reps: dict[str, np.ndarray | torch.Tensor] | None = None,
        uses_transfer: bool = False,
        ckpt_path: str | Path | None = None, resume: bool = False, config_hash: str = "",
        desc: str = "train", log: Callable[[dict[str, Any]], None] | None = None) -> FitResult:
    """Train `method` (a methods/base.py Method: forward(batch) -> {'loss', ...}, predict(batch), and the hooks
    lr_scales() and on_epoch_end()); return the best state."""
    teacher_outputs = teacher_outputs or {}
    if teacher_reps:  # fp16 in memory once: a step's gather is then a torch index, not a memmap read + numpy cast
        teacher_reps = {n: r if isinstance(r, torch.Tensor) else torch.from_numpy(np.array(r))
                        for n, r in teacher_reps.items()}
    device = ctx.device
    method.to(device)
    plan = batch_plan(task, cfg, uses_transfer, seed, ctx.rank, ctx.world)
    groups = param_groups(method, cfg.lr)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)  # CPU too: same numbers
    total_steps = cfg.epochs * len(plan)
    if cfg.lr_schedule == "cosine":
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / max(total_steps, 1))))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model: nn.Module = method
    if ctx.enabled:
        model = DistributedDataParallel(method, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=cfg.find_unused_parameters)

    start_epoch, best_score, best_epoch, bad_epochs, steps = 0, -math.inf, -1, 0, 0
    best_state, history, rows_read = _cpu_state(method), [], 0
    if resume and ckpt_path is not None and Path(ckpt_path).exists():
        st = load_checkpoint(ckpt_path, config_hash)
        method.load_state_dict(st["method"])
        opt.load_state_dict(st["optim"])
        sched.load_state_dict(st["sched"])
        torch.set_rng_state(st["rng"])
        start_epoch, best_score, best_epoch = st["epoch"] + 1, st["best_score"], st["best_epoch"]
        best_state, history, bad_epochs, steps = st["best_state"], st["history"], st["bad_epochs"], st["steps"]
        rows_read = st.get("teacher_rows_read", 0)

    amp = cfg.precision == "bf16"
    bars = ctx.is_main and bars_enabled()
    t0 = time.perf_counter()
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.patience is not None and bad_epochs >= cfg.patience:
            break
        method.train()
        t_epoch = time.perf_counter()
        sums: dict[str, float] = {}
        batches = plan.epoch(epoch)
        bar = tqdm(batches, desc=f"{desc} {epoch + 1}/{cfg.epochs}", leave=False, unit="step", dynamic_ncols=True,
                   disable=not bars)
        for rows, labeled in bar:
            batch = to_device(make_batch(task, rows, labeled, teacher_outputs, teacher_reps), device)
            rows_read += len(rows) * len(teacher_outputs)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                terms = model(batch)
            loss = terms["loss"].float()
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"{desc}: loss became {loss.item()} at epoch {epoch + 1}; "
                                       "lower train.lr or check the inputs for NaN or inf")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            sched.step()
            steps += 1
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        bar.close()
        method.on_epoch_end()  # a method's own step after an epoch's updates (wise_ft: its alpha sweep)
        method.eval()
        val_metrics = score_split(method.predict, task, "val", cfg.eval_batch_size, ctx)
        score = _score(task, val_metrics)
        improved = score > best_score
        if improved:
            best_score, best_epoch, bad_epochs = score, epoch, 0
            best_state = _cpu_state(method)
        else:
            bad_epochs += 1
        entry = {"epoch": epoch + 1, "train": {k: v / max(len(batches), 1) for k, v in sums.items()},
                 "val": val_metrics, "lr": sched.get_last_lr()[0], "best": improved,
                 "seconds": round(time.perf_counter() - t0, 3)}
        history.append(entry)
        if ctx.is_main:
            print(epoch_line(desc, epoch + 1, cfg.epochs, entry, task.metric, time.perf_counter() - t_epoch),
                  file=sys.stderr, flush=True)
        if log is not None and ctx.is_main:
            log(entry)
        if ckpt_path is not None and ctx.is_main:
            save_checkpoint(ckpt_path, {
                "config_hash": config_hash, "epoch": epoch, "method": _cpu_state(method),
                "optim": opt.state_dict(), "sched": sched.state_dict(), "rng": torch.get_rng_state(),
                "best_score": best_score, "best_epoch": best_epoch, "best_state": best_state,
                "history": history, "bad_epochs": bad_epochs, "steps": steps, "teacher_rows_read": rows_read,
            })
        ctx.barrier()
        if os.environ.get(DEBUG_EXIT_ENV) == str(epoch + 1) and os.environ.get(DEBUG_EXIT_RANK_ENV, str(ctx.rank)) \
                == str(ctx.rank):
            os._exit(17)
    return FitResult(best_state=best_state, best_epoch=best_epoch + 1, best_score=best_score,
                     last_state=_cpu_state(method), history=history, steps=steps,
                     seconds=time.perf_counter() - t0, teacher_rows_read=rows_read)
