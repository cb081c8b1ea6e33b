"""The calibration chooses among every strategy (transformers_ext/calibration_candidates.py, `train_gate_new.py
--calibrate --calibration_strategies`), on the tiny random gated BERT of test_calibration.py:

- over a small grid of gated maps x thresholds, every static subnet and every 2-stage cascade (both rules, a
  3-bin threshold grid), static subnets and cascades run for real as train_gate.py runs them, the search
  returns the exhaustive optimum (plain argmax, and the 1-SE rule);
- the choice over all strategies ranks at least as high, by the rule, as each strategy's own choice;
- end to end, a cascade and a shallow static subnet chosen for a budget are written in the config-entry
  format, and train_gate.py --config reproduces their calibration figures on the calibration half;
- the trade-off plot's data: every series of a panel is measured on that panel's examples."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import cli_argv
from test_calibration import MAX_LEN, N_DEV, OFF_RAMPS, WIDTHS, _argv, _dev, _real_run, _rows, env  # noqa: F401

import plot_tradeoff
import train_gate
import train_gate_new
from transformers_ext import dynamic_forward
from transformers_ext.calibration import Calibrator, Objective, monotone_maps
from transformers_ext.calibration_candidates import candidate_entry, strategy_candidates
from transformers_ext.cascade import cascade_forward
from transformers_ext.routing import TRAINED_DEPTHS

GRID = [0.25, 1.0]  # 5 monotone maps
CASCADE_BINS = (3,)  # 2-stage cascades, 2 thresholds per step


STATIC_WIDTHS = [0.25, 1.0]  # x 3 depths: 6 static subnets


@pytest.fixture(scope="module")
def every_candidate(env):  # noqa: F811
    """The calibrator, the other strategies' candidate sets, and every candidate of every strategy in the
    search's order (maps x thresholds, then static subnets, then cascades): (strategy, what, score, relative
    FLOPs). Static subnets and cascades run for real as train_gate.py runs them; the gates' figures are the
    sweep's, which test_calibration.py holds equal to real routed inference at every threshold."""
    model, tensors = _dev(env)
    calibrator = Calibrator(model, tensors, "acc", OFF_RAMPS, MAX_LEN, batch_size=7)
    others = strategy_candidates(model, calibrator.batches, calibrator.labels, "acc", MAX_LEN, STATIC_WIDTHS,
                                 TRAINED_DEPTHS, ("static", "cascade"), CASCADE_BINS)
    runs = []
    for m in monotone_maps(GRID, len(WIDTHS)):
        s = calibrator.evaluate(m)
        for k, t in enumerate(s.thresholds.tolist()):
            runs.append(("gates", (m, None if k == 0 else t), float(s.score[k]), float(s.relative_flops[k])))
    for group in others:
        for cascade in group.cascades:
            if group.strategy == "static":
                (w, d), = cascade.stages
                real = _real_run(model, tensors, "RTE", lambda *b, w=w, d=d: dynamic_forward(
                    model, *b, fixed_width=w, depth_mult=d))
            else:
                real = _real_run(model, tensors, "RTE", lambda *b, c=cascade: cascade_forward(model, *b, c, MAX_LEN))
            runs.append((group.strategy, cascade, real["score"], real["relative_flops"]))
    return {"calibrator": calibrator, "others": others, "runs": runs, "reference": calibrator.full_model_score()}


def _key(objective: Objective, score: float, flops: float, reference: float, floor: float | None = None) -> tuple:
    """`calibration.Objective`'s ranking, written out."""
    if objective.kind == "flops_budget":
        if floor is not None and flops <= objective.value and score >= floor:
            return (2, flops, score)
        return (1, score, -flops) if flops <= objective.value else (0, -flops, score)
    feasible = score >= reference - objective.value - 1e-9
    return (1, -flops, score) if feasible else (0, score, -flops)


def _brute_force(runs, objective, reference, within_se: float, n: int):
    best = max(runs, key=lambda r: _key(objective, r[2], r[3], reference))  # max: the first of equal keys
    floor = None
    if within_se and objective.kind == "flops_budget" and best[3] <= objective.value:
        floor = best[2] - within_se * math.sqrt(best[2] * (1 - best[2]) / n)
        best = max(runs, key=lambda r: _key(objective, r[2], r[3], reference, floor))
    return best, floor


