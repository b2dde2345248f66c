"""`fmtransfer serve-bench`: what serving the exported student costs beside the FM teacher path it replaces.

One process, one machine, the same requests (rows of the test split) for every path:
- batch-1 latency: each request alone, end to end (`Predictor.predict_features` with its input checks; for the FM
  path: tokenize the request's texts, run the encoder, run the head); median and 90th percentile;
- throughput: batches of `batch_size` distinct requests, in rows per second;
plus parameter counts, file sizes, each exported format's test metric against metrics.json, and the live
FM path's outputs against the teacher artifact's stored outputs (so what is timed is the teacher).
Speeds are measurements of this machine at this moment: nothing asserts them.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fmtransfer.data.base import TaskData
from fmtransfer.export import FinishedRun, export_run, open_finished_run
from fmtransfer.serving.fm_path import FmPath, build_fm_path, pick_fm_teacher
from fmtransfer.serving.loader import Predictor, load_predictor
from fmtransfer.serving.manifest import FORMATS, ExportError, read_manifest, sha256_file

Request = dict[str, np.ndarray]
LABELS = {"safetensors": "PyTorch", "torchscript": "TorchScript", "onnx": "onnxruntime"}


def _latency(fn: Callable[[Request], Any], requests: list[Request], warmup: int = 3) -> dict[str, float]:
    for r in requests[:warmup]:
        fn(r)
    times = []
    for r in requests:
        t0 = time.perf_counter()
        fn(r)
        times.append(time.perf_counter() - t0)
    ms = sorted(t * 1e3 for t in times)
    return {"median_ms": statistics.median(ms), "p90_ms": ms[min(len(ms) - 1, int(0.9 * len(ms)))],
            "mean_ms": statistics.fmean(ms), "requests": len(ms)}


def _throughput(fn: Callable[[Request], Any], batches: list[Request], warmup: Request,
                min_seconds: float = 1.0) -> dict[str, float]:
    """Rows per second from the median batch time; the batches are cycled for at least `min_seconds`
    (at most 50 rounds), so one preemption by another process cannot move the figure."""
    fn(warmup)
    times: list[float] = []
    start = time.perf_counter()
    while not times or (time.perf_counter() - start < min_seconds and len(times) < 50 * len(batches)):
        for b in batches:
            t0 = time.perf_counter()
            fn(b)
            times.append(time.perf_counter() - t0)
    size = len(next(iter(batches[0].values())))
    med = statistics.median(times)
    return {"rows_per_s": size / med, "median_batch_ms": med * 1e3, "rows": size * len(times),
            "batches": len(times), "seconds": sum(times)}


def _take(task: TaskData, names: list[str], rows: np.ndarray) -> Request:
    return {k: task.features[k][torch.from_numpy(rows)].numpy() for k in names}


def _fm_take(task: TaskData, rows: np.ndarray) -> Request:
    """An FM request: every feature view plus the row id (text views may be indexed by row), no target."""
    return {k: v.numpy() for k, v in task.gather(torch.from_numpy(rows)).items() if k != "y"}


def _machine(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    versions = {"torch": torch.__version__}
    for mod in ("onnxruntime", "transformers"):
        if importlib.util.find_spec(mod) is not None:
            versions[mod] = __import__(mod).__version__
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other work on the machine skews timings
    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "load_1min": load, "versions": versions}


def _exportable_formats() -> list[str]:
    have = {m: importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime")}
    return [f for f in FORMATS if f != "onnx" or all(have.values())]


def _student_rows(predictors: dict[str, Predictor], export_dir: Path, task: TaskData, run: FinishedRun,
                  requests: list[Request], batches: list[Request], warmup: Request) -> list[dict[str, Any]]:
    manifest = read_manifest(export_dir)
    m, test = task.metric, task.splits["test"]
    bs = run.cfg.train.eval_batch_size
    out = []
    for fmt, pred in predictors.items():
        scored = np.concatenate([pred.predict_features(_take(task, pred.inputs, test[s:s + bs].numpy()))
                                 for s in range(0, len(test), bs)])
        rec = manifest.files[fmt]
        out.append({"path": f"student, {LABELS[fmt]} ({rec['file']})", "format": fmt,
                    "params": manifest.model["params"], "files": {rec["file"]: rec["bytes"]}, "bytes": rec["bytes"],
                    "latency": _latency(pred.predict_features, requests),
                    "throughput": _throughput(pred.predict_features, batches, warmup),
                    "test": task.score(torch.from_numpy(scored), test)[m]})
    return out


def _fm_row(fm: FmPath, task: TaskData, requests: list[Request], batches: list[Request], warmup: Request,
            rows: np.ndarray, metric: str) -> dict[str, Any]:
    def run(req: Request) -> torch.Tensor:
        with torch.inference_mode():
            return fm.model({k: torch.from_numpy(v) for k, v in req.items()})

    live = torch.cat([run(r) for r in requests]).float()
    diff = float((live - fm.outputs[torch.from_numpy(rows)]).abs().max())
    return {"path": f"FM teacher {fm.name!r}: {fm.encoder} live + {fm.recipe} head (PyTorch)", "format": "fm",
            "params": fm.params, "files": fm.file_bytes, "bytes": sum(fm.file_bytes.values()),
            "latency": _latency(run, requests, warmup=1), "throughput": _throughput(run, batches, warmup),
            "test": (fm.test or {}).get(metric), "test_source": "teacher artifact (cached embeddings)",
            "live_vs_artifact_max_abs_diff": diff, "checked_rows": len(rows)}


def serve_bench(run_dir: str | Path, export_dir: str | Path | None = None, cache_dir: str | Path | None = None,
                requests: int = 500, fm_requests: int = 30, batch_size: int = 256, batches: int = 20,
                fm_batches: int = 2, threads: int = 1, seed: int = 0) -> dict[str, Any]:
    """Measure the exported student (every format present) and the run's FM teacher path, in this process.

    `threads` applies to torch and onnxruntime alike. The default, 1, is one request per worker thread, the
    usual CPU serving setup; on a machine whose cores are busy, more threads make a tiny model wait for
    cores (docs/serving.md has the measurement).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _serve_bench(run_dir, export_dir, cache_dir, requests, fm_requests, batch_size, batches, fm_batches,
                            threads, seed)
    finally:
        torch.set_num_threads(before)


