"""DiverseDistill's own behaviour: the gate learns which teacher is right (without collapsing through the
loss it weights), filtering skips and counts teacher pairs, equal importance keeps everyone."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fmtransfer.config import load_config
from fmtransfer.errors import ConfigError
from fmtransfer.registry import METHODS, MODELS
from fmtransfer.runner import build_task
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


def _gate_loss(method, batch):  # type: ignore[no-untyped-def]
    """The gate objective with every teacher run on every row (what the method uses on kept labeled pairs)."""
    from fmtransfer.methods.losses import per_row_task_loss

    z = method.student.body(batch)
    pred = method.student.head(z) + method.student.offset(batch)
    t_loss = torch.stack([per_row_task_loss(batch[f"teacher:{n}"], batch["y"], "classification")
                          for n in method.names], -1)
    seen = torch.ones_like(t_loss, dtype=torch.bool)
    return method._gate_loss(z, t_loss, per_row_task_loss(pred, batch["y"], "classification").detach(), seen)


@pytest.mark.parametrize("target", ["benefit", "correctness"])
def test_gate_learns_the_right_teacher_and_filtering_skips_the_other(target: str) -> None:
    method, task, outputs, reps = _method(f"l_gate: 1.0, tau: 1.0, entropy_floor: 0.05, gate_target: {target}, "
                                           "skip_fraction: null")
    rows = task.splits["train"]
    batch = make_batch(task, rows, torch.ones(len(rows), dtype=torch.bool), outputs, reps)
    opt = torch.optim.Adam(method.gate.parameters(), lr=0.05)
    for _ in range(60):
        loss = _gate_loss(method, batch)
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


def test_benefit_target_is_the_teachers_loss_advantage() -> None:
    """Golden: gate scores g, student loss s, teacher losses t -> mean over seen pairs of (g - (s - t))^2."""
    method, *_ = _method("gate_target: benefit")
    with torch.no_grad():
        method.gate.weight.zero_()
        method.gate.bias.copy_(torch.tensor([0.5, -1.0]))
    z = torch.zeros(2, method.student.rep_dim)
    t_loss = torch.tensor([[0.1, 2.0], [0.3, 0.4]])
    s_loss = torch.tensor([1.0, 0.2])
    seen = torch.tensor([[True, True], [True, False]])
    # targets: [0.9, -1.0], [-0.1, (unseen)]; errors: (0.5-0.9)^2=0.16, (-1+1)^2=0, (0.5+0.1)^2=0.36
    got = method._gate_loss(z, t_loss, s_loss, seen)
    assert abs(float(got.detach()) - (0.16 + 0.0 + 0.36) / 3) < 1e-6


@pytest.mark.parametrize("filter_by", ["gate", "random"])
def test_skip_fraction_skips_that_share_of_pairs_and_never_a_whole_row(filter_by: str) -> None:
    method, task, outputs, reps = _method(f"skip_fraction: 0.3, explore: 0.0, filter_by: {filter_by}")
    rows = task.splits["train"][:40]
    method.train()
    method(make_batch(task, rows, torch.ones(40, dtype=torch.bool), outputs, reps))
    d = method.diagnostics()
    assert d["pairs_skipped"] == int(0.3 * 80) and d["pairs_kept"] == 80 - int(0.3 * 80)
    alpha = torch.rand(40, 2)
    keep = method.keep_mask(alpha, alpha)
    assert keep.any(-1).all()
    assert int((~keep).sum()) == int(0.3 * 80)
    if filter_by == "gate":  # the lowest-scored pairs go first, except a row's best teacher, which always runs
        best = torch.zeros_like(keep).scatter_(1, alpha.argmax(-1, keepdim=True), True)
        assert alpha[~keep].max() <= alpha[keep & ~best].min()


def test_equal_importance_keeps_every_teacher() -> None:
    method, task, outputs, reps = _method("importance: equal")
    rows = task.splits["train"][:16]
    method.train()
    terms = method(make_batch(task, rows, torch.ones(16, dtype=torch.bool), outputs, reps))
    assert "gate" not in terms
    assert terms["alpha:good"].item() == terms["alpha:bad"].item() == 0.5
    assert method.diagnostics()["pairs_skipped"] == 0


def test_live_teachers_train_exactly_like_cached_ones_and_run_only_kept_rows(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from fmtransfer.runner import JsonlLog, prepare_teachers
    from fmtransfer.train.distributed import DistContext

    def make(source: str):  # type: ignore[no-untyped-def]
        cfg = load_config(TINY, [f"cache_dir={tmp_path}", "method={name: diverse_distill, skip_fraction: 0.4, "
                                 f"explore: 0.0, teacher_source: {source}}}",
                                 "teachers.deep={recipe: supervised, model: {name: mlp, hidden: [8]}, "
                                 "train: {epochs: 1, batch_size: 32, steps_per_epoch: 3}}"])
        task = build_task(cfg)
        teachers = prepare_teachers(cfg, task, ["wide", "deep"], DistContext(), JsonlLog(None))
        torch.manual_seed(0)
        student = MODELS.get(cfg.student.name).impl(cfg.student, task)
        method = METHODS.get("diverse_distill").impl(cfg.method, student, task, teachers)
        rows = task.splits["train"][:32]
        batch = make_batch(task, rows, torch.ones(32, dtype=torch.bool), {n: t.outputs for n, t in teachers.items()},
                           {n: t.reps for n, t in teachers.items()})
        method.train()
        torch.manual_seed(1)
        return method, method(batch)

    _, t_cached = make("cache")
    live, t_live = make("live")
    for k in ("loss", "align", "answer", "kd", "gate"):
        assert torch.allclose(t_cached[k], t_live[k], atol=2e-3), k  # reps are stored in fp16
    d = live.diagnostics()
    assert sum(d["live_teacher_rows"].values()) == d["pairs_kept"] == 64 - int(0.4 * 64)


def test_gate_gets_no_gradient_from_the_terms_it_weights() -> None:
    method, task, outputs, reps = _method("l_gate: 0.0")
    rows = task.splits["train"][:16]
    method(make_batch(task, rows, torch.ones(16, dtype=torch.bool), outputs, reps))["loss"].backward()
    assert method.gate.weight.grad is None or float(method.gate.weight.grad.abs().sum()) == 0.0


def test_run_reports_importance_and_draws_plots(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from fmtransfer.runner import run_experiment

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


def test_token_answer_cross_attends_over_a_teachers_patch_states() -> None:
    cfg = load_config(TINY, ["method={name: diverse_distill, token_teachers: [good], query_dim: 8, heads: 2}"])
    task = build_task(cfg)
    teachers = _committee(task)
    patches = torch.randn(task.num_rows, 4, 5).half()
    teachers["good"].token_states = lambda task: patches
    teachers["good"].recipe = "fake"
    torch.manual_seed(0)
    student = MODELS.get(cfg.student.name).impl(cfg.student, task)
    method = METHODS.get("diverse_distill").impl(cfg.method, student, task, teachers)
    rows = task.splits["train"][:16]
    batch = make_batch(task, rows, torch.ones(16, dtype=torch.bool), {n: t.outputs for n, t in teachers.items()},
                       {n: t.reps for n, t in teachers.items()})
    method(batch)["loss"].backward()
    attn = method.token_answer["good"].proj.weight
    assert attn.grad is not None and float(attn.grad.abs().sum()) > 0
    assert method.proj[0].weight.grad is None  # the pooled path of that teacher is not used
    assert not any(k.startswith("_tokens") for k in method.state_dict())  # the cache is not saved

    teachers["bad"].token_states = lambda task: None
    teachers["bad"].recipe = "fake"
    bad = load_config(TINY, ["method={name: diverse_distill, token_teachers: [bad], query_dim: 8, heads: 2}"])
    with pytest.raises(ConfigError, match="offers no token or patch states"):
        METHODS.get("diverse_distill").impl(bad.method, student, task, teachers)


def _strong_committee(task):  # type: ignore[no-untyped-def]
    """'fm' (foundation) is always right; 'wide' (complementary) is right and confident on even rows,
    wrong and unsure on odd rows: only its own outputs tell the gate where to trust it."""
    y = task.y
    right = torch.nn.functional.one_hot(y, 2).float() * 6 - 3
    odd = (torch.arange(task.num_rows) % 2 == 1).unsqueeze(-1)
    wide = torch.where(odd, -right / 12, right)
    rng = np.random.default_rng(0)
    mk = lambda kind, out: SimpleNamespace(kind=kind, outputs=out,  # noqa: E731
                                           reps=rng.normal(size=(task.num_rows, 6)).astype(np.float16))
    return {"fm": mk("foundation", right), "wide": mk("complementary", wide)}


def _strong_method(options: str):  # type: ignore[no-untyped-def]
    cfg = load_config(TINY, [f"method={{name: diverse_distill, {options}}}"])
    task = build_task(cfg)
    teachers = _strong_committee(task)
    torch.manual_seed(0)
    student = MODELS.get(cfg.student.name).impl(cfg.student, task)
    method = METHODS.get("diverse_distill").impl(cfg.method, student, task, teachers)
    rows = task.splits["train"]
    batch = make_batch(task, rows, torch.ones(len(rows), dtype=torch.bool),
                       {n: t.outputs for n, t in teachers.items()}, {n: t.reps for n, t in teachers.items()})
    return method, batch


def test_pre_teacher_signal_lets_the_gate_trust_the_complementary_teacher_where_it_is_confident() -> None:
    method, batch = _strong_method("gate_signals: [pre_teachers], gate_target: correctness, target_tau: 0.1, "
                                   "entropy_floor: 0.0, skip_fraction: null")
    assert method._pre.keys() == {"wide"}  # null pre_teachers = the complementary members
    z = method.student.body(batch)
    pred = method.student.head(z) + method.student.offset(batch)
    extra = method.gate_extra(pred, batch)
    assert extra.shape == (len(z), 2 + 2)  # wide's probabilities, entropy, KD term to the student
    from fmtransfer.methods.losses import per_row_task_loss
    t_loss = torch.stack([per_row_task_loss(batch[f"teacher:{n}"], batch["y"], "classification")
                          for n in method.names], -1)
    seen = torch.ones_like(t_loss, dtype=torch.bool)
    student_loss = per_row_task_loss(pred, batch["y"], "classification").detach()
    opt = torch.optim.Adam(method.gate.parameters(), lr=0.05)
    for _ in range(150):
        loss = method._gate_loss(z.detach(), t_loss, student_loss, seen, extra)
        opt.zero_grad()
        loss.backward()
        opt.step()
    alpha = method.importance(z, extra).detach()
    odd = batch["row"] % 2 == 1
    wide = method.names.index("wide")
    assert alpha[~odd, wide].mean() > 0.4 and alpha[odd, wide].mean() < 0.1  # segment-dependent, not uniform


def test_per_teacher_temperature_and_foundation_warmup_golden() -> None:
    """kd = mean over rows of sum_k w_k KD_k at each teacher's own T; the warm-up zeroes the FM's weight."""
    from fmtransfer.methods.losses import per_row_kd
    method, batch = _strong_method("importance: equal, filter: false, teacher_temperature: {fm: 1.0}, "
                                   "foundation_warmup_steps: 4")
    method.train()
    z = method.student.body(batch)
    pred = method.student.head(z) + method.student.offset(batch)
    kd_fm = per_row_kd(pred, batch["teacher:fm"], "classification", 1.0)
    kd_wide = per_row_kd(pred, batch["teacher:wide"], "classification", 4.0)
    assert torch.allclose(method(batch)["kd"], kd_wide.mean(), atol=1e-5)  # step 0: the FM's ramp is 0
    method(batch)  # step 1 -> ramp 0.25 at step 2 is applied below after one more
    assert int(method.step) == 2
    w_fm = 0.5 * 0.5 / (0.5 * 0.5 + 0.5)  # alpha 1/2 each, FM multiplied by 2 / 4
    expect = (w_fm * kd_fm + (1 - w_fm) * kd_wide).mean()
    assert torch.allclose(method(batch)["kd"], expect.detach(), atol=1e-5)


def test_gate_signal_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="gate_signals"):
        load_config(TINY, ["method={name: diverse_distill, gate_signals: [state, teacher_logits]}"])
    with pytest.raises(ConfigError, match="teacher_temperature"):
        _strong_method("teacher_temperature: {nope: 2.0}")
    with pytest.raises(ConfigError, match="pre_teachers"):
        _strong_method("gate_signals: [state, pre_teachers], pre_teachers: [nope]")


def test_run_with_the_strong_regime_options_reports_importance(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """End to end: the pre-FM gate signals, a per-teacher temperature and the warm-up go through the loop,
    the checkpoint and the per-segment report (which reads the same signals for validation rows)."""
    from fmtransfer.runner import run_experiment

    cfg = load_config(TINY, [f"cache_dir={tmp_path / 'c'}",
                             "method={name: diverse_distill, teachers: [wide], gate_signals: [state, uncertainty, "
                             "pre_teachers], pre_teachers: [deep], teacher_temperature: {wide: 2.0}, "
                             "foundation_warmup_steps: 3}",
                             "teachers.deep={recipe: supervised, model: {name: mlp, hidden: [16]}, "
                             "train: {epochs: 1, batch_size: 32, steps_per_epoch: 3}}"])
    m = run_experiment(cfg, tmp_path / "run", quiet=True)
    d = m["method_diagnostics"]
    assert set(m["teachers"]) == {"wide", "deep"}  # deep is read by the gate only
    assert set(d["mean_alpha"]) == {"wide"} and set(d["importance_by_segment"]["class"]) == {"0", "1"}


def test_teacher_logit_bias_shifts_weights_not_the_gates_regression() -> None:
    """Golden: alpha = softmax((g + b) / tau) with the floor; the gate's own loss reads g without b."""
    method, batch = _strong_method("teacher_logit_bias: {fm: 2.0}, entropy_floor: 0.0")
    plain, _ = _strong_method("entropy_floor: 0.0")
    z = method.student.body(batch)
    g = method.gate_scores(z)
    fm = method.names.index("fm")
    bias = torch.zeros(2)
    bias[fm] = 2.0
    assert torch.allclose(method.importance(z), torch.softmax(g + bias, -1), atol=1e-6)
    assert torch.allclose(plain.gate_scores(plain.student.body(batch)), g)  # same init: the bias is not in G


