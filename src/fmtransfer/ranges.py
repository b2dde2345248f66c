"""The allowed range of every numeric config option, checked when a config is loaded (`validate` too).

A field can declare its range next to itself, `lr: float = field(default=3e-3, metadata=above(0))`;
fields without one get the range of their name's rule in `NAME_RULES` (e.g. every `*dropout` lies in
[0, 1), every `*batch_size` is >= 1). Every float must also be finite and fit float32: NaN, inf and
1e300 are refused everywhere. A test checks that every numeric field of every registered component has a range and
that its default lies inside it; `range_table()` lists them (`catalog.markdown_table()` renders the table
of docs/reliability.md).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Union

from fmtransfer.errors import ConfigError


@dataclass(frozen=True)
class Range:
    """lo <= v <= hi (strict where `*_open`); `kind` 'labels' is a count >= 1 or a fraction in (0, 1]."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    kind: str = "number"

    def ok(self, v: float) -> bool:
        if self.kind == "labels":
            return v >= 1 if isinstance(v, int) else 0 < v <= 1
        if self.kind == "any":
            return True
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return not (self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi))

    def text(self) -> str:
        if self.kind == "labels":
            return "a count >= 1 (an integer) or a fraction in (0, 1]"
        if self.kind == "any":
            return "any (finite)"
        lo = None if self.lo is None else f"{self.lo:g}"
        hi = None if self.hi is None else f"{self.hi:g}"
        if lo is not None and hi is not None:
            return f"in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if lo is not None:
            return f"{'>' if self.lo_open else '>='} {lo}"
        return f"{'<' if self.hi_open else '<='} {hi}"


def above(lo: float) -> dict[str, Range]:
    """Field metadata: strictly greater than `lo`."""
    return {"range": Range(lo=lo, lo_open=True)}


def at_least(lo: float) -> dict[str, Range]:
    return {"range": Range(lo=lo)}


def within(lo: float, hi: float, hi_open: bool = False, lo_open: bool = False) -> dict[str, Range]:
    return {"range": Range(lo=lo, hi=hi, lo_open=lo_open, hi_open=hi_open)}


FLOAT32_MAX = 3.4028234663852886e38
"""Training runs in float32 at most: a larger option (lr 1e300) overflows inside the optimizer."""
POSITIVE, NON_NEGATIVE, COUNT = Range(lo=0, lo_open=True), Range(lo=0), Range(lo=1)
PROBABILITY, DROPOUT, FRACTION = Range(lo=0, hi=1), Range(lo=0, hi=1, hi_open=True), Range(0, 1, True, True)
ANY = Range(kind="any")

NAME_RULES: list[tuple[str, Range]] = [
    # first matching pattern wins (fnmatch on the field name)
    ("labels", Range(kind="labels")),
    ("*seed", ANY), ("tap", ANY), ("layer_ids", ANY), ("ood_shift", ANY), ("positive_threshold", ANY),
    ("liked_threshold", ANY), ("positive_rating", ANY), ("rotations", ANY),
    ("lr", POSITIVE), ("*_lr", POSITIVE), ("*_lr_scale", NON_NEGATIVE),
    ("query_rows", NON_NEGATIVE), ("timing_rows", NON_NEGATIVE),  # 0: no timing
    ("*batch_size", COUNT), ("*_rows", COUNT), ("rows", COUNT),
    ("*dropout", DROPOUT), ("drop_connect", DROPOUT),
    ("weight_decay", NON_NEGATIVE), ("*_weight_decay", NON_NEGATIVE), ("small_weight", PROBABILITY),
    ("*_weight", NON_NEGATIVE), ("w_*", NON_NEGATIVE), ("l_*", NON_NEGATIVE), ("*_l2", NON_NEGATIVE),
    ("*temperature", POSITIVE), ("*tau", POSITIVE), ("lora_alpha", POSITIVE), ("grad_clip", POSITIVE),
    ("val_fraction", FRACTION), ("test_fraction", FRACTION), ("ood_fraction", FRACTION),
    ("skip_fraction", DROPOUT), ("explore", PROBABILITY), ("entropy_floor", PROBABILITY), ("rho", PROBABILITY),
    ("bn_momentum", PROBABILITY), ("alphas", PROBABILITY), ("layers", Range(lo=0, hi=1, lo_open=True)),
    ("noise", NON_NEGATIVE), ("init_std", NON_NEGATIVE), ("codec_hidden", NON_NEGATIVE),
    ("self_warmup_steps", NON_NEGATIVE), ("top_layers", NON_NEGATIVE), ("top_blocks", NON_NEGATIVE),
    ("num_classes", Range(lo=2)),
    ("epochs", COUNT), ("patience", COUNT), ("steps_per_epoch", COUNT), ("num_threads", COUNT), ("*_steps", COUNT),
    ("*_every", COUNT), ("*hidden", COUNT), ("*_dim", COUNT), ("dim", COUNT), ("channels", COUNT),
    ("heads", COUNT), ("rank", COUNT), ("rounds", COUNT), ("top_m", COUNT), ("buckets", COUNT),
    ("grid", COUNT), ("resolution", COUNT), ("max_*", COUNT), ("users", COUNT), ("subsample", COUNT),
    ("*_card", COUNT), ("*_size", COUNT), ("*_per_stage", COUNT), ("*_ngrams", COUNT),
]


def _numeric(tp: Any) -> bool:
    """Whether annotation `tp` holds numbers (int, float, optionals and lists of them), not bools."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType, list, tuple):
        return any(_numeric(a) for a in typing.get_args(tp) if a is not type(None))
    return tp in (int, float)


def range_for(f: dataclasses.Field, tp: Any) -> Range | None:  # type: ignore[type-arg]
    """The declared range of field `f` (its metadata, else its name's rule); None for non-numeric fields."""
    if not _numeric(tp):
        return None
    declared = f.metadata.get("range") if f.metadata else None
    if declared is not None:
        return declared
    for pattern, rng in NAME_RULES:
        if fnmatch.fnmatchcase(f.name, pattern):
            return rng
    return None


def check_value(f: dataclasses.Field, tp: Any, value: Any, path: str) -> None:  # type: ignore[type-arg]
    """Raise a one-line ConfigError when a number (or a list item) is not finite or outside its range."""
    rng = range_for(f, tp)
    if rng is None or value is None:
        return
    items = list(enumerate(value)) if isinstance(value, (list, tuple)) else [(None, value)]
    for i, v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        where = path if i is None else f"{path}.{i}"
        if isinstance(v, float) and not (math.isfinite(v) and abs(v) <= FLOAT32_MAX):
            raise ConfigError(f"{where}: must be a finite number (|v| <= 3.4e38, float32), got {v} "
                              f"(allowed: {rng.text()})")
        if not rng.ok(v):
            raise ConfigError(f"{where}: {v!r} is out of range (allowed: {rng.text()})")


def range_table(classes: list[type]) -> list[tuple[str, str, str]]:
    """(config class, field, allowed range) for every numeric field of `classes` (docs, tests)."""
    rows = []
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            rng = range_for(f, hints[f.name])
            if _numeric(hints[f.name]):
                text = rng.text() if rng is not None else "NO RANGE"
                if type(None) in typing.get_args(hints[f.name]):
                    text += " or null"
                if typing.get_origin(hints[f.name]) in (list, tuple):
                    text = f"items {text}"
                rows.append((cls.__name__, f.name, text))
    return rows


def numeric_fields_without_range(cls: type) -> list[str]:
    hints = typing.get_type_hints(cls)
    return [f.name for f in dataclasses.fields(cls) if _numeric(hints[f.name]) and range_for(f, hints[f.name]) is None]
