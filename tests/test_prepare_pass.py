"""Teacher preparation's output pass: outputs and representations from one forward, in bounded batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fmtransfer.config import load_config
from fmtransfer.registry import RECIPES
from fmtransfer.runner import build_task
from fmtransfer.teachers.outputs import PREPARE_BATCH_ROWS, outputs_and_reps, prepare_batch_size
from tests.conftest import TINY


def _model(tmp_path: Path):  # type: ignore[no-untyped-def]
    cfg = load_config(TINY, [f"cache_dir={tmp_path}"])
    task = build_task(cfg)
    torch.manual_seed(0)
    built = RECIPES.get(cfg.teachers["wide"].recipe).impl.build(cfg.teachers["wide"], task, tmp_path,
                                                                 torch.device("cpu"))
    return task, built.model.eval()


def test_one_forward_gives_the_outputs_and_representations_of_two(tmp_path: Path) -> None:
    task, model = _model(tmp_path)
    rows = torch.arange(task.num_rows)
    calls: list[int] = []
    original = type(model).body

    def counting_body(self, batch):  # type: ignore[no-untyped-def]
        calls.append(len(batch["y"]))
        return original(self, batch)

    type(model).body = counting_body  # type: ignore[method-assign]
    try:
        outputs, reps = outputs_and_reps(model, model, task, rows, 7, torch.device("cpu"))
    finally:
        type(model).body = original  # type: ignore[method-assign]
    assert sum(calls) == task.num_rows and max(calls) == 7  # each row's body ran once: no second pass
    assert "body" not in vars(model)  # the recording hook is gone
    with torch.no_grad():
        full = task.gather(rows)
        want_out, want_rep = model(full), model.body(full)
    assert outputs.dtype == np.float32 and reps.dtype == np.float16
    torch.testing.assert_close(torch.from_numpy(outputs), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.from_numpy(reps.astype(np.float32)), want_rep, atol=2e-2, rtol=1e-2)


def test_a_prediction_that_skips_the_body_still_gets_representations(tmp_path: Path) -> None:
    task, model = _model(tmp_path)
    rows = torch.arange(30)
    outputs, reps = outputs_and_reps(lambda b: torch.zeros(len(b["y"]), 2), model, task, rows, 8,
                                     torch.device("cpu"))
    assert (outputs == 0).all()
    with torch.no_grad():
        want = model.body(task.gather(rows))
    torch.testing.assert_close(torch.from_numpy(reps.astype(np.float32)), want, atol=2e-2, rtol=1e-2)


def test_preparation_batches_are_sized_for_throughput_not_the_split() -> None:
    assert prepare_batch_size(8192) == PREPARE_BATCH_ROWS  # the default eval_batch_size no longer applies
    assert prepare_batch_size(16) == 16  # a smaller configured batch (memory) is kept


def test_the_cache_command_honours_num_threads(tmp_path: Path) -> None:
    from fmtransfer.runner import cache_teachers

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cfg = load_config(TINY, [f"cache_dir={tmp_path}", "train.num_threads=1"])
        out = cache_teachers(cfg, ["wide"])
        assert torch.get_num_threads() == 1 and not out["wide"].from_cache
    finally:
        torch.set_num_threads(before)
