"""Cross-process locks (the `filelock` package) around publishing shared cache entries.

Two runs that share a cache_dir may want the same prepared teacher or feature-store entry at once.
Whoever takes the entry's lock first builds and publishes it; the other waits, then finds it ready
and reads it instead of building it a second time over the first one's files. The lock is an OS file
lock, released by the kernel if its holder dies, so a killed run never leaves the cache locked.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock, Timeout


def lock_path(entry: Path) -> Path:
    """The lock file of a cache entry (a hidden sibling, so listing the cache shows only entries)."""
    return entry.parent / f".{entry.name}.lock"


@contextlib.contextmanager
def entry_lock(entry: Path, what: str, enabled: bool = True) -> Iterator[None]:
    """Hold the cross-process lock of `entry` (a file or folder path) for the block; say so when waiting."""
    if not enabled:
        yield
        return
    entry.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(lock_path(entry)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        print(f"fmtransfer: waiting for another process that is preparing {what} (lock {lock.lock_file})",
              flush=True)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def remove_stale_dirs(entry: Path) -> int:
    """Delete `.NAME.tmp*` folders that killed builds of `entry` left (call while holding its lock)."""
    n = 0
    for p in entry.parent.glob(f".{entry.name}.tmp*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n


@contextlib.contextmanager
def staged_dir(final: Path) -> Iterator[Path]:
    """A fresh temp folder beside `final` to build it in, after removing what killed builds left; it is
    deleted on the way out unless the block renamed it into place (integrity.publish_dir)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
    remove_stale_dirs(final)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
