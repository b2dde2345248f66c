"""Load an exported student without fmtransfer's training code; every format answers the same way.

`load_student(DIR)` rebuilds the student's own class from the manifest and `student.safetensors`;
`load_predictor(DIR, fmt)` wraps it, the ONNX file (onnxruntime) or the TorchScript file behind one
`predict(features) -> np.ndarray`. Of fmtransfer this imports only the student's model module (named in
the manifest), `fmtransfer.config` (its config dataclass) and `fmtransfer.data.base` (the schema the
class is built from): never `fmtransfer.train`, `.methods`, `.teachers` or `.run` (a test checks).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fmtransfer.serving.manifest import ExportError, Manifest, checked_file, one_line, read_manifest

TRUSTED_MODULES = ("fmtransfer.",)
"""Module prefixes whose classes a manifest may name (pass your own package to load your own models)."""


def import_object(ref: str, trusted: tuple[str, ...] = TRUSTED_MODULES) -> Any:
    """'package.module:QualName' -> the object, only from trusted packages (a manifest is data, not code)."""
    module, _, qualname = ref.partition(":")
    if not qualname or not any(module == p.rstrip(".") or module.startswith(p) for p in trusted):
        raise ExportError(f"manifest names {ref!r}, outside the trusted packages ({', '.join(trusted)}); "
                          "pass trusted=(...) to load it")
    try:
        obj: Any = importlib.import_module(module)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ExportError(f"manifest names {ref!r}, which this installation lacks ({one_line(e)}); "
                          "install the fmtransfer version that exported it") from None
    return obj


def schema_task(manifest: Manifest) -> Any:
    """A one-row TaskData carrying only the schema (feature dtypes and shapes, cardinalities, task type).

    Model classes take a TaskData to size their layers; statistics they learn from the data (such as
    the target mean) are buffers, restored from the weights right after.
    """
    from fmtransfer.data.base import TaskData

    t = manifest.task
    feats = {name: torch.zeros((1, *spec["shape"]), dtype=getattr(torch, spec["dtype"]))
             for name, spec in manifest.features.items()}
    y = torch.zeros(1) if t["type"] == "regression" else torch.zeros(1, dtype=torch.long)
    rng = t.get("target_range")
    return TaskData(name=t["name"], task_type=t["type"], features=feats, y=y, splits={"train": torch.zeros(1).long()},
                    metric=t["metric"], higher_is_better=t["higher_is_better"],
                    cardinalities=dict(t.get("cardinalities") or {}), num_classes=t.get("num_classes"),
                    target_range=tuple(rng) if rng else None, meta=dict(t.get("meta") or {}),
                    fingerprint=t.get("fingerprint") or "schema")


def load_student(export_dir: str | Path, trusted: tuple[str, ...] = TRUSTED_MODULES) -> nn.Module:
    """The student as its own nn.Module class (eval mode, frozen), rebuilt from manifest + safetensors."""
    from safetensors.torch import load_file

    from fmtransfer.config import from_dict

    manifest = read_manifest(export_dir)
    model_cls = import_object(manifest.model["class"], trusted)
    config_cls = import_object(manifest.model["config_class"], trusted)
    try:
        cfg = from_dict(config_cls, manifest.model["config"], "model.config")
        model = model_cls(cfg, schema_task(manifest))
    except Exception as e:
        raise ExportError(f"{export_dir}: cannot rebuild {manifest.model['class']} from the manifest "
                          f"({one_line(e)}); export the run again") from None
    path = checked_file(export_dir, manifest, "safetensors")
    try:
        model.load_state_dict(load_file(str(path)), strict=True)
    except Exception as e:
        raise ExportError(f"{path}: weights do not fit {manifest.model['class']} ({one_line(e)}); "
                          "export the run again") from None
    return model.eval().requires_grad_(False)


class Predictor:
    """One exported student in one format: `predict({view: array}) -> np.ndarray` (N,) or (N, C)."""

    fmt = ""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.inputs = list(manifest.inputs)
        self._specs = [(n, np.dtype(manifest.features[n]["dtype"]), tuple(manifest.features[n]["shape"]),
                        manifest.task.get("cardinalities", {}).get(n)) for n in self.inputs]
        rng = manifest.output.get("clip")
        self._clip = tuple(rng) if rng else None

    def prepare(self, features: Mapping[str, Any]) -> list[np.ndarray]:
        """The input views as contiguous arrays of the manifest's dtypes, checked against its schema."""
        arrays, n = [], None
        for name, dtype, shape, card in self._specs:
            if name not in features:
                raise ExportError(f"input {name!r} is missing (the student reads: {', '.join(self.inputs)})")
            a = np.ascontiguousarray(np.asarray(features[name]), dtype=dtype)
            if a.shape[1:] != shape or (n is not None and len(a) != n):
                want = "(N" + "".join(f", {d}" for d in shape) + ")"
                raise ExportError(f"input {name!r} has shape {a.shape}, expected {want} with one N for every input")
            if card is not None and dtype.kind in "iu" and len(a) and (a.min() < 0 or a.max() >= card):
                raise ExportError(f"input {name!r} holds ids outside [0, {card}); map unknown ids before calling")
            n = len(a)
            arrays.append(a)
        return arrays

    def predict(self, features: Mapping[str, Any], clip: bool = False) -> np.ndarray:
        """Raw outputs (regression: the prediction; classification: logits); `clip` applies the output range."""
        out = self._run(self.prepare(features))
        return np.clip(out, *self._clip) if clip and self._clip else out

    def _run(self, arrays: list[np.ndarray]) -> np.ndarray:
        raise NotImplementedError


