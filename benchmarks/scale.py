"""Scale benchmark of a streamed task (table_stream): time and memory per row at 10^5, 10^6, 10^7 rows.

    OMP_NUM_THREADS=1 python benchmarks/scale.py --rows 100000 1000000 10000000 --data /work/fmscale \\
        --json /work/fmscale/scale.json

For each size it writes the generated table (data/scale_table.py) once, then, each in a fresh process
(torchrun for 2 ranks) so that every figure is that phase's own peak RSS:
  cache r=1 / r=2   statistics + encoding + teacher training (rank 0) + teacher pass, into its own cache
  run r=1 / r=2     KD training (configs/table_stream/kd.yaml) reading the cache the OTHER rank count built
It records per phase the wall seconds, rows/s, peak RSS of each rank (VmHWM), and the disk used.
It also times the MiniLM encoder on a small sample of the texts, for the estimate in docs/scale.md.
`--clean` deletes each size's table and caches after it is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "table_stream" / "kd.yaml"


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _overrides(table: Path, cache: Path, extra: list[str]) -> list[str]:
    return [f"task.path={table}", f"cache_dir={cache}", "train.num_threads=1", "train.device=cpu", *extra]


def peak_rss_mib() -> float:
    """This process's own peak resident set (VmHWM). Not getrusage's ru_maxrss: on Linux that survives
    fork + exec, so a child would report its parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _trace_rss(trace: list[tuple[float, float]], every_s: float = 2.0) -> None:
    """Sample this process's resident set every `every_s` seconds (does it plateau or climb with rows read?)."""
    import threading

    t0 = time.perf_counter()

    def loop() -> None:
        while True:
            trace.append((round(time.perf_counter() - t0, 1), round(_rss_mib(), 1)))
            time.sleep(every_s)

    threading.Thread(target=loop, daemon=True).start()


