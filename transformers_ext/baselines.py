"""Which dynamic inference pays: the reviewer baselines beside the gates, as pure functions over per-example
outputs computed once per model (no retraining), and their gap over the static frontier.

Two kinds of cache, both over every dev example (in dev order), so that any halving is a row selection:
- `PathOutputs`: one fixed path per example (heads per layer; one pattern for all, or a different one per
  example) and its logits at every off-ramp and at the end (`collect_paths`, one batched forward). A static
  subnet, a mixed per-layer width pattern (MatFormer's Mix'n'Match) and any depth prefix of it read the
  logits at the end or at an off-ramp; `exit_cache` turns it into a `calibration.MapCache` (depth-only early
  exit at a fixed width: d_dynamic; the shuffled gate), scored per threshold by `calibration.sweep`.
- `calibration.MapCache` of the trained gates (`calibration.collect_map`), the same way.

A strategy's `Candidates` (static subnets and patterns: `fixed_candidates`; thresholds: `exit_candidates`;
cascades of static subnets: `cascade_candidates`) are scored on the calibration half; at each FLOPs budget the
best one within it there (`calibration.Objective`'s rule) is reported on the reporting half by
`choose_and_report`: its score minus the static frontier (`frontier_at`, the upper envelope of the static
subnets on the same half, linearly interpolated) at its FLOPs there.

The shuffled gate permutes whole paths among the examples (`shuffled_paths`), so every layer's width
histogram and the FLOPs of each path are the gates'; it runs no gate, and its MACs count none. The noise
oracle runs one subnet in train mode (dropout on) under K seeds (`collect_paths(dropout_seed=k)`).
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from types import SimpleNamespace

import torch

from .calibration import MapCache, Objective, collect_map, score_from_stats, sweep
from .cascade import Cascade, cascade_from_outputs, uncertainty
from .flops import executed_macs, path_macs
from .inference import PathRecord, dynamic_forward

__all__ = ["Candidates", "Halves", "PathOutputs", "StrategyResult", "best_within_budget", "cascade_candidates",
           "cascade_grid", "choose_and_report", "collect_gates", "collect_paths", "exit_cache", "exit_candidates",
           "exit_outcome", "fixed_candidates", "frontier_at", "full_model_macs", "oracle_score", "predictions_of",
           "score", "scores", "shuffled_paths", "spread", "subset"]


# ---- summaries -----------------------------------------------------------------------------------------------
def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value) and the values."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "values": values}


def frontier_at(points: list[tuple[float, float]], flops: float) -> float | None:
    """The static frontier (upper envelope, linearly interpolated between its points) at `flops`. Of points at
    equal FLOPs (w0.5 d1, w0.75 d0.75 and w1 d0.5 cost exactly the same) only the best is on the envelope."""
    envelope = []
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):  # at equal FLOPs the best first
        if not envelope or y > envelope[-1][1]:
            envelope.append((x, y))
    for (x0, y0), (x1, y1) in zip(envelope, envelope[1:], strict=False):
        if x0 <= flops <= x1:
            return y0 + (y1 - y0) * (flops - x0) / (x1 - x0)
    if envelope and flops >= envelope[-1][0]:
        return envelope[-1][1]
    return None


def predictions_of(logits: torch.Tensor) -> torch.Tensor:
    """`[N]` float64: the class index, or the regression output."""
    return logits.view(-1).double() if logits.shape[-1] == 1 else logits.argmax(-1).double()


def scores(metric: str, predictions: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """`[T]`: `metric` (acc, mcc, pearson: `calibration.score_from_stats`) of each row of `predictions` `[T, N]`
    against `labels` `[N]`."""
    if num_labels == 1:
        x, y = predictions.double(), labels.double()[None]
        stats = torch.stack([x.sum(1), (x * x).sum(1), (x * y).sum(1)], -1)
    else:
        cell = labels.long()[None] * num_labels + predictions.long()
        stats = torch.zeros(len(cell), num_labels * num_labels, dtype=torch.float64)
        stats.scatter_add_(1, cell, torch.ones_like(cell, dtype=torch.float64))
    return score_from_stats(metric, stats, labels, num_labels)


def score(metric: str, predictions: torch.Tensor, labels: torch.Tensor, num_labels: int) -> float:
    """`metric` of `predictions` `[N]` against `labels`."""
    return float(scores(metric, predictions[None], labels, num_labels)[0])


def oracle_score(correct: torch.Tensor) -> float:
    """The per-example oracle over K ways of answering (`correct`: `[K, N]` bool): the fraction of examples
    that at least one of them gets right."""
    return float(correct.any(0).double().mean())


def shuffled_paths(heads: torch.Tensor, seed: int) -> torch.Tensor:
    """The shuffled gate: every example takes the path (heads per layer) of another example, drawn by a seeded
    permutation. Each layer's width histogram, and the joint distribution of paths, are those of `heads`; only
    the link between an input and its path is cut."""
    order = torch.randperm(heads.shape[0], generator=torch.Generator().manual_seed(seed))
    return heads[order.to(heads.device)]


# ---- per-example outputs of fixed paths ----------------------------------------------------------------------
@dataclass
class PathOutputs:
    """Every example's fixed path (`heads` `[N, L]`, all layers run) and its logits after each off-ramp layer
    (`ramp_logits` `[N, R, C]`, layers `ramp_layers`) and at the end (`logits` `[N, C]`)."""

    heads: torch.Tensor
    ramp_layers: list[int]
    ramp_logits: torch.Tensor
    logits: torch.Tensor

    def exits(self) -> list[tuple[int, torch.Tensor]]:
        """(layers run, logits) of every way to stop: after each off-ramp layer, then at the end."""
        ends = [(layer + 1, self.ramp_logits[:, j]) for j, layer in enumerate(self.ramp_layers)]
        return ends + [(self.heads.shape[1], self.logits)]


class _FixedPaths:
    """Router: example b runs layer i with `heads[b, i]` heads; nobody leaves, the off-ramps' logits are kept."""

    def __init__(self, heads: torch.Tensor, ramp_layers: Sequence[int], classify):
        self.path, self.ramp_layers, self.classify = heads, set(ramp_layers), classify
        self.num_layers = heads.shape[1]
        self.ramp_logits: list[torch.Tensor] = []

    def heads(self, layer_index: int, hidden: torch.Tensor, mask: torch.Tensor) -> int | torch.Tensor:
        column = self.path[:, layer_index]
        return int(column[0]) if bool((column == column[0]).all()) else column

    def after_layer(self, layer_index: int, hidden: torch.Tensor, mask: torch.Tensor) -> None:
        if layer_index in self.ramp_layers:
            self.ramp_logits.append(self.classify(hidden, mask))


