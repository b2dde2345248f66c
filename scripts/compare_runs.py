"""Say whether two folders of finished runs (suite layout: NAME/seedN/metrics.json) have the same results.

Why: a refactor that must not change results is checked by running the same suites before and after it
and comparing every metric here, exactly (no tolerance):

    fmtransfer suite configs/movielens/suite.yaml --seeds 1 --out /tmp/before   # old code
    fmtransfer suite configs/movielens/suite.yaml --seeds 1 --out /tmp/after    # new code
    python scripts/compare_runs.py /tmp/before /tmp/after

Compared: test, val and OOD metrics, the OOD mean, the best epoch, steps and parameter counts. Not compared:
times, and `teacher_forward` (it counts what ran in that run: zero once the teachers are cached). A student
run's reference teacher is read from the cache only where another run already prepared it, so when one side
has no reference, the other side's reference-only fields are not compared either.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

KEYS = ("test", "val", "ood", "ood_mean", "best_epoch", "steps", "params")


def _comparable(a: dict[str, Any], b: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Drop a reference teacher that only one side found in its cache (see the module docstring)."""
    pa, pb = a.get("params") or {}, b.get("params") or {}
    if not pa.get("teachers") or not pb.get("teachers"):
        a = {**a, "params": {**pa, "teachers": {}}}
        b = {**b, "params": {**pb, "teachers": {}}}
    return a, b


def compare(before: Path, after: Path) -> tuple[list[str], int]:
    """(one line per run, the number of runs that differ)."""
    lines, differ = [], 0
    for m in sorted(after.glob("**/seed*/metrics.json")):
        rel = m.relative_to(after)
        old = before / rel
        if not old.exists():
            lines.append(f"only after   {rel.parent}")
            continue
        a, b = _comparable(json.loads(old.read_text()), json.loads(m.read_text()))
        bad = [k for k in KEYS if a.get(k) != b.get(k)]
        if bad:
            differ += 1
            lines.append(f"DIFFERENT    {rel.parent}: {', '.join(bad)}")
        else:
            lines.append(f"identical    {rel.parent}")
    return lines, differ


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    args = ap.parse_args()
    lines, differ = compare(args.before, args.after)
    print("\n".join(lines))
    same = sum(line.startswith("identical") for line in lines)
    print(f"{same} identical, {differ} different")
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
