"""Teacher preparation: adapt a teacher to the task once, store it as a fingerprinted artifact, reuse it.

A recipe builds an untrained teacher module (a head on a frozen foundation model, a fine-tuned one,
a hybrid, or a wider application model); preparation trains it on the labeled rows with validation
selection, runs it once over every row of the task, and stores weights + outputs + metrics under
`<cache_dir>/teachers/<name>-<fingerprint>/`. The fingerprint covers the task's content, the recipe's
config, the seed and the foundation model's weights, so any change prepares a new artifact; a
truncated or inconsistent artifact is detected and rebuilt, never used: `receipts.json` holds the
size and CRC32 of each file (integrity.py), and a lock (locks.py) lets one process build it at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fmtransfer.config import MethodConfig, TeacherConfig, to_dict
from fmtransfer.data.base import TaskData
from fmtransfer.errors import ArtifactError, ConfigError, DataError
from fmtransfer.integrity import check, read_receipts, record, verify_folder
from fmtransfer.locks import entry_lock, remove_stale_dirs
from fmtransfer.models.base import TaskModel
from fmtransfer.registry import RECIPES
from fmtransfer.teachers.outputs import outputs_and_reps, prepare_batch_size
from fmtransfer.train.distributed import DistContext
from fmtransfer.train.loop import fit
from fmtransfer.utils import atomic_write_json, count_params, stable_hash

ARTIFACT_VERSION = 3  # 2: text embeddings in the fp16 feature store; 3: reps.npy (the teacher body output)
ARTIFACT_FILES = ("meta.json", "outputs.npy", "reps.npy", "weights.safetensors")


@dataclass
class TeacherBuild:
    """What a recipe returns: the module to train and what to report about it."""

    model: TaskModel
    frozen_params: int = 0
    """Parameters of a frozen backbone that `model` does not hold as parameters (e.g. cached embeddings)."""
    encoder_forwards: int = 0
    """Texts or images the foundation model actually ran on while building (0 on an embedding-cache hit)."""
    method: Any = None
    """The training objective built with the model (a method-as-teacher recipe's method, with what its build
    produced); None = the recipe's `method(cfg, model, task)`."""


class Recipe:
    """A way to adapt a teacher to a task. Subclasses implement `build` (and `fingerprint_extra`)."""

    kind: ClassVar[str] = "complementary"

    @classmethod
    def fingerprint_extra(cls, cfg: Any) -> str:
        """Anything outside the config that changes the teacher (e.g. the foundation model's weights)."""
        return ""

    @classmethod
    def build(cls, cfg: Any, task: TaskData, cache_dir: Path, device: torch.device) -> TeacherBuild:
        raise NotImplementedError

    @classmethod
    def method(cls, cfg: Any, model: TaskModel, task: TaskData) -> Any:
        """The training objective of preparation (default: the task loss alone, `student`)."""
        from fmtransfer.methods.student import Student

        return Student(MethodConfig(name="student"), model, task, {})

    @classmethod
    def token_states(cls, cfg: Any, task: TaskData, cache_dir: Path, device: torch.device) -> torch.Tensor | None:
        """(rows, tokens, dim) token or patch states of the frozen backbone for every row, from the cache, for
        answer modules that cross-attend over them; None when the recipe has none to offer."""
        return None

    @classmethod
    def precompute(cls, cfg: Any, task: TaskData, cache_dir: Path, ctx: DistContext) -> int:
        """Fill the frozen-backbone feature cache, every rank writing its own shards (run on all ranks).

        Returns the number of inputs the backbone ran on here (0: nothing to cache or already cached).
        """
        return 0


