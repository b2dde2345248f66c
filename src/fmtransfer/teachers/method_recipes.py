"""Teacher recipes from LEVI's remaining baselines: `ensemble`, `finetune_full`, `lp_ft`, `wise_ft`, `lora`.

Issue 6 asks that LEVI and every baseline double as teacher-preparation recipes. `levi`, `linear_probe` and
`mlp_probe` live in teachers/adapted.py; this file adds the rest. Each recipe builds the very model the method
of the same name builds (its `build_model` hook: lp_ft's probe stage, wise_ft's theta_0 and alpha sweep, LoRA
injection, the ensemble's two members) and prepares it with that method's own objective, under the teacher's
`train` section, so the adapted FM teaches in a committee like any prepared teacher:

    teachers:
      fm_wise:
        recipe: wise_ft
        method: {encoder: minilm, max_length: 128}            # any `wise_ft` method option
        train: {epochs: 5, batch_size: 16, steps_per_epoch: 30, lr: 0.00005, grad_clip: 1.0}

`finetune_full` is the `finetune` method (every weight, linear head on the mean-pooled last layer); the recipe
name `finetune` was taken first by the text recipe that fine-tunes the top layers with an MLP head
(teachers/text_fm.py). The teacher's `reps` are its model's body output (the standardised pooled features for
the fine-tuning recipes, [u; probe representation] for `ensemble`). The fine-tuning recipes run the backbone
live on every row once the teacher is trained (35k texts on reviews: minutes on a CPU).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from fmtransfer.config import ModelConfig, TeacherConfig
from fmtransfer.data.base import TaskData
from fmtransfer.methods.base import Method
from fmtransfer.methods.ensemble import Ensemble, EnsembleConfig
from fmtransfer.methods.finetune import Finetune, FinetuneConfig
from fmtransfer.methods.lora import Lora, LoraMethodConfig
from fmtransfer.methods.lp_ft import LPFT, LPFTConfig
from fmtransfer.methods.wise_ft import WiseFT, WiseFTConfig
from fmtransfer.models.base import TaskModel
from fmtransfer.models.fm_finetune import FMFinetuneConfig
from fmtransfer.models.fm_layers import backbone_fingerprint, fm_fingerprint
from fmtransfer.registry import RECIPES
from fmtransfer.teachers.base import Recipe, TeacherBuild


@dataclass
class _RunView:
    """What the methods' `build_model` hooks read from a run config, filled from the teacher's config."""

    student: ModelConfig | None
    train: Any
    seed: int
    cache_dir: Path


def finetune_fingerprint(cfg: FMFinetuneConfig) -> str:
    """Hash of the backbone weights a fine-tuning config may read (text encoder and/or image backbone)."""
    from fmtransfer.models.fm_finetune import _image_cfg

    return backbone_fingerprint(cfg.modality, cfg.encoder, lambda: _image_cfg(cfg))


class MethodRecipe(Recipe):
    """Build the model with the method's `build_model`; train it with the method itself."""

    kind = "foundation"
    method_cls: ClassVar[type[Method]]

    @classmethod
    def fingerprint_extra(cls, cfg: Any) -> str:
        if isinstance(cfg.method, FMFinetuneConfig):
            return finetune_fingerprint(cfg.method)
        return fm_fingerprint(cfg.method)

    @classmethod
    def build(cls, cfg: Any, task: TaskData, cache_dir: Path, device: torch.device) -> TeacherBuild:
        # preparation seeded torch with the teacher's seed just before build: the methods' own seeded steps
        # (lp_ft's probe split, wise_ft's fresh head) use the same one
        run = _RunView(getattr(cfg, "small", None), cfg.train, int(torch.initial_seed()), cache_dir)
        model = cls.method_cls.build_model(cfg.method, run, task, device)
        assert model is not None
        fm = getattr(model, "fm_info", None)
        return TeacherBuild(model, frozen_params=int(fm["backbone_params_used"]) if fm else 0,
                            encoder_forwards=int(fm["encoder_forwards"]) if fm else 0)

    @classmethod
    def method(cls, cfg: Any, model: TaskModel, task: TaskData) -> Any:
        return cls.method_cls(cfg.method, model, task, {})


def _recipe(method_cls: type[Method]) -> type[MethodRecipe]:
    return type(f"{method_cls.__name__}Recipe", (MethodRecipe,), {"method_cls": method_cls})


@dataclass
class EnsembleTeacherConfig(TeacherConfig):
    recipe: str = "ensemble"
    kind: Literal["foundation", "complementary"] = "foundation"
    small: ModelConfig | None = None
    """The ensemble's small model (any registered model); or set method.small."""
    method: EnsembleConfig = field(default_factory=EnsembleConfig)


@dataclass
class FinetuneFullTeacherConfig(TeacherConfig):
    recipe: str = "finetune_full"
    kind: Literal["foundation", "complementary"] = "foundation"
    method: FinetuneConfig = field(default_factory=FinetuneConfig)


@dataclass
class LPFTTeacherConfig(TeacherConfig):
    recipe: str = "lp_ft"
    kind: Literal["foundation", "complementary"] = "foundation"
    method: LPFTConfig = field(default_factory=LPFTConfig)


@dataclass
class WiseFTTeacherConfig(TeacherConfig):
    recipe: str = "wise_ft"
    kind: Literal["foundation", "complementary"] = "foundation"
    method: WiseFTConfig = field(default_factory=WiseFTConfig)


@dataclass
class LoraTeacherConfig(TeacherConfig):
    recipe: str = "lora"
    kind: Literal["foundation", "complementary"] = "foundation"
    method: LoraMethodConfig = field(default_factory=LoraMethodConfig)


RECIPES.register("ensemble", EnsembleTeacherConfig, _recipe(Ensemble))
RECIPES.register("finetune_full", FinetuneFullTeacherConfig, _recipe(Finetune))
RECIPES.register("lp_ft", LPFTTeacherConfig, _recipe(LPFT))
RECIPES.register("wise_ft", WiseFTTeacherConfig, _recipe(WiseFT))
RECIPES.register("lora", LoraTeacherConfig, _recipe(Lora))
