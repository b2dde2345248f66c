"""`fmtransfer export`: the student of a finished run, alone, as plain files with a manifest beside them.

The student is rebuilt from the run's config and `student.safetensors` (which the run wrote from the
student's own parameters: no teacher, adapter, query, message codec or cache hook), DDP and
torch.compile prefixes are stripped, and it is written as safetensors (always) plus ONNX and/or
TorchScript. Before the folder appears, every written format is read back through
`fmtransfer.serving.loader` and must reproduce the run: test metric equal to metrics.json's to 4
decimals and outputs within `ONNX_ATOL` of the rebuilt student's, at several batch sizes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fmtransfer.config import load_config
from fmtransfer.data.base import TaskData
from fmtransfer.errors import FmtError
from fmtransfer.export_fm import builds_own_model
from fmtransfer.export_manifest import FinishedRun, read_inputs, run_manifest
from fmtransfer.integrity import publish_dir
from fmtransfer.locks import staged_dir
from fmtransfer.runfiles import check_run_files
from fmtransfer.serving.formats import WRITERS
from fmtransfer.serving.loader import load_predictor
from fmtransfer.serving.manifest import (
    FILE_NAMES,
    FORMATS,
    MANIFEST_NAME,
    METRIC_DECIMALS,
    ONNX_ATOL,
    PREPROCESSING_NAME,
    ExportError,
    Manifest,
    file_record,
    one_line,
)

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
"""Key prefixes added by DistributedDataParallel and torch.compile; never part of the exported student."""
RUN_KEYS = ("task", "method", "metric", "higher_is_better", "test")


def parse_formats(spec: str | Sequence[str]) -> list[str]:
    """'onnx,torchscript' -> ['safetensors', 'onnx', 'torchscript'] (safetensors is always written)."""
    items = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in s.split(",")]
    out = ["safetensors"]
    for item in (i.strip().lower() for i in items):
        if item not in FORMATS:
            raise ExportError(f"--format: unknown format {item!r} (allowed: {', '.join(FORMATS)}; "
                              "several: --format onnx,torchscript)")
        if item not in out:
            out.append(item)
    return out


def open_finished_run(run_dir: str | Path) -> FinishedRun:
    """Check that `run_dir` holds a finished, readable run; otherwise one ExportError line with the fix."""
    from safetensors.torch import load_file

    path = Path(run_dir)
    if not path.is_dir():
        raise ExportError(f"{path}: no such run directory; pass the --out folder of `fmtransfer run`")
    if not (path / "metrics.json").is_file():
        if (path / "checkpoint.pt").exists():
            raise ExportError(f"{path}: the run did not finish (no metrics.json); continue it with "
                              f"`fmtransfer run {path / 'config.yaml'} --out {path} --resume`, then export")
        raise ExportError(f"{path}: not a finished run (no metrics.json); pass the --out folder of `fmtransfer run`")
    check_run_files(path, ("metrics.json", "config.yaml", "student.safetensors", "preprocessing.json"),
                    "run the experiment again")
    try:
        metrics = json.loads((path / "metrics.json").read_text())
        if not isinstance(metrics, dict) or any(k not in metrics for k in RUN_KEYS):
            raise ValueError(f"it lacks one of {', '.join(RUN_KEYS)}")
    except (ValueError, OSError) as e:
        raise ExportError(f"{path / 'metrics.json'} is corrupt ({one_line(e, 120)}); "
                          "run the experiment again") from None
    try:
        cfg = load_config(path / "config.yaml", machine_checks=False)
    except FmtError as e:
        raise ExportError(f"{path / 'config.yaml'} is unusable ({one_line(e, 160)}); "
                          "run the experiment again") from None
    weights = path / "student.safetensors"
    if not weights.is_file():
        raise ExportError(f"{path}: student.safetensors is missing; run the experiment again")
    try:
        state = load_file(str(weights))
    except Exception as e:
        raise ExportError(f"{weights} is corrupt ({one_line(e, 120)}); run the experiment again") from None
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if not state or bad:
        raise ExportError(f"{weights} is corrupt ({'no tensors' if not state else f'{bad[0]} holds NaN or inf'}); "
                          "run the experiment again")
    return FinishedRun(path, cfg, metrics, strip_wrappers(state))


def strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop DDP's leading 'module.' and torch.compile's '_orig_mod.' (at any depth) from the keys."""
    out = {}
    for key, value in state.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key.replace("._orig_mod.", ".")] = value
    return out


def build_student(run: FinishedRun, task: TaskData) -> nn.Module:
    """The run's student class with the run's weights (strict: every key must fit)."""
    from fmtransfer.registry import MODELS

    model = MODELS.get(run.cfg.student.name).impl(run.cfg.student, task)
    try:
        model.load_state_dict(run.state, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{run.path / 'student.safetensors'} does not fit the student in config.yaml "
                          f"({one_line(e, 160)}); run the experiment again") from None
    return model.eval().requires_grad_(False)


def check_encoders(run: FinishedRun, task: TaskData) -> None:
    """The encoders the run recorded must be the ones the rebuilt task fitted (else its data changed)."""
    path = run.path / PREPROCESSING_NAME
    if not path.is_file():
        return  # a run from before encoders were recorded: the rebuilt task's are checked by the test metric
    try:
        recorded = json.loads(path.read_text())
    except ValueError as e:
        raise ExportError(f"{path} is corrupt ({one_line(e, 120)}); run the experiment again") from None
    if recorded != json.loads(json.dumps(task.meta.get("preprocessing"))):
        raise ExportError(f"{path}: the task's encoders differ from the run's (its data or code changed since the "
                          "run); run the experiment again")


