"""DIR/log.jsonl (`JsonlLog`), and the optional per-epoch loggers beside it: `train.loggers: [csv, tensorboard]`.

Each receives the loop's epoch entries (the dicts log.jsonl holds: epoch, train terms, val metrics, lr,
best, seconds). `csv` writes DIR/metrics.csv (one row per epoch; a resumed run appends); `tensorboard`
writes DIR/tensorboard/ through torch's own SummaryWriter, which needs the `tensorboard` package
(`pip install 'fmtransfer[tensorboard]'`; without it the run stops before training, in one line).
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fmtransfer.errors import ConfigError


class JsonlLog:
    """DIR/log.jsonl: appends one JSON object per line (rank 0 only; `None` writes nothing)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def __call__(self, entry: dict[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **entry}) + "\n")

    def phase(self, name: str) -> JsonlLog:
        parent = self

        class _Phase(JsonlLog):
            def __call__(self, entry: dict[str, Any]) -> None:
                parent({"phase": name, **entry})

        return _Phase(self.path)


def flat(entry: dict[str, Any]) -> dict[str, float]:
    """{'train/loss': .., 'val/accuracy': .., 'lr': ..}: the numbers of one epoch entry."""
    out: dict[str, float] = {}
    for key in ("train", "val"):
        for k, v in (entry.get(key) or {}).items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out[f"{key}/{k}"] = float(v)
    for k in ("lr", "seconds"):
        if isinstance(entry.get(k), (int, float)):
            out[k] = float(entry[k])
    return out


class CsvLogger:
    """DIR/metrics.csv: epoch, best, then every number of the first entry (later extra keys are dropped)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fields: list[str] | None = None
        if path.exists():  # a resumed run: keep the header it wrote
            with open(path, newline="") as f:
                self.fields = next(csv.reader(f), None)

    def __call__(self, entry: dict[str, Any]) -> None:
        row = {"epoch": entry.get("epoch"), "best": int(bool(entry.get("best"))), **flat(entry)}
        new = self.fields is None
        if new:
            self.fields = list(row)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)

    def close(self) -> None:
        pass


class TensorBoardLogger:
    """DIR/tensorboard/: one scalar per number per epoch (train/loss, val/accuracy, lr, ...)."""

    def __init__(self, folder: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("train.loggers: tensorboard needs the tensorboard package: "
                              "pip install 'fmtransfer[tensorboard]' (or drop it from train.loggers)") from None
        self.writer = SummaryWriter(log_dir=str(folder))

    def __call__(self, entry: dict[str, Any]) -> None:
        step = int(entry.get("epoch", 0))
        for k, v in flat(entry).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


LOGGERS: dict[str, Callable[[Path], Any]] = {
    "csv": lambda out: CsvLogger(out / "metrics.csv"),
    "tensorboard": lambda out: TensorBoardLogger(out / "tensorboard"),
}


class EpochLog:
    """Forwards each epoch entry to the run's JSONL log and to every configured logger."""

    def __init__(self, base: Callable[[dict[str, Any]], None], names: list[str], out: Path) -> None:
        self.base = base
        self.loggers = [LOGGERS[n](out) for n in dict.fromkeys(names)]

    def __call__(self, entry: dict[str, Any]) -> None:
        self.base(entry)
        for lg in self.loggers:
            lg(entry)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()
