"""Atomic per-epoch checkpoints and safe loading (weights_only=True; never unpickles code).

Each checkpoint has a receipt (size + CRC32, in `receipts.json` beside it): torch's zip reader checks
no CRC, so a flipped byte would otherwise resume a different model without a word.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fmtransfer.errors import ArtifactError
from fmtransfer.integrity import publish, verify

CHECKPOINT_VERSION = 1


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write through a temp file + rename, so a kill mid-write leaves the previous checkpoint intact."""
    obj = {"version": CHECKPOINT_VERSION, **state}
    publish(path, lambda tmp: torch.save(obj, tmp))


def load_checkpoint(path: str | Path, config_hash: str) -> dict[str, Any]:
    """Load a checkpoint made by the same config; a corrupt or foreign file is a one-line error."""
    path = Path(path)
    verify(path, "delete it to restart the run from scratch, or choose another --out")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for truncated or non-checkpoint files
        raise ArtifactError(f"checkpoint {path} is corrupt ({type(e).__name__}); delete it to restart "
                            "the run from scratch") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise ArtifactError(f"checkpoint {path} is not an fmtransfer v{CHECKPOINT_VERSION} checkpoint; "
                            "delete it or choose another --out")
    if state.get("config_hash") != config_hash:
        raise ArtifactError(f"checkpoint {path} was made with a different config; drop --resume or "
                            "choose another --out")
    return state
