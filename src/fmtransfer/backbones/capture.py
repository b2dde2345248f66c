"""Capture intermediate states of any torch model by module path, with forward hooks (no model edits).

    with LayerCapture(encoder, ["encoder.layer.2", "encoder.layer.5"]) as cap:
        encoder(**batch)
    states = cap.pooled("mean", attention_mask)        # {path: (B, D)}

Hooks go on the unwrapped model; a path that does not exist is a one-line error listing the paths that do.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

import torch
from torch import nn

from fmtransfer.errors import ConfigError

Pooling = Literal["mean", "cls", "gap", "none"]


def module_paths(model: nn.Module) -> list[str]:
    return [name for name, _ in model.named_modules() if name]


def resolve_modules(model: nn.Module, paths: list[str]) -> dict[str, nn.Module]:
    """Map each path to its submodule; an unknown path raises a ConfigError naming close matches."""
    model = getattr(model, "module", model)  # unwrap DDP / DataParallel
    available = dict(model.named_modules())
    out = {}
    for p in paths:
        if p not in available or not p:
            names = module_paths(model)
            close = difflib.get_close_matches(p, names, n=5, cutoff=0.5)
            hint = close or [n for n in names if n.count(".") <= 2][:12]
            raise ConfigError(f"module path {p!r} not found in {type(model).__name__} "
                              f"(available paths include: {', '.join(hint)})")
        out[p] = available[p]
    return out


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if hasattr(output, "last_hidden_state"):
        return output.last_hidden_state
    raise TypeError(f"cannot take a tensor from a module output of type {type(output).__name__}")


def pool(states: torch.Tensor, how: Pooling, mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, D) token states or (B, C, H, W) maps -> (B, D) / (B, C); 'none' keeps them as they are."""
    if how == "none":
        return states
    if states.dim() == 4:  # image feature maps
        if how not in ("gap", "mean"):
            raise ConfigError(f"pooling {how!r} does not apply to feature maps (use gap or mean)")
        return states.mean(dim=(2, 3))
    if states.dim() == 2:
        return states
    if how == "cls":
        return states[:, 0]
    if how in ("mean", "gap"):
        if mask is None:
            return states.mean(1)
        m = mask.unsqueeze(-1).to(states.dtype)
        return (states * m).sum(1) / m.sum(1).clamp(min=1e-9)
    raise ConfigError(f"unknown pooling {how!r} (allowed: mean, cls, gap, none)")


class LayerCapture:
    """Records the output of the given module paths during the forward passes inside the `with` block."""

    def __init__(self, model: nn.Module, paths: list[str]) -> None:
        self.modules = resolve_modules(model, paths)
        self.states: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def __enter__(self) -> LayerCapture:
        for path, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(path)))
        return self

    def _hook(self, path: str) -> Any:
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.states[path] = _first_tensor(output)

        return record

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def pooled(self, how: Pooling, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        missing = [p for p in self.modules if p not in self.states]
        if missing:
            raise RuntimeError(f"module {missing[0]!r} did not run in the forward pass")
        return {p: pool(self.states[p], how, mask) for p in self.modules}


def transformer_layer_paths(model: nn.Module) -> list[str]:
    """Paths of the model's transformer layers (the longest ModuleList), e.g. 'encoder.layer.0'..."""
    stacks = [(len(m), name) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not stacks:
        raise ConfigError(f"{type(model).__name__}: no stack of layers found; name module paths explicitly")
    n, best = max(stacks, key=lambda s: s[0])
    return [f"{best}.{k}" for k in range(n)]


def depth_paths(model: nn.Module, fractions: list[float]) -> list[str]:
    """Layer paths at fractions of the depth (1.0 = the last layer), e.g. [0.5, 0.75, 1.0]."""
    layers = transformer_layer_paths(model)
    out = []
    for f in fractions:
        if not 0 < f <= 1:
            raise ConfigError(f"layer fraction {f} must be in (0, 1]")
        out.append(layers[max(1, round(f * len(layers))) - 1])
    return list(dict.fromkeys(out))