@dataclass
class PreparedTeacher:
    """A frozen, task-adapted teacher: its outputs for every row of the task and its reference metrics."""

    name: str
    kind: str
    recipe: str
    fingerprint: str
    outputs: torch.Tensor
    reps: np.ndarray
    """The teacher's representation (its model's body output) for every row, fp16, memory-mapped:
    what feature-level methods (fitnet, DiverseDistill) align the student with."""
    params: int
    trainable_params: int
    metrics: dict[str, Any]
    path: Path
    seconds: float = 0.0
    forward_rows_run: int = 0
    encoder_forwards: int = 0
    from_cache: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    cfg: TeacherConfig | None = None
    """The recipe config it was prepared from (lets a method rebuild and run the teacher live)."""
    cache_dir: Path | None = None

    def load_model(self, task: TaskData, device: torch.device | None = None) -> TaskModel:
        """The teacher's trained module, frozen and in eval mode, for methods that run it live
        (injecting messages into its layers, or skipping its forward per sample)."""
        if self.cfg is None or self.cache_dir is None:
            raise ArtifactError(f"teacher {self.name!r} was built without its config; prepare it with prepare_teacher")
        return load_teacher_weights(self, self.cfg, task, self.cache_dir, device)

    def token_states(self, task: TaskData, device: torch.device | None = None) -> torch.Tensor | None:
        """The recipe's cached token/patch states for every row (None: this teacher has none)."""
        if self.cfg is None or self.cache_dir is None:
            return None
        return RECIPES.get(self.cfg.recipe).impl.token_states(self.cfg, task, self.cache_dir,
                                                              device or torch.device("cpu"))

    def summary(self) -> dict[str, Any]:
        return {"kind": self.kind, "recipe": self.recipe, "fingerprint": self.fingerprint,
                "params": self.params, "trainable_params": self.trainable_params, **self.metrics,
                "seconds": round(self.seconds, 3), "from_cache": self.from_cache}


def teacher_fingerprint(name: str, cfg: TeacherConfig, task: TaskData, seed: int,
                        source: PreparedTeacher | None = None) -> str:
    recipe = RECIPES.get(cfg.recipe).impl
    d = to_dict(cfg)
    d["recipe"] = RECIPES.first_name(cfg.recipe)  # a renamed recipe keeps its artifacts (its old name is hashed)
    for key, default in (("train_splits", ["train"]), ("distill_from", None), ("distill_weight", 1.0),
                         ("distill_temperature", 4.0)):
        if d.get(key) == default:
            del d[key]  # defaults: keep artifacts prepared before these options existed valid
    for key, default in getattr(cfg, "fingerprint_optional", {}).items():  # a recipe's own such options
        if d.get(key) == default:
            del d[key]
    if d.get("train", {}).get("score_last") is True:
        del d["train"]["score_last"]  # likewise (a teacher's preparation never scores its last epoch apart)
    if d.get("train", {}).get("loggers") == []:
        del d["train"]["loggers"]  # likewise (loggers only watch the run's own loop)
    parts = [ARTIFACT_VERSION, name, d, task.fingerprint, seed, recipe.fingerprint_extra(cfg)]
    return stable_hash([*parts, source.fingerprint] if source is not None else parts)


def _artifact_dir(cache_dir: Path, name: str, fp: str) -> Path:
    return cache_dir / "teachers" / f"{name}-{fp}"


def _score_all(task: TaskData, outputs: torch.Tensor) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for split in ("val", "test"):
        rows = task.splits[split]
        out[split] = task.score(outputs[rows], rows)
    out["ood"] = {s: task.score(outputs[task.splits[f"ood/{s}"]], task.splits[f"ood/{s}"]) for s in task.ood_suites}
    return out


def _load_artifact(path: Path, fp: str, task: TaskData) -> dict[str, Any] | None:
    """The artifact's meta and outputs, or None (with a one-line note) when missing, corrupt or stale."""
    meta_path = path / "meta.json"
    if not meta_path.exists():
        return None
    try:
        damaged = verify_folder(path, ARTIFACT_FILES)  # receipts: size + CRC32 of every file (integrity.py)
        if damaged is not None:
            raise ValueError(damaged)
        meta = json.loads(meta_path.read_text())
        outputs = np.load(path / "outputs.npy", allow_pickle=False)
        if not (path / "weights.safetensors").exists():
            raise ValueError("weights.safetensors is missing")
        expected = (task.num_rows, *task.output_shape())
        if meta.get("fingerprint") != fp or meta.get("version") != ARTIFACT_VERSION:
            raise ValueError("it belongs to another teacher config or dataset")
        if tuple(outputs.shape) != expected:
            raise ValueError(f"outputs have shape {outputs.shape}, the task needs {expected}")
        if not np.isfinite(outputs).all():
            raise ValueError("outputs hold NaN or inf")
        reps = np.load(path / "reps.npy", mmap_mode="r")
        if reps.shape[0] != task.num_rows:
            raise ValueError(f"representations have {reps.shape[0]} rows, the task has {task.num_rows}")
    except (ValueError, OSError, EOFError, json.JSONDecodeError) as e:
        print(f"fmtransfer: teacher artifact {path.name} is unusable ({e}); preparing it again", flush=True)
        return None
    if read_receipts(path) is None:  # prepared before receipts existed: record them now, so later damage shows
        with contextlib.suppress(OSError):
            record(path, ARTIFACT_FILES)
    return {"meta": meta, "outputs": torch.from_numpy(outputs.astype(np.float32)), "reps": reps}


