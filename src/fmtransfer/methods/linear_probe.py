"""`linear_probe`: a linear head on the frozen foundation model's pooled features (read from the cache).

By default the probe reads the LAST layer's pooled feature (`layers: [1.0]`); `layers: [0.5, 0.75, 1.0]`
concatenates the tapped layers instead. The shared frozen-FM machinery is `FMMethod` (methods/fm_base.py).
"""

from __future__ import annotations

from fmtransfer.methods.fm_base import FMMethod
from fmtransfer.models.fm_heads import ProbeConfig, ProbeModel
from fmtransfer.registry import METHODS


class LinearProbe(FMMethod):
    model_cls = ProbeModel


METHODS.register("linear_probe", ProbeConfig, LinearProbe)
