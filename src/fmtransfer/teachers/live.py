"""The FM teacher as it would serve one request: the encoder runs live on the request's texts, then its head.

During training a frozen-encoder teacher (`probe`, `hybrid`) reads text embeddings computed once and
cached; a server facing new requests has no such cache. `LiveTextModel` is the same architecture with
the same trained weights (read from the teacher's artifact), whose `text_embeddings` tokenizes and
encodes the texts of the batch's rows every call. `serve-bench` times it beside the exported student
and checks its outputs against the artifact's stored outputs, so what it times is the teacher.
Other recipes plug in with a `live_model(cfg, task) -> LiveSpec` classmethod on the recipe class.
The timing itself is serve-bench's; this module only rebuilds the teacher (the encoder runs through
`backbones.text.TextBackbone`).
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fmtransfer.backbones.files import encoder_files
from fmtransfer.backbones.text import TextBackbone, load_encoder
from fmtransfer.config import RunConfig
from fmtransfer.data.base import TaskData
from fmtransfer.errors import ArtifactError
from fmtransfer.failures import one_line
from fmtransfer.integrity import verify_folder
from fmtransfer.registry import MODELS, RECIPES
from fmtransfer.teachers.base import teacher_fingerprint
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


@dataclass
class FmPath:
    """The live FM teacher of a run, what it weighs, and the artifact outputs to check it against."""

    name: str
    recipe: str
    encoder: str
    model: nn.Module
    params: int
    file_bytes: dict[str, int]
    artifact: Path
    outputs: torch.Tensor
    test: dict[str, Any] | None


def pick_fm_teacher(cfg: RunConfig, metrics: dict[str, Any]) -> str | None:
    """The foundation teacher the student replaces: the one it learned from, else the reference, else the first."""
    foundation = [n for n, t in cfg.teachers.items() if t.kind == "foundation"]
    method_teacher = getattr(cfg.method, "teacher", None)
    for name in (method_teacher, (metrics.get("reference") or {}).get("teacher_name"), *foundation):
        if name in foundation:
            return name
    return None


def build_fm_path(cfg: RunConfig, metrics: dict[str, Any], task: TaskData, name: str,
                  cache_dir: str | Path | None = None) -> FmPath:
    """Rebuild teacher `name` of a finished run as a live path, from its artifact in the cache directory."""
    tcfg = cfg.teachers[name]
    builder = live_builder(tcfg.recipe)
    if builder is None:
        raise ArtifactError(f"teacher {name!r} uses recipe {tcfg.recipe!r}, which has no live serving path yet "
                          f"(recipes with one: {', '.join(LIVE_BUILDERS)})")
    seen = (metrics.get("teachers") or {}).get(name) or {}
    seed = tcfg.seed if tcfg.seed is not None else cfg.seed
    fp = seen.get("fingerprint") or teacher_fingerprint(name, tcfg, task, seed)
    artifact = Path(cache_dir or cfg.cache_dir) / "teachers" / f"{name}-{fp}"
    if not (artifact / "weights.safetensors").is_file():
        raise ArtifactError(f"teacher {name!r}: artifact {artifact} not found; pass --cache-dir with the run's "
                          f"cache_dir (config says {cfg.cache_dir!r})")
    spec = builder(tcfg, task)
    model = spec.model
    damaged = verify_folder(artifact, ("weights.safetensors", "meta.json", "outputs.npy"))
    if damaged is not None:
        raise ArtifactError(f"teacher {name!r}: artifact {artifact} is corrupt ({damaged}); delete that folder and "
                          "prepare the teacher again (fmtransfer cache CONFIG)")
    try:
        state = load_file(str(artifact / "weights.safetensors"))
    except Exception as e:  # safetensors raises SafetensorError on a damaged header
        raise ArtifactError(f"teacher {name!r}: {artifact / 'weights.safetensors'} does not load ({one_line(e)}); "
                          "delete that folder and prepare the teacher again (fmtransfer cache CONFIG)") from None
    live = {k: v for k, v in state.items() if not k.startswith(spec.cached_prefix)}
    try:
        missing, unexpected = model.load_state_dict(live, strict=False)
    except RuntimeError as e:
        raise ArtifactError(f"teacher {name!r}: artifact weights do not fit the live path ({one_line(e)})") from None
    missing = [k for k in missing if not k.startswith(spec.backbone_prefix)]
    if missing or unexpected:
        raise ArtifactError(f"teacher {name!r}: artifact weights do not fit the live path "
                          f"(missing {missing[:2]}, unexpected {unexpected[:2]})")
    model.eval().requires_grad_(False)
    head = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith(spec.backbone_prefix)}
    with tempfile.TemporaryDirectory() as d:  # what a server ships beside the backbone: the head alone
        save_file(head, f"{d}/head.safetensors")
        head_bytes = Path(f"{d}/head.safetensors").stat().st_size
    meta = json.loads((artifact / "meta.json").read_text())
    return FmPath(name=name, recipe=tcfg.recipe, encoder=spec.backbone, model=model,
                  params=sum(p.numel() for p in model.parameters()),
                  file_bytes=spec.backbone_files | {"head": head_bytes},
                  artifact=artifact, outputs=torch.from_numpy(np.load(artifact / "outputs.npy").astype(np.float32)),
                  test=(meta.get("metrics") or {}).get("test"))
