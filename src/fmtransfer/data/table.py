"""`table`: bring your own data — a Parquet, CSV or JSONL file with a column mapping.

    task:
      name: table
      path: data/tickets.parquet
      label: priority                 # the target column
      kind: classification            # or regression
      text: [subject, body]           # the FM reads them joined with ". "; the student reads their hashed n-grams
      categorical: [product, region]  # integer-coded, embedded by the student
      numeric: [age_days]             # z-scored with the training split's mean and std
      domain: region                  # optional: rows whose domain is in `ood_domains` become OOD suites
      ood_domains: [APAC]
      labels: 500

Rows outside `ood_domains` are split at random into train/val/test; each OOD domain is its own suite.
The joined text also becomes hashed n-gram views (`words1`, `words2`, ... as in `reviews`: CRC-32 hashes
that a student folds into its own buckets), so a student reads the text beside the other columns; the
hashing is set by plain config values (`word_ngrams`, `char_ngrams`, `max_tokens`).
A missing column, an unreadable file or an unknown format is a one-line error naming the fix; so are
bad values (data/checks.py: inf, duplicate columns, a single class, non-UTF-8 bytes), or a warning.
`path` is resolved relative to the config file that names it (see config.read_config_file).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch

from fmtransfer.config import TaskConfig
from fmtransfer.data.base import TaskData, TextView, labeled_subset
from fmtransfer.data.checks import check_labeled, check_table
from fmtransfer.errors import DataError, did_you_mean
from fmtransfer.preprocess import (
    category_codes,
    category_step,
    encode,
    fit_vocab,
    joined_texts,
    make_spec,
    ngram_step,
    numbers,
    zscore_step,
)
from fmtransfer.registry import TASKS

TEXT_JOIN = ". "
"""The text columns of a row are joined with this before the foundation teacher reads them."""
READERS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl"}
TEACHER_TRAIN = {"epochs": 20, "batch_size": 64, "steps_per_epoch": 20, "lr": 0.003}
"""The loop of the default teachers: a fixed budget of small steps (a few hundred labels are the common case)."""


@dataclass
class TableConfig(TaskConfig):
    default_student: ClassVar[dict[str, Any] | None] = {"name": "tabular"}
    check_data: ClassVar[bool] = True
    """`fmtransfer validate` reads the file and builds the task (the data is the user's, so check it)."""

    name: str = "table"
    path: str = ""
    label: str = "label"
    kind: Literal["classification", "regression"] = "classification"
    text: list[str] = field(default_factory=list)
    categorical: list[str] = field(default_factory=list)
    numeric: list[str] = field(default_factory=list)
    domain: str | None = None
    ood_domains: list[str] = field(default_factory=list)
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    positive_threshold: float | None = None
    """Regression only: also report the AUC of `label >= threshold`."""
    word_ngrams: list[int] = field(default_factory=lambda: [1, 2])
    """Word n-gram orders of the text columns, one student view each (`words1`, ...); [] and no
    `char_ngrams` = the student reads no text."""
    char_ngrams: list[int] = field(default_factory=list)
    """Character n-gram orders inside '<word>' (`chars3`, ...), as in `reviews`."""
    max_tokens: int = 256
    """Longest n-gram list kept per row and view."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if any(n < 1 for n in [*self.word_ngrams, *self.char_ngrams]) or self.max_tokens < 1:
            raise DataError("task: n-gram orders and max_tokens must be >= 1")
        if not self.path:
            raise DataError("task.path: name the Parquet, CSV or JSONL file to read")
        if self.ood_domains and not self.domain:
            raise DataError("task.ood_domains needs task.domain (the column that holds each row's domain)")
        if not 0 < self.val_fraction + self.test_fraction < 1:
            raise DataError("task: val_fraction + test_fraction must be in (0, 1)")


    @staticmethod
    def default_teachers(task: dict[str, Any]) -> dict[str, Any]:
        """Teachers of a config without `teachers:`: MiniLM probed on the text columns (when the table has
        any) and a wide `tabular` model of every column (complementary), both on the labeled rows."""
        out: dict[str, Any] = {}
        if task.get("text"):
            out["fm"] = {"recipe": "probe", "encoder": "minilm", "train": dict(TEACHER_TRAIN)}
        out["wide"] = {"recipe": "supervised", "train": dict(TEACHER_TRAIN),
                       "model": {"name": "tabular", "hidden": [128], "ngram_buckets": 65536, "ngram_dim": 64}}
        return out


def read_table(path: str) -> Any:
    """A pandas DataFrame from a Parquet, CSV or JSONL file (format chosen by the file suffix)."""
    try:
        import pandas as pd
    except ImportError:
        raise DataError("task table needs pandas (and pyarrow for Parquet): pip install 'fmtransfer[data]'") from None
    p = Path(path)
    fmt = READERS.get(p.suffix.lower())
    if fmt is None:
        raise DataError(f"task.path {path!r}: unknown format {p.suffix!r} (allowed: {', '.join(sorted(READERS))})")
    if not p.is_file():
        raise DataError(f"task.path {path!r} does not exist")
    try:
        if fmt == "parquet":
            return pd.read_parquet(p)
        if fmt == "csv":
            return pd.read_csv(p)
        return pd.read_json(p, lines=True)
    except ImportError:
        raise DataError("reading Parquet needs pyarrow: pip install 'fmtransfer[data]'") from None
    except UnicodeDecodeError as e:
        raise DataError(f"task.path {path!r}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset "
                        f"{e.start}); save the file as UTF-8") from None
    except Exception as e:  # pandas raises many types for unreadable files
        raise DataError(f"task.path {path!r} is not a readable {fmt} file ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120]})") from None


@TASKS.register("table", TableConfig)
def build_table(cfg: TableConfig) -> TaskData:
    """Build a task from a user table: label, text for the FM, categorical/numeric columns for the student."""
    df = read_table(cfg.path)
    wanted = [cfg.label, *cfg.text, *cfg.categorical, *cfg.numeric, *([cfg.domain] if cfg.domain else [])]
    for col in wanted:
        if col not in df.columns:
            raise DataError(f"task: column {col!r} is not in {cfg.path}{did_you_mean(col, list(map(str, df.columns)))} "
                            f"(columns: {', '.join(map(str, df.columns))})")
    if not cfg.text and not cfg.categorical and not cfg.numeric:
        raise DataError("task: name at least one input column (text, categorical or numeric)")
    check_table(df, cfg)  # duplicate columns, inf, a single class, empty columns (data/checks.py)
    df = df[df[cfg.label].notna()].reset_index(drop=True)
    n = len(df)
    if n < 10:
        raise DataError(f"task: {cfg.path} has {n} labeled rows; at least 10 are needed")

    is_ood = df[cfg.domain].astype(str).isin(cfg.ood_domains).to_numpy() if cfg.domain else np.zeros(n, bool)
    id_rows = np.flatnonzero(~is_ood)
    perm = np.random.default_rng(cfg.split_seed).permutation(id_rows)
    n_val, n_test = round(cfg.val_fraction * len(perm)), round(cfg.test_fraction * len(perm))
    val, test, train = np.sort(perm[:n_val]), np.sort(perm[n_val:n_val + n_test]), np.sort(perm[n_val + n_test:])
    labeled, transfer = labeled_subset(train, cfg.labels, cfg.split_seed)
    check_labeled(df[cfg.label].astype(str).to_numpy(), labeled, cfg)

    if cfg.kind == "classification":
        classes = sorted(df[cfg.label].astype(str).unique())
        index = {c: k for k, c in enumerate(classes)}
        y = torch.tensor(df[cfg.label].astype(str).map(index).to_numpy(), dtype=torch.long)
        num_classes: int | None = len(classes)
    else:
        try:
            y = torch.tensor(df[cfg.label].astype(float).to_numpy(), dtype=torch.float32)
        except ValueError:
            raise DataError(f"task: label column {cfg.label!r} is not numeric; use kind: classification") from None
        num_classes, classes = None, []

    # every view is made by fmtransfer.preprocess from fitted encoders (recorded: a server applies the same)
    steps: list[dict[str, Any]] = []
    cards: dict[str, int] = {}
    for col in cfg.categorical:
        vocab = fit_vocab(df[col])
        steps.append(category_step(col, col, vocab, 1, 0))  # 0: unseen / missing
        cards[col] = len(vocab) + 1
    for col in cfg.numeric:
        x = _numeric(df[col], col)
        mu, sd = np.nanmean(x[labeled]), np.nanstd(x[labeled]) or 1.0  # the labeled training rows only
        steps.append(zscore_step(col, col, mu, sd, "float64", 0.0))
    texts = {}
    if cfg.text:
        joined = joined_texts({c: df[c].tolist() for c in cfg.text}, cfg.text, TEXT_JOIN)
        texts["row"] = TextView("row", joined)
        if cfg.word_ngrams or cfg.char_ngrams:
            clash = [v for v in _ngram_names(cfg) if v in [*cfg.categorical, *cfg.numeric]]
            if clash:
                raise DataError(f"task: column {clash[0]!r} clashes with the n-gram view of that name; rename it")
            steps.append(ngram_step(cfg.text, cfg.word_ngrams, cfg.char_ngrams, cfg.max_tokens, TEXT_JOIN))
    if not steps:  # a text table without n-grams: the student still needs a view; give it the row's length
        lengths = np.array([len(t) for t in texts["row"].texts], np.float32)
        steps.append({"op": "text_length", "columns": list(cfg.text), "join": TEXT_JOIN, "view": "text_length",
                      "mean": float(lengths.mean()), "std": float(lengths.std() or 1.0)})
    spec = make_spec(steps, labels=classes if cfg.kind == "classification" else None,
                     texts={"row": {"columns": list(cfg.text), "join": TEXT_JOIN}} if cfg.text else None)
    columns = [*cfg.categorical, *cfg.numeric, *cfg.text]
    features = {k: torch.from_numpy(v) for k, v in encode(spec, {c: df[c] for c in columns}).items()}

    splits = {"train": torch.from_numpy(labeled), "transfer": torch.from_numpy(transfer),
              "val": torch.from_numpy(val), "test": torch.from_numpy(test)}
    if cfg.domain:
        dom = df[cfg.domain].astype(str).to_numpy()
        for d in cfg.ood_domains:
            rows = np.flatnonzero(dom == d)
            if len(rows) == 0:
                raise DataError(f"task.ood_domains: no row has {cfg.domain} == {d!r}")
            splits[f"ood/{d}"] = torch.from_numpy(rows)
    return TaskData(
        name="table", task_type=cfg.kind, features=features, y=y, splits=splits,
        metric="accuracy" if cfg.kind == "classification" else "rmse",
        higher_is_better=cfg.kind == "classification", cardinalities=cards, texts=texts, num_classes=num_classes,
        meta={"classes": classes, "positive_threshold": cfg.positive_threshold, "source": str(cfg.path),
              "preprocessing": spec, "ngram_views": [v for v in _ngram_names(cfg) if v in features]},
        raw=lambda rows: {c: df[c].iloc[rows.numpy()].tolist() for c in columns},
    )


def _ngram_names(cfg: TableConfig) -> list[str]:
    return [f"words{n}" for n in cfg.word_ngrams] + [f"chars{n}" for n in cfg.char_ngrams]


def _numeric(series: Any, col: str) -> np.ndarray:
    try:
        return numbers(series, col)
    except DataError:
        raise DataError(f"task: numeric column {col!r} holds non-numbers; list it under categorical") from None


def _codes(series: Any) -> tuple[np.ndarray, list[str]]:
    """Integer codes 1..K for the values of a column, 0 for missing (`fmtransfer.preprocess` does the work)."""
    uniques = fit_vocab(series)
    return category_codes(series, uniques, 1, 0), uniques
