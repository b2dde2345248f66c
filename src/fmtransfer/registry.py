"""Name -> (config class, implementation) registries; tasks, models, recipes and methods register where defined.

There is no central list to edit: `load_builtins()` imports every module of the built-in subpackages, and
each module registers what it defines at import time.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from fmtransfer.errors import ConfigError, did_you_mean

T = TypeVar("T")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered component: its config dataclass and the object that builds it."""

    name: str
    config_cls: type
    impl: T


class Registry(Generic[T]):
    """A plain name -> Entry dict that rejects duplicates and badly formed names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}
        self._aliases: dict[str, str] = {}

    def register(self, name: str, config_cls: type, impl: T | None = None) -> Any:
        """Register `impl` under `name`; usable directly or as a class/function decorator."""

        def _add(obj: T) -> T:
            if not _NAME.match(name):
                raise ValueError(f"{self.kind} name {name!r} must be lowercase letters, digits and '_'")
            if name in self._entries and self._entries[name].impl is not obj:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, config_cls, obj)
            return obj

        if impl is not None:
            return _add(impl)
        return _add

    def alias(self, old: str, new: str) -> None:
        """Accept `old`, a component's former name, for `new`: configs written before a rename keep working."""
        if old in self._entries:
            raise ValueError(f"{self.kind} alias {old!r} is a registered name")
        self._aliases[old] = new

    def first_name(self, name: str) -> str:
        """The name `name` (or the component it is an alias of) was first registered under; what fingerprints
        hash, so that renaming a component keeps the artifacts prepared under its old name valid."""
        canonical = self._aliases.get(name, name)
        return next((old for old, new in self._aliases.items() if new == canonical), canonical)

    def get(self, name: str) -> Entry[T]:
        load_builtins()
        name = self._aliases.get(name, name)
        if name not in self._entries:
            raise ConfigError(f"unknown {self.kind} {name!r}{did_you_mean(name, self.names())} "
                              f"(allowed: {', '.join(self.names())})")
        return self._entries[name]

    def names(self) -> list[str]:
        load_builtins()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        load_builtins()
        return self._aliases.get(name, name) in self._entries


TASKS: Registry[Callable[..., Any]] = Registry("task")
MODELS: Registry[Callable[..., Any]] = Registry("model")
RECIPES: Registry[Callable[..., Any]] = Registry("teacher recipe")
METHODS: Registry[Callable[..., Any]] = Registry("method")

_BUILTIN_PACKAGES = ("fmtransfer.data", "fmtransfer.models", "fmtransfer.teachers", "fmtransfer.methods")
_loaded = False


def load_builtins() -> None:
    """Import every module of the built-in packages once, so each registers its components."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for pkg_name in _BUILTIN_PACKAGES:
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.iter_modules(pkg.__path__):
            importlib.import_module(f"{pkg_name}.{info.name}")
