"""PNG plots written into run directories (matplotlib is optional: without it, plots are skipped)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def lines(path: Path, series: dict[str, list[float]], *, xlabel: str, ylabel: str, title: str) -> bool:
    """One line per series against its index + 1 (e.g. epochs). Returns False when matplotlib is missing."""
    plt = _pyplot()
    if plt is None or not series:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, ys in series.items():
        ax.plot(range(1, len(ys) + 1), ys, marker="o", label=name)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def stacked_bars(path: Path, groups: list[str], series: dict[str, list[float]], *, ylabel: str, title: str) -> bool:
    """Stacked bars per group (e.g. teacher importance per genre)."""
    plt = _pyplot()
    if plt is None or not groups:
        return False
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(groups)), 3.8))
    bottom = [0.0] * len(groups)
    for name, ys in series.items():
        ax.bar(groups, ys, bottom=bottom, label=name)
        bottom = [b + y for b, y in zip(bottom, ys, strict=True)]
    ax.set(ylabel=ylabel, title=title)
    ax.tick_params(axis="x", rotation=60)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