def prepare_teacher(name: str, cfg: TeacherConfig, task: TaskData, cache_dir: str | Path, *,
                    seed: int, ctx: DistContext | None = None, log: Any = None,
                    source: PreparedTeacher | None = None) -> PreparedTeacher:
    """Return the prepared teacher `name`, building and storing it only if no valid artifact exists.

    `source` is the prepared teacher named by `cfg.distill_from` (its outputs are this one's soft targets).
    Under torchrun, rank 0 prepares while the others wait, then every rank reads the same artifact.
    """
    ctx = ctx or DistContext()
    cache_dir = Path(cache_dir)
    if (cfg.distill_from is None) != (source is None):
        raise ConfigError(f"teachers.{name}: distill_from is {cfg.distill_from!r} but the prepared source "
                          f"teacher given is {getattr(source, 'name', None)!r}")
    fp = teacher_fingerprint(name, cfg, task, seed, source)
    precomputed = RECIPES.get(cfg.recipe).impl.precompute(cfg, task, cache_dir, ctx) if ctx.enabled else 0
    path = _artifact_dir(cache_dir, name, fp)
    with entry_lock(path, f"teacher {name!r}", enabled=ctx.is_main):  # another run may publish it meanwhile
        art = _load_artifact(path, fp, task) if ctx.is_main else None
        built_now = ctx.is_main and art is None
        if built_now:
            remove_stale_dirs(path)
            _build_and_store(name, cfg, task, cache_dir, path, fp, seed, ctx.device, log, source)
    ctx.barrier()
    if art is None:  # built just now, or another rank's turn to read it
        art = _load_artifact(path, fp, task)
    if art is None:
        raise ArtifactError(f"teacher {name!r}: artifact {path} could not be read after preparation; "
                            "check free disk space and permissions of cache_dir")
    meta = art["meta"]
    return PreparedTeacher(
        name=name, kind=cfg.kind, recipe=cfg.recipe, fingerprint=fp, outputs=art["outputs"], reps=art["reps"],
        params=meta["params"], trainable_params=meta["trainable_params"], metrics=meta["metrics"], path=path,
        seconds=meta["seconds"] if built_now else 0.0, forward_rows_run=task.num_rows if built_now else 0,
        encoder_forwards=(meta.get("encoder_forwards", 0) if built_now else 0) + precomputed, from_cache=not built_now,
        extra={"prepare_seconds": meta["seconds"]}, cfg=cfg, cache_dir=cache_dir,
    )


def find_prepared(name: str, cfg: TeacherConfig, task: TaskData, cache_dir: str | Path, *, seed: int,
                  source: PreparedTeacher | None = None) -> PreparedTeacher | None:
    """The teacher as already prepared in the cache, or None; never builds one (a run that reads no teacher
    looks its reference teacher up here for "gap recovered" instead of preparing it)."""
    cache_dir = Path(cache_dir)
    fp = teacher_fingerprint(name, cfg, task, seed, source)
    path = _artifact_dir(cache_dir, name, fp)
    art = _load_artifact(path, fp, task) if (path / "meta.json").exists() else None
    if art is None:
        return None
    meta = art["meta"]
    return PreparedTeacher(
        name=name, kind=cfg.kind, recipe=cfg.recipe, fingerprint=fp, outputs=art["outputs"], reps=art["reps"],
        params=meta["params"], trainable_params=meta["trainable_params"], metrics=meta["metrics"], path=path,
        from_cache=True, extra={"prepare_seconds": meta["seconds"]}, cfg=cfg, cache_dir=cache_dir)


