"""`fmtransfer validate` checks what `run` would refuse, without training; config paths resolve from the file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fmtransfer.config import load_config
from fmtransfer.errors import ConfigError, DataError, FmtError
from fmtransfer.validate import check_run

pd = pytest.importorskip("pandas")


def _table(path: Path, n: int = 200) -> Path:
    rng = np.random.default_rng(0)
    pd.DataFrame({"body": [f"word{k % 9} thing" for k in range(n)], "region": rng.choice(["EU", "US"], size=n),
                  "x": rng.normal(size=n), "label": rng.choice(["a", "b"], size=n),
                  "const": ["same"] * n}).to_csv(path, index=False)
    return path


def _raw(path: Path, **task: object) -> dict[str, object]:
    return {"task": {"name": "table", "path": str(path), "label": "label", "text": ["body"],
                     "categorical": ["region"], "numeric": ["x"], **task}}


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"task": {"path": "nope.csv"}}, DataError, "does not exist"),
        ({"task": {"numeric": ["x", "age"]}}, DataError, "column 'age' is not in"),
        ({"task": {"label": "const"}}, DataError, "label column 'const' holds a single class ('same')"),
        ({"method": {"name": "kd", "teacher": "fn"}}, ConfigError, "method.teacher: 'fn' is not a configured teacher"),
        ({"teachers": {}, "method": {"name": "kd"}}, ConfigError, "method kd needs a teacher; add one under"),
        ({"teachers": {"fm": {"recipe": "probe", "encoder": "/no/such/model"}}}, ConfigError,
         "teachers.fm.encoder: encoder '/no/such/model': not a built-in name"),
        ({"student": {"name": "mlp", "features": ["x", "words1"]}}, ConfigError, "student.features: 'words1' is a "),
        ({"task": {"text": []}, "teachers": {"fm": {"recipe": "probe"}}}, ConfigError, "reads text, but the task"),
    ],
)
def test_validate_refuses_what_run_would(tmp_path: Path, change: dict, error: type, message: str) -> None:
    raw = _raw(_table(tmp_path / "t.csv"))
    for section, value in change.items():
        raw[section] = {**raw[section], **value} if section == "task" else value
    if "path" in change.get("task", {}):
        raw["task"]["path"] = str(tmp_path / "nope.csv")
    with pytest.raises(error) as e:
        check_run(load_config(raw=raw))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_validate_passes_a_good_table_and_notes_mild_problems(tmp_path: Path) -> None:
    path = _table(tmp_path / "t.csv")
    assert check_run(load_config(raw=_raw(path))) == []
    notes = check_run(load_config(raw=_raw(path, labels=1)))
    assert any("no labeled training row" in n for n in notes)


def test_cli_validate_checks_the_data(tmp_path: Path) -> None:
    from fmtransfer.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("task: {name: table, path: missing.csv, label: label, text: [body]}\n")
    assert main(["validate", str(cfg)]) == 2
    _table(tmp_path / "missing.csv")
    assert main(["validate", str(cfg)]) == 0


def test_paths_resolve_relative_to_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cfg" / "sub").mkdir(parents=True)
    (tmp_path / "data").mkdir()
    _table(tmp_path / "data" / "t.csv")
    (tmp_path / "cfg" / "base.yaml").write_text(
        "task: {name: table, path: ../data/t.csv, label: label, text: [body]}\n"
        "teachers: {fm: {recipe: probe, encoder: ./models/bert}}\n")
    (tmp_path / "cfg" / "sub" / "run.yaml").write_text("base: ../base.yaml\nseed: 1\n")
    monkeypatch.chdir(tmp_path / "cfg" / "sub")  # neither the base's folder nor the data's
    cfg = load_config(tmp_path / "cfg" / "sub" / "run.yaml")
    assert Path(cfg.task.path) == (tmp_path / "data" / "t.csv").resolve()  # from the file that names it
    assert cfg.teachers["fm"].encoder == str((tmp_path / "cfg" / "models" / "bert").resolve())
    # --set values are typed at the command line: relative to the working directory
    assert load_config(tmp_path / "cfg" / "sub" / "run.yaml", ["task.path=x.csv"]).task.path == "x.csv"
    assert os.getcwd() == str(tmp_path / "cfg" / "sub")
    with pytest.raises(FmtError, match="teachers.fm.encoder"):
        check_run(cfg)
