"""`fmtransfer run`: one experiment from config to metrics.json, the same under python and torchrun.

DIR/config.yaml (resolved), DIR/log.jsonl, DIR/checkpoint.pt (every epoch), DIR/student.safetensors
(the student alone, best validation epoch), DIR/preprocessing.json (the task's fitted encoders, where it
records them) and DIR/metrics.json (written last: its presence means the run finished).

The module is runner.py, not run.py: a submodule named `run`, once imported, would replace the package's
`fmtransfer.run` function (the Python API's `ft.run(...)`).
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from fmtransfer.config import RunConfig, to_dict
from fmtransfer.data.base import TaskData
from fmtransfer.errors import ConfigError
from fmtransfer.evaluate import gap_recovered
from fmtransfer.integrity import publish
from fmtransfer.methods.base import BuildContext, build_method
from fmtransfer.registry import METHODS, TASKS
from fmtransfer.runfiles import DEBUG_DUMP_ENV, format_summary, read_metrics, start_run_folder, write_run_json
from fmtransfer.serving.manifest import PREPROCESSING_NAME
from fmtransfer.teachers.base import PreparedTeacher, find_prepared, prepare_teacher
from fmtransfer.train.distributed import DistContext, init_distributed, shutdown
from fmtransfer.train.loggers import EpochLog, JsonlLog
from fmtransfer.train.loop import fit, planned_steps, predict_rows
from fmtransfer.utils import apply_num_threads, atomic_write_json, count_params, stable_hash


def build_task(cfg: RunConfig) -> TaskData:
    return TASKS.get(cfg.task.name).impl(cfg.task)


def build_context(cfg: RunConfig, task: TaskData, device: torch.device) -> BuildContext:
    """What the run's method may read while it builds its model (methods/base.py), from the run config."""
    uses_transfer = METHODS.get(cfg.method.name).impl.uses_transfer and len(task.splits.get("transfer", [])) > 0
    return BuildContext(cache_dir=Path(cfg.cache_dir), seed=cfg.seed, device=device, small=cfg.student,
                        planned_steps=planned_steps(task, cfg.train, uses_transfer),
                        eval_batch_size=cfg.train.eval_batch_size)


def _reference_key(cfg: RunConfig, task: TaskData) -> str:
    """The student alone on the same data, model and seed (whatever loop settings the method uses)."""
    return stable_hash([task.fingerprint, to_dict(cfg.student), cfg.seed])


def _reference_path(cfg: RunConfig, task: TaskData) -> Path:
    return Path(cfg.cache_dir) / "references" / f"student-{_reference_key(cfg, task)}.json"


def _evaluate(method: torch.nn.Module, task: TaskData, batch_size: int, device: torch.device) -> dict[str, Any]:
    method.eval()
    out: dict[str, Any] = {}
    for split in ("val", "test"):
        rows = task.splits[split]
        out[split] = task.score(predict_rows(method.predict, task, rows, batch_size, device), rows)
    out["ood"] = {}
    for suite in task.ood_suites:
        rows = task.splits[f"ood/{suite}"]
        out["ood"][suite] = task.score(predict_rows(method.predict, task, rows, batch_size, device), rows)
    return out


def prepare_teachers(cfg: RunConfig, task: TaskData, names: list[str], ctx: DistContext,
                     log: JsonlLog) -> dict[str, PreparedTeacher]:
    done: dict[str, PreparedTeacher] = {}

    def prepare(name: str) -> PreparedTeacher:  # a teacher's distill_from source is prepared first
        if name not in done:
            tcfg = cfg.teachers[name]
            source = prepare(tcfg.distill_from) if tcfg.distill_from is not None else None
            seed = tcfg.seed if tcfg.seed is not None else cfg.seed
            done[name] = prepare_teacher(name, tcfg, task, cfg.cache_dir, seed=seed, ctx=ctx,
                                         log=log.phase(f"teacher:{name}"), source=source)
        return done[name]

    return {name: prepare(name) for name in names}