def test_answer_hidden_and_target_tau_golden() -> None:
    """`answer_hidden` is the answer MLPs' hidden width; the correctness gate target is softmax(-loss / target_tau)
    (two teachers with losses 0 and 1 at target_tau 0.5: weights 1 / (1 + e^-2) and e^-2 / (1 + e^-2))."""
    method, batch = _strong_method("gate_target: correctness, target_tau: 0.5, answer_hidden: 24")
    assert all(a[0].out_features == 24 and a[2].in_features == 24 for a in method.answer)
    z = method.student.body(batch).detach()
    n = len(z)
    t_loss = torch.tensor([0.0, 1.0]).expand(n, 2)
    g = method.gate_scores(z)
    w0 = 1.0 / (1.0 + math.exp(-2.0))
    want = -(w0 * torch.log_softmax(g / method.c.tau, -1)[:, 0]
             + (1 - w0) * torch.log_softmax(g / method.c.tau, -1)[:, 1]).mean()
    got = method._gate_loss(z, t_loss, torch.zeros(n), torch.ones(n, 2, dtype=torch.bool))
    torch.testing.assert_close(got, want)


def test_reliability_gate_learns_the_teacher_that_fits_the_labels() -> None:
    """`reliability`: the gate learns from the mixture's task loss on labeled rows, so it trusts the teacher
    that is right (the gate reads only the gate loss: the terms it weights use alpha detached)."""
    method, batch = _strong_method("gate_target: reliability, l_gate: 1.0, entropy_floor: 0.0, filter: false")
    opt = torch.optim.Adam(method.gate.parameters(), lr=0.05)
    method.train()
    first = float(method(batch)["gate"])
    for _ in range(80):
        opt.zero_grad()
        method(batch)["loss"].backward()
        opt.step()
    assert float(method(batch)["gate"]) < first
    alpha = method.importance(method.student.body(batch)).detach()
    assert alpha[:, method.names.index("fm")].mean() > 0.8  # fm is right on every row, wide on half


