"""`table_stream`: a Parquet table (one file or a folder of them) too large to hold in memory.

    task:
      name: table_stream
      path: data/clicks/              # a .parquet file, or a folder of *.parquet read in name order
      label: clicked
      kind: classification            # or regression
      text: [query]                   # hashed into a `words1` n-gram view (for ngram models)
      categorical: [user_id, ad_id]   # vocabulary: the max_vocab most frequent values, 0 = unknown
      numeric: [price]                # z-scored with the labeled rows' mean and std
      labels: 0.01                    # a fraction of the training rows (or a count, approximately)
      chunk_rows: 65536               # rows per read and per encoded shard

Nothing reads the whole table: a first pass over row ranges fits the statistics (label classes, capped
vocabularies by a mergeable heavy-hitter summary, numeric means/stds by merged moments), a second pass
encodes each row range into one shard of a FeatureStore (memory-mapped .npy shards; under torchrun
rank r encodes shards k % world == r). Each row's split is a hash of its row id (its position in the
table, or `id_column`), so every rank, every resume and every run on any number of ranks see the same
split with no global shuffle. Runs read the shards through `ShardedRows` and `StreamPlan`.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from fmtransfer.cache.rows import ShardedRows
from fmtransfer.cache.store import FeatureStore, FieldSpec
from fmtransfer.config import TaskConfig, to_dict
from fmtransfer.data.base import TaskData
from fmtransfer.data.reviews import stable_ids, tokenize
from fmtransfer.data.stream_plan import StreamPlan
from fmtransfer.errors import ConfigError, DataError
from fmtransfer.ranges import at_least
from fmtransfer.registry import TASKS
from fmtransfer.utils import atomic_write_json, stable_hash

TRAIN, TRANSFER, VAL, TEST, NONE, OOD = 0, 1, 2, 3, 4, 5
"""Split codes stored per row; OOD suite i is code OOD + i; NONE: an evaluation row without a label."""
STATS_VERSION = 1
PAD = -1


@dataclass
class TableStreamConfig(TaskConfig):
    streamed: ClassVar[bool] = True
    name: str = "table_stream"
    path: str = ""
    label: str = "label"
    kind: Literal["classification", "regression"] = "classification"
    text: list[str] = field(default_factory=list)
    categorical: list[str] = field(default_factory=list)
    numeric: list[str] = field(default_factory=list)
    domain: str | None = None
    ood_domains: list[str] = field(default_factory=list)
    id_column: str | None = None
    """An integer column whose value names the row (default: the row's position in the table)."""
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    chunk_rows: int = 65536
    max_vocab: int = 100_000
    """Categorical values kept per column (the most frequent); the rest share the unknown code 0."""
    max_words: int = 32
    buffer_shards: int = field(default=4, metadata=at_least(1))
    """Shards whose rows are shuffled together into batches (memory: a few shards per field)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.path:
            raise DataError("task.path: name the Parquet file or folder of Parquet files to read")
        if self.ood_domains and not self.domain:
            raise DataError("task.ood_domains needs task.domain (the column that holds each row's domain)")
        if not 0 < self.val_fraction + self.test_fraction < 1:
            raise DataError("task: val_fraction + test_fraction must be in (0, 1)")
        if self.chunk_rows < 1 or self.max_vocab < 1 or self.max_words < 1:
            raise ConfigError("task.chunk_rows, task.max_vocab and task.max_words must be >= 1")
        if not self.text and not self.categorical and not self.numeric:
            raise DataError("task: name at least one input column (text, categorical or numeric)")


# ------------------------------------------------------------------------------------------ the source


def _pyarrow() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("task table_stream needs pyarrow: pip install 'fmtransfer[data]'") from None
    return pq


class ParquetSource:
    """Rows [start, end) of a Parquet file or folder, read row group by row group (never the whole table)."""

    def __init__(self, path: str) -> None:
        pq = _pyarrow()
        p = Path(path)
        files = sorted(p.glob("*.parquet")) + sorted(p.glob("*.pq")) if p.is_dir() else [p]
        if not files or not all(f.is_file() for f in files):
            raise DataError(f"task.path {path!r}: no Parquet file there (a .parquet file or a folder of them)")
        self.files, self.groups, self.starts = files, [], []
        self._handles: dict[int, Any] = {}
        n = 0
        for i, f in enumerate(files):
            try:
                meta = pq.ParquetFile(f).metadata
            except Exception as e:  # pyarrow raises several types for unreadable files
                raise DataError(f"task.path {str(f)!r} is not a readable Parquet file ({type(e).__name__})") from None
            for g in range(meta.num_row_groups):
                self.groups.append((i, g, meta.row_group(g).num_rows))
                self.starts.append(n)
                n += meta.row_group(g).num_rows
        self.rows = n
        self.columns = list(pq.ParquetFile(files[0]).schema_arrow.names)

    def fingerprint(self) -> str:
        """Names, sizes and modification times of the files (a changed file gets new statistics and shards)."""
        return stable_hash([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in self.files])

    def read(self, start: int, end: int, columns: list[str]) -> Any:
        """A pyarrow Table of rows [start, end): only the row groups that overlap the range are read."""
        import pyarrow as pa

        pq = _pyarrow()
        parts = []
        g = max(0, bisect.bisect_right(self.starts, start) - 1)
        while g < len(self.groups) and self.starts[g] < end:
            i, rg, n = self.groups[g]
            if i not in self._handles:
                self._handles = {i: pq.ParquetFile(self.files[i])}  # one open file at a time
            t = self._handles[i].read_row_group(rg, columns=columns)
            lo, hi = max(start - self.starts[g], 0), min(end - self.starts[g], n)
            parts.append(t.slice(lo, hi - lo))
            g += 1
        return pa.concat_tables(parts) if len(parts) > 1 else parts[0]


# ------------------------------------------------------------------------------------ split by row id


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a well-spread 64-bit hash of each integer (identical on every machine)."""
    with np.errstate(over="ignore"):
        x = x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def unit_hash(ids: np.ndarray, salt: int) -> np.ndarray:
    """A uniform number in [0, 1) per row id, a pure function of (id, salt)."""
    with np.errstate(over="ignore"):
        salted = ids.astype(np.uint64) * np.uint64(0x2545F4914F6CDD1D) + np.uint64(salt)
    return (_mix(salted) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def split_codes(ids: np.ndarray, cfg: TableStreamConfig, labeled_fraction: float | None,
                ood: np.ndarray | None = None) -> np.ndarray:
    """Each row's split code from its id alone: test / val / train, the train rows labeled or transfer."""
    u = unit_hash(ids, 2 * cfg.split_seed + 1)
    codes = np.where(u < cfg.test_fraction, TEST, np.where(u < cfg.test_fraction + cfg.val_fraction, VAL, TRAIN))
    if labeled_fraction is not None:
        lab = unit_hash(ids, 2 * cfg.split_seed + 2) < labeled_fraction
        codes = np.where((codes == TRAIN) & ~lab, TRANSFER, codes)
    if ood is not None:
        codes = np.where(ood >= 0, OOD + ood, codes)
    return codes.astype(np.int32)


# --------------------------------------------------------------------------------- streaming statistics


def merge_heavy_hitters(summary: dict[str, int], values: list[str], counts: list[int], capacity: int) -> None:
    """Misra-Gries merge (a mergeable summary): add a chunk's value counts, then keep at most `capacity`
    values by subtracting the (capacity+1)-th largest count. Every value more frequent than
    rows / (capacity + 1) survives; memory stays at `capacity` entries."""
    for v, c in zip(values, counts, strict=True):
        summary[v] = summary.get(v, 0) + c
    if len(summary) > capacity:
        counts_now = np.fromiter(summary.values(), np.int64, len(summary))
        cut = int(np.partition(counts_now, len(counts_now) - 1 - capacity)[len(counts_now) - 1 - capacity])
        kept = {v: c - cut for v, c in summary.items() if c > cut}
        summary.clear()
        summary.update(kept)


@dataclass
class Moments:
    """Count, mean and sum of squared deviations, merged chunk by chunk (Chan et al.)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: np.ndarray) -> None:
        x = x[np.isfinite(x)]
        if len(x) == 0:
            return
        n_b, mean_b, m2_b = len(x), float(x.mean()), float(((x - x.mean()) ** 2).sum())
        n = self.n + n_b
        delta = mean_b - self.mean
        self.mean += delta * n_b / n
        self.m2 += m2_b + delta * delta * self.n * n_b / n
        self.n = n

    def std(self) -> float:
        return (self.m2 / self.n) ** 0.5 if self.n else 0.0


def _ids(source_chunk: Any, cfg: TableStreamConfig, start: int) -> np.ndarray:
    if cfg.id_column is None:
        return np.arange(start, start + source_chunk.num_rows, dtype=np.int64)
    col = source_chunk.column(cfg.id_column)
    try:
        return col.to_numpy(zero_copy_only=False).astype(np.int64)
    except (TypeError, ValueError):
        raise DataError(f"task.id_column {cfg.id_column!r} must hold integers") from None


def _ood_index(chunk: Any, cfg: TableStreamConfig) -> np.ndarray | None:
    if not cfg.domain:
        return None
    dom = np.asarray(chunk.column(cfg.domain).cast("string").to_pylist(), dtype=object)
    out = np.full(len(dom), -1, np.int64)
    for i, d in enumerate(cfg.ood_domains):
        out[dom == d] = i
    return out


def _columns(cfg: TableStreamConfig) -> list[str]:
    cols = [cfg.label, *cfg.text, *cfg.categorical, *cfg.numeric, *([cfg.domain] if cfg.domain else [])]
    return list(dict.fromkeys(cols + ([cfg.id_column] if cfg.id_column else [])))


def fit_stats(source: ParquetSource, cfg: TableStreamConfig) -> dict[str, Any]:
    """One streaming pass: split counts, label classes (or range), capped vocabularies, numeric scalers."""
    import pyarrow.compute as pc

    n_train = n_lab = 0
    classes: set[str] = set()
    vocab: dict[str, dict[str, int]] = {c: {} for c in cfg.categorical}
    scalers = {c: Moments() for c in cfg.numeric}
    lo, hi = np.inf, -np.inf
    fraction = cfg.labels if isinstance(cfg.labels, float) else None
    for start in range(0, source.rows, cfg.chunk_rows):
        chunk = source.read(start, min(start + cfg.chunk_rows, source.rows), _columns(cfg))
        ids = _ids(chunk, cfg, start)
        codes = split_codes(ids, cfg, fraction if cfg.labels is not None else None, _ood_index(chunk, cfg))
        label = chunk.column(cfg.label)
        has_label = ~np.asarray(label.is_null().to_numpy(zero_copy_only=False))
        train_like = np.isin(codes, [TRAIN, TRANSFER])
        n_train += int(train_like.sum())
        labeled = (codes == TRAIN) & has_label
        n_lab += int(labeled.sum())
        if cfg.kind == "classification":
            classes.update(str(v) for v in pc.unique(label.cast("string")).to_pylist() if v is not None)
            if len(classes) > 10_000:
                raise DataError(f"task: label {cfg.label!r} has over 10000 classes; use kind: regression")
        else:
            try:
                y = label.cast("double").to_numpy(zero_copy_only=False)
            except Exception:
                raise DataError(f"task: label column {cfg.label!r} is not numeric; use kind: classification") from None
            y = y[np.isfinite(y)]
            if len(y):
                lo, hi = min(lo, float(y.min())), max(hi, float(y.max()))
        train_rows = np.flatnonzero(train_like)
        for c in cfg.categorical:
            counts = pc.value_counts(chunk.column(c).cast("string").take(train_rows))
            vals, cnts = counts.field("values").to_pylist(), counts.field("counts").to_pylist()
            keep = [i for i, v in enumerate(vals) if v is not None]
            merge_heavy_hitters(vocab[c], [vals[i] for i in keep], [cnts[i] for i in keep], 2 * cfg.max_vocab)
        for c in cfg.numeric:
            try:
                x = chunk.column(c).cast("double").to_numpy(zero_copy_only=False)
            except Exception:
                raise DataError(f"task: numeric column {c!r} holds non-numbers; list it under categorical") from None
            scalers[c].add(x[labeled])
    if n_lab == 0 and cfg.labels is None:
        raise DataError(f"task: {cfg.path} has no labeled training row")
    out: dict[str, Any] = {"version": STATS_VERSION, "rows": source.rows, "train_rows": n_train}
    if cfg.labels is None:
        out["labeled_fraction"] = None
    elif isinstance(cfg.labels, float):
        out["labeled_fraction"] = cfg.labels
    else:
        out["labeled_fraction"] = min(1.0, cfg.labels / max(n_train, 1))
    out["classes"] = sorted(classes)
    out["target_range"] = [lo, hi] if cfg.kind == "regression" and np.isfinite(lo) else None
    out["vocab"] = {c: [v for v, _ in sorted(s.items(), key=lambda kv: (-kv[1], kv[0]))[:cfg.max_vocab]]
                    for c, s in vocab.items()}
    out["scalers"] = {c: [m.mean, m.std() or 1.0] for c, m in scalers.items()}
    return out


# ------------------------------------------------------------------------------------------- encoding


def _word_hashes(texts: list[str], max_words: int) -> np.ndarray:
    mat = np.full((len(texts), max_words), PAD, dtype=np.int32)
    memo: dict[str, int] = {}
    for i, t in enumerate(texts):
        ids = stable_ids(tokenize(t)[:max_words], "words1", memo)
        mat[i, :len(ids)] = ids
    return mat


def encode_chunk(chunk: Any, ids: np.ndarray, cfg: TableStreamConfig, stats: dict[str, Any]) -> dict[str, np.ndarray]:
    """A chunk of source rows as the stored fields: split code, target, one array per view."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out: dict[str, np.ndarray] = {}
    label = chunk.column(cfg.label)
    has_label = ~np.asarray(label.is_null().to_numpy(zero_copy_only=False))
    codes = split_codes(ids, cfg, stats["labeled_fraction"], _ood_index(chunk, cfg))
    # a row without a label is a transfer row when it falls in train, and is left out of evaluation elsewhere
    codes = np.where(has_label, codes, np.where(np.isin(codes, [TRAIN, TRANSFER]), TRANSFER, NONE))
    out["split"] = codes.astype(np.int32)
    if cfg.kind == "classification":
        idx = pc.index_in(label.cast("string"), value_set=pa.array(stats["classes"], pa.string()))
        out["y"] = idx.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    else:
        out["y"] = np.nan_to_num(label.cast("double").to_numpy(zero_copy_only=False)).astype(np.float32)
    for c in cfg.categorical:
        idx = pc.index_in(chunk.column(c).cast("string"), value_set=pa.array(stats["vocab"][c], pa.string()))
        out[c] = (idx.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64) + 1).astype(np.int32)
    for c in cfg.numeric:
        mu, sd = stats["scalers"][c]
        x = chunk.column(c).cast("double").to_numpy(zero_copy_only=False)
        out[c] = np.nan_to_num((x - mu) / sd).astype(np.float32)
    if cfg.text:
        cols = [chunk.column(c).cast("string").fill_null("").to_pylist() for c in cfg.text]
        joined = [". ".join(parts) for parts in zip(*cols, strict=True)]
        out["words1"] = _word_hashes(joined, cfg.max_words)
    return out


def field_specs(cfg: TableStreamConfig) -> dict[str, FieldSpec]:
    specs = {"split": FieldSpec((), "int32"),
             "y": FieldSpec((), "int64" if cfg.kind == "classification" else "float32")}
    specs |= {c: FieldSpec((), "int32") for c in cfg.categorical}
    specs |= {c: FieldSpec((), "float32") for c in cfg.numeric}
    if cfg.text:
        specs["words1"] = FieldSpec((cfg.max_words,), "int32")
    return specs


# ---------------------------------------------------------------------------------------- the task


class StreamTask(TaskData):
    """A TaskData whose views are `ShardedRows` (gathered by row like tensors) over the encoded shards.

    The loop asks it for its own batch plan (`batch_plan`) and scores a split by a streaming pass
    (`score_split`); `schema()` is a small in-memory TaskData of one shard that models size themselves from.
    """

    store: FeatureStore
    stats: dict[str, Any]
    cfg: TableStreamConfig

    @classmethod
    def open(cls, cfg: TableStreamConfig, store: FeatureStore, stats: dict[str, Any], fingerprint: str) -> StreamTask:
        fields = store.fields
        views = {c: ShardedRows(store, c, 2 * cfg.buffer_shards, torch.long if c in cfg.categorical else None)
                 for c in fields if c not in ("split", "y")}
        classes = stats["classes"]
        task = cls(
            name="table_stream", task_type=cfg.kind, features=views,  # type: ignore[arg-type]
            y=ShardedRows(store, "y", 2 * cfg.buffer_shards), splits={},  # type: ignore[arg-type]
            metric="accuracy" if cfg.kind == "classification" else "rmse",
            higher_is_better=cfg.kind == "classification",
            cardinalities={c: len(stats["vocab"][c]) + 1 for c in cfg.categorical},
            num_classes=len(classes) if cfg.kind == "classification" else None,
            target_range=tuple(stats["target_range"]) if stats["target_range"] else None,  # type: ignore[arg-type]
            meta={"classes": classes, "source": str(cfg.path), "streamed": True}, fingerprint=fingerprint)
        task.store, task.stats, task.cfg = store, stats, cfg
        task.codes = ShardedRows(store, "split", 2 * cfg.buffer_shards)
        return task

    @property
    def ood_suites(self) -> list[str]:
        return list(self.cfg.ood_domains)

    def split_code(self, split: str) -> int:
        if split.startswith("ood/"):
            return OOD + self.cfg.ood_domains.index(split[4:])
        return {"train": TRAIN, "transfer": TRANSFER, "val": VAL, "test": TEST}[split]

    def count(self, codes: list[int]) -> int:
        """Rows whose split code is in `codes` (a scan of the split field, a few bytes per row)."""
        return sum(int(np.isin(self.codes.read(*self.store.shard_range(k)), codes).sum())
                   for k in range(self.store.num_shards))

    def gather(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        batch = {k: v[rows] for k, v in self.features.items()}
        batch["y"] = self.y[rows]
        batch["row"] = rows
        return batch

    def batch_plan(self, *, uses_transfer: bool, batch_size: int, steps_per_epoch: int | None, seed: int,
                   rank: int, world: int) -> StreamPlan:
        wanted = [TRAIN, TRANSFER] if uses_transfer else [TRAIN]
        return StreamPlan(self.codes, wanted, TRAIN, self.count(wanted), batch_size=batch_size,
                          steps_per_epoch=steps_per_epoch, seed=seed, rank=rank, world=world,
                          buffer_shards=self.cfg.buffer_shards)

    def split_rows(self, split: str, rank: int = 0, world: int = 1) -> Iterator[np.ndarray]:
        """Row ids of `split`, one array per shard of this rank's share (shards k % world == rank), lazily:
        a split's id list is never held whole."""
        code = self.split_code(split)
        for k in range(rank, self.store.num_shards, world):
            start, end = self.store.shard_range(k)
            yield np.flatnonzero(self.codes.read(start, end) == code) + start

    @torch.no_grad()
    def score_split(self, predict: Any, split: str, batch_size: int, device: torch.device,
                    rank: int = 0, world: int = 1) -> dict[str, float]:
        """Streaming metrics of `predict` on a split: each rank scores its shards, the sums are all-reduced.
        Classification: accuracy, nll, n (no AUC: it needs every score at once); regression: rmse, mae, n."""
        sums = torch.zeros(3, dtype=torch.float64)
        for rows in self.split_rows(split, rank, world):
            for s in range(0, len(rows), batch_size):
                r = torch.from_numpy(rows[s:s + batch_size])
                batch = self.gather(r)
                pred = predict({k: v.to(device) for k, v in batch.items()}).float().cpu()
                y = batch["y"]
                if self.task_type == "classification":
                    sums += torch.tensor([len(r), float((pred.argmax(-1) == y).sum()),
                                          float(torch.nn.functional.cross_entropy(pred, y.long(), reduction="sum"))],
                                         dtype=torch.float64)
                else:
                    if self.target_range is not None:
                        pred = pred.clamp(*self.target_range)
                    err = pred - y.float()
                    sums += torch.tensor([len(r), float((err ** 2).sum()), float(err.abs().sum())], dtype=torch.float64)
        if world > 1:
            import torch.distributed as dist

            dist.all_reduce(sums)
        n = max(float(sums[0]), 1.0)
        if self.task_type == "classification":
            return {"accuracy": float(sums[1]) / n, "nll": float(sums[2]) / n, "n": int(sums[0])}
        return {"rmse": (float(sums[1]) / n) ** 0.5, "mae": float(sums[2]) / n, "n": int(sums[0])}

    def schema(self) -> TaskData:
        """One shard in memory as a plain TaskData: what models and methods size themselves from."""
        start, end = self.store.shard_range(0)
        feats = {k: torch.from_numpy(v.read(start, end)) for k, v in self.features.items()}  # type: ignore[attr-defined]
        feats = {k: (v.long() if k in self.cfg.categorical else v) for k, v in feats.items()}
        codes = self.codes.read(start, end)
        train = np.flatnonzero(codes == TRAIN)
        return TaskData(name=self.name, task_type=self.task_type, features=feats,
                        y=torch.from_numpy(self.y.read(start, end)),  # type: ignore[attr-defined]
                        splits={"train": torch.from_numpy(train if len(train) else np.arange(end - start))},
                        metric=self.metric, higher_is_better=self.higher_is_better,
                        cardinalities=self.cardinalities, num_classes=self.num_classes,
                        target_range=self.target_range, meta=self.meta, fingerprint=self.fingerprint)


def open_stream_task(cfg: TableStreamConfig, cache_dir: str | Path, rank: int = 0, world: int = 1,
                     barrier: Any = None) -> tuple[StreamTask, int]:
    """Fit the statistics (rank 0, once) and encode the shards (every rank its own); return the task
    and the rows this process encoded (0 when the shards existed)."""
    barrier = barrier or (lambda: None)
    source = ParquetSource(cfg.path)
    missing = [c for c in _columns(cfg) if c not in source.columns]
    if missing:
        raise DataError(f"task: column {missing[0]!r} is not in {cfg.path} (columns: {', '.join(source.columns)})")
    if source.rows < 10:
        raise DataError(f"task: {cfg.path} has {source.rows} rows; at least 10 are needed")
    d = to_dict(cfg)
    for k in ("buffer_shards",):  # how rows are read, not what they hold
        d.pop(k, None)
    key = stable_hash([STATS_VERSION, source.fingerprint(), d])
    root = Path(cache_dir) / "stream"
    stats_path = root / f"stats-{key}.json"
    if rank == 0 and not stats_path.exists():
        atomic_write_json(stats_path, fit_stats(source, cfg))
    barrier()
    stats = json.loads(stats_path.read_text())
    store = FeatureStore(root, f"rows-{key}", field_specs(cfg), source.rows, shard_rows=cfg.chunk_rows)
    encoded = 0
    if not store.is_complete():
        def produce(start: int, end: int) -> dict[str, np.ndarray]:
            chunk = source.read(start, end, _columns(cfg))
            return encode_chunk(chunk, _ids(chunk, cfg, start), cfg, stats)

        encoded = store.build(produce, rank=rank, world=world, desc="encode", barrier=barrier)
    return StreamTask.open(cfg, store, stats, stable_hash([key, "rows"])), encoded


@TASKS.register("table_stream", TableStreamConfig)
def build_table_stream(cfg: TableStreamConfig) -> TaskData:
    """Outside a run (validation, tests): the task over the default cache folder, one process."""
    return open_stream_task(cfg, ".fmtransfer_cache")[0]
