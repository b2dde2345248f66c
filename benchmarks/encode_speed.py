"""Faster frozen-backbone encoding on CPU (issue 18): fp32 against the opt-in bf16 cache build, side by side.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/encode_speed.py --threads 1     # about 4 minutes, 1 thread
    .venv/bin/python benchmarks/encode_speed.py --texts 64 --images 64 --rounds 1  # a quick look

Each side is the real cache build (`TextEncoderCache`, `cached_backbone_outputs`) into a fresh cache, fp32
(the default) then bf16 (`teachers.<name>.bf16: true`), in interleaved rounds in one process; the medians'
ratio is printed with the embedding error against fp32 (cosine similarity per row: min and mean, of what the
cache stores). Also measured, not offered: dynamic int8 quantisation of MiniLM's nn.Linear layers
(`torch.ao.quantization.quantize_dynamic`) on the same texts, to show why bf16 is the option.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch
import torch.nn.functional as F

from fmtransfer.cache.text import TextEncoderCache
from fmtransfer.config import load_config
from fmtransfer.models.hf_text import mean_pool
from fmtransfer.runner import build_task
from fmtransfer.teachers.image_fm import cached_backbone_outputs

REPO = Path(__file__).resolve().parents[1]


def _cos(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    c = F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float())
    return float(c.min()), float(c.mean())


def text_side(texts: list[str], rounds: int) -> dict[str, object]:
    root = Path(tempfile.mkdtemp(prefix="encode-speed-"))
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    got: dict[str, torch.Tensor] = {}
    for r in range(rounds + 1):  # round 0 warms up
        for side in times:
            d = root / side
            shutil.rmtree(d, ignore_errors=True)
            t0 = time.perf_counter()
            cache = TextEncoderCache(texts, "minilm", d, bf16=side == "bf16")
            cache.build()
            if r:
                times[side].append(time.perf_counter() - t0)
            got[side] = cache.get()
    # int8 dynamic quantisation, measured on the bare encoder only (not offered: see the cosine)
    cache = TextEncoderCache(texts, "minilm", root / "q")
    cache._load()
    tok, model = cache._tok, cache._model
    q = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    order = np.argsort([len(t) for t in texts], kind="stable")[::-1]
    out = torch.zeros(len(texts), got["fp32"].shape[1])
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(texts), 64):
            idx = order[s:s + 64]
            enc = tok([texts[k] for k in idx], padding=True, truncation=True, max_length=256, return_tensors="pt")
            out[idx.copy()] = F.normalize(mean_pool(q(**enc).last_hidden_state, enc["attention_mask"]), dim=-1)
    t_int8 = time.perf_counter() - t0
    shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"n": len(texts), "fp32": len(texts) / med["fp32"], "bf16": len(texts) / med["bf16"],
            "cos": _cos(got["fp32"], got["bf16"]), "int8": len(texts) / t_int8, "cos_int8": _cos(got["fp32"], out)}


def image_side(cfg, task, rounds: int) -> dict[str, object]:  # type: ignore[no-untyped-def]
    root = Path(tempfile.mkdtemp(prefix="encode-speed-"))
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    got: dict[str, torch.Tensor] = {}
    stop = cfg.tap + 1
    for r in range(rounds + 1):
        for side in times:
            d = root / side
            shutil.rmtree(d, ignore_errors=True)
            cfg.bf16 = side == "bf16"
            t0 = time.perf_counter()
            got[side], _ = cached_backbone_outputs(cfg, task, d, stop, False, torch.device("cpu"))
            if r:
                times[side].append(time.perf_counter() - t0)
    cfg.bf16 = False
    shutil.rmtree(root, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    n = task.num_rows
    return {"n": n, "fp32": n / med["fp32"], "bf16": n / med["bf16"], "cos": _cos(got["fp32"], got["bf16"]),
            "cos_pooled": _cos(got["fp32"].mean((2, 3)), got["bf16"].mean((2, 3)))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--texts", type=int, default=1000, help="clothing reviews to encode (1000)")
    p.add_argument("--images", type=int, default=1000, help="digits rows to encode (1000)")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds per side, after a warm-up (2)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--only", choices=["text", "image"], default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print("\n| backbone | inputs | fp32 /s | bf16 /s | speed-up | cosine to fp32: min / mean |")
    print("|---|---|---|---|---|---|")
    if args.only in (None, "text"):
        task = build_task(load_config(REPO / "configs/reviews/student.yaml", []))
        r = text_side(list(next(iter(task.texts.values())).texts[:args.texts]), args.rounds)
        print(f"| MiniLM-L6, reviews cache | {r['n']} texts | {r['fp32']:.1f} | {r['bf16']:.1f} | "
              f"**{r['bf16'] / r['fp32']:.2f}x** | {r['cos'][0]:.5f} / {r['cos'][1]:.5f} |")
        print(f"| MiniLM-L6, int8 dynamic (bare loop, not offered) | {r['n']} texts | {r['fp32']:.1f} | "
              f"{r['int8']:.1f} (int8) | {r['int8'] / r['fp32']:.2f}x | "
              f"{r['cos_int8'][0]:.5f} / {r['cos_int8'][1]:.5f} |")
    if args.only in (None, "image"):
        from prep_speed import head_task  # benchmarks/ is on sys.path when this script runs

        cfg = load_config(REPO / "configs/digits/student.yaml", [])
        task = head_task(build_task(cfg), args.images)
        r = image_side(cfg.teachers["fm"], task, args.rounds)
        print(f"| EfficientNet-Lite0 to block 10, digits cache (maps) | {r['n']} images | {r['fp32']:.1f} | "
              f"{r['bf16']:.1f} | **{r['bf16'] / r['fp32']:.2f}x** | {r['cos'][0]:.5f} / {r['cos'][1]:.5f} "
              f"(pooled {r['cos_pooled'][0]:.5f} / {r['cos_pooled'][1]:.5f}) |")
    print(f"\ntorch threads {torch.get_num_threads()}, rounds {args.rounds}, total {time.perf_counter() - t0:.0f} s, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
