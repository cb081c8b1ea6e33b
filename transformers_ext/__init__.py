"""Flexible BERT: width/depth-sliceable BERT, rewiring and grafting, FLOPs, gates and routed inference."""

from .export import export_subnet
from .flops import executed_macs, flops_summary, layer_macs, path_macs, subnet_macs
from .gates import gate_logits, gate_targets
from .inference import (
    DEFAULT_EXIT_THRESHOLD,
    EarlyExit,
    GateRouter,
    PathRecord,
    RoutedOutput,
    StaticRouter,
    default_off_ramps,
    dynamic_forward,
    routed_forward,
    static_output,
)
from .modeling_flexbert import (
    FlexBertForSequenceClassification,
    FlexBertModel,
    Subnet,
    head_size,
    heads_kept,
    layers_kept,
    make_subnet,
    neurons_kept,
)
from .rewiring import compute_importance, graft, graft_pairs, rewire

__all__ = [
    "DEFAULT_EXIT_THRESHOLD",
    "EarlyExit",
    "FlexBertForSequenceClassification",
    "FlexBertModel",
    "GateRouter",
    "PathRecord",
    "RoutedOutput",
    "StaticRouter",
    "Subnet",
    "compute_importance",
    "default_off_ramps",
    "dynamic_forward",
    "executed_macs",
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
    "make_subnet",
    "neurons_kept",
    "path_macs",
    "rewire",
    "routed_forward",
    "static_output",
    "subnet_macs",
]
