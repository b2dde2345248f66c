"""PNG plots written into run directories (matplotlib is optional: without it, plots are skipped)."""

from __future__ import annotations

import math
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


_LOWER_IS_BETTER = {"rmse", "mae", "mse", "nll", "loss"}


def _mean_std(vals: list[Any]) -> tuple[float, float, int] | None:
    """Mean and sample std of the finite values (std 0 for a single seed); None when none is finite."""
    xs = [float(v) for v in vals if v is not None and math.isfinite(float(v))]
    if not xs:
        return None
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return mean, std, len(xs)


def _place_labels(ax: Any, fig: Any, points: list[tuple[float, float]], labels: list[str], fontsize: float) -> None:
    """Greedy label placement: each label takes the first candidate offset whose box overlaps no label or point.

    Boxes are estimated in display pixels from the character count, so ~15 close points stay readable
    without a layout dependency (adjustText); a thin leader line joins labels pushed further away.
    """
    fig.canvas.draw()
    to_px = ax.transData.transform
    px_per_pt = fig.dpi / 72.0
    h = fontsize * 1.25 * px_per_pt
    placed: list[tuple[float, float, float, float]] = []
    marks = [to_px(p) for p in points]
    # offsets in points, nearest first: beside the marker, then rings further out (with a leader line)
    candidates = [(5, 2), (5, -10), (-5, 2), (-5, -10)] + [
        (round(r * math.cos(a)) or 1, round(r * math.sin(a)) - 4)
        for r in (16, 26, 38, 52) for a in [k * math.pi / 6 for k in (0, 6, 1, 5, 11, 7, 2, 4, 10, 8, 3, 9)]]

    frame = ax.bbox.extents  # labels stay inside the axes, so none is cut at the figure edge

    def free(box: tuple[float, float, float, float]) -> bool:
        x0, y0, x1, y1 = box
        if x0 < frame[0] or y0 < frame[1] or x1 > frame[2] or y1 > frame[3]:
            return False
        if any(x0 < b[2] and b[0] < x1 and y0 < b[3] and b[1] < y1 for b in placed):
            return False
        return not any(x0 - 2 < mx < x1 + 2 and y0 - 2 < my < y1 + 2 for mx, my in marks)

    # place the most crowded points first, so isolated ones take what is left
    def crowd(i: int) -> float:
        return -sum(1 for m in marks if abs(m[0] - marks[i][0]) < 60 and abs(m[1] - marks[i][1]) < 20)

    for i in sorted(range(len(points)), key=crowd):
        (mx, my), text = marks[i], labels[i]
        w = len(text) * fontsize * 0.58 * px_per_pt
        chosen = None
        for dx, dy in candidates:
            ox, oy = dx * px_per_pt, dy * px_per_pt
            x0 = mx + ox if dx > 0 else mx + ox - w
            box = (x0, my + oy, x0 + w, my + oy + h)
            if free(box):
                chosen = (dx, dy, box)
                break
        if chosen is None:  # everything is taken: fall back to the first offset
            dx, dy = candidates[0]
            x0 = mx + dx * px_per_pt
            chosen = (dx, dy, (x0, my + dy * px_per_pt, x0 + w, my + dy * px_per_pt + h))
        dx, dy, box = chosen
        placed.append(box)
        far = (dx, dy) not in candidates[:4]
        ax.annotate(text, points[i], xytext=(dx, dy), textcoords="offset points", fontsize=fontsize,
                    ha="left" if dx > 0 else "right", va="bottom",
                    color="tab:red" if text.startswith("teacher ") else "black",
                    arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.6", "shrinkA": 0, "shrinkB": 3}
                    if far else None)


def id_ood_scatter(path: Path, rows: list[dict[str, Any]], metric: str, title: str, *,
                   higher_is_better: bool | None = None) -> bool:
    """ID test metric (x) against mean OOD metric (y), one labeled point per report row, +- std over seeds.

    Shows at a glance whether a method's in-distribution gain carries over out of distribution. Rows are
    `benchmarking.suite.aggregate` rows ("name", "test", "ood" lists over seeds); teachers are drawn as squares. Returns
    False when matplotlib is missing or no row has both values.
    """
    plt = _pyplot()
    if plt is None:
        return False
    pts = []
    for r in rows:
        x, y = _mean_std(r.get("test", [])), _mean_std(r.get("ood", []))
        if x is not None and y is not None:
            pts.append((r["name"], x, y))
    if not pts:
        return False
    if higher_is_better is None:
        higher_is_better = metric.lower() not in _LOWER_IS_BETTER
    better = "higher is better" if higher_is_better else "lower is better"
    fig, ax = plt.subplots(figsize=(8.5, 6))
    for name, (xm, xs, xn), (ym, ys, yn) in pts:
        teacher = name.startswith("teacher ")
        ax.errorbar(xm, ym, xerr=xs if xn > 1 else None, yerr=ys if yn > 1 else None,
                    fmt="s" if teacher else "o", ms=5, color="tab:red" if teacher else "tab:blue",
                    ecolor="0.6", elinewidth=0.8, capsize=2, zorder=3)
    ax.margins(0.12)
    ax.set(xlabel=f"ID test {metric} (mean over seeds; {better})",
           ylabel=f"OOD {metric}, mean over OOD sets ({better})", title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _place_labels(ax, fig, [(p[1][0], p[2][0]) for p in pts], [p[0] for p in pts], fontsize=6.5)
    ax.text(0.01, 0.01, "bars: ± std over seeds (runs with >1 seed); squares: teachers", transform=ax.transAxes,
            fontsize=6, color="0.4", va="bottom")
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return True