def cached_reference(cfg: RunConfig, task: TaskData, name: str) -> PreparedTeacher | None:
    """Reference teacher `name` as already prepared in the cache (its distill_from chain too), or None."""
    tcfg = cfg.teachers[name]
    source = None
    if tcfg.distill_from is not None:
        source = cached_reference(cfg, task, tcfg.distill_from)
        if source is None:
            return None
    seed = tcfg.seed if tcfg.seed is not None else cfg.seed
    return find_prepared(name, tcfg, task, cfg.cache_dir, seed=seed, source=source)


def cache_teachers(cfg: RunConfig, names: list[str] | None = None) -> dict[str, PreparedTeacher]:
    """`fmtransfer cache`: prepare teachers and fill their caches now, so later runs only read them."""
    unknown = [n for n in names or [] if n not in cfg.teachers]
    if unknown:
        raise ConfigError(f"--teacher {unknown[0]!r} is not a configured teacher (allowed: {', '.join(cfg.teachers)})")
    apply_num_threads(cfg.train.num_threads)
    ctx = init_distributed(cfg.train.device)
    try:
        if getattr(cfg.task, "streamed", False):  # table_stream: sharded teacher passes (stream_run.py)
            from fmtransfer.stream_run import cache_stream

            return cache_stream(cfg, names, ctx)  # type: ignore[return-value]
        task = build_task(cfg)
        out = prepare_teachers(cfg, task, names or list(cfg.teachers), ctx, JsonlLog(None))
        if ctx.is_main:
            for name, t in out.items():
                state = "cached already" if t.from_cache else f"prepared in {t.seconds:.1f}s"
                print(f"{name}: {t.recipe} {t.fingerprint} {state}; encoder inputs run {t.encoder_forwards}, "
                      f"outputs for {task.num_rows} rows in {t.path}", flush=True)
        return out
    finally:
        shutdown(ctx)


