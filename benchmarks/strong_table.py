"""Print the strong-teacher tables of docs/strong.md from finished bench folders (issue 14).

For one task's `suite-strong.yaml` bench folder it writes:
- the teachers (val / test / OOD mean over seeds, preparation seconds) and the best FM teacher, picked on
  validation; its lead over the student alone in student seed-stds (the setting's entry condition);
- every run: val, test, OOD mean, gap recovered against that teacher (per seed, then mean ± std);
- paired (same seed) differences of every run to the best baseline, the baseline picked on validation
  among the runs that are not DiverseDistill (student, kd-*, fitnet-*, multi_kd, ca_mkd, talking*);
- DiverseDistill's teacher importance (mean over training, and by segment on validation rows) and its
  skipped share.

    python benchmarks/strong_table.py /work/fmruns/digits-strong
    python benchmarks/strong_table.py /work/fmruns/digits-strong --baseline kd-fm --seeds 0 1 2

Pairs use only seeds where both runs finished; "gap recovered" is (run - student) / (teacher - student)
with the same seed's student and teacher.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def mean_std(xs: list[float], digits: int = 4, sign: bool = False) -> str:
    """Mean ± std as text (the value alone for one seed, "-" for none)."""
    if not xs:
        return "-"
    f = f"{{:+.{digits}f}}" if sign else f"{{:.{digits}f}}"
    if len(xs) == 1:
        return f.format(xs[0])
    return f"{f.format(statistics.fmean(xs))} ± {statistics.stdev(xs):.{digits}f}"


def collect(folder: Path, seeds: list[int] | None) -> dict[str, dict[int, dict[str, Any]]]:
    """run name -> seed -> metrics.json."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for p in sorted(folder.glob("*/seed*/metrics.json")):
        seed = int(p.parent.name[4:])
        if seeds is None or seed in seeds:
            runs.setdefault(p.parent.parent.name, {})[seed] = json.loads(p.read_text())
    if not runs:
        raise SystemExit(f"no finished run (<run>/seed<k>/metrics.json) under {folder}")
    return runs


def better(a: float, b: float, higher: bool) -> bool:
    return a > b if higher else a < b


