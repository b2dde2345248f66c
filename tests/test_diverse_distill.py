"""DiverseDistill's own behaviour: the gate learns which teacher is right (without collapsing through the
loss it weights), filtering skips and counts teacher pairs, equal importance keeps everyone."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from fmtransfer.config import load_config
from fmtransfer.registry import METHODS, MODELS
from fmtransfer.run import build_task
from fmtransfer.train.loop import make_batch
from tests.conftest import TINY


def _committee(task):  # type: ignore[no-untyped-def]
    """Teacher 'good' outputs the label; teacher 'bad' outputs the opposite class; both with random reps."""
    y = task.y
    good = torch.nn.functional.one_hot(y, 2).float() * 6 - 3
    rng = np.random.default_rng(0)
    mk = lambda out: SimpleNamespace(kind="complementary", outputs=out,  # noqa: E731
                                     reps=rng.normal(size=(task.num_rows, 6)).astype(np.float16))
    return {"good": mk(good), "bad": mk(-good)}


def _method(options: str):  # type: ignore[no-untyped-def]
    cfg = load_config(TINY, [f"method={{name: diverse_distill, {options}}}"])
    task = build_task(cfg)
    teachers = _committee(task)
    torch.manual_seed(0)
    student = MODELS.get(cfg.student.name).impl(cfg.student, task)
    method = METHODS.get("diverse_distill").impl(cfg.method, student, task, teachers)
    outputs = {n: t.outputs for n, t in teachers.items()}
    reps = {n: t.reps for n, t in teachers.items()}
    return method, task, outputs, reps


def test_gate_learns_the_right_teacher_and_filtering_skips_the_other() -> None:
    method, task, outputs, reps = _method("l_gate: 1.0, tau: 1.0, entropy_floor: 0.05")
    rows = task.splits["train"]
    batch = make_batch(task, rows, torch.ones(len(rows), dtype=torch.bool), outputs, reps)
    opt = torch.optim.Adam(method.gate.parameters(), lr=0.05)
    for _ in range(60):
        loss = method._gate_loss(method.student.body(batch), batch, batch["labeled"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    alpha = method.importance(method.student.body(batch)).detach()
    assert alpha[:, 0].mean() > 0.85  # the teacher that is right about the rows
    assert alpha.min() >= 0.05 / 2 - 1e-6  # the entropy floor keeps every weight above floor / K
    method.train()
    terms = method(batch)
    diag = method.diagnostics()
    assert diag["pairs_skipped"] > 0.8 * len(rows) and diag["pairs_kept"] >= len(rows)
    assert diag["mean_alpha"]["good"] > 0.85
    assert {"align", "answer", "kd", "gate", "alpha:good", "alpha:bad"} <= set(terms)


def test_equal_importance_keeps_every_teacher() -> None:
    method, task, outputs, reps = _method("importance: equal")
    rows = task.splits["train"][:16]
    method.train()
    terms = method(make_batch(task, rows, torch.ones(16, dtype=torch.bool), outputs, reps))
    assert "gate" not in terms
    assert terms["alpha:good"].item() == terms["alpha:bad"].item() == 0.5
    assert method.diagnostics()["pairs_skipped"] == 0


def test_gate_gets_no_gradient_from_the_terms_it_weights() -> None:
    method, task, outputs, reps = _method("l_gate: 0.0")
    rows = task.splits["train"][:16]
    method(make_batch(task, rows, torch.ones(16, dtype=torch.bool), outputs, reps))["loss"].backward()
    assert method.gate.weight.grad is None or float(method.gate.weight.grad.abs().sum()) == 0.0


def test_run_reports_importance_and_draws_plots(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from fmtransfer.run import run_experiment

    cfg = load_config(TINY, [f"cache_dir={tmp_path / 'c'}", "method={name: diverse_distill}",
                             "teachers.deep={recipe: supervised, model: {name: mlp, hidden: [32, 32]}, "
                             "train: {epochs: 2, batch_size: 32, steps_per_epoch: 5}}"])
    m = run_experiment(cfg, tmp_path / "run", quiet=True)
    d = m["method_diagnostics"]
    assert set(d["mean_alpha"]) == {"wide", "deep"} and abs(sum(d["mean_alpha"].values()) - 1) < 1e-4
    assert len(d["importance_over_training"]["wide"]) == 4
    assert set(d["importance_by_segment"]["class"]) == {"0", "1"}
    assert m["teacher_forward"]["skipped"] == d["pairs_skipped"]
    for png in d["plots"]:
        assert (tmp_path / "run" / png).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["method"] == "diverse_distill"
