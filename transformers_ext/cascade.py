"""Confidence cascades of static subnets: run a cheap subnet, and pass the examples it is unsure about on to
the next, more expensive one (Wang et al., ICLR 2022; Jitkrittum et al., NeurIPS 2023).

A `Cascade` is a list of static subnets (width, depth), cheap to expensive, and one threshold per step. At
stage i < last an example keeps stage i's answer when its uncertainty is strictly below `thresholds[i]`
(the same "< threshold" as the off-ramps' early exit), else it runs stage i + 1; the last stage answers for
everyone left. Uncertainty by `rule`:
- "max_softmax": 1 - the largest softmax probability (classification);
- "entropy": entropy (nats) of the softmax, as the off-ramps' exit rule (classification);
- "agreement": |prediction - previous stage's prediction| (regression, STS-B). The definition of
  `inference.EarlyExit` for regression: the first stage has no previous prediction, so nobody stops there.

Nothing is reused between stages (each runs from the embeddings), so an example's executed MACs are the sum
of the static subnets' MACs (`flops.subnet_macs`) over the stages it ran. `cascade_forward` runs a batch
(only the escalated examples run the next stage); `cascade_from_outputs` re-combines the same decisions from
every stage's cached logits on every example (what a threshold search needs), with the same result.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .flops import subnet_macs
from .inference import dynamic_forward, prediction_entropy
from .modeling_flexbert import heads_kept, layers_kept

__all__ = ["CLASSIFICATION_RULES", "Cascade", "CascadeOutput", "REGRESSION_RULES", "cascade_forward",
           "cascade_from_outputs", "stage_paths", "uncertainty"]

CLASSIFICATION_RULES = ("max_softmax", "entropy")
REGRESSION_RULES = ("agreement",)


def uncertainty(rule: str, logits: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
    """`[B]` float: how unsure a stage is of each example's answer (lower: surer). `previous`: the previous
    stage's logits of the same examples (the agreement rule; None at the first stage: +inf)."""
    if rule == "max_softmax":
        return 1.0 - logits.float().softmax(-1).amax(-1)
    if rule == "entropy":
        return prediction_entropy(logits.float())
    if rule == "agreement":
        if previous is None:
            return torch.full((logits.shape[0],), math.inf, device=logits.device)
        return (logits.float().view(-1) - previous.float().view(-1)).abs()
    raise ValueError(f"unknown cascade rule '{rule}'; choose one of {CLASSIFICATION_RULES + REGRESSION_RULES}")


@dataclass(frozen=True)
class Cascade:
    """Static subnets `stages` ((width_mult, depth_mult), cheap to expensive) and `thresholds` (one per step:
    len(stages) - 1). A cascade of one stage is that static subnet."""

    stages: tuple[tuple[float, float], ...]
    thresholds: tuple[float, ...]
    rule: str

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple((float(w), float(d)) for w, d in self.stages))
        object.__setattr__(self, "thresholds", tuple(float(t) for t in self.thresholds))
        if not self.stages:
            raise ValueError("a cascade needs at least one stage")
        if len(self.thresholds) != len(self.stages) - 1:
            raise ValueError(f"a cascade of {len(self.stages)} stages needs {len(self.stages) - 1} thresholds, "
                             f"got {len(self.thresholds)}")
        if self.rule not in CLASSIFICATION_RULES + REGRESSION_RULES:
            raise ValueError(f"unknown cascade rule '{self.rule}'; choose one of "
                             f"{CLASSIFICATION_RULES + REGRESSION_RULES}")

    def check_task(self, num_labels: int) -> None:
        """ValueError when the rule does not fit the task (regression: agreement; classification: the others)."""
        allowed = REGRESSION_RULES if num_labels == 1 else CLASSIFICATION_RULES
        if self.rule not in allowed:
            kind = "regression" if num_labels == 1 else "classification"
            raise ValueError(f"cascade rule '{self.rule}' does not fit {kind}; choose one of {allowed}")

    def check_model(self, config, seq_len: int) -> None:
        """ValueError when the rule does not fit the model's task or a stage is not strictly more expensive
        (MACs at `seq_len` tokens) than the one before it: escalating must buy computation."""
        self.check_task(config.num_labels)
        macs = [sum(m.values()) for m in _stage_macs(config, self, seq_len)]
        for i in range(1, len(macs)):
            if macs[i] <= macs[i - 1]:
                raise ValueError(f"cascade stages must go from cheap to expensive: {self.stage_names[i]} "
                                 f"({macs[i]:,} MACs) after {self.stage_names[i - 1]} ({macs[i - 1]:,} MACs)")

    @property
    def stage_names(self) -> list[str]:
        """Each stage as `w<width>_d<depth>` (the spelling of --cascade and of the sweep's folder names)."""
        return [f"w{w:g}_d{d:g}" for w, d in self.stages]

    def entry(self) -> dict:
        """The inference-config entry of this cascade (the JSON a `--cascade` run would read back)."""
        return {"mode": "cascade", "cascade_stages": [list(s) for s in self.stages],
                "cascade_thresholds": list(self.thresholds), "cascade_rule": self.rule}

    @classmethod
    def from_entry(cls, entry: dict) -> Cascade:
        return cls(tuple(tuple(s) for s in entry["cascade_stages"]), tuple(entry["cascade_thresholds"]),
                   entry["cascade_rule"])

    @property
    def name(self) -> str:
        steps = self.stage_names
        return f"cascade[{self.rule}]:" + " > ".join(
            steps[0:1] + [f"(t{t:.4g}) {s}" for t, s in zip(self.thresholds, steps[1:], strict=True)])


