"""Routed inference: what the encoder loop asks per layer (which width, who exits) and the per-example path
record that FLOPs counting and reports read (SPEC §6).

Routers: `StaticRouter(subnet)` (one width and depth for all), `GateRouter(gates, class_to_width)` (the gate
reading a layer group's input picks its width per example) and `EarlyExit(inner, ...)` (wraps either: at an
off-ramp, examples whose prediction is settled leave with the off-ramp's logits). `routed_forward` runs a
batch through `FlexEncoder.forward` under a router; each example follows its own path inside the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from .flops import executed_macs
from .modeling_flexbert import (
    FlexBertForSequenceClassification,
    Router,
    StaticRouter,
    Subnet,
    _rnd,
    extended_attention_mask,
    heads_kept,
    layers_kept,
)

__all__ = ["EarlyExit", "GateRouter", "PathRecord", "RoutedOutput", "StaticRouter", "default_off_ramps",
           "dynamic_forward", "prediction_entropy", "routed_forward", "shared_prefix_forwards", "static_output"]


# The entropy (nats) below which an example leaves at an off-ramp when no threshold is given or saved.
DEFAULT_EXIT_THRESHOLD = 0.57


def default_off_ramps(num_layers: int, depth_mult_list: Sequence[float]) -> list[int]:
    """Off-ramps after the last layer of every trained depth < 1 (L=12, depths .5/.75 -> layers 5 and 8)."""
    return sorted({_rnd(d, num_layers) - 1 for d in depth_mult_list if d < 1 and _rnd(d, num_layers) >= 1})


def prediction_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (natural log) of softmax(logits) per row: the classification exit rule's measure."""
    probs = logits.softmax(-1)
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


@dataclass
class PathRecord:
    """Per-example path of one routed batch. `active` holds the indices of the examples still running."""

    heads: torch.Tensor  # [B, L] heads run per layer (0 = not run)
    width_class: torch.Tensor  # [B, L] gate class chosen per layer (-1 = not run / no gate)
    exit_layer: torch.Tensor  # [B] number of layers executed
    gates_run: torch.Tensor  # [B]
    off_ramps_run: torch.Tensor  # [B]
    exited: torch.Tensor  # [B] bool: left at an off-ramp (so no final head ran)
    logits: torch.Tensor  # [B, num_labels] in the classifier's dtype (fp32 under autocast too): off-ramp
    #                       logits of exited examples, then the final head's
    active: torch.Tensor  # [B_active]
    num_gate_classes: int = 0

    @classmethod
    def start(cls, batch: int, config, num_layers_run: int, device, dtype) -> PathRecord:
        heads = torch.zeros(batch, config.num_hidden_layers, dtype=torch.long, device=device)
        gates_run = torch.zeros(batch, dtype=torch.long, device=device)
        return cls(heads=heads, width_class=torch.full_like(heads, -1),
                   exit_layer=torch.full((batch,), num_layers_run, dtype=torch.long, device=device),
                   gates_run=gates_run, off_ramps_run=torch.zeros_like(gates_run),
                   exited=torch.zeros(batch, dtype=torch.bool, device=device),
                   logits=torch.zeros(batch, config.num_labels, device=device, dtype=dtype),
                   active=torch.arange(batch, device=device))

    def ran(self, layer_index: int, heads: int | torch.Tensor) -> None:
        self.heads[self.active, layer_index] = heads

    def leave(self, gone: torch.Tensor, stay: torch.Tensor, layer_index: int, logits: torch.Tensor) -> None:
        """The active examples at positions `gone` exit after layer `layer_index` with `logits`; those at
        `stay` go on. Index tensors, not masks: a boolean mask index reads its count to the host each time."""
        leaving = self.active[gone]
        self.logits[leaving] = logits[gone].to(self.logits.dtype)  # autocast: half-precision logits
        self.exit_layer[leaving] = layer_index + 1
        self.exited[leaving] = True
        self.active = self.active[stay]


