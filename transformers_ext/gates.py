"""Width gates, their training targets, and gated / early-exit inference with per-example routing
(SPEC §5, §6, §10.3)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .flops import layer_macs
from .modeling_flexbert import (
    FlexBertForSequenceClassification,
    _rnd,
    extended_attention_mask,
    heads_kept,
    layers_kept,
    neurons_kept,
)


def layers_per_gate(model: FlexBertForSequenceClassification) -> int:
    """r = L / G: gate g reads hidden state g*r (0 = embeddings) and sets the width of layers g*r..g*r+r-1."""
    return model.config.num_hidden_layers // model.config.num_gates


def default_off_ramps(num_layers: int, depth_mult_list: Sequence[float]) -> list[int]:
    """Off-ramps after the last layer of every trained depth < 1 (L=12, depths .5/.75 -> layers 5 and 8)."""
    return sorted({_rnd(d, num_layers) - 1 for d in depth_mult_list if d < 1 and _rnd(d, num_layers) >= 1})


def gate_logits(model: FlexBertForSequenceClassification, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
    """`[G, B, C]` logits of all G gates, each on the [CLS] vector of the hidden state it reads. The gate
    after the last layer would have no consumer and is never run."""
    r = layers_per_gate(model)
    return torch.stack([gate(hidden_states[g * r][:, 0]) for g, gate in enumerate(model.gates)])


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
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """q = softmax((a + g) / tau), g = -log(Exp(1)) i.i.d. (no straight-through sample)."""
    exp = torch.empty_like(logits).exponential_(generator=generator)
    return F.softmax((logits - exp.log()) / temperature, dim=-1)


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


@dataclass
class DynamicOutput:
    logits: torch.Tensor  # [B, num_labels]
    heads: torch.Tensor  # [B, L] heads run per layer (0 = not run)
    width_class: torch.Tensor  # [B, L] gate class chosen per layer (-1 = not run / no gate)
    exit_layer: torch.Tensor  # [B] number of layers executed
    gates_run: torch.Tensor  # [B]
    off_ramps_run: torch.Tensor  # [B]
    linear_macs: torch.Tensor  # [B]
    attention_macs: torch.Tensor  # [B]


@torch.no_grad()
def dynamic_forward(
    model: FlexBertForSequenceClassification,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor,
    class_to_width: Sequence[float] | None = None,
    fixed_width: float | None = None,
    depth_mult: float = 1.0,
    early_exit: bool = False,
    exit_threshold: float = 0.57,
    off_ramps: Sequence[int] = (),
) -> DynamicOutput:
    """Gated, early-exit inference with each example routed on its own path inside the batch.

    Per example: embeddings -> in-gate picks the width of the first layer group -> for each layer: run it
    at the chosen width; at an off-ramp, exit if the entropy of pooler+classifier is below the threshold
    (regression: if the prediction moved less than the threshold since the previous off-ramp); otherwise
    the next gate (if the layer group ends here) picks the next width. Per layer, active examples are
    grouped by width, each group runs once, and results are scattered back; exited examples leave the
    active set with their logits. `fixed_width` (static / exit-only modes) runs no gate.
    """
    config = model.config
    device = input_ids.device
    batch, seq_len = input_ids.shape
    num_layers = layers_kept(config, depth_mult)
    if fixed_width is None:
        if model.gates is None:
            raise ValueError("the model has no gates; train them with train_gate.py --do_train first")
        class_heads = torch.tensor([heads_kept(config, w) for w in class_to_width], device=device)
        r = layers_per_gate(model)
    regression = config.num_labels == 1
    ramps = {i for i in off_ramps if i < num_layers - 1} if early_exit else set()

    # `hidden`, `mask` and `current` hold the active examples only (rows of `active`).
    hidden = model.embed(input_ids, token_type_ids)
    mask = extended_attention_mask(attention_mask, hidden.dtype)
    logits = hidden.new_zeros(batch, config.num_labels)
    heads = torch.zeros(batch, config.num_hidden_layers, dtype=torch.long, device=device)
    width_class = torch.full_like(heads, -1)
    exit_layer = torch.full((batch,), num_layers, dtype=torch.long, device=device)
    gates_run = torch.zeros(batch, dtype=torch.long, device=device)
    off_ramps_run = torch.zeros_like(gates_run)
    active = torch.arange(batch, device=device)
    current = torch.full((batch,), heads_kept(config, fixed_width) if fixed_width is not None else 0, device=device)
    previous_ramp_pred = None

    for i in range(num_layers):
        if fixed_width is None and i % r == 0:
            chosen = model.gates[i // r](hidden[:, 0]).argmax(-1)
            current = class_heads[chosen]
            width_class[active, i : i + r] = chosen[:, None]
            gates_run[active] += 1
        layer = model.bert.encoder.layer[i]
        groups = current.unique().tolist()
        if len(groups) == 1:
            hidden = layer(hidden, mask, groups[0], neurons_kept(config, groups[0]))
        else:
            out = torch.empty_like(hidden)
            for num_heads in groups:
                sel = (current == num_heads).nonzero().view(-1)
                out[sel] = layer(hidden[sel], mask[sel], num_heads, neurons_kept(config, num_heads))
            hidden = out
        heads[active, i] = current
        if i in ramps:
            ramp_logits = model.classify(hidden)
            off_ramps_run[active] += 1
            if regression:
                pred = ramp_logits.view(-1)
                leave = torch.zeros_like(pred, dtype=torch.bool)
                if previous_ramp_pred is not None:
                    leave = (pred - previous_ramp_pred).abs() < exit_threshold
                previous_ramp_pred = pred[~leave]
            else:
                probs = ramp_logits.softmax(-1)
                entropy = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
                leave = entropy < exit_threshold
            if leave.any():
                logits[active[leave]] = ramp_logits[leave]
                exit_layer[active[leave]] = i + 1
                stay = ~leave
                active, hidden, mask, current = active[stay], hidden[stay], mask[stay], current[stay]
                if active.numel() == 0:
                    break
    if active.numel():
        logits[active] = model.classify(hidden)
    width_class[heads == 0] = -1  # a gate sets a whole group; layers cut off by depth or an exit did not run

    # Executed-path MACs per example (analytic; SPEC §6.5).
    h, labels = config.hidden_size, config.num_labels
    num_classes = len(class_to_width) if class_to_width is not None else 0
    head_values = heads.unique().tolist()
    per_heads = {k: layer_macs(config, seq_len, k) if k else (0, 0) for k in head_values}
    linear = torch.zeros(batch, dtype=torch.long, device=device)
    attention = torch.zeros_like(linear)
    for k, (lin, att) in per_heads.items():
        count = (heads == k).sum(1)
        linear += count * lin
        attention += count * att
    # An exited example's prediction is its off-ramp's (pooler + classifier): no final head for it.
    linear += (exit_layer == num_layers).long() * (h * h + h * labels)
    linear += gates_run * (h * h + h * num_classes) + off_ramps_run * (h * h + h * labels)
    return DynamicOutput(logits, heads, width_class, exit_layer, gates_run, off_ramps_run, linear, attention)


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
    r = layers_per_gate(model)
    width, depth = model.width_mult, model.depth_mult
    cls_states, correct = [], []
    for w in gate_setting:
        model.set_width_depth(w, 1.0)
        out = model(input_ids, attention_mask, token_type_ids)
        cls_states.append(torch.stack([out.hidden_states[g * r][:, 0] for g in range(model.config.num_gates)]))
        correct.append(is_correct(out.logits, labels, regression_threshold))
    model.set_width_depth(width, depth)
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