def _serve_bench(run_dir: str | Path, export_dir: str | Path | None, cache_dir: str | Path | None, requests: int,
                 fm_requests: int, batch_size: int, batches: int, fm_batches: int, threads: int,
                 seed: int) -> dict[str, Any]:
    from fmtransfer.runner import build_task

    machine = _machine(threads)
    run = open_finished_run(run_dir)
    task = build_task(run.cfg)
    given = export_dir
    with tempfile.TemporaryDirectory(prefix="fmtransfer-serve-") as tmp:
        export_dir = Path(tmp) / "export" if given is None else Path(given)
        if given is None:
            export_run(run.path, export_dir, _exportable_formats(), task=task)
        manifest = read_manifest(export_dir)
        if manifest.source.get("student_sha256") != sha256_file(run.path / "student.safetensors"):
            raise ExportError(f"--export {export_dir} holds the student of another run than {run.path}; "
                              "export this run, or leave --export out")
        predictors = {f: load_predictor(export_dir, f, threads=threads) for f in manifest.files}
        names = manifest.inputs
        rng = np.random.default_rng(seed)
        test = task.splits["test"].numpy()
        req_rows = rng.choice(test, size=max(requests, fm_requests), replace=len(test) < max(requests, fm_requests))
        batch_rows = [rng.choice(test, size=batch_size, replace=len(test) < batch_size)
                      for _ in range(max(batches, fm_batches))]
        reqs = [_take(task, names, req_rows[i:i + 1]) for i in range(requests)]
        bats = [_take(task, names, r) for r in batch_rows[:batches]]
        warm = _take(task, names, batch_rows[0][: min(32, batch_size)])
        rows = _student_rows(predictors, export_dir, task, run, reqs, bats, warm)
        fm_note = None
        fm_name = pick_fm_teacher(run.cfg, run.metrics)
        if fm_name is None:
            fm_note = "the run's config has no foundation teacher: no FM path to compare"
        else:
            try:
                fm = build_fm_path(run.cfg, run.metrics, task, fm_name, cache_dir)
            except ExportError as e:
                fm_note = f"FM path not measured: {e}"
            else:
                fm_reqs = [_fm_take(task, req_rows[i:i + 1]) for i in range(fm_requests)]
                fm_bats = [_fm_take(task, r) for r in batch_rows[:fm_batches]]
                fm_warm = _fm_take(task, batch_rows[0][:8])
                rows.append(_fm_row(fm, task, fm_reqs, fm_bats, fm_warm, req_rows[:fm_requests], task.metric))
    return {"run": str(run.path), "task": task.name, "method": run.cfg.method.name, "metric": task.metric,
            "higher_is_better": task.higher_is_better, "run_test": run.metrics["test"][task.metric],
            "batch_size": batch_size, "machine": machine | {"load_1min_end": _machine(threads)["load_1min"]},
            "rows": rows, "fm_teacher": fm_name,
            "note": fm_note, "export_dir": None if given is None else str(given)}


