"""Bradley-Terry losses of POLAR, as pure functions on reward tensors (float32).

Pre-training: L = -log sigmoid(r(P, A1, A2) - r(P, A1, B1)), A1 the reference, A2 a
second trajectory of the same policy (positive), B1 a trajectory of another policy.
Fine-tuning on a ranked triple A > B > C: L = -log sigmoid(r(P, A, B) - r(P, A, C)).
Both are the same function of (chosen, rejected) rewards; the names say which is which.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean -log sigmoid(chosen - rejected), computed in float32."""
    return -F.logsigmoid(chosen.float() - rejected.float()).mean()


def pretrain_loss(r_positive: torch.Tensor, r_negative: torch.Tensor) -> torch.Tensor:
    """POLAR pre-training: positive = same policy as the reference, negative = another."""
    return bradley_terry_loss(r_positive, r_negative)


def finetune_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Preference fine-tuning with the best answer A as reference: r(P,A,B) vs r(P,A,C)."""
    return bradley_terry_loss(r_chosen, r_rejected)


def pair_accuracy(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Share of pairs where the chosen candidate scores strictly above the rejected one."""
    return (chosen.float() > rejected.float()).float().mean()
