"""The distillation losses against references computed by hand (explicit sums, no F.kl_div)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_shrink.distillation import (
    attention_loss,
    hidden_cosine_loss,
    hidden_mse_loss,
    kl_divergence_loss,
)


def test_kl_matches_hand_computed_two_class_example():
    # One example, T = 2: p_t = softmax([2, 0] / 2) = softmax([1, 0]), p_s = softmax([0, 0] / 2) = [.5, .5].
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[2.0, 0.0]])
    e = math.e
    p1, p2 = e / (e + 1), 1 / (e + 1)
    kl = p1 * math.log(p1 / 0.5) + p2 * math.log(p2 / 0.5)
    assert kl_divergence_loss(student, teacher, temperature=2.0).item() == pytest.approx(4 * kl, rel=1e-6)


def test_kl_batch_mean_temperature_and_mask():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    t = 3.0
    total, count = 0.0, 0
    for b in range(3):
        for s in range(4):
            if not mask[b, s]:
                continue
            ps = [math.exp(v / t) for v in student[b, s].tolist()]
            pt = [math.exp(v / t) for v in teacher[b, s].tolist()]
            ps = [v / sum(ps) for v in ps]
            pt = [v / sum(pt) for v in pt]
            total += sum(q * math.log(q / p) for p, q in zip(ps, pt, strict=True))
            count += 1
    expected = t * t * total / count
    assert kl_divergence_loss(student, teacher, t, mask).item() == pytest.approx(expected, rel=1e-5)
    # Without a mask every position counts; identical logits give zero.
    assert kl_divergence_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-6)
    unmasked = kl_divergence_loss(student, teacher, t)
    assert unmasked.item() != pytest.approx(expected, rel=1e-3)


def test_kl_gradient_flows_to_student_only():
    student = torch.randn(4, 3, requires_grad=True)
    teacher = torch.randn(4, 3)
    kl_divergence_loss(student, teacher, 2.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    # d/ds of T^2 * KL = T * (softmax(s/T) - softmax(t/T)) / N
    expected = 2.0 * (torch.softmax(student.detach() / 2, -1) - torch.softmax(teacher / 2, -1)) / 4
    torch.testing.assert_close(student.grad, expected)


def test_hidden_mse_and_cosine_by_hand():
    s = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[1.0, 1.0], [3.0, 0.0]]])
    t = torch.tensor([[[0.0, 0.0], [0.0, 1.0]], [[1.0, 1.0], [0.0, 3.0]]])
    # per-token mean squared error over the 2 features
    per_token = [[(1 + 0) / 2, (0 + 1) / 2], [0.0, (9 + 9) / 2]]
    assert hidden_mse_loss(s, t).item() == pytest.approx(sum(map(sum, per_token)) / 4)
    mask = torch.tensor([[1, 1], [1, 0]])
    assert hidden_mse_loss(s, t, mask).item() == pytest.approx((0.5 + 0.5 + 0.0) / 3)
    # cosines: [1,0]·[0,0] -> 0 (eps), [0,2]·[0,1] -> 1, [1,1]·[1,1] -> 1, [3,0]·[0,3] -> 0
    assert hidden_cosine_loss(s, t).item() == pytest.approx((1 + 0 + 0 + 1) / 4, abs=1e-6)
    assert hidden_cosine_loss(s, t, mask).item() == pytest.approx(1 / 3, abs=1e-6)


def test_attention_loss_same_and_different_head_counts():
    g = torch.Generator().manual_seed(1)
    s = torch.softmax(torch.randn(2, 2, 3, 3, generator=g), -1)
    t = torch.softmax(torch.randn(2, 2, 3, 3, generator=g), -1)
    assert attention_loss(s, t).item() == pytest.approx(((s - t) ** 2).sum().item() / s.numel(), rel=1e-6)
    t4 = torch.softmax(torch.randn(2, 4, 3, 3, generator=g), -1)
    s_mean = (s[:, 0] + s[:, 1]) / 2
    t_mean = (t4[:, 0] + t4[:, 1] + t4[:, 2] + t4[:, 3]) / 4
    expected = ((s_mean - t_mean) ** 2).sum().item() / s_mean.numel()
    assert attention_loss(s, t4).item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "fn", [kl_divergence_loss, hidden_mse_loss, hidden_cosine_loss, attention_loss], ids=lambda f: f.__name__
)
def test_shape_mismatch_names_both_sides(fn):
    with pytest.raises(ValueError, match=r"student have shape \(2, 3, 4\).*teacher have shape \(2, 3, 5\)"):
        fn(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5))
