"""`fmtransfer validate`: everything about a run that can be checked without training.

Beyond what loading the config checks (keys, types, component names, `reference_teacher`,
`distill_from`): the teachers the method reads exist, every teacher's encoder or weights file exists,
and, for a task whose data is the user's (`table`), the data file reads, its columns are there, the label
values make sense and the student and complementary teachers can be built on it. The first problem raises
a one-line FmtError; mild findings come back as notes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fmtransfer.config import RunConfig
from fmtransfer.errors import ConfigError, DataError, FmtError
from fmtransfer.methods.base import Method
from fmtransfer.registry import METHODS, MODELS


def check_run(cfg: RunConfig, build_task: bool | None = None) -> list[str]:
    """Check `cfg` as far as possible without training; return notes (raises on the first problem).

    `build_task`: read the data and build the task (default: for tasks whose config sets `check_data`)."""
    notes: list[str] = []
    method = METHODS.get(cfg.method.name).impl
    method.required_teachers(cfg.method, list(cfg.teachers))  # unknown or missing teacher names raise here
    for name, t in cfg.teachers.items():
        _check_teacher_files(name, t)
    if build_task is None:
        build_task = bool(getattr(cfg.task, "check_data", False))
    if not build_task:
        return notes
    task = _task(cfg)
    if task.task_type == "classification":
        labeled = task.y[task.splits["train"]]
        classes = task.meta.get("classes") or list(range(int(task.num_classes or 0)))
        if len(classes) < 2:
            raise DataError(f"task: the label column holds one value ({classes[0] if classes else 'none'}); "
                            "a classifier needs two or more")
        seen = set(labeled.tolist())
        unseen = [str(c) for k, c in enumerate(classes) if k not in seen]
        if unseen:
            notes.append(f"label value(s) {', '.join(unseen[:5])} have no labeled training row (raise task.labels)")
        if len(classes) > max(20, task.num_rows // 5):
            notes.append(f"the label has {len(classes)} distinct values; for a number use task.kind: regression")
    if method.build_model.__func__ is Method.build_model.__func__:  # the method trains the configured student
        _build(cfg.student, task, "student")
    for name, t in cfg.teachers.items():
        model = getattr(t, "model", None)
        if model is not None and getattr(model, "name", None) in MODELS:
            _build(model, task, f"teachers.{name}.model")
        if hasattr(t, "encoder") and not task.texts:
            raise ConfigError(f"teachers.{name}: recipe {t.recipe!r} reads text, but the task has none "
                              "(list the text columns under task.text)")
    return notes


_TASKS: dict[str, Any] = {}


def _task(cfg: RunConfig) -> Any:
    """The built task, memoised for the last task config (a suite validates one table many times)."""
    from fmtransfer.config import to_dict
    from fmtransfer.runner import build_task
    from fmtransfer.utils import stable_hash

    key = stable_hash(to_dict(cfg.task))
    if key not in _TASKS:
        _TASKS.clear()
        _TASKS[key] = build_task(cfg)
    return _TASKS[key]


def _build(model_cfg: Any, task: Any, where: str) -> None:
    try:
        MODELS.get(model_cfg.name).impl(model_cfg, task)
    except FmtError as e:
        msg = str(e)
        raise type(e)(msg if msg.startswith(where) else f"{where}: {msg}") from None


def _check_teacher_files(name: str, t: Any) -> None:
    encoder = getattr(t, "encoder", None)
    if isinstance(encoder, str):
        from fmtransfer.models.hf_text import resolve_encoder_path

        try:
            resolve_encoder_path(encoder)
        except FmtError as e:
            raise type(e)(f"teachers.{name}.encoder: {e}") from None
    weights = getattr(t, "weights", None)
    if isinstance(weights, str) and weights and not Path(weights).is_file():
        raise ConfigError(f"teachers.{name}.weights: {weights!r} does not exist")
