"""Which format a streamed task's epochs read: Parquet row groups (decoded + encoded each time) or the
encoded FeatureStore shards (memory-mapped .npy). Times one chunk read whole, and random 1024-row batches
gathered from a 4-chunk buffer, both ways, on a table made by benchmarks/scale.py.

    OMP_NUM_THREADS=1 python benchmarks/stream_formats.py /work/fmscale/table-1000000.parquet --cache /tmp/fmt
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("table")
    p.add_argument("--cache", required=True)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from fmtransfer.config import load_config
    from fmtransfer.data.stream import ParquetSource, _columns, _ids, encode_chunk, open_stream_task

    cfg = load_config(str(ROOT / "configs/table_stream/kd.yaml"), [f"task.path={a.table}", f"cache_dir={a.cache}"])
    task, _ = open_stream_task(cfg.task, cfg.cache_dir)  # type: ignore[arg-type]
    src, n = ParquetSource(a.table), cfg.task.chunk_rows  # type: ignore[attr-defined]
    rng = np.random.default_rng(0)
    cols = _columns(cfg.task)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    for r in range(a.repeats):
        chunk = src.read(r * n, (r + 1) * n, cols)
        encode_chunk(chunk, _ids(chunk, cfg.task, r * n), cfg.task, task.stats)  # type: ignore[arg-type]
    parquet_chunk = (time.perf_counter() - t0) / a.repeats
    t0 = time.perf_counter()
    for r in range(a.repeats):
        src.read(r * n, (r + 1) * n, [c for c in cols if c not in cfg.task.text])  # type: ignore[attr-defined]
    parquet_decode = (time.perf_counter() - t0) / a.repeats
    views = [*task.features.values(), task.y, task.codes]
    t0 = time.perf_counter()
    for r in range(a.repeats):
        for v in views:
            v.read(r * n, (r + 1) * n)  # type: ignore[attr-defined]
    shard_chunk = (time.perf_counter() - t0) / a.repeats
    batches = [rng.integers(0, 4 * n, 1024) for _ in range(50)]
    t0 = time.perf_counter()
    for b in batches:
        for v in views:
            v.gather(b)  # type: ignore[attr-defined]
    shard_batch = (time.perf_counter() - t0) / len(batches)
    # the Parquet way to gather a random batch of a 4-chunk buffer: decode + encode the buffer, then take
    t0 = time.perf_counter()
    chunk = src.read(0, 4 * n, cols)
    enc = encode_chunk(chunk, _ids(chunk, cfg.task, 0), cfg.task, task.stats)  # type: ignore[arg-type]
    buffer_decode = time.perf_counter() - t0
    print(f"chunk of {n} rows: parquet read+encode {parquet_chunk * 1e3:.1f} ms, "
          f"encoded shards {shard_chunk * 1e3:.2f} ms ({parquet_chunk / shard_chunk:.0f}x); parquet decode alone "
          f"(no text column, no encoding) {parquet_decode * 1e3:.1f} ms")
    print(f"1024-row random batch from a 4-chunk buffer: shards {shard_batch * 1e3:.2f} ms; parquet must decode the "
          f"buffer first ({buffer_decode * 1e3:.0f} ms, {len(enc['y'])} rows)")


if __name__ == "__main__":
    main()