class TorchPredictor(Predictor):
    fmt = "safetensors"

    def __init__(self, manifest: Manifest, model: nn.Module) -> None:
        super().__init__(manifest)
        self.model = model

    def _run(self, arrays: list[np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return self.model(dict(zip(self.inputs, map(torch.from_numpy, arrays), strict=True))).float().numpy()


class TorchScriptPredictor(Predictor):
    fmt = "torchscript"

    def __init__(self, manifest: Manifest, module: Any) -> None:
        super().__init__(manifest)
        self.module = module

    def _run(self, arrays: list[np.ndarray]) -> np.ndarray:
        with torch.inference_mode():
            return self.module(*map(torch.from_numpy, arrays)).float().numpy()


class OnnxPredictor(Predictor):
    fmt = "onnx"

    def __init__(self, manifest: Manifest, session: Any) -> None:
        super().__init__(manifest)
        self.session = session

    def _run(self, arrays: list[np.ndarray]) -> np.ndarray:
        return self.session.run(None, dict(zip(self.inputs, arrays, strict=True)))[0]


def load_predictor(export_dir: str | Path, fmt: str = "safetensors", threads: int | None = None,
                   trusted: tuple[str, ...] = TRUSTED_MODULES) -> Predictor:
    """A Predictor for one format of an export folder; `threads` sets onnxruntime's intra-op threads."""
    manifest = read_manifest(export_dir)
    if fmt == "safetensors":
        return TorchPredictor(manifest, load_student(export_dir, trusted))
    path = checked_file(export_dir, manifest, fmt)
    if fmt == "torchscript":
        try:
            with warnings.catch_warnings():  # torch 2.13 marks TorchScript deprecated; the format is still served
                warnings.simplefilter("ignore", DeprecationWarning)
                module = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:
            raise ExportError(f"{path}: not a loadable TorchScript file ({one_line(e)}); export again") from None
        return TorchScriptPredictor(manifest, module.eval())
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("reading ONNX exports needs onnxruntime: pip install 'fmtransfer[export]'") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"{path}: onnxruntime cannot open it ({one_line(e)}); export again") from None
    return OnnxPredictor(manifest, session)
