"""Batches of a TensorDataset (input_ids, attention_mask, token_type_ids, labels): training epochs in a seeded
(resumable) order, split between torchrun's processes; and, for passes whose per-example results do not
depend on the batch, sorted by length, padding trimmed, results put back in dataset order."""

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


LENGTH_GROUP = 50  # global batches sorted together by --group_by_length (Hugging Face's megabatch size)


def epoch_batches(
    dataset: TensorDataset,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    rank: int = 0,
    world: int = 1,
    start_batch: int = 0,
    lengths: torch.Tensor | None = None,
) -> Iterator[list[torch.Tensor]]:
    """Deterministic batches of one epoch: the order depends only on (seed, epoch), so a resumed run skips
    `start_batch` batches and sees exactly the data it would have seen. Under torchrun each process takes
    its share of every global batch (batch_size per process).

    With `lengths` (tokens per example) and shuffling, each run of LENGTH_GROUP global batches of the shuffled
    order is sorted longest first (Hugging Face's group_by_length): batches then hold examples of similar
    length, so trimming their padding saves most of the padded compute while the epoch stays a shuffle."""
    n = len(dataset)
    global_batch = batch_size * world
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        if lengths is not None:
            order = torch.cat([group[lengths[group].argsort(descending=True, stable=True)]
                               for group in order.split(global_batch * LENGTH_GROUP)])
    else:
        order = torch.arange(n)
    for b in range(start_batch, (n + global_batch - 1) // global_batch):
        global_chunk = order[b * global_batch : (b + 1) * global_batch]
        if len(global_chunk) < world:
            break  # a last batch too small to give every process an example is dropped (all ranks alike)
        chunk = global_chunk[rank::world]
        yield [t[chunk] for t in dataset.tensors]


def num_batches(dataset: TensorDataset, batch_size: int, world: int = 1) -> int:
    return (len(dataset) + batch_size * world - 1) // (batch_size * world)


def file_order_batches(dataset: TensorDataset, batch_size: int) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Inference batches as (example indices, batch), like length_sorted_batches: file order, padded to the
    features' length (the FLOPs unit), as the reference."""
    return [(idx, [t[idx] for t in dataset.tensors]) for idx in torch.arange(len(dataset)).split(batch_size)]
