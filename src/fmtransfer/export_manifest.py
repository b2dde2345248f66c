"""What an export records of its finished run: the run it reads (`FinishedRun`), the feature views the
model reads (found by running it once) and the manifest that describes both, shared by export.py (students)
and export_fm.py (models built around a foundation model)."""

from __future__ import annotations

import datetime
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fmtransfer.config import RunConfig, to_dict
from fmtransfer.data.base import TaskData
from fmtransfer.serving.manifest import (
    METRIC_DECIMALS,
    ONNX_ATOL,
    OUTPUT_NAME,
    ExportError,
    Manifest,
    sha256_file,
)


@dataclass
class FinishedRun:
    """A run directory that passed every check: resolved config, metrics and the student's weights."""

    path: Path
    cfg: RunConfig
    metrics: dict[str, Any]
    state: dict[str, torch.Tensor]


class ReadRecorder(dict):  # type: ignore[type-arg]
    """A batch that remembers which keys the model read (the student's input views)."""

    def __init__(self, data: dict[str, torch.Tensor]) -> None:
        super().__init__(data)
        self.read: list[str] = []

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.read:
            self.read.append(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        if key not in self:
            return default
        return self[key]


def read_inputs(model: nn.Module, task: TaskData) -> list[str]:
    """The feature views `model` reads, in the task's order (found by running it once on real rows)."""
    batch = ReadRecorder(task.gather(task.splits["test"][:4]))
    with torch.no_grad():
        model(batch)
    extra = [k for k in batch.read if k not in task.features]
    if extra:
        raise ExportError(f"the student reads {extra[0]!r}, which a server does not have; it cannot be exported")
    inputs = [f for f in task.features if f in batch.read]
    if not inputs:
        raise ExportError("the student reads no feature view; nothing to export")
    return inputs


def variable_views(task: TaskData) -> set[str]:
    """Views whose per-row length varies (hashed n-gram lists): any width >= 1 is served."""
    spec = task.meta.get("preprocessing") or {}
    return {v for s in spec.get("steps", []) if s.get("op") == "ngram" for v in s["views"]}  # type: ignore[union-attr]


def _json_safe(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
        except TypeError:
            continue
        out[k] = v
    return out


def _teachers(run: FinishedRun) -> dict[str, Any]:
    from fmtransfer.registry import METHODS

    method = METHODS.get(run.cfg.method.name).impl
    taught = method.required_teachers(run.cfg.method, list(run.cfg.teachers))
    seen = run.metrics.get("teachers") or {}
    keep = ("kind", "recipe", "fingerprint", "params")
    return {"taught": {n: {k: seen.get(n, {}).get(k) for k in keep} | {"test": seen.get(n, {}).get("test")}
                       for n in taught},
            "reference": (run.metrics.get("reference") or {}).get("teacher_name"),
            "fingerprints": {n: t.get("fingerprint") for n, t in seen.items()}}


def run_manifest(run: FinishedRun, task: TaskData, model: nn.Module, inputs: list[str]) -> Manifest:
    """The manifest of a student export before its files are written (export_fm.py fills in its own model)."""
    from fmtransfer import __version__
    from fmtransfer.registry import MODELS, TASKS

    entry, builder = MODELS.get(run.cfg.student.name), TASKS.get(run.cfg.task.name).impl
    regression = task.task_type == "regression"
    return Manifest(
        task={"name": task.name, "type": task.task_type, "metric": task.metric,
              "higher_is_better": task.higher_is_better, "num_classes": task.num_classes,
              "target_range": list(task.target_range) if task.target_range else None,
              "cardinalities": dict(task.cardinalities), "fingerprint": task.fingerprint,
              "meta": _json_safe({k: v for k, v in task.meta.items() if k != "preprocessing"})},
        model={"name": run.cfg.student.name, "class": f"{type(model).__module__}:{type(model).__qualname__}",
               "config_class": f"{entry.config_cls.__module__}:{entry.config_cls.__qualname__}",
               "config": to_dict(run.cfg.student), "params": sum(p.numel() for p in model.parameters())},
        features={n: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape[1:])}
                  | ({"variable": True} if n in variable_views(task) else {}) for n, t in task.features.items()},
        inputs=inputs,
        output={"name": OUTPUT_NAME, "dtype": "float32", "shape": list(task.output_shape()),
                "meaning": "the predicted target" if regression else "one logit per class (argmax = label)",
                "clip": list(task.target_range) if regression and task.target_range else None},
        files={},
        preprocessing={"task_builder": f"{builder.__module__}:{builder.__qualname__}",
                       "task_config": to_dict(run.cfg.task), "encoders": task.meta.get("preprocessing"),
                       "ids": "categorical views are 0-based indices below task.cardinalities[view]"},
        source={"run_dir": str(run.path.resolve()), "method": run.cfg.method.name, "seed": run.cfg.seed,
                "config_hash": run.metrics.get("config_hash"), "best_epoch": run.metrics.get("best_epoch"),
                "student_sha256": sha256_file(run.path / "student.safetensors")},
        teachers=_teachers(run),
        metrics={"metric": task.metric, "run": {k: run.metrics.get(k) for k in ("test", "val", "ood")},
                 "exported": {}, "tolerance": {"max_abs_diff": ONNX_ATOL, "metric_decimals": METRIC_DECIMALS}},
        created={"fmtransfer": __version__, "torch": torch.__version__,
                 "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
    )
