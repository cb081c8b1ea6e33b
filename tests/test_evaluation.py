"""The library's evaluation path (transformers_ext/evaluation.py) on a tiny random BERT, without the scripts:
prefix-shared static depths equal one run per depth, the report's FLOPs and histograms follow the paths
taken, per-example records see every batch, and off-ramps default to the depths the backbone was trained with."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_config, make_inputs, make_model
from torch.utils.data import TensorDataset

from transformers_ext import default_off_ramps, path_macs
from transformers_ext.batching import length_sorted_batches
from transformers_ext.evaluation import (
    EvaluationOptions,
    evaluate_exit_rules,
    evaluate_routed,
    evaluate_static_depths,
    evaluate_subnets,
    routed_report,
)
from transformers_ext.routing import TRAINED_DEPTHS, RoutingSetting, routing_defaults, trained_depths

N = 11  # three batches of 4: the last one short


def _data() -> dict[str, TensorDataset]:
    input_ids, attention_mask, token_type_ids = make_inputs(batch=N, seq_len=12)
    labels = torch.arange(N) % 2
    return {"dev": TensorDataset(input_ids, attention_mask, token_type_ids, labels)}


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> dict:
    return {"acc": float((logits.argmax(-1) == labels).mean())}


def _options(**options) -> EvaluationOptions:
    return EvaluationOptions(4, scored=["dev"], reported=["dev"], compute_metrics=_accuracy, **options)


def _evaluate(model, setting: RoutingSetting, **options):
    return evaluate_routed(model, _data(), setting, torch.device("cpu"), _options(**options))


def test_static_depths_from_one_pass_equal_one_run_per_depth():
    model = make_model(make_config(num_hidden_layers=4))
    settings = {d: RoutingSetting([0.5] * 4, 0.5, d) for d in (1.0, 0.75, 0.5)}
    shared = evaluate_static_depths(model, _data(), settings, torch.device("cpu"), _options())
    for depth, setting in settings.items():
        alone = _evaluate(model, setting)
        assert torch.equal(shared[depth].logits["dev"], alone.logits["dev"])
        assert shared[depth].results(12) == alone.results(12)
        assert alone.results(12)["exit_layer_histogram"] == {round(4 * depth): N}
    assert not torch.equal(shared[1.0].logits["dev"], shared[0.5].logits["dev"])


def test_length_sorted_evaluation_puts_results_back_in_dataset_order():
    """sort_by_length: the batches run longest first with padding trimmed; each example's logits come back at
    its own position (equal to file order's up to rounding), and the loss is the size-weighted mean of the
    batches' losses. Such batches have no FLOPs unit, so they report nothing."""
    model = make_model(make_config(num_hidden_layers=4))
    data, setting = _data(), RoutingSetting([0.5] * 4, 0.5, 0.75)
    file_order = _evaluate(model, setting)
    by_length = evaluate_routed(model, data, setting, torch.device("cpu"), EvaluationOptions(
        4, scored=["dev"], compute_metrics=_accuracy, sort_by_length=True))
    torch.testing.assert_close(by_length.logits["dev"], file_order.logits["dev"], rtol=0, atol=1e-6)
    logits, labels = by_length.logits["dev"], data["dev"].tensors[3]
    batch_losses = [model.compute_loss(logits[idx], labels[idx]).item() * len(idx)
                    for idx, _ in length_sorted_batches(data["dev"], 4)]
    assert by_length.scores["eval_loss"] == sum(batch_losses) / N  # bit for bit, as the goldens pin it
    assert by_length.scores["acc"] == file_order.scores["acc"]
    with pytest.raises(ValueError, match="length-sorted"):
        EvaluationOptions(4, reported=["dev"], sort_by_length=True)


def test_subnet_scores_are_each_subnets_own_evaluation():
    """evaluate_subnets (run_glue.py's training-time scores): every (depth, width) subnet, depth then width
    descending, with the metrics and loss of that static setting's length-sorted evaluation; the model's
    train mode is kept (training goes on after it)."""
    model = make_model(make_config(num_hidden_layers=4)).train()
    scores = evaluate_subnets(model, _accuracy, _data(), [0.5, 1.0], [0.5, 1.0], 4, torch.device("cpu"))
    assert model.training
    assert list(scores) == ["d1_w1", "d1_w0.5", "d0.5_w1", "d0.5_w0.5"]
    options = EvaluationOptions(4, scored=["dev"], compute_metrics=_accuracy, sort_by_length=True)
    for key, metrics in scores.items():
        depth, width = (float(x) for x in key[1:].split("_w"))
        alone = evaluate_routed(model, _data(), RoutingSetting([width], width, depth), torch.device("cpu"), options)
        assert list(metrics) == ["acc", "eval_loss"]
        assert metrics == alone.scores
    assert scores["d1_w1"]["eval_loss"] != scores["d0.5_w0.5"]["eval_loss"]


def test_report_counts_the_paths_taken():
    config = make_config(num_hidden_layers=4, num_attention_heads=8)
    model = make_model(config)
    full = _evaluate(model, RoutingSetting([1.0] * 4, 1.0, 1.0))
    half = _evaluate(model, RoutingSetting([0.5] * 4, 0.5, 0.5))
    results = full.results(12)
    assert results["relative_flops"] == 1.0 and results["mean_layers_executed"] == 4.0
    assert results["width_histogram_per_layer"] == [{"1": N}] * 4
    assert results["true_flops"] == 2 * path_macs(config, 12, [8] * 4)["total"]
    assert half.results(12)["width_histogram_per_layer"] == [{"0.5": N}] * 2 + [{"skipped": N}] * 2
    assert half.results(12)["relative_flops"] < 0.5
    report = routed_report(half, "RTE", 4, 12, torch.device("cpu"), "fp32", "folder")
    assert (report["mode"], report["width_mult_list"], report["fixed_width"], report["num_examples"]) == (
        "static", [0.5] * 4, 0.5, N)
    assert "cpu_latency" not in report["results"] and report["timing"] is None


def test_example_records_see_every_batch_with_its_first_index():
    model = make_model(make_config(num_hidden_layers=4))
    seen = []

    def records(split, start, logits, labels, out):
        seen.append((split, start, len(labels), tuple(out.exit_layer.tolist())))
        return [{"index": start + i} for i in range(len(labels))]

    evaluation = _evaluate(model, RoutingSetting([1.0] * 4, 1.0, 0.75), example_records=records)
    assert [s[:3] for s in seen] == [("dev", 0, 4), ("dev", 4, 4), ("dev", 8, 3)]
    assert {layer for s in seen for layer in s[3]} == {3}
    assert [r["index"] for r in evaluation.records["dev"]] == list(range(N))


def test_off_ramps_default_to_the_saved_trained_depths():
    config = make_config(num_hidden_layers=4)
    assert trained_depths(config) == list(TRAINED_DEPTHS)
    config.depth_mult_list = [0.25, 1.0]  # a backbone trained at these depths only
    assert routing_defaults(config)[1] == default_off_ramps(4, [0.25, 1.0]) == [0]
    config.off_ramps = [2]  # a gate folder's saved off-ramps come first
    assert routing_defaults(config)[1] == [2]


def test_exit_rules_from_one_shared_prefix_equal_one_run_each():
    model = make_model(make_config(num_hidden_layers=4, num_labels=3))
    torch.manual_seed(3)
    model.add_gates([0.25, 0.5, 1.0], num_gates=2)  # two layers per gate: layer 1 keeps layer 0's choice
    for gate in model.gates:
        torch.nn.init.normal_(gate.classifier.weight, std=2.0)  # random gates that do choose different widths
    with torch.no_grad():
        model.classifier.weight.mul_(300)  # confident predictions: entropies spread over [0, ln 3]
    widths = [0.25, 0.5, 1.0]
    settings = {"none": RoutingSetting(widths, None, 1.0, False, 0.0, [0, 2], "w_dynamic")}
    settings.update({(t, *ramps): RoutingSetting(widths, None, 1.0, True, t, ramps, "wd_dynamic")
                     for t, ramps in ((0.1, [0, 2]), (0.3, [0, 2]), (0.1, [1, 2]), (10.0, [2]))})
    shared = evaluate_exit_rules(model, _data(), settings, torch.device("cpu"), _options())
    exits = set()
    for key, setting in settings.items():
        alone = _evaluate(model, setting)
        assert torch.equal(shared[key].logits["dev"], alone.logits["dev"]), key
        assert shared[key].results(12) == alone.results(12), key
        exits.add(tuple(sorted(alone.results(12)["exit_layer_histogram"].items())))
    assert len(exits) >= 3  # the thresholds do route differently
    heads = torch.cat(shared["none"].heads)
    assert len(heads.unique()) >= 2 and torch.equal(heads[:, 0], heads[:, 1])
