"""Head/neuron importance, rewiring (most important first) and neural grafting (SPEC §2.3, §3)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .distributed import map_shared
from .modeling_flexbert import FlexBertForSequenceClassification, head_size
from .progress import progress_bar


def compute_importance(
    model: FlexBertForSequenceClassification,
    batches: Iterable[tuple[torch.Tensor, ...]],
    device: torch.device | str = "cpu",
    max_examples: int | None = None,
    rank: int = 0,
    world: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Head importance `[L, H]` (|dloss/dhead_mask|, Michel et al.) and FFN-neuron importance `[L, I]`
    (first-order Taylor), summed over batches with gradients zeroed per batch (`sum_b |g_b|`).

    Runs the full-width, full-depth model in eval mode on gold labels; leaves no gradients behind and
    restores the model's train/eval mode. Under torchrun (`world` > 1, every rank calling with the same
    batches and an identical model) each rank computes every `world`-th batch and every rank sums all the
    batches' scores in batch order: the scores are one process's, identical on every replica.
    """
    config = model.config
    num_layers, num_heads = config.num_hidden_layers, config.num_attention_heads
    was_training = model.training
    model.eval()
    head_mask = torch.ones(num_layers, num_heads, device=device, requires_grad=True)

    def zeros() -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.zeros(num_layers, num_heads, device=device),
                torch.zeros(num_layers, config.intermediate_size, device=device))

    head_importance, neuron_importance = zeros()
    layers = model.bert.encoder.layer

    def batch_importance(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        input_ids, attention_mask, token_type_ids, labels = (t.to(device) for t in batch[:4])
        model.zero_grad(set_to_none=True)
        head_mask.grad = None
        loss = model(input_ids, attention_mask, token_type_ids, labels=labels, head_mask=head_mask).loss
        loss.backward()
        neurons = []
        for layer in layers:
            w1, w2 = layer.intermediate.dense, layer.output.dense
            taylor_in = (w1.weight * w1.weight.grad).sum(dim=1) + w1.bias * w1.bias.grad
            taylor_out = (w2.weight * w2.weight.grad).sum(dim=0)
            neurons.append((taylor_in.abs() + taylor_out.abs()).detach())
        return head_mask.grad.abs().detach(), torch.stack(neurons)

    bar = progress_bar(total=max_examples, desc="importance", unit="ex", leave=False, disable=rank != 0)
    with torch.enable_grad():
        for batch, (heads, neurons) in map_shared(_first_examples(batches, max_examples), batch_importance, zeros,
                                                  rank, world):
            head_importance += heads
            neuron_importance += neurons
            bar.update(batch[0].shape[0])
    bar.close()
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return head_importance, neuron_importance


def _first_examples(batches: Iterable[tuple[torch.Tensor, ...]], max_examples: int | None
                    ) -> Iterator[tuple[torch.Tensor, ...]]:
    """The batches until `max_examples` examples are covered (the last one whole; None: all)."""
    seen = 0
    for batch in batches:
        if max_examples is not None and seen >= max_examples:
            return
        yield batch
        seen += batch[0].shape[0]


def _head_rows(head_order: torch.Tensor, dh: int) -> torch.Tensor:
    """Row indices of the Q/K/V blocks of heads `head_order` (head j = rows j*dh ... (j+1)*dh-1)."""
    return (head_order[:, None] * dh + torch.arange(dh, device=head_order.device)).reshape(-1)


@torch.no_grad()
def _permute_layer(layer: nn.Module, head_rows: torch.Tensor, neuron_order: torch.Tensor) -> None:
    attn = layer.attention
    for linear in (attn.self.query, attn.self.key, attn.self.value):
        linear.weight.copy_(linear.weight[head_rows])
        linear.bias.copy_(linear.bias[head_rows])
    attn.output.dense.weight.copy_(attn.output.dense.weight[:, head_rows])
    inter, out = layer.intermediate.dense, layer.output.dense
    inter.weight.copy_(inter.weight[neuron_order])
    inter.bias.copy_(inter.bias[neuron_order])
    out.weight.copy_(out.weight[:, neuron_order])


def rewire(
    model: FlexBertForSequenceClassification, head_importance: torch.Tensor, neuron_importance: torch.Tensor
) -> None:
    """Reorder every layer's heads and FFN neurons by importance, descending. The full-width function is
    unchanged (a permutation of heads / neurons)."""
    dh = head_size(model.config)
    for i, layer in enumerate(model.bert.encoder.layer):
        head_order = torch.argsort(head_importance[i], descending=True, stable=True)
        neuron_order = torch.argsort(neuron_importance[i], descending=True, stable=True)
        device = layer.intermediate.dense.weight.device
        _permute_layer(layer, _head_rows(head_order, dh).to(device), neuron_order.to(device))


def graft_pairs(importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(weak, strong) index pairs: the i-th weakest unit paired with the i-th strongest, floor(n/2) each,
    disjoint (an odd count leaves the median untouched)."""
    order = torch.argsort(importance, descending=True, stable=True)
    half = importance.numel() // 2
    strong = order[:half]
    weak = order.flip(0)[:half]
    return weak, strong


@torch.no_grad()
def graft(
    model: FlexBertForSequenceClassification,
    head_importance: torch.Tensor,
    neuron_importance: torch.Tensor,
    keep: float = 0.9,
) -> None:
    """Neural grafting: `new[weak] = keep * old[weak] + (1 - keep) * old[strong]` for the weakest half of
    heads (Q/K/V rows + bias, attention-output columns) and FFN neurons (intermediate rows + bias, FFN-output
    columns). Output biases untouched, no reordering; every read uses pre-graft weights."""
    dh = head_size(model.config)
    for i, layer in enumerate(model.bert.encoder.layer):
        device = layer.intermediate.dense.weight.device
        weak_h, strong_h = (idx.to(device) for idx in graft_pairs(head_importance[i]))
        weak_rows, strong_rows = _head_rows(weak_h, dh), _head_rows(strong_h, dh)
        weak_n, strong_n = (idx.to(device) for idx in graft_pairs(neuron_importance[i]))
        attn = layer.attention
        row_blended = [
            (attn.self.query.weight, weak_rows, strong_rows),
            (attn.self.query.bias, weak_rows, strong_rows),
            (attn.self.key.weight, weak_rows, strong_rows),
            (attn.self.key.bias, weak_rows, strong_rows),
            (attn.self.value.weight, weak_rows, strong_rows),
            (attn.self.value.bias, weak_rows, strong_rows),
            (layer.intermediate.dense.weight, weak_n, strong_n),
            (layer.intermediate.dense.bias, weak_n, strong_n),
        ]
        for tensor, weak, strong in row_blended:
            tensor[weak] = keep * tensor[weak] + (1 - keep) * tensor[strong]
        for tensor, weak, strong in [
            (attn.output.dense.weight, weak_rows, strong_rows),
            (layer.output.dense.weight, weak_n, strong_n),
        ]:
            tensor[:, weak] = keep * tensor[:, weak] + (1 - keep) * tensor[:, strong]
