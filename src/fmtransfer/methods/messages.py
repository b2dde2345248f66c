"""Messages between two models (Talking Models): encoders/decoders, and running a model with a message added.

A *state* is the output of a module found by path (forward hooks on the unwrapped model, no model edits),
or `body`: the model's representation `body(batch)`, the input of its head. States with a token axis
(B, T, D) are mean-pooled and feature maps (B, C, H, W) averaged before they are encoded; a decoded
message (B, D) is added to every token / position of the state it is injected into.

Injection ADDS the decoded message to the module's output (why not replace it: docs/talking.md).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from fmtransfer.backbones.capture import _first_tensor, depth_paths, pool, resolve_modules
from fmtransfer.errors import ConfigError
from fmtransfer.models.base import TaskModel, mlp

BODY = "body"
"""The pseudo-path of a model's representation (body output, head input)."""


def pooled(state: torch.Tensor) -> torch.Tensor:
    """(B, D) from token states (mean) or feature maps (global average); (B, D) as it is."""
    return pool(state, "mean")


def broadcast_to_state(delta: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """A (B, D) message shaped to add onto a (B, D), (B, T, D) or (B, C, H, W) state."""
    if state.dim() == 3:
        return delta.unsqueeze(1)
    if state.dim() == 4:
        return delta[:, :, None, None]
    return delta


def _add_to_output(output: Any, delta: torch.Tensor) -> Any:
    """The module output with `delta` added to its (first) tensor; tuples keep their other items."""
    if isinstance(output, torch.Tensor):
        return output + broadcast_to_state(delta.to(output.dtype), output)
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        first = output[0] + broadcast_to_state(delta.to(output[0].dtype), output[0])
        return (first, *output[1:])
    raise TypeError(f"cannot add a message to a module output of type {type(output).__name__}")


@contextmanager
def hooked(model: nn.Module, inject: dict[str, torch.Tensor],
           capture: Sequence[str]) -> Iterator[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]]:
    """Inside the block, module `p` of `inject` outputs `output + inject[p]`; yields (states, before):
    the pooled outputs of `capture` paths (after any injection) and of `inject` paths before it."""
    paths = [p for p in dict.fromkeys([*inject, *capture]) if p != BODY]
    modules = resolve_modules(model, paths)
    states: dict[str, torch.Tensor] = {}
    before: dict[str, torch.Tensor] = {}
    handles = []

    def make(path: str) -> Any:
        def hook(_m: nn.Module, _i: Any, output: Any) -> Any:
            if path in inject:
                before[path] = pooled(_first_tensor(output))
                output = _add_to_output(output, inject[path])
            if path in capture:
                states[path] = pooled(_first_tensor(output))
            return output if path in inject else None

        return hook

    for p in paths:
        handles.append(modules[p].register_forward_hook(make(p)))
    try:
        yield states, before
    finally:
        for h in handles:
            h.remove()


def run_model(model: TaskModel, batch: dict[str, torch.Tensor], inject: dict[str, torch.Tensor] | None = None,
              capture: Sequence[str] = ()) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Forward `model` with messages added at `inject` paths; return (prediction, captured states, states
    before injection). `body` may appear in both: the representation is then `body(batch) + message`."""
    inject = inject or {}
    with hooked(model, inject, capture) as (states, before):
        z = model.body(batch)
        if BODY in inject:
            before[BODY] = z
            z = z + inject[BODY]
        if BODY in capture:
            states[BODY] = z
        pred = model.head(z) + model.offset(batch)
    missing = [p for p in [*inject, *capture] if p not in states and p not in before]
    if missing:
        raise ConfigError(f"module {missing[0]!r} did not run in {type(model).__name__}'s forward pass; "
                          "choose a module of its body or head")
    return pred, states, before


def auto_inject_path(model: nn.Module) -> str:
    """Default injection layer of a model: the middle transformer layer / block of a stack, else the first
    Linear of its MLP `trunk`, else the middle stage of its `convs`, else `body`."""
    names = dict(model.named_modules())
    if any(isinstance(m, nn.ModuleList) and len(m) > 1 for m in names.values()):
        return depth_paths(model, [0.5])[0]
    trunk = [p for p, m in names.items() if p.startswith("trunk") and isinstance(m, nn.Linear)]
    if trunk:
        return trunk[0]
    convs = [p for p, m in names.items() if p.startswith("convs.") and isinstance(m, (nn.ReLU, nn.MaxPool2d))]
    if convs:
        return convs[len(convs) // 2]
    return BODY


def state_dims(model: TaskModel, batch: dict[str, torch.Tensor], paths: Sequence[str]) -> dict[str, int]:
    """Width of the (pooled) state at each path, from one no-grad forward on `batch`."""
    was = model.training
    model.eval()
    with torch.no_grad():
        _, states, _ = run_model(model, batch, capture=list(paths))
    model.train(was)
    return {p: int(states[p].shape[-1]) for p in paths}


class Codec(nn.Module):
    """Encoders (state -> message) and decoders (message -> state), one pair per state width.

    States of one width share a pair (a transformer's layers share one residual stream); the encoder reads
    a parameter-free layer norm of the state when `normalize` (teachers' states differ in scale)."""

    def __init__(self, dims: Sequence[int], message_dim: int, hidden: int = 0, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = normalize
        mid = [hidden] if hidden else []
        self.enc = nn.ModuleDict({str(d): mlp([d, *mid, message_dim]) for d in sorted(set(dims))})
        self.dec = nn.ModuleDict({str(d): mlp([message_dim, *mid, d]) for d in sorted(set(dims))})

    def prep(self, state: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(state, state.shape[-1:]) if self.normalize else state

    def encode(self, state: torch.Tensor) -> torch.Tensor:
        return self.enc[str(state.shape[-1])](self.prep(state))

    def decode(self, message: torch.Tensor, dim: int) -> torch.Tensor:
        return self.dec[str(dim)](message)

    def self_consistency(self, state: torch.Tensor) -> torch.Tensor:
        """L_SC on one state: ||D(E(s)) - s||^2 (s layer-normed when the encoder reads it so), mean."""
        target = self.prep(state)
        return F.mse_loss(self.decode(self.encode(state), state.shape[-1]), target)


class _Scaled(nn.Module):
    """Weight parametrisation w = scale * w': Adam's step on w' is about lr, so w moves at lr * scale."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.scale

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w / self.scale


def scale_learning_rate(module: nn.Module, scale: float) -> None:
    """Make `module`'s parameters train at about `scale` times the loop's learning rate by reparametrising
    them (w = scale * w'), for Talking's codec and trainable-teacher scales.

    Methods declare per-parameter rates with `Method.lr_scales` (optimizer parameter groups); Talking keeps
    this older form because the two are not the same optimizer: here AdamW's weight decay acts on w' (w decays
    at lr * wd, not lr * scale * wd), Adam's eps is in effect eps / scale, the gradient-norm clip sees the
    scaled gradients, and the state dict holds `parametrizations.<name>.original`. Moving it to parameter
    groups changes the shipped `*-trainable-teacher` results (docs/talking.md)."""
    if scale == 1.0:
        return
    if scale <= 0:
        raise ConfigError(f"learning-rate scale must be > 0, got {scale}")
    for m in list(module.modules()):
        for name, p in list(m.named_parameters(recurse=False)):
            if p.requires_grad:
                parametrize.register_parametrization(m, name, _Scaled(scale))
