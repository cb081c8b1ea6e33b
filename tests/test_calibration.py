"""Calibration of the class -> width map and the exit threshold (transformers_ext/calibration.py and
`train_gate_new.py --calibrate`) on a tiny random gated BERT (h32, L4, H8, I64; gates over 0.25/0.5/0.75/1.0
with large random weights, so that examples take different widths; off-ramps after layers 1 and 2):

- the threshold sweep re-combined from one cached forward equals real routed inference (dynamic_forward, as
  train_gate.py runs it) at every candidate threshold: score and FLOPs exactly, for accuracy, MCC and the
  STS-B agreement rule with Pearson's r;
- the search returns the brute-force optimum over a small grid (every map x every threshold run for real);
  coordinate ascent evaluates fewer maps and returns a feasible setting;
- end to end: calibration and reporting examples never overlap, the chosen setting's FLOPs on the calibration
  split are <= the budget and its config file (best_tradeoff_inference_config.json format) reproduces the
  calibration score and FLOPs in train_gate.py's inference; --calibration_file reports on all of dev;
- CLI errors, the pass-through to train_gate.main, and a bad calibration folder for the trade-off plot."""

from __future__ import annotations

import csv
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_VOCAB, cli_argv, make_config, save_model_folder
from scipy.stats import pearsonr
from sklearn.metrics import matthews_corrcoef

import plot_tradeoff
import train_gate
import train_gate_new
import utils_glue
from cli import run_cli
from transformers_ext import FlexBertForSequenceClassification, dynamic_forward, path_macs
from transformers_ext.calibration import (
    Calibrator,
    Objective,
    monotone_maps,
    pareto_front,
    project_map,
    split_indices,
)
from transformers_ext.flops import flops_summary

WIDTHS = [0.25, 0.5, 0.75, 1.0]
OFF_RAMPS = [1, 2]
MAX_LEN = 16
N_DEV = 24
WORDS = [w for w in TINY_VOCAB[5:] if not w.startswith("##")]


# ---- a tiny gated model and data --------------------------------------------------------------------------
def _gated_model(folder: Path, num_labels: int = 2, seed: int = 0) -> Path:
    """A random BERT with gates whose large random weights mix the widths; classifier scaled so that the
    off-ramp entropies spread. Saved as a gated folder (gate_class_to_width and off_ramps in config.json)."""
    config = make_config(num_labels=num_labels, initializer_range=0.2)
    base = save_model_folder(folder.parent / f"{folder.name}_base", TINY_VOCAB, config, seed)
    model = FlexBertForSequenceClassification.from_pretrained(str(base))
    model.add_gates(WIDTHS, config.num_hidden_layers)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, param in model.gates.named_parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * (1.0 if "weight" in name else 0.5))
        model.classifier.weight.mul_(4.0)
    model.config.gate_class_to_width = WIDTHS
    model.config.off_ramps = OFF_RAMPS
    model.save_pretrained(str(folder))
    for f in base.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            (folder / f.name).write_bytes(f.read_bytes())
    return folder


