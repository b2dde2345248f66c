"""A generated application table for the scale benchmark and the streaming tests, written chunk by chunk.

Columns: `text` (short sentences from a fixed word list), `user_id` and `item_id` (Zipf-distributed IDs,
as in click logs), `region` (20 values), `price` (log-normal) and `age` (normal); `label` comes from a
hidden rule over all of them plus noise, so every column carries some signal. The table is written
as Parquet row groups of `chunk_rows`, so generating 10^7 rows holds one chunk in memory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "shi", "pe", "da", "zu", "fa", "gri", "mo", "te", "bla"]


def word_list(n: int = 1500) -> list[str]:
    """`n` distinct pseudo-words of two or three syllables (deterministic)."""
    rng = np.random.default_rng(1234)
    words: dict[str, None] = {}
    while len(words) < n:
        k = int(rng.integers(2, 4))
        words["".join(SYLLABLES[i] for i in rng.integers(0, len(SYLLABLES), k))] = None
    return list(words)


def generate_chunk(start: int, rows: int, seed: int = 0) -> dict[str, object]:
    """Rows [start, start + rows) of the table (a pure function of (start, rows, seed))."""
    rng = np.random.default_rng([seed, start])
    words = np.array(word_list())
    n_words = rng.integers(4, 13, rows)
    widx = np.minimum(rng.zipf(1.3, (rows, 12)) - 1, len(words) - 1)
    signal = (widx >= 1) & (widx <= 50)  # words 1..50 (after the most frequent) carry the text signal
    pos, neg = signal & (widx % 2 == 1), signal & (widx % 2 == 0)
    in_text = np.arange(12)[None, :] < n_words[:, None]
    text_score = ((pos & in_text).sum(1) - (neg & in_text).sum(1)).astype(np.float64)
    texts = [" ".join(words[widx[i, :n_words[i]]]) for i in range(rows)]
    user = (rng.zipf(1.2, rows) - 1) % 1_000_000
    item = (rng.zipf(1.1, rows) - 1) % 100_000
    region = rng.integers(0, 20, rows)
    price = rng.lognormal(3.0, 1.0, rows)
    age = rng.normal(40.0, 12.0, rows)
    item_effect = ((item * 2654435761) % 1000) / 500.0 - 1.0
    logit = 0.9 * text_score + 1.2 * item_effect + 0.6 * (np.log(price) - 3.0) - 0.03 * (age - 40.0) \
        + 0.4 * (region % 3 == 0) - 0.25 + rng.normal(0, 0.5, rows)
    return {"text": texts, "user_id": user.astype(np.int64), "item_id": item.astype(np.int64),
            "region": np.array([f"r{r:02d}" for r in region]), "price": price.astype(np.float32),
            "age": age.astype(np.float32), "label": (logit > 0).astype(np.int64)}


def write_table(path: str | Path, rows: int, *, seed: int = 0, chunk_rows: int = 65536) -> Path:
    """Write the table as one Parquet file with row groups of `chunk_rows` rows; return its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = None
    for start in range(0, rows, chunk_rows):
        table = pa.table(generate_chunk(start, min(chunk_rows, rows - start), seed))
        if writer is None:
            writer = pq.ParquetWriter(tmp, table.schema)
        writer.write_table(table, row_group_size=chunk_rows)
    assert writer is not None
    writer.close()
    tmp.replace(path)
    return path