def test_hint_term_is_off_by_default_and_weighs_each_teachers_fitnet_hint() -> None:
    """l_hint 0 builds no projector (parameters and init unchanged); l_hint > 0 adds sum_k w_k hint_k."""
    from fmtransfer.methods.losses import per_row_hint
    plain, batch = _strong_method("importance: equal, filter: false")
    method, _ = _strong_method("importance: equal, filter: false, l_hint: 2.0")
    assert not any(k.startswith("hint_proj") for k in plain.state_dict())
    shared = {k: v for k, v in method.state_dict().items() if not k.startswith("hint_proj")}
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in shared.items())
    z = method.student.body(batch)
    expect = sum(0.5 * per_row_hint(method.hint_proj[k](z), batch[f"teacher_rep:{n}"])
                 for k, n in enumerate(method.names)).mean()
    out, base = method(batch), plain(batch)
    assert torch.allclose(out["hint"], expect, atol=1e-6)
    assert torch.allclose(out["loss"], base["loss"] + 2.0 * expect, atol=1e-5)


def test_confidence_gate_trusts_the_teacher_that_is_sure_on_the_row() -> None:
    """`confidence`: G regresses each teacher's negative entropy (label-free), so with the wide teacher's own
    outputs as a signal it learns to weigh wide down exactly on the rows where wide is unsure (odd rows)."""
    method, batch = _strong_method("gate_target: confidence, gate_signals: [pre_teachers], l_gate: 1.0, "
                                   "entropy_floor: 0.0, filter: false")
    opt = torch.optim.Adam(method.gate.parameters(), lr=0.05)
    method.train()
    for _ in range(150):
        opt.zero_grad()
        method(batch)["loss"].backward()
        opt.step()
    z = method.student.body(batch)
    extra = method.gate_extra(method.student.head(z) + method.student.offset(batch), batch)
    alpha = method.importance(z, extra).detach()
    odd, wide = batch["row"] % 2 == 1, method.names.index("wide")
    neg_h = torch.stack([(F.softmax(batch[f"teacher:{n}"], -1) * F.log_softmax(batch[f"teacher:{n}"], -1)).sum(-1)
                         for n in method.names], -1)
    expect = torch.softmax(neg_h, -1)[:, wide]  # alpha = softmax(-entropy): 0.5 on even rows, ~0.34 on odd
    assert abs(float(alpha[~odd, wide].mean() - expect[~odd].mean())) < 0.03
    assert abs(float(alpha[odd, wide].mean() - expect[odd].mean())) < 0.03 and float(expect[odd].mean()) < 0.4


def test_product_combine_is_one_kd_term_to_the_committees_geometric_mean() -> None:
    """`combine: product`: kd = KD(student, softmax(sum_k w_k log softmax(t_k / T))) per row; with one teacher
    it equals the default mixture exactly, and a row's skipped teacher drops out of its product."""
    from fmtransfer.methods.losses import per_row_kd
    method, batch = _strong_method("importance: equal, filter: false, combine: product")
    plain, _ = _strong_method("importance: equal, filter: false")
    z = method.student.body(batch)
    pred = method.student.head(z) + method.student.offset(batch)
    logp = sum(0.5 * F.log_softmax(batch[f"teacher:{n}"] / 4.0, -1) for n in method.names)
    expect = per_row_kd(pred, logp * 4.0, "classification", 4.0).mean()
    assert torch.allclose(method(batch)["kd"], expect, atol=1e-5)
    assert not torch.allclose(plain(batch)["kd"], expect, atol=1e-3)  # the mixture's sum of KL terms differs
    one, b1 = _strong_method("importance: equal, filter: false, combine: product, teachers: [fm]")
    ref, _ = _strong_method("importance: equal, filter: false, teachers: [fm]")
    assert torch.allclose(one(b1)["kd"], ref(b1)["kd"], atol=1e-6)
