"""Calibration: choose the class -> width map and the early-exit threshold for a FLOPs budget or an allowed
score drop, on a labelled split that the reported numbers do not use (`train_gate_new.py --calibrate`).

One batched forward per candidate map over the calibration split (`collect_map`): the gates route every
example as at inference and every off-ramp runs, but nobody leaves (`RecordingExit`: an `EarlyExit` whose rule
never fires, keeping the off-ramps' logits). For each example the cache keeps the prediction and the MACs of
each way it can end: leave at off-ramp j, run to the end with the off-ramps, or run to the end without them
(no early exit, i.e. w_dynamic). The MACs are `flops.executed_macs` of the path record cut at that exit, so
they are what `train_gate.py` reports for the same path. An example that leaves at off-ramp j runs no later
gate or layer, and the other examples do not change its path, so the score and FLOPs of every threshold are
re-combined from the cache without another forward (`sweep`): an example leaves at the first off-ramp whose
exit score is < t (entropy of the off-ramp's softmax; STS-B: how far the prediction moved since the previous
off-ramp, never at the first one).

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

from .flops import executed_macs, flops_summary, path_macs
from .inference import EarlyExit, GateRouter, PathRecord, dynamic_forward, prediction_entropy, routed_forward

__all__ = ["Calibrator", "MapCache", "Objective", "RecordingExit", "Sweep", "collect_map", "monotone_maps",
           "pareto_front", "project_map", "score_from_stats", "split_indices", "sweep"]

# Metrics the sweep computes from per-example sufficient statistics (utils_glue.primary_metric of each task).
CONFUSION_METRICS = ("acc", "mcc")
REGRESSION_METRICS = ("pearson",)
DROP_TOLERANCE = 1e-9  # score >= reference - max_drop, allowing for the float error of the subtraction


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


class RecordingExit(EarlyExit):
    """`EarlyExit` at threshold -inf: every off-ramp runs (and is counted in the record), nobody leaves, and
    each off-ramp's logits over the whole batch are kept in `ramp_logits` (off-ramp order)."""

    def __init__(self, inner, off_ramps: Sequence[int], classify: Callable, regression: bool, record: PathRecord):
        self.ramp_logits: list[torch.Tensor] = []

        def keep(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            logits = classify(hidden, mask)
            self.ramp_logits.append(logits)
            return logits

        super().__init__(inner, off_ramps, -math.inf, keep, regression, record)


@dataclass
class MapCache:
    """One map's forward over the calibration split. Options o = 0..R-1: leave at off-ramp o; R: run to the
    end with early exit on (all R off-ramps ran); R + 1: run to the end without early exit (no off-ramp)."""

    class_to_width: tuple[float, ...]
    ramp_layers: list[int]  # 0-based layer after which each off-ramp runs
    exit_scores: torch.Tensor  # [N, R] float64: leave at off-ramp j iff < threshold (+inf: never)
    predictions: torch.Tensor  # [N, R + 2] float64: class index, or the regression output
    linear_macs: torch.Tensor  # [N, R + 2] int64
    attention_macs: torch.Tensor  # [N, R + 2] int64
    layers: torch.Tensor  # [N, R + 2] int64: layers executed
    visited: torch.Tensor  # [N, C] bool: the gate classes the example's path chose (on the way to the end)


def _cut(record: PathRecord, layer: int, ramps_run: int, layers_per_gate: int) -> PathRecord:
    """The path of an example that leaves at the off-ramp after `layer`: no later layer or gate runs, the
    off-ramps up to this one ran, and the off-ramp's prediction replaces the final head."""
    heads = record.heads.clone()
    heads[:, layer + 1 :] = 0
    gates_run = torch.full_like(record.gates_run, layer // layers_per_gate + 1).minimum(record.gates_run)
    return replace(record, heads=heads, gates_run=gates_run, off_ramps_run=torch.full_like(record.off_ramps_run,
                   ramps_run), exited=torch.ones_like(record.exited))


@torch.no_grad()
def collect_map(model, batches: Sequence[Sequence[torch.Tensor]], class_to_width: Sequence[float],
                off_ramps: Sequence[int], seq_len: int) -> MapCache:
    """Route `batches` ((input_ids, attention_mask, token_type_ids); padding may be trimmed) through the gates
    under `class_to_width` once and cache every example's prediction, exit score and MACs for every exit
    option. MACs are counted at `seq_len` tokens per example (what inference reports: `max_seq_length`)."""
    config = model.config
    regression = config.num_labels == 1
    num_layers = config.num_hidden_layers
    layers_per_gate = num_layers // len(model.gates)
    scores, preds, linear, attention, layers, visited = [], [], [], [], [], []
    num_classes = len(class_to_width)
    ramp_layers: list[int] = []
    for input_ids, attention_mask, token_type_ids in batches:
        record = PathRecord.start(input_ids.shape[0], config, num_layers, input_ids.device,
                                  model.classifier.weight.dtype)
        router = RecordingExit(GateRouter(model, class_to_width, num_layers, record), off_ramps, model.classify,
                               regression, record)
        out = routed_forward(model, input_ids, attention_mask, token_type_ids, router, record)
        ramp_layers = sorted(router.off_ramps)
        paths = [_cut(record, layer, j + 1, layers_per_gate) for j, layer in enumerate(ramp_layers)]
        paths += [record, replace(record, off_ramps_run=torch.zeros_like(record.off_ramps_run))]
        outputs = [*router.ramp_logits, out.logits, out.logits]
        # exit scores as EarlyExit computes them (in the logits' dtype), then widened
        if regression:
            ramp = [logits.view(-1) for logits in router.ramp_logits]
            moved = [torch.full_like(ramp[0], math.inf)] if ramp else []
            moved += [(ramp[j] - ramp[j - 1]).abs() for j in range(1, len(ramp))]
            values = [o.view(-1).double() for o in outputs]
        else:
            moved = [prediction_entropy(logits) for logits in router.ramp_logits]
            values = [o.argmax(-1).double() for o in outputs]
        batch_size = input_ids.shape[0]
        scores.append(torch.stack(moved, 1).double() if moved else torch.zeros(batch_size, 0, dtype=torch.float64,
                                                                               device=input_ids.device))
        preds.append(torch.stack(values, 1))
        macs = [executed_macs(config, seq_len, p) for p in paths]
        linear.append(torch.stack([m[0] for m in macs], 1))
        attention.append(torch.stack([m[1] for m in macs], 1))
        layers.append(torch.stack([(p.heads > 0).sum(1) for p in paths], 1))
        visited.append(torch.stack([(record.width_class == c).any(1) for c in range(num_classes)], 1))
    return MapCache(tuple(float(w) for w in class_to_width), ramp_layers,
                    *(torch.cat(t).cpu() for t in (scores, preds, linear, attention, layers, visited)))


# ---- threshold sweep ---------------------------------------------------------------------------------------
@dataclass
class Sweep:
    """Every distinct outcome of one map on the calibration split. Candidate 0: no early exit (threshold NaN);
    candidate k >= 1: early exit at `thresholds[k]`, between the k-th and (k+1)-th distinct exit scores (a
    midpoint, so that the decision does not hinge on float ties), in increasing order."""

    class_to_width: tuple[float, ...]
    thresholds: torch.Tensor  # [T] float64
    score: torch.Tensor  # [T]
    relative_flops: torch.Tensor  # [T]: true FLOPs (linear + attention) relative to the full model
    relative_linear_flops: torch.Tensor  # [T]
    flops: torch.Tensor  # [T]: the reference unit, 2 * linear MACs / 1e10
    mean_layers: torch.Tensor  # [T]

    def __len__(self) -> int:
        return len(self.thresholds)

    def setting(self, k: int) -> dict:
        early_exit = k > 0
        return {"width_mult_list": list(self.class_to_width), "mode": "wd_dynamic" if early_exit else "w_dynamic",
                "early_exit": early_exit, "exit_threshold": float(self.thresholds[k]) if early_exit else None,
                "score": float(self.score[k]), "relative_flops": float(self.relative_flops[k]),
                "relative_linear_flops": float(self.relative_linear_flops[k]), "flops": float(self.flops[k]),
                "mean_layers_executed": float(self.mean_layers[k])}


def _option_stats(predictions: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """[N, O, S] float64 sufficient statistics of each option's prediction: the one-hot confusion-matrix
    cell (label * C + prediction) for classification; (x, x^2, x*y) for regression."""
    if num_labels == 1:
        y = labels.double()[:, None]
        return torch.stack([predictions, predictions**2, predictions * y], -1)
    cell = labels.long()[:, None] * num_labels + predictions.long()
    return torch.nn.functional.one_hot(cell, num_labels * num_labels).double()


def score_from_stats(metric: str, stats: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """`metric` (accuracy, Matthews correlation, Pearson correlation, as utils_glue.compute_metrics) per row
    of summed statistics `stats` [T, S] over the examples with `labels`."""
    n = float(len(labels))
    if metric in CONFUSION_METRICS:
        conf = stats.view(-1, num_labels, num_labels)  # [T, true, predicted]
        correct = conf.diagonal(dim1=1, dim2=2).sum(-1)
        if metric == "acc":
            return correct / n
        true, pred = conf.sum(2), conf.sum(1)  # sklearn's multi-class MCC from the confusion matrix
        cov_tp = correct * n - (true * pred).sum(-1)
        cov_pp = n * n - (pred * pred).sum(-1)
        cov_tt = n * n - (true * true).sum(-1)
        denominator = cov_tt * cov_pp
        return torch.where(denominator > 0, cov_tp / denominator.clamp_min(1e-300).sqrt(), torch.zeros_like(cov_tp))
    if metric in REGRESSION_METRICS:
        y = labels.double()
        sy, syy = y.sum(), (y * y).sum()
        sx, sxx, sxy = stats.unbind(-1)
        var_x, var_y = n * sxx - sx * sx, n * syy - sy * sy
        denominator = var_x * var_y
        ok = (var_x > 1e-12 * n * sxx.abs().clamp_min(1e-300)) & (var_y > 0)
        return torch.where(ok, (n * sxy - sx * sy) / denominator.clamp_min(1e-300).sqrt(), torch.zeros_like(sx))
    raise ValueError(f"calibration cannot score metric '{metric}' from per-example statistics")


def sweep(cache: MapCache, labels: torch.Tensor, metric: str, num_labels: int, full_macs: dict[str, int]) -> Sweep:
    """Score and FLOPs of no early exit and of every distinct exit threshold, from the cache alone.

    An example leaves at off-ramp j for t in (e_j, min(e_0..e_{j-1})] when e_j is below every earlier exit
    score (else never at j). So as t grows past e_j, the example moves from its previous ending (the next
    later such off-ramp, or the end) to off-ramp j: summing these moves' statistics in the order of e gives
    every threshold's totals (O(N R log(N R)))."""
    n, num_ramps = cache.exit_scores.shape
    end, no_exit = num_ramps, num_ramps + 1
    features = torch.cat([_option_stats(cache.predictions, labels, num_labels),
                          torch.stack([cache.linear_macs, cache.attention_macs, cache.layers], -1).double()], -1)
    totals = [features[:, no_exit].sum(0, keepdim=True)]
    thresholds = [torch.tensor([math.nan], dtype=torch.float64)]
    e = cache.exit_scores.double()
    is_move = torch.zeros_like(e, dtype=torch.bool)
    lowest = torch.full((n,), math.inf, dtype=torch.float64)
    for j in range(num_ramps):
        is_move[:, j] = e[:, j] < lowest
        lowest = torch.minimum(lowest, e[:, j])
    values, deltas = [], []
    source = torch.full((n,), end, dtype=torch.long)
    for j in reversed(range(num_ramps)):
        idx = is_move[:, j].nonzero().view(-1)
        values.append(e[idx, j])
        deltas.append(features[idx, j] - features[idx, source[idx]])
        source[idx] = j
    if values and sum(len(v) for v in values):
        values, deltas = torch.cat(values), torch.cat(deltas)
        distinct, inverse = torch.unique(values, sorted=True, return_inverse=True)
        moves = torch.zeros(len(distinct), features.shape[-1], dtype=torch.float64).index_add_(0, inverse, deltas)
        totals.append(features[:, end].sum(0) + moves.cumsum(0))
        above = torch.cat([distinct[1:], (2 * distinct[-1:] + 1e-6)])
        middle = (distinct + above) / 2
        thresholds.append(torch.where(middle > distinct, middle, above))
    totals, thresholds = torch.cat(totals), torch.cat(thresholds)
    stats, (linear, attention, layers) = totals[:, :-3], totals[:, -3:].unbind(-1)
    # the same arithmetic as train_gate.run_inference: summed MACs / examples, then flops_summary
    summary = flops_summary({"linear": linear / n, "attention": attention / n, "total": (linear + attention) / n},
                            full_macs)
    return Sweep(cache.class_to_width, thresholds, score_from_stats(metric, stats, labels, num_labels),
                 summary["relative_flops"], summary["relative_linear_flops"], summary["flops"], layers / n)


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
        source = torch.full((n,), -1)
        previous = list(self.caches.values()) if self.reuse else []
        target = torch.tensor(key)
        for i, cache in enumerate(previous):
            same = torch.tensor(cache.class_to_width) == target  # [C]
            agree = (~cache.visited | same).all(1) & (source < 0)
            source[agree] = i
        rows = (source < 0).nonzero().view(-1)
        self.examples_forwarded += len(rows)
        if len(rows) == n:
            return collect_map(self.model, self.batches, key, self.off_ramps, self.seq_len)
        computed = collect_map(self.model, self._batches(rows), key, self.off_ramps, self.seq_len) if len(rows) \
            else None
        fields = {}
        for name in ("exit_scores", "predictions", "linear_macs", "attention_macs", "layers", "visited"):
            template = getattr(previous[0], name)
            out = torch.empty((n, *template.shape[1:]), dtype=template.dtype)
            for i, cache in enumerate(previous):
                take = source == i
                if take.any():
                    out[take] = getattr(cache, name)[take]
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
        stats = _option_stats(torch.cat(predictions)[:, None], self.labels, self.num_labels)[:, 0].sum(0)
        return float(score_from_stats(self.metric, stats[None], self.labels, self.num_labels)[0])

    def search(self, grid: Sequence[float], num_classes: int, objectives: Sequence[Objective],
               start: Sequence[float], reference_score: float, max_exhaustive: int = 256,
               within_se: float = 0.0) -> dict:
        """The best (map, threshold) per objective over the monotone maps on `grid`: all of them when there
        are at most `max_exhaustive`, else coordinate ascent from `start` (projected onto the grid).

        `within_se` = k > 0 (FLOPs budgets only): of the settings within the budget whose calibration score is
        at most k standard errors below the best one's, the one with the most FLOPs. On a few hundred examples
        score differences below one standard error are noise; the plain argmax then often lands on a much
        cheaper setting that loses on new data, and leaves the budget unused."""
        began, forward_before, forwarded_before = time.perf_counter(), self.forward_seconds, self.examples_forwarded
        maps = monotone_maps(grid, num_classes)
        exhaustive = len(maps) <= max_exhaustive
        if exhaustive:
            for m in maps:
                self.evaluate(m)

        def best_of(objective: Objective, begin: tuple[float, ...]) -> tuple[tuple, tuple[float, ...], int]:
            if not exhaustive:
                return self._coordinate_ascent(sorted(set(grid)), begin, objective, reference_score)
            best = None
            for m in maps:  # lexicographic order; the first of equal keys wins
                key, k = objective.choose(self.sweeps[m], reference_score)
                if best is None or key > best[0]:
                    best = (key, m, k)
            return best

        chosen, floors = {}, {}
        for objective in objectives:
            chosen[objective] = best_of(objective, project_map(start, grid))
            key, m, k = chosen[objective]
            if within_se > 0 and objective.kind == "flops_budget" and key[0] == 1:
                best_score = float(self.sweeps[m].score[k])
                floors[objective] = best_score - within_se * self.standard_error(best_score)
                chosen[objective] = best_of(replace(objective, floor=floors[objective]), m)
        results = {}
        for objective, (key, m, k) in chosen.items():
            results[objective] = {"feasible": key[0] >= 1, "candidate": k, **self.sweeps[m].setting(k)}
            if objective in floors:
                results[objective]["score_floor"] = floors[objective]
        return {"search": "exhaustive" if exhaustive else "coordinate_ascent", "maps_in_grid": len(maps),
                "maps_evaluated": len(self.sweeps), "candidates_evaluated": sum(len(s) for s in self.sweeps.values()),
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

    def pareto(self) -> list[dict]:
        """The Pareto front (score vs relative FLOPs) of every (map, threshold) evaluated so far."""
        sweeps = list(self.sweeps.values())
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
        return [sweeps[int(owner[i])].setting(int(index[i])) for i in order[keep]]
