"""`train_gate.py --cascade` (a confidence cascade of static subnets as an inference mode) on the tiny random
gated BERT of test_calibration.py (4 layers, 8 heads) and 40 RTE dev pairs: batch 1 gives the predictions of
batch 32; the FLOPs of inference_results.json are the sum of the stages each example ran; a --config cascade
entry gives the report of the same flags; bad input is one `error:` line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import cli_argv
from test_calibration import MAX_LEN, _gated_model, _write_task
from test_cascade import _middle_threshold
from transformers import BertTokenizer

import train_gate
import train_gate_new
import utils_glue
from cli import run_cli
from transformers_ext import FlexBertForSequenceClassification, dynamic_forward, path_macs, subnet_macs
from transformers_ext.cascade import Cascade, uncertainty

STAGES = ((0.25, 0.5), (1.0, 1.0))
CASCADE = "w0.25_d0.5,w1.0_d1.0"
N_DEV = 40
LATENCY = ("latency_ms_per_batch", "latency_ms_per_example", "examples_per_second", "cpu_latency", "gpu_latency")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """The model, the data and a stage-0 threshold in the widest gap near the median uncertainty (so that both
    stages answer some examples and float noise between batch compositions cannot flip a decision)."""
    root = tmp_path_factory.mktemp("cascade_cli")
    env = {"model": _gated_model(root / "gated"), "model_reg": _gated_model(root / "gated_reg", num_labels=1),
           "data": _write_task(root / "RTE", "RTE", n=N_DEV), "data_reg": _write_task(root / "STS-B", "STS-B", n=8),
           "cache": root / "cache"}
    model = FlexBertForSequenceClassification.from_pretrained(str(env["model"])).eval()
    tokenizer = BertTokenizer.from_pretrained(str(env["model"]))
    dev = utils_glue.load_dataset("RTE", env["data"], "dev", tokenizer, MAX_LEN, cache_dir=env["cache"])
    with torch.no_grad():
        first = dynamic_forward(model, *dev.tensors[:3], fixed_width=STAGES[0][0], depth_mult=STAGES[0][1]).logits
    env["threshold"] = round(_middle_threshold(uncertainty("max_softmax", first)), 6)
    env["config"] = model.config
    return env


def _flags(env, out: Path, **flags) -> dict:
    return {"task_name": "RTE", "data_dir": env["data"], "model_dir": env["model"], "cache_dir": env["cache"],
            "max_seq_length": MAX_LEN, "num_threads": 1, "output_dir": out, **flags}


def _run(env, out: Path, *extra: str, **flags) -> dict:
    train_gate.main(cli_argv(_flags(env, out, **flags), "--do_eval", "--save_predictions", *extra,
                             switches=("--cpu",)))
    return json.loads((out / "inference_results.json").read_text())


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions_dev.jsonl").read_text().splitlines()]


def _without_latency(report: dict) -> dict:
    return {k: ({r: v for r, v in x.items() if r not in LATENCY} if k == "results" else x)
            for k, x in report.items() if k not in ("timing",)}


def test_batch_of_one_equals_batch_of_32(env, tmp_path):
    reports, records = {}, {}
    for bs in (1, 32):
        out = tmp_path / f"b{bs}"
        reports[bs] = _run(env, out, cascade=CASCADE, cascade_thresholds=env["threshold"],
                           per_gpu_eval_batch_size=bs)
        records[bs] = _records(out)
    assert reports[32]["mode"] == "cascade" and reports[32]["num_examples"] == N_DEV
    histogram = reports[32]["results"]["cascade_stage_histogram"]
    assert min(histogram.values()) > 0 and sum(histogram.values()) == N_DEV  # both stages answer some
    for key in ("prediction", "cascade_stage", "flops", "widths", "exit_layer"):
        assert [r[key] for r in records[1]] == [r[key] for r in records[32]], key
    assert histogram == reports[1]["results"]["cascade_stage_histogram"]
    assert reports[1]["results"]["acc"] == reports[32]["results"]["acc"]
    assert reports[1]["results"]["true_flops"] == reports[32]["results"]["true_flops"]


def test_flops_are_the_sum_of_the_stages_each_example_ran(env, tmp_path):
    report = _run(env, tmp_path, cascade=CASCADE, cascade_thresholds=env["threshold"])
    config = env["config"]
    per_stage = [2 * subnet_macs(config, w, d, MAX_LEN)["total"] for w, d in STAGES]  # FLOPs of each stage
    names = ["w0.25_d0.5", "w1_d1"]
    records = _records(tmp_path)
    expected = [sum(per_stage[: names.index(r["cascade_stage"]) + 1]) for r in records]
    assert [r["flops"] for r in records] == expected
    escalated = sum(r["cascade_stage"] == "w1_d1" for r in records)
    assert 0 < escalated < N_DEV
    results = report["results"]
    mean = (N_DEV * per_stage[0] + escalated * per_stage[1]) / N_DEV
    assert results["true_flops"] == pytest.approx(mean, rel=1e-9)
    full = 2 * path_macs(config, MAX_LEN, [config.num_attention_heads] * config.num_hidden_layers)["total"]
    assert results["relative_flops"] == pytest.approx(mean / full, rel=1e-6)
    assert results["cascade_stage_histogram"] == {"w0.25_d0.5": N_DEV - escalated, "w1_d1": escalated}
    # the report names the cascade as its config-file entry would
    assert (report["cascade_stages"], report["cascade_thresholds"], report["cascade_rule"]) == \
        ([list(s) for s in STAGES], [env["threshold"]], "max_softmax")
    assert report["depth_mult"] is None and report["width_mult_list"] == [0.25, 1.0]


def test_config_file_entry_round_trips(env, tmp_path):
    cascade = Cascade(STAGES, (env["threshold"],), "entropy")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"RTE": cascade.entry()}))
    from_file = _run(env, tmp_path / "file", config=config)
    from_flags = _run(env, tmp_path / "flags", cascade=CASCADE, cascade_thresholds=env["threshold"],
                      cascade_rule="entropy")
    assert from_file["mode"] == "cascade"
    assert Cascade.from_entry({"mode": "cascade", **{k: from_file[k] for k in
                                                     ("cascade_stages", "cascade_thresholds", "cascade_rule")}}) \
        == cascade
    assert _without_latency(from_file) == _without_latency(from_flags)
    assert _records(tmp_path / "file") == _records(tmp_path / "flags")
    # a flag equal to the file's is fine; train_gate_new.py reads the same flags
    again = _run(env, tmp_path / "again", config=config, cascade=CASCADE)
    assert _without_latency(again) == _without_latency(from_flags)
    train_gate_new.main(cli_argv(_flags(env, tmp_path / "new", cascade=CASCADE, cascade_thresholds=env["threshold"],
                                         cascade_rule="entropy"), "--do_eval", "--save_predictions",
                                  switches=("--cpu",)))
    assert _without_latency(json.loads((tmp_path / "new" / "inference_results.json").read_text())) == \
        _without_latency(from_flags)


BAD = [
    ("unknown subnet", ["--cascade", "x0.25_d0.5,w1.0_d1.0", "--cascade_thresholds", "0.1"], "not a subnet"),
    ("width out of range", ["--cascade", "w1.5_d0.5,w1.0_d1.0", "--cascade_thresholds", "0.1"], "--cascade"),
    ("width keeping no head", ["--cascade", "w0.01_d0.5,w1.0_d1.0", "--cascade_thresholds", "0.1"], "keeps no"),
    ("too few thresholds", ["--cascade", "w0.25_d0.5,w0.5_d1.0,w1.0_d1.0", "--cascade_thresholds", "0.1"],
     "needs 2 thresholds"),
    ("too many thresholds", ["--cascade", CASCADE, "--cascade_thresholds", "0.1,0.2"], "needs 1 thresholds"),
    ("no thresholds", ["--cascade", CASCADE], "needs 1 thresholds"),
    ("expensive first", ["--cascade", "w1.0_d1.0,w0.25_d0.5", "--cascade_thresholds", "0.1"], "cheap to expensive"),
    ("same cost twice", ["--cascade", "w0.5_d1.0,w0.5_d1.0", "--cascade_thresholds", "0.1"], "cheap to expensive"),
    ("with --static", ["--cascade", CASCADE, "--cascade_thresholds", "0.1", "--static"], "drop --static"),
    ("with --wd_dynamic", ["--cascade", CASCADE, "--cascade_thresholds", "0.1", "--wd_dynamic", "--early_exit"],
     "drop --wd_dynamic"),
    ("with --fixed_gate", ["--cascade", CASCADE, "--cascade_thresholds", "0.1", "--fixed_gate", "0.5"],
     "drop --fixed_gate"),
    ("thresholds alone", ["--cascade_thresholds", "0.1"], "needs --cascade"),
    ("negative threshold", ["--cascade", CASCADE, "--cascade_thresholds", "-0.1"], "cascade_thresholds"),
    ("regression rule on classification", ["--cascade", CASCADE, "--cascade_thresholds", "0.1", "--cascade_rule",
                                           "agreement"], "does not fit classification"),
]


@pytest.mark.parametrize("argv, message", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_is_one_error_line(env, tmp_path, capsys, argv, message):
    full = cli_argv(_flags(env, tmp_path / "out"), "--do_eval", *argv, switches=("--cpu",))
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: train_gate.main(full))
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and err[0].startswith("error:"), err
    assert message in err[0]
    assert not (tmp_path / "out" / "inference_results.json").exists()


@pytest.mark.parametrize("entry, message", [
    ({"mode": "cascade", "cascade_stages": [[0.25, 0.5]], "cascade_thresholds": [0.1], "cascade_rule": "entropy"},
     "needs 0 thresholds"),
    ({"mode": "cascade", "cascade_stages": [0.25, 1.0], "cascade_thresholds": [0.1]}, "[width, depth] pairs"),
    ({"mode": "cascade", "cascade_stages": [[0.25, 0.5], [1.0, 1.0]], "cascade_thresholds": [0.1],
      "width_mult_list": [0.5]}, "do not apply"),
    ({"mode": "cascade", "cascade_stages": [[0.25, 0.5], [1.0, 1.0]], "cascade_thresholds": [0.1],
      "cascade_rule": "vote"}, "cascade_rule must be one of"),
])
def test_bad_config_entry_is_one_error_line(env, tmp_path, capsys, entry, message):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"RTE": entry}))
    full = cli_argv(_flags(env, tmp_path / "out", config=config), "--do_eval", switches=("--cpu",))
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: train_gate.main(full))
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and err[0].startswith("error:") and message in err[0], err


def test_regression_defaults_to_the_agreement_rule(env, tmp_path):
    report = _run(env, tmp_path, "--cascade", "w0.25_d0.5,w0.5_d1.0,w1.0_d1.0", "--cascade_thresholds", "1e9,1e9",
                  task_name="STS-B", data_dir=env["data_reg"], model_dir=env["model_reg"])
    assert report["cascade_rule"] == "agreement"
    # the first stage has no previous prediction to agree with: every example runs two stages and stops there
    assert report["results"]["cascade_stage_histogram"] == {"w0.25_d0.5": 0, "w0.5_d1": 8, "w1_d1": 0}


def test_calibrate_refuses_cascade(env, tmp_path, capsys):
    """--calibrate chooses the mode itself: a --cascade there would silently turn every run into the cascade."""
    full = cli_argv(_flags(env, tmp_path / "out", cascade=CASCADE, cascade_thresholds=0.1, flops_budget=0.5),
                    "--do_eval", "--calibrate", switches=("--cpu",))
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: train_gate_new.main(full))
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and len(err) == 1 and "drop --cascade" in err[0], err


def test_do_predict_writes_the_cascade_predictions(env, tmp_path):
    """A test split made of dev's pairs (no labels): the cascade predicts them as it predicted dev."""
    data = tmp_path / "RTE"
    data.mkdir()
    dev_rows = (env["data"] / "dev.tsv").read_text().splitlines()
    (data / "dev.tsv").write_text("\n".join(dev_rows) + "\n")
    (data / "test.tsv").write_text("\n".join(row.rsplit("\t", 1)[0] for row in dev_rows) + "\n")
    out = tmp_path / "out"
    _run(env, out, "--do_predict", cascade=CASCADE, cascade_thresholds=env["threshold"], data_dir=data)
    lines = (out / "predict_results_rte.txt").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == N_DEV + 1
    label = {"0": "entailment", "1": "not_entailment"}
    dev = _records(out)
    test = [json.loads(line) for line in (out / "predictions_test.jsonl").read_text().splitlines()]
    assert [r["cascade_stage"] for r in test] == [r["cascade_stage"] for r in dev]
    assert [line.split("\t")[1] for line in lines[1:]] == [label.get(r["prediction"], r["prediction"]) for r in dev]