def test_candidates_cover_every_static_subnet_and_cascade(every_candidate):
    static, *cascades = every_candidate["others"]
    assert static.strategy == "static" and len(static) == len(STATIC_WIDTHS) * len(TRAINED_DEPTHS) == 6
    assert {c.rule for g in cascades for c in g.cascades} == {"max_softmax", "entropy"}
    assert all(g.strategy == "cascade" and len(c.stages) == 2 for g in cascades for c in g.cascades)
    assert sum(len(g) for g in cascades) > 20  # every cheap -> expensive pair, 2 thresholds each
    # the bulk figures are the real runs' (the choice compares these)
    real = {(s, str(what)): (score, flops) for s, what, score, flops in every_candidate["runs"]}
    for group in every_candidate["others"]:
        for k, cascade in enumerate(group.cascades):
            score, flops = real[(group.strategy, str(cascade))]
            assert float(group.score[k]) == pytest.approx(score, abs=1e-12)
            assert float(group.relative_flops[k]) == pytest.approx(flops, rel=1e-12)
            if k % 17 == 0:  # the reported figures too
                assert group.setting(k)["relative_flops"] == flops and group.setting(k)["score"] == score


@pytest.mark.parametrize("within_se", [0.0, 1.0])
@pytest.mark.parametrize("objective", [Objective("flops_budget", 0.3), Objective("flops_budget", 0.45),
                                       Objective("flops_budget", 0.7), Objective("max_drop", 0.05)],
                         ids=lambda o: o.name)
def test_search_over_every_strategy_returns_the_exhaustive_optimum(every_candidate, objective, within_se):
    calibrator, reference = every_candidate["calibrator"], every_candidate["reference"]
    result = calibrator.search(GRID, len(WIDTHS), [objective], WIDTHS, reference, max_exhaustive=100,
                               within_se=within_se, others=every_candidate["others"])
    chosen = result["chosen"][objective]
    (strategy, what, score, flops), floor = _brute_force(every_candidate["runs"], objective, reference, within_se,
                                                         N_DEV)
    assert chosen["strategy"] == strategy and chosen["feasible"]
    assert chosen["score"] == pytest.approx(score, abs=1e-12) and chosen["relative_flops"] == flops
    if strategy == "gates":
        assert (tuple(chosen["width_mult_list"]), chosen["exit_threshold"]) == what
    else:
        assert chosen["entry"] == candidate_entry(what)
    if floor is not None:
        assert chosen["score_floor"] == pytest.approx(floor, abs=1e-12)
    assert result["other_candidates"] == {"static": 6, "cascade": sum(
        len(g) for g in every_candidate["others"] if g.strategy == "cascade")}


@pytest.mark.parametrize("within_se", [0.0, 1.0])
@pytest.mark.parametrize("budget", [0.3, 0.45, 0.7])
def test_the_choice_over_every_strategy_ranks_at_least_as_high_as_each_strategys_own(every_candidate, budget,
                                                                                      within_se):
    """Each strategy chosen alone by the same rule (the gates alone: the maps; static or cascades alone: gates
    off): the choice over all of them ranks at least as high by the rule's key (with the floor of the search
    over all; without --within_se: at least the same score)."""
    calibrator, reference, others = every_candidate["calibrator"], every_candidate["reference"], \
        every_candidate["others"]
    objective = Objective("flops_budget", budget)

    def search(groups, gates):
        return calibrator.search(GRID, len(WIDTHS), [objective], WIDTHS, reference, max_exhaustive=100,
                                 within_se=within_se, others=groups, gates=gates)["chosen"][objective]

    every = search(others, True)
    alone = {"gates": search((), True), "static": search([g for g in others if g.strategy == "static"], False),
             "cascade": search([g for g in others if g.strategy == "cascade"], False)}
    floor = every.get("score_floor")
    for strategy, own in alone.items():
        assert own["strategy"] == strategy
        assert _key(objective, every["score"], every["relative_flops"], reference, floor) >= \
            _key(objective, own["score"], own["relative_flops"], reference, floor), strategy
        if not within_se:
            assert every["score"] >= own["score"]
    assert every["score"] >= max(own["score"] for own in alone.values()) - (
        0 if not within_se else math.sqrt(0.25 / N_DEV))