@dataclass
class CascadeOutput:
    """Per example: the logits of the stage that answered, that stage's index (stages run - 1) and the MACs
    executed over every stage it ran. From `cascade_forward` also the answering stage's path in the fields of
    `inference.PathRecord` (`heads`, `width_class` = the stage's index on the layers it ran, `exit_layer`,
    `exited`), so that reports and prediction records read a cascade as any routed output."""

    logits: torch.Tensor  # [B, num_labels]
    stage: torch.Tensor  # [B] int64
    linear_macs: torch.Tensor  # [B] int64
    attention_macs: torch.Tensor  # [B] int64
    heads: torch.Tensor | None = None  # [B, L] the answering stage's heads per layer (0: beyond its depth)
    exit_layer: torch.Tensor | None = None  # [B] the answering stage's layer count

    @property
    def macs(self) -> torch.Tensor:
        return self.linear_macs + self.attention_macs

    @property
    def width_class(self) -> torch.Tensor:
        return torch.where(self.heads > 0, self.stage[:, None], -1)

    @property
    def exited(self) -> torch.Tensor:  # no off-ramps in a cascade
        return torch.zeros_like(self.stage, dtype=torch.bool)


# run_stage(i, rows): stage i's logits [len(rows), C] for the examples `rows` (indices into the batch)
StageRunner = Callable[[int, torch.Tensor], torch.Tensor]


def _run(cascade: Cascade, batch_size: int, stage_macs: Sequence[dict[str, int]], run_stage: StageRunner,
         device: torch.device) -> CascadeOutput:
    """The cascade's one decision loop: stage i runs on the examples still undecided, those it is sure of
    keep its answer, the others go on."""
    rows = torch.arange(batch_size, device=device)
    stage = torch.zeros(batch_size, dtype=torch.long, device=device)
    linear, attention = torch.zeros_like(stage), torch.zeros_like(stage)
    logits_out: torch.Tensor | None = None
    previous = None
    for i in range(len(cascade.stages)):
        logits = run_stage(i, rows)
        if logits_out is None:
            logits_out = torch.zeros(batch_size, logits.shape[-1], dtype=logits.dtype, device=device)
        linear[rows] += stage_macs[i]["linear"]
        attention[rows] += stage_macs[i]["attention"]
        if i == len(cascade.stages) - 1:
            done = torch.ones(len(rows), dtype=torch.bool, device=device)
        else:
            done = uncertainty(cascade.rule, logits, previous) < cascade.thresholds[i]
        logits_out[rows[done]] = logits[done]
        stage[rows[done]] = i
        rows, previous = rows[~done], logits[~done]
        if rows.numel() == 0:
            break
    return CascadeOutput(logits_out, stage, linear, attention)


def _stage_macs(config, cascade: Cascade, seq_len: int) -> list[dict[str, int]]:
    return [subnet_macs(config, w, d, seq_len) for w, d in cascade.stages]


@torch.no_grad()
def cascade_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor,
                    cascade: Cascade, seq_len: int | None = None) -> CascadeOutput:
    """One batch through `cascade`: every stage runs only on the examples still undecided (a sub-batch of the
    same padded length). MACs per example are counted at `seq_len` tokens (default: the batch's padded
    length; inference reports count `max_seq_length`)."""
    cascade.check_task(model.config.num_labels)
    macs = _stage_macs(model.config, cascade, input_ids.shape[1] if seq_len is None else seq_len)

    def run_stage(i: int, rows: torch.Tensor) -> torch.Tensor:
        width, depth = cascade.stages[i]
        return dynamic_forward(model, input_ids[rows], attention_mask[rows], token_type_ids[rows],
                               fixed_width=width, depth_mult=depth).logits

    out = _run(cascade, input_ids.shape[0], macs, run_stage, input_ids.device)
    stage_heads, stage_layers = stage_paths(model.config, cascade, input_ids.device)
    out.heads, out.exit_layer = stage_heads[out.stage], stage_layers[out.stage]
    return out


def stage_paths(config, cascade: Cascade, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(heads per layer `[S, L]` of each stage's static subnet, 0 beyond its depth; its layer count `[S]`)."""
    heads = torch.zeros(len(cascade.stages), config.num_hidden_layers, dtype=torch.long, device=device)
    layers = torch.zeros(len(cascade.stages), dtype=torch.long, device=device)
    for i, (width, depth) in enumerate(cascade.stages):
        layers[i] = layers_kept(config, depth)
        heads[i, : layers[i]] = heads_kept(config, width)
    return heads, layers


def cascade_from_outputs(cascade: Cascade, stage_logits: Sequence[torch.Tensor],
                         stage_macs: Sequence[dict[str, int]]) -> CascadeOutput:
    """What `cascade_forward` returns, from each stage's logits on every example (`stage_logits[i]`: `[N, C]`,
    computed once per subnet) and each stage's per-example MACs (`flops.subnet_macs`)."""
    if len(stage_logits) != len(cascade.stages) or len(stage_macs) != len(cascade.stages):
        raise ValueError(f"{len(cascade.stages)} stages but {len(stage_logits)} logits and {len(stage_macs)} MACs")
    return _run(cascade, stage_logits[0].shape[0], stage_macs, lambda i, rows: stage_logits[i][rows],
                stage_logits[0].device)
