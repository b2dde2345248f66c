"""The FM teacher as it would serve one request: the encoder runs live on the request's texts, then its head.

During training a frozen-encoder teacher (`probe`, `hybrid`) reads text embeddings computed once and
cached; a server facing new requests has no such cache. `LiveTextModel` is the same architecture with
the same trained weights (loaded from the teacher's artifact by `benchmarking/fm_path.py`), whose
`text_embeddings` tokenizes and encodes the texts of the batch's rows every call (through
`backbones.text.TextBackbone`). Other recipes plug in with a `live_model(cfg, task) -> LiveSpec`
classmethod on the recipe class (`image_probe` does); serve-bench times what they return.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fmtransfer.backbones.files import encoder_files
from fmtransfer.backbones.text import TextBackbone, load_encoder
from fmtransfer.data.base import TaskData
from fmtransfer.registry import MODELS, RECIPES
from fmtransfer.teachers.text_fm import TextHeadModel, TextTeacherConfig


class LiveTextModel(TextHeadModel):
    """A frozen-encoder text teacher that encodes each request's texts instead of reading cached embeddings."""

    def __init__(self, cfg: TextTeacherConfig, task: TaskData, views: dict[str, str], tokenizer: Any,
                 encoder: nn.Module, features: nn.Module | None = None) -> None:
        super().__init__(cfg, task, views, int(encoder.config.hidden_size), features)  # type: ignore[arg-type]
        self.tokenizer, self.encoder = tokenizer, encoder.eval()
        self.texts = {v: task.texts[v].texts for v in views}
        # texts per encoder call: 64, as the teacher's own embedding cache encodes them
        self._spec = cfg.backbone_spec()

    def text_embeddings(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Encode the batch's distinct texts per view, longest first in chunks (as a fair server would)."""
        fm = TextBackbone(self._spec, self.tokenizer, self.encoder)
        out = {}
        for v, index in self.views.items():
            uniq, inverse = torch.unique(batch[index], return_inverse=True)
            emb = fm.encode([self.texts[v][i] for i in uniq.tolist()], chunk=64, order="longest")[0]
            out[v] = emb[inverse]
        return out


@dataclass
class LiveSpec:
    """What a live-path builder returns: the serving-time module and how the teacher's artifact maps onto it."""

    model: nn.Module
    """Untrained; forward(batch) runs the FM on the batch's raw inputs (texts, pixels) and its head."""
    backbone: str
    """Name of the frozen foundation model (for the report)."""
    backbone_files: dict[str, int]
    """Bytes a server loads for the backbone (weights, tokenizer, config)."""
    backbone_prefix: str = "encoder."
    """State-dict prefix of the backbone: loaded by the builder, absent from the teacher's artifact."""
    cached_prefix: str = "emb_"
    """Artifact keys the live path replaces (cached backbone outputs); ignored when loading."""


def _text_live(cfg: TextTeacherConfig, task: TaskData) -> LiveSpec:
    views = {v: task.texts[v].index for v in (cfg.views or list(task.texts))}
    tokenizer, encoder = load_encoder(cfg.encoder)
    sub = getattr(cfg, "features", None)
    features = MODELS.get(sub.name).impl(sub, task) if sub is not None else None
    return LiveSpec(LiveTextModel(cfg, task, views, tokenizer, encoder, features), backbone=cfg.encoder,
                    backbone_files=encoder_files(cfg.encoder))


LIVE_BUILDERS: dict[str, Callable[[Any, TaskData], LiveSpec]] = {"probe": _text_live, "hybrid": _text_live}
"""recipe -> live-path builder. A recipe can also define a `live_model(cfg, task) -> LiveSpec` classmethod,
which serve-bench uses without any change here."""


def live_builder(recipe: str) -> Callable[[Any, TaskData], LiveSpec] | None:
    return getattr(RECIPES.get(recipe).impl, "live_model", None) or LIVE_BUILDERS.get(recipe)
