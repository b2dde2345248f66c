"""`mlp_probe`: an MLP on the frozen foundation model's tapped layers, the very features LEVI reads.

The same cached, normalised features as `levi` (default: 50%, 75% and 100% depth, concatenated), one
hidden layer, trained on the labeled rows with the task loss. It is the bar that tells whether LEVI's
layer-wise adapters and the small model add anything over simply reading the same layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fmtransfer.methods.fm_base import FMMethod
from fmtransfer.models.fm_heads import ProbeConfig, ProbeModel
from fmtransfer.registry import METHODS


@dataclass
class MLPProbeConfig(ProbeConfig):
    name: str = "mlp_probe"
    layers: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0])
    hidden: list[int] = field(default_factory=lambda: [256])
    dropout: float = 0.1


class MLPProbe(FMMethod):
    model_cls = ProbeModel


METHODS.register("mlp_probe", MLPProbeConfig, MLPProbe)
