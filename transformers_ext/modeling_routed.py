"""A gated model whose `forward` routes every example (gates pick each layer group's width, early exit at the
off-ramps) as `config.routing` says: what `export_subnet.py` ships for a gated export, so that
`AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)` runs the routed model.
Self-contained with the modules it imports (relative imports: transformers loads them from the folder)."""

from __future__ import annotations

import torch
from transformers.modeling_outputs import SequenceClassifierOutput

from .inference import dynamic_forward
from .modeling_flexbert import HF_OUTPUT_SWITCHES, FlexBertForSequenceClassification


class RoutedFlexBertForSequenceClassification(FlexBertForSequenceClassification):
    """`forward(input_ids, attention_mask, token_type_ids)`: the routed logits of `config.routing`
    ({class_to_width, early_exit, exit_threshold, off_ramps}); `subnet=` runs one static subnet instead."""

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        subnet=None,
        **kwargs,
    ) -> SequenceClassifierOutput:
        routing = getattr(self.config, "routing", None)
        if subnet is not None or head_mask is not None or not routing:
            return super().forward(input_ids, attention_mask, token_type_ids, labels, head_mask, subnet, **kwargs)
        unknown = set(kwargs) - HF_OUTPUT_SWITCHES
        if unknown:
            raise TypeError(f"forward() got unexpected arguments {sorted(unknown)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        out = dynamic_forward(self, input_ids, attention_mask, token_type_ids,
                              class_to_width=routing["class_to_width"], early_exit=routing["early_exit"],
                              exit_threshold=routing["exit_threshold"], off_ramps=routing["off_ramps"])
        loss = None if labels is None else self.compute_loss(out.logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=out.logits)
