"""Teacher preparation against a bare teacher forward (issue 18): throughput ratios measured side by side.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/prep_speed.py --threads 1          # about 4 minutes, 1 thread
    .venv/bin/python benchmarks/prep_speed.py --texts 64 --rows 64 --images 32 --rounds 1   # a quick look

Two stages of preparation per foundation model, each timed in the same process, in interleaved rounds
(bare, preparation, bare, ...), at the same batch size, under inference mode, the median reported:
- encode: the frozen backbone's feature-cache build (a fresh cache each round: length sorting, forward
  hooks, pooling, fp16 shards with CRC receipts, atomic writes) against a bare forward over the same inputs
  in the same batches (tokenising included on the text side, as the cache must tokenise too);
- outputs: the prepared teacher's artifact pass (`teachers.outputs.outputs_and_reps`: outputs and reps.npy
  from one forward, in 128-row batches, written to .npy) against a bare `model(batch)` loop at the same batch
  size; beside it the pass as it was before issue 18 (two passes, outputs then reps, at eval_batch_size).
Text: MiniLM-L6 on clothing reviews (the `fm` probe's cache; the `fm_ft` fine-tuned teacher's outputs, whose
forward runs MiniLM live). Image: EfficientNet-Lite0 on MNIST-5k digits (the `fm` probe's cache of block
10's map; outputs of the `wide` CNN teacher, the pass that ran as one 9,797-row batch twice). Weights are
the recipes' initial ones: throughput does not depend on training. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import numpy as np
import torch

from fmtransfer.cache.text import TextEncoderCache
from fmtransfer.config import load_config
from fmtransfer.data.base import TaskData
from fmtransfer.registry import RECIPES
from fmtransfer.runner import build_task
from fmtransfer.teachers.image_fm import Preprocess, cached_backbone_outputs, load_backbone, run_blocks
from fmtransfer.teachers.outputs import outputs_and_reps, prepare_batch_size
from fmtransfer.train.loop import predict_rows

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def head_task(task: TaskData, n: int) -> TaskData:
    """The task's first `n` rows (features, targets, splits cut to them); text views stay whole."""
    n = min(n, task.num_rows)
    splits = {k: v[v < n] for k, v in task.splits.items()}
    return dataclasses.replace(task, features={k: v[:n] for k, v in task.features.items()}, y=task.y[:n],
                               splits=splits, fingerprint="")


