"""Checks a config gets at load beyond its types: duplicate YAML keys, null sections, the device.

(The loader also reads `1e-3` as a number, as YAML 1.2 does; PyYAML's YAML 1.1 reads it as a string.)

A duplicate key is an error (YAML itself keeps the last one without a word, so a second `lr:` further
down a file silently wins); a section set to null is an error rather than a default (`teachers.fm: null`
used to become a default supervised teacher); a device must exist on this machine.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from fmtransfer.errors import ConfigError

DEVICE_TYPES = ("cpu", "cuda", "mps")


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping holding the same key twice (one line naming it and its lines)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: SafeLoader reports it below
                continue
            if first is not None:
                name = key_node.start_mark.name
                where = "--set value" if name.startswith("<") else name
                raise ConfigError(f"{where}: key {key!r} appears twice (lines {first} and {line}); keep one")
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, UniqueKeyLoader.construct_mapping)
# YAML 1.1 (PyYAML) reads `1e9` and `1e-3` (no dot) as strings: read them as the numbers they are (YAML 1.2).
UniqueKeyLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                                      re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
                                      list("-+0123456789."))


def null_section(path: str) -> str:
    return (f"{path}: is null; write the section's keys, or delete the line (a section left out takes its "
            "defaults)")


def check_device(spec: str, where: str = "train.device") -> None:
    """One ConfigError line when `spec` names no device of this machine (auto always passes)."""
    if spec == "auto":
        return
    import torch

    try:
        dev = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{where}: {spec!r} is not a device (allowed: auto, cpu, cuda, cuda:N, mps)") from None
    if dev.type not in DEVICE_TYPES:
        raise ConfigError(f"{where}: {spec!r} is not supported (allowed: auto, cpu, cuda, cuda:N, mps)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ConfigError(f"{where}: {spec!r} but this machine has no usable CUDA GPU (torch {torch.__version__} "
                              f"is {build}); use device: auto or cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"{where}: {spec!r} but this machine has {torch.cuda.device_count()} CUDA device(s) "
                              f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{where}: 'mps' but this machine has no usable Apple GPU; use device: auto or cpu")


def check_devices(cfg: Any) -> None:
    """Every device a run config names (the run's loop and each teacher's) exists on this machine."""
    check_device(cfg.train.device)
    for name, t in cfg.teachers.items():
        check_device(t.train.device, f"teachers.{name}.train.device")