def _write_task(folder: Path, task: str, n: int = N_DEV, seed: int = 0) -> Path:
    """train.tsv and dev.tsv (different rows) of RTE, CoLA (no header) or STS-B."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)

    def sentence():
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7)))

    for split in ("train", "dev"):
        if task == "RTE":
            rows = ["index\tsentence1\tsentence2\tlabel"] + [
                f"{i}\t{sentence()}\t{sentence()}\t{rng.choice(['entailment', 'not_entailment'])}" for i in range(n)]
        elif task == "CoLA":
            rows = [f"src\t{rng.choice('01')}\t*\t{sentence()}" for _ in range(n)]
        else:  # STS-B
            rows = ["index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"] + [
                f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\t{sentence()}\t{sentence()}\t{rng.uniform(0, 5):.3f}"
                for i in range(n)]
        (folder / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("calibration")
    return {"root": root, "cache": root / "cache",
            "model": _gated_model(root / "gated"), "model_reg": _gated_model(root / "gated_reg", num_labels=1),
            "data": {t: _write_task(root / t, t, seed=i) for i, t in enumerate(("RTE", "CoLA", "STS-B"))}}


def _dev(env, task: str = "RTE", model_key: str = "model"):
    spec = utils_glue.get_task(task)
    model = FlexBertForSequenceClassification.from_pretrained(str(env[model_key])).eval()
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(str(env[model_key]))
    data = utils_glue.load_dataset(spec.name, env["data"][task], "dev", tokenizer, MAX_LEN, cache_dir=env["cache"])
    return model, list(data.tensors)


def _real(model, tensors, task: str, class_to_width, threshold: float | None, batch_size: int = 8) -> dict:
    """Score and FLOPs of routed inference as train_gate.run_inference computes them (untrimmed batches)."""
    return _real_run(model, tensors, task, lambda ids, mask, types: dynamic_forward(
        model, ids, mask, types, class_to_width=class_to_width, early_exit=threshold is not None,
        exit_threshold=threshold or 0.0, off_ramps=OFF_RAMPS), batch_size)


def _real_run(model, tensors, task: str, run, batch_size: int = 8) -> dict:
    """Score and FLOPs of `run(input_ids, attention_mask, token_type_ids)` (an output with logits and
    per-example MACs) over untrimmed batches, as train_gate.run_inference's report computes them."""
    config = model.config
    logits, linear, attention = [], 0.0, 0.0
    n = len(tensors[0])
    for i in range(0, n, batch_size):
        out = run(*(t[i : i + batch_size] for t in tensors[:3]))
        logits.append(out.logits.float())
        linear += float(out.linear_macs.sum())
        attention += float(out.attention_macs.sum())
    full = path_macs(config, MAX_LEN, [config.num_attention_heads] * config.num_hidden_layers)
    summary = flops_summary({"linear": linear / n, "attention": attention / n, "total": (linear + attention) / n},
                            full)
    metric = utils_glue.primary_metric(task)
    score = utils_glue.compute_metrics(task, torch.cat(logits).numpy(), tensors[3].numpy())[metric]
    return {"score": score, **summary}


# ---- the sweep against real routed inference ----------------------------------------------------------------
@pytest.mark.parametrize("task", ["RTE", "CoLA", "STS-B"])
def test_sweep_equals_routed_inference_at_every_threshold(env, task):
    model_key = "model_reg" if task == "STS-B" else "model"
    model, tensors = _dev(env, task, model_key)
    metric = utils_glue.primary_metric(task)
    calibrator = Calibrator(model, tensors, metric, OFF_RAMPS, MAX_LEN, batch_size=5)
    for class_to_width in [(0.25, 0.5, 0.75, 1.0), (0.25, 0.25, 0.6, 0.75)]:
        s = calibrator.evaluate(class_to_width)
        assert torch.isnan(s.thresholds[0]) and torch.all(s.thresholds[2:] > s.thresholds[1:-1])
        assert len(s) > 8  # many distinct outcomes: the routing and the exits are mixed
        exits = set()
        for k in range(len(s)):
            real = _real(model, tensors, task, class_to_width, None if k == 0 else float(s.thresholds[k]))
            assert real["relative_flops"] == float(s.relative_flops[k]), (k, real)
            assert real["flops"] == float(s.flops[k])
            # regression outputs are float32 (batch composition moves their last bits): r to 1e-6
            assert real["score"] == pytest.approx(float(s.score[k]), abs=1e-6 if task == "STS-B" else 1e-12), k
            exits.add(round(float(s.mean_layers[k]), 6))
        assert len(exits) > 3
    if task == "CoLA":  # the MCC of some candidate is non-trivial (not 0)
        assert any(abs(float(v)) > 0.05 for v in s.score)