def interleaved(fns: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median seconds of each function, called in turn `rounds` times (after one untimed warm-up each), and
    the fastest round of each (`<name>:min`: the least disturbed by other jobs on a shared machine)."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()} | {f"{k}:min": min(v) for k, v in times.items()}


def text_encode(texts: list[str], rounds: int) -> dict[str, float]:
    root = Path(tempfile.mkdtemp(prefix="prep-speed-"))
    probe = TextEncoderCache(texts, "minilm", root / "probe")
    probe._load()
    tok, model, bs = probe._tok, probe._model, probe.batch_size
    order = np.argsort([len(t) for t in texts], kind="stable")[::-1]

    @torch.inference_mode()
    def bare() -> None:
        for s in range(0, len(texts), bs):
            enc = tok([texts[k] for k in order[s:s + bs]], padding=True, truncation=True, max_length=256,
                      return_tensors="pt")
            model(**enc)

    def build() -> None:
        d = root / "c"
        shutil.rmtree(d, ignore_errors=True)
        cache = TextEncoderCache(texts, "minilm", d)
        cache._tok, cache._model, cache._paths = tok, model, probe._paths  # the same loaded encoder
        assert cache.build() == len(texts)

    out = interleaved({"bare": bare, "prep": build}, rounds)
    shutil.rmtree(root, ignore_errors=True)
    return {k: len(texts) / v for k, v in out.items()}


def image_encode(task: TaskData, cfg, rounds: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    root = Path(tempfile.mkdtemp(prefix="prep-speed-"))
    net, pre = load_backbone(cfg), Preprocess(cfg.resolution, cfg.normalize)
    stop, bs = cfg.tap + 1, cfg.feature_batch_size
    images = task.features[cfg.feature]
    fmt = torch.channels_last if len(images) >= 1024 else torch.contiguous_format  # as the cache build does

    @torch.inference_mode()
    def bare() -> None:
        n = net.to(memory_format=fmt)
        for s in range(0, len(images), bs):
            run_blocks(n, pre(images[s:s + bs]).contiguous(memory_format=fmt), 0, stop)

    def build() -> None:
        d = root / "c"
        shutil.rmtree(d, ignore_errors=True)
        cached_backbone_outputs(cfg, task, d, stop, False, CPU)

    out = interleaved({"bare": bare, "prep": build}, rounds)
    shutil.rmtree(root, ignore_errors=True)
    return {k: len(images) / v for k, v in out.items()}


def outputs_pass(task: TaskData, tcfg, rounds: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Rows/s of a bare forward, of preparation's artifact pass, and of the pass before issue 18."""
    root = Path(tempfile.mkdtemp(prefix="prep-speed-"))
    torch.manual_seed(0)
    model = RECIPES.get(tcfg.recipe).impl.build(tcfg, task, root, CPU).model.eval()
    rows = torch.arange(task.num_rows)
    bs = prepare_batch_size(tcfg.train.eval_batch_size)

    @torch.inference_mode()
    def bare() -> None:
        model.eval()  # forget embeddings a fine-tuned text model kept from the previous round
        for s in range(0, len(rows), bs):
            model(task.gather(rows[s:s + bs]))

    def prep() -> None:
        model.eval()
        outputs, reps = outputs_and_reps(model, model, task, rows, bs, CPU)
        np.save(root / "outputs.npy", outputs)
        np.save(root / "reps.npy", reps)

    def before() -> None:  # what teachers/base.py did until issue 18
        model.eval()
        outputs = predict_rows(model, task, rows, tcfg.train.eval_batch_size, CPU)
        reps = predict_rows(model.body, task, rows, tcfg.train.eval_batch_size, CPU)
        np.save(root / "outputs.npy", outputs.numpy().astype(np.float32))
        np.save(root / "reps.npy", reps.numpy().astype(np.float16))

    out = interleaved({"bare": bare, "prep": prep, "before": before}, rounds)
    shutil.rmtree(root, ignore_errors=True)
    return {k: len(rows) / v for k, v in out.items()} | {"batch": bs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--texts", type=int, default=1000, help="reviews encoded by the text cache stage (1000)")
    p.add_argument("--rows", type=int, default=1000, help="review rows of the fine-tuned teacher's pass (1000)")
    p.add_argument("--images", type=int, default=2000, help="digits rows of both image stages (2000)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per side (3, after a warm-up)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    p.add_argument("--only", choices=["text", "image"], default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows: list[tuple[str, str, dict[str, float]]] = []
    t0 = time.perf_counter()
    if args.only in (None, "text"):
        cfg = load_config(REPO / "configs/reviews/student.yaml", [])
        task = build_task(cfg)
        view = next(iter(task.texts.values()))
        rows.append(("MiniLM on reviews", f"encode {args.texts} texts (cache build), texts/s",
                     text_encode(list(view.texts[:args.texts]), args.rounds)))
        rows.append(("MiniLM on reviews", f"outputs of `fm_ft` for {args.rows} rows, rows/s",
                     outputs_pass(head_task(task, args.rows), cfg.teachers["fm_ft"], args.rounds)))
    if args.only in (None, "image"):
        cfg = load_config(REPO / "configs/digits/student.yaml", [])
        task = head_task(build_task(cfg), args.images)
        rows.append(("EfficientNet-Lite0 on digits", f"encode {task.num_rows} images to block 10 (cache build), "
                     "images/s", image_encode(task, cfg.teachers["fm"], args.rounds)))
        rows.append(("EfficientNet-Lite0 on digits", f"outputs of `wide` CNN for {task.num_rows} rows, rows/s",
                     outputs_pass(task, cfg.teachers["wide"], args.rounds)))
    print("\n| FM | stage | bare forward | preparation | ratio (fastest rounds) | before issue 18 (ratio) |")
    print("|---|---|---|---|---|---|")
    for fm, stage, r in rows:
        before = f"{r['before']:.0f} ({r['before'] / r['bare']:.2f})" if "before" in r else "n/a"
        bs = f", batch {r['batch']:.0f}" if "batch" in r else ""
        ratio, fastest = r["prep"] / r["bare"], r["prep:min"] / r["bare:min"]
        print(f"| {fm} | {stage}{bs} | {r['bare']:.0f} | {r['prep']:.0f} | **{ratio:.2f}** ({fastest:.2f}) "
              f"| {before} |")
    print(f"\ntorch threads {torch.get_num_threads()}, rounds {args.rounds}, total {time.perf_counter() - t0:.0f} s, "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