# ---- end to end: the entry of a cascade and of a shallow static subnet ----------------------------------------
def _calibration_half(env, tmp_path: Path, halves: dict) -> Path:  # noqa: F811
    """The calibration half of RTE's dev as a data folder, to rerun the choice on."""
    dev = _rows(env["data"]["RTE"] / "dev.tsv")
    folder = tmp_path / "calibration_half"
    folder.mkdir(exist_ok=True)
    (folder / "dev.tsv").write_text((env["data"]["RTE"] / "dev.tsv").read_text().split("\n")[0] + "\n" +
                                    "".join(dev[i] + "\n" for i in halves["calibration"]))
    return folder


@pytest.mark.parametrize("strategy, budget", [("cascade", 0.7), ("static", 0.2)])
def test_a_chosen_cascade_or_static_subnet_round_trips_through_the_config_file(env, tmp_path, strategy,  # noqa: F811
                                                                               budget):
    out, merged = tmp_path / "cal", tmp_path / "best.json"
    merged.write_text(json.dumps({"CoLA": {"width_mult_list": [0.5] * 4}}))
    results = train_gate_new.main(_argv(env, out, "--calibrate", "--no_static_baselines", flops_budget=budget,
                                        calibration_strategies=strategy, calibration_cascade_grid=4,
                                        calibration_config=merged, calibration_seed=5))
    assert results["maps_evaluated"] == 0 and results["strategies"] == [strategy]
    o = results["objectives"][f"flops{budget}"]
    assert o["setting"]["strategy"] == strategy and o["calibration"]["relative_flops"] <= budget
    entry = json.loads(Path(o["config"]).read_text())["RTE"]
    if strategy == "cascade":
        assert set(entry) == {"mode", "cascade_stages", "cascade_thresholds", "cascade_rule"}
        assert entry["mode"] == "cascade" and len(entry["cascade_stages"]) == 2 == len(entry["cascade_thresholds"]) + 1
    else:  # every static subnet within 0.2 of the FLOPs is a shallow one: a one-stage cascade names it
        assert entry["mode"] == "cascade" and len(entry["cascade_stages"]) == 1 and entry["cascade_thresholds"] == []
        assert entry["cascade_stages"][0][1] < 1
    assert json.loads(merged.read_text())["RTE"] == entry  # merged into a best_tradeoff-style file
    halves = json.loads((out / "calibration_split.json").read_text())
    rerun = tmp_path / "rerun"
    train_gate.main(_argv(env, rerun, "--do_eval", data_dir=_calibration_half(env, tmp_path, halves), config=merged))
    report = json.loads((rerun / "inference_results.json").read_text())
    assert report["mode"] == "cascade" and report["num_examples"] == len(halves["calibration"])
    for key in ("relative_flops", "flops", "relative_linear_flops", "mean_layers_executed"):
        assert report["results"][key] == o["calibration"][key], key
    assert report["results"]["acc"] == pytest.approx(o["calibration"]["score"], abs=1e-12)
    assert o["reporting"]["num_examples"] == N_DEV - len(halves["calibration"])  # reported by the same entry
    assert json.loads((Path(o["config"]).parent / "reporting" / "inference_results.json").read_text())[
        "cascade_stages"] == entry["cascade_stages"]


def test_calibration_strategies_errors(env, tmp_path, capsys):  # noqa: F811
    from test_calibration import _exit

    for flags, message in (({"calibration_strategies": "gates,oracle"}, "not 'oracle'"),
                           ({"calibration_cascade_grid": "1"}, "0 (skip) or >= 2")):
        code, err = _exit(_argv(env, tmp_path / "x", "--calibrate", flops_budget=0.5, **flags), capsys)
        assert code == 2 and message in err and err.count("error:") == 1, err
    code, err = _exit(_argv(env, tmp_path / "x", calibration_strategies="static"), capsys)
    assert code == 2 and "--calibration_strategies needs --calibrate" in err