def test_score_from_stats_matches_sklearn_and_scipy():
    from transformers_ext.threshold_sweep import option_stats as _option_stats
    from transformers_ext.threshold_sweep import score_from_stats

    gen = torch.Generator().manual_seed(0)
    for num_labels in (2, 3):
        labels = torch.randint(0, num_labels, (50,), generator=gen)
        preds = torch.randint(0, num_labels, (50,), generator=gen).double()
        stats = _option_stats(preds[:, None], labels, num_labels)[:, 0].sum(0, keepdim=True)
        assert float(score_from_stats("mcc", stats, labels, num_labels)) == pytest.approx(
            matthews_corrcoef(labels.numpy(), preds.long().numpy()), abs=1e-12)
        assert float(score_from_stats("acc", stats, labels, num_labels)) == (preds.long() == labels).double().mean()
    y, x = torch.randn(40, generator=gen), torch.randn(40, generator=gen).double()
    stats = _option_stats(x[:, None], y, 1)[:, 0].sum(0, keepdim=True)
    assert float(score_from_stats("pearson", stats, y, 1)) == pytest.approx(pearsonr(x.numpy(), y.numpy())[0],
                                                                            abs=1e-9)
    constant = _option_stats(torch.ones(40, 1, dtype=torch.float64), y, 1)[:, 0].sum(0, keepdim=True)
    assert float(score_from_stats("pearson", constant, y, 1)) == 0.0  # as compute_metrics


# ---- the search against brute force -------------------------------------------------------------------------
BRUTE_GRID = [0.25, 0.6, 1.0]


@pytest.fixture(scope="module")
def brute_force(env) -> dict:
    """Every monotone map over BRUTE_GRID (15) x (no early exit + every candidate threshold), each run for real
    as train_gate.py runs inference; and the calibrator whose candidates they are."""
    model, tensors = _dev(env)
    calibrator = Calibrator(model, tensors, "acc", OFF_RAMPS, MAX_LEN, batch_size=7)
    runs = []
    for m in monotone_maps(BRUTE_GRID, len(WIDTHS)):
        thresholds = [float(t) for t in calibrator.evaluate(m).thresholds[1:]]
        for t in [None] + thresholds:
            real = _real(model, tensors, "RTE", m, t)
            runs.append((m, t, real["score"], real["relative_flops"]))
    return {"calibrator": calibrator, "runs": runs, "reference": calibrator.full_model_score(),
            "full": _real(model, tensors, "RTE", (1.0,) * 4, None)}


@pytest.mark.parametrize("objective", [Objective("flops_budget", 0.45), Objective("flops_budget", 0.7),
                                       Objective("max_drop", 0.05)], ids=lambda o: o.name)
def test_search_returns_the_brute_force_optimum(brute_force, objective):
    calibrator, reference = brute_force["calibrator"], brute_force["reference"]
    result = calibrator.search(BRUTE_GRID, len(WIDTHS), [objective], WIDTHS, reference, max_exhaustive=100)
    assert result["search"] == "exhaustive" and result["maps_evaluated"] == result["maps_in_grid"] == 15
    chosen = result["chosen"][objective]
    best = None  # ties: fewer FLOPs (budget) / higher score (drop), then the first in map and threshold order
    for m, t, score, flops in brute_force["runs"]:
        if objective.kind == "flops_budget":
            key = (1, score, -flops) if flops <= objective.value else (0, -flops, score)
        else:
            feasible = score >= reference - objective.value - 1e-9
            key = (1, -flops, score) if feasible else (0, score, -flops)
        if best is None or key > best[0]:
            best = (key, m, t, score, flops)
    key, m, t, score, flops = best
    assert key[0] == 1 and chosen["feasible"]
    assert tuple(chosen["width_mult_list"]) == m
    assert chosen["exit_threshold"] == t and chosen["early_exit"] == (t is not None)
    assert chosen["score"] == pytest.approx(score, abs=1e-12) and chosen["relative_flops"] == flops
    if objective.kind == "flops_budget":
        assert chosen["relative_flops"] <= objective.value
    # the full model's score (the max_drop reference) is the static full model's, no gate run
    assert reference == brute_force["full"]["score"]  # = the gated model at width 1 everywhere


