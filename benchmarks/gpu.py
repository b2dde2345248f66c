"""The GPU path, measured (issue 18): the movielens and digits KD suites and a reviews cache build, per device.

    .venv/bin/python benchmarks/gpu.py --devices cuda,cpu --out runs/gpu            # on a machine with a GPU
    .venv/bin/python benchmarks/gpu.py --devices cuda --compile --out runs/gpu-compiled
    .venv/bin/python benchmarks/gpu.py --devices cpu --tiny                          # seconds; what the tests run

For each device: every run of `configs/movielens/suite.yaml` and `configs/digits/suite.yaml` (student, KD from
the FM teacher, KD from the wide teacher) is trained by the library's loop (`train.loop.fit`) after its
teachers are prepared, and the MiniLM cache of clothing reviews is built. On cuda the forward passes run
under bf16 autocast (`train.precision=bf16`; `--fp32` turns it off), the frozen encoders too (`bf16: true`);
a small task is kept whole on the device (features, targets, teacher outputs: a step's gather never leaves
the GPU), larger ones (`--pinned`) stay in pinned host memory and are copied with non_blocking=True;
`--compile` wraps each method's loss in torch.compile. On cpu the same runs use fp32 and host memory.
Printed: teacher preparation seconds, seconds per training epoch (median), cache-build texts/s, peak GPU
memory (cuda) or peak resident memory (cpu), one column per device. `--tiny` cuts every size (rows,
epochs, steps, texts; a 32 px backbone) so the whole path runs in seconds; `--encoder` swaps MiniLM for a
local model folder (the tests use a 2-layer BERT).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import torch

from fmtransfer.benchmarking.suite import suite_configs
from fmtransfer.cache.text import TextEncoderCache
from fmtransfer.config import RunConfig
from fmtransfer.data.base import TaskData
from fmtransfer.registry import METHODS, MODELS
from fmtransfer.runner import JsonlLog, build_task, prepare_teachers
from fmtransfer.train.distributed import DistContext
from fmtransfer.train.loop import fit

REPO = Path(__file__).resolve().parents[1]
TINY = {"movielens": ["task.subsample=1500", "train.steps_per_epoch=3", "teachers.fm.max_length=32"],
        "digits": ["task.subsample=200", "task.labels=40", "task.rotations=[]", "task.sklearn_digits=false",
                   "teachers.fm.resolution=32", "teachers.fm.tap=2", "teachers.fm.grid=2",
                   "train.steps_per_epoch=3"]}


def on_device(task: TaskData, device: torch.device, pinned: bool) -> TaskData:
    """The task whose `gather` reads features and targets kept on `device` (or in pinned host memory).

    Scoring still reads the host targets, so metrics are computed exactly as on CPU."""
    if device.type == "cpu":
        return task
    feats = {k: (v if pinned else v.to(device)) for k, v in task.features.items()}
    y = task.y if pinned else task.y.to(device)
    moved = dataclasses.replace(task)

    def gather(rows: torch.Tensor) -> dict[str, torch.Tensor]:
        if pinned:  # gathered on the host into page-locked memory: the loop's non_blocking copy is then async
            return {**{k: v[rows].pin_memory() for k, v in feats.items()}, "y": y[rows].pin_memory(), "row": rows}
        r = rows.to(device, non_blocking=True)
        return {**{k: v[r] for k, v in feats.items()}, "y": y[r], "row": rows}

    moved.gather = gather  # type: ignore[method-assign]
    return moved


def peak_memory(device: torch.device) -> float:
    """MiB: the peak allocated on the GPU, or this process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def suite(task_name: str, device: torch.device, args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    gpu = device.type == "cuda"
    sets = [f"cache_dir={cache}", f"train.device={device}", *(TINY[task_name] if args.tiny else []), *args.overrides]
    if args.tiny:
        sets.append(f"train.epochs={args.epochs or 1}")
    elif args.epochs:
        sets.append(f"train.epochs={args.epochs}")
    if gpu and not args.fp32:
        sets.append("train.precision=bf16")
    runs = suite_configs(REPO / "configs" / task_name / "suite.yaml", [0], sets)
    out: dict[str, Any] = {}
    task: TaskData | None = None
    for run, _seed, cfg in runs:
        name = run.name
        cfg = _teacher_opts(cfg, args, gpu)
        task = task or build_task(cfg)
        entry = METHODS.get(cfg.method.name)
        needed = entry.impl.required_teachers(cfg.method, list(cfg.teachers))
        t0 = time.perf_counter()
        teachers = prepare_teachers(cfg, task, needed, DistContext(device=device), JsonlLog(None))
        t_prep = time.perf_counter() - t0
        torch.manual_seed(cfg.seed)
        student = MODELS.get(cfg.student.name).impl(cfg.student, task)
        method = entry.impl(cfg.method, student, task, teachers)
        if args.compile:
            method.losses = torch.compile(method.losses)  # type: ignore[method-assign]
        outputs = {n: t.outputs.to(device) if gpu and not args.pinned else t.outputs for n, t in teachers.items()}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result = fit(method, on_device(task, device, args.pinned), cfg.train, seed=cfg.seed,
                     ctx=DistContext(device=device), teacher_outputs=outputs,
                     teacher_reps={n: t.reps for n, t in teachers.items()} if method.reads_reps else None,
                     uses_transfer=method.uses_transfer and len(task.splits.get("transfer", [])) > 0,
                     desc=name)
        ends = [h["seconds"] for h in result.history]
        epochs = [b - a for a, b in zip([0.0, *ends], ends, strict=False)]
        out[name] = {"prepare_s": round(t_prep, 3), "epoch_s": round(statistics.median(epochs), 4),
                     "steps": result.steps, "val": result.best_score, "peak_mib": round(peak_memory(device), 1)}
    return out


def _teacher_opts(cfg: RunConfig, args: argparse.Namespace, gpu: bool) -> RunConfig:
    for t in cfg.teachers.values():
        if args.encoder and hasattr(t, "encoder"):
            t.encoder = args.encoder
        if gpu and not args.fp32 and hasattr(t, "bf16"):
            t.bf16 = True
        if args.tiny:
            t.train.epochs, t.train.steps_per_epoch = 1, 3
    return cfg


def cache_build(device: torch.device, args: argparse.Namespace, cache: Path) -> dict[str, Any]:
    """Texts/s of a cold MiniLM cache build over clothing reviews (length-sorted batches, fp16 shards)."""
    from fmtransfer.config import load_config

    task = build_task(load_config(REPO / "configs/reviews/student.yaml",
                                  ["task.subsample=300", "task.labels=30"] if args.tiny else []))
    texts = list(next(iter(task.texts.values())).texts[:args.texts])
    gpu = device.type == "cuda"
    enc = TextEncoderCache(texts, args.encoder or "minilm", cache / f"reviews-{device.type}",
                           bf16=gpu and not args.fp32, device=str(device), batch_size=256 if gpu else 64,
                           max_length=32 if args.tiny else 256)
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    ran = enc.build()
    if gpu:
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    return {"texts": ran, "texts_per_s": round(ran / dt, 1), "peak_mib": round(peak_memory(device), 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", default="cuda,cpu", help="comma-separated, e.g. cuda,cpu or cpu")
    p.add_argument("--tasks", default="movielens,digits")
    p.add_argument("--texts", type=int, default=None, help="reviews for the cache build (5000; --tiny 16)")
    p.add_argument("--epochs", type=int, default=None, help="train.epochs of every run (default: the configs')")
    p.add_argument("--tiny", action="store_true", help="tiny sizes: the whole path in seconds (tests)")
    p.add_argument("--compile", action="store_true", help="torch.compile each method's loss")
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast on cuda")
    p.add_argument("--pinned", action="store_true", help="keep task data in pinned host memory, not on the GPU")
    p.add_argument("--encoder", default=None, help="a local text model folder instead of MiniLM")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--cache-dir", default=None, help="default: a new temp folder (a cold cache)")
    p.add_argument("--out", default=None, help="also write gpu.json and gpu.md here")
    args = p.parse_args(argv)
    args.texts = args.texts or (16 if args.tiny else 5000)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device(d) for d in args.devices.split(",")]
    for d in devices:
        if d.type == "cuda" and not torch.cuda.is_available():
            print("fmtransfer: error: --devices names cuda but no GPU is visible (torch.cuda.is_available() is "
                  "False); run with --devices cpu", file=sys.stderr)
            return 2
    results: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    for d in devices:
        cache = Path(args.cache_dir or tempfile.mkdtemp(prefix=f"gpu-bench-{d.type}-")) / d.type
        res: dict[str, Any] = {t: suite(t, d, args, cache) for t in args.tasks.split(",") if t}
        res["reviews_cache"] = cache_build(d, args, cache)
        if d.type == "cuda":
            res["gpu"] = torch.cuda.get_device_name(d)
        results[str(d)] = res
    cols = list(results)
    lines = [f"| figure | {' | '.join(cols)} |", f"|---|{'---|' * len(cols)}"]
    first = results[cols[0]]
    for task_name in [t for t in args.tasks.split(",") if t]:
        for run in first[task_name]:
            for key, label in (("prepare_s", "teacher preparation s"), ("epoch_s", "s per epoch"),
                               ("peak_mib", "peak memory MiB")):
                vals = " | ".join(str(results[c][task_name][run][key]) for c in cols)
                lines.append(f"| {task_name} {run}: {label} | {vals} |")
    for key, label in (("texts_per_s", "texts/s"), ("peak_mib", "peak memory MiB")):
        lines.append(f"| reviews cache build ({first['reviews_cache']['texts']} texts): {label} | "
                     + " | ".join(str(results[c]["reviews_cache"][key]) for c in cols) + " |")
    table = "\n".join(lines)
    flags = " ".join(f for f, on in (("--tiny", args.tiny), ("--compile", args.compile), ("--fp32", args.fp32),
                                     ("--pinned", args.pinned)) if on)
    print(f"\n{table}\n\ndevices {', '.join(cols)} {flags}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"CPU threads; total {time.perf_counter() - t0:.0f} s", flush=True)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu.json").write_text(json.dumps(results, indent=2) + "\n")
        (Path(args.out) / "gpu.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