def teachers(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, dict[int, dict[str, Any]]]:
    """teacher name -> seed -> its summary (the first run that used it), plus its preparation seconds."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for by_seed in runs.values():
        for seed, m in by_seed.items():
            for name, t in m.get("teachers", {}).items():
                row = out.setdefault(name, {}).setdefault(seed, dict(t))
                if not t.get("from_cache"):
                    row["prep_seconds"] = t.get("seconds")
    return out


def ood_mean(d: dict[str, Any], metric: str) -> float | None:
    vals = [v[metric] for v in d.get("ood", {}).values()]
    return sum(vals) / len(vals) if vals else None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--baseline", default=None, help="the baseline of the paired table (default: best on val)")
    ap.add_argument("--seeds", type=int, nargs="*", default=None, help="only these seeds (default: all)")
    args = ap.parse_args(argv)
    runs = collect(args.folder, args.seeds)
    any_m = next(iter(next(iter(runs.values())).values()))
    metric, higher = any_m["metric"], any_m["higher_is_better"]
    student = {s: m["test"][metric] for s, m in runs.get("student", {}).items()}
    tch = teachers(runs)

    print(f"## {any_m['task']}: {args.folder}\n")
    print(f"### Teachers ({metric})\n")
    print("| teacher | recipe | kind | seeds | val | test | OOD mean | prep seconds (per seed) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, by_seed in tch.items():
        t0 = next(iter(by_seed.values()))
        secs = [f"{by_seed[s]['prep_seconds']:.0f}" if by_seed[s].get("prep_seconds") else "cached"
                for s in sorted(by_seed)]
        print(f"| {name} | {t0['recipe']} | {t0['kind']} | {len(by_seed)} "
              f"| {mean_std([t['val'][metric] for t in by_seed.values()])} "
              f"| {mean_std([t['test'][metric] for t in by_seed.values()])} "
              f"| {mean_std([x for t in by_seed.values() if (x := ood_mean(t, metric)) is not None])} "
              f"| {', '.join(secs)} |")
    fms = {n: b for n, b in tch.items() if next(iter(b.values()))["kind"] == "foundation"}
    pool = fms or tch
    sign = 1 if higher else -1
    best_t = max(pool, key=lambda n: sign * statistics.fmean(t["val"][metric] for t in pool[n].values()))
    t_test = {s: t["test"][metric] for s, t in tch[best_t].items()}
    print(f"\nBest FM teacher on validation: **{best_t}**.")
    if len(student) >= 2:
        common = sorted(set(student) & set(t_test))
        lead = statistics.fmean(t_test[s] for s in common) - statistics.fmean(student[s] for s in common)
        sd = statistics.stdev(student.values())
        print(f"Its test lead over the student alone: {lead:+.4f} = {abs(lead) / sd:.1f} student stds "
              f"(student std {sd:.4f} over {len(student)} seeds; target >= 5).")
    print()

    family = ["student", "kd", "fitnet", "multi_kd", "ca_mkd", "talking", "diverse_distill"]
    names = sorted(runs, key=lambda n: (next((k for k, f in enumerate(family) if n.startswith(f)), len(family)),
                                        n != "diverse_distill", n))
    baselines = [n for n in names if not n.startswith("diverse_distill")]
    base = args.baseline or max(
        baselines, key=lambda n: (1 if higher else -1) * statistics.fmean(m["val"][metric] for m in runs[n].values()))
    print(f"### Runs ({metric}; gap recovered against {best_t}; best baseline on validation: **{base}**)\n")
    print(f"| run | seeds | val | test | OOD mean | gap recovered | paired test vs {base} | paired OOD vs {base} |")
    print("|---|---|---|---|---|---|---|---|")
    for n in names:
        by = runs[n]
        gaps = [(m["test"][metric] - student[s]) / (t_test[s] - student[s]) for s, m in by.items()
                if s in student and s in t_test and t_test[s] != student[s]]
        pairs = [s for s in by if s in runs[base]]
        d_test = [(1 if higher else -1) * (by[s]["test"][metric] - runs[base][s]["test"][metric]) for s in pairs]
        d_ood = [(1 if higher else -1) * (by[s]["ood_mean"][metric] - runs[base][s]["ood_mean"][metric])
                 for s in pairs if by[s].get("ood_mean") and runs[base][s].get("ood_mean")]
        print(f"| {n} | {len(by)} | {mean_std([m['val'][metric] for m in by.values()])} "
              f"| {mean_std([m['test'][metric] for m in by.values()])} "
              f"| {mean_std([m['ood_mean'][metric] for m in by.values() if m.get('ood_mean')])} "
              f"| {mean_std(gaps, 2)} | {mean_std(d_test, sign=True) if n != base else '-'} "
              f"| {mean_std(d_ood, sign=True) if n != base else '-'} |")
    print("\nPaired differences: positive = better than the baseline; mean ± std over same-seed pairs.\n")

    dd = [n for n in names if n.startswith("diverse_distill")]
    if dd:
        print("### DiverseDistill: teacher importance (mean alpha over training; skipped share of pairs)\n")
        print("| run | seeds | mean alpha | skipped | importance by segment (val rows, seed 0 or first) |")
        print("|---|---|---|---|---|")
        for n in dd:
            by = runs[n]
            diag = [m.get("method_diagnostics") or {} for m in by.values()]
            tnames = list(diag[0].get("mean_alpha", {}))
            alpha = ", ".join(f"{t} {mean_std([d['mean_alpha'][t] for d in diag], 3)}" for t in tnames)
            skipped = mean_std([d.get("skipped_fraction", 0.0) for d in diag], 3)
            seg = diag[0].get("importance_by_segment", {})
            parts = []
            for sname, table in seg.items():
                vals = {t: [g[t] for g in table.values()] for t in tnames}
                parts.append(f"{sname}: " + ", ".join(f"{t} {min(v):.2f}-{max(v):.2f}" for t, v in vals.items()))
            print(f"| {n} | {len(by)} | {alpha} | {skipped} | {'; '.join(parts) or '-'} |")


if __name__ == "__main__":
    main()
