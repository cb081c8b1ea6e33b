"""Work shared between torchrun's processes. Replicas must hold bit-identical weights: gradients are averaged
once per update, and a result every replica uses to change its weights (importance scores for rewiring and
grafting, gate inputs and targets) is computed in shares and gathered, so that every rank combines the very
same bits in the same order (one process's order: the result equals a single process's)."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

Item = TypeVar("Item")


def all_reduce_gradients(params: Sequence[torch.nn.Parameter], world: int) -> None:
    """Average gradients over processes once per update (DDP semantics; done once for all subnets)."""
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def map_shared(items: Iterable[Item], compute: Callable[[Item], Sequence[torch.Tensor]],
               placeholder: Callable[[], Sequence[torch.Tensor]], rank: int = 0, world: int = 1
               ) -> Iterator[tuple[Item, list[torch.Tensor]]]:
    """(item, compute(item)) for every item, in order, on every rank, while each rank computes only every
    `world`-th item: items are taken `world` at a time, rank r computes the r-th, and the results are
    all-gathered (exact copies). A reduction over the results done by every rank in this order is then
    bit-identical across ranks and to one process's. `compute` must return tensors of one shape per position
    (pad where an item is smaller); `placeholder()` gives tensors of that shape for a rank with no item in
    the last round (its values are never read). One process: plain `compute`, no copies."""
    if world == 1:
        for item in items:
            yield item, list(compute(item))
        return
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, world)):
        mine = [t.contiguous() for t in (compute(chunk[rank]) if rank < len(chunk) else placeholder())]
        copies = [[torch.empty_like(t) for _ in range(world)] for t in mine]
        for out, tensor in zip(copies, mine, strict=True):
            dist.all_gather(out, tensor)
        for j, item in enumerate(chunk):
            yield item, [out[j] for out in copies]


def map_shared_objects(items: Iterable[Item], compute: Callable[[Item], object], rank: int = 0, world: int = 1
                       ) -> Iterator[tuple[Item, object]]:
    """`map_shared` for results of any picklable kind and size (each batch's logits, path records and per-example
    rows of an evaluation): gathered with `all_gather_object`, so keep them small and on the host."""
    if world == 1:
        for item in items:
            yield item, compute(item)
        return
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, world)):
        gathered: list[object] = [None] * world
        dist.all_gather_object(gathered, compute(chunk[rank]) if rank < len(chunk) else None)
        yield from zip(chunk, gathered)
