"""The streamed table task (table_stream): split by row id, bounded reads, streaming statistics, KD end to
end through the CLI, exact resume, and a teacher cache built by 2 torchrun ranks read by a 1-rank run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO

pa = pytest.importorskip("pyarrow")

from fmtransfer.config import load_config  # noqa: E402
from fmtransfer.data import stream  # noqa: E402
from fmtransfer.data.scale_table import write_table  # noqa: E402
from fmtransfer.data.stream import (  # noqa: E402
    TEST,
    TRAIN,
    TRANSFER,
    VAL,
    Moments,
    merge_heavy_hitters,
    open_stream_task,
    split_codes,
)

CONFIG = REPO / "configs" / "table_stream" / "kd.yaml"
ROWS, CHUNK = 3000, 512


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_table(tmp_path_factory.mktemp("tbl") / "t.parquet", ROWS, chunk_rows=CHUNK)


def _overrides(table: Path, cache: Path) -> list[str]:
    return [f"task.path={table}", f"cache_dir={cache}", f"task.chunk_rows={CHUNK}", "task.labels=0.1",
            "task.buffer_shards=2", "train.epochs=2", "train.batch_size=128", "train.num_threads=1",
            "train.device=cpu", "teachers.wide.train.epochs=1", "teachers.wide.model.buckets=4096"]


def _cfg(table: Path, cache: Path, *extra: str):
    return load_config(str(CONFIG), [*_overrides(table, cache), *extra])


def test_split_is_a_function_of_the_row_id() -> None:
    cfg = stream.TableStreamConfig(path="x.parquet", categorical=["a"], labels=0.2)
    ids = np.arange(20_000)
    whole = split_codes(ids, cfg, 0.2)
    pieces = np.concatenate([split_codes(ids[s:s + 777], cfg, 0.2) for s in range(0, len(ids), 777)])
    np.testing.assert_array_equal(whole, pieces)  # any chunking (any rank's share) gives the same codes
    shuffled = np.random.default_rng(0).permutation(ids)
    np.testing.assert_array_equal(split_codes(shuffled, cfg, 0.2), whole[shuffled])
    frac = {c: float((whole == c).mean()) for c in (TRAIN, TRANSFER, VAL, TEST)}
    assert abs(frac[TEST] - 0.1) < 0.01 and abs(frac[VAL] - 0.1) < 0.01
    assert abs(frac[TRAIN] - 0.16) < 0.01 and abs(frac[TRANSFER] - 0.64) < 0.015
    other = stream.TableStreamConfig(path="x.parquet", categorical=["a"], labels=0.2, split_seed=1)
    assert (split_codes(ids, other, 0.2) != whole).mean() > 0.2  # the split seed moves it


def test_streaming_statistics() -> None:
    rng = np.random.default_rng(0)
    values = [str(v) for v in rng.zipf(1.3, 50_000) % 5000]
    summary: dict[str, int] = {}
    for s in range(0, len(values), 4096):
        c = Counter(values[s:s + 4096])
        merge_heavy_hitters(summary, list(c), list(c.values()), capacity=50)
    assert len(summary) <= 50
    true = Counter(values)
    heavy = {v for v, n in true.items() if n > len(values) / 51}
    assert heavy and heavy <= set(summary)  # Misra-Gries keeps every value above rows / (capacity + 1)
    x = rng.normal(3.0, 2.0, 10_001)
    m = Moments()
    for s in range(0, len(x), 999):
        m.add(x[s:s + 999])
    assert m.n == len(x) and abs(m.mean - x.mean()) < 1e-9 and abs(m.std() - x.std()) < 1e-9


def test_table_is_read_in_chunks_and_views_stay_bounded(table: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import pyarrow.parquet as pq

    def whole_table(*a: object, **k: object) -> None:
        raise AssertionError("the whole table was loaded")

    monkeypatch.setattr(pq, "read_table", whole_table)
    monkeypatch.setattr(pq.ParquetFile, "read", whole_table)
    spans: list[int] = []
    read = stream.ParquetSource.read

    def recording(self: stream.ParquetSource, start: int, end: int, columns: list[str]) -> object:
        spans.append(end - start)
        return read(self, start, end, columns)

    monkeypatch.setattr(stream.ParquetSource, "read", recording)
    cfg = _cfg(table, tmp_path / "c")
    task, encoded = open_stream_task(cfg.task, cfg.cache_dir)  # type: ignore[arg-type]
    assert encoded == ROWS and task.num_rows == ROWS and max(spans) <= CHUNK < ROWS
    codes = np.concatenate([task.codes.read(*task.store.shard_range(k)) for k in range(task.store.num_shards)])
    np.testing.assert_array_equal(codes, split_codes(np.arange(ROWS), cfg.task, 0.1))
    # an epoch of batches maps each shard about once and never holds more than its LRU of shards
    plan = task.batch_plan(uses_transfer=True, batch_size=128, steps_per_epoch=None, seed=0, rank=0, world=1)
    view = task.features["item_id"]
    for rows, _ in plan.epoch(0):
        task.gather(rows)
        assert len(view._open) <= view.cache_shards < task.store.num_shards  # type: ignore[attr-defined]
    assert view.shards_opened <= task.store.num_shards + 1  # type: ignore[attr-defined]
    # a second open reuses the statistics and shards: nothing is read from the table again
    spans.clear()
    assert open_stream_task(cfg.task, cfg.cache_dir)[1] == 0  # type: ignore[arg-type]
    assert spans == []


def test_plan_same_global_batches_for_any_rank_count_and_on_replay(table: Path, tmp_path: Path) -> None:
    cfg = _cfg(table, tmp_path / "c")
    task, _ = open_stream_task(cfg.task, cfg.cache_dir)  # type: ignore[arg-type]

    def batches(world: int, rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        plan = task.batch_plan(uses_transfer=True, batch_size=100, steps_per_epoch=None, seed=3, rank=rank,
                               world=world)
        out = list(plan.epoch(1))
        assert len(out) == len(plan) and 20 <= len(out) <= 26  # ~80% of 3000 rows in batches of 100
        return out

    one = batches(1, 0)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(one, batches(1, 0), strict=True))  # a replay (resume)
    r0, r1 = batches(2, 0), batches(2, 1)
    for (rows, lab), (a, la), (b, lb) in zip(one, r0, r1, strict=True):
        torch.testing.assert_close(rows[0::2], a)
        torch.testing.assert_close(rows[1::2], b)
        torch.testing.assert_close(lab[0::2], la)
        torch.testing.assert_close(lab[1::2], lb)
    flat = torch.cat([r for r, _ in one])
    assert len(set(flat.tolist())) == len(flat)  # one pass: no row twice
    codes = task.codes.gather(flat.numpy())
    assert set(np.unique(codes)) <= {TRAIN, TRANSFER}
    assert not torch.equal(flat, torch.cat([r for r, _ in task.batch_plan(
        uses_transfer=True, batch_size=100, steps_per_epoch=None, seed=3, rank=0, world=1).epoch(2)]))


def test_kd_run_through_the_cli_and_exact_resume(table: Path, tmp_path: Path) -> None:
    from fmtransfer.cli import main

    sets = [x for o in _overrides(table, tmp_path / "c") for x in ("--set", o)]
    assert main(["run", str(CONFIG), *sets, "--out", str(tmp_path / "full")]) == 0
    m = json.loads((tmp_path / "full" / "metrics.json").read_text())
    assert m["streamed"] and m["rows"] == ROWS and m["epochs_run"] == 2 and m["steps"] > 0
    assert m["teachers"]["wide"]["val"]["n"] == m["val"]["n"] > 200
    assert 0.3 < m["test"]["accuracy"] <= 1 and m["teacher_forward"]["run"] == ROWS  # the teacher pass, once
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src"),
           "FMTRANSFER_DEBUG_EXIT_AFTER_EPOCH": "1"}
    cmd = [sys.executable, "-m", "fmtransfer", "run", str(CONFIG), *sets, "--out", str(tmp_path / "cut")]
    died = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert died.returncode == 17 and not (tmp_path / "cut" / "metrics.json").exists(), died.stderr[-2000:]
    assert main(["run", str(CONFIG), *sets, "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert json.loads((tmp_path / "cut" / "metrics.json").read_text())["teacher_forward"]["run"] == 0
    a = load_file(str(tmp_path / "full" / "student.safetensors"))
    b = load_file(str(tmp_path / "cut" / "student.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.multiprocess
def test_cache_built_by_two_ranks_is_read_by_one(table: Path, tmp_path: Path) -> None:
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    sets = [x for o in _overrides(table, tmp_path / "c2") for x in ("--set", o)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fmtransfer", "cache", str(CONFIG), *sets]
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    receipts = [json.loads(p.read_text()) for p in (tmp_path / "c2" / "teachers").glob("*/outputs/shards/*.json")]
    assert sorted({x["rank"] for x in receipts}) == [0, 1]  # each rank wrote its own teacher shards
    out = tmp_path / "one"
    one = subprocess.run([sys.executable, "-m", "fmtransfer", "run", str(CONFIG), *sets, "--out", str(out)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 1 and m["teacher_forward"]["run"] == 0 and m["teachers"]["wide"]["from_cache"]
    # the same teacher built by one process gives the same outputs row for row
    cfg = _cfg(table, tmp_path / "c1")
    from fmtransfer.stream_run import _teachers
    from fmtransfer.train.distributed import DistContext

    task, _ = open_stream_task(cfg.task, cfg.cache_dir)  # type: ignore[arg-type]
    mine = _teachers(cfg, task, ["wide"], DistContext())["wide"]
    cfg2 = _cfg(table, tmp_path / "c2")
    theirs = _teachers(cfg2, open_stream_task(cfg2.task, cfg2.cache_dir)[0], ["wide"], DistContext())["wide"]  # type: ignore[arg-type]
    assert theirs.rows_computed == 0 and mine.fingerprint == theirs.fingerprint
    rows = np.arange(ROWS)
    torch.testing.assert_close(mine.outputs[rows], theirs.outputs[rows], rtol=0, atol=1e-6)


def test_folder_of_files_and_capped_vocabulary(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    folder = tmp_path / "parts"
    write_table(folder / "a.parquet", 1500, seed=0, chunk_rows=CHUNK)
    write_table(folder / "b.parquet", 1500, seed=1, chunk_rows=CHUNK)
    src = stream.ParquetSource(str(folder))
    assert src.rows == 3000 and len(src.files) == 2
    both = pa.concat_tables([pq.read_table(folder / "a.parquet"), pq.read_table(folder / "b.parquet")])
    span = src.read(1400, 1650, ["item_id", "text"])  # across the file boundary
    assert span.to_pylist() == both.select(["item_id", "text"]).slice(1400, 250).to_pylist()
    cfg = _cfg(folder, tmp_path / "c", "task.max_vocab=10")
    task, _ = open_stream_task(cfg.task, cfg.cache_dir)  # type: ignore[arg-type]
    assert task.cardinalities["item_id"] == 11 and task.cardinalities["region"] == 11
    codes = task.features["item_id"][torch.arange(3000)]
    assert codes.dtype == torch.long and int(codes.min()) == 0 and int(codes.max()) == 10  # 0: unknown bucket
    top = Counter(both.column("item_id").to_pylist()).most_common(1)[0][0]
    assert str(top) == task.stats["vocab"]["item_id"][0]  # the most frequent value is kept first
