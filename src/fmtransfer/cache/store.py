"""Feature store (frozen backbones' outputs): sharded .npy files + a JSON manifest, built once, read by memory map.

Layout of one entry (a folder named by its key):

    manifest.json                 key, fields {name: {shape, dtype}}, rows, shard_rows, and per shard
                                  its row range, byte size and CRC32 (written last, by rank 0)
    <field>.<shard:05d>.npy       rows [k * shard_rows, (k + 1) * shard_rows) of one field
    shards/<shard:05d>.json       per-shard receipt (sizes, CRC32), written after its .npy files

Each shard is written to a temp name and renamed, then its receipt is written: a killed build leaves
complete shards (which a rebuild keeps) and no half-written one. Under torchrun, rank r builds the
shards k with k % world == r. Reading checks every shard's size and CRC32 against the manifest, so a
truncated or altered shard is detected and rebuilt rather than used.
A cross-process lock (locks.py) per rank's share of the shards lets two runs that share the cache
build an entry once: the second waits, then finds the shards written. The key covers the producer's
fingerprint (weights, config, tapped layers, dtype) and the data's, so a changed teacher or dataset
gets a new entry.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fmtransfer.errors import ArtifactError
from fmtransfer.integrity import crc32_file
from fmtransfer.locks import entry_lock
from fmtransfer.utils import atomic_write_json, bars_enabled

STORE_VERSION = 1
DTYPES = {"float16": np.float16, "float32": np.float32, "int64": np.int64, "int32": np.int32}


@dataclass(frozen=True)
class FieldSpec:
    """One stored array per row: its per-row shape and storage dtype."""

    shape: tuple[int, ...]
    dtype: str = "float16"


_crc = crc32_file  # the receipts' CRC32 (integrity.py), shared with every other artifact


class FeatureStore:
    """One cache entry: `build` fills missing shards, `load` returns memory-mapped arrays per field."""

    def __init__(self, root: str | Path, key: str, fields: dict[str, FieldSpec], rows: int,
                 shard_rows: int = 4096) -> None:
        if rows <= 0:
            raise ValueError("a cache entry needs at least one row")
        for name, spec in fields.items():
            if spec.dtype not in DTYPES:
                raise ValueError(f"field {name}: dtype {spec.dtype!r} (allowed: {', '.join(DTYPES)})")
        self.dir = Path(root) / key
        self.key, self.fields, self.rows, self.shard_rows = key, fields, rows, shard_rows
        self.num_shards = -(-rows // shard_rows)
        self._verified = False  # set once this process has checked every shard (CRCs are read once)

    # ------------------------------------------------------------------------------------------ layout

    def shard_range(self, k: int) -> tuple[int, int]:
        return k * self.shard_rows, min((k + 1) * self.shard_rows, self.rows)

    def _shard_path(self, name: str, k: int) -> Path:
        return self.dir / f"{name}.{k:05d}.npy"

    def _receipt_path(self, k: int) -> Path:
        return self.dir / "shards" / f"{k:05d}.json"

    def _expected(self) -> dict[str, Any]:
        return {"version": STORE_VERSION, "key": self.key, "rows": self.rows, "shard_rows": self.shard_rows,
                "fields": {n: {"shape": list(s.shape), "dtype": s.dtype} for n, s in self.fields.items()}}

    @staticmethod
    def stored_shape(root: str | Path, key: str, name: str) -> tuple[int, ...] | None:
        """The per-row shape of field `name` in entry `key` as its manifest records it (None: no manifest yet),
        so a producer need not run once to learn the shape of what is already stored."""
        try:
            manifest = json.loads((Path(root) / key / "manifest.json").read_text())
            return tuple(manifest["store"]["fields"][name]["shape"])
        except (OSError, json.JSONDecodeError, KeyError):
            return None

    # ------------------------------------------------------------------------------------------- state

    def _valid_receipt(self, k: int, check_crc: bool) -> dict[str, Any] | None:
        p = self._receipt_path(k)
        try:
            receipt = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if receipt.get("store") != self._expected():
            return None
        for name in self.fields:
            f = self._shard_path(name, k)
            info = receipt["files"].get(name)
            if info is None or not f.exists() or f.stat().st_size != info["bytes"]:
                return None
            if check_crc and _crc(f) != info["crc32"]:
                return None
        return receipt

    def missing_shards(self, check_crc: bool = True) -> list[int]:
        """Shards that are absent, truncated or altered (those a build must (re)write)."""
        return [k for k in range(self.num_shards) if self._valid_receipt(k, check_crc) is None]

    def is_complete(self) -> bool:
        """True when the manifest matches this entry and every shard passes its size and CRC check."""
        if self._verified:
            return True
        try:
            manifest = json.loads((self.dir / "manifest.json").read_text())
        except (OSError, json.JSONDecodeError):
            return False
        self._verified = manifest.get("store") == self._expected() and not self.missing_shards()
        return self._verified

    # ------------------------------------------------------------------------------------------- build

    def build(self, produce: Callable[[int, int], dict[str, np.ndarray]], *, rank: int = 0, world: int = 1,
              desc: str = "cache", barrier: Callable[[], None] | None = None) -> int:
        """Fill this rank's missing shards with `produce(start, end) -> {field: array}`; return rows computed.

        Rank 0 writes the manifest after every rank is done (call `barrier` between), so a manifest
        always describes complete shards.
        """
        self._verified = False
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "shards").mkdir(exist_ok=True)
        with entry_lock(self.dir / f"shards-{rank}-of-{world}", f"cache {self.key}"):
            computed = self._build_mine(produce, rank, world, desc)  # another run may have written them meanwhile
        if barrier is not None:
            barrier()
        with entry_lock(self.dir / "manifest", f"cache {self.key}", enabled=rank == 0):
            self._write_manifest(rank)
        if barrier is not None:
            barrier()
        return computed

    def _build_mine(self, produce: Callable[[int, int], dict[str, np.ndarray]], rank: int, world: int,
                    desc: str) -> int:
        """Write this rank's missing shards (holding the lock of this rank's share of the entry)."""
        todo = [k for k in self.missing_shards() if k % world == rank]
        stale = [k for k in todo if any(self._shard_path(n, k).exists() for n in self.fields)]
        if stale and rank == 0:
            print(f"fmtransfer: cache {self.dir.name}: {len(stale)} shard(s) truncated or altered; rebuilding them",
                  flush=True)
        computed = 0
        n_rows = sum(self.shard_range(k)[1] - self.shard_range(k)[0] for k in todo)
        bars = bars_enabled()
        if rank == 0 and n_rows and not bars:  # no bar off a terminal: say what the minutes ahead are spent on
            print(f"fmtransfer: {desc}: {n_rows} rows to compute (cache {self.dir.name})", file=sys.stderr, flush=True)
        bar = tqdm(total=n_rows, desc=desc, unit="row", leave=False, disable=rank != 0 or n_rows == 0 or not bars)
        for k in todo:
            start, end = self.shard_range(k)
            arrays = produce(start, end)
            files = {}
            for name, spec in self.fields.items():
                a = np.ascontiguousarray(arrays[name], dtype=DTYPES[spec.dtype])
                if a.shape != (end - start, *spec.shape):
                    raise ArtifactError(f"cache {self.key}: field {name!r} produced shape {a.shape}, expected "
                                        f"{(end - start, *spec.shape)}; the teacher's outputs do not fit the spec")
                final = self._shard_path(name, k)
                tmp = final.with_name(f".{final.name}.tmp{os.getpid()}")
                for old in final.parent.glob(f".{final.name}.tmp*"):  # left by a killed build (we hold the lock)
                    with contextlib.suppress(OSError):
                        old.unlink()
                with open(tmp, "wb") as f:
                    np.save(f, a)
                os.replace(tmp, final)
                files[name] = {"bytes": final.stat().st_size, "crc32": _crc(final)}
            atomic_write_json(self._receipt_path(k), {"store": self._expected(), "rows": [start, end],
                                                      "files": files, "rank": rank})
            computed += end - start
            bar.update(end - start)
        bar.close()
        return computed

    def _write_manifest(self, rank: int) -> None:
        if rank == 0:
            receipts = [self._valid_receipt(k, check_crc=False) for k in range(self.num_shards)]
            if any(r is None for r in receipts):
                raise ArtifactError(f"cache {self.key}: shards missing after the build; check disk space in {self.dir}")
            atomic_write_json(self.dir / "manifest.json", {"store": self._expected(),
                                                           "shards": [r["files"] for r in receipts]})

    # -------------------------------------------------------------------------------------------- read

    def load(self, name: str) -> np.ndarray:
        """Every row of `field` as one array (shards are memory-mapped, then joined)."""
        if not self.is_complete():
            raise ArtifactError(f"cache {self.key} is incomplete or corrupt; build it again (fmtransfer cache)")
        parts = [np.load(self._shard_path(name, k), mmap_mode="r") for k in range(self.num_shards)]
        return np.concatenate(parts) if len(parts) > 1 else np.asarray(parts[0])