def _length_sorted_batches(inputs: Sequence[torch.Tensor], batch_size: int):
    """(order, batches): the examples by decreasing length, in batches with their padding trimmed."""
    attention_mask = inputs[1]
    order = attention_mask.sum(1).argsort(descending=True, stable=True)
    batches = []
    for rows in order.split(batch_size):
        length = int(attention_mask[rows].sum(1).max())
        batches.append([t[rows, :length] for t in inputs])
    return order, batches


@torch.no_grad()
def collect_paths(model, inputs: Sequence[torch.Tensor], heads: torch.Tensor, ramp_layers: Sequence[int],
                  batch_size: int = 64, dropout_seed: int | None = None) -> PathOutputs:
    """Run every example of `inputs` ((input_ids, attention_mask, token_type_ids), dev order) along its path
    `heads` (`[N, L']`, or `[L']`: the same for all; the first L' layers run) in length-sorted batches with
    padding trimmed, keeping the logits after `ramp_layers` and at the end. `dropout_seed`: run with dropout
    on (train mode), seeded (the noise oracle's samples); the model is put back in eval mode."""
    n = inputs[0].shape[0]
    heads = heads.expand(n, -1) if heads.dim() == 1 else heads
    ramp_layers = sorted(i for i in ramp_layers if i < heads.shape[1] - 1)
    order, batches = _length_sorted_batches(inputs, batch_size)
    ramp_out, end_out = [], []
    if dropout_seed is not None:
        torch.manual_seed(dropout_seed)
        model.train()
    try:
        for rows, batch in zip(order.split(batch_size), batches, strict=True):
            router = _FixedPaths(heads[rows], ramp_layers, model.classify)
            states = model.encode(*batch, router)
            end_out.append(model.classify(states[-1], batch[1]).float())
            ramp_out.append(torch.stack(router.ramp_logits, 1).float() if ramp_layers
                            else end_out[-1].new_zeros(len(rows), 0, end_out[-1].shape[-1]))
    finally:
        model.eval()
    back = order.argsort()
    return PathOutputs(heads.clone(), ramp_layers, torch.cat(ramp_out)[back], torch.cat(end_out)[back])


