"""Typed run configs: YAML in and out, validated at load, `a.b.c=value` overrides.

A run config has fixed top-level sections. The `name` (or `recipe`) key of the `task`, `student`,
`method` and each teacher selects a registered component, whose own dataclass is the schema of the
rest of that section; so a new method brings its own options without touching this file.
Every error is one line naming the key and what is allowed: numeric options are checked against their
ranges (ranges.py), a section set to null and a duplicate YAML key are errors (config_checks.py).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml

from fmtransfer.config_checks import UniqueKeyLoader, check_devices, null_section
from fmtransfer.errors import ConfigError, did_you_mean
from fmtransfer.ranges import above, at_least, check_value


@dataclass
class TaskConfig:
    """Base of every task's config."""

    default_student: ClassVar[dict[str, Any] | None] = None
    """The `student:` section a run gets when its config has none (None: the config must name one)."""

    name: str = "movielens"
    labels: int | float | None = None
    """Labeled part of the training split: a count (an integer) or a fraction (0 < f <= 1.0); null = all.
    The rest of the training split is the unlabeled transfer set."""
    split_seed: int = 0
    """Seed of the random ID split (kept apart from the run seed so seeds share one split)."""

    def __post_init__(self) -> None:
        if self.labels is not None and self.labels <= 0:
            raise ConfigError(f"task.labels: must be > 0 (a count or a fraction), got {self.labels}")
        if isinstance(self.labels, float) and self.labels > 1:
            raise ConfigError(f"task.labels: a fraction must be <= 1.0 (write a count as an integer), "
                              f"got {self.labels}")


@dataclass
class ModelConfig:
    """Base of every model's config (students and complementary teachers)."""

    name: str = "mlrec"


@dataclass
class MethodConfig:
    """Base of every method's config."""

    name: str = "student"


@dataclass
class TrainConfig:
    """The optimisation loop (shared by students and teacher preparation)."""

    epochs: int = field(default=10, metadata=at_least(1))
    batch_size: int = field(default=512, metadata=at_least(1))
    labeled_batch_size: int | None = field(default=None, metadata=at_least(1))
    """Rows of labeled data per step when a method also reads the transfer set (default: batch_size)."""
    steps_per_epoch: int | None = field(default=None, metadata=at_least(1))
    """Fixed steps per epoch (cycling the data); null = one pass over the main stream."""
    lr: float = field(default=3e-3, metadata=above(0))
    weight_decay: float = field(default=0.0, metadata=at_least(0))
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    grad_clip: float | None = field(default=5.0, metadata=above(0))
    """Clip the gradient norm to this (> 0); null = no clipping."""
    patience: int | None = field(default=None, metadata=at_least(1))
    """Stop after this many epochs without a better validation score (null: run every epoch)."""
    device: str = "auto"
    """auto, cpu, cuda or cuda:N (checked against this machine at load)."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 autocast for the forward pass (losses stay fp32)."""
    num_threads: int | None = field(default=None, metadata=at_least(1))
    eval_batch_size: int = field(default=8192, metadata=at_least(1))
    find_unused_parameters: bool = False
    score_last: bool = True
    """When the last epoch is not the best, score its weights on test and OOD too (metrics.json `last_epoch`);
    false skips that second evaluation (a full re-encoding for methods that run a foundation model live) and
    `last_epoch` then holds only null."""
    loggers: list[Literal["csv", "tensorboard"]] = field(default_factory=list)
    """Per-epoch loggers beside log.jsonl: `csv` (DIR/metrics.csv), `tensorboard` (DIR/tensorboard/, needs
    `pip install 'fmtransfer[tensorboard]'`). Only the run's own loop logs; teacher preparation does not."""

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key}: must be >= 1, got {getattr(self, key)}")
        if self.lr <= 0:
            raise ConfigError(f"train.lr: must be > 0, got {self.lr}")


