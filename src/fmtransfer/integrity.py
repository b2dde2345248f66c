"""Integrity receipts: the size and CRC32 of every file we write and later trust, checked on read.

A folder's `receipts.json` maps file names to receipts `{"bytes": N, "crc32": C}`. A file is written
first (temp name + rename), its receipt after; reading checks the file against its receipt, so a
truncated, byte-flipped or edited file is caught before it is used (torch's zip reader and numpy check
no checksum of their own). A file rewritten in place (the per-epoch checkpoint) is published in two
steps (`publish`): the receipt first lists the old and the new bytes, then only the new, so a kill
at any point leaves a file that matches its receipt. A file without any receipt (written before
receipts existed, or by hand) is accepted unless the caller requires one: receipts guard against
damage, not against someone who edits both files.

This module needs only the standard library (the serving loader imports it).
CRC32 (zlib) costs about 1 s per GB here (docs/cache.md); a file that passed is not read again by the same
process while its size, times and inode stay put.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

from fmtransfer.errors import ArtifactError

RECEIPTS_NAME = "receipts.json"
RECEIPTS_VERSION = 1


def crc32_file(path: str | Path) -> int:
    """CRC32 of a file's bytes, read in 4 MiB chunks."""
    crc = 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            crc = zlib.crc32(chunk, crc)
    return crc


def receipt_of(path: str | Path) -> dict[str, int]:
    p = Path(path)
    return {"bytes": p.stat().st_size, "crc32": crc32_file(p)}


def _receipts_path(folder: Path) -> Path:
    return folder / RECEIPTS_NAME


def read_receipts(folder: str | Path) -> dict[str, list[dict[str, int]]] | None:
    """The folder's receipts per file name; None when it has no receipts file; {} when that file is unreadable."""
    p = _receipts_path(Path(folder))
    if not p.exists():
        return None
    try:
        data = json.loads(p.read_text())
        files = data["files"]
        if not isinstance(files, dict):
            return {}
        return {str(k): [r for r in v if isinstance(r, dict)] for k, v in files.items() if isinstance(v, list)}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _write_receipts(folder: Path, files: dict[str, list[dict[str, int]]]) -> None:
    data = {"version": RECEIPTS_VERSION, "hash": "crc32", "files": files}
    final = _receipts_path(folder)
    tmp = folder / f".{RECEIPTS_NAME}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(data, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)


def record(folder: str | Path, names: list[str] | tuple[str, ...]) -> None:
    """Write (or update) the receipts of files `names` in `folder`, each from the bytes on disk now."""
    folder = Path(folder)
    files = read_receipts(folder) or {}
    for name in names:
        files[name] = [receipt_of(folder / name)]
    _write_receipts(folder, files)


def publish_dir(tmp: str | Path, final: str | Path, names: list[str] | tuple[str, ...]) -> None:
    """Write the receipts of `names` in the built folder `tmp`, then rename it to `final` (which may exist
    only as an empty folder): readers see the whole folder with its receipts, or nothing."""
    tmp, final = Path(tmp), Path(final)
    record(tmp, names)
    if final.exists():
        final.rmdir()
    os.replace(tmp, final)


def publish(path: str | Path, write: Callable[[Path], None]) -> None:
    """Write `path` with `write(tmp)`, then rename it into place, keeping its receipt valid at every instant."""
    path = Path(path)
    folder, name = path.parent, path.name
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.{os.getpid()}.tmp"
    try:
        write(tmp)
        new = receipt_of(tmp)
        files = read_receipts(folder)
        if files == {}:  # rewriting it would drop the receipts of the other files: never check them silently
            raise ArtifactError(f"{folder / RECEIPTS_NAME} is unreadable; delete it to accept the files beside it "
                                "as they are (their receipts are lost)")
        files = files or {}
        files[name] = [new, *files.get(name, [])[:1]]  # both the new and the old bytes are valid for a moment
        _write_receipts(folder, files)
        _maybe_die(name)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    files[name] = [new]
    _write_receipts(folder, files)


KILL_ENV = "FMTRANSFER_DEBUG_KILL_IN_WRITE"
"""Tests set this to NAME@K: the process dies (os._exit(17)) in its K-th publish of file NAME, after the new
bytes and the two-entry receipt are written and before the rename: a real kill at the worst point."""
_published: dict[str, int] = {}


def _maybe_die(name: str) -> None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    target, _, k = spec.partition("@")
    if target == name:
        _published[name] = _published.get(name, 0) + 1
        if _published[name] == int(k or 1):
            os._exit(17)


def check(path: str | Path, required: bool = False) -> str | None:
    """None when `path` matches its receipt (or has none and none is required); else why it does not."""
    path = Path(path)
    if not path.is_file():
        return "it is missing"
    receipts = read_receipts(path.parent)
    if receipts == {}:
        return f"{RECEIPTS_NAME} beside it is unreadable"
    listed = (receipts or {}).get(path.name)
    if not listed:
        return "it has no receipt" if required else None
    st = path.stat()
    if all(r.get("bytes") != st.st_size for r in listed):
        return f"it holds {st.st_size} bytes, its receipt says {listed[0].get('bytes')}"
    crc = _cached_crc(str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if all(r.get("crc32") != crc for r in listed):
        return "its CRC32 does not match its receipt: the bytes changed after it was written"
    return None


@lru_cache(maxsize=256)
def _cached_crc(path: str, size: int, mtime_ns: int, ctime_ns: int, inode: int) -> int:
    return crc32_file(path)


def verify(path: str | Path, fix: str, required: bool = False) -> None:
    """Raise a one-line ArtifactError naming `path` and `fix` when it does not match its receipt."""
    why = check(path, required)
    if why is not None:
        raise ArtifactError(f"{path} is corrupt or altered ({why}); {fix}")


def verify_folder(folder: str | Path, names: list[str] | tuple[str, ...]) -> str | None:
    """None when every file `names` of `folder` matches its receipt; else '<name>: why' of the first that does not."""
    for name in names:
        why = check(Path(folder) / name)
        if why is not None:
            return f"{name}: {why}"
    return None


def remove_stale_temps(folder: str | Path, names: list[str] | tuple[str, ...],
                       max_age_s: float = 0.0) -> list[Path]:
    """Delete leftovers `.NAME.*` of killed writes of files `names` (older than `max_age_s`); return them.

    Call it where no other process can be writing those files (the run folder at start, or under a lock).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now, gone = time.time(), []
    for name in names:
        for p in folder.glob(f".{name}.*"):
            try:
                if p.is_file() and now - p.stat().st_mtime > max_age_s:
                    p.unlink()
                    gone.append(p)
            except OSError:
                continue
    return gone
