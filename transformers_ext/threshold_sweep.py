"""One class -> width map's forward over a calibration split, cached, and every exit threshold's score and
FLOPs re-combined from that cache without another forward (the calibration's inner loop; the search over maps
is `calibration.Calibrator`).

`collect_map` routes every example through the gates as at inference and runs every off-ramp, but nobody
leaves (`RecordingExit`: an `EarlyExit` whose rule never fires, keeping the off-ramps' logits). For each
example the cache keeps the prediction and the MACs of each way it can end: leave at off-ramp j, run to the
end with the off-ramps, or run to the end without them (no early exit, i.e. w_dynamic). The MACs are
`flops.executed_macs` of the path record cut at that exit, so they are what `train_gate.py` reports for the
same path. An example that leaves at off-ramp j runs no later gate or layer, and the other examples do not
change its path, so the score and FLOPs of every threshold are re-combined from the cache (`sweep`): an
example leaves at the first off-ramp whose exit score is < t (entropy of the off-ramp's softmax; STS-B: how far
the prediction moved since the previous off-ramp, never at the first one).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from .flops import executed_macs, flops_summary
from .inference import EarlyExit, GateRouter, PathRecord, prediction_entropy, routed_forward

__all__ = ["CONFUSION_METRICS", "REGRESSION_METRICS", "MapCache", "RecordingExit", "Sweep", "collect_map",
           "option_stats", "score_from_stats", "sweep"]

# Metrics the sweep computes from per-example sufficient statistics (utils_glue.primary_metric of each task).
CONFUSION_METRICS = ("acc", "mcc")
REGRESSION_METRICS = ("pearson",)


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


def option_stats(predictions: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
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
    features = torch.cat([option_stats(cache.predictions, labels, num_labels),
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
