"""How much can a committee add over its best teacher? Read prepared teachers from the cache and score them.

A committee method can only transfer more than single-teacher KD where some teacher is right where the best
one is wrong. This script measures that headroom on a setting's prepared teachers, per seed, without training
anything: each teacher alone, the uniform mixture and (classes) the product of experts, the best fixed
mixture weight chosen on validation (scored on test and OOD), and an oracle that picks the better teacher
per row (an upper bound no gate reaches).
For classification it also counts the rows where the FM is wrong and a complementary teacher is right.
The `transfer` column is what distillation reads: the unlabeled training rows, scored with their held-back
labels (no method sees them).

    python benchmarks/complementarity.py configs/reviews/strong/student.yaml --seeds 0 1 2 \\
        --set cache_dir=/work/fmcache
"""
from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch

from fmtransfer.config import load_config
from fmtransfer.runner import build_task, cached_reference

WEIGHTS = [i / 10 for i in range(11)]


def _mix(task: Any, a: torch.Tensor, b: torch.Tensor, w: float) -> torch.Tensor:
    """w * a + (1 - w) * b, in probability space for classification (what a mixture teacher hands on)."""
    if task.task_type == "regression":
        return w * a + (1 - w) * b
    return (w * a.softmax(-1) + (1 - w) * b.softmax(-1)).clamp_min(1e-12).log()


def _oracle(task: Any, a: torch.Tensor, b: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Per row, the teacher closer to the label (an upper bound for any per-row choice between two teachers)."""
    y = task.y[rows]
    if task.task_type == "regression":
        pick_a = (a - y).abs() <= (b - y).abs()
    else:
        pick_a = a.argmax(-1) == y
        pick_a = pick_a.unsqueeze(-1)
    return torch.where(pick_a, a, b)


def _main_metric(task: Any, scores: dict[str, float]) -> float:
    return scores["rmse"] if task.task_type == "regression" else scores["accuracy"]


def _splits(task: Any) -> dict[str, torch.Tensor]:
    out = {"transfer": task.splits["transfer"], "val": task.splits["val"], "test": task.splits["test"]}
    out.update({f"ood/{s}": task.splits[f"ood/{s}"] for s in task.ood_suites})
    return out


def seed_report(config: str, seed: int, overrides: list[str], fm_name: str) -> dict[str, dict[str, float]]:
    """{row name: {split: metric}} for one seed: teachers, mixtures with the FM, oracles, disagreement counts
    (the row of the weight chosen on validation also holds that weight as "w")."""
    cfg = load_config(config, [*overrides, f"seed={seed}"])
    task = build_task(cfg)
    teachers = {}
    for name in cfg.teachers:
        t = cached_reference(cfg, task, name)
        if t is not None:
            teachers[name] = t.outputs
    if fm_name not in teachers:
        raise SystemExit(f"{config} seed {seed}: teacher {fm_name!r} is not prepared in {cfg.cache_dir}; "
                         f"run `fmtransfer cache {config} --set seed={seed}` first")
    splits = _splits(task)
    lower = task.task_type == "regression"
    rows: dict[str, dict[str, float]] = {}

    def score(name: str, out: torch.Tensor) -> None:
        rows[name] = {s: _main_metric(task, task.score(out[r], r)) for s, r in splits.items()}

    for name, out in teachers.items():
        score(name, out)
    fm = teachers[fm_name]
    for name, out in teachers.items():
        if name == fm_name:
            continue
        score(f"{fm_name}+{name} (0.5)", _mix(task, fm, out, 0.5))
        if not lower:  # the product of experts: what `combine: product` distils (the mixture is the default)
            score(f"{fm_name}*{name} (product, 0.5)", 0.5 * (fm.log_softmax(-1) + out.log_softmax(-1)))
        val = splits["val"]
        best_w = (min if lower else max)(
            WEIGHTS, key=lambda w: _main_metric(task, task.score(_mix(task, fm, out, w)[val], val)))
        score(f"{fm_name}+{name} (w on val)", _mix(task, fm, out, best_w))
        rows[f"{fm_name}+{name} (w on val)"]["w"] = best_w  # the FM's weight, chosen per seed
        rows[f"oracle {fm_name}|{name}"] = {
            s: _main_metric(task, task.score(_oracle(task, fm[r], out[r], r), r)) for s, r in splits.items()}
        if not lower:
            rows[f"{fm_name} wrong, {name} right (share)"] = {
                s: float(((fm[r].argmax(-1) != task.y[r]) & (out[r].argmax(-1) == task.y[r])).float().mean())
                for s, r in splits.items()}
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--fm", default="fm", help="the committee's FM teacher (default: fm)")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    per_seed = [seed_report(args.config, s, args.overrides, args.fm) for s in args.seeds]
    names = [n for n in per_seed[0] if all(n in p for p in per_seed)]
    ood = [s for s in per_seed[0][names[0]] if s.startswith("ood/")]
    print(f"{args.config}, seeds {args.seeds}: mean ± std over seeds (transfer rows, val, test, OOD mean)")
    print("| row | transfer | val | test | OOD mean |\n|---|---|---|---|---|")
    for n in names:
        found = [p[n] for p in per_seed]
        label = n if "w" not in found[0] else f"{n}: " + ", ".join(f"{f['w']:.1f}" for f in found)
        cells = []
        for split in ("transfer", "val", "test"):
            v = np.array([f[split] for f in found])
            cells.append(f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0:.4f}")
        o = np.array([np.mean([f[s] for s in ood]) for f in found]) if ood else np.array([np.nan])
        cells.append(f"{o.mean():.4f} ± {o.std(ddof=1) if len(o) > 1 else 0:.4f}")
        print(f"| {label} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
