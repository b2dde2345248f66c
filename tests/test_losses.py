"""Golden values: each loss against numbers computed by hand (see the comments)."""

from __future__ import annotations

import math

import pytest
import torch

from fmtransfer.methods.losses import distill_loss, kd_logits, kd_regression, masked_task_loss


def test_kd_logits_golden() -> None:
    # s = [0, 0], t = [ln 3, 0], T = 1: p_t = [3/4, 1/4], p_s = [1/2, 1/2]
    # KL(p_t || p_s) = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.1308120...
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert kd_logits(s, t, temperature=1.0).item() == pytest.approx(expected, rel=1e-6)
    # T = 2 on logits scaled by 2 gives the same distributions; the T^2 factor multiplies by 4.
    assert kd_logits(2 * s, 2 * t, temperature=2.0).item() == pytest.approx(4 * expected, rel=1e-6)


def test_kd_logits_batchmean_averages_rows_not_classes() -> None:
    # Two rows: the golden row above and an identical pair (KL 0): batchmean gives half the golden value.
    s = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    t = torch.tensor([[math.log(2.0), 0.0, 0.0], [1.0, 2.0, 3.0]])
    # p_t = [1/2, 1/4, 1/4], p_s uniform: KL = 1/2 ln(3/2) + 2 * 1/4 ln(3/4)
    row = 0.5 * math.log(1.5) + 0.5 * math.log(0.75)
    assert kd_logits(s, t, temperature=1.0).item() == pytest.approx(row / 2, rel=1e-6)


def test_kd_regression_and_dispatch_golden() -> None:
    s, t = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.5, 2.0, 3.0])
    # (0.25 + 0 + 1) / 3
    assert kd_regression(s, t).item() == pytest.approx(1.25 / 3)
    assert distill_loss(s, t, "regression").item() == pytest.approx(1.25 / 3)


def test_masked_task_loss_golden() -> None:
    pred, y = torch.tensor([1.0, 3.0, 10.0]), torch.tensor([2.0, 3.0, 0.0])
    mask = torch.tensor([True, True, False])  # the unlabeled row's target (0.0) must not count
    assert masked_task_loss(pred, y, mask, "regression").item() == pytest.approx(0.5)
    logits = torch.tensor([[0.0, 0.0], [5.0, -5.0]])
    labels = torch.tensor([1, 1])
    # only the first row: CE of uniform over 2 classes = ln 2
    ce = masked_task_loss(logits, labels, torch.tensor([True, False]), "classification")
    assert ce.item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_masked_task_loss_without_labels_is_zero_but_connected() -> None:
    pred = torch.tensor([1.0, 2.0], requires_grad=True)
    loss = masked_task_loss(pred, torch.tensor([0.0, 0.0]), torch.tensor([False, False]), "regression")
    assert loss.item() == 0.0
    loss.backward()
    assert pred.grad is not None and torch.all(pred.grad == 0)


def test_ca_mkd_weights_golden() -> None:
    from fmtransfer.methods.ca_mkd import teacher_weights
    from fmtransfer.methods.losses import per_row_kd

    # two teachers, one labeled row of class 0: p_A(0) = 3/4, p_B(0) = 1/4 -> weights 3/4, 1/4 at tau 1
    a = torch.tensor([[math.log(3.0), 0.0]])
    b = torch.tensor([[0.0, math.log(3.0)]])
    w = teacher_weights(torch.stack([a, b]), torch.tensor([0]), torch.tensor([True]), "classification", 1.0)
    torch.testing.assert_close(w, torch.tensor([[0.75, 0.25]]))
    # unlabeled: confidence (minus entropy); a certain teacher beats a uniform one
    sure, unsure = torch.tensor([[20.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    w = teacher_weights(torch.stack([sure, unsure]), torch.tensor([1]), torch.tensor([False]), "classification", 1.0)
    h = math.log(2.0)  # entropy of the uniform teacher; the sure one has ~0
    assert w[0, 0].item() == pytest.approx(math.exp(0) / (math.exp(0) + math.exp(-h)), rel=1e-4)
    # regression: labeled rows by squared error, unlabeled rows equal
    w = teacher_weights(torch.tensor([[1.0, 5.0], [3.0, 5.0]]), torch.tensor([1.0, 0.0]),
                        torch.tensor([True, False]), "regression", 1.0)
    torch.testing.assert_close(w[0], torch.softmax(torch.tensor([0.0, -4.0]), 0))
    torch.testing.assert_close(w[1], torch.tensor([0.5, 0.5]))
    # the per-row KD term averages to the batch KD term
    s, t = torch.randn(5, 3), torch.randn(5, 3)
    assert per_row_kd(s, t, "classification", 2.0).mean().item() == pytest.approx(kd_logits(s, t, 2.0).item(), rel=1e-5)


def test_hint_loss_golden() -> None:
    from fmtransfer.methods.losses import hint_loss

    s, t = torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 3.0]])
    assert hint_loss(s, t, normalize=False).item() == pytest.approx(0.5)
    # layer-normed: scale and shift of the teacher do not matter
    assert hint_loss(s, 100 * s + 7, normalize=True).item() == pytest.approx(0.0, abs=1e-6)


