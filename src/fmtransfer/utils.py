"""Small shared helpers: hashing, atomic file writes, seeding, JSON."""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch


def bars_enabled() -> bool:
    """Progress bars only on a terminal, and never under TQDM_DISABLE (CI, nohup and logs get plain lines)."""
    import sys

    return sys.stderr.isatty() and os.environ.get("TQDM_DISABLE", "").lower() in ("", "0", "false")


def stable_hash(obj: Any, n: int = 16) -> str:
    """Hex digest of a JSON-serialisable object (keys sorted), stable across runs and machines."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def hash_arrays(arrays: Iterable[np.ndarray | torch.Tensor], n: int = 16) -> str:
    """Content hash of arrays or tensors (shape, dtype and bytes)."""
    h = hashlib.sha256()
    for a in arrays:
        if isinstance(a, torch.Tensor):
            a = a.detach().cpu().contiguous()
            h.update(f"{tuple(a.shape)}{a.dtype}".encode())
            h.update(a.view(torch.uint8).numpy().tobytes() if a.numel() else b"")
        else:
            a = np.ascontiguousarray(a)
            h.update(f"{a.shape}{a.dtype}".encode())
            h.update(a.tobytes())
    return h.hexdigest()[:n]


def file_hash(path: str | Path) -> str:
    """SHA-256 (16 hex digits) of a file's bytes, memoised by (path, size, mtime): weights are hashed once."""
    st = os.stat(path)
    return _file_hash(str(path), st.st_size, st.st_mtime)


@lru_cache(maxsize=32)
def _file_hash(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()


def _normal_mode(fd: int) -> None:
    """mkstemp creates files 0600; give them the mode an ordinary open() would (0666 minus the umask)."""
    os.fchmod(fd, 0o666 & ~_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        _normal_mode(fd)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n").encode())


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    """torch.save through a temp file and rename (checkpoints survive a kill mid-write)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    _normal_mode(fd)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, torch.Tensor) and o.numel() == 1:
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def apply_num_threads(num_threads: int | None) -> None:
    """`train.num_threads` (when set) for this process's torch ops: every command that computes honours it."""
    if num_threads:
        torch.set_num_threads(num_threads)


def count_params(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
