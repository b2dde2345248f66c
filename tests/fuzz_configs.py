"""A seeded config fuzzer over the shipped configs (used by test_reliability_config.py and
scripts/fault_suite.py): each case is a shipped config plus 1-3 `--set` overrides that put odd values
(NaN, inf, negatives, zero, huge, strings, null, empty lists, unknown keys) into its options."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
ODD_VALUES: list[Any] = [float("nan"), float("inf"), float("-inf"), -1, 0, 0.0, 0.5, 1, 1.5, 2, 1e9, 1e300, -1e-9,
                         "abc", "1e-3", None, [], [1, -1], [0.5], {}, True, "cuda", "tpu", 10**12]


def shipped_configs() -> list[Path]:
    """Every shipped run config (suites left out) and the tests' tiny config."""
    out = []
    for p in sorted((REPO / "configs").glob("*/*.yaml")):
        if "runs" not in (yaml.safe_load(p.read_text()) or {}):
            out.append(p)
    return [*out, REPO / "tests" / "configs" / "tiny.yaml"]


def _leaves(d: Any, prefix: str = "") -> list[str]:
    out = []
    if isinstance(d, dict):
        for k, v in d.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            out.append(path)
            out.extend(_leaves(v, path))
    return out


def _schema_paths(raw: dict[str, Any]) -> list[str]:
    """Option paths the config's own components accept but the file may not set (defaults included)."""
    from fmtransfer.config import TrainConfig
    from fmtransfer.registry import METHODS

    paths = [f"train.{f.name}" for f in dataclasses.fields(TrainConfig)]
    method = (raw.get("method") or {}).get("name", "student")
    if method in METHODS.names():
        paths += [f"method.{f.name}" for f in dataclasses.fields(METHODS.get(method).config_cls)]
    for t in (raw.get("teachers") or {}):
        paths += [f"teachers.{t}.train.{f.name}" for f in dataclasses.fields(TrainConfig)]
        paths += [f"teachers.{t}.{k}" for k in ("train_splits", "distill_weight", "distill_temperature", "seed")]
    paths += ["task.labels", "task.split_seed", "seed", "cache_dir", "reference_teacher", "task", "student", "method"]
    return paths


def yaml_value(v: Any) -> str:
    text = yaml.safe_dump(v, default_flow_style=True).strip()
    return text[:-3].strip() if text.endswith("...") else text


def _get(raw: dict[str, Any], key: str) -> Any:
    node: Any = raw
    for k in key.split("."):
        node = node.get(k) if isinstance(node, dict) else None
    return node


def fuzz_cases(n: int, seed: int = 0, configs: list[Path] | None = None,
               plausible: float = 0.0) -> list[tuple[Path, list[str]]]:
    """`n` (config, overrides) cases over `configs` (default: every shipped one), reproducible from `seed`.

    With probability `plausible` an override scales a number the file sets (x0.1 .. x10) instead of an odd value.
    """
    from fmtransfer.config import read_config_file

    rng = random.Random(seed)
    configs = configs or shipped_configs()
    raws = {p: read_config_file(p) for p in configs}
    cases = []
    for _ in range(n):
        path = rng.choice(configs)
        raw = raws[path]
        pool = sorted(set(_leaves(raw)) | set(_schema_paths(raw)))
        overrides = []
        for _ in range(rng.randint(1, 3)):
            key = rng.choice(pool)
            current = _get(raw, key)
            numbers = [k for k in pool if isinstance(_get(raw, k), (int, float)) and not isinstance(_get(raw, k), bool)]
            if numbers and rng.random() < plausible:
                key = rng.choice(numbers)
                current = _get(raw, key)
                v = current * rng.choice([0.1, 0.5, 2, 10])
                overrides.append(f"{key}={yaml_value(type(current)(v) if isinstance(current, int) else v)}")
                continue
            kind = rng.random()
            if kind < 0.08:
                key = f"{key}.no_such_option"
            value = rng.choice(ODD_VALUES) if kind < 0.9 else rng.choice([None, {}, []])
            overrides.append(f"{key}={yaml_value(value)}")
        cases.append((path, overrides))
    return cases
