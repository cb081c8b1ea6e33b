"""Calibration: choose the class -> width map and the early-exit threshold for a FLOPs budget or an allowed
score drop, on a labelled split that the reported numbers do not use (`train_gate_new.py --calibrate`).
One cached forward per candidate map, every threshold re-combined from it: `threshold_sweep`.

The search (`Calibrator.search`) runs over maps that are monotone (non-decreasing) in the class index on a
grid of widths: every map when there are at most `max_exhaustive` of them, else coordinate ascent from the
trained map (one class at a time over the grid values that keep the map monotone, until no change helps).
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from .errors import InputError
from .flops import path_macs
from .inference import dynamic_forward
from .threshold_sweep import (
    CONFUSION_METRICS,
    REGRESSION_METRICS,
    MapCache,
    Sweep,
    collect_map,
    option_stats,
    score_from_stats,
    sweep,
)

__all__ = ["CONFUSION_METRICS", "EXTRA_GRID", "REGRESSION_METRICS", "Calibrator", "MapCache", "Objective", "Sweep",
           "best_candidate", "monotone_maps", "pareto_front", "project_map", "scorable", "search_space",
           "split_indices", "sweep"]
DROP_TOLERANCE = 1e-9  # score >= reference - max_drop, allowing for the float error of the subtraction
EXTRA_GRID = (0.55, 0.6, 0.65)  # untrained widths searched besides the trained ones (the reference's configs)


def search_space(config, start: Sequence[float] | None = None, grid: Sequence[float] | None = None
                 ) -> tuple[list[float], list[float], list[float]]:
    """(the gates' trained widths, the search's start map, the grid of widths a class may map to) of a gated
    model's config; by default the start is the trained class -> width map, the grid the trained widths plus
    EXTRA_GRID."""
    trained = [float(w) for w in config.gate_setting]
    start = list(start or getattr(config, "gate_class_to_width", None) or trained)
    if len(start) != len(trained):
        raise InputError(f"--width_mult_list (the search's start) has {len(start)} widths but the gates have "
                         f"{len(trained)} classes")
    return trained, start, sorted(set(grid or (trained + list(EXTRA_GRID))))


def scorable(metric: str) -> bool:
    """Whether the sweep can compute `metric` (utils_glue.primary_metric's name) from per-example statistics."""
    return metric in CONFUSION_METRICS + REGRESSION_METRICS


def split_indices(n: int, seed: int) -> tuple[list[int], list[int]]:
    """A seeded half of `range(n)` (calibration, n // 2 indices) and the rest (reporting), each sorted."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[: n // 2]), sorted(order[n // 2 :])


def monotone_maps(grid: Sequence[float], num_classes: int) -> list[tuple[float, ...]]:
    """Every class -> width map over `grid` that is non-decreasing in the class index (lexicographic order)."""
    return list(itertools.combinations_with_replacement(sorted(set(grid)), num_classes))


def project_map(class_to_width: Sequence[float], grid: Sequence[float]) -> tuple[float, ...]:
    """The nearest monotone map on `grid` (each width to its nearest grid value, then a running maximum)."""
    values = sorted(set(grid))
    projected, floor = [], -math.inf
    for w in class_to_width:
        nearest = min(values, key=lambda v: (abs(v - w), v))
        floor = max(floor, nearest)
        projected.append(floor)
    return tuple(projected)


# ---- objectives and the search -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Objective:
    """`flops_budget`: the best score at relative FLOPs <= value (ties: fewer FLOPs). `max_drop`: the fewest
    FLOPs at a score >= the full model's - value (ties: higher score). Maps are compared by `key`: feasible
    ones first; an infeasible map ranks by how close it gets (fewest FLOPs, resp. highest score)."""

    kind: str  # "flops_budget" | "max_drop"
    value: float
    # flops_budget, second pass of `Calibrator.search(within_se=k)`: the score every candidate must reach (the
    # best score within the budget - k standard errors); among those the one with the most FLOPs wins
    floor: float | None = None

    @property
    def name(self) -> str:
        return f"{'flops' if self.kind == 'flops_budget' else 'drop'}{self.value:g}"

    def choose(self, s: Sweep, reference_score: float) -> tuple[tuple, int]:
        """(key, candidate index) of the best candidate of one map's sweep."""
        if self.kind == "flops_budget" and self.floor is not None:
            feasible = (s.relative_flops <= self.value) & (s.score >= self.floor)
            if feasible.any():
                k = _first_best(feasible, s.relative_flops, s.score)
                return (2, float(s.relative_flops[k]), float(s.score[k])), k
        if self.kind == "flops_budget":
            feasible = s.relative_flops <= self.value
            if feasible.any():
                k = _first_best(feasible, s.score, -s.relative_flops)
                return (1, float(s.score[k]), -float(s.relative_flops[k])), k
            k = _first_best(torch.ones_like(feasible), -s.relative_flops, s.score)
            return (0, -float(s.relative_flops[k]), float(s.score[k])), k
        feasible = s.score >= reference_score - self.value - DROP_TOLERANCE
        if feasible.any():
            k = _first_best(feasible, -s.relative_flops, s.score)
            return (1, -float(s.relative_flops[k]), float(s.score[k])), k
        k = _first_best(torch.ones_like(feasible), s.score, -s.relative_flops)
        return (0, float(s.score[k]), -float(s.relative_flops[k])), k


def _first_best(allowed: torch.Tensor, primary: torch.Tensor, secondary: torch.Tensor) -> int:
    """The first index among `allowed` maximising `primary`, then `secondary`."""
    p = torch.where(allowed, primary, torch.full_like(primary, -math.inf))
    allowed = allowed & (p == p.max())
    s = torch.where(allowed, secondary, torch.full_like(secondary, -math.inf))
    return int((allowed & (s == s.max())).nonzero()[0])


def best_candidate(groups: Sequence, objective: Objective, reference_score: float) -> tuple[tuple, object, int]:
    """(key, group, index) of the best candidate over `groups` (each with score and relative_flops tensors:
    a map's `Sweep`, another strategy's candidates) by `objective`; the first of equal keys wins."""
    best = None
    for group in groups:
        key, k = objective.choose(group, reference_score)
        if best is None or key > best[0]:
            best = (key, group, k)
    return best


def pareto_front(points: list[dict]) -> list[dict]:
    """The points (dicts with relative_flops and score) no other point beats in both, by increasing FLOPs
    (of equal points the first is kept)."""
    order = sorted(range(len(points)), key=lambda i: (points[i]["relative_flops"], -points[i]["score"], i))
    front, best = [], -math.inf
    for i in order:
        if points[i]["score"] > best:
            front.append(points[i])
            best = points[i]["score"]
    return front


@dataclass
class Calibrator:
    """Calibration split in memory (length-sorted, padding trimmed per batch) and the memo of map caches.
    `model` must have gates; `dataset` holds (input_ids, attention_mask, token_type_ids, labels).

    A map's result for an example depends only on the widths of the classes its path visits: if an earlier
    map agrees with the new one on those classes, the example's gates see the same states and choose the same
    classes, so its cached row is reused and only the other examples run (`examples_forwarded` counts them)."""

    model: object
    dataset: Sequence[torch.Tensor]
    metric: str
    off_ramps: Sequence[int]
    seq_len: int
    batch_size: int = 64
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    progress: Callable | None = None  # called with (maps evaluated, map) after each new map
    reuse: bool = True

    def __post_init__(self):
        input_ids, attention_mask, token_type_ids, labels = self.dataset[:4]
        order = attention_mask.sum(1).argsort(descending=True, stable=True)
        self.labels = labels[order]
        self.inputs = [t[order].to(self.device) for t in (input_ids, attention_mask, token_type_ids)]
        self.lengths = attention_mask[order].sum(1)
        self.batches = self._batches(torch.arange(len(order)))
        config = self.model.config
        self.num_labels = config.num_labels
        self.full_macs = path_macs(config, self.seq_len, [config.num_attention_heads] * config.num_hidden_layers)
        self.caches: dict[tuple[float, ...], MapCache] = {}
        self.sweeps: dict[tuple[float, ...], Sweep] = {}
        self.forward_seconds = 0.0
        self.examples_forwarded = 0

    def _batches(self, rows: torch.Tensor) -> list[list[torch.Tensor]]:
        """`rows` (ascending, i.e. longest first) in batches of `batch_size`, padding trimmed per batch."""
        batches = []
        for chunk in rows.split(self.batch_size):
            length = int(self.lengths[chunk].max())
            index = chunk.to(self.device)
            batches.append([t[index, :length] for t in self.inputs])
        return batches

    def evaluate(self, class_to_width: Sequence[float]) -> Sweep:
        key = tuple(float(w) for w in class_to_width)
        if key not in self.sweeps:
            start = time.perf_counter()
            self.caches[key] = self._collect(key)
            self.forward_seconds += time.perf_counter() - start
            self.sweeps[key] = sweep(self.caches[key], self.labels, self.metric, self.num_labels, self.full_macs)
            if self.progress is not None:
                self.progress(len(self.sweeps), key)
        return self.sweeps[key]

    def _collect(self, key: tuple[float, ...]) -> MapCache:
        n = len(self.labels)
        source = torch.full((n,), -1)  # the earlier map each example's row is taken from (-1: run it)
        previous = list(self.caches.values()) if self.reuse else []
        if previous:  # the first earlier map that gives every class the example's path visits the same width
            same = torch.tensor([cache.class_to_width for cache in previous]) == torch.tensor(key)  # [M, C]
            agree = (~torch.stack([cache.visited for cache in previous]) | same[:, None]).all(2)  # [M, N]
            found = agree.any(0)
            source[found] = agree.to(torch.int8).argmax(0)[found]  # argmax: the first of equal maxima
        rows = (source < 0).nonzero().view(-1)
        self.examples_forwarded += len(rows)
        if len(rows) == n:
            return collect_map(self.model, self.batches, key, self.off_ramps, self.seq_len)
        computed = collect_map(self.model, self._batches(rows), key, self.off_ramps, self.seq_len) if len(rows) \
            else None
        sources = [i for i in source.unique().tolist() if i >= 0]
        fields = {}
        for name in ("exit_scores", "predictions", "linear_macs", "attention_macs", "layers", "visited"):
            template = getattr(previous[0], name)
            out = torch.empty((n, *template.shape[1:]), dtype=template.dtype)
            for i in sources:
                take = source == i
                out[take] = getattr(previous[i], name)[take]
            if computed is not None:
                out[rows] = getattr(computed, name)
            fields[name] = out
        return MapCache(key, previous[0].ramp_layers, **fields)

    @torch.no_grad()
    def full_model_score(self) -> float:
        """The full model's (width 1, depth 1, no gate) score on the calibration split."""
        predictions = []
        for batch in self.batches:
            logits = dynamic_forward(self.model, *batch, fixed_width=1.0).logits.double().cpu()
            predictions.append(logits.view(-1) if self.num_labels == 1 else logits.argmax(-1).double())
        stats = option_stats(torch.cat(predictions)[:, None], self.labels, self.num_labels)[:, 0].sum(0)
        return float(score_from_stats(self.metric, stats[None], self.labels, self.num_labels)[0])

    def search(self, grid: Sequence[float], num_classes: int, objectives: Sequence[Objective],
               start: Sequence[float], reference_score: float, max_exhaustive: int = 256,
               within_se: float = 0.0, others: Sequence = (), gates: bool = True) -> dict:
        """The best (map, threshold) per objective over the monotone maps on `grid`: all of them when there
        are at most `max_exhaustive`, else coordinate ascent from `start` (projected onto the grid).

        `others`: the candidates of other strategies on the same split (`calibration_candidates.CandidateSet`:
        score and relative_flops tensors, `setting(k)`), chosen among by the same rule after the maps (of
        equal keys the gates' wins); `gates=False` searches them alone.

        `within_se` = k > 0 (FLOPs budgets only): of the settings within the budget whose calibration score is
        at most k standard errors below the best one's, the one with the most FLOPs. On a few hundred examples
        score differences below one standard error are noise; the plain argmax then often lands on a much
        cheaper setting that loses on new data, and leaves the budget unused."""
        began, forward_before, forwarded_before = time.perf_counter(), self.forward_seconds, self.examples_forwarded
        maps = monotone_maps(grid, num_classes) if gates else []
        exhaustive = len(maps) <= max_exhaustive
        if exhaustive:
            for m in maps:
                self.evaluate(m)
        others = [group for group in others if len(group)]

        def best_of(objective: Objective, begin: tuple[float, ...]) -> tuple[tuple, object, int]:
            if exhaustive:  # lexicographic order
                groups = [self.sweeps[m] for m in maps]
            else:
                groups = [self.sweeps[self._coordinate_ascent(sorted(set(grid)), begin, objective,
                                                              reference_score)[1]]]
            return best_candidate([*groups, *others], objective, reference_score)

        chosen, floors = {}, {}
        for objective in objectives:
            chosen[objective] = best_of(objective, project_map(start, grid))
            key, group, k = chosen[objective]
            if within_se > 0 and objective.kind == "flops_budget" and key[0] == 1:
                best_score = float(group.score[k])
                floors[objective] = best_score - within_se * self.standard_error(best_score)
                begin = group.class_to_width if isinstance(group, Sweep) else project_map(start, grid)
                chosen[objective] = best_of(replace(objective, floor=floors[objective]), begin)
        results, other_counts = {}, {}
        for group in others:
            other_counts[group.strategy] = other_counts.get(group.strategy, 0) + len(group)
        for objective, (key, group, k) in chosen.items():
            results[objective] = {"feasible": key[0] >= 1, "candidate": k, "strategy": "gates", **group.setting(k)}
            if objective in floors:
                results[objective]["score_floor"] = floors[objective]
        return {"search": "exhaustive" if exhaustive else "coordinate_ascent", "maps_in_grid": len(maps),
                "maps_evaluated": len(self.sweeps), "candidates_evaluated": sum(len(s) for s in self.sweeps.values()),
                "other_candidates": other_counts,
                "examples_forwarded": self.examples_forwarded - forwarded_before, "examples": len(self.labels),
                "seconds": time.perf_counter() - began, "forward_seconds": self.forward_seconds - forward_before,
                "chosen": results}

    def standard_error(self, score: float) -> float:
        """The standard error of a calibration score on this split: binomial for accuracy, (1 - r^2)/sqrt(n - 1)
        for a correlation (Pearson, MCC)."""
        n = len(self.labels)
        if self.metric == "acc":
            return math.sqrt(max(score * (1 - score), 0.0) / n)
        return (1 - score ** 2) / math.sqrt(max(n - 1, 1))

    def _coordinate_ascent(self, grid: list[float], start: tuple[float, ...], objective: Objective,
                           reference_score: float) -> tuple[tuple, tuple[float, ...], int]:
        key, k = objective.choose(self.evaluate(start), reference_score)
        best = (key, start, k)
        improved = True
        while improved:
            improved = False
            for c in range(len(start)):
                current = best[1]
                low = current[c - 1] if c > 0 else -math.inf
                high = current[c + 1] if c + 1 < len(current) else math.inf
                for value in grid:
                    if not low <= value <= high or value == current[c]:
                        continue
                    candidate = current[:c] + (value,) + current[c + 1 :]
                    key, k = objective.choose(self.evaluate(candidate), reference_score)
                    if key > best[0]:
                        best, improved = (key, candidate, k), True
        return best

    def pareto(self, others: Sequence = ()) -> list[dict]:
        """The Pareto front (score vs relative FLOPs) of every (map, threshold) evaluated so far and of the
        other strategies' candidates `others` (as `search`'s)."""
        sweeps = list(self.sweeps.values()) + [group for group in others if len(group)]
        if not sweeps:
            return []
        flops = torch.cat([s.relative_flops for s in sweeps])
        score = torch.cat([s.score for s in sweeps])
        owner = torch.cat([torch.full((len(s),), i) for i, s in enumerate(sweeps)])
        index = torch.cat([torch.arange(len(s)) for s in sweeps])
        # by FLOPs, then higher score, then the order of evaluation (stable): keep each new best score
        order = torch.from_numpy(np.lexsort((-score.numpy(), flops.numpy())))
        running = torch.cummax(score[order], 0).values
        keep = torch.ones(len(order), dtype=torch.bool)
        keep[1:] = running[1:] > running[:-1]
        return [{"strategy": "gates", **sweeps[int(owner[i])].setting(int(index[i]))} for i in order[keep]]