@pytest.mark.parametrize("budget", [0.45, 0.7])
def test_within_se_takes_the_most_flops_within_k_standard_errors_of_the_best(brute_force, budget):
    """--within_se k: brute force over every (map, threshold) run for real: the floor is the best score within
    the budget - k * sqrt(s (1 - s) / n); the chosen setting has the most FLOPs among those reaching it."""
    calibrator, reference = brute_force["calibrator"], brute_force["reference"]
    objective = Objective("flops_budget", budget)
    result = calibrator.search(BRUTE_GRID, len(WIDTHS), [objective], WIDTHS, reference, max_exhaustive=100,
                               within_se=1.0)
    chosen = result["chosen"][objective]
    runs = [r for r in brute_force["runs"] if r[3] <= budget]
    best_score = max(score for _, _, score, _ in runs)
    floor = best_score - math.sqrt(best_score * (1 - best_score) / len(calibrator.labels))
    assert chosen["score_floor"] == pytest.approx(floor, abs=1e-12)
    most = max(flops for _, _, score, flops in runs if score >= floor)
    assert chosen["relative_flops"] == most <= budget and chosen["score"] >= floor and chosen["feasible"]
    plain = calibrator.search(BRUTE_GRID, len(WIDTHS), [objective], WIDTHS, reference, max_exhaustive=100)
    assert plain["chosen"][objective]["relative_flops"] <= most  # never cheaper than the plain argmax


def test_reusing_rows_of_agreeing_maps_changes_nothing(env):
    """An example whose visited classes have the same widths under an earlier map is not run again; every
    map's cache equals the one computed from scratch (FLOPs exactly, predictions and exit scores)."""
    model, tensors = _dev(env)
    grid = [0.25, 0.5, 0.75, 1.0]
    reusing = Calibrator(model, tensors, "acc", OFF_RAMPS, MAX_LEN, batch_size=6)
    for m in monotone_maps(grid, len(WIDTHS)):
        reusing.evaluate(m)
        scratch = Calibrator(model, tensors, "acc", OFF_RAMPS, MAX_LEN, batch_size=6, reuse=False)
        a, b = reusing.caches[m], scratch.caches.get(m) or (scratch.evaluate(m), scratch.caches[m])[1]
        for name in ("predictions", "linear_macs", "attention_macs", "layers", "visited"):
            assert torch.equal(getattr(a, name), getattr(b, name)), (m, name)
        torch.testing.assert_close(a.exit_scores, b.exit_scores, rtol=0, atol=1e-6)
        assert scratch.examples_forwarded == N_DEV
    assert reusing.examples_forwarded < 0.8 * N_DEV * len(monotone_maps(grid, len(WIDTHS)))


def test_coordinate_ascent_evaluates_fewer_maps(env):
    model, tensors = _dev(env)
    grid = [0.25, 0.5, 0.6, 0.75, 1.0]
    budget = Objective("flops_budget", 0.5)
    calibrator = Calibrator(model, tensors, "acc", OFF_RAMPS, MAX_LEN)
    ascent = calibrator.search(grid, 4, [budget], WIDTHS, 0.5, max_exhaustive=10)
    assert ascent["search"] == "coordinate_ascent" and ascent["maps_in_grid"] == 70
    assert 1 < ascent["maps_evaluated"] < 70
    chosen = ascent["chosen"][budget]
    assert chosen["feasible"] and chosen["relative_flops"] <= 0.5
    assert list(chosen["width_mult_list"]) == sorted(chosen["width_mult_list"])  # monotone
    full = Calibrator(model, tensors, "acc", OFF_RAMPS, MAX_LEN).search(grid, 4, [budget], WIDTHS, 0.5)
    assert full["search"] == "exhaustive" and full["chosen"][budget]["score"] >= chosen["score"]


