"""The export contract over the whole method registry: every method's tiny run exports (its shipped model:
the student, or the model the method builds around the FM) and serves raw rows with the run's test score."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fmtransfer.config import load_config
from fmtransfer.registry import METHODS
from tests.conftest import TINY
from tests.test_methods_contract import SECOND_TEACHER

pd = pytest.importorskip("pandas")


@pytest.mark.parametrize("name", METHODS.names())
def test_every_method_exports_and_serves_raw_rows(name: str, tiny_bert: str, tmp_path: Path) -> None:
    from fmtransfer.export import export_run
    from fmtransfer.runner import build_task, run_experiment
    from fmtransfer.serving.loader import load_predictor

    fields = METHODS.get(name).config_cls.__dataclass_fields__  # FM methods read the tiny BERT; no timing
    opts = {"teacher": "wide", "encoder": tiny_bert, "latency": "false", "timing_rows": "0"}
    extra = [f"method.{k}={v}" for k, v in opts.items() if k in fields]
    cfg = load_config(TINY, [f"cache_dir={tmp_path / 'cache'}", f"method={{name: {name}}}", *SECOND_TEACHER,
                             *extra, "train.epochs=2"])
    metrics = run_experiment(cfg, tmp_path / "run", quiet=True)
    man = export_run(tmp_path / "run", tmp_path / "export")
    check = man.metrics["exported"]["safetensors"]
    assert check["raw_rows_checked"]
    task = build_task(cfg)
    rows = task.splits["test"]
    frame = pd.DataFrame({"x": list(task.features["x"][rows].numpy()), "user": task.features["user"][rows].numpy(),
                          "text": [task.texts["row"].texts[i] for i in rows.tolist()]})
    pred = load_predictor(tmp_path / "export")
    got = pred.predict(frame)
    acc = float((torch.tensor(got.astype(int)) == task.y[rows]).float().mean())
    # the exact score, except where the run read fp16 cached FM features that serving computes live in fp32
    frozen_fm = (man.model.get("fm") or {}).get("kind") == "frozen"
    assert abs(acc - metrics["test"]["accuracy"]) <= (0.02 if frozen_fm else 0.5e-4), json.dumps(check)
    assert (metrics["shipped_model"]["built_by"] == "method") == ("fm" in man.model)
