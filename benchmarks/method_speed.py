"""One training epoch of each method, side by side in one process (issue 18): ratios to `student` and `kd`.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/method_speed.py --task movielens --cache-dir runs/ms-cache
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/method_speed.py --task digits --cache-dir runs/ms-cache
    # tiny (seconds, for a look or a loaded machine): fewer rows, one-epoch teachers, 20 steps per epoch
    .venv/bin/python benchmarks/method_speed.py --task movielens --set task.subsample=3000 --teacher-epochs 1 \
        --steps 20 --rounds 1
    # where the time goes in one method's steps (torch.profiler, top ops by self CPU time)
    .venv/bin/python benchmarks/method_speed.py --task movielens --methods diverse_distill --profile diverse_distill

Each method is `configs/<task>/<method>.yaml` with `train.epochs=1` (plus `--set` overrides), trained by the
library's own loop (`train.loop.fit`: batches, teacher outputs read from the cache, the step, the epoch's
validation pass) on the same prepared teachers. Teachers are prepared first (not timed) into --cache-dir.
Rounds are interleaved (every method once, then again) so machine load falls on all methods alike; the
median epoch of each is reported, with milliseconds per step, both ratios, and the ratio of the process's
CPU seconds (1 thread: less moved by other jobs than wall time on a shared machine). `--teacher-epochs` only
shortens teacher preparation (the teachers' quality does not change a step's cost).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch

from fmtransfer.config import RunConfig, load_config
from fmtransfer.methods.base import build_method
from fmtransfer.registry import METHODS
from fmtransfer.runner import JsonlLog, build_context, build_task, prepare_teachers
from fmtransfer.train.distributed import DistContext
from fmtransfer.train.loop import fit

CPU = torch.device("cpu")

REPO = Path(__file__).resolve().parents[1]
METHOD_NAMES = ["student", "kd", "fitnet", "multi_kd", "ca_mkd", "diverse_distill", "talking"]


def configs(task: str, methods: list[str], overrides: list[str], teacher_epochs: int | None,
            steps: int | None) -> dict[str, RunConfig]:
    out = {}
    for m in methods:
        path = REPO / "configs" / task / f"{m}.yaml"
        if not path.exists():
            continue
        sets = ["train.epochs=1", *([f"train.steps_per_epoch={steps}"] if steps else []), *overrides]
        cfg = load_config(path, sets)
        if teacher_epochs is not None:
            cfg = load_config(path, sets + [f"teachers.{n}.train.epochs={teacher_epochs}" for n in cfg.teachers])
        out[m] = cfg
    return out


def method_for(cfg: RunConfig, task, teachers):  # type: ignore[no-untyped-def]
    """The method as `fmtransfer run` builds it (same seeds), with the teacher arrays its fit() reads."""
    entry = METHODS.get(cfg.method.name)
    needed = entry.impl.required_teachers(cfg.method, list(cfg.teachers))
    torch.manual_seed(cfg.seed)
    method = build_method(cfg.method, task, {n: teachers[n] for n in needed}, build_context(cfg, task, CPU))
    kwargs = {"teacher_outputs": {n: teachers[n].outputs for n in needed},
              "teacher_reps": {n: teachers[n].reps for n in needed} if method.reads_reps else None,
              "uses_transfer": method.uses_transfer and len(task.splits.get("transfer", [])) > 0}
    return method, kwargs


def epoch(cfg: RunConfig, task, teachers) -> tuple[float, float, int]:  # type: ignore[no-untyped-def]
    """(wall seconds, CPU seconds of this process, steps) of one epoch."""
    method, kwargs = method_for(cfg, task, teachers)
    torch.manual_seed(cfg.seed)
    t0, c0 = time.perf_counter(), time.process_time()
    result = fit(method, task, cfg.train, seed=cfg.seed, ctx=DistContext(), desc=cfg.method.name, **kwargs)
    return time.perf_counter() - t0, time.process_time() - c0, result.steps


def profile(cfg: RunConfig, task, teachers, rows: int = 25) -> str:  # type: ignore[no-untyped-def]
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    method, kwargs = method_for(cfg, task, teachers)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fit(method, task, cfg.train, seed=cfg.seed, ctx=DistContext(), desc=cfg.method.name, **kwargs)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", default="movielens", choices=["movielens", "reviews", "digits"])
    p.add_argument("--methods", default=",".join(METHOD_NAMES), help="comma-separated (default: all with a config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every method's config, e.g. task.subsample=3000 (repeatable)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="train every teacher this many epochs")
    p.add_argument("--steps", type=int, default=None, help="train.steps_per_epoch for every method")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default=None, help="prepared teachers (default: a new temp folder)")
    p.add_argument("--profile", default=None, metavar="METHOD", help="print torch.profiler's top ops of one epoch")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = args.cache_dir or tempfile.mkdtemp(prefix="method-speed-")
    sets = [f"cache_dir={cache}", f"train.num_threads={args.threads}", *args.overrides]
    cfgs = configs(args.task, args.methods.split(","), sets, args.teacher_epochs, args.steps)
    first = next(iter(cfgs.values()))
    task = build_task(first)
    t0 = time.perf_counter()
    teachers = {}
    for cfg in cfgs.values():
        needed = METHODS.get(cfg.method.name).impl.required_teachers(cfg.method, list(cfg.teachers))
        teachers.update(prepare_teachers(cfg, task, [n for n in needed if n not in teachers], DistContext(),
                                         JsonlLog(None)))
    print(f"teachers {', '.join(teachers)} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.profile:
        print(profile(cfgs[args.profile], task, teachers))
        return 0
    for cfg in cfgs.values():  # warm-up: first-call costs (allocators, kernels) are not any method's
        epoch(cfg, task, teachers)
    times: dict[str, list[float]] = {m: [] for m in cfgs}
    cpu: dict[str, list[float]] = {m: [] for m in cfgs}
    steps: dict[str, int] = {}
    for _ in range(args.rounds):
        for m, cfg in cfgs.items():
            t, c, steps[m] = epoch(cfg, task, teachers)
            times[m].append(t)
            cpu[m].append(c)
    med = {m: statistics.median(v) for m, v in times.items()}
    med_cpu = {m: statistics.median(v) for m, v in cpu.items()}
    per_step = {m: 1000 * med[m] / max(steps[m], 1) for m in med}
    print(f"\n{args.task}: one epoch per method, median of {args.rounds} interleaved rounds, "
          f"{args.threads} thread(s), load average {os.getloadavg()[0]:.1f}\n")
    print("| method | steps | epoch s | ms/step | epoch / student | epoch / kd | step / kd | CPU s: epoch / kd |")
    print("|---|---|---|---|---|---|---|---|")
    for m in med:
        r_s = f"{med[m] / med['student']:.2f}" if "student" in med else "n/a"
        r_k = f"{med[m] / med['kd']:.2f}" if "kd" in med else "n/a"
        r_ks = f"**{per_step[m] / per_step['kd']:.2f}**" if "kd" in med else "n/a"
        r_c = f"{med_cpu[m]:.2f} / {med_cpu[m] / med_cpu['kd']:.2f}" if "kd" in med else f"{med_cpu[m]:.2f}"
        print(f"| {m} | {steps[m]} | {med[m]:.2f} | {per_step[m]:.2f} | {r_s} | {r_k} | {r_ks} | {r_c} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
