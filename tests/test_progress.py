"""Progress you can see: a line per epoch on stderr (terminal or not), bars only on a terminal and not
under TQDM_DISABLE, and the optional CSV and TensorBoard loggers beside log.jsonl."""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import pytest

from fmtransfer.config import load_config
from fmtransfer.errors import ConfigError
from tests.conftest import tiny_raw

LINE = re.compile(r"^kd epoch (\d+)/4: train loss \d+\.\d{4}, val accuracy \d\.\d{4}( \(best\))?, \d+\.\ds$")


def _run(tmp_path: Path, **train: object) -> dict:
    from fmtransfer.runner import run_experiment

    raw = tiny_raw(cache_dir=str(tmp_path / "c"))
    raw["train"] = {**raw["train"], **train}
    return run_experiment(load_config(raw=raw), tmp_path / "run", quiet=True)


def test_one_line_per_epoch_on_stderr_without_a_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _run(tmp_path)
    err = capsys.readouterr().err.splitlines()
    lines = [ln for ln in err if ln.startswith("kd epoch")]
    assert [int(LINE.match(ln).group(1)) for ln in lines] == [1, 2, 3, 4], err  # type: ignore[union-attr]
    assert sum(ln.startswith("teacher wide epoch") for ln in err) == 4  # teacher preparation shows progress too
    assert "it/s" not in "".join(err) and "step/s" not in "".join(err)  # no bar: stderr is not a terminal
    logged = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in logged if e.get("phase") == "train"] == [1, 2, 3, 4]


def test_bars_only_on_a_terminal_and_never_under_tqdm_disable(monkeypatch: pytest.MonkeyPatch) -> None:
    from fmtransfer.utils import bars_enabled

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert bars_enabled()
    for value in ("1", "true", "yes"):
        monkeypatch.setenv("TQDM_DISABLE", value)
        assert not bars_enabled()
    monkeypatch.setenv("TQDM_DISABLE", "0")
    assert bars_enabled()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert not bars_enabled()


def test_csv_and_tensorboard_loggers(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    m = _run(tmp_path, loggers=["csv", "tensorboard"])
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    logged = [json.loads(x) for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    train = [e for e in logged if e.get("phase") == "train"]
    assert [float(r["val/accuracy"]) for r in rows] == pytest.approx([e["val"]["accuracy"] for e in train])
    assert [float(r["train/loss"]) for r in rows] == pytest.approx([e["train"]["loss"] for e in train])
    assert m["best_epoch"] == 1 + max(range(4), key=lambda k: (float(rows[k]["val/accuracy"]), -k))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    vals = [s.value for s in acc.Scalars("val/accuracy")]
    assert [s.step for s in acc.Scalars("val/accuracy")] == [1, 2, 3, 4]
    assert vals == pytest.approx([float(r["val/accuracy"]) for r in rows], abs=1e-6)


def test_loggers_are_validated_and_keep_teacher_fingerprints(tmp_path: Path) -> None:
    from fmtransfer.data.synthetic import SyntheticConfig, build_synthetic
    from fmtransfer.teachers.base import teacher_fingerprint

    with pytest.raises(ConfigError, match="train.loggers.0: 'mlflow' is not allowed"):
        load_config(raw=tiny_raw(), overrides=["train.loggers=[mlflow]"])
    cfg = load_config(raw=tiny_raw())
    task = build_synthetic(SyntheticConfig(rows=600, labels=60))
    # the loggers option must not change what a prepared teacher is (old artifacts stay valid): the value
    # main computed before `loggers` existed
    assert teacher_fingerprint("wide", cfg.teachers["wide"], task, 0) == "cdfc122a88a8da43"


def test_a_cache_build_says_what_it_computes_when_there_is_no_bar(tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import numpy as np

    from fmtransfer.cache.store import FeatureStore, FieldSpec

    def values(start: int, end: int) -> dict[str, np.ndarray]:
        return {"a": np.ones((end - start, 3), np.float32)}

    store = FeatureStore(tmp_path / "s", "k", {"a": FieldSpec((3,), "float16")}, 50, shard_rows=20)
    assert store.build(values, desc="encode row texts") == 50
    err = capsys.readouterr().err
    assert "fmtransfer: encode row texts: 50 rows to compute" in err and "row/s" not in err
    assert store.build(values, desc="encode row texts") == 0 and capsys.readouterr().err == ""  # cached: silent


def test_tensorboard_missing_is_one_line_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the package were not installed
    with pytest.raises(ConfigError, match=r"tensorboard needs the tensorboard package: pip install 'fmtransfer\["):
        _run(tmp_path, loggers=["tensorboard"])
    assert not (tmp_path / "run" / "log.jsonl").exists()  # nothing trained
