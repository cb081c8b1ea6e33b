"""Export a static sub-network (one width, one depth) as a physically smaller HF checkpoint, or a gated model
(backbone + gates + off-ramps) cut to a depth with its routing fixed; `export_subnet.py` is the command line.

A deployable folder loads without this repository: a full-width subnet with [CLS] pooling is an ordinary
BERT (`stock_loadable`), which stock `AutoModelForSequenceClassification` builds; anything else ships the
modeling code (`REMOTE_CODE_FILES`, self-contained: torch and transformers only) with `auto_map` in
config.json, for `from_pretrained(folder, trust_remote_code=True)`."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch

from .inference import DEFAULT_EXIT_THRESHOLD
from .modeling_flexbert import FlexBertForSequenceClassification, head_size, layers_kept, make_subnet
from .routing import TRAINED_DEPTHS_KEY, record_trained_depths
from .saving import stock_loadable

# The modules a remote-code folder needs (the routed class imports the others with relative imports, which
# transformers resolves inside the folder).
REMOTE_CODE_FILES = ("modeling_flexbert.py", "flops.py", "inference.py", "modeling_routed.py", "pipeline_flexbert.py")
STATIC_CLASS = "modeling_flexbert.FlexBertForSequenceClassification"
ROUTED_CLASS = "modeling_routed.RoutedFlexBertForSequenceClassification"
# `pipeline("text-classification", model=folder, trust_remote_code=True)` builds this pipeline class (the stock
# one logs an error for any class outside the library's own table); `pipeline(model=folder, ...)` infers the task.
TEXT_CLASSIFICATION_PIPELINE = {"text-classification": {
    "impl": "pipeline_flexbert.FlexBertTextClassificationPipeline", "pt": ["AutoModelForSequenceClassification"]}}


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
    for key in ("gate_setting", "num_gates", "off_ramps", "gate_class_to_width", "exit_threshold", "routing",
                TRAINED_DEPTHS_KEY):
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


@torch.no_grad()
def export_gated(model: FlexBertForSequenceClassification, depth_mult: float, class_to_width: Sequence[float],
                 early_exit: bool = False, exit_threshold: float = DEFAULT_EXIT_THRESHOLD, off_ramps: Sequence[int] = ()
                 ) -> FlexBertForSequenceClassification:
    """A gated model cut to its first rnd(depth_mult*L) layers (full width: the gates choose the width per
    example), with the gates that read those layers, the off-ramps inside them and the routing
    (`config.routing`: class -> width map, early exit, threshold) that `RoutedFlexBertForSequenceClassification`
    runs in forward. Its logits equal `inference.dynamic_forward(model, ..., depth_mult=depth_mult, ...)`.
    ValueError: no gates, an impossible depth, or a depth that splits a gate's layer group."""
    if model.gates is None:
        raise ValueError("the model has no gates (train them with train_gate.py --do_train --training_phase "
                         "traingate), or give --width_mult to export a static subnet")
    config = copy.deepcopy(model.config)
    num_layers = layers_kept(config, depth_mult)
    r = config.num_hidden_layers // config.num_gates
    if num_layers % r:
        raise ValueError(f"depth {depth_mult:g} keeps {num_layers} layers, which splits the groups of {r} layers "
                         f"that each of the {config.num_gates} gates sets")
    for width in class_to_width:
        make_subnet(config, width, 1.0)  # every class's width keeps a head
    if len(class_to_width) != len(config.gate_setting):
        raise ValueError(f"{len(class_to_width)} widths for the {len(config.gate_setting)} gate classes")
    if num_layers != config.num_hidden_layers:  # the trained depths are fractions of the uncut model
        record_trained_depths(config, None)
    config.num_hidden_layers, config.num_gates = num_layers, num_layers // r
    kept_ramps = [i for i in off_ramps if i < num_layers - 1]  # an off-ramp after the last layer never fires
    config.off_ramps = kept_ramps
    config.gate_class_to_width = [float(w) for w in class_to_width]
    config.routing = {"class_to_width": [float(w) for w in class_to_width], "early_exit": bool(early_exit),
                      "exit_threshold": float(exit_threshold), "off_ramps": kept_ramps}
    small = FlexBertForSequenceClassification(config).to(model.classifier.weight.device).eval()
    source = model.state_dict()
    for name, tensor in small.state_dict().items():
        tensor.copy_(source[name])  # the first layers and gates, whole: names and shapes are the source's
    return small


def remote_code_files(folder: Path) -> None:
    """Copy the self-contained modeling code into an exported folder (for trust_remote_code loading)."""
    here = Path(__file__).resolve().parent
    for name in REMOTE_CODE_FILES:
        shutil.copyfile(here / name, folder / name)


def deploy_config_keys(config, routed: bool) -> dict:
    """config.json keys of an exported folder: `auto_map` to the shipped class and `custom_pipelines` to the
    shipped text-classification pipeline unless stock code computes it (then `architectures` is stock BERT's and
    no code is shipped). Returns the keys to set."""
    if not routed and stock_loadable(config):
        return {"architectures": ["BertForSequenceClassification"]}
    target = ROUTED_CLASS if routed else STATIC_CLASS
    return {"architectures": [target.rsplit(".", 1)[1]],
            "auto_map": {"AutoModelForSequenceClassification": target},
            "custom_pipelines": TEXT_CLASSIFICATION_PIPELINE}
