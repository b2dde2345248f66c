"""LEVI vs full fine-tuning, side by side in one process (issue 6's two speed targets).

    TQDM_DISABLE=1 nice -n 5 .venv/bin/python benchmarks/levi_speed.py            # ~3 min on 2 busy cores
    TQDM_DISABLE=1 .venv/bin/python benchmarks/levi_speed.py --quick               # smoke run, ~45 s
                                                                                   # once the models are loaded

For reviews (configs/reviews/{levi,finetune}.yaml) and digits (configs/digits/{levi,finetune}.yaml), with
torch.set_num_threads(1):

1. Training: seconds per optimizer step of each method at its config's own batch size, the step being what
   train/loop.py's `fit` does per batch (gather the batch, the method's forward = its losses, backward,
   gradient clip, AdamW step). Both models come from the methods' own `build_model` hooks and are wrapped
   in the registered `Method` classes. LEVI reads its frozen features from the cache (`runs/levi-cache`,
   as in docs/levi.md; if the backbone had to run to fill it, the script stops after that build instead
   of timing); `finetune` runs the backbone live (its `build_model` reads no feature cache;
   `runs/cache` as in docs/finetuning.md).
   After warm-up steps, blocks of steps alternate (AB, BA, AB ...) for `--reps` repetitions; the per-step
   figure is the median over blocks. Seconds per epoch = step time x that config's `steps_per_epoch`
   (validation excluded). The ratio finetune / LEVI is given per epoch (each config's own epoch) and per
   training example (step time / batch size), since the two budgets differ in batch and steps.
2. Inference: ms per example of LEVI's live path (`LiveTaps` to the deepest tap + `model.live`, the code
   path of `measure_latency` in models/fm_live.py) vs the backbone's own full forward (`LiveTaps(full=True)`),
   on the same first test rows in the same batches (the config's `latency_batch_size`), tokenisation /
   preprocessing inside both, alternating the order each repetition (AB, BA, ...); median and best.
Prints a markdown table and the verdicts (>= 3x per epoch, <= 1.2x inference).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import torch

from fmtransfer.config import RunConfig, load_config, to_dict
from fmtransfer.data.base import TaskData
from fmtransfer.methods.base import build_method
from fmtransfer.models.fm_live import LiveTaps
from fmtransfer.registry import load_builtins
from fmtransfer.runner import build_context, build_task
from fmtransfer.train.batches import BatchPlan
from fmtransfer.train.loop import make_batch

REPO = Path(__file__).resolve().parents[1]
CACHE = {"levi": "runs/levi-cache", "finetune": "runs/cache"}


@dataclass
class Trainer:
    """One method ready to take optimizer steps exactly as the training loop takes them."""

    name: str
    cfg: RunConfig
    method: torch.nn.Module
    opt: torch.optim.Optimizer
    params: list[torch.Tensor]
    batches: list[tuple[torch.Tensor, torch.Tensor]]
    task: TaskData
    cursor: int = 0

    def step(self) -> None:
        rows, labeled = self.batches[self.cursor % len(self.batches)]
        self.cursor += 1
        batch = make_batch(self.task, rows, labeled, {})
        loss = self.method(batch)["loss"].float()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.train.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
        self.opt.step()

    def timed(self, n: int) -> float:
        """Seconds per step over n steps."""
        t0 = time.perf_counter()
        for _ in range(n):
            self.step()
        return (time.perf_counter() - t0) / n


def config(task: str, method: str) -> RunConfig:
    return load_config(REPO / "configs" / task / f"{method}.yaml",
                       [f"cache_dir={REPO / CACHE[method]}", "train.num_threads=1"])


def trainer(name: str, cfg: RunConfig, task: TaskData, device: torch.device) -> Trainer:
    torch.manual_seed(cfg.seed)
    method = build_method(cfg.method, task, {}, build_context(cfg, task, device))
    method.train()
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    plan = BatchPlan(task.splits["train"], None, batch_size=cfg.train.batch_size,
                     labeled_batch_size=cfg.train.labeled_batch_size, steps_per_epoch=cfg.train.steps_per_epoch,
                     seed=cfg.seed, rank=0, world=1)
    return Trainer(name, cfg, method, opt, params, plan.epoch(0), task)


def interleave(fns: dict[str, Any], reps: int) -> dict[str, list[float]]:
    """Call each fn once per repetition, the order reversed every other repetition (AB, BA, ...)."""
    out: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(reps):
        for k in (names if r % 2 == 0 else names[::-1]):
            out[k].append(fns[k]())
    return out


def bench_task(task_name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    cfg_l, cfg_f = config(task_name, "levi"), config(task_name, "finetune")
    t0 = time.perf_counter()
    task = build_task(cfg_l)
    task_f = task if to_dict(cfg_l.task) == to_dict(cfg_f.task) else build_task(cfg_f)
    lev = trainer("levi", cfg_l, task, device)
    info = lev.method.student.fm_info
    if info.get("encoder_forwards"):
        raise SystemExit(f"{task_name}: LEVI's features were not all cached in {CACHE['levi']} "
                         f"({info['encoder_forwards']} backbone forwards ran); run the docs' bench first")
    ft = trainer("finetune", cfg_f, task_f, device)
    print(f"[{task_name}] models built in {time.perf_counter() - t0:.1f} s", flush=True)

    # 1. training steps, interleaved blocks after warm-up
    n_l, n_f = args.levi_steps, args.ft_steps
    lev.timed(args.warmup * 5), ft.timed(args.warmup)
    steps = interleave({"levi": lambda: lev.timed(n_l), "finetune": lambda: ft.timed(n_f)}, args.reps)

    # 2. inference: LEVI's live path vs the backbone's full forward, same rows and batches
    model = lev.method.student
    model.eval()
    mcfg = cfg_l.method
    rows = task.splits["test"][:args.rows]
    bs = mcfg.latency_batch_size
    batches = [task.gather(rows[s:s + bs]) for s in range(0, len(rows), bs)]
    live, full = LiveTaps(mcfg, task, info).to(device), LiveTaps(mcfg, task, info, full=True).to(device)

    @torch.no_grad()
    def run_live() -> float:
        t = time.perf_counter()
        for b in batches:
            model.live(b, live(b))
        return 1000 * (time.perf_counter() - t) / len(rows)

    @torch.no_grad()
    def run_full() -> float:
        t = time.perf_counter()
        for b in batches:
            full(b)
        return 1000 * (time.perf_counter() - t) / len(rows)

    run_live(), run_full()  # warm-up
    infer = interleave({"levi": run_live, "backbone": run_full}, args.infer_reps)
    return {"task": task_name, "steps": steps, "infer": infer, "rows": len(rows), "infer_bs": bs,
            "cfg": {"levi": cfg_l.train, "finetune": cfg_f.train}, "block": {"levi": n_l, "finetune": n_f}}


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| task | method | batch | steps/epoch | s/step (median; min-max) | s/epoch | ms/example (train) |",
             "|---|---|---|---|---|---|---|"]
    ratios = ["| task | finetune/LEVI per epoch | finetune/LEVI per example | target >= 3x per epoch |",
              "|---|---|---|---|"]
    infer = ["| task | rows x batch | LEVI live ms/ex (median; best) | backbone ms/ex (median; best) "
             "| ratio median (best/best) | target <= 1.2x |", "|---|---|---|---|---|---|"]
    for r in results:
        ep, ex = {}, {}
        for m in ("levi", "finetune"):
            t, c = r["steps"][m], r["cfg"][m]
            med = statistics.median(t)
            ep[m], ex[m] = med * c.steps_per_epoch, med / c.batch_size
            lines.append(f"| {r['task']} | {m} | {c.batch_size} | {c.steps_per_epoch} | {med:.4f} "
                         f"({min(t):.4f}-{max(t):.4f}) | {ep[m]:.2f} | {1000 * ex[m]:.2f} |")
        pe, px = ep["finetune"] / ep["levi"], ex["finetune"] / ex["levi"]
        ratios.append(f"| {r['task']} | {pe:.1f}x | {px:.1f}x | {'met' if pe >= 3 else 'NOT met'} |")
        lv, bb = r["infer"]["levi"], r["infer"]["backbone"]
        rm = statistics.median(lv) / statistics.median(bb)
        infer.append(f"| {r['task']} | {r['rows']} x {r['infer_bs']} | {statistics.median(lv):.2f}; {min(lv):.2f} "
                     f"| {statistics.median(bb):.2f}; {min(bb):.2f} | {rm:.3f} ({min(lv) / min(bb):.3f}) "
                     f"| {'met' if rm <= 1.2 else 'NOT met'} |")
    return "\n".join([*lines, "", *ratios, "", *infer])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["reviews", "digits"])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up, 2 reps of tiny blocks, 32 rows")
    ap.add_argument("--reps", type=int, default=8, help="interleaved training blocks per method")
    ap.add_argument("--levi-steps", type=int, default=25, help="LEVI steps per block")
    ap.add_argument("--ft-steps", type=int, default=4, help="finetune steps per block")
    ap.add_argument("--warmup", type=int, default=2, help="finetune warm-up steps (LEVI: 5x as many)")
    ap.add_argument("--rows", type=int, default=128, help="test rows for inference")
    ap.add_argument("--infer-reps", type=int, default=8, help="interleaved inference passes per path")
    args = ap.parse_args()
    if args.quick:
        args.reps, args.levi_steps, args.ft_steps, args.warmup, args.rows, args.infer_reps = 2, 3, 1, 1, 32, 2
    torch.set_num_threads(1)
    load_builtins()
    device = torch.device("cpu")
    t0 = time.perf_counter()
    results = [bench_task(t, args, device) for t in args.tasks]
    print(f"\nper block: {args.levi_steps} LEVI steps / {args.ft_steps} finetune steps, {args.reps} blocks each "
          f"(interleaved), torch threads {torch.get_num_threads()}, total {time.perf_counter() - t0:.0f} s\n")
    print(table(results), flush=True)


if __name__ == "__main__":
    main()
