"""Discoverability: --version, `fmtransfer list`, did-you-mean for unknown names and keys, and a Ctrl-C
message that tells the truth for each command."""

from __future__ import annotations

import pytest

import fmtransfer
from fmtransfer.cli import main
from fmtransfer.config import load_config
from fmtransfer.errors import ConfigError
from tests.conftest import TINY, tiny_raw


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"fmtransfer {fmtransfer.__version__}"


def test_list_shows_every_component_with_its_doc_and_keys(capsys: pytest.CaptureFixture[str]) -> None:
    from fmtransfer.registry import METHODS, MODELS, RECIPES, TASKS

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for reg in (METHODS, MODELS, RECIPES, TASKS):
        for name in reg.names():
            assert f"\n  {name} " in out, name
    assert main(["list", "methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    kd = lines.index(next(ln for ln in lines if ln.startswith("  kd ")))
    assert "Hinton knowledge distillation" in lines[kd] and not lines[kd].split()[1].startswith("`")
    assert "keys: teacher=null, temperature=4.0, kd_weight=1.0, task_weight=1.0" in lines[kd + 1]
    assert main(["list", "tasks"]) == 0
    assert "word_ngrams=[1, 2]" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["list", "metods"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.name=multikd", "unknown method 'multikd' (did you mean 'multi_kd'?)"),
        ("student.name=tabluar", "unknown model 'tabluar' (did you mean 'tabular'?)"),
        ("train.epoch=3", "train.epoch: unknown key (did you mean 'epochs'?)"),
        ("teachers.wide.recipe=supervise", "unknown teacher recipe 'supervise' (did you mean 'supervised'?)"),
    ],
)
def test_did_you_mean(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=None) as e:
        load_config(raw=tiny_raw(), overrides=[override])
    assert message in str(e.value)


def test_no_suggestion_when_nothing_is_close() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(raw=tiny_raw(), overrides=["zzz=1"])
    assert "did you mean" not in str(e.value)


@pytest.mark.parametrize(("cmd", "says", "never"), [
    (["suite", str(TINY), "--out", "x"], "run the same command again", "--resume"),
    (["bench", str(TINY), "--out", "x"], "run the same command again", "--resume"),  # the old name of suite
    (["run", str(TINY), "--out", "x"], "--resume", "finished runs are kept"),
])
def test_ctrl_c_says_how_to_continue(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                     cmd: list[str], says: str, never: str) -> None:
    import fmtransfer.benchmarking.suite
    import fmtransfer.runner

    def interrupted(*a: object, **k: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(fmtransfer.benchmarking.suite, "run_suite", interrupted)
    monkeypatch.setattr(fmtransfer.runner, "run_experiment", interrupted)
    assert main(cmd) == 130
    err = capsys.readouterr().err
    assert says in err and never not in err


def test_did_you_mean_for_teacher_names_and_table_columns(tmp_path: object) -> None:
    from pathlib import Path

    from fmtransfer.errors import DataError
    from fmtransfer.validate import check_run

    with pytest.raises(ConfigError, match=r"method.teacher: 'wid' is not a configured teacher \(did you mean 'wide'"):
        check_run(load_config(raw=tiny_raw(), overrides=["method.teacher=wid"]))
    with pytest.raises(ConfigError, match=r"reference_teacher: 'wdie' is not a teacher \(did you mean 'wide'"):
        load_config(raw=tiny_raw(), overrides=["reference_teacher=wdie"])
    pd = pytest.importorskip("pandas")
    path = Path(str(tmp_path)) / "t.csv"
    pd.DataFrame({"priority": ["a", "b"] * 10, "body": ["x y"] * 20}).to_csv(path, index=False)
    cfg = load_config(raw={"task": {"name": "table", "path": str(path), "label": "priorty", "text": ["body"]}})
    with pytest.raises(DataError, match=r"column 'priorty' is not in .*t.csv \(did you mean 'priority'\?\)"):
        check_run(cfg)


def test_list_into_a_closed_pipe_is_quiet() -> None:
    """`fmtransfer list | head -1`: the reader has left; no error line, no traceback, exit 141 (SIGPIPE's)."""
    import os
    import subprocess
    import sys

    r, w = os.pipe()
    os.close(r)  # the reader is gone before the first write: every write raises BrokenPipeError
    try:
        p = subprocess.run([sys.executable, "-m", "fmtransfer", "list"], stdout=w, stderr=subprocess.PIPE,
                           env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=60)
    finally:
        os.close(w)
    err = p.stderr.decode()
    assert p.returncode == 141, err
    assert "Traceback" not in err and "error" not in err, err
