"""Analytic multiply-accumulate (MAC) counts of the path a forward pass executes (SPEC §6.5).

Two figures per path:
- `linear` MACs: every dense layer (sliced Q/K/V/attention-output/FFN over all `seq_len` positions,
  padding included; gates, pooler, classifier and executed off-ramps on the [CLS] vector). This is the
  reference's unit, reported as `flops = 2 * linear / 1e10` for comparison with the paper's tables.
- `attention` MACs: the two attention products `2 * T^2 * k * dh` per layer. linear + attention is what
  `torch.utils.flop_counter.FlopCounterMode` counts (as 2 * MACs) on the eager model.
Not counted (by either): softmax, LayerNorm, GELU, embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import BertConfig

from .modeling_flexbert import head_size, make_subnet, neurons_kept


def layer_macs(config: BertConfig, seq_len: int, num_heads: int) -> tuple[int, int]:
    """(linear, attention) MACs of one layer run with `num_heads` heads (FFN neurons follow the heads)."""
    h, dh = config.hidden_size, head_size(config)
    f = neurons_kept(config, num_heads)
    linear = seq_len * (4 * h * num_heads * dh + 2 * h * f)
    attention = 2 * seq_len * seq_len * num_heads * dh
    return linear, attention


def path_macs(
    config: BertConfig,
    seq_len: int,
    heads_per_layer: Sequence[int],
    num_gates_run: int = 0,
    num_off_ramps_run: int = 0,
    num_gate_classes: int = 0,
    exited: bool = False,
) -> dict[str, int]:
    """MACs of one example's executed path: the layers it ran (heads per layer), gates and off-ramps.
    An example that `exited` at an off-ramp took that off-ramp's prediction: no final head runs."""
    linear = attention = 0
    for num_heads in heads_per_layer:
        lin, att = layer_macs(config, seq_len, num_heads)
        linear, attention = linear + lin, attention + att
    final = head_macs(config, config.num_labels)
    if not exited:
        linear += final
    linear += num_gates_run * head_macs(config, num_gate_classes) + num_off_ramps_run * final
    return {"linear": linear, "attention": attention, "total": linear + attention}


def head_macs(config: BertConfig, num_labels: int) -> int:
    """One pooler + classifier (final head or off-ramp; a gate with `num_labels` = its classes) on [CLS]."""
    h = config.hidden_size
    return h * h + h * num_labels


def subnet_macs(
    config: BertConfig, width_mult: float, depth_mult: float, seq_len: int, num_gates_run: int = 0
) -> dict[str, int]:
    """MACs of the static sub-network (width_mult, depth_mult) on one example of length `seq_len`."""
    subnet = make_subnet(config, width_mult, depth_mult)
    num_classes = len(getattr(config, "gate_setting", None) or [])
    return path_macs(config, seq_len, [subnet.num_heads] * subnet.num_layers, num_gates_run, 0, num_classes)


def executed_macs(config: BertConfig, seq_len: int, record) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example (linear, attention) MACs `[B]` of the paths in an `inference.PathRecord`: the layers each
    example ran at their widths, the gates and off-ramps it ran, and the final head unless it exited."""
    heads = record.heads
    linear = torch.zeros(heads.shape[0], dtype=torch.long, device=heads.device)
    attention = torch.zeros_like(linear)
    for k in heads.unique().tolist():
        if k:
            lin, att = layer_macs(config, seq_len, k)
            count = (heads == k).sum(1)
            linear += count * lin
            attention += count * att
    final = head_macs(config, config.num_labels)
    linear += (~record.exited).long() * final
    linear += record.gates_run * head_macs(config, record.num_gate_classes) + record.off_ramps_run * final
    return linear, attention


def flops_summary(path: dict[str, float], full: dict[str, float]) -> dict[str, float]:
    """Report a (mean) path count in both units and relative to the full model."""
    return {
        "flops": 2 * path["linear"] / 1e10,  # reference unit (linear layers only)
        "true_flops": 2 * path["total"],
        "relative_flops": path["total"] / full["total"],
        "relative_linear_flops": path["linear"] / full["linear"],
    }
