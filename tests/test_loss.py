"""Bradley-Terry losses against their closed form."""

import math

import torch

from polar.loss import finetune_loss, pair_accuracy, pretrain_loss


def test_pretrain_loss_closed_form():
    pos, neg = torch.tensor([2.0, 0.0, -1.0]), torch.tensor([0.0, 0.0, 1.0])
    expected = sum(-math.log(1 / (1 + math.exp(-(p - n)))) for p, n in zip(pos.tolist(), neg.tolist())) / 3
    assert abs(pretrain_loss(pos, neg).item() - expected) < 1e-6
    assert abs(pretrain_loss(torch.zeros(4), torch.zeros(4)).item() - math.log(2)) < 1e-6


def test_loss_is_float32_even_for_bf16_inputs():
    pos = torch.tensor([30.0, 1.0], dtype=torch.bfloat16)
    neg = torch.tensor([-30.0, 1.0], dtype=torch.bfloat16)
    out = finetune_loss(pos, neg)
    assert out.dtype == torch.float32 and torch.isfinite(out)


def test_gradient_pushes_positive_up():
    pos, neg = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    pretrain_loss(pos, neg).backward()
    assert (pos.grad < 0).all() and (neg.grad > 0).all()


def test_pair_accuracy_counts_strict_wins():
    assert pair_accuracy(torch.tensor([1.0, 0.0, 2.0, 0.5]), torch.tensor([0.0, 0.0, 3.0, 0.0])).item() == 0.5
