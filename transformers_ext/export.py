"""Export a static sub-network (one width, one depth) as a physically smaller HF checkpoint."""

from __future__ import annotations

import copy

import torch

from .modeling_flexbert import FlexBertForSequenceClassification, head_size, make_subnet


@torch.no_grad()
def export_subnet(
    model: FlexBertForSequenceClassification, width_mult: float, depth_mult: float
) -> FlexBertForSequenceClassification:
    """A new, smaller model computing exactly `model` at (width_mult, depth_mult).

    Its config keeps `hidden_size` and records the original head size in `attention_head_size`, with
    `num_attention_heads`, `intermediate_size` and `num_hidden_layers` reduced; `from_pretrained` of the
    saved folder rebuilds it in our class. Gates are not exported (a static subnet has no routing).
    """
    config = copy.deepcopy(model.config)
    subnet = make_subnet(config, width_mult, depth_mult)
    num_heads, num_neurons, num_layers = subnet.num_heads, subnet.num_neurons, subnet.num_layers
    rows = num_heads * head_size(config)
    config.attention_head_size = head_size(config)
    config.num_attention_heads = num_heads
    config.intermediate_size = num_neurons
    config.num_hidden_layers = num_layers
    for key in ("gate_setting", "num_gates", "off_ramps"):
        if hasattr(config, key):
            delattr(config, key)
    small = FlexBertForSequenceClassification(config).to(model.classifier.weight.device).eval()

    kept_rows = {"query": rows, "key": rows, "value": rows, "intermediate.dense": num_neurons}
    kept_cols = {"attention.output.dense": rows, "output.dense": num_neurons}
    source = model.state_dict()
    target = small.state_dict()
    for name, tensor in target.items():
        src = source[name]
        stem = name.rsplit(".", 1)[0]
        if ".layer." in name and any(stem.endswith(k) for k in kept_rows):
            n = next(v for k, v in kept_rows.items() if stem.endswith(k))
            src = src[:n]
        elif ".layer." in name and name.endswith("weight") and any(stem.endswith(k) for k in kept_cols):
            # attention.output.dense is matched before output.dense (same suffix)
            n = next(v for k, v in kept_cols.items() if stem.endswith(k))
            src = src[:, :n]
        tensor.copy_(src)
    return small
