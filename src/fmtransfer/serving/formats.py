"""Writers of the exported student's files: safetensors (state dict), ONNX and TorchScript (programs).

ONNX and TorchScript take positional tensors, not a dict, so both record `PositionalStudent`: one
argument per input view, in the manifest's order, with a dynamic batch dimension. ONNX goes through
torch's default exporter (torch.export, needs onnxscript); TorchScript through `torch.jit.trace`,
which torch 2.13 marks deprecated (kept because some servers still load it; prefer ONNX).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from fmtransfer.serving.manifest import EXPORT_INSTALL, OUTPUT_NAME, ExportError, one_line


class PositionalStudent(nn.Module):
    """The student with one tensor argument per input view (ONNX and TorchScript take no dicts)."""

    def __init__(self, model: nn.Module, inputs: list[str]) -> None:
        super().__init__()
        self.model = model
        self.inputs = list(inputs)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        return self.model(dict(zip(self.inputs, tensors, strict=True)))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence exporter chatter (deprecation warnings, 'torchvision is not installed' logs, progress prints)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir")]  # + the optimizer's notes
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def write_safetensors(model: nn.Module, inputs: list[str], example: tuple[torch.Tensor, ...], path: Path,
                      metadata: dict[str, str]) -> dict[str, object]:
    """The state dict alone (no code): what `load_student` rebuilds the class around."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=metadata)
    return {}


def write_onnx(model: nn.Module, inputs: list[str], example: tuple[torch.Tensor, ...], path: Path,
               metadata: dict[str, str]) -> dict[str, object]:
    """One self-contained .onnx file (no external data) with a dynamic batch axis on every input."""
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch's exporter needs it; fail here with the install hint)
    except ImportError:
        raise ExportError(f"--format onnx needs onnx and onnxscript: {EXPORT_INSTALL}") from None
    batch = torch.export.Dim("batch")
    # integer (N, L) views are hashed n-gram lists or token ids: their length L varies from batch to batch
    # (token ids and their attention mask share one length)
    tokens = torch.export.Dim("tokens")
    dims = tuple({0: batch, 1: tokens if k in ("input_ids", "attention_mask") else torch.export.Dim(f"len_{k}")}
                 if x.dim() == 2 and not x.is_floating_point() else {0: batch}
                 for k, x in zip(inputs, example, strict=True))
    try:
        with _quiet():
            torch.onnx.export(PositionalStudent(model, inputs).eval(), example, str(path), dynamo=True,
                              input_names=inputs, output_names=[OUTPUT_NAME], external_data=False,
                              dynamic_shapes=(dims,), verbose=False)
    except Exception as e:
        raise ExportError(f"ONNX export of the student failed ({one_line(e)}); export another format") from None
    proto = onnx.load(str(path), load_external_data=False)
    for k, v in metadata.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.save(proto, str(path))
    return {"opset": max(op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")),
            "onnx": onnx.__version__}


def write_torchscript(model: nn.Module, inputs: list[str], example: tuple[torch.Tensor, ...], path: Path,
                      metadata: dict[str, str]) -> dict[str, object]:
    """A traced TorchScript archive (`torch.jit.load` runs it without Python model code)."""
    try:
        with _quiet():
            traced = torch.jit.trace(PositionalStudent(model, inputs).eval(), example, check_trace=False)
            torch.jit.save(traced, str(path), _extra_files={"fmtransfer.json": json.dumps(metadata)})
    except Exception as e:
        raise ExportError(f"TorchScript export of the student failed ({one_line(e)}); export another format") from None
    return {}


Writer = Callable[[nn.Module, list[str], tuple[torch.Tensor, ...], Path, dict[str, str]], dict[str, object]]
WRITERS: dict[str, Writer] = {"safetensors": write_safetensors, "onnx": write_onnx, "torchscript": write_torchscript}