def test_grid_helpers():
    assert monotone_maps([0.5, 0.25], 2) == [(0.25, 0.25), (0.25, 0.5), (0.5, 0.5)]
    assert len(monotone_maps([0.25, 0.5, 0.55, 0.6, 0.65, 0.75, 1.0], 4)) == 210
    assert project_map([0.5, 0.3, 0.75, 0.8], [0.25, 0.5, 0.75, 1.0]) == (0.5, 0.5, 0.75, 0.75)
    cal, rep = split_indices(11, 3)
    assert len(cal) == 5 and len(rep) == 6 and not set(cal) & set(rep) and sorted(cal + rep) == list(range(11))
    assert split_indices(11, 3) == (cal, rep) and split_indices(11, 4) != (cal, rep)
    points = [{"relative_flops": f, "score": s} for f, s in [(0.5, 0.8), (0.3, 0.7), (0.4, 0.7), (0.6, 0.8),
                                                            (0.2, 0.5), (0.7, 0.9)]]
    assert [(p["relative_flops"], p["score"]) for p in pareto_front(points)] == [(0.2, 0.5), (0.3, 0.7), (0.5, 0.8),
                                                                                (0.7, 0.9)]


def test_threshold_sweep_on_5000_examples():
    """5,000 cached examples, two off-ramps: the sweep covers every distinct threshold (its speed is
    benchmarks' business: no wall-clock assert on a shared machine)."""
    from transformers_ext.calibration import MapCache, sweep

    gen = torch.Generator().manual_seed(0)
    n = 5000
    cache = MapCache((0.5,) * 4, [2, 3], torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.7,
                     torch.randint(0, 2, (n, 4), generator=gen).double(),
                     torch.randint(10**8, 10**9, (n, 4), generator=gen), torch.randint(10**6, 10**7, (n, 4),
                                                                                       generator=gen),
                     torch.randint(3, 7, (n, 4), generator=gen), torch.ones(n, 4, dtype=torch.bool))
    labels = torch.randint(0, 2, (n,), generator=gen)
    full = {"linear": 2 * 10**9, "attention": 10**7, "total": 2 * 10**9 + 10**7}
    s = sweep(cache, labels, "acc", 2, full)
    assert len(s) > 7000  # every first off-ramp entropy, and the second wherever it is lower
    # spot check one threshold against the direct rule: the first off-ramp with entropy < t, else the end
    k = len(s) // 2
    t = float(s.thresholds[k])
    below = cache.exit_scores < t
    option = torch.where(below[:, 0], 0, torch.where(below[:, 1], 1, 2))
    picked = cache.predictions.gather(1, option[:, None])[:, 0]
    assert float(s.score[k]) == pytest.approx(float((picked == labels).double().mean()), abs=1e-12)
    macs = (cache.linear_macs + cache.attention_macs).gather(1, option[:, None]).double().mean()
    assert float(s.relative_flops[k]) == pytest.approx(float(macs) / full["total"], rel=1e-12)


# ---- train_gate_new.py --calibrate end to end ----------------------------------------------------------------
def _argv(env, output_dir: Path, *extra: str, task: str = "RTE", model_key: str = "model", **flags) -> list[str]:
    options = {"task_name": task, "data_dir": env["data"][task], "model_dir": env[model_key],
               "output_dir": output_dir, "cache_dir": env["cache"], "max_seq_length": MAX_LEN,
               "per_gpu_eval_batch_size": 8, "num_threads": 1}
    options.update(flags)
    return cli_argv(options, *extra, switches=("--cpu",))


def _rows(path: Path) -> list[str]:
    return [line for line in path.read_text().split("\n")[1:] if line]