@dataclass
class TeacherConfig:
    """Base of every teacher recipe's config."""

    recipe: str = "supervised"
    kind: Literal["foundation", "complementary"] = "complementary"
    seed: int | None = None
    """Seed of the teacher's preparation; null = the run's seed."""
    train_splits: list[str] = field(default_factory=lambda: ["train"])
    """Splits whose labels the teacher trains on: e.g. ["train", "context"] on movielens-genre lets a
    teacher learn from the other genres' ratings that the student's task never sees."""
    distill_from: str | None = None
    """Another teacher of the run whose outputs this one also learns from, by KD on labeled + transfer
    rows (e.g. a complementary model trained on the FM's pseudo-labels); null = labels only."""
    distill_weight: float = field(default=1.0, metadata=at_least(0))
    distill_temperature: float = field(default=4.0, metadata=above(0))
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class RunConfig:
    """One experiment: a task, a student, a committee of teachers, a method and a loop."""

    task: TaskConfig = field(default_factory=TaskConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0
    reference_teacher: str | None = None
    """Teacher for 'gap recovered' (default: the first foundation teacher, else the first teacher)."""
    cache_dir: str = ".fmtransfer_cache"
    """Prepared teachers, text embeddings and reference results; shared by runs."""

    def __post_init__(self) -> None:
        for name, t in self.teachers.items():
            if not t.train_splits:
                raise ConfigError(f"teachers.{name}.train_splits: empty; name at least one split (e.g. [train])")
        if self.reference_teacher is not None and self.reference_teacher not in self.teachers:
            raise ConfigError(
                f"reference_teacher: {self.reference_teacher!r} is not a teacher"
                f"{did_you_mean(self.reference_teacher, list(self.teachers))} "
                f"(allowed: {', '.join(self.teachers) or 'none configured'})"
            )

        for name, t in self.teachers.items():
            if t.distill_from is not None and t.distill_from not in self.teachers:
                raise ConfigError(f"teachers.{name}.distill_from: {t.distill_from!r} is not a teacher "
                                  f"(allowed: {', '.join(n for n in self.teachers if n != name)})")
        for name in self.teachers:
            seen, cur = [name], self.teachers[name].distill_from
            while cur is not None:
                if cur in seen:
                    raise ConfigError(f"teachers.{name}.distill_from: a cycle ({' -> '.join([*seen, cur])}); "
                                      "a teacher cannot learn from itself")
                seen.append(cur)
                cur = self.teachers[cur].distill_from

    def reference_teacher_name(self) -> str | None:
        if self.reference_teacher:
            return self.reference_teacher
        for name, t in self.teachers.items():
            if t.kind == "foundation":
                return name
        return next(iter(self.teachers), None)


# ---------------------------------------------------------------------------------------------- parsing


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (int -> float, dict -> dataclass)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, path)
            except ConfigError:
                continue  # the next member of the union may take it; if none does, one error names them all
        raise ConfigError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}: {value!r} is not allowed (allowed: {', '.join(map(str, allowed))})")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{path}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        _, val_tp = typing.get_args(tp) or (str, Any)
        return {str(k): _coerce(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if value is None:
            raise ConfigError(null_section(path))
        return from_dict(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: Any, path: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types with one-line errors."""
    where = path or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"{_join(path, str(unknown[0]))}: unknown key{did_you_mean(str(unknown[0]), list(fields))} "
            f"(allowed: {', '.join(fields)})"
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _resolve_section(cls, name, hints[name], value, _join(path, name))
        check_value(fields[name], hints[name], kwargs[name], _join(path, name))
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _resolve_section(owner: type, name: str, tp: Any, value: Any, path: str) -> Any:
    """Sections whose schema depends on a registered name (task, student, method, teachers)."""
    from fmtransfer.registry import METHODS, MODELS, RECIPES, TASKS

    selectors = {TaskConfig: (TASKS, "name"), ModelConfig: (MODELS, "name"),
                 MethodConfig: (METHODS, "name"), TeacherConfig: (RECIPES, "recipe")}
    base = tp
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and args[0] in selectors:
            return None if value is None else _resolve_section(owner, name, args[0], value, path)
    if typing.get_origin(tp) is dict and typing.get_args(tp)[1] is TeacherConfig:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping of teacher name -> teacher config, got {value!r}")
        return {str(k): _resolve_section(owner, name, TeacherConfig, v, f"{path}.{k}") for k, v in value.items()}
    if isinstance(base, type) and base in selectors:
        registry, key = selectors[base]
        if value is None:
            raise ConfigError(null_section(path))
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        default_name = getattr(base(), key)
        chosen = value.get(key, default_name)
        if not isinstance(chosen, str):
            raise ConfigError(f"{path}.{key}: expected a string, got {chosen!r}")
        try:
            entry = registry.get(chosen)
        except ConfigError as e:
            raise ConfigError(f"{path}.{key}: {e}") from None
        return from_dict(entry.config_cls, {**value, key: chosen}, path)
    return _coerce(value, tp, path)


def to_dict(cfg: Any) -> Any:
    """Dataclass -> plain dict (round-trips through `from_dict`)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    return cfg


def run_config_hash(cfg: RunConfig) -> str:
    """The resolved config's hash: checkpoint.pt and metrics.json carry it, and a resume must match it."""
    from fmtransfer.utils import stable_hash

    return stable_hash(to_dict(cfg))


# -------------------------------------------------------------------------------------------- overrides


def parse_override(text: str) -> tuple[list[str], Any]:
    """'a.b.c=value' -> (['a','b','c'], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.epochs=5")
    key, raw = text.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.load(raw, Loader=UniqueKeyLoader) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return keys, value


def apply_overrides(raw: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides to a raw (unvalidated) config dict, in place; returns it."""
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides]
    for keys, value in items:
        if isinstance(keys, str):
            keys = keys.split(".")
        node = raw
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {'.'.join(keys)}: {k!r} is not a section")
            node = nxt
        node[keys[-1]] = value
    return raw


# ------------------------------------------------------------------------------------------------ files


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `over` onto `base`. A section whose `name` or `recipe` differs from the base's
    replaces it whole (switching component drops the old component's options)."""
    out = dict(base)
    for k, v in over.items():
        b = out.get(k)
        if isinstance(v, dict) and isinstance(b, dict):
            switched = any(key in v and key in b and v[key] != b[key] for key in ("name", "recipe"))
            out[k] = dict(v) if switched else merge(b, v)
        else:
            out[k] = v
    return out


def resolve_paths(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Make the file paths a config names relative to its own `folder` (as `base:` is), in place:
    `task.path`, and each teacher's (and the method's) `encoder` (a local model folder: a value with a '/')
    and `weights`.
    `cache_dir` and `--out` stay relative to the working directory (they are where runs write)."""
    def fix(section: Any, key: str, path_like: bool = True) -> None:
        v = section.get(key) if isinstance(section, dict) else None
        if isinstance(v, str) and v and path_like and not Path(v).expanduser().is_absolute():
            section[key] = str((folder / Path(v).expanduser()).resolve())

    fix(data.get("task"), "path")
    teachers = data.get("teachers")
    for t in [*(teachers.values() if isinstance(teachers, dict) else []), data.get("method")]:
        if isinstance(t, dict):  # a teacher, or a method that reads an FM itself (levi, probes, finetune)
            fix(t, "encoder", "/" in str(t.get("encoder", "")))
            fix(t, "weights")
    return data


def task_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """Fill a missing `student:` (and `teachers:`) section with the task's defaults, in place; a task
    config declares them as `default_student` (a section) and `default_teachers(task section)`."""
    from fmtransfer.registry import TASKS

    task = data.get("task")
    name = task.get("name", TaskConfig().name) if isinstance(task, dict) else TaskConfig().name
    if not isinstance(name, str) or name not in TASKS:
        return data  # from_dict names the problem
    cls = TASKS.get(name).config_cls
    if data.get("student") is None:
        student = getattr(cls, "default_student", None)
        if student is None:
            raise ConfigError(f"student: missing; task {name} has no default student, so name one, "
                              "e.g. student: {name: mlp}")
        data["student"] = dict(student)
    if data.get("teachers") is None and hasattr(cls, "default_teachers"):
        data["teachers"] = cls.default_teachers(task if isinstance(task, dict) else {})
    return data


def read_config_file(path: str | Path, _seen: tuple[str, ...] = ()) -> dict[str, Any]:
    """Read a run config, resolving `base: other.yaml` (relative to the file) by deep merge; the paths it
    names resolve relative to the file that names them (`resolve_paths`)."""
    path = Path(path)
    data = resolve_paths(read_yaml(path), path.parent)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a file name, got {base!r}")
    base_path = (path.parent / base).resolve()
    if str(base_path) in _seen:
        raise ConfigError(f"{path}: base: {base} includes itself")
    return merge(read_config_file(base_path, (*_seen, str(base_path))), data)


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=UniqueKeyLoader)  # a SafeLoader that refuses duplicate keys
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    if data is None:
        raise ConfigError(f"{path} is empty; write at least one section (e.g. task: {{name: movielens}})")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                raw: dict[str, Any] | None = None, machine_checks: bool = True) -> RunConfig:
    """Read YAML (or take `raw`), apply overrides, validate; any problem raises a one-line ConfigError.

    `machine_checks` also checks that the devices named exist here (off when re-reading a finished
    run's config.yaml, e.g. to export a GPU run on a CPU machine).
    """
    data = dict(raw) if raw is not None else read_config_file(path) if path is not None else {}
    apply_overrides(data, overrides or [])
    cfg = from_dict(RunConfig, task_defaults(data))
    if machine_checks:
        check_devices(cfg)
    return cfg


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
