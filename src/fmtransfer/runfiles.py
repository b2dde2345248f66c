"""The files of a run folder, written with receipts and read back only when they match them.

`fmtransfer run --out DIR` writes config.yaml, checkpoint.pt, student.safetensors and metrics.json
through `integrity.publish`, so `DIR/receipts.json` holds the size and CRC32 of each. `--resume`,
`report`, `export` and `serve-bench` read them through here: a truncated, byte-flipped or hand-edited
file is a one-line error naming it and the fix, never a traceback or a silent use.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fmtransfer.config import RunConfig, dump_config, run_config_hash
from fmtransfer.errors import ArtifactError
from fmtransfer.integrity import check, publish, remove_stale_temps
from fmtransfer.utils import apply_num_threads, seed_everything

DEBUG_DUMP_ENV = "FMTRANSFER_DEBUG_DUMP_STATE"
"""Tests set this to a folder: every rank writes its final trainable state there."""

RUN_FILES = ("config.yaml", "checkpoint.pt", "student.safetensors", "metrics.json", "log.jsonl", "preprocessing.json",
             "receipts.json")


def write_run_file(path: Path, data: bytes) -> None:
    """Write one run file (temp + rename) and its receipt."""
    publish(path, lambda tmp: tmp.write_bytes(data))


def start_run_folder(cfg: RunConfig, out: Path, is_main: bool) -> str:
    """What every run (in-memory or streamed) does first: its threads and seed, and on the main rank a clean
    run folder holding the resolved config.yaml. Returns the config hash a resumed checkpoint must match."""
    apply_num_threads(cfg.train.num_threads)
    seed_everything(cfg.seed)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        clean_run_dir(out)
        write_run_file(out / "config.yaml", dump_config(cfg).encode())
    return run_config_hash(cfg)


def write_run_json(path: Path, obj: Any) -> None:
    from fmtransfer.utils import _json_default

    write_run_file(path, (json.dumps(obj, indent=2, default=_json_default) + "\n").encode())


def read_metrics(path: Path, fix: str) -> dict[str, Any]:
    """A run's metrics.json as a dict, after its receipt check; anything else is a one-line ArtifactError."""
    why = check(path)
    if why is None:
        try:
            data = json.loads(path.read_text())
            why = None if isinstance(data, dict) else f"it holds a {type(data).__name__}, not a mapping"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            why = f"not valid JSON: {getattr(e, 'msg', type(e).__name__)}"
    if why is not None:
        raise ArtifactError(f"{path} is corrupt ({why}); {fix}")
    return data


def clean_run_dir(out: Path) -> list[Path]:
    """Remove temp files that a killed write left in a run folder (call before the run writes anything)."""
    gone = remove_stale_temps(out, RUN_FILES)
    if gone:
        print(f"fmtransfer: removed {len(gone)} temp file(s) left by an interrupted write in {out}", flush=True)
    return gone


def check_run_files(run_dir: Path, names: tuple[str, ...], fix: str) -> None:
    """Raise one ArtifactError line for the first present file of `names` that does not match its receipt."""
    for name in names:
        p = run_dir / name
        if p.exists():
            why = check(p)
            if why is not None:
                raise ArtifactError(f"{p} is corrupt or altered ({why}); {fix}")


def format_summary(metrics: dict[str, Any]) -> str:
    """The one line a finished run prints (and a suite prints per run): test metric, OOD, gap, time."""
    m = metrics["metric"]
    ood = ", ".join(f"{s} {v[m]:.4f}" for s, v in metrics["ood"].items())
    gap = metrics["gap_recovered"] if metrics["method"] != "student" else None
    parts = [f"{metrics['task']} {metrics['method']} seed {metrics['seed']}: test {m} {metrics['test'][m]:.4f}",
             f"OOD {ood}" if ood else "", f"gap recovered {gap:.2f}" if gap is not None else "",
             f"best epoch {metrics['best_epoch']}", f"train {metrics['seconds']['train']:.1f}s"]
    return " | ".join(p for p in parts if p)