def test_calibrate_end_to_end(env, tmp_path, capsys):
    out = tmp_path / "cal"
    train_gate_new.main(_argv(env, out, "--calibrate", flops_budget="0.45,0.7", max_drop=0.05,
                               calibration_grid="0.25,0.6,1.0", calibration_seed=5))
    printed = capsys.readouterr().out
    assert "***** Calibration: RTE (acc) *****" in printed and "15 of 15 maps evaluated" in printed
    results = json.loads((out / "calibration_results.json").read_text())
    # the two halves (dev positions): disjoint, together all of dev, and the calibration half chose
    halves = json.loads((out / "calibration_split.json").read_text())
    assert sorted(halves["calibration"] + halves["reporting"]) == list(range(N_DEV))
    dev = _rows(env["data"]["RTE"] / "dev.tsv")
    cal, rep = [dev[i] for i in halves["calibration"]], [dev[i] for i in halves["reporting"]]
    assert len(cal) == N_DEV // 2 and len(rep) == N_DEV - N_DEV // 2
    split_dir = tmp_path / "calibration_split"  # the calibration half as a data folder, to rerun the choice on
    split_dir.mkdir()
    (split_dir / "dev.tsv").write_text((env["data"]["RTE"] / "dev.tsv").read_text().split("\n")[0] + "\n" +
                                       "".join(row + "\n" for row in cal))
    assert results["calibration_examples"] == len(cal) and results["search"] == "exhaustive"
    assert results["maps_evaluated"] == 15 and set(results["objectives"]) == {"flops0.45", "flops0.7", "drop0.05"}
    assert len(results["static_reporting"]) == 12
    for name, o in results["objectives"].items():
        setting = o["setting"]
        if name.startswith("flops"):
            assert o["calibration"]["relative_flops"] <= o["objective"]["flops_budget"]
        # the config file, run by train_gate.py on the calibration split, reproduces the calibration figures
        config = json.loads(Path(o["config"]).read_text())
        assert set(config) == {"RTE", "calibration"} and config["RTE"] == {k: setting[k] for k in config["RTE"]}
        assert set(config["RTE"]) <= {"width_mult_list", "exit_threshold", "mode"} or set(config["RTE"]) == {
            "mode", "cascade_stages", "cascade_thresholds", "cascade_rule"}  # what --config reads
        assert config["calibration"]["RTE"]["score"] == o["calibration"]["score"]
        assert config["calibration"]["RTE"]["examples"] == len(cal)
        rerun = tmp_path / f"rerun_{name}"
        train_gate.main(_argv(env, rerun, "--do_eval", data_dir=split_dir, config=o["config"]))
        report = json.loads((rerun / "inference_results.json").read_text())
        assert report["mode"] == setting["mode"] and report["num_examples"] == len(cal)
        assert report["results"]["relative_flops"] == o["calibration"]["relative_flops"]
        assert report["results"]["flops"] == o["calibration"]["flops"]
        assert report["results"]["acc"] == pytest.approx(o["calibration"]["score"], abs=1e-12)
        # reported on the other half (and on all of dev, labelled)
        assert o["reporting"]["num_examples"] == len(rep) and "reporting half" in o["reporting"]["data"]
        assert o["all_dev"]["num_examples"] == N_DEV and "including the calibration half" in o["all_dev"]["data"]
        assert o["reporting"]["latency_ms_per_example"] > 0
        best = o["best_static_at_or_above_reporting_flops"]
        assert best is None or best["relative_flops"] >= o["reporting"]["relative_flops"] - 1e-9
    # the Pareto front: increasing FLOPs and score
    with open(out / "calibration_pareto.csv", newline="") as f:
        front = list(csv.DictReader(f))
    assert len(front) == results["pareto_points"] > 1
    flops, scores = [float(r["relative_flops"]) for r in front], [float(r["score"]) for r in front]
    assert flops == sorted(flops) and all(b > a for a, b in zip(scores, scores[1:]))


def test_calibration_file_reports_on_all_of_dev(env, tmp_path, capsys):
    own = tmp_path / "own.tsv"
    own.write_text((env["data"]["RTE"] / "train.tsv").read_text())
    out = tmp_path / "cal_file"
    merged = tmp_path / "best.json"
    merged.write_text(json.dumps({"CoLA": {"width_mult_list": [0.5] * 4}}))
    results = train_gate_new.main(_argv(env, out, "--calibrate", "--no_static_baselines", flops_budget=0.6,
                                        calibration_file=own, calibration_grid="0.25,1.0", calibration_config=merged))
    assert results["calibration_examples"] == N_DEV and results["calibration_split"].startswith("--calibration_file")
    assert not (out / "reporting_split").exists() and results["static_reporting"] == {}
    o = results["objectives"]["flops0.6"]
    assert o["reporting"]["num_examples"] == N_DEV and o["reporting"]["data"].startswith("all of dev")
    assert o["all_dev"] is None and o["calibration"]["relative_flops"] <= 0.6
    entries = json.loads(merged.read_text())
    assert set(entries) == {"CoLA", "RTE", "calibration"} and entries["calibration"]["RTE"]["flops_budget"] == 0.6
    assert entries["calibration"]["RTE"]["score"] == o["calibration"]["score"]
    assert entries["RTE"] == {k: o["setting"][k] for k in entries["RTE"]}  # the chosen entry, whatever its strategy


