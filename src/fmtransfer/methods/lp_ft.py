"""`lp_ft`: linear probe, then full fine-tuning from it (Kumar et al.'s LP-FT; our settings).

Stage 1 (in `build_model`, before the loop): the linear head alone trains on the frozen backbone's pooled
features of the labeled rows (`probe_steps` full-batch AdamW steps at `probe_lr`, the head with the best
validation score is kept); the backbone is never updated. Stage 2 (the run's loop): every weight fine-tunes
from there with the task loss at `train.lr`, which the shipped configs set below `finetune`'s lr. The
probe stage's seconds and validation score are reported in metrics.json["method_diagnostics"].
"""

from __future__ import annotations

from dataclasses import dataclass

from fmtransfer.data.base import TaskData
from fmtransfer.methods.base import BuildContext, Built
from fmtransfer.methods.finetune_base import FMFinetuneMethod, build_probed_model
from fmtransfer.models.fm_finetune import ProbeStageConfig
from fmtransfer.registry import METHODS


@dataclass
class LPFTConfig(ProbeStageConfig):
    name: str = "lp_ft"


class LPFT(FMFinetuneMethod):
    """Fine-tuning from the probed head: the loop's objective is the plain task loss."""

    @classmethod
    def build_model(cls, cfg: LPFTConfig, ctx: BuildContext, task: TaskData) -> Built | None:  # type: ignore[override]
        return build_probed_model(cfg, ctx, task)


METHODS.register("lp_ft", LPFTConfig, LPFT)