def worker(phase: str, out: str, overrides: list[str]) -> None:
    """One phase in this process (under torchrun: one rank); writes its timings and peak RSS to `out`."""
    import torch

    from fmtransfer.config import load_config
    from fmtransfer.stream_run import _teachers, open_task, run_stream
    from fmtransfer.train.distributed import init_distributed

    torch.set_num_threads(1)
    if phase == "minilm":
        table, sample = overrides
        Path(f"{out}.rank0.json").write_text(json.dumps(minilm_cost(Path(table), int(sample))))
        os._exit(0)
    cfg = load_config(str(CONFIG), overrides)
    ctx = init_distributed("cpu")
    rec: dict[str, object] = {"rank": ctx.rank, "world": ctx.world}
    trace: list[tuple[float, float]] = []
    _trace_rss(trace)
    t0 = time.perf_counter()
    if phase == "cache":
        task = open_task(cfg, ctx)
        rec["encode_s"] = time.perf_counter() - t0
        rec["rows"] = task.num_rows
        teachers = _teachers(cfg, task, list(cfg.teachers), ctx)
        t = next(iter(teachers.values()))
        rec |= {"teacher_train_s": t.seconds, "teacher_pass_s": t.pass_seconds, "teacher_rows_here": t.rows_computed,
                "teacher_val": t.metrics["val"]}
    else:
        m = run_stream(cfg, Path(out).with_suffix(""), False, ctx, quiet=True)
        rec |= {"train_s": m["seconds"]["train"], "steps": m["steps"], "cache_s": m["seconds"]["cache"],
                "eval_s": m["seconds"]["eval"], "test": m["test"], "rows": m["rows"]}
    rec["wall_s"] = time.perf_counter() - t0
    rec["peak_rss_mib"] = peak_rss_mib()
    rec["rss_trace_mib"] = trace[::max(1, len(trace) // 40)]
    Path(f"{out}.rank{ctx.rank}.json").write_text(json.dumps(rec))
    ctx.barrier()
    sys.stdout.flush()
    os._exit(0)  # torch 2.13 CPU + gloo can abort at interpreter exit (train/distributed.py)


def _launch(phase: str, ranks: int, out: Path, overrides: list[str]) -> list[dict[str, object]]:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    args = [str(Path(__file__).resolve()), "--worker", phase, "--worker-out", str(out), "--set", *overrides]
    if ranks == 1 or phase == "minilm":
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{phase} with {ranks} rank(s) failed:\n{proc.stderr[-3000:]}")
    recs = [json.loads(Path(f"{out}.rank{r}.json").read_text()) for r in range(ranks)]
    for r in recs:
        r["process_wall_s"] = time.perf_counter() - t0
    return recs


def minilm_cost(table: Path, sample: int) -> dict[str, float]:
    """Seconds per text of the MiniLM encoder at 1 thread on `sample` texts of the table (batch 64)."""
    import pyarrow.parquet as pq
    import torch

    from fmtransfer.backbones.spec import BackboneSpec
    from fmtransfer.backbones.text import TextBackbone

    torch.set_num_threads(1)
    texts = pq.ParquetFile(table).read_row_group(0, columns=["text"]).column("text").to_pylist()[:sample]
    fm = TextBackbone(BackboneSpec(encoder="minilm", max_length=64))
    fm.net.eval()
    with torch.inference_mode():
        fm.encode(texts[:64])  # warm-up
        t0 = time.perf_counter()
        fm.encode(texts)
    s = time.perf_counter() - t0
    return {"texts": len(texts), "seconds": s, "s_per_text": s / len(texts), "peak_rss_mib": peak_rss_mib()}


def report(path: Path, batch_size: int = 1024) -> str:
    """The growth table of docs/scale.md from the records `--json` appended."""
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    head = ("| rows | prepare rows/s (1 / 2 ranks) | teacher pass rows/s (1 / 2) | KD train rows/s (1 / 2) | "
            "peak RSS MiB, cache (1 / 2) | peak RSS MiB, KD run (1 / 2) | disk bytes/row |")
    lines = [head, "|" + "---:|" * 7]
    for r in recs:
        n = r["rows"]

        def rate(key: str, field: str, rec: dict = r, rows: int = n) -> str:
            return f"{rows / max(x[field] for x in rec[key]):,.0f}"

        def kd(key: str, rec: dict = r) -> str:
            x = rec[key][0]
            return f"{x['steps'] * batch_size / x['train_s']:,.0f}"

        def rss(key: str, rec: dict = r) -> str:
            return f"{max(x['peak_rss_mib'] for x in rec[key]):,.0f}"

        lines.append(f"| {n:,} | {rate('cache_r1', 'encode_s')} / {rate('cache_r2', 'encode_s')} "
                     f"| {rate('cache_r1', 'teacher_pass_s')} / {rate('cache_r2', 'teacher_pass_s')} "
                     f"| {kd('run_r1')} / {kd('run_r2')} | {rss('cache_r1')} / {rss('cache_r2')} "
                     f"| {rss('run_r1')} / {rss('run_r2')} | {r['disk_bytes'] / n:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000, 10_000_000])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    p.add_argument("--data", default="/work/fmscale", help="where tables and caches go (outside the worktree)")
    p.add_argument("--json", default=None, help="append each size's record here (one JSON object per line)")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], help="extra config overrides for every phase")
    p.add_argument("--minilm-sample", type=int, default=256, help="texts timed through MiniLM (0: skip)")
    p.add_argument("--only-generate", action="store_true")
    p.add_argument("--clean", action="store_true", help="delete each size's table and caches when measured")
    p.add_argument("--report", default=None, metavar="JSON", help="print the growth table of a --json file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a.worker, a.worker_out, a.overrides)
    if a.report:
        print(report(Path(a.report)))
        return None
    sys.path.insert(0, str(ROOT / "src"))
    from fmtransfer.data.scale_table import write_table

    data = Path(a.data)
    for n in a.rows:
        table = data / f"table-{n}.parquet"
        t0 = time.perf_counter()
        if not table.exists():
            write_table(table, n)
        rec: dict[str, object] = {"rows": n, "generate_s": time.perf_counter() - t0,
                                  "table_bytes": table.stat().st_size}
        if a.only_generate:
            print(json.dumps(rec), flush=True)
            continue
        work = data / f"bench-{n}"
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        for r in a.ranks:
            cache = work / f"cache-r{r}"
            recs = _launch("cache", r, work / f"cache-r{r}", _overrides(table, cache, a.overrides))
            rec[f"cache_r{r}"] = recs
            rec[f"cache_r{r}_bytes"] = _du(cache)
            print(f"rows {n} cache ranks {r}: {json.dumps(recs)}", flush=True)
        for r in a.ranks:  # the run reads the cache that the other rank count built
            other = next((x for x in a.ranks if x != r), r)
            recs = _launch("run", r, work / f"run-r{r}", _overrides(table, work / f"cache-r{other}", a.overrides))
            rec[f"run_r{r}"] = recs
            rec[f"run_r{r}_reads_cache_of"] = other
            print(f"rows {n} run ranks {r}: {json.dumps(recs)}", flush=True)
        if a.minilm_sample:
            rec["minilm"] = _launch("minilm", 1, work / "minilm", [str(table), str(a.minilm_sample)])[0]
        rec["disk_bytes"] = _du(work) + table.stat().st_size
        print(json.dumps(rec), flush=True)
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if a.clean:
            shutil.rmtree(work, ignore_errors=True)
            table.unlink()


if __name__ == "__main__":
    main()