def _predict_batches(fn: Any, feats: dict[str, np.ndarray], n: int, batch_size: int) -> np.ndarray:
    return np.concatenate([fn({k: v[s:s + batch_size] for k, v in feats.items()}) for s in range(0, n, batch_size)])


def verify_export(export_dir: Path, manifest: Manifest, task: TaskData, model: nn.Module, run: FinishedRun) -> None:
    """Read every format back through the loader; it must reproduce the run (fills manifest.metrics)."""
    m, rows = task.metric, task.splits["test"]
    bs = run.cfg.train.eval_batch_size
    feats = {k: task.features[k][rows].numpy() for k in manifest.inputs}
    with torch.inference_mode():  # the run scored its student in batches of eval_batch_size: do the same
        ref = _predict_batches(lambda b: model({k: torch.from_numpy(v) for k, v in b.items()}).float().numpy(),
                               feats, len(rows), bs)
    run_value, tol = run.metrics["test"][m], 0.5 * 10 ** -METRIC_DECIMALS
    rebuilt = task.score(torch.from_numpy(ref), rows)[m]
    if abs(rebuilt - run_value) > tol:
        raise ExportError(f"the rebuilt student scores test {m} {rebuilt:.5f}, metrics.json says {run_value:.5f}: "
                          "the task data or code changed since the run; run the experiment again")
    raw = task.raw(rows) if task.raw is not None else feats
    for fmt in manifest.files:
        pred = load_predictor(export_dir, fmt)
        out = _predict_batches(pred.predict_features, feats, len(rows), bs)
        one = pred.predict_features({k: v[:1] for k, v in feats.items()})  # batch 1: the batch axis stays dynamic
        from_rows = np.concatenate([pred.outputs({k: v[s:s + bs] for k, v in raw.items()})
                                    for s in range(0, len(rows), bs)])  # raw rows through the manifest's encoders
        clipped = np.clip(ref, *task.target_range) if task.task_type == "regression" and task.target_range else ref
        diff = float(max(np.abs(out - ref).max(), np.abs(one - ref[:1]).max(), np.abs(from_rows - clipped).max()))
        value = task.score(torch.from_numpy(out), rows)[m]
        if diff > ONNX_ATOL or abs(value - run_value) > tol:
            raise ExportError(f"the {fmt} export does not reproduce the run (max |diff| {diff:.2e}, test {m} "
                              f"{value:.5f} vs {run_value:.5f}); report this as a bug, or export another format")
        manifest.metrics["exported"][fmt] = {"test": task.score(torch.from_numpy(out), rows),
                                             "max_abs_diff": diff, "rows": len(rows), "raw_rows_checked": True}


def export_run(run_dir: str | Path, out_dir: str | Path, formats: str | Sequence[str] = "safetensors",
               task: TaskData | None = None) -> Manifest:
    """Export the student of a finished run to `out_dir` (created; must not hold anything yet).

    `task` saves rebuilding the run's task when the caller already has it (serve-bench).
    """
    from fmtransfer.runner import build_task

    fmts = parse_formats(formats)
    run = open_finished_run(run_dir)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} already exists and is not empty; choose a new folder or delete it")
    task = task if task is not None else build_task(run.cfg)
    if task.name != run.metrics["task"]:
        raise ExportError(f"{run.path}: config.yaml builds task {task.name!r}, metrics.json is of "
                          f"{run.metrics['task']!r}; run the experiment again")
    check_encoders(run, task)
    if builds_own_model(run.cfg.method.name):  # levi, probes, fine-tuning: the method's own FM model
        from fmtransfer.export_fm import export_fm_run

        return export_fm_run(run, task, out, fmts)
    model = build_student(run, task)
    inputs = read_inputs(model, task)
    manifest = run_manifest(run, task, model, inputs)
    example = tuple(task.features[k][task.splits["test"][:4]] for k in inputs)  # >1 row: batch stays symbolic
    meta = {"format": "fmtransfer-student", "task": task.name, "model": run.cfg.student.name,
            "inputs": ",".join(inputs)}
    with staged_dir(out) as tmp:  # temp folders of a killed export to the same --out are removed first
        for fmt in fmts:
            info = WRITERS[fmt](model, inputs, example, tmp / FILE_NAMES[fmt], meta)
            manifest.files[fmt] = file_record(tmp / FILE_NAMES[fmt]) | info
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        verify_export(tmp, manifest, task, model, run)
        (tmp / MANIFEST_NAME).write_text(manifest.to_json())
        publish_dir(tmp, out, [MANIFEST_NAME, *(rec["file"] for rec in manifest.files.values())])
    return manifest


def format_export(manifest: Manifest, out_dir: str | Path) -> str:
    """A few lines for the terminal: files, sizes, and the check against the run."""
    m = manifest.metrics["metric"]
    run_value = manifest.metrics["run"]["test"][m]
    fm = manifest.model.get("fm")
    what = f"{manifest.model['name']} model" if fm else f"{manifest.model['name']} student"
    reads = ", ".join([*manifest.inputs, *(["text"] if fm and fm.get("kind") != "image_graph" else [])])
    lines = [f"exported {what} of {manifest.task['name']} "
             f"({manifest.model['params']:,} parameters, inputs: {reads}) to {out_dir}"]
    for fmt, rec in manifest.files.items():
        check = manifest.metrics["exported"].get(fmt)
        if check is None:  # an image FM model's weights, for the record (its graph files serve)
            lines.append(f"  {rec['file']:<24} {rec['bytes']:>10,} bytes  the trained weights (served by the graph)")
            continue
        lines.append(f"  {rec['file']:<24} {rec['bytes']:>10,} bytes  test {m} {check['test'][m]:.4f} "
                     f"(run {run_value:.4f}), max |diff| {check['max_abs_diff']:.1e}"
                     + (" vs the run's model" if fm else ""))
    return "\n".join(lines)
