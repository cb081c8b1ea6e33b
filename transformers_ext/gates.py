"""Width-gate training: the gates' inputs and targets, the Gumbel-softmax loss, the temperature schedule and
class weights (SPEC §5). Gated inference routes through `transformers_ext.inference.GateRouter`."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .modeling_flexbert import FlexBertForSequenceClassification


def layers_per_gate(model: FlexBertForSequenceClassification) -> int:
    """r = L / G: gate g reads hidden state g*r (0 = embeddings) and sets the width of layers g*r..g*r+r-1."""
    return model.config.num_hidden_layers // model.config.num_gates


def gate_cls_states(model: FlexBertForSequenceClassification, hidden_states: Sequence[torch.Tensor],
                    attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`[G, B, h]`: the vector (`model.summary`: [CLS] or the token mean) each of the G gates reads (gate g:
    hidden state g*r). The gate after the last layer would have no consumer and is never run."""
    r = layers_per_gate(model)
    return torch.stack([model.summary(hidden_states[g * r], attention_mask) for g in range(model.config.num_gates)])


def gates_on(gates: nn.ModuleList, cls_states: torch.Tensor) -> torch.Tensor:
    """`[G, B, C]` logits of gate g on `cls_states[g]`."""
    return torch.stack([gate(cls_states[g]) for g, gate in enumerate(gates)])


def gate_logits(model: FlexBertForSequenceClassification, hidden_states: Sequence[torch.Tensor],
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`[G, B, C]` logits of all G gates, each on the summary vector of the hidden state it reads."""
    return gates_on(model.gates, gate_cls_states(model, hidden_states, attention_mask))


def gate_targets(correct: torch.Tensor) -> torch.Tensor:
    """`correct[k, b]`: whether the all-layers-at-width-k model gets example b right, for the first C-1
    widths of the gate setting. Target = index of the first correct width, else C-1 (full width)."""
    fallback = torch.full(correct.shape[1:], correct.shape[0], dtype=torch.long, device=correct.device)
    return torch.where(correct.any(0), correct.long().argmax(0), fallback)


def is_correct(logits: torch.Tensor, labels: torch.Tensor, regression_threshold: float) -> torch.Tensor:
    if logits.shape[-1] == 1:
        return (logits.view(-1) - labels.view(-1).float()).abs() < regression_threshold
    return logits.argmax(-1) == labels.view(-1)


def gumbel_softmax_probs(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None,
    exp: torch.Tensor | None = None,
) -> torch.Tensor:
    """q = softmax((a + g) / tau), g = -log(Exp(1)) i.i.d. (no straight-through sample); `exp`: the Exp(1)
    draws when made beforehand, else drawn from `generator`."""
    if exp is None:
        exp = torch.empty_like(logits).exponential_(generator=generator)
    return F.softmax((logits - exp.log()) / temperature, dim=-1)


def every_width_gate_loss(probs: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted NLL of every example's target class, averaged over all G*B entries: used for the inputs of
    every width, so the width that produced a gate's input carries no information about the answer (the
    reference rule, `gate_loss`, rewards recognising it)."""
    picked = probs.gather(-1, targets.view(1, -1, 1).expand(probs.shape[0], -1, 1)).squeeze(-1)
    return (-picked.clamp_min(1e-6).log() * weights[targets].view(1, -1)).mean()


def gate_loss(probs: torch.Tensor, targets: torch.Tensor, class_index: int, weight: float) -> torch.Tensor:
    """SPEC §5.4: weighted NLL of the target class over the examples whose target is `class_index`,
    averaged over all G*B entries (other entries count as zero)."""
    picked = probs.gather(-1, targets.view(1, -1, 1).expand(probs.shape[0], -1, 1)).squeeze(-1)
    nll = -picked.clamp_min(1e-6).log() * (targets == class_index).float().view(1, -1)
    return weight * nll.mean()


def temperature_at(global_step: int, num_examples: int, batch_size: int, epochs: float, current: float) -> float:
    """SPEC §5.5: every 500 steps, tau = max(0.5, exp(-r * step)), r = -ln(0.3) / (N / B * E)."""
    if global_step > 0 and global_step % 500 == 0:
        rate = -math.log(0.3) / (num_examples / batch_size * epochs)
        return max(0.5, math.exp(-rate * global_step))
    return current


@torch.no_grad()
def gate_inputs_and_correctness(
    model: FlexBertForSequenceClassification,
    batch: Sequence[torch.Tensor],
    gate_setting: Sequence[float],
    regression_threshold: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every width of the gate setting (all layers at that width, full depth): the [CLS] vectors the
    G gates read, `[C, G, B, h]`, and whether that subnet gets each example right, `[C, B]`.

    With the backbone frozen and in eval mode these are fixed, so gate training can compute them once.
    """
    input_ids, attention_mask, token_type_ids, labels = batch[:4]
    cls_states, correct = [], []
    for w in gate_setting:
        out = model(input_ids, attention_mask, token_type_ids, subnet=model.subnet(w, 1.0))
        cls_states.append(gate_cls_states(model, out.hidden_states, attention_mask))
        correct.append(is_correct(out.logits, labels, regression_threshold))
    return torch.stack(cls_states), torch.stack(correct)


def histogram_class_weights(targets: torch.Tensor, num_classes: int) -> list[float]:
    """omega_c = N / (C * max(n_c, 1)) over the training targets (SPEC §5.4, our default)."""
    counts = torch.bincount(targets, minlength=num_classes).clamp_min(1).float()
    return (len(targets) / (num_classes * counts)).tolist()


# The reference's per-task weights (SPEC §5.4), for --gate_class_weights reference.
REFERENCE_CLASS_WEIGHTS = {
    "CoLA": [0.3, 14.0, 45.5, 7.5],
    "RTE": [0.3, 28.3, 155.6, 12.2],
    "SST-2": [0.3, 129.5, 495.2, 18.7],
    "MRPC": [0.3, 25.5, 101.9, 11.6],
    "MNLI": [0.3, 11.9, 35.6, 5.1],
    "QNLI": [0.3, 30.7, 111.4, 16.2],
    "QQP": [0.3, 59.9, 249.9, 52.1],
}
