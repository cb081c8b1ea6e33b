"""The calibration's candidates besides the gates' (map, threshold) settings, so that `train_gate_new.py
--calibrate` chooses among every strategy with one rule (`calibration.Calibrator.search(others=...)`):
- every static subnet (width x depth);
- confidence cascades of them (`baselines.cascade_candidates`: which subnets, cheap to expensive, and each
  step's threshold on a quantile grid of the stage's uncertainty), under every rule that fits the task.

Both are re-combined from one static pass per width over the calibration split (`static_logits`: every depth
read off the same encoder pass by `inference.static_output`, bit for bit what `dynamic_forward(fixed_width=w,
depth_mult=d)` returns, which is what `train_gate.py` runs for a static subnet and for a cascade's stage).
Every candidate is held as a `cascade.Cascade` (a static subnet: one stage), so that one function
(`cascade.cascade_from_outputs`) gives any candidate's per-example outcome and its figures are what
`train_gate.py` reports for its config entry (`candidate_entry`): a static subnet at full depth as mode
"static"; at a smaller depth as a one-stage cascade, the entry format that names a depth; a cascade as
`Cascade.entry()`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .baselines import Halves, cascade_candidates, full_model_macs, predictions_of, scores
from .cascade import CLASSIFICATION_RULES, REGRESSION_RULES, Cascade, cascade_from_outputs, stage_paths
from .errors import InputError
from .flops import flops_summary, subnet_macs
from .inference import static_output
from .modeling_flexbert import StaticRouter

__all__ = ["CASCADE_GRID", "STRATEGIES", "CandidateSet", "candidate_entry", "check_strategies", "static_logits",
           "static_points", "strategy_candidates"]

STRATEGIES = ("gates", "static", "cascade")  # what --calibration_strategies may name
CASCADE_GRID = (24, 6)  # quantile bins of each threshold for cascades of 2, 3, ... stages (0: none)

StageLogits = dict[tuple[float, float], torch.Tensor]  # (width, depth) -> logits of every calibration example


def candidate_entry(cascade: Cascade) -> dict:
    """The config entry (`train_gate.py --config`) of a candidate held as a cascade."""
    (width, depth), *rest = cascade.stages
    if not rest and depth == 1.0:
        return {"width_mult_list": [width], "mode": "static"}
    return cascade.entry()


@dataclass
class CandidateSet:
    """One strategy's candidates on the calibration split, each a `Cascade`, with the (score, relative FLOPs)
    the search compares (as a map's `threshold_sweep.Sweep`) and, per candidate, `setting`: its figures as
    `train_gate.py` reports them for its config entry."""

    strategy: str
    cascades: list[Cascade]
    score: torch.Tensor  # [T] float64
    relative_flops: torch.Tensor  # [T] float64
    logits: StageLogits
    config: object
    seq_len: int
    full_macs: dict[str, int]

    def __len__(self) -> int:
        return len(self.cascades)

    def setting(self, k: int) -> dict:
        cascade = self.cascades[k]
        out = cascade_from_outputs(cascade, [self.logits[s] for s in cascade.stages],
                                   [subnet_macs(self.config, w, d, self.seq_len) for w, d in cascade.stages])
        n = len(out.stage)
        linear, attention = float(out.linear_macs.sum()), float(out.attention_macs.sum())
        # the arithmetic of train_gate.py's report: summed MACs / examples, then flops_summary
        summary = flops_summary({"linear": linear / n, "attention": attention / n, "total": (linear + attention) / n},
                                self.full_macs)
        _, layers = stage_paths(self.config, cascade)
        entry = candidate_entry(cascade)
        return {"strategy": self.strategy, "name": cascade.name if len(cascade.stages) > 1 else cascade.stage_names[0],
                "entry": entry, "width_mult_list": [w for w, _ in cascade.stages], "mode": entry["mode"],
                "early_exit": False, "exit_threshold": None, "score": float(self.score[k]),
                "relative_flops": summary["relative_flops"], "relative_linear_flops": summary["relative_linear_flops"],
                "flops": summary["flops"], "mean_layers_executed": float(layers[out.stage].double().mean())}


@torch.no_grad()
def static_logits(model, batches: Sequence[Sequence[torch.Tensor]], widths: Sequence[float],
                  depths: Sequence[float]) -> StageLogits:
    """Every static subnet's logits on `batches` ((input_ids, attention_mask, token_type_ids), in order): one
    encoder pass per width to the deepest depth, each depth's head on its prefix (`inference.static_output`)."""
    out = {}
    for width in widths:
        subnets = {d: model.subnet(width, d) for d in depths}
        deepest = max(subnets.values(), key=lambda s: s.num_layers)
        per_depth = {d: [] for d in depths}
        for input_ids, attention_mask, token_type_ids in batches:
            states = model.encode(input_ids, attention_mask, token_type_ids, StaticRouter(deepest))
            for d, subnet in subnets.items():
                out_d = static_output(model, input_ids, attention_mask, states, subnet)
                per_depth[d].append(out_d.logits.float().cpu())
        out.update({(float(width), float(d)): torch.cat(logits) for d, logits in per_depth.items()})
    return out


def strategy_candidates(model, batches: Sequence[Sequence[torch.Tensor]], labels: torch.Tensor, metric: str,
                        seq_len: int, widths: Sequence[float], depths: Sequence[float], strategies: Sequence[str],
                        cascade_grid: Sequence[int] = CASCADE_GRID) -> list[CandidateSet]:
    """The static subnets (widths x depths) and their cascades (`cascade_grid`: quantile bins per cascade
    length, as compare_strategies.py's --cascade_grid) on the calibration split `batches` / `labels`, as far
    as `strategies` names them; MACs counted at `seq_len` tokens."""
    if not {"static", "cascade"} & set(strategies):
        return []
    config = model.config
    logits = static_logits(model, batches, widths, depths)
    macs = {(w, d): subnet_macs(config, w, d, seq_len) for w, d in logits}
    full = full_model_macs(config, seq_len)
    halves = Halves(labels, metric, config.num_labels, full, torch.arange(len(labels)), torch.arange(0))
    rules = REGRESSION_RULES if config.num_labels == 1 else CLASSIFICATION_RULES
    sets = []
    if "static" in strategies:
        statics = list(logits)
        sets.append(CandidateSet(
            "static", [Cascade((s,), (), rules[0]) for s in statics],
            scores(metric, torch.stack([predictions_of(logits[s]) for s in statics]), labels, config.num_labels),
            torch.tensor([macs[s]["total"] / full["total"] for s in statics], dtype=torch.float64),
            logits, config, seq_len, full))
    for stages, grid in enumerate(cascade_grid if "cascade" in strategies else (), start=2):
        for rule in rules if grid else ():
            found = cascade_candidates(logits, {s: m["total"] for s, m in macs.items()}, rule, stages, grid, halves)
            keep = [k for k, c in enumerate(found.settings or []) if all(t < float("inf") for t in c.thresholds)]
            if keep:  # an infinite threshold (the agreement rule's first stage) never stops anyone: dominated
                index = torch.tensor(keep)
                sets.append(CandidateSet("cascade", [found.settings[k] for k in keep], found.calibration[0][index],
                                         found.calibration[1][index], logits, config, seq_len, full))
    return sets


def check_strategies(strategies: Sequence[str], cascade_grid: Sequence[int]) -> None:
    """InputError unless `strategies` names one or more of `STRATEGIES` and the grid's values are 0 or >= 2."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise InputError(f"--calibration_strategies: choose one or more of {','.join(STRATEGIES)}"
                         + (f" (not '{unknown[0]}')" if unknown else ""))
    if any(g < 0 or g == 1 for g in cascade_grid):
        raise InputError("--calibration_cascade_grid values must be 0 (skip) or >= 2 quantile bins")


def static_points(sets: Sequence[CandidateSet]) -> dict[str, dict]:
    """{static_w<W>_d<D> (the static runs' folder names): score and relative FLOPs} of the static candidates."""
    return {f"static_w{w}_d{d}": {"score": float(group.score[k]), "relative_flops": float(group.relative_flops[k])}
            for group in sets if group.strategy == "static" for k, ((w, d),) in
            enumerate(c.stages for c in group.cascades)}
