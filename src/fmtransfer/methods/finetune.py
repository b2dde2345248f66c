"""`finetune`: full fine-tuning of the foundation model with a linear head on its pooled last layer.

The baseline LEVI is measured against (DESIGN.md section 3). Every backbone weight and the head train on
the labeled rows with the task loss, from the pre-trained weights and a fresh head; the run's `train`
section is the compute budget (steps x batch), the same for every fine-tuning baseline, and selection is
the loop's: the epoch with the best validation score. Reviews -> MiniLM-L6, digits -> EfficientNet-Lite0
(models/fm_finetune.py). On a task model that is not a foundation model (the contract test's MLP) the
method is plain supervised training.

The shared fine-tuning machinery is `FMFinetuneMethod` (methods/finetune_base.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from fmtransfer.methods.finetune_base import FMFinetuneMethod
from fmtransfer.models.fm_finetune import FMFinetuneConfig
from fmtransfer.registry import METHODS


@dataclass
class FinetuneConfig(FMFinetuneConfig):
    name: str = "finetune"


class Finetune(FMFinetuneMethod):
    """Every weight and a fresh head train with the task loss (the base class's objective, unchanged)."""


METHODS.register("finetune", FinetuneConfig, Finetune)
