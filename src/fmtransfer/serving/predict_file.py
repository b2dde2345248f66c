"""`fmtransfer predict EXPORT_DIR --input rows.csv --out preds.csv`: an export's predictions for a file of raw rows.

The rows go through `load_predictor` (the same path a server takes: the manifest's encoders, then the
model) in batches; the output holds the input's id column when it has one, the predicted label and one
probability column per class (`prob_<label>`), or the prediction for regression. CSV, Parquet and JSONL
in and out (by suffix). A progress bar is shown on large files when stderr is a terminal (TQDM_DISABLE=1
turns it off).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from fmtransfer.serving.loader import Predictor, load_predictor
from fmtransfer.serving.manifest import ExportError, one_line

SUFFIXES = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}
PROGRESS_ROWS = 10_000
"""Files with at least this many rows get a progress bar (on a terminal)."""


def _format(path: Path, flag: str) -> str:
    fmt = SUFFIXES.get(path.suffix.lower())
    if fmt is None:
        raise ExportError(f"{flag} {path}: unknown format {path.suffix!r} (allowed: {', '.join(sorted(SUFFIXES))})")
    return fmt


def _pandas() -> Any:
    try:
        import pandas as pd
    except ImportError:
        raise ExportError("fmtransfer predict needs pandas (and pyarrow for Parquet): .venv/bin/pip install pandas "
                          "pyarrow") from None
    return pd


def read_rows(path: str | Path) -> Any:
    """A DataFrame of raw rows from a CSV, Parquet or JSONL file."""
    pd, p = _pandas(), Path(path)
    fmt = _format(p, "--input")
    if not p.is_file():
        raise ExportError(f"--input {p}: no such file")
    try:
        if fmt == "csv":
            return pd.read_csv(p)
        if fmt == "parquet":
            return pd.read_parquet(p)
        return pd.read_json(p, lines=True)
    except ImportError:
        raise ExportError("reading Parquet needs pyarrow: .venv/bin/pip install pyarrow") from None
    except Exception as e:  # pandas raises many types for unreadable files
        raise ExportError(f"--input {p}: not a readable {fmt} file ({one_line(e, 120)})") from None


def predict_frame(pred: Predictor, rows: Any, id_column: str | None = None, batch_size: int = 1024,
                  progress: bool = False) -> Any:
    """The output table of `rows` (a DataFrame): [id], prediction, prob_<class>... in input order."""
    pd = _pandas()
    from tqdm.auto import tqdm

    starts = range(0, len(rows), batch_size)
    outs = [pred.outputs(rows.iloc[s:s + batch_size]) for s in tqdm(starts, desc="predict", unit="batch",
                                                                     disable=not progress, leave=False)]
    out = np.concatenate(outs) if outs else np.zeros((0, *pred.manifest.output["shape"]), np.float32)
    table: dict[str, Any] = {}
    if id_column is not None:
        table[id_column] = rows[id_column].to_numpy()
    table["prediction"] = pred.decide(out)
    if pred.classes is not None:
        from fmtransfer.serving.loader import softmax

        proba = softmax(out) if len(out) else out
        for k, c in enumerate(pred.classes):
            table[f"prob_{c}"] = proba[:, k]
    return pd.DataFrame(table)


def write_rows(frame: Any, path: str | Path) -> None:
    p = Path(path)
    fmt = _format(p, "--out")
    p.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        frame.to_csv(p, index=False)
    elif fmt == "parquet":
        frame.to_parquet(p, index=False)
    else:
        frame.to_json(p, orient="records", lines=True)


def predict_file(export_dir: str | Path, input_path: str | Path, out_path: str | Path, fmt: str = "safetensors",
                 id_column: str | None = None, batch_size: int = 1024) -> dict[str, Any]:
    """Predict every row of `input_path` with the export and write `out_path`; returns a short summary."""
    if batch_size < 1:
        raise ExportError(f"--batch-size must be >= 1, got {batch_size}")
    _format(Path(out_path), "--out")
    pred = load_predictor(export_dir, fmt)
    rows = read_rows(input_path)
    if id_column is not None and id_column not in rows.columns:
        raise ExportError(f"--id {id_column!r} is not a column of {input_path} (columns: "
                          f"{', '.join(map(str, rows.columns))})")
    if id_column is None and "id" in rows.columns and "id" not in pred.columns:
        id_column = "id"
    progress = len(rows) >= PROGRESS_ROWS and sys.stderr.isatty() and os.environ.get("TQDM_DISABLE", "") in ("", "0")
    frame = predict_frame(pred, rows, id_column, batch_size, progress)
    write_rows(frame, out_path)
    return {"rows": len(frame), "out": str(out_path), "columns": list(frame.columns), "format": fmt}