def _ratio(a: float, b: float) -> str:
    return f"{a / b:,.0f}x" if a / b >= 10 else f"{a / b:.1f}x"


def format_bench(result: dict[str, Any]) -> str:
    """The measured tables as markdown (what docs/serving.md records)."""
    m, mach = result["metric"], result["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in mach["versions"].items())
    load = "" if mach["load_1min"] is None else \
        f", load average {mach['load_1min']:.1f} at start and {mach['load_1min_end']:.1f} at end"
    lines = [f"serve-bench: {result['task']} {result['method']} run {result['run']}",
             f"machine: {mach['cpu']}, {mach['cores']} cores, {mach['threads']} threads{load}; {versions}", "",
             f"| path | parameters | files, bytes | batch 1: median ms (p90) | batch {result['batch_size']}: rows/s "
             f"| test {m} |", "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lat, thr = r["latency"], r["throughput"]
        test = "n/a" if r["test"] is None else f"{r['test']:.4f}" + (" (artifact)" if r["format"] == "fm" else "")
        lines.append(f"| {r['path']} | {r['params']:,} | {r['bytes']:,} | {lat['median_ms']:.3f} ({lat['p90_ms']:.3f}) "
                     f"| {thr['rows_per_s']:,.0f} | {test} |")
    fm = next((r for r in result["rows"] if r["format"] == "fm"), None)
    students = [r for r in result["rows"] if r["format"] != "fm"]
    if fm is not None:
        lines += ["", "| FM teacher path / student | latency at batch 1 | throughput | parameters | file size |",
                  "|---|---:|---:|---:|---:|"]
        for r in students:
            lines.append(f"| {LABELS[r['format']]} | {_ratio(fm['latency']['median_ms'], r['latency']['median_ms'])} "
                         f"| {_ratio(r['throughput']['rows_per_s'], fm['throughput']['rows_per_s'])} "
                         f"| {_ratio(fm['params'], r['params'])} | {_ratio(fm['bytes'], r['bytes'])} |")
    lines.append("")
    equal = all(f"{r['test']:.4f}" == f"{result['run_test']:.4f}" for r in students)
    lines.append(f"- test {m} of the run {result['run_test']:.5f}; of the exported student: "
                 + ", ".join(f"{LABELS[r['format']]} {r['test']:.5f}" for r in students)
                 + f"; equal to 4 decimals: {'yes' if equal else 'NO'}")
    if fm is not None:
        lat, thr = fm["latency"], fm["throughput"]
        lines.append(f"- FM path: {lat['requests']} requests at batch 1, {thr['rows']} rows in batches; its outputs "
                     f"on {fm['checked_rows']} requests differ from the teacher artifact's stored outputs by at most "
                     f"{fm['live_vs_artifact_max_abs_diff']:.1e} (the artifact was computed from cached embeddings)")
        lines.append("- FM files: " + ", ".join(f"{k} {v:,}" for k, v in fm["files"].items()))
    if result.get("note"):
        lines.append(f"- {result['note']}")
    return "\n".join(lines)
