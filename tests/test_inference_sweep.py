"""inference_sweep.py (what gate_inference.sh runs): every setting from one process gives the report that
train_gate.py --do_eval writes for the same flags, and the calibration the report of train_gate_new.py
--calibrate, on the tiny random gated BERT of test_calibration.py (mixed widths, off-ramps after layers 1, 2).
Everything but the latency must be equal: static subnets come from one encoder pass per width (prefix
sharing), all settings from one model load and one tokenisation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import cli_argv
from test_calibration import MAX_LEN, N_DEV, env  # noqa: F401 (env: the tiny gated model and data fixture)

import inference_sweep
import train_gate
import train_gate_new
from cli import run_cli

LATENCY = ("latency_ms_per_batch", "latency_ms_per_example", "examples_per_second", "cpu_latency", "gpu_latency")
WIDTHS = "0.25,1.0,0.5,0.75"  # the dynamic runs' map (a config file entry)


def _without_latency(report: dict) -> dict:
    """The report with its latency figures and the folder it names taken out."""
    if isinstance(report, dict):
        return {k: _without_latency(v) for k, v in report.items()
                if k not in LATENCY + ("search_seconds", "forward_seconds", "inference_results", "pareto_csv",
                                       "config")}
    return report


def _common(tiny: dict, **flags) -> dict:
    return {"task_name": "RTE", "data_dir": tiny["data"]["RTE"], "model_dir": tiny["model"],
            "cache_dir": tiny["cache"], "max_seq_length": MAX_LEN, "num_threads": 1, **flags}


@pytest.fixture(scope="module")
def swept(env, tmp_path_factory) -> Path:  # noqa: F811
    root = tmp_path_factory.mktemp("sweep")
    config = root / "config.json"
    config.write_text(json.dumps({"RTE": {"width_mult_list": [float(w) for w in WIDTHS.split(",")]}}))
    inference_sweep.main(cli_argv(_common(env, inference_dir=root / "inference", batch_sizes="8,5",
                                          static_widths="1.0,0.5", static_depths="1.0,0.75,0.5",
                                          thresholds="0.2 0.45", dynamic_config=config, flops_budget="0.5,0.8"),
                                  "--do_eval", "--record_cpu_time", switches=("--cpu",)))
    return root


SETTINGS = [(f"static_w{w}_d{d}", ["--static"], {"width_mult_list": ",".join([w] * 4), "depth_mult_list": d})
            for d in ("1.0", "0.75", "0.5") for w in ("1.0", "0.5")]
SETTINGS += [("w_dynamic", ["--w_dynamic"], {"width_mult_list": WIDTHS})]
SETTINGS += [(f"wd_dynamic_t{t}", ["--wd_dynamic", "--early_exit"], {"width_mult_list": WIDTHS, "exit_threshold": t})
             for t in ("0.2", "0.45")]
SETTINGS += [("cascade", [], {"cascade": "w0.25_d0.5,w0.75_d0.75", "cascade_thresholds": "0.3"})]  # the default


@pytest.mark.parametrize("batch_size", [8, 5])
@pytest.mark.parametrize("name, modes, flags", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_each_setting_equals_its_own_train_gate_run(env, swept, tmp_path, name, modes, flags,  # noqa: F811
                                                     batch_size):
    folder = swept / "inference" / f"{name}_b{batch_size}"
    swept_report = json.loads((folder / "inference_results.json").read_text())
    alone = tmp_path / "alone"
    train_gate.main(cli_argv(_common(env, output_dir=alone, per_gpu_eval_batch_size=batch_size, **flags),
                             "--do_eval", "--record_cpu_time", *modes, switches=("--cpu",)))
    report = json.loads((alone / "inference_results.json").read_text())
    assert swept_report["results"]["latency_ms_per_example"] > 0
    assert _without_latency(swept_report) == _without_latency(report)
    assert swept_report["num_examples"] == N_DEV
    assert "***** Eval results: RTE *****" in (folder.parent / f"{folder.name}.log").read_text()


def test_calibration_equals_train_gate_new(env, swept, tmp_path):  # noqa: F811
    alone = tmp_path / "calibrated"
    train_gate_new.main(cli_argv(_common(env, output_dir=alone, per_gpu_eval_batch_size=8, flops_budget="0.5,0.8"),
                                  "--do_eval", "--record_cpu_time", "--calibrate", switches=("--cpu",)))
    ours = swept / "inference" / "calibrated"
    results = json.loads((ours / "calibration_results.json").read_text())
    expected = json.loads((alone / "calibration_results.json").read_text())
    assert len(results["static_reporting"]) == 12 and list(results["static_reporting"]) == \
        list(expected["static_reporting"])
    assert _without_latency(results) == _without_latency(expected)
    for run in ("static_reporting/static_w0.5_d0.75", "flops0.5/reporting", "flops0.8/all_dev"):
        assert _without_latency(json.loads((ours / run / "inference_results.json").read_text())) == \
            _without_latency(json.loads((alone / run / "inference_results.json").read_text()))
    assert (ours / "calibration_pareto.csv").read_text() == (alone / "calibration_pareto.csv").read_text()
    assert "***** Calibration: RTE (acc) *****" in (swept / "inference" / "calibrated.log").read_text()


def test_timings_name_every_stage_that_ran(swept):
    timings = json.loads((swept / "inference" / inference_sweep.TIMINGS_FILE).read_text())
    assert list(timings) == ["model_load", "tokenisation", "static", "gated", "cascade", "calibration"]
    assert all(set(t) == {"wall", "cpu"} and t["wall"] >= 0 and t["cpu"] >= 0 for t in timings.values())


def test_reuse_existing_runs_nothing(env, swept, capsys):  # noqa: F811
    inference_sweep.main(cli_argv(_common(env, inference_dir=swept / "inference", batch_sizes="8",
                                          static_widths="1.0", static_depths="0.5", thresholds="0.2",
                                          dynamic_config=swept / "config.json", flops_budget="0.5", model_dir="nope"),
                                  "--do_eval", "--reuse_existing", switches=("--cpu",)))
    printed = capsys.readouterr().out
    assert printed.count("reusing") == 5 and "-- " not in printed  # the model folder "nope" was never read


@pytest.mark.parametrize("flag", [["--static"], ["--exit_threshold", "0.3"], ["--width_mult_list", "0.5"]])
def test_settings_chosen_by_the_sweep_are_refused(env, tmp_path, capsys, flag):  # noqa: F811
    argv = cli_argv(_common(env, inference_dir=tmp_path), "--do_eval", *flag, switches=("--cpu",))
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: inference_sweep.main(argv))
    assert info.value.code == 2 and f"drop {flag[0]}" in capsys.readouterr().err


@pytest.mark.parametrize("flags", [["--fp16"], ["--fp16", "--bf16"]])
def test_precision_flags_answered_as_every_script(env, tmp_path, capsys, flags):  # noqa: F811
    """--fp16 on the CPU and --fp16 with --bf16: one error line and exit 2, before any model is read."""
    argv = cli_argv(_common(env, inference_dir=tmp_path), "--do_eval", *flags, switches=("--cpu",))
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: inference_sweep.main(argv))
    expected = "--fp16 and --bf16 exclude each other" if "--bf16" in flags else "--fp16 needs a CUDA device"
    assert info.value.code == 2 and capsys.readouterr().err.startswith(f"error: {expected}")
