"""The manifest that travels beside an exported student: what it reads, what it returns, where it came from.

An export folder holds `manifest.json` and one file per format (`student.safetensors` always, then
`student.onnx` and `student.torchscript.pt` on request). The manifest is plain JSON so that a server
in any language can read the input schema; `fmtransfer.serving.loader` reads it to rebuild the student.
This module imports nothing of fmtransfer but its errors and integrity receipts (standard library only).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fmtransfer.errors import FmtError
from fmtransfer.integrity import check

MANIFEST_NAME = "manifest.json"
MANIFEST_KIND = "fmtransfer-student"
MANIFEST_VERSION = 1
FORMATS = ("safetensors", "onnx", "torchscript")
"""Every format `fmtransfer export` writes; safetensors is always written (the loader rebuilds from it)."""
FILE_NAMES = {"safetensors": "student.safetensors", "onnx": "student.onnx", "torchscript": "student.torchscript.pt"}
OUTPUT_NAME = "prediction"
PREPROCESSING_NAME = "preprocessing.json"
"""The encoders a run's task fitted (`fmtransfer.preprocess` spec), written into the run directory."""
EXPORT_INSTALL = ".venv/bin/pip install 'onnx>=1.23' 'onnxscript>=0.7' 'onnxruntime>=1.32' (or bash scripts/setup.sh)"
"""How to install what ONNX export and serving need (the package is not on PyPI: no `fmtransfer[export]`)."""
ONNX_ATOL = 1e-4
"""Largest |ONNX - PyTorch| difference an export accepts on any output of the test split (absolute)."""
METRIC_DECIMALS = 4
"""The exported student's test metric must equal the run's to this many decimals (|difference| <= 0.5e-4)."""


class ExportError(FmtError):
    """An export that cannot be made or used: unfinished or corrupt run, bad export folder, unknown format."""


@dataclass
class Manifest:
    """Everything a server needs beside the weights; see docs/serving.md for each field."""

    task: dict[str, Any]
    """name, type (regression|classification), metric, higher_is_better, num_classes, target_range,
    cardinalities, fingerprint, meta."""
    model: dict[str, Any]
    """name, class and config_class ('module:QualName'), config (the student's config), params."""
    features: dict[str, dict[str, Any]]
    """Every feature view of the task: {dtype, shape (per row)}; the model class is built from these."""
    inputs: list[str]
    """The views the student reads, in the order ONNX and TorchScript take them."""
    output: dict[str, Any]
    """name, dtype, shape (per row), meaning, and the clip range applied to regression predictions."""
    files: dict[str, dict[str, Any]]
    """format -> {file, bytes, sha256}."""
    preprocessing: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)
    teachers: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    created: dict[str, Any] = field(default_factory=dict)
    kind: str = MANIFEST_KIND
    version: int = MANIFEST_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> Manifest:
        """Parse and check a manifest; any problem is one ExportError line naming `where`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ExportError(f"{where}: not valid JSON ({e.msg} at line {e.lineno}); export the run again") from None
        if not isinstance(data, dict) or data.get("kind") != MANIFEST_KIND:
            raise ExportError(f"{where}: not an fmtransfer student manifest; point at a folder `fmtransfer export` "
                              "wrote")
        if data.get("version") != MANIFEST_VERSION:
            raise ExportError(f"{where}: manifest version {data.get('version')!r}, this fmtransfer reads "
                              f"{MANIFEST_VERSION}; export the run again with this version")
        names = {f.name for f in fields(cls)}
        missing = [k for k in ("task", "model", "features", "inputs", "output", "files") if k not in data]
        if missing:
            raise ExportError(f"{where}: manifest lacks {missing[0]!r}; export the run again")
        return cls(**{k: v for k, v in data.items() if k in names})


def read_manifest(export_dir: str | Path) -> Manifest:
    """The manifest of an export folder (one ExportError line if it is missing or malformed)."""
    path = Path(export_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ExportError(f"{export_dir}: no {MANIFEST_NAME}; create the folder with "
                          "`fmtransfer export RUN_DIR --out DIR`")
    why = check(path)
    if why is not None:
        raise ExportError(f"{path} is corrupt or altered ({why}); export the run again")
    return Manifest.from_json(path.read_text(), str(path))


def file_record(path: Path) -> dict[str, Any]:
    """{file, bytes, sha256} of one exported file (the loader checks the digest before reading it)."""
    return {"file": path.name, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def checked_file(export_dir: str | Path, manifest: Manifest, fmt: str) -> Path:
    """The path of format `fmt` in the export, after checking it is listed, present and unaltered."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown format {fmt!r} (allowed: {', '.join(FORMATS)})")
    rec = manifest.files.get(fmt)
    if rec is None:
        raise ExportError(f"{export_dir} holds no {fmt} file (it has: {', '.join(manifest.files)}); "
                          f"export again with --format {fmt}")
    path = Path(export_dir) / rec["file"]
    if not path.is_file():
        raise ExportError(f"{path} is missing; export the run again")
    if path.stat().st_size != rec["bytes"] or sha256_file(path) != rec["sha256"]:
        raise ExportError(f"{path} does not match its sha256 in {MANIFEST_NAME} (corrupt or altered); "
                          "export the run again")
    return path


def one_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, cut to `limit` characters (for one-line user errors)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
