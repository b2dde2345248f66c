"""Raw columns -> the feature views a model reads: one code path for training and for serving.

Each task builds its views through these functions and records the fitted encoders as a JSON spec
(`task.meta["preprocessing"]`); the export writes that spec into its manifest and the serving loader
runs `encode(spec, rows)` on new raw rows, so a server transforms a row exactly as training did.
Imports numpy (and pandas, for category codes) only: no torch, nothing of the training code.

A spec is {"version": 1, "steps": [...], "labels": [...] | None}. Each step reads raw columns and
writes views; its `op` is one of:
- `ngram`: texts -> hashed word/char n-grams (31-bit CRC-32), one int32 (N, L) view per order, padded
  with -1; L is the longest row of the batch (variable-length rows; models ignore the padding).
- `category`: values -> int64 codes from a fitted vocabulary (`start` + position); unseen and missing
  values go to the `unknown` code (None: the vocabulary has no unknown bucket and an unseen value is an
  error naming the column).
- `zscore`: numbers -> (x - mean) / std in `dtype` arithmetic; missing -> `fill` (None: an error).
- `multi_hot`: a list of names (or one 'a|b' string) -> float32 (N, len(vocab)) flags.
- `image`: a pixel array per row (values 0..scale) -> float32 (N, C, H, W) / scale.
- `text_length`: joined text columns -> z-scored character count (float32).
- `identity`: a column that already is the view (dtype and per-row shape are checked).
- `text`: text columns joined -> the texts a served foundation model reads (view `__text__`).
A spec may also name, under `texts`, the raw columns (and separator) each of the task's text views joins.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fmtransfer.errors import DataError

SPEC_VERSION = 1
TEXT_VIEW = "__text__"
"""The view a `text` step writes: the texts a served foundation model reads (an object array of str)."""
PAD = -1
HASH = "crc32-31bit"
_TOKEN = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[!?]")


# ------------------------------------------------------------------------------------------ n-grams


def tokenize(text: str) -> list[str]:
    """Lower-cased words (with their apostrophe suffix: don't, it's) and ! and ? as tokens."""
    return _TOKEN.findall(text.lower())


def ngrams(text: str, word_orders: list[int], char_orders: list[int]) -> dict[str, list[str]]:
    """The n-grams of one text, by view name (`words<n>`, `chars<n>`), in text order."""
    words = tokenize(text)
    out = {}
    for n in word_orders:
        out[f"words{n}"] = [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
    marked = [f"<{w}>" for w in words]
    for n in char_orders:
        out[f"chars{n}"] = [w[i:i + n] for w in marked for i in range(len(w) - n + 1)]
    return out


def stable_ids(grams: list[str], view: str, memo: dict[str, int]) -> list[int]:
    """31-bit CRC-32 of 'view:gram' (identical in every process; Python's hash() is salted)."""
    out = []
    for g in grams:
        h = memo.get(g)
        if h is None:
            h = memo[g] = zlib.crc32(f"{view}:{g}".encode()) & 0x7FFFFFFF
        out.append(h)
    return out


def hash_ngrams(texts: Sequence[str], word_orders: list[int], char_orders: list[int],
                max_tokens: int) -> dict[str, np.ndarray]:
    """One int32 (N, L) matrix of n-gram hashes per view, left-aligned, padded with -1, 1 <= L <= max_tokens."""
    names = [f"words{n}" for n in word_orders] + [f"chars{n}" for n in char_orders]
    rows: dict[str, list[list[int]]] = {v: [] for v in names}
    memos: dict[str, dict[str, int]] = {v: {} for v in names}
    for t in texts:
        for v, grams in ngrams(t, word_orders, char_orders).items():
            rows[v].append(stable_ids(grams[:max_tokens], v, memos[v]))
    out = {}
    for v, lists in rows.items():
        width = max(1, max((len(x) for x in lists), default=0))
        mat = np.full((len(lists), width), PAD, dtype=np.int32)
        for i, ids in enumerate(lists):
            mat[i, :len(ids)] = ids
        out[v] = mat
    return out


def ngram_step(columns: list[str], word_orders: list[int], char_orders: list[int], max_tokens: int,
               join: str = ". ") -> dict[str, Any]:
    views = [f"words{n}" for n in word_orders] + [f"chars{n}" for n in char_orders]
    return {"op": "ngram", "columns": list(columns), "join": join, "word_orders": list(word_orders),
            "char_orders": list(char_orders), "max_tokens": int(max_tokens), "hash": HASH, "pad": PAD,
            "views": views}


# ----------------------------------------------------------------------------------------- categories


def fit_vocab(values: Any) -> list[str]:
    """The sorted distinct values of a column, as strings (missing values left out)."""
    pd = _pandas()
    return sorted(v for v in pd.Series(values).astype("string").dropna().unique())


def category_codes(values: Any, vocab: list[str], start: int, unknown: int | None,
                   column: str = "column") -> np.ndarray:
    """int64 codes: `start + position` in `vocab`; unseen or missing -> `unknown` (None: a DataError)."""
    pd = _pandas()
    index = {v: k + start for k, v in enumerate(vocab)}
    mapped = pd.Series(values).astype("string").map(index)
    if unknown is None and mapped.isna().any():
        bad = pd.Series(values)[mapped.isna().to_numpy()].iloc[0]
        bad = bad.item() if isinstance(bad, np.generic) else bad
        raise DataError(f"column {column!r}: value {bad!r} is not in the model's vocabulary ({len(vocab)} known "
                        "values) and this model has no unknown bucket; pass a known value")
    return mapped.fillna(unknown if unknown is not None else 0).astype(np.int64).to_numpy().copy()


def category_step(column: str, view: str, vocab: list[str], start: int, unknown: int | None) -> dict[str, Any]:
    return {"op": "category", "column": column, "view": view, "vocab": list(vocab), "start": start,
            "unknown": unknown}


# --------------------------------------------------------------------------------------- numbers, images


def numbers(values: Any, column: str) -> np.ndarray:
    """A numeric column as float64 (missing -> NaN, numeric strings parsed, as pandas' astype(float) does);
    anything else is a DataError naming the column."""
    pd = _pandas()
    try:
        return pd.Series(values, dtype=object).astype(float).to_numpy()
    except (TypeError, ValueError):
        raise DataError(f"column {column!r} holds non-numbers; pass numbers") from None


def zscore(x: np.ndarray, mean: float, std: float, dtype: str, fill: float | None, column: str) -> np.ndarray:
    """(x - mean) / std in `dtype` arithmetic, as float32; NaN -> `fill` (None: a DataError)."""
    d = np.dtype(dtype)
    z = (x.astype(d) - d.type(mean)) / d.type(std)
    if fill is None:
        if np.isnan(z).any():
            raise DataError(f"column {column!r} has missing values; pass a number for every row")
        return z.astype(np.float32)
    return np.nan_to_num(z, nan=fill).astype(np.float32)


def zscore_step(column: str, view: str, mean: float, std: float, dtype: str, fill: float | None) -> dict[str, Any]:
    return {"op": "zscore", "column": column, "view": view, "mean": float(mean), "std": float(std),
            "dtype": dtype, "fill": fill}


def multi_hot(values: Any, vocab: list[str], column: str, sep: str = "|") -> np.ndarray:
    """float32 (N, len(vocab)) flags from a list of names per row (or one `sep`-joined string)."""
    index = {v: k for k, v in enumerate(vocab)}
    out = np.zeros((len(values), len(vocab)), np.float32)
    for i, v in enumerate(values):
        names = v.split(sep) if isinstance(v, str) else list(v) if v is not None else []
        for name in names:
            if str(name) not in index:
                raise DataError(f"column {column!r}: {name!r} is not one of {', '.join(vocab)}")
            out[i, index[str(name)]] = 1.0
    return out


def image_step(column: str, view: str, shape: list[int], scale: float) -> dict[str, Any]:
    return {"op": "image", "column": column, "view": view, "shape": list(shape), "scale": float(scale)}


def image(values: Any, shape: list[int], scale: float, column: str) -> np.ndarray:
    """Pixel arrays (each of `shape` or flat, values 0..scale) -> float32 (N, 1, *shape) / scale."""
    try:
        if isinstance(values, np.ndarray):
            x = values.astype(np.float32)
        else:
            x = np.stack([_pixels(v) for v in values]) if len(values) else np.zeros((0, *shape), np.float32)
    except (TypeError, ValueError):
        raise DataError(f"column {column!r}: every row must be a numeric pixel array of shape {tuple(shape)}") from None
    size = int(np.prod(shape))
    if x.shape[1:] != tuple(shape) and x.reshape(len(x), -1).shape[1:] == (size,):
        x = x.reshape(len(x), *shape)
    if x.shape[1:] != tuple(shape):
        raise DataError(f"column {column!r}: images of shape {x.shape[1:]}, expected {tuple(shape)} "
                        f"(or {size} values per row)")
    if len(x) and (x.min() < 0 or x.max() > scale):
        raise DataError(f"column {column!r}: pixel values must lie in [0, {scale:g}] (raw pixel values)")
    return (x / np.float32(scale))[:, None]


def _pixels(v: Any) -> np.ndarray:
    """One image as float32: a nested list, an array, or an array of row arrays (Parquet list columns)."""
    a = np.asarray(v)
    if a.dtype == object:
        a = np.stack([np.asarray(r) for r in a])
    return a.astype(np.float32)


def joined_texts(columns: Mapping[str, Any], names: list[str], join: str) -> list[str]:
    """The text columns of each row joined with `join`, missing values as '' and others as str(value)
    (what pandas' fillna('').astype(str) gives, which the table task used before this module)."""
    parts = [["" if _missing(v) else str(v) for v in columns[c]] for c in names]
    return [join.join(p) for p in zip(*parts, strict=True)] if parts else []


def _missing(v: Any) -> bool:
    if v is None:
        return True
    try:
        return bool(v != v)  # NaN (and NaT)
    except TypeError:  # pandas' NA refuses bool()
        return True


# ------------------------------------------------------------------------------------------ the spec


def make_spec(steps: list[dict[str, Any]], labels: list[Any] | None = None,
              texts: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The JSON spec a task records: its steps, the class labels in output order (None: regression) and,
    per text view of the task, the raw columns it joins ({view: {columns, join}})."""
    return {"version": SPEC_VERSION, "steps": steps, "labels": labels, "texts": texts or {}}


def identity_spec(features: Mapping[str, tuple[str, list[int]]], labels: list[Any] | None) -> dict[str, Any]:
    """For tasks that record no encoders: every view is a raw column of its own (dtype, per-row shape)."""
    steps = [{"op": "identity", "column": k, "view": k, "dtype": d, "shape": list(s)} for k, (d, s) in features.items()]
    return make_spec(steps, labels)


def raw_columns(spec: Mapping[str, Any]) -> list[str]:
    """The raw columns a spec reads, in order."""
    out: list[str] = []
    for step in spec["steps"]:
        for c in step.get("columns") or [step["column"]]:
            if c not in out:
                out.append(c)
    return out


def as_columns(rows: Any) -> tuple[dict[str, Any], int]:
    """A dict of lists/arrays, a pandas DataFrame or a list of dicts -> ({column: values}, N)."""
    if hasattr(rows, "to_dict") and hasattr(rows, "columns"):  # a DataFrame
        cols = {str(c): rows[c].tolist() for c in rows.columns}
    elif isinstance(rows, Mapping):
        cols = {str(k): v for k, v in rows.items()}
    elif isinstance(rows, Sequence) and not isinstance(rows, str) and all(isinstance(r, Mapping) for r in rows):
        keys = list(dict.fromkeys(k for r in rows for k in r))
        cols = {str(k): [r.get(k) for r in rows] for k in keys}
    else:
        raise DataError(f"rows must be a dict of columns, a pandas DataFrame or a list of dicts; got "
                        f"{type(rows).__name__}")
    lengths = {k: len(v) for k, v in cols.items() if hasattr(v, "__len__") and not isinstance(v, str)}
    if len(lengths) != len(cols):
        bad = next(k for k in cols if k not in lengths)
        raise DataError(f"column {bad!r} must hold one value per row (a list or array), got {type(cols[bad]).__name__}")
    if len(set(lengths.values())) > 1:
        raise DataError(f"columns have different lengths: {lengths}; give every column one value per row")
    return cols, next(iter(lengths.values()), 0)


def encode(spec: Mapping[str, Any], rows: Any) -> dict[str, np.ndarray]:
    """Raw rows -> every view the spec writes (the training-time transformation, step by step)."""
    cols, n = as_columns(rows)
    missing = [c for c in raw_columns(spec) if c not in cols]
    if missing:
        raise DataError(f"input column {missing[0]!r} is missing (the model reads: {', '.join(raw_columns(spec))})")
    out: dict[str, np.ndarray] = {}
    for step in spec["steps"]:
        out.update(encode_step(step, cols, n))
    return out


def encode_step(step: Mapping[str, Any], cols: Mapping[str, Any], n: int) -> dict[str, np.ndarray]:
    op = step["op"]
    if op == "ngram":
        texts = joined_texts(cols, step["columns"], step["join"])
        return hash_ngrams(texts, step["word_orders"], step["char_orders"], step["max_tokens"])
    col = step.get("column", "")
    if op == "category":
        return {step["view"]: category_codes(cols[col], step["vocab"], step["start"], step["unknown"], col)}
    if op == "zscore":
        x = numbers(cols[col], col)
        return {step["view"]: zscore(x, step["mean"], step["std"], step["dtype"], step["fill"], col)}
    if op == "multi_hot":
        return {step["view"]: multi_hot(cols[col], step["vocab"], col, step.get("sep", "|"))}
    if op == "image":
        return {step["view"]: image(cols[col], step["shape"], step["scale"], col)}
    if op == "text_length":
        lengths = np.array([len(t) for t in joined_texts(cols, step["columns"], step["join"])], np.float32)
        return {step["view"]: (lengths - np.float32(step["mean"])) / np.float32(step["std"])}
    if op == "text":
        return {step["view"]: np.array(joined_texts(cols, step["columns"], step["join"]) or [], dtype=object)}
    if op == "identity":
        try:
            a = np.asarray(cols[col], dtype=step["dtype"])
        except (TypeError, ValueError):
            raise DataError(f"column {col!r} must hold {step['dtype']} values") from None
        if a.shape[1:] != tuple(step["shape"]):
            raise DataError(f"column {col!r} has per-row shape {a.shape[1:]}, expected {tuple(step['shape'])}")
        return {step["view"]: a}
    raise DataError(f"preprocessing step {op!r} is unknown to this fmtransfer; install the version that exported it")


def _pandas() -> Any:
    try:
        import pandas as pd
    except ImportError:
        raise DataError("category columns need pandas: pip install pandas") from None
    return pd
