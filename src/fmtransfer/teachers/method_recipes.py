"""Method-as-teacher recipes: LEVI and every FM baseline method prepares a teacher like any recipe.

Each recipe builds the very model the method of the same name builds (its `build_model` hook, through
`build_method`: LEVI's or a probe's head on the cached tapped features, lp_ft's probe stage, wise_ft's
theta_0 and alpha sweep, LoRA injection, the ensemble's two members) and prepares it with that method's own
objective under the teacher's `train` section, so the adapted FM teaches in a committee (kd, multi_kd,
DiverseDistill, Talking Models) like any prepared teacher:

    teachers:
      fm_levi:
        recipe: levi
        small: {name: ngram, buckets: 16384, dim: 64, hidden: [64]}    # the small model, for levi / ensemble
        method: {layers: [0.5, 0.75, 1.0], weighting: learned}        # any `levi` method option
        train: {epochs: 20, batch_size: 64, steps_per_epoch: 50, lr: 0.003}

- `levi`: LEVI on the frozen FM's tapped layers, with the small model `small` (or method.small).
- `linear_probe`: a linear head on the frozen FM's pooled features.
- `mlp_probe`: an MLP on the frozen FM's tapped layers.
- `ensemble`: the small model and a probe, trained side by side (`small` or method.small).
- `finetune_full`: the `finetune` method (every weight trains, a linear head on the pooled last layer).
- `lp_ft`: linear probe, then full fine-tuning from it.
- `wise_ft`: lp_ft's fine-tuning, then the best interpolation with the probe (needs train.patience: null).
- `lora`: low-rank adapters on the frozen FM with a linear head.

`finetune_full` is not called `finetune`: that is the former name of the text recipe `text_finetune`
(teachers/text_fm.py), still accepted for it. The teacher's `reps` are its model's body output. The
fine-tuning recipes run the backbone live on every row once the teacher is trained (what a pass costs on
reviews: docs/reviews.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch

from fmtransfer.backbones.files import backbone_fingerprint
from fmtransfer.config import MethodConfig, ModelConfig, TeacherConfig
from fmtransfer.data.base import TaskData
from fmtransfer.methods.base import BuildContext, build_method
from fmtransfer.methods.finetune import FinetuneConfig
from fmtransfer.methods.lora import LoraMethodConfig
from fmtransfer.methods.lp_ft import LPFTConfig
from fmtransfer.methods.mlp_probe import MLPProbeConfig
from fmtransfer.methods.wise_ft import WiseFTConfig
from fmtransfer.models.fm_finetune import FMFinetuneConfig
from fmtransfer.models.fm_heads import EnsembleConfig, LEVIConfig, ProbeConfig
from fmtransfer.models.fm_layers import fm_fingerprint
from fmtransfer.registry import RECIPES
from fmtransfer.teachers.base import Recipe, TeacherBuild
from fmtransfer.train.loop import planned_steps


@dataclass
class MethodTeacherConfig(TeacherConfig):
    """A teacher prepared by a method: the method's model trained with the method's objective."""

    kind: Literal["foundation", "complementary"] = "foundation"
    small: ModelConfig | None = None
    """The small task model of a method that holds one (levi, ensemble; any registered model); or set
    method.small."""
    method: MethodConfig = field(default_factory=MethodConfig)
    """Every option of the method the recipe is named after (its section, without `name`)."""
    holds_small: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.small is not None and not self.holds_small:  # from_dict prefixes the teacher's path
            raise ValueError(f"small: recipe {self.recipe}'s method holds no small model; delete `small:`")


def finetune_fingerprint(cfg: FMFinetuneConfig) -> str:
    """Hash of the backbone weights a fine-tuning config may read (text encoder and/or image backbone)."""
    return backbone_fingerprint(cfg.modality, cfg.encoder, lambda: cfg.backbone_spec("image"))


class MethodRecipe(Recipe):
    """Build the model with the method's `build_model` (through `build_method`); train it with the method."""

    kind = "foundation"

    @classmethod
    def fingerprint_extra(cls, cfg: Any) -> str:
        if isinstance(cfg.method, FMFinetuneConfig):
            return finetune_fingerprint(cfg.method)
        return fm_fingerprint(cfg.method)

    @classmethod
    def build(cls, cfg: Any, task: TaskData, cache_dir: Path, device: torch.device) -> TeacherBuild:
        # preparation seeded torch with the teacher's seed just before build: the methods' own seeded steps
        # (lp_ft's probe split, wise_ft's fresh head) use the same one
        ctx = BuildContext(cache_dir=cache_dir, seed=int(torch.initial_seed()), device=device, small=cfg.small,
                           planned_steps=planned_steps(task, cfg.train, uses_transfer=False),
                           eval_batch_size=cfg.train.eval_batch_size)
        method = build_method(cfg.method, task, {}, ctx)
        fm = getattr(method.student, "fm_info", None)
        return TeacherBuild(method.student, frozen_params=int(fm["backbone_params_used"]) if fm else 0,
                            encoder_forwards=int(fm["encoder_forwards"]) if fm else 0, method=method)


def method_teacher_config(recipe: str, class_name: str, method_cfg: type[MethodConfig], holds_small: bool) -> type:
    """The config class of recipe `recipe`: MethodTeacherConfig with its `method` section typed `method_cfg`.

    A recipe whose method holds no small model refuses a `small` and leaves the unset key out of its
    fingerprint, as its config had no such key before the recipes were merged (prepared teachers stay valid)."""
    namespace: dict[str, Any] = {"__module__": __name__, "holds_small": holds_small}
    if not holds_small:
        namespace["fingerprint_optional"] = {"small": None}
    fields: list[Any] = [("recipe", str, field(default=recipe)),
                         ("method", method_cfg, field(default_factory=method_cfg))]
    return dataclasses.make_dataclass(class_name, fields, bases=(MethodTeacherConfig,), namespace=namespace)


METHOD_RECIPES: dict[str, tuple[str, type[MethodConfig], bool]] = {
    "levi": ("LEVITeacherConfig", LEVIConfig, True),
    "linear_probe": ("LinearProbeTeacherConfig", ProbeConfig, False),
    "mlp_probe": ("MLPProbeTeacherConfig", MLPProbeConfig, False),
    "ensemble": ("EnsembleTeacherConfig", EnsembleConfig, True),
    "finetune_full": ("FinetuneFullTeacherConfig", FinetuneConfig, False),
    "lp_ft": ("LPFTTeacherConfig", LPFTConfig, False),
    "wise_ft": ("WiseFTTeacherConfig", WiseFTConfig, False),
    "lora": ("LoraTeacherConfig", LoraMethodConfig, False),
}
"""recipe -> (its config class's name, the method's config class, whether the method holds a small model)."""

for _recipe, (_name, _cfg_cls, _small) in METHOD_RECIPES.items():
    RECIPES.register(_recipe, method_teacher_config(_recipe, _name, _cfg_cls, _small), MethodRecipe)