def _csv(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:  # csv quotes the vocabulary's "," tokens
        csv.writer(f).writerows([("text", "label"), *rows])
    return path


def test_calibrate_on_your_own_csv_files(env, tmp_path):
    """--train_file/--validation_file: a 3-class CSV task. The halves are positions in the validation file;
    train_gate.py run on CSV files of each half with the written config reproduces the calibration figures
    and the reporting half's report exactly; a CSV --calibration_file calibrates, all of dev reports."""
    rng = random.Random(3)
    rows = [(" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 9))), rng.choice(["neg", "neu", "pos"]))
            for _ in range(30)]
    model = _gated_model(tmp_path / "gated3", num_labels=3, seed=1)
    dev, train = _csv(tmp_path / "dev.csv", rows[:21]), _csv(tmp_path / "train.csv", rows[21:])

    def argv(out: Path, *extra: str, **flags) -> list[str]:
        options = {"task_name": "mine", "validation_file": dev, "model_dir": model, "output_dir": out,
                   "cache_dir": env["cache"], "max_seq_length": MAX_LEN, "per_gpu_eval_batch_size": 8,
                   "num_threads": 1}
        return cli_argv(options | flags, *extra, switches=("--cpu",))

    out = tmp_path / "cal"
    results = train_gate_new.main(argv(out, "--calibrate", "--no_static_baselines", flops_budget=0.6,
                                       calibration_grid="0.25,0.6,1.0", calibration_seed=1))
    halves = json.loads((out / "calibration_split.json").read_text())
    assert sorted(halves["calibration"] + halves["reporting"]) == list(range(21)) and len(halves["calibration"]) == 10
    assert results["task"] == "mine" and results["calibration_examples"] == 10 and results["maps_evaluated"] == 15
    o = results["objectives"]["flops0.6"]
    assert o["reporting"]["num_examples"] == 11 and o["all_dev"]["num_examples"] == 21
    for half, figures in (("calibration", o["calibration"]), ("reporting", o["reporting"])):
        rerun = tmp_path / f"rerun_{half}"
        train_gate.main(argv(rerun, "--do_eval", config=o["config"], validation_file=_csv(
            tmp_path / f"{half}.csv", [rows[i] for i in halves[half]])))
        report = json.loads((rerun / "inference_results.json").read_text())
        assert report["num_examples"] == len(halves[half]) and report["mode"] == o["setting"]["mode"]
        assert report["results"]["relative_flops"] == figures["relative_flops"]
        assert report["results"]["acc"] == pytest.approx(figures["score"], abs=1e-12)
    own = train_gate_new.main(argv(tmp_path / "own", "--calibrate", "--no_static_baselines", max_drop=0.1,
                                   calibration_grid="0.25,1.0", calibration_file=train))
    assert own["calibration_examples"] == 9 and own["calibration_split"] == f"--calibration_file {train}"
    assert own["objectives"]["drop0.1"]["reporting"]["num_examples"] == 21


def test_calibrate_regression(env, tmp_path, capsys):
    out = tmp_path / "stsb"
    results = train_gate_new.main(_argv(env, out, "--calibrate", "--no_static_baselines", task="STS-B",
                                        model_key="model_reg", max_drop=0.2, calibration_grid="0.25,1.0"))
    assert results["metric"] == "pearson"
    o = results["objectives"]["drop0.2"]
    assert o["feasible_on_calibration"]  # the grid holds 1.0: width 1 everywhere without exit is the full model
    assert o["calibration"]["score"] >= results["full_model_calibration_score"] - 0.2 - 1e-9
    assert o["reporting"]["metric"] == "pearson" and o["reporting"]["num_examples"] == N_DEV - N_DEV // 2


def _exit(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: train_gate_new.main(argv))
    return info.value.code, capsys.readouterr().err


def test_calibrate_errors(env, tmp_path, capsys):
    no_gates = tmp_path / "plain"
    save_model_folder(no_gates, TINY_VOCAB, make_config(), 0)
    out = tmp_path / "x"
    cases = [
        (["--calibrate"], {}, "needs --flops_budget"),
        ([], {"flops_budget": 0.5}, "--flops_budget needs --calibrate"),
        (["--calibrate", "--static"], {"flops_budget": 0.5}, "drop --static"),
        (["--calibrate"], {"flops_budget": 0.5, "exit_threshold": 0.3}, "drop --exit_threshold"),
        (["--calibrate"], {"flops_budget": 0, "max_drop": 0.1}, "must be > 0"),
        (["--calibrate"], {"flops_budget": "0.3,0.5", "calibration_config": tmp_path / "c.json"}, "one objective"),
        (["--calibrate"], {"flops_budget": "abc"}, "comma list"),
        (["--calibrate"], {"flops_budget": 0.5, "calibration_file": tmp_path / "missing.tsv"}, "does not exist"),
        (["--calibrate"], {"flops_budget": 0.5, "model_dir": no_gates}, "needs gates"),
        (["--calibrate"], {"flops_budget": 0.5, "width_mult_list": "0.5,1.0"}, "2 widths"),
    ]
    for switches, flags, message in cases:
        code, err = _exit(_argv(env, out, *switches, **flags), capsys)
        assert code == 2, (switches, flags, err)
        assert message in err and err.count("error:") == 1 and "Traceback" not in err, (flags, err)
    assert not out.exists()


def test_without_calibrate_it_is_train_gate(env, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    flags = {"width_mult_list": "0.25,0.5,0.75,1.0"}
    train_gate_new.main(_argv(env, a, "--do_eval", "--w_dynamic", **flags))
    train_gate.main(_argv(env, b, "--do_eval", "--w_dynamic", **flags))
    ra, rb = (json.loads((p / "inference_results.json").read_text())["results"] for p in (a, b))
    assert ra["acc"] == rb["acc"] and ra["relative_flops"] == rb["relative_flops"]


def test_plot_tradeoff_refuses_a_bad_calibration_folder(env, tmp_path, monkeypatch, capsys):
    """A calibration folder under --inference_dir is drawn (test_calibration_strategies.py tests what); a bad
    one is one error line naming the file."""
    inference = tmp_path / "inference"
    train_gate.main(_argv(env, inference / "static_w1.0_d1.0_b8", "--do_eval", "--static", width_mult_list="1.0"))
    figures = {"score": 0.5, "relative_flops": 0.3}
    results = {"reporting": "reporting half of dev (12 examples)", "calibration_split": "seeded half of dev",
               "objectives": {"flops0.3": {"setting": {"strategy": "gates"}, "calibration": figures,
                                           "reporting": figures}}}
    (inference / "calibrated").mkdir()
    (inference / "calibrated" / "calibration_results.json").write_text(json.dumps(results))
    (inference / "calibrated" / "calibration_pareto.csv").write_text("relative_flops,score,strategy\n0.3,0.5,gates\n")
    monkeypatch.setattr(sys, "argv", ["plot_tradeoff.py", "--inference_dir", str(inference),
                                      "--output_dir", str(tmp_path / "plot")])
    plot_tradeoff.main()
    assert (tmp_path / "plot" / "tradeoff.png").read_bytes().startswith(b"\x89PNG")
    for name, text, message in (
            ("calibration_pareto.csv", "relative_flops\nabc\n", "not a valid calibration_pareto.csv"),
            ("calibration_results.json", json.dumps({"objectives": {"x": {}}}), "not a valid calibration_results")):
        (inference / "calibrated" / name).write_text(text)
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            run_cli(plot_tradeoff.main)
        err = capsys.readouterr().err
        assert info.value.code == 2 and message in err and err.count("error:") == 1, err
