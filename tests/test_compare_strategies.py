"""compare_strategies.py end to end on the tiny gated model and RTE data of test_calibration (h32, L4, 24 dev
examples): the table's rows, the gap arithmetic against the reporting half's static frontier, the oracles,
the reuse of the cached per-example outputs, and the one-line errors."""

from __future__ import annotations

import json

import pytest
from conftest import cli_argv
from test_calibration import MAX_LEN, env  # noqa: F401 (env: the tiny gated model and data fixture)

import compare_strategies
from cli import run_cli
from transformers_ext.baselines import frontier_at


def _flags(tiny: dict, out, **extra) -> dict:
    return {"task_name": "RTE", "data_dir": tiny["data"]["RTE"], "model_dir": tiny["model"],
            "cache_dir": tiny["cache"], "max_seq_length": MAX_LEN, "num_threads": 1, "output_dir": out,
            "halvings": 3, "noise_samples": 2, "cascade_grid": "4,3", "flops_budgets": "0.3,0.6,1.0", **extra}


@pytest.fixture(scope="module")
def compared(env, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("strategies")
    compare_strategies.main(cli_argv(_flags(env, out)))
    return out, json.loads((out / "strategies.json").read_text())


def test_every_strategy_has_a_row(compared):
    out, result = compared
    names = list(result["summary"])
    assert names == ["static subnet", "mixed-width static", "cascade max_softmax, 2 stages",
                     "cascade entropy, 2 stages", "cascade max_softmax, 3 stages", "cascade entropy, 3 stages",
                     "gates", "shuffled gate", "d_dynamic w0.25", "d_dynamic w0.5", "d_dynamic w0.75", "d_dynamic w1"]
    table = (out / "strategies.md").read_text()
    assert all(f"| {name} |" in table for name in names)


def test_gaps_are_against_the_reporting_halfs_static_frontier(compared):
    _, result = compared
    for halving in result["per_halving"]:
        points = [tuple(p) for p in halving["static_reporting"]]
        assert len(points) == 12  # 4 widths x 3 depths
        for name, per_budget in halving["strategies"].items():
            for budget, chosen in per_budget.items():
                if chosen is None:
                    continue
                assert chosen["calibration_flops"] <= float(budget) + 1e-12
                edge = frontier_at(points, chosen["reporting_flops"])
                assert chosen["gap"] == pytest.approx(chosen["reporting_score"] - edge)
                if name == "static subnet":  # a static subnet never lies above the statics' envelope
                    assert chosen["gap"] <= 1e-12


def test_oracles(compared):
    _, result = compared
    o = result["oracles"]
    assert o["paths"] == 16 + 8  # the 4 x 4 two-block patterns and the uniform subnets of 2 and 3 layers
    assert o["full_model"] <= o["path_oracle"] <= 1.0
    assert max(o["noise_sample_accuracy"]["values"]) <= o["noise_oracle"]
    assert o["path_oracle_2_random_paths"]["mean"] <= o["path_oracle"]


def test_a_rerun_reuses_the_cached_outputs(compared, env, capsys):  # noqa: F811
    out, result = compared
    capsys.readouterr()
    compare_strategies.main(cli_argv(_flags(env, out)))
    assert "reusing the per-example outputs" in capsys.readouterr().err
    assert json.loads((out / "strategies.json").read_text())["summary"] == result["summary"]


@pytest.mark.parametrize("change, message", [
    ({"model_dir": "/nonexistent"}, "--model_dir /nonexistent does not exist"),
    ({"cascade_rules": "agreement"}, "--cascade_rules: 'agreement' does not fit RTE"),
    ({"pattern_blocks": 3}, "--pattern_blocks 3 must divide the number of layers (4)"),
    ({"cascade_grid": "1"}, "--cascade_grid values must be 0 (skip) or >= 2"),
    ({"flops_budgets": "0"}, "--flops_budgets"),
])
def test_bad_input_is_one_error_line(env, tmp_path, capsys, change, message):  # noqa: F811
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: compare_strategies.main(cli_argv(_flags(env, tmp_path / "out", **change))))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_help_describes_every_flag(capsys):
    with pytest.raises(SystemExit):
        compare_strategies.parse_args(["--help"])
    text = capsys.readouterr().out
    parser_flags = [a.option_strings[0] for a in compare_strategies.build_parser()._actions if a.option_strings]
    assert all(flag in text for flag in parser_flags)
    assert all(a.help for a in compare_strategies.build_parser()._actions)


def test_regression_runs_with_the_agreement_rule(env, tmp_path):  # noqa: F811
    flags = _flags(env, tmp_path, task_name="STS-B", data_dir=env["data"]["STS-B"], model_dir=env["model_reg"],
                   halvings=2, noise_samples=0)
    compare_strategies.main(cli_argv(flags))
    result = json.loads((tmp_path / "strategies.json").read_text())
    assert result["metric"] == "pearson" and result["oracles"] == {}  # no "right or wrong" per example
    assert {"cascade agreement, 2 stages", "cascade agreement, 3 stages"} <= set(result["summary"])
    for halving in result["per_halving"]:  # a 2-stage agreement cascade always runs both stages
        for chosen in halving["strategies"]["cascade agreement, 2 stages"].values():
            if chosen is not None:
                assert chosen["reporting_flops"] == pytest.approx(chosen["calibration_flops"])
