"""`fmtransfer suite` (once called `bench`, still accepted) and `fmtransfer report`: run a suite of configs
over seeds, tabulate mean +- std.

A suite is YAML:

    name: movielens
    set: {train.epochs: 20}              # optional overrides applied to every run
    runs:
      - name: student
        config: student.yaml             # relative to the suite file
      - name: kd-fm
        config: kd.yaml
        set: {method.teacher: fm}

Runs land in OUT/<run name>/seed<k>/; a finished run (metrics.json present) is not run again, so an
interrupted suite resumes. Teachers appear as their own rows, read from the runs' metrics.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fmtransfer.config import apply_overrides, load_config, read_config_file, read_yaml
from fmtransfer.errors import ConfigError
from fmtransfer.evaluate import gap_recovered
from fmtransfer.runfiles import read_metrics
from fmtransfer.utils import atomic_write_bytes, atomic_write_json


@dataclass
class SuiteRun:
    name: str
    config: Path
    overrides: dict[str, Any] = field(default_factory=dict)


def load_suite(path: str | Path) -> tuple[str, list[SuiteRun]]:
    path = Path(path)
    data = read_yaml(path)
    unknown = set(data) - {"name", "description", "set", "runs"}
    if unknown:
        raise ConfigError(f"{path}: unknown key {sorted(unknown)[0]!r} (allowed: name, description, set, runs)")
    runs = data.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ConfigError(f"{path}: 'runs' must be a non-empty list of {{name, config, set}}")
    common = data.get("set") or {}
    out, seen = [], set()
    for k, r in enumerate(runs):
        if not isinstance(r, dict) or "name" not in r or "config" not in r:
            raise ConfigError(f"{path}: runs.{k} needs 'name' and 'config'")
        extra = set(r) - {"name", "config", "set"}
        if extra:
            raise ConfigError(f"{path}: runs.{k}: unknown key {sorted(extra)[0]!r} (allowed: name, config, set)")
        if r["name"] in seen:
            raise ConfigError(f"{path}: run name {r['name']!r} appears twice")
        seen.add(r["name"])
        cfg_path = (path.parent / r["config"]).resolve()
        if not cfg_path.exists():
            raise ConfigError(f"{path}: runs.{k}.config {r['config']!r} does not exist")
        out.append(SuiteRun(str(r["name"]), cfg_path, {**common, **(r.get("set") or {})}))
    return str(data.get("name", path.stem)), out


def suite_configs(path: str | Path, seeds: list[int],
                  extra: list[str] | None = None) -> list[tuple[SuiteRun, int, Any]]:
    """Every (run, seed, validated RunConfig) of a suite; validates all before anything runs."""
    _, runs = load_suite(path)
    items = []
    for run in runs:
        for seed in seeds:
            raw = read_config_file(run.config)
            apply_overrides(raw, run.overrides)
            apply_overrides(raw, {"seed": seed})
            items.append((run, seed, load_config(raw=raw, overrides=extra)))
    return items


def run_suite(suite: str | Path, seeds: int, out_dir: str | Path, overrides: list[str] | None = None) -> str:
    """Run the suite, write OUT/results.json and OUT/results.md, and return the markdown table."""
    from fmtransfer.runfiles import format_summary
    from fmtransfer.runner import run_experiment

    out = Path(out_dir)
    name, suite_runs = load_suite(suite)
    items = suite_configs(suite, list(range(seeds)), overrides)
    t0 = time.perf_counter()
    for k, (run, seed, cfg) in enumerate(items):
        run_dir = out / run.name / f"seed{seed}"
        print(f"[{k + 1}/{len(items)}] {run.name} seed {seed} -> {run_dir}", flush=True)
        partial = (run_dir / "checkpoint.pt").exists() and not (run_dir / "metrics.json").exists()
        metrics = run_experiment(cfg, run_dir, resume=partial or (run_dir / "metrics.json").exists(), quiet=True)
        print("    " + format_summary(metrics), flush=True)
    table = write_report([out], out, title=f"{name}: {seeds} seed(s), {time.perf_counter() - t0:.0f}s",
                         order=[r.name for r in suite_runs])
    return table


# ---------------------------------------------------------------------------------------------- report


def _metrics_files(root: Path) -> list[Path]:
    """Every metrics.json under `root`, following symlinked folders (a suite folder often links runs made
    elsewhere), each real folder visited once so that a link cycle cannot loop."""
    seen: set[Path] = set()
    found = []
    for here, subdirs, files in os.walk(root, followlinks=True):
        real = Path(here).resolve()
        if real in seen:
            subdirs.clear()
            continue
        seen.add(real)
        subdirs.sort()
        if "metrics.json" in files:
            found.append(Path(here) / "metrics.json")
    return sorted(found)


def collect(dirs: list[Path]) -> list[dict[str, Any]]:
    """Every finished run's metrics under `dirs`, tagged with its run name (the folder above seed<k>)."""
    found = []
    for d in dirs:
        if not d.exists():
            raise ConfigError(f"{d} does not exist")
        for p in _metrics_files(d):
            m = read_metrics(p, "run that experiment again, or move its folder out of the report")
            m["_run"] = p.parent.parent.name if p.parent.name.startswith("seed") else p.parent.name
            found.append(m)
    if not found:
        raise ConfigError(f"no finished run (metrics.json) under {', '.join(map(str, dirs))}")
    return found


