"""The files behind a backbone: what they hash to (teacher fingerprints) and what a server loads (bytes).

Apart from spec.py so that the spec imports neither backbone.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fmtransfer.backbones.image import weights_hash
from fmtransfer.backbones.text import encoder_fingerprint, resolve_encoder_path
from fmtransfer.utils import stable_hash


def backbone_fingerprint(modality: str, encoder: str, image_spec: Callable[[], Any]) -> str:
    """Hash of the backbone weights a config may read (for teacher fingerprints): the text encoder's files
    and/or the image backbone's weights file (`image_spec()` gives its BackboneSpec)."""
    parts = []
    if modality in ("auto", "text"):
        try:
            parts.append(encoder_fingerprint(encoder))
        except Exception:  # an absent backbone cannot have been read
            parts.append("no-text-encoder")
    if modality in ("auto", "image"):
        try:
            parts.append(weights_hash(image_spec()))
        except Exception:  # an absent backbone cannot have been read
            parts.append("no-image-backbone")
    return stable_hash(parts)


def encoder_files(spec: str) -> dict[str, int]:
    """Bytes of what a server loads from the encoder's folder: the weights, then tokenizer and config files."""
    folder = Path(resolve_encoder_path(spec))
    weights = [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else list(folder.glob("*.bin"))
    small = [f for f in folder.iterdir() if f.is_file() and (f.name.startswith("tokenizer") or f.suffix == ".model"
                                                             or f.name in ("vocab.txt", "merges.txt", "config.json",
                                                                           "special_tokens_map.json"))]
    return {"encoder weights": sum(f.stat().st_size for f in weights),
            "tokenizer + config": sum(f.stat().st_size for f in small)}