class GateRouter:
    """Gate g reads the [CLS] vector of the input of layer g*r (r = L/G; 0 = the embeddings) and picks the
    width of layers g*r .. g*r+r-1 per example: class c -> width class_to_width[c]."""

    def __init__(self, model: FlexBertForSequenceClassification, class_to_width: Sequence[float], num_layers: int,
                 record: PathRecord | None = None):
        config, gates = model.config, model.gates
        device = next(gates.parameters()).device
        self.gates, self.summary, self.num_layers, self.record = gates, model.summary, num_layers, record
        self.class_heads = torch.tensor([heads_kept(config, w) for w in class_to_width], device=device)
        self.layers_per_gate = config.num_hidden_layers // len(gates)
        self.current: torch.Tensor | None = None
        if record is not None:
            record.num_gate_classes = len(class_to_width)

    def heads(self, layer_index: int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        r = self.layers_per_gate
        if layer_index % r == 0:
            chosen = self.gates[layer_index // r](self.summary(hidden, mask)).argmax(-1)
            self.current = self.class_heads[chosen]
            if self.record is not None:
                self.record.width_class[self.record.active, layer_index : layer_index + r] = chosen[:, None]
                self.record.gates_run[self.record.active] += 1
        if self.record is not None:
            self.record.ran(layer_index, self.current)
        return self.current

    def after_layer(self, layer_index: int, hidden: torch.Tensor, mask: torch.Tensor) -> None:
        return None

    def keep(self, stay: torch.Tensor) -> None:
        self.current = self.current[stay]


class EarlyExit:
    """Wraps a router: after each off-ramp layer (before the last layer run), an example leaves with the
    off-ramp's prediction (pooler + classifier) when the entropy is strictly below `threshold`; for
    regression, when its prediction moved less than `threshold` since the previous off-ramp (so never at the
    first one)."""

    def __init__(self, inner: StaticRouter | GateRouter, off_ramps: Sequence[int], threshold: float,
                 classify: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], regression: bool,
                 record: PathRecord):
        self.inner, self.threshold, self.classify = inner, threshold, classify
        self.regression, self.record = regression, record
        self.num_layers = inner.num_layers
        self.off_ramps = {i for i in off_ramps if i < self.num_layers - 1}
        self.previous_prediction: torch.Tensor | None = None

    def heads(self, layer_index: int, hidden: torch.Tensor, mask: torch.Tensor) -> int | torch.Tensor:
        return self.inner.heads(layer_index, hidden, mask)

    def after_layer(self, layer_index: int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None:
        if layer_index not in self.off_ramps:
            return None
        logits = self.classify(hidden, mask)
        self.record.off_ramps_run[self.record.active] += 1
        if self.regression:
            prediction = logits.view(-1)
            leaving = torch.zeros_like(prediction, dtype=torch.bool)
            if self.previous_prediction is not None:
                leaving = (prediction - self.previous_prediction).abs() < self.threshold
        else:
            leaving = prediction_entropy(logits) < self.threshold
        gone = leaving.nonzero().view(-1)  # the one host sync of an off-ramp where nobody leaves
        if gone.numel() == 0:
            self.previous_prediction = prediction if self.regression else None
            return None
        stay = (~leaving).nonzero().view(-1)
        if self.regression:
            self.previous_prediction = prediction[stay]
        self.record.leave(gone, stay, layer_index, logits)
        if isinstance(self.inner, GateRouter):
            self.inner.keep(stay)
        return stay


@dataclass
class RoutedOutput:
    """Logits and path record of a routed batch. The executed MACs (`linear_macs`, `attention_macs`: `[B]`)
    are counted on first access, not in the forward: counting reads the widths to the host, which would
    otherwise stall the device inside a timed forward."""

    logits: torch.Tensor  # [B, num_labels]
    record: PathRecord
    config: object
    seq_len: int

    @cached_property
    def executed_macs(self) -> tuple[torch.Tensor, torch.Tensor]:
        return executed_macs(self.config, self.seq_len, self.record)

    @property
    def linear_macs(self) -> torch.Tensor:
        return self.executed_macs[0]

    @property
    def attention_macs(self) -> torch.Tensor:
        return self.executed_macs[1]

    def __getattr__(self, name: str):  # the record's fields (heads, width_class, exit_layer, ...) directly
        if name in ("record", "__setstate__"):
            raise AttributeError(name)
        return getattr(self.record, name)


@torch.no_grad()
def routed_forward(model: FlexBertForSequenceClassification, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   token_type_ids: torch.Tensor, router: Router, record: PathRecord) -> RoutedOutput:
    """One batch through the encoder loop under `router`; examples still running after the last layer get
    the final head. Returns the logits and the path record (and, on access, each example's executed MACs)."""
    states = model.encode(input_ids, attention_mask, token_type_ids, router)
    return _finish_paths(model, input_ids.shape[1], attention_mask, states[-1], record)


def _finish_paths(model: FlexBertForSequenceClassification, seq_len: int, attention_mask: torch.Tensor | None,
                  last_hidden: torch.Tensor, record: PathRecord) -> RoutedOutput:
    """The final head for the examples still running (their last hidden state `last_hidden`), then the MACs."""
    if record.active.numel():
        active_mask = None if attention_mask is None else attention_mask[record.active]
        record.logits[record.active] = model.classify(last_hidden, active_mask).to(record.logits.dtype)
    # a gate sets a whole layer group; layers cut off by depth or an exit did not run (masked_fill_: no sync)
    record.width_class.masked_fill_(record.heads == 0, -1)
    return RoutedOutput(record.logits, record, model.config, seq_len)


def static_output(model: FlexBertForSequenceClassification, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  states: Sequence[torch.Tensor], subnet: Subnet) -> RoutedOutput:
    """What `dynamic_forward(fixed_width=...)` returns for static `subnet`, from the hidden `states` of a run
    of a deeper subnet of the same width: depth subnets are prefixes of each other, so the state after layer
    `subnet.num_layers` is this subnet's last one bit for bit (one encoder pass serves every depth)."""
    record = PathRecord.start(input_ids.shape[0], model.config, subnet.num_layers, input_ids.device,
                              model.classifier.weight.dtype)
    record.heads[:, : subnet.num_layers] = subnet.num_heads
    return _finish_paths(model, input_ids.shape[1], attention_mask, states[subnet.num_layers], record)


def dynamic_forward(
    model: FlexBertForSequenceClassification,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor,
    class_to_width: Sequence[float] | None = None,
    fixed_width: float | None = None,
    depth_mult: float = 1.0,
    early_exit: bool = False,
    exit_threshold: float = DEFAULT_EXIT_THRESHOLD,
    off_ramps: Sequence[int] = (),
) -> RoutedOutput:
    """Inference in any mode: gates over `class_to_width` (or one `fixed_width`, no gate run) for the first
    rnd(depth_mult*L) layers, with early exit at `off_ramps` when `early_exit`."""
    config = model.config
    num_layers = layers_kept(config, depth_mult)
    record = PathRecord.start(input_ids.shape[0], config, num_layers, input_ids.device,
                              model.classifier.weight.dtype)
    if fixed_width is None:
        if model.gates is None:
            raise ValueError("the model has no gates; train them with train_gate.py --do_train first")
        router = GateRouter(model, class_to_width, num_layers, record)
    else:
        router = StaticRouter(model.subnet(fixed_width, depth_mult), record)
    if early_exit:
        router = EarlyExit(router, off_ramps, exit_threshold, model.classify, config.num_labels == 1, record)
    return routed_forward(model, input_ids, attention_mask, token_type_ids, router, record)


@torch.no_grad()
def shared_prefix_forwards(
    model: FlexBertForSequenceClassification,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor,
    settings: Sequence[dict],
    after_prefix: Callable[[], None] | None = None,
    after_setting: Callable[[], None] | None = None,
) -> list[RoutedOutput]:
    """What `dynamic_forward(..., **s)` returns for each gated setting `s` of `settings` (keyword arguments
    sharing `class_to_width` and `depth_mult`, differing in the exit rule), with the layers up to the first
    off-ramp where any of them may exit run once: until an example can leave, every setting runs the same
    gates and layers on the same batch, so each continues from the same hidden state and path record (bit for
    bit what its own run computes). `after_prefix` / `after_setting` are called when the shared layers and
    each setting's remainder are done (the evaluation's latency marks)."""
    config, first = model.config, settings[0]
    if any(s["fixed_width"] is not None or (list(s["class_to_width"]), s["depth_mult"]) !=
           (list(first["class_to_width"]), first["depth_mult"]) for s in settings):
        raise ValueError("shared_prefix_forwards takes gated settings of one class -> width map and depth")
    num_layers = layers_kept(config, first["depth_mult"])
    ramps = [i for s in settings if s["early_exit"] for i in s["off_ramps"] if i < num_layers - 1]
    shared = min(ramps) + 1 if ramps else num_layers  # layers [0, shared) run once
    if model.gates is None:
        raise ValueError("the model has no gates; train them with train_gate.py --do_train first")
    prefix = PathRecord.start(input_ids.shape[0], config, num_layers, input_ids.device, model.classifier.weight.dtype)
    gates = GateRouter(model, first["class_to_width"], shared, prefix)
    states = model.encode(input_ids, attention_mask, token_type_ids, gates)
    hidden, mask = states[-1], extended_attention_mask(attention_mask, states[0].dtype)  # encode's mask
    if after_prefix is not None:
        after_prefix()
    outputs = []
    for s in settings:
        record = PathRecord(**{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in vars(prefix).items()})
        router = GateRouter(model, s["class_to_width"], num_layers, record)
        router.current = gates.current
        if s["early_exit"]:
            router = EarlyExit(router, s["off_ramps"], s["exit_threshold"], model.classify, config.num_labels == 1,
                               record)
        last, last_mask = hidden, mask
        stay = router.after_layer(shared - 1, last, last_mask)  # the shared layers' last one, as the loop does
        if stay is not None:
            last, last_mask = last[stay], last_mask[stay]
        if last.shape[0] and shared < num_layers:
            last = model.bert.encoder(last, last_mask, router, start=shared)[-1]
        outputs.append(_finish_paths(model, input_ids.shape[1], attention_mask, last, record))
        if after_setting is not None:
            after_setting()
    return outputs
