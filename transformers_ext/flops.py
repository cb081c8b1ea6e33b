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

from transformers import BertConfig

from .modeling_flexbert import head_size, heads_kept, layers_kept, neurons_kept


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
    h, labels = config.hidden_size, config.num_labels
    linear = attention = 0
    for num_heads in heads_per_layer:
        lin, att = layer_macs(config, seq_len, num_heads)
        linear, attention = linear + lin, attention + att
    if not exited:
        linear += h * h + h * labels  # final pooler + classifier on [CLS]
    linear += num_gates_run * (h * h + h * num_gate_classes)
    linear += num_off_ramps_run * (h * h + h * labels)
    return {"linear": linear, "attention": attention, "total": linear + attention}


def subnet_macs(
    config: BertConfig, width_mult: float, depth_mult: float, seq_len: int, num_gates_run: int = 0
) -> dict[str, int]:
    """MACs of the static sub-network (width_mult, depth_mult) on one example of length `seq_len`."""
    num_heads = heads_kept(config, width_mult)
    num_layers = layers_kept(config, depth_mult)
    num_classes = len(getattr(config, "gate_setting", None) or [])
    return path_macs(config, seq_len, [num_heads] * num_layers, num_gates_run, 0, num_classes)


def flops_summary(path: dict[str, float], full: dict[str, float]) -> dict[str, float]:
    """Report a (mean) path count in both units and relative to the full model."""
    return {
        "flops": 2 * path["linear"] / 1e10,  # reference unit (linear layers only)
        "true_flops": 2 * path["total"],
        "relative_flops": path["total"] / full["total"],
        "relative_linear_flops": path["linear"] / full["linear"],
    }
