"""Batches of a TensorDataset (input_ids, attention_mask, token_type_ids, labels) for passes whose
per-example results do not depend on the batch: sorted by length, padding trimmed, results put back in
dataset order."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import TensorDataset


def trim_padding(batch: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Drop padding columns beyond the longest example of the batch (results are unchanged: padded keys
    are masked out)."""
    length = int(batch[1].sum(1).max())
    return [t[:, :length] if t.dim() == 2 else t for t in batch]


def length_sorted_batches(dataset: TensorDataset, batch_size: int
                          ) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """(example indices, padding-trimmed batch) over all of `dataset`, longest examples first, for passes whose
    per-example results do not depend on the batch (evaluation, gate inputs): similar lengths share a batch,
    so about half the padded tokens of file order go (GLUE pairs at length 128). Callers put the results
    back in dataset order with the indices."""
    order = dataset.tensors[1].sum(1).argsort(descending=True, stable=True)
    for idx in order.split(batch_size):
        yield idx, trim_padding([t[idx] for t in dataset.tensors])


def in_dataset_order(chunks: Sequence[torch.Tensor], indices: Sequence[torch.Tensor], dim: int = 0) -> torch.Tensor:
    """Concatenate per-batch results of length_sorted_batches along `dim` and undo its order (each chunk is
    copied straight to its rows: no concatenated intermediate, which for gate inputs is gigabytes)."""
    shape = list(chunks[0].shape)
    shape[dim] = sum(len(idx) for idx in indices)
    out = chunks[0].new_empty(shape)
    for chunk, idx in zip(chunks, indices, strict=True):
        out.index_copy_(dim, idx.to(out.device), chunk)
    return out


def file_order_batches(dataset: TensorDataset, batch_size: int) -> list[list[torch.Tensor]]:
    """Inference batches: file order, padded to the features' length (the FLOPs unit), as the reference."""
    return [[t[idx] for t in dataset.tensors] for idx in torch.arange(len(dataset)).split(batch_size)]
