"""Checks of a user table before it becomes a task: bad values get one line naming the column.

Errors (DataError, exit 2): duplicate column names (a CSV header, a key twice in a JSONL object), inf
in a numeric or label column, a label column with a single class. Warnings (one `fmtransfer: warning:`
line each, rank 0 only): missing labels (those rows are left out), missing numeric values (read as the
training mean), a text column that is empty in every row, a labeled subset that holds a single class.
Non-UTF-8 bytes are refused by `read_table`.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from fmtransfer.errors import DataError


def warn(msg: str) -> None:
    """One warning line on stderr (on rank 0 only: every rank builds the task)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"fmtransfer: warning: {msg}", file=sys.stderr, flush=True)


def csv_header_duplicates(path: Path) -> list[str]:
    """Column names that a CSV header holds twice (pandas would rename the second to 'name.1' silently)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []
    return [name for name, n in Counter(header).items() if n > 1]


def jsonl_duplicate_key(path: Path) -> tuple[str, int] | None:
    """(key, line) of the first JSON object in a JSONL file that holds a key twice (JSON keeps the last)."""
    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        seen = Counter(k for k, _ in items)
        dup = next((k for k, n in seen.items() if n > 1), None)
        if dup is not None:
            raise KeyError(dup)
        return dict(items)

    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        json.loads(line, object_pairs_hook=pairs)
                    except KeyError as e:
                        return str(e.args[0]), i
    except (OSError, UnicodeDecodeError, ValueError):
        return None  # read_table already named an unreadable file
    return None


def _floats(series: Any) -> np.ndarray | None:
    try:
        return series.astype(float).to_numpy()
    except (ValueError, TypeError):
        return None


def check_table(df: Any, cfg: Any) -> None:
    """Refuse or warn about the values of `df` that `build_table` would otherwise turn silently into others."""
    where = cfg.path
    dups = sorted({str(c) for c in df.columns[df.columns.duplicated()]})
    if not dups and Path(where).suffix.lower() == ".csv":
        dups = csv_header_duplicates(Path(where))
    if dups:
        raise DataError(f"task.path {where!r}: column {dups[0]!r} appears twice; rename one of them")
    if Path(where).suffix.lower() in (".jsonl", ".json"):
        dup = jsonl_duplicate_key(Path(where))
        if dup is not None:
            raise DataError(f"task.path {where!r}: line {dup[1]} holds key {dup[0]!r} twice; keep one")
    label = df[cfg.label]
    missing = int(label.isna().sum())
    if missing:
        warn(f"task: label column {cfg.label!r} is empty in {missing} of {len(df)} rows; those rows are left out")
    y = _floats(label.dropna())
    if y is not None and np.isinf(y).any():
        raise DataError(f"task: label column {cfg.label!r} holds inf in {int(np.isinf(y).sum())} rows; "
                        "fix or drop those rows")
    if cfg.kind == "classification":
        classes = label.dropna().astype(str).unique()
        if len(classes) == 1:
            raise DataError(f"task: label column {cfg.label!r} holds a single class ({classes[0]!r}); a classifier "
                            "needs at least two (or use kind: regression)")
    elif y is None:
        return  # build_table names the non-numeric label
    for col in cfg.numeric:
        x = _floats(df[col])
        if x is None:
            continue  # build_table names the non-numeric column
        if np.isinf(x).any():
            raise DataError(f"task: numeric column {col!r} holds inf in {int(np.isinf(x).sum())} rows; "
                            "fix or drop those rows (a missing value may stay empty)")
        if np.isnan(x).any():
            warn(f"task: numeric column {col!r} is empty in {int(np.isnan(x).sum())} rows; those read as the "
                 "training mean")
    for col in cfg.text:
        text = df[col].astype("string").fillna("").str.strip()
        if (text == "").all():
            warn(f"task: text column {col!r} is empty in every row; the foundation teacher reads nothing from it")


def check_labeled(y: Any, labeled: np.ndarray, cfg: Any) -> None:
    """Warn when the labeled subset (task.labels) holds a single class."""
    if cfg.kind == "classification" and len(labeled) and len(np.unique(np.asarray(y)[labeled])) == 1:
        warn(f"task: the {len(labeled)} labeled rows (task.labels) hold a single class; raise task.labels")
