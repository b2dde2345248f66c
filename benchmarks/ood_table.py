"""Print the per-OOD-suite tables of docs/levi.md and docs/finetuning.md from finished bench folders.

`fmtransfer report` averages the OOD suites into one column; robustness work needs each suite (a method
can win the mild shifts and lose the strong one), the trainable parameters and the per-epoch cost, and
the seed-by-seed (paired) difference to a reference run, which removes the noise the runs share.

    python benchmarks/ood_table.py runs/levi-reviews runs/ft-reviews --ref ensemble
    python benchmarks/ood_table.py runs/levi-digits --ref ensemble --runs levi ensemble mlp_probe

Each folder holds <run>/seed<k>/metrics.json (the bench layout); runs of the same name in two folders
are merged. Pairs are (run, seed) against (ref, seed).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def mean_std(xs: list[float], digits: int = 4) -> str:
    """Mean ± std over seeds as text (the value alone for one seed; "-" for none)."""
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.{digits}f}"
    return f"{statistics.fmean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def collect(folders: list[Path]) -> dict[str, dict[str, dict[str, Any]]]:
    """run name -> seed dir name -> metrics.json."""
    runs: dict[str, dict[str, dict[str, Any]]] = {}
    for folder in folders:
        for p in sorted(folder.glob("*/seed*/metrics.json")):
            runs.setdefault(p.parent.parent.name, {})[p.parent.name] = json.loads(p.read_text())
    if not runs:
        raise SystemExit(f"no finished run (<run>/seed<k>/metrics.json) under {', '.join(map(str, folders))}")
    return runs


def per_epoch(m: dict[str, Any]) -> float:
    """Training seconds per epoch: the method's own figure (steps only) when it reports one."""
    d = m.get("method_diagnostics") or {}
    for key in ("train_s_per_epoch", "train_seconds_per_epoch"):
        if key in d:
            return float(d[key])
    return m["seconds"]["train"] / max(1, m["epochs_run"])


def trainable(m: dict[str, Any]) -> int:
    d = m.get("method_diagnostics") or {}
    return int(d.get("trainable_params", m["params"].get("student_trainable", m["params"]["student"])))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folders", nargs="+", type=Path)
    ap.add_argument("--ref", default="ensemble", help="run the paired differences are taken against")
    ap.add_argument("--runs", nargs="*", help="only these runs, in this order")
    args = ap.parse_args(argv)
    runs = collect(args.folders)
    names = [n for n in (args.runs or list(runs)) if n in runs]
    first = next(iter(runs[names[0]].values()))
    k, suites = first["metric"], list(first["ood"])
    sign = 1.0 if first.get("higher_is_better", True) else -1.0
    print(f"| run | seeds | val {k} | test {k} | " + " | ".join(suites) +
          " | OOD mean | trainable params | train s/epoch |")
    print("|---" * (7 + len(suites)) + "|")
    for n in names:
        ms = list(runs[n].values())
        cols = [mean_std([m["val"][k] for m in ms]), mean_std([m["test"][k] for m in ms])]
        cols += [mean_std([m["ood"][s][k] for m in ms], 3) for s in suites]
        cols += [mean_std([statistics.fmean(m["ood"][s][k] for s in suites) for m in ms])]
        cols += [f"{trainable(ms[0]):,}", mean_std([per_epoch(m) for m in ms], 2)]
        print(f"| {n} | {len(ms)} | " + " | ".join(cols) + " |")
    ref = runs.get(args.ref)
    if ref is None:
        return
    print(f"\nPaired (same seed) differences to {args.ref}; positive = better:\n")
    print("| run | pairs | val | test | OOD mean | " + " | ".join(suites) + " |")
    print("|---" * (5 + len(suites)) + "|")
    for n in names:
        seeds = [s for s in runs[n] if s in ref]
        if not seeds or n == args.ref:
            continue

        def diff(get: Any, seeds: list[str] = seeds, n: str = n, digits: int = 4) -> str:
            xs = [sign * (get(runs[n][s]) - get(ref[s])) for s in seeds]
            sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
            return f"{statistics.fmean(xs):+.{digits}f} ± {sd:.{digits}f}"

        cols = [diff(lambda m: m["val"][k]), diff(lambda m: m["test"][k]),
                diff(lambda m: statistics.fmean(m["ood"][s][k] for s in suites))]
        cols += [diff(lambda m, s=s: m["ood"][s][k], digits=3) for s in suites]
        print(f"| {n} | {len(seeds)} | " + " | ".join(cols) + " |")


if __name__ == "__main__":
    main()
