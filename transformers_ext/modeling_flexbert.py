"""A BERT whose width (heads + FFN neurons per layer) and depth (number of layers) are run-time settings.

Parameter names are exactly Hugging Face's (`bert.encoder.layer.{i}.attention.self.query`, ...), so any HF
BERT folder or hub id loads with `from_pretrained`, and `save_pretrained` writes an ordinary HF folder.

Width slicing takes the *first* `k` heads and `f` FFN neurons of every layer as views of the full weights
(`weight[:rows]`, `weight[:, :cols]`): rewiring (`rewiring.py`) puts the most important ones first, so the
prefix is the best sub-network. Depth keeps the first `n` layers ("incremental" depth, SPEC §2.2).
A `Subnet` names one static choice; `FlexEncoder.forward` is the only loop over layers, asking a router
per layer how wide to run and which examples stay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.bert.modeling_bert import BertEmbeddings, BertPooler, BertPreTrainedModel

# Output switches of Hugging Face's forward that callers such as pipelines pass; our outputs do not depend on them.
HF_OUTPUT_SWITCHES = {"return_dict", "output_hidden_states", "output_attentions"}
# Additive attention-mask value on padded keys (SPEC §2: -10000, as BERT's original code).
MASK_VALUE = -10000.0


def _rnd(mult: float, total: int) -> int:
    """Python's round-half-to-even of `mult * total`, computed exactly (0.75 * 6 = 4.5 -> 4)."""
    return int(round(Decimal(repr(float(mult))) * total))


def heads_kept(config: BertConfig, width_mult: float) -> int:
    """Attention heads kept per layer at `width_mult` (SPEC §2.1: rnd(H*w), at least 1)."""
    if not 0 < width_mult <= 1:
        raise ValueError(f"width multiplier {width_mult} must be in (0, 1]")
    k = _rnd(width_mult, config.num_attention_heads)
    if k < 1:
        raise ValueError(
            f"width multiplier {width_mult} keeps no attention head of {config.num_attention_heads}"
        )
    return k


def neurons_kept(config: BertConfig, num_heads: int) -> int:
    """FFN neurons kept for `num_heads` heads: derived from the rounded head ratio, in integers."""
    return max(1, num_heads * config.intermediate_size // config.num_attention_heads)


def layers_kept(config: BertConfig, depth_mult: float) -> int:
    """Layers kept at `depth_mult` (SPEC §2.2: the first rnd(d*L), at least 1)."""
    if not 0 < depth_mult <= 1:
        raise ValueError(f"depth multiplier {depth_mult} must be in (0, 1]")
    n = _rnd(depth_mult, config.num_hidden_layers)
    if n < 1:
        raise ValueError(f"depth multiplier {depth_mult} keeps no layer of {config.num_hidden_layers}")
    return n


@dataclass(frozen=True)
class Subnet:
    """A static sub-network: the first `num_heads` heads and `num_neurons` FFN neurons of each of the first
    `num_layers` layers. Made by `model.subnet(width_mult, depth_mult)`; passed to `forward` as an argument,
    so the model itself holds no width state."""

    num_heads: int
    num_neurons: int
    num_layers: int


def make_subnet(config: BertConfig, width_mult: float = 1.0, depth_mult: float = 1.0) -> Subnet:
    """The subnet at (width_mult, depth_mult); ValueError when it keeps no head or no layer."""
    num_heads = heads_kept(config, width_mult)
    return Subnet(num_heads, neurons_kept(config, num_heads), layers_kept(config, depth_mult))


def head_size(config: BertConfig) -> int:
    # An exported (physically smaller) subnet keeps the original head size while having fewer heads.
    return getattr(config, "attention_head_size", None) or config.hidden_size // config.num_attention_heads


class FlexSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_size = head_size(config)
        all_head_size = self.num_heads * self.head_size
        self.query = nn.Linear(config.hidden_size, all_head_size)
        self.key = nn.Linear(config.hidden_size, all_head_size)
        self.value = nn.Linear(config.hidden_size, all_head_size)
        self.dropout_prob = config.attention_probs_dropout_prob

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        num_heads: int,
        head_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, seq_len, _ = hidden_states.shape
        rows = num_heads * self.head_size

        def project(linear: nn.Linear) -> torch.Tensor:
            out = F.linear(hidden_states, linear.weight[:rows], linear.bias[:rows])
            return out.view(batch, seq_len, num_heads, self.head_size).transpose(1, 2)

        query, key, value = project(self.query), project(self.key), project(self.value)
        dropout_p = self.dropout_prob if self.training else 0.0
        # A head mask (importance scoring) multiplies attention probabilities, which sdpa cannot expose.
        if self.config._attn_implementation == "sdpa" and head_mask is None:
            context = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout_p)
        else:
            # In place on the fresh product: no extra [B, k, T, T] buffers (none of these is saved for backward).
            scores = torch.matmul(query, key.transpose(-1, -2)).div_(math.sqrt(self.head_size))
            if attention_mask is not None:
                scores.add_(attention_mask)
            probs = F.dropout(scores.softmax(dim=-1), p=dropout_p, training=self.training)
            if head_mask is not None:
                probs = probs * head_mask[:num_heads].view(1, num_heads, 1, 1)
            context = torch.matmul(probs, value)
        return context.transpose(1, 2).reshape(batch, seq_len, rows)


class FlexSelfOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.num_attention_heads * head_size(config), config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, context: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        out = F.linear(context, self.dense.weight[:, : context.shape[-1]], self.dense.bias)
        return self.LayerNorm(self.dropout(out) + input_tensor)  # out of place: see FlexOutput


class FlexAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = FlexSelfAttention(config)
        self.output = FlexSelfOutput(config)


class FlexIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, hidden_states: torch.Tensor, num_neurons: int) -> torch.Tensor:
        out = F.linear(hidden_states, self.dense.weight[:num_neurons], self.dense.bias[:num_neurons])
        if torch.is_grad_enabled():
            return F.gelu(out)  # erf GELU, as BERT's "gelu"
        return torch.ops.aten.gelu_(out)  # same kernel in place (no backward needs `out`): one [B, T, f] less


class FlexOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, intermediate: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        out = F.linear(intermediate, self.dense.weight[:, : intermediate.shape[-1]], self.dense.bias)
        # Out of place, as Hugging Face's BERT: under autocast `out` is half precision and the fp32 residual
        # promotes the sum to fp32; an in-place add would round it to half precision before LayerNorm.
        return self.LayerNorm(self.dropout(out) + input_tensor)


class FlexLayer(nn.Module):
    """One post-LN BERT layer, callable at any width (the seam for per-example gate routing)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = FlexAttention(config)
        self.intermediate = FlexIntermediate(config)
        self.output = FlexOutput(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        num_heads: int,
        num_neurons: int,
        head_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        context = self.attention.self(hidden_states, attention_mask, num_heads, head_mask)
        attention_output = self.attention.output(context, hidden_states)
        return self.output(self.intermediate(attention_output, num_neurons), attention_output)


class Router(Protocol):
    """What the encoder loop asks per layer (implementations: `transformers_ext.inference`).

    `num_layers`: layers to run. `heads(i, hidden, mask)`: the heads layer i runs at, one int for every active
    example or a `[B_active]` tensor (examples are then grouped by width). `after_layer(i, hidden, mask)`:
    None, or the examples that stay (the others left at an off-ramp): a `[B_active]` bool mask or their
    indices (which index without a host sync). `hidden`
    and the additive `mask` hold the active examples only."""

    num_layers: int

    def heads(self, layer_index: int, hidden: torch.Tensor, mask: torch.Tensor) -> int | torch.Tensor: ...

    def after_layer(self, layer_index: int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor | None: ...


def width_groups(heads: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """(heads, example indices) per distinct width of a `[B]` heads tensor; one width: [(k, None)], all rows.
    Reads the widths to the host (a device sync): the encoder calls it once per distinct heads tensor."""
    widths = heads.unique().tolist()
    if len(widths) == 1:
        return [(widths[0], None)]
    return [(k, (heads == k).nonzero().view(-1)) for k in widths]


class FlexEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([FlexLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor,
        router: Router,
        head_mask: torch.Tensor | None = None,
        start: int = 0,
    ) -> list[torch.Tensor]:
        """The only loop over layers. Returns the hidden states: the input plus each executed layer's output,
        each holding the examples still active after it (all of them unless the router lets some exit).
        `start`: the first layer to run, `hidden` being the input of that layer (a run continued from a
        shared prefix, `inference.shared_prefix_forwards`)."""
        states = [hidden]
        grouped: tuple[torch.Tensor, list[tuple[int, torch.Tensor | None]]] | None = None
        for i in range(start, router.num_layers):
            heads = router.heads(i, hidden, mask)
            layer, layer_head_mask = self.layer[i], None if head_mask is None else head_mask[i]
            if isinstance(heads, int):
                groups = [(heads, None)]
            else:  # a router returns the same tensor for the layers of one gate group: group it once
                if grouped is None or grouped[0] is not heads:
                    grouped = (heads, width_groups(heads))
                groups = grouped[1]
            if len(groups) == 1:
                k = groups[0][0]
                hidden = layer(hidden, mask, k, neurons_kept(self.config, k), layer_head_mask)
            else:  # per-example widths: each width group runs once, results scattered back
                out = torch.empty_like(hidden)
                for k, sel in groups:
                    out[sel] = layer(hidden[sel], mask[sel], k, neurons_kept(self.config, k), layer_head_mask)
                hidden = out
            stay = router.after_layer(i, hidden, mask)
            if stay is not None:
                hidden, mask = hidden[stay], mask[stay]
            states.append(hidden)
            if hidden.shape[0] == 0:
                break
        return states


@dataclass
class StaticRouter:
    """Every example through the same subnet (training, evaluation, static inference). With a `record`
    (`inference.PathRecord`) the heads run per layer are written into it."""

    subnet: Subnet
    record: object | None = None

    @property
    def num_layers(self) -> int:
        return self.subnet.num_layers

    def heads(self, layer_index: int, hidden: torch.Tensor, mask: torch.Tensor) -> int:
        if self.record is not None:
            self.record.ran(layer_index, self.subnet.num_heads)
        return self.subnet.num_heads

    def after_layer(self, layer_index: int, hidden: torch.Tensor, mask: torch.Tensor) -> None:
        return None


class Gate(nn.Module):
    """Width gate (SPEC §5.1): Linear(h,h) -> ReLU -> Linear(h,C) on a hidden state's [CLS] vector."""

    def __init__(self, hidden_size: int, num_classes: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.classifier = nn.Linear(hidden_size, num_classes)

    def forward(self, cls_state: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.relu(self.dense(cls_state)))


def extended_attention_mask(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B,T] 1/0 mask -> additive [B,1,1,T] mask (0 on real tokens, -10000 on padding)."""
    return (1.0 - attention_mask[:, None, None, :].to(dtype)) * MASK_VALUE


class FlexBertModel(BertPreTrainedModel):
    def __init__(self, config: BertConfig, add_pooling_layer: bool = True):
        super().__init__(config)
        self.embeddings = BertEmbeddings(config)
        self.encoder = FlexEncoder(config)
        self.pooler = BertPooler(config) if add_pooling_layer else None
        self.post_init()


class FlexBertForSequenceClassification(BertPreTrainedModel):
    """BERT for GLUE whose forward runs any (width, depth) subnet, with optional width gates.

    `forward(..., subnet=model.subnet(w, d))` runs one static subnet; gated and early-exit inference pass a
    router to the same encoder loop (`transformers_ext.inference`). Gates are created by `add_gates` or
    loaded when `config.gate_setting` is present.
    """

    def __init__(self, config: BertConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = FlexBertModel(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.gates = None
        if getattr(config, "gate_setting", None):
            self.gates = nn.ModuleList(
                [Gate(config.hidden_size, len(config.gate_setting)) for _ in range(config.num_gates)]
            )
        self.post_init()

    def subnet(self, width_mult: float = 1.0, depth_mult: float = 1.0) -> Subnet:
        return make_subnet(self.config, width_mult, depth_mult)

    def add_gates(self, gate_setting: list[float], num_gates: int) -> None:
        """Create fresh width gates (N(0, 0.02) weights, zero biases) and record the setting in the config."""
        num_layers = self.config.num_hidden_layers
        if num_gates < 1 or num_layers % num_gates:
            raise ValueError(f"--num_gates {num_gates} must divide the number of layers ({num_layers})")
        self.config.gate_setting = [float(w) for w in gate_setting]
        self.config.num_gates = num_gates
        self.gates = nn.ModuleList([Gate(self.config.hidden_size, len(gate_setting)) for _ in range(num_gates)])
        for module in self.gates.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=self.config.initializer_range)
                nn.init.zeros_(module.bias)
        self.gates.to(self.classifier.weight.device)

    # ---- building blocks of every path (static, gated, early exit) -----------------------------------------
    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        return self.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    def encode(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        token_type_ids: torch.Tensor | None,
        router: Router,
        head_mask: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Embeddings, then the encoder loop under `router`: the list of hidden states."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.embed(input_ids, token_type_ids)
        mask = extended_attention_mask(attention_mask, hidden.dtype)
        return self.bert.encoder(hidden, mask, router, head_mask)

    def summary(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`[B, h]`: the vector the head, the off-ramps and the gates read. `config.pooling` "cls" (default):
        the [CLS] position, as BERT's pooler. "mean": the mean over real tokens, for models pre-trained with
        mean pooling (the embedded MiniLM), whose intermediate [CLS] vectors barely depend on the input.
        `attention_mask`: `[B, T]` 1/0 or the encoder's additive `[B, 1, 1, T]` mask (None: all tokens)."""
        if getattr(self.config, "pooling", "cls") != "mean":
            return hidden_states[:, 0]
        if attention_mask is None:
            return hidden_states.mean(1)
        real = attention_mask[:, 0, 0, :] == 0 if attention_mask.dim() == 4 else attention_mask.bool()
        weights = real.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * weights).sum(1) / weights.sum(1).clamp_min(1)

    def classify(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Pooler (dense + tanh on `summary`) + classifier: the final head and every off-ramp."""
        pooler = self.bert.pooler
        pooled = pooler.activation(pooler.dense(self.summary(hidden_states, attention_mask)))
        return self.classifier(self.dropout(pooled))

    def compute_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.num_labels == 1:
            return F.mse_loss(logits.view(-1), labels.view(-1).to(logits.dtype))
        return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        subnet: Subnet | None = None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        """Run `subnet` (None: the full model). Of Hugging Face's other arguments only the output switches are
        accepted (hidden states are always returned); anything else is refused rather than ignored.

        Returns logits and `hidden_states`: the embedding output plus each executed layer's output
        (`subnet.num_layers + 1` tensors). `head_mask` is an `[L, H]` multiplier on attention probabilities,
        used for head-importance scoring.
        """
        unknown = set(kwargs) - HF_OUTPUT_SWITCHES
        if unknown:
            raise TypeError(f"forward() got unexpected arguments {sorted(unknown)}; pass subnet=model.subnet(w, d)")
        states = self.encode(input_ids, attention_mask, token_type_ids,
                             StaticRouter(subnet or self.subnet()), head_mask)
        logits = self.classify(states[-1], attention_mask)
        loss = None if labels is None else self.compute_loss(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=tuple(states))
