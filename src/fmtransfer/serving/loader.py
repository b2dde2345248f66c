"""Load an exported student without fmtransfer's training code; every format answers the same way.

`load_student(DIR)` rebuilds the student's own class from the manifest and `student.safetensors`;
`load_predictor(DIR, fmt)` wraps it, the ONNX file (onnxruntime) or the TorchScript file behind one
`predict(rows)` / `predict_proba(rows)` on raw rows. Of fmtransfer this imports only the student's model
module (named in the manifest), `fmtransfer.config` (its config dataclass), `fmtransfer.data.base` (the
schema the class is built from) and `fmtransfer.preprocess` (the encoders the task's features were made
with): never `fmtransfer.train`, `.methods`, `.teachers` or `.run` (a test checks).
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

from fmtransfer.errors import DataError
from fmtransfer.preprocess import TEXT_VIEW, encode, identity_spec, raw_columns
from fmtransfer.serving.manifest import (
    EXPORT_INSTALL,
    ExportError,
    Manifest,
    checked_file,
    one_line,
    read_manifest,
)

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
    if manifest.model.get("fm") is not None:
        return _load_served_fm(export_dir, manifest, trusted)
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


def check_encoder(fm: dict[str, Any]) -> None:
    """The text encoder (architecture, tokenizer, frozen weights) installed here must be the export's."""
    from fmtransfer.backbones.text import encoder_fingerprint

    try:
        found = encoder_fingerprint(fm["encoder"])
    except Exception as e:
        raise ExportError(f"the model's encoder {fm['encoder']!r} is not installed here ({one_line(e)}); install it "
                          f"as for training (it was {fm['path']})") from None
    if found != fm["fingerprint"]:
        raise ExportError(f"encoder {fm['encoder']!r} here has files hashing to {found}, the export was made with "
                          f"{fm['fingerprint']}; install the encoder the model was trained with")


def load_tokenizer(fm: dict[str, Any]) -> Any:
    """The tokenizer of a text model's encoder, from the package or folder it names (checked first)."""
    from fmtransfer.backbones.text import resolve_encoder_path
    from fmtransfer.backbones.text import transformers_module as _transformers

    check_encoder(fm)
    return _transformers().AutoTokenizer.from_pretrained(resolve_encoder_path(fm["encoder"]), local_files_only=True)


def _load_served_fm(export_dir: str | Path, manifest: Manifest, trusted: tuple[str, ...]) -> nn.Module:
    """A frozen-FM model (levi, probes): its class and weights, wrapped with the live encoder of the package."""
    from safetensors.torch import load_file

    from fmtransfer.config import from_dict

    rec, fm = manifest.model, manifest.model["fm"]
    if fm.get("kind") == "image_graph":
        raise ExportError(f"{export_dir}: this {rec['name']} model (an image FM) is served by its graph files "
                          f"({', '.join(f for f in manifest.files if f != 'safetensors')}): "
                          "load_predictor(DIR, 'torchscript'), or fmtransfer predict --format torchscript")
    serve = importlib.import_module("fmtransfer.models.fm_serve")
    check_encoder(fm)
    if fm.get("kind") == "finetuned":  # the encoder's architecture and tokenizer from the package, weights here
        model: nn.Module = serve.ServedTextFinetune(fm["encoder"], fm["max_length"], manifest.task["type"],
                                                    int(rec["out_dim"]))
        path = checked_file(export_dir, manifest, "safetensors")
        try:
            model.load_state_dict(load_file(str(path)), strict=True)
        except Exception as e:
            raise ExportError(f"{path}: weights do not fit {rec['class']} ({one_line(e)}); "
                              "export the run again") from None
        return model.eval().requires_grad_(False)
    task = schema_task(manifest)
    try:
        small = None
        if rec.get("small"):
            s = rec["small"]
            small = import_object(s["class"], trusted)(from_dict(import_object(s["config_class"], trusted),
                                                                 s["config"], "model.small.config"), task)
        cfg = from_dict(import_object(rec["config_class"], trusted), rec["config"], "model.config")
        model = serve.rebuild(import_object(rec["head_class"], trusted), cfg, task, fm, small)
    except ExportError:
        raise
    except Exception as e:
        raise ExportError(f"{export_dir}: cannot rebuild {rec['head_class']} from the manifest ({one_line(e)}); "
                          "export the run again") from None
    path = checked_file(export_dir, manifest, "safetensors")
    taps = serve.TextTaps(fm["encoder"], fm["paths"], fm["max_length"], fm["normalize"])
    state = load_file(str(path))
    trained = {k[len(serve.BACKBONE_PREFIX):]: v for k, v in state.items() if k.startswith(serve.BACKBONE_PREFIX)}
    try:
        model.load_state_dict({k: v for k, v in state.items() if not k.startswith(serve.BACKBONE_PREFIX)}, strict=True)
        if trained:  # LEVI's backbone trained (tune_backbone / lora, merged): its weights are the export's
            taps.net.load_state_dict(trained, strict=True)
    except Exception as e:
        raise ExportError(f"{path}: weights do not fit {rec['head_class']} ({one_line(e)}); "
                          "export the run again") from None
    return serve.ServedFM(model.eval().requires_grad_(False), taps).eval()