def run_experiment(cfg: RunConfig, out_dir: str | Path, resume: bool = False, quiet: bool = False,
                   keep: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one experiment and return its metrics (also written to DIR/metrics.json).

    `keep` (the Python API's): a dict that receives the trained `method`, its `student` (best validation
    weights) and the `task`, so a caller can predict without reloading."""
    out = Path(out_dir)
    metrics_path = out / "metrics.json"
    if metrics_path.exists():
        if resume:
            return read_metrics(metrics_path, "delete it and run again with --resume (the checkpoint finishes the run)")
        raise ConfigError(f"{out} already holds a finished run (metrics.json); choose another --out")
    if (out / "checkpoint.pt").exists() and not resume:
        raise ConfigError(f"{out} holds an unfinished run; pass --resume to continue it or choose another --out")
    ctx = init_distributed(cfg.train.device)
    try:
        if getattr(cfg.task, "streamed", False):  # table_stream: bounded memory (stream_run.py)
            from fmtransfer.stream_run import run_stream

            return run_stream(cfg, out, resume, ctx, quiet)
        return _run(cfg, out, resume, ctx, quiet, keep)
    finally:
        shutdown(ctx)


def _run(cfg: RunConfig, out: Path, resume: bool, ctx: DistContext, quiet: bool,
         keep: dict[str, Any] | None = None) -> dict[str, Any]:
    config_hash = start_run_folder(cfg, out, ctx.is_main)
    log = JsonlLog(out / "log.jsonl" if ctx.is_main else None)
    epoch_log = EpochLog(log.phase("train"), cfg.train.loggers, out) if ctx.is_main and cfg.train.loggers else None
    t_start = time.perf_counter()
    task = build_task(cfg)
    method_entry = METHODS.get(cfg.method.name)
    needed = method_entry.impl.required_teachers(cfg.method, list(cfg.teachers))
    ref_name = cfg.reference_teacher_name()
    # a method that reads no teacher prepares none: its reference teacher comes from the cache, or is absent
    names = needed + ([ref_name] if ref_name and needed and ref_name not in needed else [])
    teachers = prepare_teachers(cfg, task, names, ctx, log)
    ref_note = None
    if ref_name and ref_name not in teachers:
        found = cached_reference(cfg, task, ref_name)
        if found is not None:
            teachers[ref_name] = found
        else:
            ref_note = (f"teacher {ref_name!r} is not prepared in {cfg.cache_dir}, so gap recovered is null "
                        f"(fmtransfer cache CONFIG --teacher {ref_name} prepares it)")
            if ctx.is_main and not quiet:
                print(f"fmtransfer: {cfg.method.name} reads no teacher; {ref_note}", file=sys.stderr, flush=True)
    t_cache = time.perf_counter() - t_start

    torch.manual_seed(cfg.seed)  # the student's init must not depend on whether teachers came from the cache
    method = build_method(cfg.method, task, {n: teachers[n] for n in needed}, build_context(cfg, task, ctx.device))
    student, own_model = method.student, method.own_model  # own: LEVI, probes, fine-tuning (the FM is shipped)
    n_student, n_trainable = count_params(student), count_params(student, trainable_only=True)
    for t in ([] if own_model else teachers.values()):
        if t.kind == "foundation" and n_student > t.params / 10:
            warnings.warn(f"student has {n_student:,} parameters, more than a tenth of foundation teacher "
                          f"{t.name!r} ({t.params:,})", stacklevel=1)
    uses_transfer = method.uses_transfer and len(task.splits.get("transfer", [])) > 0
    torch.manual_seed(cfg.seed)
    t_train0 = time.perf_counter()
    result = fit(method, task, cfg.train, seed=cfg.seed, ctx=ctx,
                 teacher_outputs={n: teachers[n].outputs for n in needed},
                 teacher_reps={n: teachers[n].reps for n in needed} if method.reads_reps else None,
                 uses_transfer=uses_transfer,
                 ckpt_path=out / "checkpoint.pt", resume=resume, config_hash=config_hash,
                 desc=cfg.method.name, log=epoch_log or log.phase("train"))
    if epoch_log is not None:  # (a failed fit leaves the loggers' files as written so far)
        epoch_log.close()
    t_train = time.perf_counter() - t_train0
    diagnostics = method.diagnostics()  # over the whole training
    dump = os.environ.get(DEBUG_DUMP_ENV)
    if dump:  # tests compare every rank's final weights (DDP must keep them identical)
        Path(dump).mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in result.last_state.items()}, f"{dump}/rank{ctx.rank}.safetensors")

    t_eval0 = time.perf_counter()
    same = result.best_state.keys() == result.last_state.keys() and all(
        torch.equal(result.best_state[k], result.last_state[k]) for k in result.best_state)
    last: dict[str, Any] | None = None
    if not same and cfg.train.score_last:  # the last epoch was not the best: score it too (costly with a live FM)
        method.load_state_dict(result.last_state)
        last = _evaluate(method, task, cfg.train.eval_batch_size, ctx.device)
    method.load_state_dict(result.best_state)
    best = _evaluate(method, task, cfg.train.eval_batch_size, ctx.device)
    if same:
        last = best
    report = method.report(task, result.history, out, ctx.device) if ctx.is_main else None
    t_eval = time.perf_counter() - t_eval0

    metrics = _metrics(cfg, task, teachers, best, last, result, (n_student, n_trainable), ctx,
                       {"cache": t_cache, "train": t_train, "eval": t_eval}) | {"config_hash": config_hash}
    metrics["shipped_model"] = {"class": f"{type(student).__module__}:{type(student).__qualname__}",
                                "built_by": "method" if own_model else "student"}  # what export must rebuild
    if ref_note is not None:
        metrics["reference"]["note"] = ref_note
    if keep is not None:
        keep.update(method=method, student=student, task=task)
    if diagnostics or report:
        metrics["method_diagnostics"] = diagnostics | (report or {})
        metrics["teacher_forward"]["skipped"] = diagnostics.get("pairs_skipped", 0)
    if ctx.is_main:
        student_state = {k[len("student."):]: v.contiguous() for k, v in result.best_state.items()
                         if k.startswith("student.")}
        st_meta = {"task": task.name, "method": cfg.method.name,
                   "model": type(student).__name__ if own_model else cfg.student.name}
        publish(out / "student.safetensors", lambda tmp: save_file(student_state, str(tmp), metadata=st_meta))
        if task.meta.get("preprocessing") is not None:  # the fitted encoders: export checks and ships them
            write_run_json(out / PREPROCESSING_NAME, task.meta["preprocessing"])
        if cfg.method.name == "student":
            atomic_write_json(_reference_path(cfg, task), {"metric": task.metric, "test": best["test"],
                                                           "ood": best["ood"], "run": str(out)})
        write_run_json(out / "metrics.json", metrics)
        log({"phase": "done", "test": best["test"], "seconds": metrics["seconds"]})
        if not quiet:
            print(format_summary(metrics), flush=True)
    return metrics


def _metrics(cfg: RunConfig, task: TaskData, teachers: dict[str, PreparedTeacher], best: dict[str, Any],
             last: dict[str, Any] | None, result: Any, n_params: tuple[int, int], ctx: DistContext,
             seconds: dict[str, float]) -> dict[str, Any]:
    m = task.metric
    ref_name = cfg.reference_teacher_name()
    ref_student = best["test"][m] if cfg.method.name == "student" else None
    ref_path = _reference_path(cfg, task)
    if ref_student is None and ref_path.exists():
        try:
            ref_student = json.loads(ref_path.read_text())["test"][m]
        except (OSError, ValueError, KeyError, TypeError):  # a damaged cache file: the reference is unknown
            print(f"fmtransfer: {ref_path} is unreadable; the student-alone reference is left out", flush=True)
    ref_teacher = teachers[ref_name].metrics["test"][m] if ref_name in teachers else None
    best_teacher = None
    for t in teachers.values():
        v = t.metrics["test"][m]
        if best_teacher is None or (v > best_teacher if task.higher_is_better else v < best_teacher):
            best_teacher = v
    ood_vals = [v[m] for v in best["ood"].values()]
    return {
        "task": task.name, "method": cfg.method.name, "seed": cfg.seed, "metric": m,
        "higher_is_better": task.higher_is_better,
        "test": best["test"], "val": best["val"], "ood": best["ood"],
        "ood_mean": {m: sum(ood_vals) / len(ood_vals)} if ood_vals else None,
        "last_epoch": {"test": last["test"], "val": last["val"], "ood": last["ood"]} if last is not None else None,
        "best_epoch": result.best_epoch, "epochs_run": len(result.history), "steps": result.steps,
        "reference": {"student": ref_student, "teacher": ref_teacher, "teacher_name": ref_name,
                      "best_teacher": best_teacher},
        "gap_recovered": gap_recovered(best["test"][m], ref_student, ref_teacher, task.higher_is_better),
        "gap_recovered_best_teacher": gap_recovered(best["test"][m], ref_student, best_teacher,
                                                    task.higher_is_better),
        "teachers": {n: t.summary() for n, t in teachers.items()},
        "params": {"student": n_params[0], "student_trainable": n_params[1],
                   "teachers": {n: t.params for n, t in teachers.items()}},
        "teacher_forward": {"run": sum(t.forward_rows_run for t in teachers.values()),
                            "encoder_texts": sum(t.encoder_forwards for t in teachers.values()),
                            "skipped": 0, "cached": result.teacher_rows_read * ctx.world},
        "seconds": {k: round(v, 3) for k, v in seconds.items()} | {
            "teacher_prepare": round(sum(t.seconds for t in teachers.values()), 3)},
        "labels": {"train": len(task.splits["train"]), "transfer": len(task.splits.get("transfer", []))},
        "world_size": ctx.world,
    }
