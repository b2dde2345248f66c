"""Config loading: validation errors name the key and the allowed values; overrides; shipped configs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fmtransfer.config import dump_config, load_config, parse_override
from fmtransfer.errors import ConfigError
from tests.conftest import REPO, TINY, tiny_raw


def test_tiny_config_loads_typed() -> None:
    cfg = load_config(TINY)
    assert cfg.method.name == "kd" and cfg.method.temperature == 4.0
    assert cfg.task.labels == 60 and isinstance(cfg.task.labels, int)
    assert cfg.teachers["wide"].model.hidden == [64]
    assert cfg.reference_teacher_name() == "wide"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.temperatur=2", "method.temperatur: unknown key (did you mean 'temperature'?) (allowed: name, teacher"),
        ("train.lr=fast", "train.lr: expected a number, got 'fast'"),
        ("train.precision=fp8", "train.precision: 'fp8' is not allowed (allowed: fp32, bf16)"),
        ("method.name=kdd", "method.name: unknown method 'kdd' (did you mean 'kd'?) (allowed: "),
        ("task.labels=-3", "task.labels: -3 is out of range (allowed: a count >= 1"),
        ("task.labels=2.5", "task.labels: 2.5 is out of range (allowed: a count >= 1 (an integer) or a fraction"),
        ("teachers.wide.recipe=magic", "teachers.wide.recipe: unknown teacher recipe 'magic'"),
        ("teachers.wide.model.id_dimm=3", "teachers.wide.model.id_dimm: unknown key"),
        ("bogus=1", "bogus: unknown key (allowed: task, student, teachers, method, train, seed"),
        ("train.epochs=0", "train.epochs: 0 is out of range (allowed: >= 1)"),
        ("reference_teacher=nope", "reference_teacher: 'nope' is not a teacher (allowed: wide)"),
        ("method.teacher=3", "method.teacher: expected"),
    ],
)
def test_bad_values_give_one_line_errors(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(TINY, [override])
    text = str(e.value)
    assert message in text
    assert "\n" not in text


def test_override_parsing_and_nesting() -> None:
    assert parse_override("a.b.c=[1, 2]") == (["a", "b", "c"], [1, 2])
    assert parse_override("x=null") == (["x"], None)
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_override("train.epochs")
    cfg = load_config(TINY, ["train.epochs=7", "teachers.wide.train.lr=0.5", "task.labels=0.5"])
    assert cfg.train.epochs == 7 and cfg.teachers["wide"].train.lr == 0.5 and cfg.task.labels == 0.5


def test_dump_round_trips() -> None:
    cfg = load_config(TINY, ["method.temperature=2"])
    again = load_config(raw=yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_invalid_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: {name: synthetic\ntrain: [")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_teachers_section_must_be_mapping() -> None:
    with pytest.raises(ConfigError, match="teachers: expected a mapping of teacher name"):
        load_config(raw=tiny_raw(teachers=[{"recipe": "supervised"}]))


SHIPPED = sorted(p for p in (REPO / "configs").rglob("*.yaml") if not p.name.startswith("suite"))
SUITES = sorted((REPO / "configs").rglob("suite*.yaml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_validates(path: Path) -> None:
    cfg = load_config(path)
    task_dir = path.parent if path.parent.parent.name == "configs" else path.parent.parent  # configs/<task>/<setting>/
    assert task_dir.name == cfg.task.name.split("-")[0] or task_dir.name == cfg.task.name
    assert path.stem.split("-")[0] in {cfg.method.name, "teacher"} or path.stem.startswith(cfg.method.name)


@pytest.mark.parametrize("path", SUITES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_suite_validates(path: Path) -> None:
    from fmtransfer.benchmarking.suite import suite_configs

    items = suite_configs(path, [0, 1])
    assert len(items) >= 2 and {seed for _, seed, _ in items} == {0, 1}


def test_shipped_configs_exist() -> None:
    assert SHIPPED and SUITES


def test_base_file_is_merged_and_switching_component_drops_old_options(tmp_path: Path) -> None:
    base = tmp_path / "base.yaml"
    base.write_text(TINY.read_text())
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\ntrain: {epochs: 9}\nmethod: {name: student}\n")
    cfg = load_config(child)
    assert cfg.train.epochs == 9 and cfg.train.batch_size == 32  # merged, not replaced
    assert cfg.method.name == "student"  # kd's `teacher` option dropped with the switch
    loop = tmp_path / "loop.yaml"
    loop.write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(loop)
