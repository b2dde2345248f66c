"""The method interface: an nn.Module holding the student and any trainable distillation parts.

`forward(batch)` returns `{"loss": total, <named terms>...}`; `predict(batch)` runs the student alone
(what is evaluated and exported). Teachers are not submodules: their frozen outputs arrive in the
batch as `teacher:<name>`, read from the prepared-teacher cache, so DDP wraps only trainable parts.

Every hook a method may implement is declared on `Method` below, with what calls it and when; the
defaults are no-ops, so a method overrides only what it needs (kd.py is the smallest example):

| hook                          | called by                      | when                                          |
|-------------------------------|--------------------------------|-----------------------------------------------|
| `required_teachers` (class)   | run.py                         | before teachers are prepared                  |
| `build_model` (class)         | `build_method`                 | before `__init__`; None = the configured student |
| `losses` (must implement)     | `forward`, i.e. the loop       | every training step (and the loop's checks)   |
| `predict`                     | the loop, run.py, export       | validation, evaluation, teacher outputs       |
| `lr_scales`                   | the loop (optimizer groups)    | once, before the first step                   |
| `on_epoch_end`                | the loop                       | after an epoch's updates, before validation   |
| `diagnostics`                 | run.py                         | once after training -> metrics.json           |
| `report`                      | run.py (rank 0)                | after the final evaluation -> metrics.json    |

`build_method` builds a method and its model the one way run.py, the tests, the benchmarks and the
method-as-teacher recipes all use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from fmtransfer.config import MethodConfig, ModelConfig
from fmtransfer.data.base import TaskData
from fmtransfer.errors import ConfigError, did_you_mean
from fmtransfer.models.base import TaskModel
from fmtransfer.registry import METHODS, MODELS


@dataclass
class BuildContext:
    """What `build_model` may read about the run (or teacher preparation) it builds for; never a run config."""

    cache_dir: Path
    """Where cached foundation-model features live (the frozen-FM methods read them)."""
    seed: int
    """The seed of the run (lp_ft's probe split and wise_ft's fresh head are seeded from it)."""
    device: torch.device
    small: ModelConfig | None = None
    """The small task model: the run's `student`, or a teacher recipe's `small` (LEVI, ensemble)."""
    planned_steps: int | None = None
    """Optimizer steps the loop will take (epochs x steps per epoch); None when early stopping may end it
    sooner (`train.patience` set)."""
    eval_batch_size: int = 8192
    """The loop's evaluation batch size (for a method that scores inside the loop, e.g. wise_ft's sweep)."""


@dataclass
class Built:
    """What `build_model` returns: the model the method trains and ships, and what else the build produced."""

    model: TaskModel
    info: dict[str, Any] = field(default_factory=dict)
    """Facts about the build, reported in the method's diagnostics (lp_ft's probe stage, LoRA modules)."""
    extras: dict[str, Any] = field(default_factory=dict)
    """Build products the method's `__init__` reads (wise_ft: theta_0 and the planned steps)."""


