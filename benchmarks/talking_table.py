"""Print the Talking Models tables of docs/talking.md from finished bench folders.

The standard `fmtransfer report` table has no room for what a talking run adds: the interactive output
y~ (teacher in the loop, `method_diagnostics.interactive`) beside the plain student path, and the
seed-by-seed (paired) difference to a reference run, which removes the split/seed noise the runs share.

    python benchmarks/talking_table.py runs/talking-digits --ref kd-wide
    python benchmarks/talking_table.py runs/talking-genre/split* --ref kd    # one folder per split

Each folder holds <run>/seed<k>/metrics.json (the bench layout). Runs are paired by (folder, seed).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from ood_table import mean_std  # benchmarks/ is on sys.path when a script here runs


def _signed(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.fmean(xs):+.4f} ± {sd:.4f}"


def collect(folders: list[Path]) -> tuple[dict[str, dict[tuple[str, str], dict[str, Any]]], str, bool]:
    """run name -> (folder, seed) -> metrics.json; the metric; whether higher is better."""
    runs: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
    metric, higher = "", True
    for folder in folders:
        for p in sorted(folder.glob("*/seed*/metrics.json")):
            m = json.loads(p.read_text())
            metric, higher = m["metric"], bool(m.get("higher_is_better", m["metric"] != "rmse"))
            runs.setdefault(p.parent.parent.name, {})[(str(folder), p.parent.name)] = m
    if not runs:
        raise SystemExit(f"no finished run (<run>/seed<k>/metrics.json) under {', '.join(map(str, folders))}")
    return runs, metric, higher


def ood_mean(block: dict[str, dict[str, float]], k: str) -> float:
    return statistics.fmean(v[k] for v in block.values())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--ref", default="kd", help="run the paired differences are taken against")
    args = ap.parse_args(argv)
    runs, k, higher = collect(args.folders)
    print(f"| run | n | val {k} | test {k} | OOD {k} | y~ val | y~ test | y~ OOD | train s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, by in runs.items():
        ms = list(by.values())
        inter = [m["method_diagnostics"]["interactive"] for m in ms
                 if (m.get("method_diagnostics") or {}).get("interactive")]
        cols = [[m["val"][k] for m in ms if "val" in m], [m["test"][k] for m in ms],
                [ood_mean(m["ood"], k) for m in ms],
                [i["val"][k] for i in inter if "val" in i], [i["test"][k] for i in inter],
                [ood_mean(i["ood"], k) for i in inter], [m["seconds"]["train"] for m in ms]]
        print(f"| {name} | {len(ms)} | " + " | ".join(mean_std(c) for c in cols[:-1]) + f" | {mean_std(cols[-1], 1)} |")
    if args.ref not in runs:
        print(f"\n(no run named {args.ref!r}: no paired table)")
        return
    sign = 1.0 if higher else -1.0
    ref = runs[args.ref]
    print(f"\nPaired (same folder and seed) differences to {args.ref}; positive = better:\n")
    print(f"| run | pairs | test - {args.ref} | val - {args.ref} | OOD - {args.ref} |")
    print("|---|---|---|---|---|")
    for name, by in runs.items():
        keys = [key for key in by if key in ref]
        if not keys:
            continue
        d_test = [sign * (by[c]["test"][k] - ref[c]["test"][k]) for c in keys]
        d_val = [sign * (by[c]["val"][k] - ref[c]["val"][k]) for c in keys if "val" in by[c] and "val" in ref[c]]
        d_ood = [sign * (ood_mean(by[c]["ood"], k) - ood_mean(ref[c]["ood"], k)) for c in keys]
        print(f"| {name} | {len(keys)} | {_signed(d_test)} | {_signed(d_val) if d_val else '-'} | {_signed(d_ood)} |")


if __name__ == "__main__":
    main()