def test_per_row_kd_golden() -> None:
    from fmtransfer.methods.losses import per_row_kd

    # row 0: the kd_logits golden row (T = 1); row 1: equal logits, KL 0; regression: squared error per row
    s = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    t = torch.tensor([[math.log(3.0), 0.0], [1.0, 2.0]])
    per = per_row_kd(s, t, "classification", 1.0)
    expected = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    assert per[0].item() == pytest.approx(expected, rel=1e-6) and per[1].item() == pytest.approx(0.0, abs=1e-7)
    # T = 2 on logits scaled by 2: the same distributions, times T^2 = 4
    assert per_row_kd(2 * s, 2 * t, "classification", 2.0)[0].item() == pytest.approx(4 * expected, rel=1e-6)
    reg = per_row_kd(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.5, 2.0, 3.0]), "regression", 4.0)
    torch.testing.assert_close(reg, torch.tensor([0.25, 0.0, 1.0]))


def test_masked_mean_golden() -> None:
    from fmtransfer.methods.losses import masked_mean

    v = torch.tensor([[1.0, 2.0], [3.0, 10.0]])
    assert masked_mean(v, torch.tensor([[True, False], [True, True]])).item() == pytest.approx(14.0 / 3)
    assert masked_mean(v, torch.tensor([[1.0, 0.0], [0.0, 1.0]])).item() == pytest.approx(5.5)  # a float mask
    empty = masked_mean(v.requires_grad_(), torch.zeros(2, 2, dtype=torch.bool))  # no entry: exactly 0
    assert empty.item() == 0.0
    empty.backward()
    assert v.grad is not None and torch.all(v.grad == 0)


def test_committee_and_pick_teacher() -> None:
    from fmtransfer.errors import ConfigError
    from fmtransfer.methods.base import committee, pick_teacher

    assert committee(None, ["a", "b"], "multi_kd") == ["a", "b"]
    assert committee(["b", "b", "a"], ["a", "b"], "multi_kd") == ["b", "a"]  # duplicates dropped, order kept
    with pytest.raises(ConfigError, match=r"method.teachers: 'c' is not a configured teacher"):
        committee(["c"], ["a", "b"], "multi_kd")
    with pytest.raises(ConfigError, match="needs teachers"):
        committee(None, [], "multi_kd")
    assert pick_teacher(None, ["a", "b"], "kd") == "a" and pick_teacher("b", ["a", "b"], "kd") == "b"


def test_diverse_distill_hint_and_mixture_terms_golden() -> None:
    """DiverseDistill's per-row hint averages to FitNets' hint loss; the reliability target is the task loss
    of the alpha-weighted teacher mixture."""
    from fmtransfer.methods.losses import hint_loss, mixture_task_loss, per_row_hint

    s, t = torch.tensor([[1.0, 3.0], [0.0, 2.0]]), torch.tensor([[3.0, 1.0], [5.0, 9.0]])
    # LN of a 2-vector is (-1, 1) or (1, -1) (up to eps): row 0 is opposite (MSE 4), row 1 aligned (0)
    torch.testing.assert_close(per_row_hint(s, t), torch.tensor([4.0, 0.0]), atol=1e-4, rtol=0)
    assert per_row_hint(s, t).mean().item() == pytest.approx(hint_loss(s, t).item(), rel=1e-6)
    alpha = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    reg = mixture_task_loss(alpha, [torch.tensor([4.0, 2.0]), torch.tensor([0.0, 4.0])],
                            torch.tensor([2.0, 3.0]), "regression")
    torch.testing.assert_close(reg, torch.tensor([1.0, 0.0]))  # mixes 3.0 (y 2) and 3.0 (y 3)
    big = 30.0  # teacher 0 is sure of class 0, teacher 1 of class 1: the mixed probability of y is alpha[y]
    logits = [torch.tensor([[big, 0.0], [big, 0.0]]), torch.tensor([[0.0, big], [0.0, big]])]
    cls = mixture_task_loss(alpha, logits, torch.tensor([0, 1]), "classification")
    torch.testing.assert_close(cls, -torch.log(torch.tensor([0.75, 0.5])), atol=1e-5, rtol=0)


def test_product_target_is_the_weighted_geometric_mean_golden() -> None:
    """Two teachers over 2 classes, weights 0.75 / 0.25, T = 1: softmax(target) is p1^0.75 p2^0.25 normalised
    (hand-computed); for regression the weighted mean; at T = 2 each teacher's logits are softened first."""
    from fmtransfer.methods.losses import product_target
    w = torch.tensor([[0.75, 0.25]])
    t1, t2 = torch.tensor([[math.log(0.9), math.log(0.1)]]), torch.tensor([[math.log(0.2), math.log(0.8)]])
    q = product_target(w, [t1, t2], "classification", [1.0, 1.0], 1.0).softmax(-1)
    a, b = 0.9 ** 0.75 * 0.2 ** 0.25, 0.1 ** 0.75 * 0.8 ** 0.25  # 0.6179, 0.1682
    assert torch.allclose(q, torch.tensor([[a / (a + b), b / (a + b)]]), atol=1e-6)
    assert abs(float(q[0, 0]) - 0.78606) < 1e-4  # the arithmetic mixture would give 0.725
    reg = product_target(torch.tensor([[0.75, 0.25], [0.5, 0.5]]), [torch.tensor([4.0, 2.0]), torch.tensor([0.0, 4.0])],
                         "regression", [1.0, 1.0], 1.0)
    assert torch.allclose(reg, torch.tensor([3.0, 3.0]))
    soft = product_target(torch.tensor([[1.0, 0.0]]), [t1 * 2, t2], "classification", [2.0, 1.0], 3.0)
    assert torch.allclose((soft / 3.0).softmax(-1), torch.tensor([[0.9, 0.1]]), atol=1e-6)  # t1*2 at T=2 is t1
