"""Print the fingerprint of every teacher of every shipped config (seed 0), as JSON.

Why: a prepared teacher is found again only by its fingerprint, so a refactor of configs or recipes must
leave these values unchanged (or say in the changelog that teachers are rebuilt once). Run it before and
after a change and compare:

    python scripts/teacher_fingerprints.py > /tmp/before.json   # ... change ...
    python scripts/teacher_fingerprints.py --compare /tmp/before.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fmtransfer.config import RunConfig, load_config
from fmtransfer.data.base import TaskData
from fmtransfer.errors import FmtError
from fmtransfer.runner import build_task
from fmtransfer.teachers.base import teacher_fingerprint

ROOT = Path(__file__).resolve().parent.parent


def fingerprints(configs: list[Path]) -> dict[str, dict[str, str]]:
    """{config path: {teacher name: fingerprint}} for every config that names teachers."""
    tasks: dict[str, TaskData] = {}
    out: dict[str, dict[str, str]] = {}
    for path in configs:
        try:
            cfg = load_config(path)
        except FmtError:
            continue  # a suite file or a partial config, not a run config
        if not cfg.teachers:
            continue
        key = json.dumps([cfg.task.name, repr(cfg.task)], sort_keys=True)
        if key not in tasks:
            try:
                tasks[key] = build_task(cfg)
            except FmtError as e:  # e.g. the table example before scripts/make_table_example.py ran
                print(f"skipped {path.relative_to(ROOT)}: {e}", file=sys.stderr)
                continue
        task = tasks[key]
        done: dict[str, str] = {}
        prints = {name: _fingerprint(name, cfg, task, done) for name in cfg.teachers}
        out[str(path.relative_to(ROOT))] = prints
    return out


def _fingerprint(name: str, cfg: RunConfig, task: TaskData, done: dict[str, str]) -> str:
    """Teacher `name`'s fingerprint (its distill_from source's first, as prepare_teachers does)."""
    if name not in done:
        tcfg = cfg.teachers[name]
        src = None
        if tcfg.distill_from is not None:
            src = _Source(_fingerprint(tcfg.distill_from, cfg, task, done))
        seed = tcfg.seed if tcfg.seed is not None else cfg.seed
        done[name] = teacher_fingerprint(name, tcfg, task, seed, src)  # type: ignore[arg-type]
    return done[name]


class _Source:
    """What teacher_fingerprint reads of a distill_from source: its fingerprint."""

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", type=Path, help="a JSON written earlier by this script: report differences")
    ap.add_argument("--task", help="only configs of this task folder (e.g. digits)")
    args = ap.parse_args()
    folder = ROOT / "configs" / (args.task or "")
    prints = fingerprints(sorted(p for p in folder.rglob("*.yaml") if "suite" not in p.name))
    if args.compare is None:
        json.dump(prints, sys.stdout, indent=1, sort_keys=True)
        print()
        return 0
    before = json.loads(args.compare.read_text())
    changed = [(c, t, before[c].get(t), fp) for c, ts in prints.items() if c in before for t, fp in ts.items()
               if before[c].get(t) != fp]
    n = sum(len(ts) for c, ts in prints.items() if c in before)
    for c, t, old, new in changed:
        print(f"CHANGED {c} {t}: {old} -> {new}")
    print(f"{n - len(changed)} of {n} teacher fingerprints unchanged")
    return 1 if changed else 0


if __name__ == "__main__":
    raise SystemExit(main())