@torch.no_grad()
def collect_gates(model, inputs: Sequence[torch.Tensor], class_to_width: Sequence[float], off_ramps: Sequence[int],
                  seq_len: int, batch_size: int = 64) -> tuple[MapCache, torch.Tensor]:
    """The trained gates under `class_to_width`, in dev order: their exit cache (`calibration.collect_map`)
    and every example's path without early exit (heads per layer `[N, L]`, what the shuffled gate permutes)."""
    order, batches = _length_sorted_batches(inputs, batch_size)
    back = order.argsort()
    cache = subset(collect_map(model, batches, class_to_width, off_ramps, seq_len), back)
    heads = torch.cat([dynamic_forward(model, *batch, class_to_width=class_to_width).heads for batch in batches])
    return cache, heads[back]


def exit_cache(outputs: PathOutputs, config, seq_len: int) -> MapCache:
    """Early exit along fixed paths as a `calibration.MapCache` (options: leave at off-ramp j, run to the end
    with the off-ramps, run to the end without them), so that `calibration.sweep` scores every threshold. The
    exit score is the off-ramps' rule (`cascade.uncertainty`: entropy; regression: agreement with the previous
    off-ramp) and MACs are `flops.executed_macs` of each cut path (no gate runs)."""
    regression = config.num_labels == 1
    n, num_layers = outputs.heads.shape
    num_ramps = len(outputs.ramp_layers)
    scores = [uncertainty("agreement" if regression else "entropy", outputs.ramp_logits[:, j],
                          outputs.ramp_logits[:, j - 1] if j else None) for j in range(num_ramps)]
    logits = [outputs.ramp_logits[:, j] for j in range(num_ramps)] + [outputs.logits, outputs.logits]
    linear, attention, layers = [], [], []
    for option in range(num_ramps + 2):
        cut = outputs.ramp_layers[option] + 1 if option < num_ramps else num_layers
        heads = outputs.heads.clone()
        heads[:, cut:] = 0
        record = PathRecord(heads=heads, width_class=torch.full_like(heads, -1),
                            exit_layer=torch.full((n,), cut), gates_run=torch.zeros(n, dtype=torch.long),
                            off_ramps_run=torch.full((n,), min(option + 1, num_ramps) if option <= num_ramps else 0),
                            exited=torch.full((n,), option < num_ramps), logits=outputs.logits,
                            active=torch.arange(0))
        lin, att = executed_macs(config, seq_len, record)
        linear.append(lin)
        attention.append(att)
        layers.append(torch.full((n,), cut))
    return MapCache(class_to_width=(), ramp_layers=list(outputs.ramp_layers),
                    exit_scores=torch.stack(scores, 1).double() if scores else torch.zeros(n, 0, dtype=torch.float64),
                    predictions=torch.stack([predictions_of(x) for x in logits], 1),
                    linear_macs=torch.stack(linear, 1), attention_macs=torch.stack(attention, 1),
                    layers=torch.stack(layers, 1), visited=torch.zeros(n, 0, dtype=torch.bool))


def subset(cache: MapCache, rows: torch.Tensor) -> MapCache:
    """The cache of the examples `rows` (in that order)."""
    per_example = {f.name: getattr(cache, f.name)[rows] for f in fields(cache)
                   if isinstance(getattr(cache, f.name), torch.Tensor)}
    return replace(cache, **per_example)


