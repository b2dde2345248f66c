"""Paired (same seed) differences of one bench run to others, on val, test and the OOD mean (issue 14).

    python benchmarks/paired.py /work/fmruns/i14-ml diverse_distill-hint2-rel fitnet-fm kd-fm

Positive = better (higher accuracy, lower RMSE); mean ± std over the seeds both runs finished.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from strong_table import collect, ood_mean


def paired(a: dict[int, dict[str, Any]], b: dict[int, dict[str, Any]]) -> dict[str, list[float]]:
    """Per-seed differences a - b (sign: positive = a better) on val, test and the OOD mean."""
    any_m = next(iter(a.values()))
    metric, sign = any_m["metric"], 1 if any_m["higher_is_better"] else -1
    out: dict[str, list[float]] = {"val": [], "test": [], "ood": []}
    for s in sorted(set(a) & set(b)):
        out["val"].append(sign * (a[s]["val"][metric] - b[s]["val"][metric]))
        out["test"].append(sign * (a[s]["test"][metric] - b[s]["test"][metric]))
        oa, ob = ood_mean(a[s], metric), ood_mean(b[s], metric)
        if oa is not None and ob is not None:
            out["ood"].append(sign * (oa - ob))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("run")
    ap.add_argument("others", nargs="+")
    args = ap.parse_args(argv)
    runs = collect(args.folder, None)
    for other in args.others:
        d = paired(runs[args.run], runs[other])
        text = "; ".join(f"{k} {statistics.fmean(v):+.4f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.4f}"
                         for k, v in d.items() if v)
        print(f"{args.run} vs {other} ({len(d['test'])} seeds): {text}")


if __name__ == "__main__":
    main()
