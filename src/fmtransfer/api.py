"""The Python API for notebooks and scripts: `import fmtransfer as ft`.

    cfg = ft.load_config("configs/table/kd.yaml", overrides=["train.epochs=5"])
    result = ft.run(cfg, out="runs/kd", data=df)     # df: a pandas DataFrame or a datasets.Dataset (table tasks)
    result.metrics["test"], result.run_dir, result.predict("test")

`run` takes a config file path, a `RunConfig` or a plain dict, runs it exactly as `fmtransfer run` does (same
run directory, same metrics.json) and returns a `Result` holding the trained model. A table task's data can
be a DataFrame instead of a file: it is written to RUN_DIR/data.parquet (CSV without pyarrow) and the run's
config.yaml points at that file, so the run stays reproducible from its folder.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmtransfer.config import RunConfig, load_config, to_dict
from fmtransfer.errors import ConfigError


@dataclass
class Result:
    """A finished run: its metrics (metrics.json), its folder, and the trained model ready to predict."""

    metrics: dict[str, Any]
    run_dir: Path
    model: torch.nn.Module
    """The shipped model with its best-validation weights, in eval mode (`model(batch)` -> outputs)."""
    task: Any
    """The task it was trained on (`TaskData`: features, splits, metric)."""
    method: Any

    def _rows(self, rows: str | torch.Tensor | np.ndarray | list[int]) -> torch.Tensor:
        if isinstance(rows, str):
            key = rows if rows in self.task.splits else f"ood/{rows}"
            if key not in self.task.splits:
                raise ConfigError(f"predict: no split {rows!r} (allowed: {', '.join(self.task.splits)})")
            return self.task.splits[key]
        return torch.as_tensor(np.asarray(rows), dtype=torch.long)

    def outputs(self, rows: Any = "test") -> torch.Tensor:
        """Raw outputs for a split name (train, val, test, an OOD suite), row indices of the task, or new raw
        rows (a DataFrame, a dict of lists, a list of dicts: the task's source columns, encoded as in
        training): class logits (N, C), or values (N,) for regression."""
        from fmtransfer.train.loop import predict_rows

        self.method.eval()
        device = next(iter(self.method.parameters()), torch.empty(0)).device
        if _is_raw(rows):
            return self._raw_outputs(rows, device)
        return predict_rows(self.method.predict, self.task, self._rows(rows), 8192, device)

    @torch.no_grad()
    def _raw_outputs(self, rows: Any, device: torch.device) -> torch.Tensor:
        from fmtransfer.preprocess import encode

        spec = self.task.meta.get("preprocessing")
        if spec is None or (self.metrics.get("shipped_model") or {}).get("built_by") == "method":
            raise ConfigError("predict on raw rows: this run's model reads more than its recorded encoders give; "
                              f"export it (fmtransfer export {self.run_dir} --out DIR) and use load_predictor(DIR)")
        views = encode(spec, rows)
        batch = {k: torch.as_tensor(v).to(device) for k, v in views.items() if v.dtype != object}
        return self.method.predict(batch).float().cpu()

    def predict(self, rows: Any = "test") -> np.ndarray:
        """Predictions for a split, row indices or raw rows: class labels (a table's own label values) or values."""
        out = self.outputs(rows)
        if self.task.task_type == "regression":
            return out.numpy()
        idx = out.argmax(-1).numpy()
        classes = self.task.meta.get("classes")
        return np.asarray(classes, dtype=object)[idx] if classes else idx

    def predict_proba(self, rows: Any = "test") -> np.ndarray:
        """Class probabilities (N, C) for a split, row indices or raw rows (classification only)."""
        if self.task.task_type == "regression":
            raise ConfigError("predict_proba: the task is a regression; use predict")
        return torch.softmax(self.outputs(rows), -1).numpy()


def _is_raw(rows: Any) -> bool:
    """New raw rows (not a split name nor row indices): a DataFrame, a dict of columns, a list of dicts."""
    return hasattr(rows, "columns") or isinstance(rows, dict) or (
        isinstance(rows, list) and bool(rows) and isinstance(rows[0], dict))


def run(config: str | Path | RunConfig | dict[str, Any], out: str | Path | None = None,
        overrides: list[str] | dict[str, Any] | None = None, data: Any = None, resume: bool = False,
        quiet: bool = True) -> Result:
    """Run one experiment (as `fmtransfer run`) and return its `Result`.

    `config`: a YAML path, a RunConfig or a dict; `overrides`: ["train.epochs=5", ...] or {"train.epochs": 5};
    `data`: a pandas DataFrame or datasets.Dataset for a `table` task (instead of `task.path`);
    `out`: the run directory (default: runs/<task>-<method>-<time>)."""
    from fmtransfer.runner import run_experiment

    raw, base_overrides = _raw(config)
    if isinstance(raw.get("task"), dict) and not isinstance(raw["task"].get("path", ""), (str, type(None))):
        data = raw["task"].pop("path")  # a DataFrame given as task.path
    if isinstance(overrides, dict):
        from fmtransfer.config import apply_overrides

        apply_overrides(raw, overrides)
        overrides = None
    task = raw.get("task") if isinstance(raw.get("task"), dict) else {}
    method = raw.get("method") if isinstance(raw.get("method"), dict) else {}
    out_dir = Path(out) if out is not None else Path("runs") / (
        f"{task.get('name', 'run')}-{method.get('name', 'student')}-{time.strftime('%Y%m%d-%H%M%S')}")
    if data is not None:
        if (out_dir / "metrics.json").exists() and not resume:
            raise ConfigError(f"{out_dir} already holds a finished run (metrics.json); choose another out")
        raw.setdefault("task", {})["path"] = write_frame(data, out_dir)
    cfg = load_config(raw=raw, overrides=[*base_overrides, *(overrides or [])])
    keep: dict[str, Any] = {}
    metrics = run_experiment(cfg, out_dir, resume=resume, quiet=quiet, keep=keep)
    if not keep:  # a finished run was found (resume): rebuild its model from the run folder
        keep = _reload(cfg, out_dir)
    model = keep["student"].eval()
    return Result(metrics=metrics, run_dir=out_dir, model=model, task=keep["task"], method=keep["method"])


def _raw(config: str | Path | RunConfig | dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    from fmtransfer.config import read_config_file

    if isinstance(config, RunConfig):
        return to_dict(config), []
    if isinstance(config, dict):
        return {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}, []
    if isinstance(config, (str, Path)):
        return read_config_file(config), []
    raise ConfigError(f"run: config must be a YAML path, a RunConfig or a dict, got {type(config).__name__}")


def write_frame(data: Any, out_dir: Path) -> str:
    """Write a DataFrame (or a datasets.Dataset, via .to_pandas()) into the run folder; return its path."""
    if hasattr(data, "to_pandas") and not hasattr(data, "iloc"):
        data = data.to_pandas()  # a Hugging Face datasets.Dataset
    if not hasattr(data, "to_csv"):
        raise ConfigError(f"run: data must be a pandas DataFrame or a datasets.Dataset, got {type(data).__name__}")
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        import pyarrow  # noqa: F401

        path = out_dir / "data.parquet"
        data.to_parquet(path, index=False)
    except ImportError:
        path = out_dir / "data.csv"
        data.to_csv(path, index=False)
    return str(path.resolve())


def _reload(cfg: RunConfig, out_dir: Path) -> dict[str, Any]:
    """Model, method and task of a finished run, from its folder (the configured student only)."""
    from safetensors.torch import load_file

    from fmtransfer.registry import METHODS, MODELS
    from fmtransfer.runner import build_context, build_task

    task = build_task(cfg)
    if METHODS.get(cfg.method.name).impl.build_model(cfg.method, build_context(cfg, task, torch.device("cpu")),
                                                  task) is not None:
        raise ConfigError(f"{out_dir}: method {cfg.method.name} ships its own model; run it again to get it back")
    student = MODELS.get(cfg.student.name).impl(cfg.student, task)
    student.load_state_dict(load_file(str(out_dir / "student.safetensors")))
    from fmtransfer.methods.student import Student, StudentConfig

    return {"student": student, "task": task, "method": Student(StudentConfig(), student, task, {})}