def _fmt(vals: list[float], digits: int = 4) -> str:
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    if not vals:
        return "-"
    mean = statistics.fmean(vals)
    if len(vals) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def aggregate(runs: list[dict[str, Any]], order: list[str] | None = None) -> list[dict[str, Any]]:
    """Rows of the report: one per teacher (deduplicated per seed), then one per run name.

    Runs follow `order` (a suite's order) when given, else the student first and the rest by name.
    """
    rows: dict[str, dict[str, Any]] = {}
    student_by_seed: dict[tuple[str, int, int], float] = {}
    best_teacher: dict[tuple[str, int, int], float] = {}  # the best teacher of the suite, per setting and seed
    labels = lambda m: (m.get("labels") or {}).get("train", -1)  # noqa: E731
    several = len({labels(m) for m in runs}) > 1  # a label sweep: teachers differ per setting
    for m in runs:
        if m["method"] == "student":
            student_by_seed[(m["task"], labels(m), m["seed"])] = m["test"][m["metric"]]
        for t in m.get("teachers", {}).values():
            key, v = (m["task"], labels(m), m["seed"]), t["test"][m["metric"]]
            if key not in best_teacher or (v > best_teacher[key] if m["higher_is_better"] else v < best_teacher[key]):
                best_teacher[key] = v
    for m in runs:
        metric = m["metric"]
        for tname, t in m.get("teachers", {}).items():
            key = f"teacher {tname} ({t['recipe']})" + (f", {labels(m):,} labels" if several else "")
            row = rows.setdefault(key, {"name": key, "task": m["task"], "metric": metric, "_seen": [],
                                        "test": [], "ood": [], "auc": [], "gap": [], "gap_best": [],
                                        "skipped": [], "params": t["params"], "seconds": [], "seeds": []})
            if t["fingerprint"] in row["_seen"]:
                if not t.get("from_cache"):  # the run that prepared it knows how long that took
                    row["seconds"][row["_seen"].index(t["fingerprint"])] = t.get("seconds")
                continue
            row["_seen"].append(t["fingerprint"])
            row["test"].append(t["test"][metric])
            row["auc"].append(t["test"].get("auc"))
            ood = [v[metric] for v in t.get("ood", {}).values()]
            row["ood"].append(sum(ood) / len(ood) if ood else None)
            row["seconds"].append(t.get("seconds") if not t.get("from_cache") else None)
            row["seeds"].append(m["seed"])
        row = rows.setdefault(m["_run"], {"name": m["_run"], "task": m["task"], "metric": metric, "test": [],
                                          "ood": [], "auc": [], "gap": [], "gap_best": [], "skipped": [],
                                          "params": m["params"]["student"], "seconds": [], "seeds": []})
        row["test"].append(m["test"][metric])
        row["auc"].append(m["test"].get("auc"))
        row["ood"].append((m.get("ood_mean") or {}).get(metric))
        student = student_by_seed.get((m["task"], labels(m), m["seed"]), m["reference"]["student"])
        row["gap"].append(gap_recovered(m["test"][metric], student, m["reference"]["teacher"], m["higher_is_better"]))
        best = best_teacher.get((m["task"], labels(m), m["seed"]))
        row["gap_best"].append(gap_recovered(m["test"][metric], student, best, m["higher_is_better"]))
        row["skipped"].append((m.get("method_diagnostics") or {}).get("skipped_fraction", 0.0))
        row["seconds"].append(m["seconds"]["train"])
        row["seeds"].append(m["seed"])
    for row in rows.values():
        row.pop("_seen", None)
    order = order or sorted({m["_run"] for m in runs}, key=lambda n: (n != "student", n))
    teacher_rows = [r for k, r in rows.items() if k.startswith("teacher ")]
    run_rows = sorted((r for k, r in rows.items() if not k.startswith("teacher ")),
                      key=lambda r: order.index(r["name"]) if r["name"] in order else len(order))
    return teacher_rows + run_rows


def format_table(rows: list[dict[str, Any]]) -> str:
    metric = rows[0]["metric"] if rows else "metric"
    lines = [f"| run | task | seeds | test {metric} | OOD {metric} | test AUC | gap recovered (FM) | "
             "gap recovered (best teacher) | teacher pairs skipped | params | train s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        secs = [s for s in r["seconds"] if s is not None]
        teacher = r["name"].startswith("teacher ")
        skipped = "-" if teacher else f"{100 * sum(r['skipped']) / max(len(r['skipped']), 1):.0f}%"
        lines.append(f"| {r['name']} | {r['task']} | {len(r['test'])} | {_fmt(r['test'])} | {_fmt(r['ood'])} | "
                     f"{_fmt(r['auc'])} | {_fmt(r['gap'], 2)} | {_fmt(r['gap_best'], 2)} | {skipped} | "
                     f"{r['params']:,} | {_fmt(secs, 1)} |")
    return "\n".join(lines)


def write_report(dirs: list[Path], out: Path | None, title: str = "", order: list[str] | None = None,
                 scatter: bool = True) -> str:
    """Tabulate the runs under `dirs`; with `out`, write results.json, results.md and (when the rows have OOD
    values, `scatter` is on and matplotlib is installed) id_vs_ood.png."""
    runs = collect(dirs)
    rows = aggregate(runs, order)
    table = (f"### {title}\n\n" if title else "") + format_table(rows) + "\n"
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / "results.json", {"rows": rows, "runs": runs})
        atomic_write_bytes(out / "results.md", table.encode())
        if scatter and any(v is not None for r in rows for v in r["ood"]):
            from fmtransfer.plots import id_ood_scatter

            metric = rows[0]["metric"]
            id_ood_scatter(out / "id_vs_ood.png", rows, metric, title or f"{rows[0]['task']}: ID vs OOD {metric}",
                           higher_is_better=bool(runs[0]["higher_is_better"]))
    return table
