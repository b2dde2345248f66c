"""Bring-your-own-data: the `table` task from Parquet, CSV and JSONL, its errors, and a run on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fmtransfer.config import load_config
from fmtransfer.errors import DataError

pd = pytest.importorskip("pandas")


def _frame(n: int = 300) -> object:
    rng = np.random.default_rng(0)
    x = rng.normal(size=n)
    region = rng.choice(["EU", "US", "APAC"], size=n)
    product = rng.choice(["a", "b", "c", None], size=n)
    label = np.where(x + (region == "EU") * 0.5 > 0.2, "high", "low")
    text = [f"{'urgent broken' if lab == 'high' else 'question about'} item {k % 5}" for k, lab in enumerate(label)]
    return pd.DataFrame({"x": x, "region": region, "product": product, "priority": label, "body": text})


def _cfg(path: Path, **extra: object) -> object:
    task = {"name": "table", "path": str(path), "label": "priority", "text": ["body"],
            "categorical": ["product", "region"], "numeric": ["x"], **extra}
    return load_config(raw={"task": task}).task


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_reads_every_format(tmp_path: Path, suffix: str) -> None:
    pytest.importorskip("pyarrow") if suffix == ".parquet" else None
    from fmtransfer.data.table import build_table

    df = _frame()
    path = tmp_path / f"t{suffix}"
    {".csv": lambda: df.to_csv(path, index=False), ".jsonl": lambda: df.to_json(path, orient="records", lines=True),
     ".parquet": lambda: df.to_parquet(path)}[suffix]()
    task = build_table(_cfg(path, domain="region", ood_domains=["APAC"], labels=50))
    assert task.num_classes == 2 and task.meta["classes"] == ["high", "low"]
    apac = set(task.splits["ood/APAC"].tolist())
    assert apac and not apac & (set(task.splits["train"].tolist()) | set(task.splits["val"].tolist()))
    assert len(task.splits["train"]) == 50 and len(task.splits["transfer"]) > 0
    assert task.features["product"].min() == 0  # missing values get their own code
    assert task.cardinalities["region"] == 4 and task.texts["row"].texts[0].endswith("item 0")


def test_clear_errors(tmp_path: Path) -> None:
    from fmtransfer.data.table import build_table

    path = tmp_path / "t.csv"
    _frame().to_csv(path, index=False)
    with pytest.raises(DataError, match="column 'prio' is not in"):
        build_table(_cfg(path, label="prio"))
    with pytest.raises(DataError, match="unknown format '.xlsx'"):
        build_table(_cfg(tmp_path / "t.xlsx"))
    with pytest.raises(DataError, match="does not exist"):
        build_table(_cfg(tmp_path / "nope.csv"))
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="is not a readable parquet file"):
        build_table(_cfg(bad))
    with pytest.raises(DataError, match="no row has region == 'MARS'"):
        build_table(_cfg(path, domain="region", ood_domains=["MARS"]))
    with pytest.raises(DataError, match="ood_domains needs task.domain"):
        _cfg(path, ood_domains=["EU"])


def test_kd_run_on_a_user_table(tmp_path: Path) -> None:
    from fmtransfer.runner import run_experiment

    path = tmp_path / "t.csv"
    _frame(400).to_csv(path, index=False)
    raw = {"task": {"name": "table", "path": str(path), "label": "priority", "categorical": ["product", "region"],
                    "numeric": ["x"], "labels": 60},
           "student": {"name": "mlp", "hidden": [8]},
           "teachers": {"wide": {"recipe": "supervised", "model": {"name": "mlp", "hidden": [32]},
                                 "train": {"epochs": 3, "batch_size": 32, "steps_per_epoch": 10, "lr": 0.01}}},
           "method": {"name": "kd", "teacher": "wide"},
           "train": {"epochs": 3, "batch_size": 32, "steps_per_epoch": 10, "lr": 0.01},
           "cache_dir": str(tmp_path / "c")}
    m = run_experiment(load_config(raw=raw), tmp_path / "run", quiet=True)
    assert m["task"] == "table" and m["metric"] == "accuracy" and m["test"]["accuracy"] > 0.6


def _text_only(n: int = 400) -> object:
    """A table whose only input is text: the label is which of two word families a row uses."""
    rng = np.random.default_rng(1)
    good, bad = ["great", "lovely", "perfect", "soft"], ["broken", "awful", "tight", "itchy"]
    label = rng.integers(0, 2, size=n)
    words = [" ".join(rng.choice(good if y else bad, size=3)) + f" item {k % 7}" for k, y in enumerate(label)]
    return pd.DataFrame({"body": words, "label": np.where(label == 1, "yes", "no")})


def test_text_columns_feed_a_hashed_ngram_student(tmp_path: Path) -> None:
    from fmtransfer.data.table import build_table
    from fmtransfer.registry import MODELS
    from fmtransfer.runner import run_experiment

    path = tmp_path / "t.csv"
    _text_only().to_csv(path, index=False)
    task = build_table(load_config(raw={"task": {"name": "table", "path": str(path), "text": ["body"]}}).task)
    assert {"words1", "words2"} <= set(task.features) and "text_length" not in task.features
    assert task.features["words1"].dtype == torch.int32 and task.features["words1"].dim() == 2
    # same hashes as the reviews task's n-grams (one shared implementation)
    from fmtransfer.data.reviews import hash_views

    assert torch.equal(task.features["words1"][:3], hash_views(task.texts["row"].texts[:3], [1], [], 256)["words1"][:3])
    tab = MODELS.get("tabular")
    model = tab.impl(tab.config_cls(ngram_buckets=64, ngram_dim=4, hidden=[]), task)
    assert model.ngram_views == ["words1", "words2"]
    assert sum(p.numel() for p in model.parameters()) == 65 * 4 + 4 * 2 + 2  # one bag of 64+1 rows, a 4->2 head
    # config without student/teachers: the table's defaults (a tabular student) read the text and learn it
    raw = {"task": {"name": "table", "path": str(path), "text": ["body"], "labels": 100},
           "train": {"epochs": 3, "batch_size": 32, "steps_per_epoch": 10, "lr": 0.01},
           "cache_dir": str(tmp_path / "c")}
    cfg = load_config(raw=raw)
    assert cfg.student.name == "tabular" and set(cfg.teachers) == {"fm", "wide"}
    assert cfg.teachers["wide"].model.name == "tabular"
    m = run_experiment(cfg, tmp_path / "run", quiet=True)
    assert m["test"]["accuracy"] > 0.9 and m["teachers"] == {}  # student: no teacher prepared (no MiniLM run)
    assert m["gap_recovered"] is None and "not prepared" in m["reference"]["note"]
    # the plain n-gram student is accepted on a table too
    m2 = run_experiment(load_config(raw={**raw, "student": {"name": "ngram", "buckets": 256, "dim": 8}}),
                        tmp_path / "run2", quiet=True)
    assert m2["test"]["accuracy"] > 0.9


def test_mlp_leaves_ngrams_out_and_says_how_to_read_them(tmp_path: Path) -> None:
    from fmtransfer.data.table import build_table
    from fmtransfer.errors import ConfigError
    from fmtransfer.registry import MODELS

    path = tmp_path / "t.csv"
    _frame().to_csv(path, index=False)
    task = build_table(_cfg(path))
    mlp = MODELS.get("mlp")
    model = mlp.impl(mlp.config_cls(), task)
    assert {"words1", "words2"} <= set(task.features) and model.bag is None
    assert set(model.embeds) | set(model.scalars) == {"product", "region", "x"}
    with pytest.raises(ConfigError, match="student.name: tabular reads it"):
        mlp.impl(mlp.config_cls(features=["x", "words1"]), task)
    none = build_table(_cfg(path, word_ngrams=[], char_ngrams=[]))
    assert not any(k.startswith(("words", "chars")) for k in none.features)