# ---- the trade-off plot's data ------------------------------------------------------------------------------
def test_every_series_of_a_plot_panel_is_measured_on_that_panels_examples(env, tmp_path):  # noqa: F811
    inference = tmp_path / "inference"
    for name, flags in (("static_w1.0_d1.0_b8", {"width_mult_list": "1.0"}),
                        ("static_w0.5_d0.5_b8", {"width_mult_list": "0.5", "depth_mult_list": 0.5})):
        train_gate.main(_argv(env, inference / name, "--do_eval", "--static", **flags))
    train_gate.main(cli_argv({**_argv_options(env, inference / "cascade_b8"), "cascade": "w0.25_d0.5,w1.0_d1.0",
                              "cascade_thresholds": 0.2}, "--do_eval", switches=("--cpu",)))
    results = train_gate_new.main(_argv(env, inference / "calibrated", "--calibrate", flops_budget="0.3,0.5,0.7",
                                        calibration_grid="0.25,1.0", calibration_cascade_grid=4, calibration_seed=5))
    rows = plot_tradeoff.load_rows(inference)
    drawn = plot_tradeoff.panels(rows, plot_tradeoff.load_calibrations(inference))
    dev, reporting, calibration = drawn
    assert dev == "all of dev" and "reporting half" in reporting and "in-sample" in calibration
    # all of dev: the runs, nothing from the calibration
    assert set(drawn[dev]) == {"static subnets, depth 1.0 (all of dev)", "static subnets, depth 0.5 (all of dev)",
                               "confidence cascade of static subnets"}
    by_run = {r["run"]: r for r in rows}
    assert drawn[dev]["confidence cascade of static subnets"] == [
        (by_run["cascade"]["rel_flops"], by_run["cascade"]["score"], "")]
    # the reporting half: its static subnets and the calibrated choices there, one series per winning strategy
    assert all(name.endswith("(reporting half of dev)") for name in drawn[reporting])
    statics = [p for name, points in drawn[reporting].items() if name.startswith("static") for p in points]
    assert sorted(statics) == sorted((s["relative_flops"], s["score"], "")
                                     for s in results["static_reporting"].values())
    assert len(statics) == 12
    choices = sorted(p for name, points in drawn[reporting].items() if name.startswith("calibrated") for p in points)
    assert choices == sorted((o["reporting"]["relative_flops"], o["reporting"]["score"], name)
                             for name, o in results["objectives"].items())
    for name, o in results["objectives"].items():
        series = f"calibrated: {o['setting']['strategy']} (reporting half of dev)"
        assert (o["reporting"]["relative_flops"], o["reporting"]["score"], name) in drawn[reporting][series]
    # the calibration half, apart and labelled in-sample: the front, the static subnets and the choices there
    assert all(name.endswith("(calibration split, in-sample)") for name in drawn[calibration])
    front = drawn[calibration]["Pareto front of every candidate (calibration split, in-sample)"]
    assert len(front) == results["pareto_points"] and {p[2] for p in front} <= {"gates", "static", "cascade"}
    assert sorted(p for name, points in drawn[calibration].items() if name.startswith("static") for p in points) == \
        sorted((s["relative_flops"], s["score"], "") for s in results["static_calibration"].values())
    assert sorted(p for name, points in drawn[calibration].items() if name.startswith("calibrated")
                  for p in points) == sorted((o["calibration"]["relative_flops"], o["calibration"]["score"], name)
                                             for name, o in results["objectives"].items())
    out = tmp_path / "plot"
    out.mkdir()
    plot_tradeoff.plot(rows, out / "tradeoff.png", plot_tradeoff.load_calibrations(inference))
    assert (out / "tradeoff.png").read_bytes().startswith(b"\x89PNG")


def _argv_options(env, output_dir: Path) -> dict:  # noqa: F811
    return {"task_name": "RTE", "data_dir": env["data"]["RTE"], "model_dir": env["model"], "output_dir": output_dir,
            "cache_dir": env["cache"], "max_seq_length": MAX_LEN, "per_gpu_eval_batch_size": 8, "num_threads": 1}
