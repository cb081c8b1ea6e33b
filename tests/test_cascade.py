"""Confidence cascades of static subnets (transformers_ext/cascade.py) on a tiny random BERT (h32, L4, H8, I64;
large random weights so that the stages' confidences spread): batch 1 = batch 32, executed FLOPs = the sum of
the stages each example ran (against torch's FlopCounterMode), the threshold extremes are the first and the
last stage alone, and the re-combination from cached logits equals the batched run."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_config, make_inputs, make_model
from torch.utils.flop_counter import FlopCounterMode

from transformers_ext import dynamic_forward, subnet_macs
from transformers_ext.cascade import Cascade, cascade_forward, cascade_from_outputs, uncertainty

STAGES = ((0.25, 0.5), (0.5, 1.0), (1.0, 1.0))
BATCH, SEQ_LEN = 32, 12


def _model(num_labels: int = 2):
    return make_model(make_config(num_labels=num_labels, initializer_range=0.2))


def _static_logits(model, inputs, stages=STAGES) -> list[torch.Tensor]:
    return [dynamic_forward(model, *inputs, fixed_width=w, depth_mult=d).logits for w, d in stages]


def _middle_threshold(values: torch.Tensor) -> float:
    """A threshold near the median of `values` in the widest gap there, so that float noise of the order of
    1e-7 between batch compositions cannot flip a decision."""
    ordered = values.sort().values
    middle = range(len(ordered) // 3, 2 * len(ordered) // 3)
    i = max(middle, key=lambda j: float(ordered[j + 1] - ordered[j]))
    return float(ordered[i] + ordered[i + 1]) / 2


@pytest.fixture(scope="module")
def setup():
    model = _model()
    inputs = make_inputs(batch=BATCH, seq_len=SEQ_LEN, seed=3)
    logits = _static_logits(model, inputs)
    thresholds = tuple(_middle_threshold(uncertainty("max_softmax", x)) for x in logits[:-1])
    return model, inputs, Cascade(STAGES, thresholds, "max_softmax")


def test_batch_of_one_equals_batch_of_32(setup):
    model, inputs, cascade = setup
    together = cascade_forward(model, *inputs, cascade)
    alone = [cascade_forward(model, *(t[i : i + 1] for t in inputs), cascade) for i in range(BATCH)]
    assert sorted(set(together.stage.tolist())) == [0, 1, 2]  # every stage answers some examples
    assert together.stage.tolist() == [int(a.stage) for a in alone]
    assert together.logits.argmax(-1).tolist() == [int(a.logits.argmax(-1)) for a in alone]
    assert torch.allclose(together.logits, torch.cat([a.logits for a in alone]), atol=1e-5)
    assert together.macs.tolist() == [int(a.macs) for a in alone]


def test_executed_flops_are_the_stages_each_example_ran(setup):
    model, inputs, cascade = setup
    with FlopCounterMode(display=False) as counter:
        out = cascade_forward(model, *inputs, cascade)
    per_stage = [subnet_macs(model.config, w, d, SEQ_LEN)["total"] for w, d in STAGES]
    expected = [sum(per_stage[: int(s) + 1]) for s in out.stage]
    assert out.macs.tolist() == expected
    assert counter.get_total_flops() == 2 * sum(expected)
    # not "every example ran every stage", nor "only the answering stage counts"
    assert sum(expected) < BATCH * sum(per_stage)
    assert sum(expected) > sum(per_stage[int(s)] for s in out.stage)


def test_threshold_extremes_are_the_first_and_the_last_stage(setup):
    model, inputs, cascade = setup
    first, *_, last = _static_logits(model, inputs)
    per_stage = [subnet_macs(model.config, w, d, SEQ_LEN)["total"] for w, d in STAGES]
    nothing = cascade_forward(model, *inputs, Cascade(STAGES, (math.inf, math.inf), "entropy"))
    assert torch.equal(nothing.logits, first) and nothing.stage.eq(0).all()
    assert nothing.macs.eq(per_stage[0]).all()
    everything = cascade_forward(model, *inputs, Cascade(STAGES, (-math.inf, -math.inf), "entropy"))
    assert torch.equal(everything.logits, last) and everything.stage.eq(2).all()
    assert everything.macs.eq(sum(per_stage)).all()


@pytest.mark.parametrize("rule", ["max_softmax", "entropy"])
def test_cached_recombination_equals_the_batched_run(setup, rule):
    model, inputs, _ = setup
    logits = _static_logits(model, inputs)
    thresholds = tuple(_middle_threshold(uncertainty(rule, x)) for x in logits[:-1])
    cascade = Cascade(STAGES, thresholds, rule)
    run = cascade_forward(model, *inputs, cascade)
    cached = cascade_from_outputs(cascade, logits, [subnet_macs(model.config, w, d, SEQ_LEN) for w, d in STAGES])
    assert cached.stage.tolist() == run.stage.tolist()
    assert cached.macs.tolist() == run.macs.tolist()
    assert torch.allclose(cached.logits, run.logits, atol=1e-5)


def test_regression_agreement_rule_never_stops_at_the_first_stage():
    model = _model(num_labels=1)
    inputs = make_inputs(batch=BATCH, seq_len=SEQ_LEN, seed=3)
    logits = _static_logits(model, inputs)
    moved = (logits[1] - logits[0]).view(-1).abs()
    t = _middle_threshold(moved)
    out = cascade_forward(model, *inputs, Cascade(STAGES, (math.inf, t), "agreement"))
    # stage 1 answers exactly the examples whose prediction moved less than t since stage 0
    assert out.stage.tolist() == [1 if m < t else 2 for m in moved.tolist()]
    assert torch.allclose(out.logits.view(-1), torch.where(moved < t, logits[1].view(-1), logits[2].view(-1)))
    with pytest.raises(ValueError, match="does not fit regression"):
        cascade_forward(model, *inputs, Cascade(STAGES, (0.5, 0.5), "entropy"))
    with pytest.raises(ValueError, match="needs 2 thresholds"):
        Cascade(STAGES, (0.5,), "agreement")


def test_entry_round_trip():
    cascade = Cascade(((0.25, 0.5), (1.0, 1.0)), (0.1,), "max_softmax")
    assert Cascade.from_entry(cascade.entry()) == cascade
    assert cascade.name == "cascade[max_softmax]:w0.25_d0.5 > (t0.1) w1_d1"
