"""`fmtransfer list [methods|recipes|tasks|models]`: every registered component, its one-line doc and its
config keys with their defaults (what a config section may hold); and every config class, whose numeric
ranges `markdown_table()` renders for docs/reliability.md."""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import Any

from fmtransfer.registry import METHODS, MODELS, RECIPES, TASKS, Registry

KINDS: dict[str, tuple[Registry[Any], str]] = {
    "methods": (METHODS, "method"), "recipes": (RECIPES, "teachers.<name>"),
    "tasks": (TASKS, "task"), "models": (MODELS, "student / teachers.<name>.model"),
}


def one_line(entry: Any) -> str:
    """The component's line of the docstring of the module that registered it: the line that starts with
    '`name`:' or '- `name`:' (a module holding several components), else the docstring's first line; for a
    module shared by several components without such a line, the implementation's own docstring."""
    impl = entry.impl
    doc = (getattr(sys.modules.get(getattr(impl, "__module__", "")), "__doc__", None) or "").strip()
    for line in doc.splitlines():
        m = re.match(rf"^\s*(?:-\s*)?`{re.escape(entry.name)}`(?::|\s+is)\s*(.+)$", line)
        if m:
            return m.group(1).strip()
    first = doc.splitlines()[0] if doc else ""
    shared = "`" in first.split(":")[0] and f"`{entry.name}`" not in first.split(":")[0]
    if (shared or not first) and impl.__doc__:
        return impl.__doc__.strip().splitlines()[0]
    if not first.startswith("`") and sum(e.impl.__module__ == impl.__module__ for e in _siblings(entry)) > 1 \
            and impl.__doc__:
        return impl.__doc__.strip().splitlines()[0]
    return re.sub(r"^`[^`]+`(?:,\s*`[^`]+`)*\s*(?:and\s*`[^`]+`)?:\s*", "", first).strip()


def _siblings(entry: Any) -> list[Any]:
    for registry, _ in KINDS.values():
        if entry.name in registry and registry.get(entry.name) is entry:
            return [registry.get(n) for n in registry.names()]
    return [entry]


def config_keys(config_cls: type) -> list[str]:
    """'key=default' for every field of a component's config, the selector (`name`, `recipe`) left out."""
    out = []
    for f in dataclasses.fields(config_cls):
        if f.name in ("name", "recipe") or not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default: Any = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = "?"
        if dataclasses.is_dataclass(default):
            default = "{" + (getattr(default, "name", None) or type(default).__name__) + " ...}"
        out.append(f"{f.name}={_show(default)}")
    return out


def _show(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def format_list(kind: str | None = None) -> str:
    """The listing of one kind (methods, recipes, tasks, models) or of all four."""
    kinds = [kind] if kind else list(KINDS)
    blocks = []
    for k in kinds:
        registry, section = KINDS[k]
        lines = [f"{k} (config section: {section}):"]
        for name in registry.names():
            entry = registry.get(name)
            lines.append(f"  {name:<16} {one_line(entry)}")
            keys = config_keys(entry.config_cls)
            if keys:
                lines.append(f"  {'':<16} keys: {', '.join(keys)}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def config_classes() -> list[type]:
    """The run config's own sections and every registered component's config (the registries load every
    built-in component)."""
    from fmtransfer.config import RunConfig, TaskConfig, TeacherConfig, TrainConfig

    out: list[type] = [RunConfig, TrainConfig, TeacherConfig, TaskConfig]
    for reg in (METHODS, MODELS, RECIPES, TASKS):
        out += [reg.get(n).config_cls for n in reg.names() if reg.get(n).config_cls not in out]
    return out


def markdown_table() -> str:
    """One row per config class: `field` range, ... (docs/reliability.md holds this table verbatim)."""
    from fmtransfer.ranges import range_table

    lines = ["| config (section) | numeric options and their allowed ranges |", "|---|---|"]
    for cls in config_classes():
        rows = range_table([cls])
        if rows:
            lines.append(f"| {cls.__name__} | " + "; ".join(f"`{f}` {r}" for _, f, r in rows) + " |")
    return "\n".join(lines)
