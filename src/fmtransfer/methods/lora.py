"""`lora`: low-rank adapters (peft) on the frozen foundation model, trained with a linear head.

Text (MiniLM): LoRA on the attention projections (`query`, `key`, `value` by default; `target_modules`
picks others). Image (EfficientNet-Lite0, a CNN): peft's Conv2d LoRA applies to the 1x1 convolutions
(pointwise expand/project of every MBConv block and the 1x1 head conv; docs/finetuning.md counts them);
the 3x3/5x5 depthwise convs and the stem are not adapted (a ConfigError names a target that is one of them)
and BatchNorm keeps its ImageNet statistics. Trainable: the adapters and the head (`trainable_params` in
metrics.json["method_diagnostics"]). The adapters are not merged for inference (`inference_ms_per_example`
counts them). peft is optional: `pip install 'peft==0.21.2' 'torch==2.13.0'`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fmtransfer.data.base import TaskData
from fmtransfer.errors import ConfigError
from fmtransfer.methods.base import BuildContext, Built
from fmtransfer.methods.finetune_base import FMFinetuneMethod, build_probed_model
from fmtransfer.models.fm_finetune import ProbeStageConfig, build_fm_model, inject_lora
from fmtransfer.registry import METHODS


@dataclass
class LoraMethodConfig(ProbeStageConfig):
    name: str = "lora"
    rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    target_modules: list[str] | None = None
    """Module names (or dotted-name suffixes) to adapt; null = text: query, key, value; image: the 1x1 convs."""
    probe_init: bool = False
    """Start the head from a linear probe (lp_ft's stage 1) instead of a fresh head."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rank < 1:
            raise ConfigError(f"method.rank: must be >= 1, got {self.rank}")


class Lora(FMFinetuneMethod):
    @classmethod
    def build_model(cls, cfg: LoraMethodConfig, ctx: BuildContext, task: TaskData) -> Built | None:  # type: ignore[override]
        built = build_probed_model(cfg, ctx, task) if cfg.probe_init else Built(build_fm_model(cfg, task, ctx.device))
        adapted = inject_lora(built.model, cfg.rank, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules)
        return Built(built.model.to(ctx.device), info={**built.info, "lora_modules": adapted})


METHODS.register("lora", LoraMethodConfig, Lora)