class Predictor:
    """One exported model in one format.

    Raw rows in (a dict of columns, a pandas DataFrame or a list of dicts, with the task's source columns):
    `predict(rows)` gives class labels (classification) or clipped predictions (regression), `predict_proba(rows)`
    the class probabilities, `outputs(rows)` the raw outputs; the manifest's encoders (`fmtransfer.preprocess`,
    the code the task built its features with) turn the rows into feature views first. `predict_features(views)`
    skips that step and takes the views themselves.
    """

    fmt = ""

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self.inputs = list(manifest.inputs)
        self._specs = [(n, np.dtype(manifest.features[n]["dtype"]), tuple(manifest.features[n]["shape"]),
                        manifest.task.get("cardinalities", {}).get(n), bool(manifest.features[n].get("variable")))
                       for n in self.inputs]
        rng = manifest.output.get("clip")
        self._clip = tuple(rng) if rng else None
        self.encoders = row_encoders(manifest)
        self.columns = raw_columns(self.encoders)
        """The raw columns `predict` reads."""
        labels = self.encoders.get("labels")
        n_cls = manifest.task.get("num_classes")
        self.classes: list[Any] | None = None if manifest.task["type"] == "regression" else \
            list(labels) if labels else list(range(int(n_cls or 0)))
        """Class labels in output order (None for regression)."""
        self.token_inputs: list[str] = list((manifest.files.get(self.fmt) or {}).get("extra_inputs") or [])
        """Graph files of text models: the token inputs they take after the views (the tokenizer runs here)."""
        self._tokenizer: Any = None

    def prepare(self, features: Mapping[str, Any]) -> list[np.ndarray]:
        """The input views as contiguous arrays of the manifest's dtypes, checked against its schema."""
        arrays, n = [], None
        for name, dtype, shape, card, variable in self._specs:
            if name not in features:
                raise ExportError(f"input {name!r} is missing (the student reads: {', '.join(self.inputs)})")
            a = np.ascontiguousarray(np.asarray(features[name]), dtype=dtype)
            fits = a.shape[1:] == shape or (variable and a.ndim == len(shape) + 1 and a.shape[-1] >= 1)
            if not fits or (n is not None and len(a) != n):
                want = "(N" + "".join(", L" if variable else f", {d}" for d in shape) + ")"
                raise ExportError(f"input {name!r} has shape {a.shape}, expected {want} with one N for every input")
            if card is not None and dtype.kind in "iu" and len(a) and (a.min() < 0 or a.max() >= card):
                raise ExportError(f"input {name!r} holds ids outside [0, {card}); map unknown ids before calling")
            n = len(a)
            arrays.append(a)
        return arrays

    def predict_features(self, features: Mapping[str, Any], clip: bool = False) -> np.ndarray:
        """Raw outputs (regression: the prediction; classification: logits) of feature views; `clip` applies
        the output range."""
        texts = features.get(TEXT_VIEW)
        out = self._run(self.prepare(features), None if texts is None else [str(t) for t in texts])
        return np.clip(out, *self._clip) if clip and self._clip else out

    def encode(self, rows: Any) -> dict[str, np.ndarray]:
        """Raw rows -> the feature views the model reads (the training-time preprocessing)."""
        try:
            return encode(self.encoders, rows)
        except DataError as e:
            raise ExportError(str(e)) from None

    def outputs(self, rows: Any) -> np.ndarray:
        """Raw outputs of raw rows: logits (N, C) for classes, the clipped prediction (N,) for regression."""
        return self.predict_features(self.encode(rows), clip=True)

    def predict(self, rows: Any) -> np.ndarray:
        """Class labels (classification) or predictions (regression) of raw rows."""
        return self.decide(self.outputs(rows))

    def predict_proba(self, rows: Any) -> np.ndarray:
        """Class probabilities (N, C) of raw rows, columns in the order of `classes`."""
        if self.classes is None:
            raise ExportError("predict_proba: this model predicts a number (regression); use predict")
        return softmax(self.outputs(rows))

    def with_tokens(self, arrays: list[np.ndarray], texts: list[str] | None) -> list[np.ndarray]:
        """A text model's graph file takes token ids after the views: tokenize the texts as the export did."""
        if not self.token_inputs:
            return arrays
        if texts is None:
            raise ExportError(f"this {self.manifest.model['name']} model reads texts: pass raw rows to predict "
                              f"(columns: {', '.join(self.columns)})")
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.manifest.model["fm"])
        from fmtransfer.models.fm_serve import tokenize

        enc = tokenize(self._tokenizer, texts, int(self.manifest.model["fm"]["max_length"]), "np")
        return [*arrays, *(np.ascontiguousarray(enc[k], dtype=np.int64) for k in self.token_inputs)]

    def decide(self, out: np.ndarray) -> np.ndarray:
        """Raw outputs -> labels (argmax, mapped to `classes`) or the regression value itself."""
        if self.classes is None:
            return out
        return np.asarray(self.classes, dtype=object if any(isinstance(c, str) for c in self.classes)
                          else None)[out.argmax(-1)]

    def _run(self, arrays: list[np.ndarray], texts: list[str] | None = None) -> np.ndarray:
        raise NotImplementedError


