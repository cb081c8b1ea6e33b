"""Distillation losses of the width (dynabertw) and depth (dynabert) phases (SPEC §4.2, §4.3)."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

import torch
import torch.nn.functional as F


def logit_kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Soft cross-entropy at temperature 1, batch mean: -sum_c softmax(z_t)_c * log_softmax(z_s)_c.
    Regression (one output): MSE between the two predictions."""
    if student_logits.shape[-1] == 1:
        return F.mse_loss(student_logits.view(-1), teacher_logits.view(-1))
    return -(F.softmax(teacher_logits, -1) * F.log_softmax(student_logits, -1)).sum(-1).mean()


def teacher_layer_map(num_student_layers: int, depth_mult: float, num_layers: int) -> list[int]:
    """m(j) = floor(j / d) for j < n, m(n) = L: which teacher hidden state each student state matches
    (index 0 = embeddings). Exact decimal arithmetic: floor(3 / 0.75) = 4, not 3.9999."""
    d = Decimal(repr(float(depth_mult)))
    return [int(Decimal(j) / d) for j in range(num_student_layers)] + [num_layers]


def hidden_mse_loss(
    student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor], layer_map: Sequence[int]
) -> torch.Tensor:
    """Sum over student states j of MSE(h_s^j, h_t^{m(j)}), each a mean over all [B, T, h] elements."""
    return sum(F.mse_loss(s, teacher_states[m]) for s, m in zip(student_states, layer_map, strict=True))