def _training_view(name: str, cfg: TeacherConfig, task: TaskData) -> TaskData:
    """The task as the teacher trains on it: labeled rows of every split in `train_splits`, no transfer set."""
    if list(cfg.train_splits) == ["train"]:
        return task
    missing = [s for s in cfg.train_splits if s not in task.splits]
    if missing:
        allowed = ", ".join(s for s in task.splits if not s.startswith(("val", "test", "ood/")))
        raise ConfigError(f"teachers.{name}.train_splits: task {task.name} has no split {missing[0]!r} "
                          f"(allowed: {allowed})")
    leaks = [s for s in cfg.train_splits if s in ("val", "test") or s.startswith("ood/")]
    if leaks:
        raise ConfigError(f"teachers.{name}.train_splits: {leaks[0]!r} is an evaluation split; a teacher "
                          "must not train on it")
    rows = torch.unique(torch.cat([task.splits[s] for s in cfg.train_splits]))
    return dataclasses.replace(task, splits={**task.splits, "train": rows, "transfer": rows[:0]},
                               fingerprint=task.fingerprint)


def _build_and_store(name: str, cfg: TeacherConfig, task: TaskData, cache_dir: Path, path: Path, fp: str,
                     seed: int, device: torch.device, log: Any, source: PreparedTeacher | None = None) -> None:
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    recipe = RECIPES.get(cfg.recipe).impl
    built = recipe.build(cfg, task, cache_dir, device)
    model = built.model
    if source is None:
        method = built.method if built.method is not None else recipe.method(cfg, model, task)
        outputs_in = None
    else:  # labels + the source teacher's soft targets on every row of the batch (labeled + transfer)
        from fmtransfer.methods.kd import KD, KDConfig

        kd_cfg = KDConfig(teacher=source.name, kd_weight=cfg.distill_weight, temperature=cfg.distill_temperature)
        method, outputs_in = KD(kd_cfg, model, task, {source.name: source}), {source.name: source.outputs}
    view = _training_view(name, cfg, task)
    result = fit(method, view, cfg.train, seed=seed, ctx=DistContext(device=device), teacher_outputs=outputs_in,
                 uses_transfer=source is not None and len(view.splits.get("transfer", [])) > 0,
                 desc=f"teacher {name}", log=log)
    method.load_state_dict(result.best_state)
    method.eval()
    all_rows = torch.arange(task.num_rows)
    outputs_np, reps_np = outputs_and_reps(method.predict, model, task, all_rows,  # one forward: outputs + reps
                                           prepare_batch_size(cfg.train.eval_batch_size), device)
    outputs = torch.from_numpy(outputs_np)
    expected = (task.num_rows, *task.output_shape())
    if tuple(outputs.shape) != expected:
        raise DataError(f"teacher {name!r} produced outputs of shape {tuple(outputs.shape)}, "
                        f"task {task.name} needs {expected}; fix the teacher's head size")
    trainable = count_params(model, trainable_only=True)
    meta = {
        "version": ARTIFACT_VERSION, "name": name, "fingerprint": fp, "kind": cfg.kind, "recipe": cfg.recipe,
        "config": to_dict(cfg), "distilled_from": source.fingerprint if source is not None else None,
        "task": task.name, "task_fingerprint": task.fingerprint, "seed": seed,
        "params": count_params(model) + built.frozen_params, "trainable_params": trainable,
        "metrics": _score_all(task, outputs), "best_epoch": result.best_epoch,
        "seconds": round(time.perf_counter() - t0, 3), "encoder_forwards": built.encoder_forwards,
    }
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "outputs.npy", outputs_np)
    np.save(tmp / "reps.npy", reps_np)
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in method.student.state_dict().items()},
              str(tmp / "weights.safetensors"))
    atomic_write_json(tmp / "meta.json", meta)
    record(tmp, ARTIFACT_FILES)
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def load_teacher_weights(teacher: PreparedTeacher, cfg: TeacherConfig, task: TaskData,
                         cache_dir: str | Path, device: torch.device | None = None) -> TaskModel:
    """Rebuild a prepared teacher's module from its artifact (for methods that run a teacher live)."""
    recipe = RECIPES.get(cfg.recipe).impl
    built = recipe.build(cfg, task, Path(cache_dir), device or torch.device("cpu"))
    try:
        damaged = check(teacher.path / "weights.safetensors")
        if damaged is not None:
            raise ValueError(f"weights.safetensors: {damaged}")
        state = load_file(str(teacher.path / "weights.safetensors"))
        built.model.load_state_dict(state)
    except Exception as e:
        raise ArtifactError(f"teacher {teacher.name!r}: weights in {teacher.path} do not load ({e}); "
                            "delete that folder to prepare the teacher again") from None
    return built.model.eval().requires_grad_(False)
