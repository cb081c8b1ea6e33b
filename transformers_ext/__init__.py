"""Flexible BERT: width/depth-sliceable BERT, rewiring and grafting, FLOPs, gates and dynamic inference."""

from .export import export_subnet
from .flops import flops_summary, layer_macs, path_macs, subnet_macs
from .gates import DynamicOutput, default_off_ramps, dynamic_forward, gate_logits, gate_targets
from .modeling_flexbert import (
    FlexBertForSequenceClassification,
    FlexBertModel,
    head_size,
    heads_kept,
    layers_kept,
    neurons_kept,
)
from .rewiring import compute_importance, graft, graft_pairs, rewire

__all__ = [
    "DynamicOutput",
    "FlexBertForSequenceClassification",
    "FlexBertModel",
    "compute_importance",
    "default_off_ramps",
    "dynamic_forward",
    "export_subnet",
    "flops_summary",
    "gate_logits",
    "gate_targets",
    "graft",
    "graft_pairs",
    "head_size",
    "heads_kept",
    "layer_macs",
    "layers_kept",
    "neurons_kept",
    "path_macs",
    "rewire",
    "subnet_macs",
]