class Method(nn.Module):
    """Base class of every method; subclasses set `uses_transfer` / `reads_reps` and implement `losses`."""

    uses_transfer: ClassVar[bool] = False
    """True when the method reads the unlabeled transfer set (distillation terms)."""
    reads_reps: ClassVar[bool] = False
    """True when the method reads the teachers' representations (`teacher_rep:<name>` in the batch)."""

    def __init__(self, cfg: MethodConfig, student: TaskModel, task: TaskData, teachers: dict[str, Any],
                 built: Built | None = None) -> None:
        """`teachers`: the prepared teachers named by `required_teachers` (teachers/base.py PreparedTeacher);
        `built`: what `build_model` returned (None: `student` is the configured small model)."""
        super().__init__()
        self.cfg = cfg
        self.student = student
        self.task_type = task.task_type
        self.own_model = built is not None
        """True when the shipped model is the method's own (built around the FM), not the configured student."""
        self.teacher_info = {name: {"kind": t.kind, "out_shape": tuple(t.outputs.shape[1:]),
                                    "rep_dim": int(t.reps.shape[1])} for name, t in teachers.items()}

    # ------------------------------------------------------------------------------------ before training

    @classmethod
    def required_teachers(cls, cfg: MethodConfig, available: list[str]) -> list[str]:
        """Names of the teachers whose outputs this method reads (validated against `available`)."""
        return []

    @classmethod
    def build_model(cls, cfg: MethodConfig, ctx: BuildContext, task: TaskData) -> Built | None:
        """The model this method trains, evaluates and ships; None = the configured small model (`ctx.small`).

        Frozen-FM and fine-tuning methods (LEVI and its baselines) return a model built around the
        foundation model here, reading `ctx.cache_dir` for its cached features.
        """
        return None

    def lr_scales(self) -> dict[float, list[nn.Parameter]]:
        """Parameters that train at `train.lr * scale`, by scale; the rest train at `train.lr` (the loop
        makes one optimizer parameter group per scale). Default: none."""
        return {}

    # ------------------------------------------------------------------------------------ every step

    def losses(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The method's own terms: {"loss": total, <named terms>...} (the named terms are logged detached)."""
        raise NotImplementedError

    def predict(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The shipped model's prediction: the student alone (what is validated, evaluated and exported)."""
        return self.student(batch)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`losses` plus the student's own regulariser (e.g. per-occurrence L2 on ID embeddings)."""
        terms = self.losses(batch)
        penalty = self.student.penalty(batch)
        if isinstance(penalty, torch.Tensor):
            terms["loss"] = terms["loss"] + penalty
            terms["penalty"] = penalty.detach()
        return terms

    def on_epoch_end(self) -> None:
        """After an epoch's updates, before its validation (still in training mode): a method's own step
        that the epoch's validation should see (wise_ft's alpha sweep) or bookkeeping (epoch timing)."""

    # ------------------------------------------------------------------------------------ after training

    def diagnostics(self) -> dict[str, Any]:
        """Facts gathered over the whole training, into metrics.json["method_diagnostics"] (empty: none)."""
        return {}

    def report(self, task: TaskData, history: list[dict[str, Any]], out_dir: Path,
               device: torch.device) -> dict[str, Any]:
        """Extra evaluation of the best weights (rank 0; may write plots into `out_dir`), merged into
        metrics.json["method_diagnostics"] (empty: none). `history` is the loop's per-epoch log."""
        return {}


def build_method(cfg: MethodConfig, task: TaskData, teachers: dict[str, Any], ctx: BuildContext) -> Method:
    """The registered method `cfg.name` with its model: the method's own (`build_model`) or `ctx.small`.

    The model is built before the method's own modules (projectors, codecs, gates), so a seeded caller
    gets the same initial weights as every run before.
    """
    impl = METHODS.get(cfg.name).impl
    built = impl.build_model(cfg, ctx, task)
    if built is not None:
        student = built.model
    elif ctx.small is not None:
        student = MODELS.get(ctx.small.name).impl(ctx.small, task)
    else:
        raise ConfigError(f"method {cfg.name} trains the configured small model; set `student:` (or `small:` "
                          "in a teacher recipe)")
    return impl(cfg, student, task, teachers, built)


def pick_teacher(name: str | None, available: list[str], method: str) -> str:
    """Resolve a method's `teacher` option: a configured teacher name, or the first teacher if null."""
    if not available:
        raise ConfigError(f"method {method} needs a teacher; add one under `teachers:`")
    if name is None:
        return available[0]
    if name not in available:
        raise ConfigError(f"method.teacher: {name!r} is not a configured teacher{did_you_mean(name, available)} "
                          f"(allowed: {', '.join(available)})")
    return name


def committee(names: list[str] | None, available: list[str], method: str) -> list[str]:
    """Resolve a method's `teachers` option (a list of configured teacher names, or null = all of them)."""
    if not available:
        raise ConfigError(f"method {method} needs teachers; add them under `teachers:`")
    chosen = names or available
    unknown = [n for n in chosen if n not in available]
    if unknown:
        raise ConfigError(f"method.teachers: {unknown[0]!r} is not a configured teacher"
                          f"{did_you_mean(unknown[0], available)} (allowed: {', '.join(available)})")
    return list(dict.fromkeys(chosen))
