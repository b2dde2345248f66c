"""One contract for every registered method: the loss dict, gradients, the student-only prediction,
and that unlabeled rows never reach the task loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fmtransfer.config import load_config
from fmtransfer.methods.base import build_method
from fmtransfer.registry import METHODS
from fmtransfer.runner import build_context, build_task, prepare_teachers
from fmtransfer.train.distributed import DistContext
from fmtransfer.train.loop import make_batch
from tests.conftest import TINY

CPU = torch.device("cpu")
SECOND_TEACHER = ["teachers.deep={recipe: supervised, model: {name: mlp, hidden: [32, 32]}, "
                  "train: {epochs: 2, batch_size: 32, steps_per_epoch: 5}}"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cache = tmp_path_factory.mktemp("cache")
    cfg = load_config(TINY, [f"cache_dir={cache}", *SECOND_TEACHER])
    task = build_task(cfg)
    from fmtransfer.runner import JsonlLog

    teachers = prepare_teachers(cfg, task, list(cfg.teachers), DistContext(), JsonlLog(None))
    return cfg, task, teachers, cache


@pytest.mark.parametrize("name", METHODS.names())
def test_method_contract(name: str, setup, tiny_bert: str) -> None:  # type: ignore[no-untyped-def]
    cfg, task, teachers, cache = setup
    fields = METHODS.get(name).config_cls.__dataclass_fields__
    extra = (["method.teacher=wide"] if "teacher" in fields else []) + \
        ([f"method.encoder={tiny_bert}"] if "encoder" in fields else [])  # FM methods read the tiny BERT
    cfg = load_config(TINY, [f"cache_dir={cache}", f"method={{name: {name}}}", *SECOND_TEACHER, *extra])
    entry = METHODS.get(name)
    needed = entry.impl.required_teachers(cfg.method, list(cfg.teachers))
    torch.manual_seed(0)
    # methods that train their own model around the FM (LEVI, probes, fine-tuning) build it themselves
    method = build_method(cfg.method, task, {n: teachers[n] for n in needed}, build_context(cfg, task, CPU))
    outputs = {n: teachers[n].outputs for n in needed}
    reps = {n: teachers[n].reps for n in needed} if method.reads_reps else None
    rows = torch.cat([task.splits["train"][:8], task.splits["transfer"][:8]])
    labeled = torch.arange(16) < 8
    batch = make_batch(task, rows, labeled, outputs, reps)

    terms = method(batch)
    assert isinstance(terms, dict) and "loss" in terms
    assert terms["loss"].dim() == 0 and torch.isfinite(terms["loss"])
    terms["loss"].backward()
    grads = [p.grad for p in method.student.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)

    # the prediction is the student's alone, of the task's output shape (eval: no dropout noise)
    method.eval()
    pred = method.predict(batch)
    assert pred.shape == (16, *task.output_shape())
    torch.testing.assert_close(pred, method.student(batch))

    # the targets of unlabeled rows must not change the loss (the task loss never sees them)
    method.eval()
    with torch.no_grad():
        before = method(batch)["loss"]
        poisoned = dict(batch)
        poisoned["y"] = batch["y"].clone()
        poisoned["y"][~labeled] = (poisoned["y"][~labeled] + 1) % task.num_classes
        after = method(poisoned)["loss"]
    torch.testing.assert_close(before, after)


def test_methods_registered() -> None:
    assert {"student", "kd", "multi_kd", "ca_mkd", "fitnet", "diverse_distill"} <= set(METHODS.names())


def test_kd_reads_the_teacher_it_names(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg, _task, _teachers, _ = setup
    from fmtransfer.errors import ConfigError
    from fmtransfer.methods.kd import KD

    with pytest.raises(ConfigError, match="method.teacher: 'fm' is not a configured teacher"):
        KD.required_teachers(load_config(TINY, ["method.teacher=fm"]).method, list(cfg.teachers))


def test_every_hook_the_loop_and_run_call_is_declared_on_method() -> None:
    """The loop and run.py call these on any method without probing for them (methods/base.py declares each)."""
    import ast
    import inspect

    from fmtransfer import run
    from fmtransfer.methods.base import Method
    from fmtransfer.train import loop

    hooks = {"required_teachers", "build_model", "losses", "predict", "lr_scales", "on_epoch_end", "diagnostics",
             "report"}
    assert all(callable(getattr(Method, h, None)) for h in hooks)
    for module in (loop, run):
        src = inspect.getsource(module)
        probes = [n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
                  and n.func.id in ("getattr", "hasattr") and len(n.args) > 1 and isinstance(n.args[0], ast.Name)
                  and n.args[0].id == "method"]
        assert not probes, f"{module.__name__} probes a method hook with getattr/hasattr"


def test_no_method_module_imports_another() -> None:
    """Shared pieces live in methods/base.py, losses.py, fm_base.py, finetune_base.py and messages.py; a
    registered method's module never imports another's."""
    import ast
    import sys

    modules = {e.impl.__module__ for e in (METHODS.get(n) for n in METHODS.names())}
    for mod in modules:
        tree = ast.parse(Path(sys.modules[mod].__file__).read_text())  # type: ignore[arg-type]
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not (imported & (modules - {mod})), f"{mod} imports {imported & modules}"