class TorchPredictor(Predictor):
    fmt = "safetensors"

    def __init__(self, manifest: Manifest, model: nn.Module) -> None:
        super().__init__(manifest)
        self.model = model

    def _run(self, arrays: list[np.ndarray], texts: list[str] | None = None) -> np.ndarray:
        batch: dict[str, Any] = dict(zip(self.inputs, map(torch.from_numpy, arrays), strict=True))
        if (self.manifest.model.get("fm") or {}).get("kind") in ("frozen", "finetuned"):  # a text FM reads texts
            if texts is None:
                raise ExportError(f"this {self.manifest.model['name']} model reads texts: pass raw rows to predict "
                                  f"(columns: {', '.join(self.columns)})")
            batch[TEXT_VIEW] = texts
        with torch.inference_mode():
            return self.model(batch).float().numpy()


class TorchScriptPredictor(Predictor):
    fmt = "torchscript"

    def __init__(self, manifest: Manifest, module: Any) -> None:
        super().__init__(manifest)
        self.module = module

    def _run(self, arrays: list[np.ndarray], texts: list[str] | None = None) -> np.ndarray:
        with torch.inference_mode():
            return self.module(*map(torch.from_numpy, self.with_tokens(arrays, texts))).float().numpy()


class OnnxPredictor(Predictor):
    fmt = "onnx"

    def __init__(self, manifest: Manifest, session: Any) -> None:
        super().__init__(manifest)
        self.session = session

    def _run(self, arrays: list[np.ndarray], texts: list[str] | None = None) -> np.ndarray:
        arrays = self.with_tokens(arrays, texts)
        return self.session.run(None, dict(zip(self.inputs + self.token_inputs, arrays, strict=True)))[0]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(-1, keepdims=True)).astype(np.float32)


def row_encoders(manifest: Manifest) -> dict[str, Any]:
    """The manifest's encoders, cut to the steps that write a view the model reads; an export without any
    (a task that records none) reads each input view as a raw column of its own."""
    spec = (manifest.preprocessing or {}).get("encoders")
    if not spec:
        labels = (manifest.task.get("meta") or {}).get("classes") or None
        return identity_spec({n: (manifest.features[n]["dtype"], manifest.features[n]["shape"])
                              for n in manifest.inputs}, labels)
    wanted = {*manifest.inputs, TEXT_VIEW}
    steps = [s for s in spec["steps"] if set(s.get("views") or [s.get("view")]) & wanted]
    return dict(spec) | {"steps": steps}


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
        raise ExportError(f"reading ONNX exports needs onnxruntime: {EXPORT_INSTALL}") from None
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    try:
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise ExportError(f"{path}: onnxruntime cannot open it ({one_line(e)}); export again") from None
    return OnnxPredictor(manifest, session)
