"""serve-bench's FM row: a finished run's foundation teacher rebuilt as a live path from its prepared artifact.

The live model itself comes from the teacher's recipe (`teachers/live.py`: `live_builder`); this module
loads the artifact's head weights into it (the backbone's come from its package), checks the artifact,
and records what a server would load (backbone files, head bytes) and the outputs to check it against.
`benchmarking/serve.py` times it.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fmtransfer.config import RunConfig
from fmtransfer.data.base import TaskData
from fmtransfer.integrity import verify_folder
from fmtransfer.serving.manifest import ExportError, one_line
from fmtransfer.teachers.base import teacher_fingerprint
from fmtransfer.teachers.live import LIVE_BUILDERS, live_builder


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
        raise ExportError(f"teacher {name!r} uses recipe {tcfg.recipe!r}, which has no live serving path yet "
                          f"(recipes with one: {', '.join(LIVE_BUILDERS)})")
    seen = (metrics.get("teachers") or {}).get(name) or {}
    seed = tcfg.seed if tcfg.seed is not None else cfg.seed
    fp = seen.get("fingerprint") or teacher_fingerprint(name, tcfg, task, seed)
    artifact = Path(cache_dir or cfg.cache_dir) / "teachers" / f"{name}-{fp}"
    if not (artifact / "weights.safetensors").is_file():
        raise ExportError(f"teacher {name!r}: artifact {artifact} not found; pass --cache-dir with the run's "
                          f"cache_dir (config says {cfg.cache_dir!r})")
    spec = builder(tcfg, task)
    model = spec.model
    damaged = verify_folder(artifact, ("weights.safetensors", "meta.json", "outputs.npy"))
    if damaged is not None:
        raise ExportError(f"teacher {name!r}: artifact {artifact} is corrupt ({damaged}); delete that folder and "
                          "prepare the teacher again (fmtransfer cache CONFIG)")
    try:
        state = load_file(str(artifact / "weights.safetensors"))
    except Exception as e:  # safetensors raises SafetensorError on a damaged header
        raise ExportError(f"teacher {name!r}: {artifact / 'weights.safetensors'} does not load ({one_line(e)}); "
                          "delete that folder and prepare the teacher again (fmtransfer cache CONFIG)") from None
    live = {k: v for k, v in state.items() if not k.startswith(spec.cached_prefix)}
    try:
        missing, unexpected = model.load_state_dict(live, strict=False)
    except RuntimeError as e:
        raise ExportError(f"teacher {name!r}: artifact weights do not fit the live path ({one_line(e)})") from None
    missing = [k for k in missing if not k.startswith(spec.backbone_prefix)]
    if missing or unexpected:
        raise ExportError(f"teacher {name!r}: artifact weights do not fit the live path "
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
