"""The reviewer baselines (transformers_ext/baselines.py) on a tiny random gated BERT (h48, L6, H12, I96; gates
with large random weights so that examples take different widths; off-ramps after layers 2 and 3):

- fixed per-example paths run in length-sorted, trimmed batches give the gates' own logits for the gates' paths;
- depth-only early exit re-combined from one cached pass equals real inference (`dynamic_forward`,
  d_dynamic) at thresholds between the exit scores: predictions and executed MACs;
- `exit_outcome` agrees with `calibration.sweep` at every threshold (score and FLOPs);
- the shuffled gate keeps every layer's width histogram (and the FLOPs of each path), and moves paths;
- the noise oracle's dropout samples are seeded and leave the model in eval mode;
- the bulk cascade scoring of the threshold search equals the cascade run one threshold at a time;
- choose-on-one-half / report-on-the-other on hand-made candidates, and the oracle."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_config, make_inputs, make_model
from scipy.stats import pearsonr

from transformers_ext import dynamic_forward, path_macs
from transformers_ext.baselines import (
    Halves,
    cascade_grid,
    choose_and_report,
    collect_gates,
    collect_paths,
    exit_cache,
    exit_outcome,
    fixed_candidates,
    full_model_macs,
    oracle_score,
    predictions_of,
    score,
    shuffled_paths,
    subset,
    threshold_grid,
)
from transformers_ext.calibration import sweep
from transformers_ext.cascade import Cascade, cascade_from_outputs

WIDTHS = [0.25, 0.5, 0.75, 1.0]
OFF_RAMPS = [2, 3]
N, SEQ_LEN = 40, 12


@pytest.fixture(scope="module")
def gated():
    config = make_config(hidden_size=48, num_hidden_layers=6, num_attention_heads=12, intermediate_size=96,
                         initializer_range=0.2)
    model = make_model(config)
    model.add_gates(WIDTHS, config.num_hidden_layers)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.gates.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
        model.classifier.weight.mul_(4.0)
    inputs = make_inputs(batch=N, seq_len=SEQ_LEN, seed=5)
    return model.eval(), inputs


def test_fixed_paths_in_trimmed_batches_are_the_gates_own_outputs(gated):
    model, inputs = gated
    cache, heads = collect_gates(model, inputs, WIDTHS, OFF_RAMPS, SEQ_LEN, batch_size=8)
    gated_run = dynamic_forward(model, *inputs, class_to_width=WIDTHS)
    assert torch.equal(heads, gated_run.heads)
    assert len(heads.unique()) >= 3  # the gates mix widths
    outputs = collect_paths(model, inputs, heads, OFF_RAMPS, batch_size=8)
    assert torch.allclose(outputs.logits, gated_run.logits, atol=1e-5)
    # the gates' cache (no early exit) holds the same predictions, in dev order
    assert torch.equal(cache.predictions[:, -1], predictions_of(gated_run.logits))


@pytest.mark.parametrize("width", [0.25, 1.0])
def test_depth_only_early_exit_from_the_cache_equals_real_inference(gated, width):
    model, inputs = gated
    heads = torch.full((model.config.num_hidden_layers,), model.subnet(width).num_heads)
    cache = exit_cache(collect_paths(model, inputs, heads, OFF_RAMPS, batch_size=8), model.config, SEQ_LEN)
    scores = cache.exit_scores.flatten().sort().values
    gaps = scores[1:] - scores[:-1]
    for q in (0.2, 0.5, 0.8):  # thresholds in a wide gap near these quantiles: float noise cannot flip them
        i = int(q * len(gaps))
        i = max(range(max(0, i - 5), min(len(gaps), i + 5)), key=lambda j: float(gaps[j]))
        threshold = float(scores[i] + scores[i + 1]) / 2
        real = dynamic_forward(model, *inputs, fixed_width=width, early_exit=True, exit_threshold=threshold,
                               off_ramps=OFF_RAMPS)
        predictions, macs = exit_outcome(cache, threshold)
        assert torch.equal(predictions, predictions_of(real.logits))
        assert torch.equal(macs, real.linear_macs + real.attention_macs)
    assert real.exited.any() and not real.exited.all()  # the middle threshold really exits some examples


def test_exit_outcome_agrees_with_the_sweep(gated):
    model, inputs = gated
    cache, _ = collect_gates(model, inputs, WIDTHS, OFF_RAMPS, SEQ_LEN)
    labels = torch.arange(N) % 2
    full = full_model_macs(model.config, SEQ_LEN)
    rows = torch.arange(0, N, 2)
    part = subset(cache, rows)
    swept = sweep(part, labels[rows], "acc", 2, full)
    assert len(swept) > 3
    for k, t in enumerate(swept.thresholds.tolist()):
        predictions, macs = exit_outcome(part, None if math.isnan(t) else t)
        assert score("acc", predictions, labels[rows], 2) == pytest.approx(float(swept.score[k]), abs=1e-12)
        assert float(macs.double().mean()) / full["total"] == pytest.approx(float(swept.relative_flops[k]),
                                                                           rel=1e-12)


def test_shuffled_gate_keeps_every_layers_width_histogram(gated):
    model, inputs = gated
    _, heads = collect_gates(model, inputs, WIDTHS, OFF_RAMPS, SEQ_LEN)
    shuffled = shuffled_paths(heads, seed=3)
    for layer in range(heads.shape[1]):
        assert torch.equal(torch.bincount(shuffled[:, layer], minlength=13), torch.bincount(heads[:, layer],
                                                                                            minlength=13))
    assert (shuffled != heads).any(1).sum() > N // 2  # most examples got another path
    assert torch.equal(shuffled, shuffled_paths(heads, seed=3)) and not torch.equal(shuffled, shuffled_paths(heads, 4))
    cost = sorted(path_macs(model.config, SEQ_LEN, h.tolist())["total"] for h in heads)
    assert sorted(path_macs(model.config, SEQ_LEN, h.tolist())["total"] for h in shuffled) == cost


def test_dropout_samples_are_seeded_and_the_model_stays_in_eval_mode(gated):
    model, inputs = gated
    heads = torch.full((6,), 12)
    a, b = (collect_paths(model, inputs, heads, [], dropout_seed=1) for _ in range(2))
    c = collect_paths(model, inputs, heads, [], dropout_seed=2)
    plain = collect_paths(model, inputs, heads, [])
    assert torch.equal(a.logits, b.logits) and not torch.allclose(a.logits, c.logits)
    assert not torch.allclose(a.logits, plain.logits) and not model.training
    assert a.ramp_logits.shape == (N, 0, 2)


def test_choose_on_calibration_and_report_against_the_reporting_frontier():
    labels = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
    cal, rep = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7])
    full = {"total": 100, "linear": 100, "attention": 0}
    halves = Halves(labels, "acc", 2, full, cal, rep)

    def logits_for(predictions):
        return torch.nn.functional.one_hot(torch.tensor(predictions), 2).float()

    candidates = fixed_candidates({"cheap": (logits_for([0, 1, 0, 0, 0, 0, 0, 0]), 20),  # cal 0.75, rep 0.5
                                   "better": (logits_for([0, 1, 0, 1, 0, 1, 0, 1]), 40),  # cal 1.0, rep 1.0
                                   "too dear": (logits_for([0, 1, 0, 1, 0, 1, 0, 1]), 90)})
    static_reporting = [(0.2, 0.5), (0.6, 0.9)]
    out = choose_and_report(candidates, halves, [0.1, 0.3, 0.5], static_reporting)
    assert out[0.1] is None  # nothing fits
    assert out[0.3].setting == "cheap" and out[0.3].calibration_score == 0.75 and out[0.3].gap == pytest.approx(0.0)
    assert out[0.5].setting == "better" and out[0.5].reporting_flops == pytest.approx(0.4)
    # the frontier at 0.4 on the reporting half: halfway between 0.5 and 0.9
    assert out[0.5].gap == pytest.approx(1.0 - 0.7)


@pytest.mark.parametrize("num_labels, rule, metric", [(2, "max_softmax", "acc"), (3, "entropy", "mcc"),
                                                      (1, "agreement", "pearson")])
def test_bulk_cascade_scores_equal_the_cascade_one_threshold_at_a_time(num_labels, rule, metric):
    gen = torch.Generator().manual_seed(0)
    n, macs = 50, [10, 30, 70]
    logits = [torch.randn(n, num_labels, generator=gen) * 2 for _ in macs]
    labels = torch.randn(n, generator=gen) if num_labels == 1 else torch.randint(0, num_labels, (n,), generator=gen)
    thresholds = torch.tensor([[0.1, 0.5], [0.3, 0.2], [math.inf, 0.4], [-math.inf, 1.0], [0.6, 0.6]])
    bulk_scores, bulk_macs = cascade_grid(logits, macs, rule, thresholds, labels, metric)
    for t, s, m in zip(thresholds.tolist(), bulk_scores.tolist(), bulk_macs.tolist(), strict=True):
        out = cascade_from_outputs(Cascade(((0.25, 1.0), (0.5, 1.0), (1.0, 1.0)), tuple(t), rule), logits,
                                   [{"linear": x, "attention": 0} for x in macs])
        assert s == pytest.approx(score(metric, predictions_of(out.logits), labels, num_labels), abs=1e-12)
        assert m == pytest.approx(float(out.macs.double().mean()))
    assert len(set(bulk_macs.tolist())) >= 3  # the thresholds do change who escalates


def test_oracle_and_scores():
    correct = torch.tensor([[True, False, False, True], [False, False, True, True]])
    assert oracle_score(correct) == 0.75
    assert score("mcc", torch.tensor([0.0, 1, 1, 0]), torch.tensor([0, 1, 1, 0]), 2) == pytest.approx(1.0)
    expected = pearsonr([1.0, 2, 3], [2.0, 4, 6.5]).statistic
    assert score("pearson", torch.tensor([1.0, 2, 3]), torch.tensor([2.0, 4, 6.5]), 1) == pytest.approx(expected)


def test_cascade_thresholds_lie_between_examples():
    """A threshold on the quantile grid never equals an example's uncertainty: a last-bit change of every value
    (another batch, another padding) leaves every stop decision as it was."""
    u = torch.tensor([0.1, 0.2, 0.2, 0.35, 0.5, 0.9, 1.2, 1.3, 2.0, 2.5], dtype=torch.float64)
    levels = torch.arange(1, 24, dtype=torch.float64) / 24
    thresholds = threshold_grid(u, levels)
    assert not set(thresholds) & set(u.tolist())
    assert thresholds == sorted(set(thresholds)) and len(thresholds) == len(torch.unique(u)) - 1
    for t in thresholds:
        for delta in (-1e-7, 1e-7):
            assert torch.equal(u + delta < t, u < t)
    assert threshold_grid(u[:0], levels) == [math.inf]
    assert threshold_grid(torch.full((3,), 0.4, dtype=torch.float64), levels) == [0.4]
