"""A BERT whose width (heads + FFN neurons per layer) and depth (number of layers) are run-time settings.

Parameter names are exactly Hugging Face's (`bert.encoder.layer.{i}.attention.self.query`, ...), so any HF
BERT folder or hub id loads with `from_pretrained`, and `save_pretrained` writes an ordinary HF folder.

Width slicing takes the *first* `k` heads and `f` FFN neurons of every layer as views of the full weights
(`weight[:rows]`, `weight[:, :cols]`): rewiring (`rewiring.py`) puts the most important ones first, so the
prefix is the best sub-network. Depth keeps the first `n` layers ("incremental" depth, SPEC §2.2).
"""

from __future__ import annotations

import math
from decimal import Decimal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.bert.modeling_bert import BertEmbeddings, BertPooler, BertPreTrainedModel

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
        return self.LayerNorm(self.dropout(out).add_(input_tensor))  # residual in place: one [B, T, h] less


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
        return self.LayerNorm(self.dropout(out).add_(input_tensor))


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


class FlexEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList([FlexLayer(config) for _ in range(config.num_hidden_layers)])


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
    """BERT for GLUE with run-time width/depth, optional width gates, and hidden states for distillation.

    `set_width_depth(w, d)` chooses the static sub-network used by `forward`. Gates (added by `add_gates` or
    loaded when `config.gate_setting` is present) are used by `transformers_ext.dynamic`, not by `forward`.
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
        self.width_mult, self.depth_mult = 1.0, 1.0
        self.num_heads_kept = config.num_attention_heads
        self.num_neurons_kept = config.intermediate_size
        self.num_layers_kept = config.num_hidden_layers
        self.post_init()

    # ---- run-time sub-network selection -------------------------------------------------------------
    def set_width_depth(self, width_mult: float | None = None, depth_mult: float | None = None) -> None:
        if width_mult is not None:
            self.num_heads_kept = heads_kept(self.config, width_mult)
            self.num_neurons_kept = neurons_kept(self.config, self.num_heads_kept)
            self.width_mult = width_mult
        if depth_mult is not None:
            self.num_layers_kept = layers_kept(self.config, depth_mult)
            self.depth_mult = depth_mult

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

    # ---- building blocks shared with dynamic inference ----------------------------------------------
    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None) -> torch.Tensor:
        return self.bert.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)

    def classify(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Pooler + classifier on the [CLS] position: the final head and every off-ramp."""
        pooled = self.bert.pooler(hidden_states)
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
        **kwargs,
    ) -> SequenceClassifierOutput:
        """Run the current (width, depth) sub-network.

        Returns logits and `hidden_states`: the embedding output plus each executed layer's output
        (`num_layers_kept + 1` tensors). `head_mask` is an `[L, H]` multiplier on attention probabilities,
        used for head-importance scoring.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.embed(input_ids, token_type_ids)
        mask = extended_attention_mask(attention_mask, hidden.dtype)
        hidden_states = [hidden]
        for i, layer in enumerate(self.bert.encoder.layer[: self.num_layers_kept]):
            layer_head_mask = None if head_mask is None else head_mask[i]
            hidden = layer(hidden, mask, self.num_heads_kept, self.num_neurons_kept, layer_head_mask)
            hidden_states.append(hidden)
        logits = self.classify(hidden)
        loss = None if labels is None else self.compute_loss(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=tuple(hidden_states))