def exit_outcome(cache: MapCache, threshold: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(predictions, MACs) per example at exit `threshold` (None: no early exit): each example leaves at the
    first off-ramp whose exit score is < threshold, else runs to the end (as `inference.EarlyExit`)."""
    n, num_ramps = cache.exit_scores.shape
    if threshold is None or math.isnan(threshold):
        option = torch.full((n,), num_ramps + 1)
    else:
        leaves = torch.cat([cache.exit_scores < threshold, torch.ones(n, 1, dtype=torch.bool)], 1)
        option = leaves.long().argmax(1)  # the first True
    take = option[:, None]
    macs = (cache.linear_macs + cache.attention_macs).gather(1, take)[:, 0]
    return cache.predictions.gather(1, take)[:, 0], macs


# (width_mult, depth_mult) -> every example's logits, and -> MACs per example
StaticLogits = dict[tuple[float, float], torch.Tensor]
StaticMacs = dict[tuple[float, float], int]


# ---- choosing on one half, reporting on the other ------------------------------------------------------------
@dataclass
class Halves:
    """The labels, the scoring, the full model's MACs and one halving (calibration rows, reporting rows)."""

    labels: torch.Tensor
    metric: str
    num_labels: int
    full_macs: dict[str, int]  # the full model's (flops.path_macs)
    calibration: torch.Tensor
    reporting: torch.Tensor

    def evaluate(self, predictions: torch.Tensor, macs: torch.Tensor, rows: torch.Tensor) -> tuple[float, float]:
        """(score, relative FLOPs) of an outcome (`predictions`, `macs` of the examples `rows`)."""
        return (score(self.metric, predictions, self.labels[rows], self.num_labels),
                float(macs.double().mean()) / self.full_macs["total"])


# outcome(k, rows): (predictions, MACs) of candidate k on the examples `rows`
Outcome = Callable[[int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Candidates:
    """A strategy's settings: their names, their outcome on any examples, and (when computed in bulk) their
    (scores, relative FLOPs) on the calibration half; otherwise each outcome is scored there."""

    names: list[str]
    outcome: Outcome
    calibration: tuple[torch.Tensor, torch.Tensor] | None = None
    settings: list | None = None  # what each name stands for, where it is an object (`cascade.Cascade`)


@dataclass
class StrategyResult:
    """One strategy's choice at one budget: the setting, and its score and relative FLOPs on each half."""

    setting: str
    calibration_score: float
    calibration_flops: float
    reporting_score: float
    reporting_flops: float
    gap: float | None  # reporting score - the static frontier on the reporting half at reporting_flops


def best_within_budget(scores: torch.Tensor, relative_flops: torch.Tensor, budget: float) -> int | None:
    """The candidate with the best calibration score at relative FLOPs <= `budget` (ties: fewer FLOPs), by
    `calibration.Objective`'s rule; None when none fits."""
    key, k = Objective("flops_budget", budget).choose(
        SimpleNamespace(score=scores.double(), relative_flops=relative_flops.double()), math.nan)
    return k if key[0] >= 1 else None


def choose_and_report(candidates: Candidates, halves: Halves, budgets: Sequence[float],
                      static_reporting: list[tuple[float, float]]) -> dict[float, StrategyResult | None]:
    """Per budget: the candidate chosen on the calibration half, reported on the reporting half against the
    static frontier there (`static_reporting`: (relative FLOPs, score) of each static subnet on that half)."""
    if not candidates.names:
        return dict.fromkeys(budgets)
    if candidates.calibration is None:
        points = [halves.evaluate(*candidates.outcome(k, halves.calibration), halves.calibration)
                  for k in range(len(candidates.names))]
        calibration = tuple(torch.tensor(column, dtype=torch.float64) for column in zip(*points, strict=True))
    else:
        calibration = candidates.calibration
    out = {}
    for budget in budgets:
        k = best_within_budget(*calibration, budget)
        if k is None:
            out[budget] = None
            continue
        reporting_score, reporting_flops = halves.evaluate(*candidates.outcome(k, halves.reporting),
                                                           halves.reporting)
        edge = frontier_at(static_reporting, reporting_flops)
        out[budget] = StrategyResult(candidates.names[k], float(calibration[0][k]), float(calibration[1][k]),
                                     reporting_score, reporting_flops,
                                     None if edge is None else reporting_score - edge)
    return out


def fixed_candidates(configurations: dict[str, tuple[torch.Tensor, int]]) -> Candidates:
    """Fixed configurations (static subnets, width patterns): name -> (every example's logits, MACs)."""
    names = list(configurations)
    predictions = [predictions_of(configurations[n][0]) for n in names]
    macs = [configurations[n][1] for n in names]
    return Candidates(names, lambda k, rows: (predictions[k][rows], torch.full((len(rows),), macs[k])))


def exit_candidates(cache: MapCache, halves: Halves) -> Candidates:
    """No early exit, and every distinct exit threshold of `calibration.sweep` on the calibration half (which
    also scores them there)."""
    swept = sweep(subset(cache, halves.calibration), halves.labels[halves.calibration], halves.metric,
                  halves.num_labels, halves.full_macs)
    thresholds = [None if math.isnan(t) else t for t in swept.thresholds.tolist()]
    names = ["no early exit" if t is None else f"exit threshold {t:.4g}" for t in thresholds]
    return Candidates(names, lambda k, rows: exit_outcome(subset(cache, rows), thresholds[k]),
                      (swept.score, swept.relative_flops))


def cascade_grid(stage_logits: Sequence[torch.Tensor], stage_macs: Sequence[int], rule: str,
                 thresholds: torch.Tensor, labels: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores `[T]`, mean MACs `[T]`) of a cascade at every row of `thresholds` `[T, stages - 1]`, from each
    stage's logits on the same examples: `cascade.cascade_from_outputs`'s decisions, for many thresholds at once
    (an example stops at the first stage whose uncertainty is below its threshold, else at the last)."""
    num_stages = len(stage_logits)
    u = torch.stack([uncertainty(rule, stage_logits[i], stage_logits[i - 1] if i else None)
                     for i in range(num_stages - 1)])  # [S-1, N]
    # compared in the uncertainty's dtype, as `cascade._run` compares it with a threshold (a Python float)
    stops = u[None] < thresholds.to(u.dtype)[:, :, None]  # [T, S-1, N]
    stops = torch.cat([stops, torch.ones_like(stops[:, :1])], 1)
    stage = stops.long().argmax(1)  # [T, N]: the first stage that stops
    predictions = torch.stack([predictions_of(x) for x in stage_logits])  # [S, N]
    chosen = predictions.gather(0, stage)
    executed = torch.tensor(stage_macs, dtype=torch.float64).cumsum(0)[stage]
    return scores(metric, chosen, labels, stage_logits[0].shape[-1]), executed.mean(1)


def threshold_grid(u: torch.Tensor, levels: torch.Tensor) -> list[float]:
    """Thresholds near the quantiles `levels` of the uncertainties `u`, each halfway between two neighbouring
    distinct values: a quantile can fall on an example's own value, and then a last-bit change of that value
    (the same subnet run in another batch, with other padding) moves the example across the threshold."""
    if not len(u):
        return [math.inf]
    values = torch.unique(u)
    if len(values) < 2:
        return [values.item()]
    midpoints = (values[1:] + values[:-1]) / 2
    nearest = (midpoints[None] - torch.quantile(u, levels)[:, None]).abs().argmin(1)
    return sorted(set(midpoints[nearest].tolist()))


def cascade_candidates(static_logits: StaticLogits, static_macs: StaticMacs, rule: str, num_stages: int,
                       grid: int, halves: Halves) -> Candidates:
    """Every cascade of `num_stages` static subnets of strictly increasing MACs under `rule`, each step's
    threshold on `grid - 1` quantiles (levels k / grid) of that stage's uncertainty on the calibration half;
    scored there in bulk (`cascade_grid`), reported by `cascade.cascade_from_outputs`."""
    ordered = sorted(static_logits, key=lambda s: static_macs[s])
    levels = torch.arange(1, grid, dtype=torch.float64) / grid
    rows, cascades, cal_scores, cal_macs = halves.calibration, [], [], []
    for stages in itertools.combinations(ordered, num_stages):
        if any(static_macs[a] >= static_macs[b] for a, b in itertools.pairwise(stages)):
            continue
        logits = [static_logits[s][rows] for s in stages]
        grids = []
        for i in range(num_stages - 1):
            u = uncertainty(rule, logits[i], logits[i - 1] if i else None).double()
            grids.append(threshold_grid(u[torch.isfinite(u)], levels))
        grid_rows = torch.tensor(list(itertools.product(*grids)), dtype=torch.float64)
        s, m = cascade_grid(logits, [static_macs[x] for x in stages], rule, grid_rows, halves.labels[rows],
                            halves.metric)
        cascades += [Cascade(stages, tuple(t), rule) for t in grid_rows.tolist()]
        cal_scores.append(s)
        cal_macs.append(m)
    if not cascades:
        return Candidates([], lambda k, rows: None)

    def outcome(k: int, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cascade = cascades[k]
        out = cascade_from_outputs(cascade, [static_logits[s][rows] for s in cascade.stages],
                                   [{"linear": static_macs[s], "attention": 0} for s in cascade.stages])
        return predictions_of(out.logits), out.macs

    return Candidates([c.name for c in cascades], outcome,
                      (torch.cat(cal_scores), torch.cat(cal_macs) / halves.full_macs["total"]), cascades)


def full_model_macs(config, seq_len: int) -> dict[str, int]:
    """The full model's MACs per example (the denominator of relative FLOPs)."""
    return path_macs(config, seq_len, [config.num_attention_heads] * config.num_hidden_layers)
