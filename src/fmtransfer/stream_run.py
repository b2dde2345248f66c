"""`fmtransfer run` / `fmtransfer cache` on a streamed task (`table_stream`): bounded memory, any rank count.

    torchrun --standalone --nproc_per_node 2 -m fmtransfer cache CONFIG     # teacher pass, sharded by rank
    python -m fmtransfer run CONFIG --out DIR                               # reads those shards on 1 rank

A teacher (recipe `supervised`: any registered model, e.g. a wide `ngram` or `mlrec`) is trained on
rank 0 over the labeled rows, streamed; its weights are stored once. The teacher pass then runs on
every rank: rank r predicts the output shards k % world == r and writes them to a FeatureStore under
the teacher's artifact folder. Shards are row ranges, so a run on any number of ranks reads them.
The student's loop is the shared `fit`, with the task's own batch plan and streaming validation.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fmtransfer.cache.rows import ShardedRows
from fmtransfer.cache.store import FeatureStore, FieldSpec
from fmtransfer.config import RunConfig, TeacherConfig, to_dict
from fmtransfer.data.stream import StreamTask, open_stream_task
from fmtransfer.errors import ConfigError
from fmtransfer.integrity import publish
from fmtransfer.methods.base import BuildContext, build_method
from fmtransfer.registry import METHODS, RECIPES
from fmtransfer.runfiles import DEBUG_DUMP_ENV, format_summary, start_run_folder, write_run_json
from fmtransfer.train.distributed import DistContext
from fmtransfer.train.loggers import JsonlLog
from fmtransfer.train.loop import fit
from fmtransfer.utils import atomic_write_json, count_params, stable_hash

STREAM_TEACHER_VERSION = 1


@dataclass
class StreamTeacher:
    """A prepared teacher of a streamed task: outputs read by row from its sharded store."""

    name: str
    kind: str
    recipe: str
    fingerprint: str
    outputs: ShardedRows
    params: int
    metrics: dict[str, Any]
    path: Path
    seconds: float = 0.0
    pass_seconds: float = 0.0
    rows_computed: int = 0
    from_cache: bool = True
    reps: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float16))
    """No representations are stored for a streamed task (methods that read them are refused)."""

    def summary(self) -> dict[str, Any]:
        return {"kind": self.kind, "recipe": self.recipe, "fingerprint": self.fingerprint, "params": self.params,
                **self.metrics, "seconds": round(self.seconds, 3), "from_cache": self.from_cache}


def open_task(cfg: RunConfig, ctx: DistContext) -> StreamTask:
    task, _ = open_stream_task(cfg.task, cfg.cache_dir, ctx.rank, ctx.world, ctx.barrier)  # type: ignore[arg-type]
    return task


def _teacher_model(tcfg: TeacherConfig, task: StreamTask, cache_dir: Path, device: torch.device) -> torch.nn.Module:
    return RECIPES.get(tcfg.recipe).impl.build(tcfg, task.schema(), cache_dir, device).model


def prepare_stream_teacher(name: str, tcfg: TeacherConfig, task: StreamTask, cache_dir: str | Path, *,
                           seed: int, ctx: DistContext, log: Any = None) -> StreamTeacher:
    """Train (rank 0, once) and run (every rank, its shards) one teacher over the streamed task."""
    if tcfg.recipe != "supervised" or tcfg.distill_from is not None:
        raise ConfigError(f"teachers.{name}: a streamed task takes `supervised` teachers without distill_from "
                          f"(got recipe {tcfg.recipe!r}); a foundation teacher's pass is costed in docs/scale.md")
    cache_dir = Path(cache_dir)
    recipe = RECIPES.get(tcfg.recipe).impl
    fp = stable_hash([STREAM_TEACHER_VERSION, name, to_dict(tcfg), task.fingerprint, seed,
                      recipe.fingerprint_extra(tcfg)])
    path = cache_dir / "teachers" / f"{name}-{fp}"
    meta_path = path / "meta.json"
    trained_now = False
    if ctx.is_main and not meta_path.exists():
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        model = _teacher_model(tcfg, task, cache_dir, ctx.device)
        method = recipe.method(tcfg, model, task.schema())
        result = fit(method, task, tcfg.train, seed=seed, ctx=DistContext(device=ctx.device), uses_transfer=False,
                     desc=f"teacher {name}", log=log)
        method.load_state_dict(result.best_state)
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(path / "weights.safetensors"))
        atomic_write_json(meta_path, {"version": STREAM_TEACHER_VERSION, "name": name, "fingerprint": fp,
                                      "config": to_dict(tcfg), "task_fingerprint": task.fingerprint, "seed": seed,
                                      "params": count_params(model), "best_epoch": result.best_epoch,
                                      "seconds": round(time.perf_counter() - t0, 3)})
        trained_now = True
    ctx.barrier()
    meta = json.loads(meta_path.read_text())
    model = _teacher_model(tcfg, task, cache_dir, ctx.device)
    model.load_state_dict(load_file(str(path / "weights.safetensors")))
    model.eval()
    shape = task.output_shape()
    store = FeatureStore(path, "outputs", {"outputs": FieldSpec(shape, "float32")}, task.num_rows,
                         shard_rows=task.store.shard_rows)
    t0 = time.perf_counter()
    computed = 0
    if not store.is_complete():
        bs = tcfg.train.eval_batch_size

        @torch.no_grad()
        def produce(start: int, end: int) -> dict[str, np.ndarray]:
            outs = []
            for s in range(start, end, bs):
                batch = task.gather(torch.arange(s, min(s + bs, end)))
                outs.append(model({k: v.to(ctx.device) for k, v in batch.items()}).float().cpu())
            return {"outputs": torch.cat(outs).numpy()}

        computed = store.build(produce, rank=ctx.rank, world=ctx.world, desc=f"teacher pass {name}",
                               barrier=ctx.barrier)
    pass_seconds = time.perf_counter() - t0
    if "metrics" not in meta:  # scored once, by a streaming pass over its own outputs
        outputs = ShardedRows(store, "outputs", 2 * task.cfg.buffer_shards)
        metrics = {s: task.score_split(lambda b: outputs[b["row"]], s, 4096, torch.device("cpu"), ctx.rank, ctx.world)
                   for s in ("val", "test")}
        metrics["ood"] = {s: task.score_split(lambda b: outputs[b["row"]], f"ood/{s}", 4096, torch.device("cpu"),
                                              ctx.rank, ctx.world) for s in task.ood_suites}
        if ctx.is_main:
            atomic_write_json(meta_path, meta | {"metrics": metrics})
        ctx.barrier()
        meta["metrics"] = metrics
    return StreamTeacher(name=name, kind=tcfg.kind, recipe=tcfg.recipe, fingerprint=fp,
                         outputs=ShardedRows(store, "outputs", 2 * task.cfg.buffer_shards), params=meta["params"],
                         metrics=meta["metrics"], path=path, seconds=meta["seconds"] if trained_now else 0.0,
                         pass_seconds=pass_seconds, rows_computed=computed, from_cache=not trained_now and not computed)


def _teachers(cfg: RunConfig, task: StreamTask, names: list[str], ctx: DistContext,
              log: Any = None) -> dict[str, StreamTeacher]:
    out = {}
    for n in names:
        tcfg = cfg.teachers[n]
        seed = tcfg.seed if tcfg.seed is not None else cfg.seed
        out[n] = prepare_stream_teacher(n, tcfg, task, cfg.cache_dir, seed=seed, ctx=ctx,
                                        log=log.phase(f"teacher:{n}") if log is not None else None)
    return out


def cache_stream(cfg: RunConfig, names: list[str] | None, ctx: DistContext) -> dict[str, StreamTeacher]:
    """`fmtransfer cache` on a streamed task: encode the shards, train the teachers, run their passes."""
    task = open_task(cfg, ctx)
    out = _teachers(cfg, task, names or list(cfg.teachers), ctx)
    if ctx.is_main:
        for name, t in out.items():
            print(f"{name}: {t.recipe} {t.fingerprint}; rows computed here {t.rows_computed} "
                  f"(world {ctx.world}), outputs for {task.num_rows} rows in {t.path}", flush=True)
    return out


def run_stream(cfg: RunConfig, out: Path, resume: bool, ctx: DistContext, quiet: bool) -> dict[str, Any]:
    """One experiment on a streamed task; writes the same files as a run on an in-memory task."""
    config_hash = start_run_folder(cfg, out, ctx.is_main)
    log = JsonlLog(out / "log.jsonl" if ctx.is_main else None)
    t0 = time.perf_counter()
    task = open_task(cfg, ctx)
    entry = METHODS.get(cfg.method.name)
    needed = entry.impl.required_teachers(cfg.method, list(cfg.teachers))
    teachers = _teachers(cfg, task, needed, ctx, log)
    t_cache = time.perf_counter() - t0
    torch.manual_seed(cfg.seed)
    schema = task.schema()
    # output-level methods read nothing of the context; planned steps are left out (a stream plans its own)
    build_ctx = BuildContext(cache_dir=Path(cfg.cache_dir), seed=cfg.seed, device=ctx.device, small=cfg.student)
    method = None if entry.impl.reads_reps else build_method(cfg.method, schema, teachers, build_ctx)
    if method is None or method.own_model:
        raise ConfigError(f"method {cfg.method.name!r} reads teacher representations or ships its own model; "
                          "a streamed task runs output-level methods (e.g. student, kd)")
    torch.manual_seed(cfg.seed)
    t1 = time.perf_counter()
    result = fit(method, task, cfg.train, seed=cfg.seed, ctx=ctx,
                 teacher_outputs={n: teachers[n].outputs for n in needed},  # type: ignore[misc]
                 uses_transfer=method.uses_transfer, ckpt_path=out / "checkpoint.pt", resume=resume,
                 config_hash=config_hash, desc=cfg.method.name, log=log.phase("train"))
    t_train = time.perf_counter() - t1
    method.load_state_dict(result.best_state)
    method.eval()
    t2 = time.perf_counter()
    bs = cfg.train.eval_batch_size
    best = {s: task.score_split(method.predict, s, bs, ctx.device, ctx.rank, ctx.world) for s in ("val", "test")}
    best["ood"] = {s: task.score_split(method.predict, f"ood/{s}", bs, ctx.device, ctx.rank, ctx.world)
                   for s in task.ood_suites}
    m = task.metric
    metrics = {
        "task": task.name, "method": cfg.method.name, "seed": cfg.seed, "metric": m,
        "higher_is_better": task.higher_is_better, "test": best["test"], "val": best["val"], "ood": best["ood"],
        "ood_mean": None, "best_epoch": result.best_epoch, "epochs_run": len(result.history), "steps": result.steps,
        "gap_recovered": None, "teachers": {n: t.summary() for n, t in teachers.items()},
        "params": {"student": count_params(method.student), "teachers": {n: t.params for n, t in teachers.items()}},
        "teacher_forward": {"run": sum(t.rows_computed for t in teachers.values()), "encoder_texts": 0,
                            "skipped": 0, "cached": result.teacher_rows_read * ctx.world},
        "seconds": {"cache": round(t_cache, 3), "train": round(t_train, 3),
                    "eval": round(time.perf_counter() - t2, 3)},
        "rows": task.num_rows, "streamed": True, "world_size": ctx.world, "config_hash": config_hash,
    }
    if ctx.is_main:
        state = {k[len("student."):]: v.contiguous() for k, v in result.best_state.items() if k.startswith("student.")}
        st_meta = {"task": task.name, "method": cfg.method.name, "model": cfg.student.name}
        publish(out / "student.safetensors", lambda tmp: save_file(state, str(tmp), metadata=st_meta))
        write_run_json(out / "metrics.json", metrics)
        log({"phase": "done", "test": best["test"], "seconds": metrics["seconds"]})
        if not quiet:
            print(format_summary(metrics), flush=True)
    dump = os.environ.get(DEBUG_DUMP_ENV)
    if dump:
        Path(dump).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in result.last_state.items()}, f"{dump}/rank{ctx.rank}.safetensors")
    return metrics
