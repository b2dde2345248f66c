"""benchmarks/complementarity.py: the committee's headroom is computed from the prepared teachers as stated."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml

from fmtransfer.config import load_config
from fmtransfer.runner import build_task, cache_teachers, cached_reference
from tests.conftest import REPO, TINY


def _script():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("complementarity", REPO / "benchmarks" / "complementarity.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_oracle_bounds_every_teacher_and_shares_match_the_outputs(tmp_path: Path) -> None:
    raw = yaml.safe_load(TINY.read_text())
    raw["teachers"]["small"] = {"recipe": "supervised", "model": {"name": "mlp", "hidden": [4], "small_dim": 2},
                                "train": {"epochs": 2, "batch_size": 32, "steps_per_epoch": 5, "lr": 0.01}}
    raw["cache_dir"] = str(tmp_path / "cache")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    cache_teachers(load_config(path))
    rows = _script().seed_report(str(path), 0, [], "wide")
    splits = ["transfer", "val", "test"]
    for s in splits:  # a per-row pick of the better teacher is never worse than either teacher
        assert rows["oracle wide|small"][s] >= max(rows["wide"][s], rows["small"][s])
    chosen = "wide+small (w on val)"
    assert rows[chosen]["val"] >= rows["wide+small (0.5)"]["val"]  # the weight is the best of a grid with 0.5
    cfg = load_config(path)
    task = build_task(cfg)
    a, b = (cached_reference(cfg, task, n).outputs for n in ("wide", "small"))
    for s in splits:
        r = task.splits[s]
        share = ((a[r].argmax(-1) != task.y[r]) & (b[r].argmax(-1) == task.y[r])).float().mean()
        assert abs(rows["wide wrong, small right (share)"][s] - float(share)) < 1e-6
        assert abs(rows["wide"][s] - float((a[r].argmax(-1) == task.y[r]).float().mean())) < 1e-6
