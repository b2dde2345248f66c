"""No input ends in a traceback: config ranges, YAML pitfalls, the CLI's one-line errors, a config fuzzer,
and bad values in user tables (docs/reliability.md)."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest
import torch

from fmtransfer.catalog import config_classes, markdown_table
from fmtransfer.cli import main
from fmtransfer.config import load_config
from fmtransfer.errors import ConfigError, DataError
from fmtransfer.ranges import numeric_fields_without_range, range_for
from tests.conftest import REPO, TINY
from tests.fuzz_configs import fuzz_cases


def test_every_numeric_option_has_a_range_that_holds_its_default() -> None:
    for cls in config_classes():
        assert numeric_fields_without_range(cls) == [], cls.__name__
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            rng = range_for(f, hints[f.name])
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            values = default if isinstance(default, list) else [default]
            for v in values:
                if rng is not None and isinstance(v, (int, float)) and not isinstance(v, bool):
                    assert rng.ok(v), f"{cls.__name__}.{f.name} = {v} is outside {rng.text()}"


def test_the_docs_list_every_range() -> None:
    doc = (REPO / "docs" / "reliability.md").read_text()
    assert markdown_table() in doc, "regenerate the table: python -c 'from fmtransfer.catalog import *; " \
                                    "print(markdown_table())'"


@pytest.mark.parametrize(("override", "message"), [
    ("train.lr=.nan", "train.lr: must be a finite number"),
    ("train.lr=.inf", "train.lr: must be a finite number"),
    ("train.lr=1e300", "train.lr: must be a finite number (|v| <= 3.4e38"),
    ("train.weight_decay=-1", "train.weight_decay: -1.0 is out of range (allowed: >= 0)"),
    ("train.weight_decay=.nan", "train.weight_decay: must be a finite number"),
    ("train.grad_clip=.nan", "train.grad_clip: must be a finite number"),
    ("train.grad_clip=-1", "train.grad_clip: -1.0 is out of range (allowed: > 0)"),
    ("train.eval_batch_size=0", "train.eval_batch_size: 0 is out of range (allowed: >= 1)"),
    ("train.device=tpu", "train.device: 'tpu' is not a device"),
    ("task.labels=.nan", "task.labels: must be a finite number"),
    ("task.labels=0.0", "task.labels: 0.0 is out of range"),
    ("method.kd_weight=.nan", "method.kd_weight: must be a finite number"),
    ("method.temperature=0", "method.temperature: 0.0 is out of range (allowed: > 0)"),
    ("teachers.wide.train_splits=[]", "teachers.wide.train_splits: empty"),
    ("student.hidden=[-4]", "student.hidden.0: -4 is out of range (allowed: >= 1)"),
    ("student.dropout=1.5", "student.dropout: 1.5 is out of range (allowed: in [0, 1))"),
    ("teachers.wide.model.dropout=1.0", "teachers.wide.model.dropout: 1.0 is out of range"),
    ("teachers.wide=null", "teachers.wide: is null"),
    ("train=null", "train: is null"),
    ("teachers.wide.train=null", "teachers.wide.train: is null"),
])
def test_out_of_range_values_are_one_line_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_exponent_without_a_dot_is_a_number() -> None:  # PyYAML (YAML 1.1) alone reads 1e-3 as a string
    assert load_config(TINY, ["train.lr=1e-3"]).train.lr == 1e-3


def test_cuda_on_a_machine_without_it_is_one_line() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=r"train.device: 'cuda' but this machine has no usable CUDA GPU"):
        load_config(TINY, ["train.device=cuda"])
    with pytest.raises(ConfigError, match=r"teachers.wide.train.device: 'cuda:1'"):
        load_config(TINY, ["teachers.wide.train.device=cuda:1"])
    # re-reading a finished GPU run's config (export on a CPU machine) skips the machine checks
    assert load_config(TINY, ["train.device=cuda"], machine_checks=False).train.device == "cuda"


def test_duplicate_keys_empty_files_and_null_sections(tmp_path: Path) -> None:
    dup = tmp_path / "dup.yaml"
    dup.write_text("task: {name: synthetic}\ntrain:\n  lr: 0.1\n  epochs: 2\n  lr: 0.5\n")
    with pytest.raises(ConfigError, match=r"dup.yaml: key 'lr' appears twice \(lines 3 and 5\)"):
        load_config(dup)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty.yaml is empty"):
        load_config(empty)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"task: {name: \xff\xfe}\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(binary)


def test_cli_nan_loss_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["run", str(TINY), "--out", str(tmp_path / "r"), "--set", f"cache_dir={tmp_path / 'c'}",
                 "--set", "method.temperature=1e-300"])  # 0 in float32: NaN logits
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if not ln.startswith(("kd epoch", "teacher wide epoch"))]  # progress
    assert code == 2 and len(errors) == 1 and "loss became nan" in errors[0], err


def test_cli_bug_is_one_line_with_a_log_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import fmtransfer.runner

    def broken(*args: object, **kwargs: object) -> None:
        return {}["no such key"]  # a genuine bug inside the library

    monkeypatch.setattr(fmtransfer.runner, "run_experiment", broken)
    argv = ["run", str(TINY), "--out", str(tmp_path / "r")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "internal error: KeyError" in err and "Traceback" not in err
    log = Path(err.split("the traceback is in ")[1].split(")")[0])
    assert "Traceback (most recent call last)" in log.read_text() and "broken" in log.read_text()
    log.unlink()
    monkeypatch.setenv("FMTRANSFER_DEBUG", "1")
    with pytest.raises(KeyError):
        main(argv)


def test_fuzzed_configs_validate_or_fail_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """Seeded fuzzer over every shipped config: exit 0 or 2, at most 2 stderr lines, never a traceback."""
    codes = {0: 0, 2: 0}
    for path, overrides in fuzz_cases(120, seed=16):
        args = ["validate", str(path), *[a for o in overrides for a in ("--set", o)]]
        code = main(args)
        err = capsys.readouterr().err
        assert code in (0, 2), (args, err)
        lines = [ln for ln in err.strip().splitlines() if not re.match(r"^\S.* epoch \d+/\d+: ", ln)]  # progress
        assert len(lines) <= 2 and "Traceback" not in err, (args, err)
        codes[code] += 1
    assert codes[0] > 5 and codes[2] > 50, codes  # both outcomes are exercised


# ------------------------------------------------------------------------------------------- tables


def _table(tmp_path: Path, content: str | bytes, **task: object) -> object:
    from fmtransfer.data.table import TableConfig, build_table

    p = tmp_path / "t.csv"
    p.write_bytes(content if isinstance(content, bytes) else content.encode())
    return build_table(TableConfig(path=str(p), **task))  # type: ignore[arg-type]


def _csv(rows: int = 30, label: object = None, num: object = None, txt: object = None) -> str:
    lines = ["y,num,txt"]
    for i in range(rows):
        y = label(i) if callable(label) else i % 2
        x = num(i) if callable(num) else i * 0.5
        t = txt(i) if callable(txt) else f"word{i % 3}"
        lines.append(f"{y},{x},{t}")
    return "\n".join(lines) + "\n"


def test_bad_table_values_name_the_column(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = {"label": "y", "numeric": ["num"], "text": ["txt"]}
    with pytest.raises(DataError, match="numeric column 'num' holds inf in 1 rows"):
        _table(tmp_path, _csv(num=lambda i: "inf" if i == 3 else i), **base)
    with pytest.raises(DataError, match="label column 'y' holds inf in 1 rows"):
        _table(tmp_path, _csv(label=lambda i: "inf" if i == 3 else i * 0.1), kind="regression", **base)
    with pytest.raises(DataError, match="label column 'y' holds a single class"):
        _table(tmp_path, _csv(label=lambda i: "a"), **base)
    with pytest.raises(DataError, match="column 'num' appears twice"):
        _table(tmp_path, "y,num,num\n" + "".join(f"{i % 2},{i},{i}\n" for i in range(30)), label="y", numeric=["num"])
    with pytest.raises(DataError, match=r"not UTF-8 text \(byte b'\\xff' at offset"):
        _table(tmp_path, _csv().encode().replace(b"word1", b"w\xffrd"), **base)
    jl = tmp_path / "t.jsonl"
    jl.write_text("".join(f'{{"y": {i % 2}, "num": {i}, "num": {i + 1}}}\n' for i in range(30)))
    from fmtransfer.data.table import TableConfig, build_table

    with pytest.raises(DataError, match="line 1 holds key 'num' twice"):
        build_table(TableConfig(path=str(jl), label="y", numeric=["num"]))
    capsys.readouterr()
    task = _table(tmp_path, _csv(num=lambda i: "" if i < 4 else i, txt=lambda i: ""), **base)
    err = capsys.readouterr().err
    assert "warning: task: numeric column 'num' is empty in 4 rows" in err
    assert "warning: task: text column 'txt' is empty in every row" in err
    assert torch.isfinite(task.features["num"]).all() and task.features["num"].abs().sum() > 0  # type: ignore[attr-defined]
    _table(tmp_path, _csv(label=lambda i: "" if i < 3 else i % 2), **base)
    assert "label column 'y' is empty in 3 of 30 rows" in capsys.readouterr().err


def test_fuzzed_tiny_runs_finish_or_fail_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The same fuzzer through `run` on the tiny config (half the overrides plausible scalings, so some train)."""
    codes = {0: 0, 2: 0}
    for i, (path, overrides) in enumerate(fuzz_cases(8, seed=2, configs=[TINY], plausible=0.6)):
        args = ["run", str(path), "--out", str(tmp_path / f"r{i}"), "--set", f"cache_dir={tmp_path / 'c'}",
                *[a for o in overrides for a in ("--set", o)]]
        code = main(args)
        err = capsys.readouterr().err
        assert code in (0, 2), (args, err)
        lines = [ln for ln in err.strip().splitlines() if not re.match(r"^\S.* epoch \d+/\d+: ", ln)]  # progress
        assert len(lines) <= 2 and "Traceback" not in err, (args, err)
        codes[code] += 1
    assert codes[0] >= 1 and codes[2] >= 1, codes
