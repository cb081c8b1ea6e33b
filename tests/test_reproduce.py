"""reproduce.py's summary: the static frontier, the dynamic points' gap above it, mean +- std over seeds, and
the JSON layout other tools read, on a synthetic tree of finished runs (nothing is trained)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

import reproduce


def test_frontier_is_the_interpolated_upper_envelope():
    points = [(0.25, 0.70), (0.5, 0.80), (0.5, 0.60), (0.75, 0.78), (1.0, 0.82)]
    assert reproduce.frontier_at(points, 0.25) == pytest.approx(0.70)
    assert reproduce.frontier_at(points, 0.375) == pytest.approx(0.75)  # halfway between 0.70 and 0.80
    assert reproduce.frontier_at(points, 0.75) == pytest.approx(0.81)  # 0.78 lies below the envelope
    assert reproduce.frontier_at(points, 1.5) == pytest.approx(0.82)
    assert reproduce.frontier_at(points, 0.1) is None  # cheaper than every static subnet: no frontier there


def test_frontier_takes_the_best_of_subnets_at_equal_flops():
    # w0.5 d1, w0.75 d0.75 and w1 d0.5 cost the same: the envelope holds only the best of them there
    points = [(0.25, 0.70), (0.5, 0.75), (0.5, 0.80), (0.5, 0.78), (1.0, 0.82)]
    assert reproduce.frontier_at(points, 0.5) == pytest.approx(0.80)
    assert reproduce.frontier_at(points, 0.375) == pytest.approx(0.75)  # halfway between 0.70 and 0.80
    assert reproduce.frontier_at(points, 0.75) == pytest.approx(0.81)


def _write_run(root: Path, seed: int, acc: dict[str, float], modes: dict[str, tuple[float, float]]) -> None:
    for folder, phase in (("teacher", "finetuning"), ("w_bert", "dynabertw"), ("wd_bert", "dynabert"),
                          ("wd_bert", "final_finetuning")):
        (root / f"seed{seed}" / folder).mkdir(parents=True, exist_ok=True)
        results = {"w1_d1": acc["w1_d1"]} if phase == "finetuning" else acc
        payload = {"best": {f"d{k.split('_d')[1]}_w{k.split('_d')[0][1:]}": {"acc": v} for k, v in results.items()}}
        (root / f"seed{seed}" / folder / f"eval_results_{phase}.json").write_text(json.dumps(payload))
    for run, (score, flops) in modes.items():
        folder = root / f"seed{seed}" / "inference" / run
        folder.mkdir(parents=True)
        (folder / "inference_results.json").write_text(json.dumps(
            {"results": {"acc": score, "relative_flops": flops, "latency_ms_per_example": 1.0}}))


def test_summary_over_seeds(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    args = reproduce.parse_args(["--seeds", "1,2", "--summarize_only", "--output_root", "runs"])
    root = reproduce.run_folder(args)
    for seed, delta in ((1, 0.0), (2, 0.02)):
        _write_run(root, seed, {"w1_d1": 0.80 + delta, "w0.5_d0.5": 0.60 + delta},
                   {"static_w1.0_d1.0_b32": (0.80 + delta, 1.0), "static_w0.5_d1.0_b32": (0.70 + delta, 0.5),
                    "wd_dynamic_t0.5_b32": (0.78 + delta, 0.6)})
    summary = reproduce.summarize(args)
    assert summary["seeds"] == [1, 2]
    cell = summary["stages"]["final_finetuning"]["w0.5_d0.5"]
    assert cell["values"] == [0.60, 0.62] and cell["mean"] == pytest.approx(0.61)
    assert cell["std"] == pytest.approx(0.0141421, rel=1e-4)
    # frontier at 0.6 FLOPs: 0.70 + (0.80 - 0.70) * 0.2 = 0.72, so the dynamic point is 0.06 above it
    gap = summary["dynamic_gap_over_static_frontier"]["wd_dynamic_t0.5_b32"]
    assert gap["values"] == pytest.approx([0.06, 0.06])
    assert summary["baselines"]["plain_full_model"]["mean"] == pytest.approx(0.81)
    assert set(summary) >= {"task", "profile", "seeds", "stages", "modes", "baselines", "ablations"}
    assert set(summary["modes"]["static_w1.0_d1.0_b32"]) == {"score", "rel_flops", "ms_per_example"}
    text = reproduce.markdown(summary)
    assert "| final | 0.5 | - | - | 0.610 ± 0.014 | - |" in text


@pytest.mark.parametrize("docs_dir", [None, "docs/reproduce"])
def test_summaries_land_next_to_the_runs_unless_asked(tmp_path, monkeypatch, docs_dir):
    """A user's run writes its summaries under outputs/; the shipped docs/reproduce moves only when named."""
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    argv = ["--seeds", "1", "--summarize_only"] + (["--docs_dir", docs_dir] if docs_dir else [])
    root = reproduce.run_folder(reproduce.parse_args(argv))
    _write_run(root, 1, {"w1_d1": 0.80}, {"static_w1.0_d1.0_b32": (0.80, 1.0)})
    monkeypatch.setattr(reproduce, "plot", lambda summary, path: path.write_bytes(b"png"))
    reproduce.main(argv)
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("SST-2_quick.*"))
    folder = docs_dir or "outputs/reproduce"
    assert written == [f"{folder}/SST-2_quick.{ext}" for ext in ("json", "md", "png")]
    assert json.loads((tmp_path / folder / "SST-2_quick.json").read_text())["seeds"] == [1]


def test_calibration_summary_against_both_static_comparisons(tmp_path):
    """Per objective on the reporting half: minus the best static at >= its FLOPs (issue 20) and minus the
    static frontier interpolated at its FLOPs (issue 17), paired per seed."""
    for seed, delta in ((1, 0.0), (2, 0.02)):
        statics = {"static_w0.5_d1.0": {"score": 0.70 + delta, "relative_flops": 0.5},
                   "static_w1.0_d1.0": {"score": 0.80 + delta, "relative_flops": 1.0}}
        objective = {"reporting": {"score": 0.75 + delta, "relative_flops": 0.7},
                     "best_static_at_or_above_reporting_flops": statics["static_w1.0_d1.0"]}
        folder = tmp_path / f"seed{seed}" / "inference" / "calibrated"
        folder.mkdir(parents=True)
        (folder / "calibration_results.json").write_text(json.dumps(
            {"objectives": {"flops0.7": objective}, "static_reporting": statics}))
    summary = reproduce.calibration_summary(tmp_path, [1, 2])["calibrated"]["flops0.7"]
    assert summary["minus_best_static_at_or_above"]["values"] == pytest.approx([-0.05, -0.05])
    # frontier at 0.7: 0.70 + 0.10 * 0.4 = 0.74 (+ delta), so the setting lies 0.01 above it
    assert summary["gap_over_static_frontier"]["values"] == pytest.approx([0.01, 0.01])


def test_truncated_model_is_the_first_layers_and_loads(tmp_path):
    """The plain first-layers baseline's model: a folder holding exactly the first n layers' weights (a folder
    with more layers in its weights than in its config is refused on loading), its pooling config linked."""
    from types import SimpleNamespace

    import torch
    from conftest import SHAPES, make_config, save_model_folder
    from safetensors.torch import load_file

    from transformers_ext.loading import load_model
    from utils_glue import get_task

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(95)]
    source = save_model_folder(tmp_path / "bert", vocab, make_config(**SHAPES["small"]))
    (source / "1_Pooling").mkdir()
    (source / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    args = SimpleNamespace(model_dir=str(source))
    folder = reproduce.truncated_model(args, 1, tmp_path / "first_1")
    full, cut = load_file(str(source / "model.safetensors")), load_file(str(folder / "model.safetensors"))
    assert not any(".layer.1." in k for k in cut) and any(".layer.1." in k for k in full)
    assert all(torch.equal(cut[k], full[k]) for k in cut) and len(cut) < len(full)
    model, _ = load_model(str(folder), get_task("SST-2"), max_seq_length=16)
    assert model.config.num_hidden_layers == 1 and model.config.pooling == "mean"


@pytest.mark.parametrize("profile", ["quick", "full"])
def test_no_graft_ablation_only_where_the_width_stage_grafts(tmp_path, monkeypatch, profile):
    # the quick profile's width stage is 1 epoch, in which grafting never fires: a GRAFT=0 rerun would repeat it
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    calls = []
    monkeypatch.setattr(reproduce, "shell", lambda script, env, *args: calls.append((script, env.get("GRAFT"))))
    reproduce.run_all(reproduce.parse_args(["--profile", profile, "--seeds", "1,2", "--no_baselines",
                                            "--no_strategies"]))
    pipeline = ["run_glue.sh", "train_glue.sh", "gate_inference.sh"]
    per_seed = pipeline if profile == "quick" else pipeline + ["run_glue.sh"]
    assert [script for script, _ in calls] == per_seed * 2
    assert [graft for _, graft in calls].count("0") == (0 if profile == "quick" else 2)


# ---- every strategy's gap over seeds (compare_strategies.py's strategies.json, synthetic) ----------------------
BUDGETS = [0.3, 0.5]


def _strategies_json(path: Path, gaps: dict[str, list], oracles: dict | None = None, task: str = "SST-2",
                     static_reporting: list | None = None) -> Path:
    """A minimal strategies.json: per strategy, per budget (BUDGETS) None or (mean gap, std over halvings);
    the reporting score is 0.8 + the gap, at FLOPs = the budget - 0.05."""
    summary = {name: {str(b): None if cell is None else {
        "gap": {"mean": cell[0], "std": cell[1]}, "halvings": 4,
        "reporting_score": {"mean": 0.8 + cell[0], "std": 0.01}, "reporting_flops": {"mean": b - 0.05, "std": 0.0},
        "settings": ["x"]} for b, cell in zip(BUDGETS, cells, strict=True)} for name, cells in gaps.items()}
    result = {"task": task, "metric": "acc", "budgets": BUDGETS, "summary": summary, "oracles": oracles or {}}
    if static_reporting is not None:
        result["per_halving"] = [{"seed": 42 + i, "static_reporting": points}
                                 for i, points in enumerate(static_reporting)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result))
    return path


def _oracles(path_oracle: float, noise_oracle: float, random_paths: float) -> dict:
    return {"paths": 24, "path_oracle": path_oracle, "full_model": 0.83, "noise_samples": 8, "noise_width": 1.0,
            "noise_oracle": noise_oracle, "noise_sample_accuracy": {"mean": 0.82, "std": 0.01, "values": [0.82]},
            "path_oracle_8_random_paths": {"mean": random_paths, "std": 0.005, "values": [random_paths]}}


def test_strategies_over_seeds_mean_std_best_and_oracles(tmp_path):
    files = {
        42: _strategies_json(tmp_path / "a.json", {"static subnet": [(0.0, 0.004), (-0.01, 0.006)],
                                                   "cascade max_softmax, 2 stages": [(0.01, 0.008), (0.0, 0.002)],
                                                   "gates": [(0.02, 0.005), None]}, _oracles(0.89, 0.88, 0.87)),
        1: _strategies_json(tmp_path / "b.json", {"static subnet": [(0.0, 0.002), (-0.02, 0.002)],
                                                  "cascade max_softmax, 2 stages": [(0.02, 0.004), (0.01, 0.004)],
                                                  "gates": [(0.04, 0.003), (0.05, 0.001)]}, _oracles(0.90, 0.86, 0.88)),
        2: _strategies_json(tmp_path / "c.json", {"static subnet": [(0.0, 0.006), (0.0, 0.004)],
                                                  "cascade max_softmax, 2 stages": [(0.03, 0.006), (0.02, 0.006)],
                                                  "gates": [(0.03, 0.001), (0.04, 0.001)]}, _oracles(0.91, 0.87, 0.89)),
    }
    s = reproduce.strategies_summary(files, "SST-2")
    assert s["seeds"] == [42, 1, 2] and s["budgets"] == ["0.3", "0.5"]
    cascade = s["gap_over_static_frontier"]["cascade max_softmax, 2 stages"]["0.3"]
    assert cascade["gap"]["values"] == [0.01, 0.02, 0.03] and cascade["gap"]["mean"] == pytest.approx(0.02)
    assert cascade["gap"]["std"] == pytest.approx(0.01)  # the sample std over seeds (n - 1), not over halvings
    assert cascade["halving_std"] == pytest.approx(0.006)  # (0.008 + 0.004 + 0.006) / 3
    assert cascade["reporting_score"]["mean"] == pytest.approx(0.82)
    assert cascade["reporting_flops"]["mean"] == pytest.approx(0.25)
    gates = s["gap_over_static_frontier"]["gates"]
    assert gates["0.5"]["seeds"] == [1, 2] and gates["0.5"]["gap"]["mean"] == pytest.approx(0.045)
    # the best by mean gap among the strategies every seed has: the gates at 0.3 (0.03 against the cascade's
    # 0.02); at 0.5 the gates (0.045) lack seed 42, so the cascade (0.01) wins over the static subnet (-0.01)
    assert s["best"]["0.3"]["strategy"] == "gates"
    assert s["best"]["0.5"]["strategy"] == "cascade max_softmax, 2 stages"
    assert s["best"]["0.5"]["gap"]["mean"] == pytest.approx(0.01)
    o = s["oracles"]
    assert o["path_oracle"]["mean"] == pytest.approx(0.90) and o["path_oracle"]["std"] == pytest.approx(0.01)
    assert o["noise_oracle"]["values"] == [0.88, 0.86, 0.87]
    assert o["path_oracle_8_random_paths"]["values"] == [0.87, 0.88, 0.89]  # each seed's mean over its draws
    assert o["paths"] == 24 and o["noise_samples"] == 8
    text = "\n".join(reproduce.strategies_markdown(s))
    assert "| cascade max_softmax, 2 stages | +0.020 ± 0.010 [0.006] | +0.010 ± 0.010 [0.004] |" in text
    assert "| gates | +0.030 ± 0.010 [0.003] | +0.045 ± 0.007 [0.001] (2 seeds) |" in text
    assert "| any of 8 dropout samples of w1.0 d1 right (noise oracle) | 0.870 ± 0.010 |" in text
    assert "| any of the 24 fixed paths right | 0.900 ± 0.010 |" in text
    one_seed = "\n".join(reproduce.strategies_markdown(reproduce.strategies_summary({42: files[42]}, "SST-2")))
    assert "| gates | +0.020 [0.005] | — |" in one_seed  # no std over one seed


def test_summarize_only_finds_strategies_files_made_elsewhere(tmp_path, monkeypatch):
    """--strategies_json: SEED=PATH for one seed, a {task}/{seed} template for the others, the first existing
    item winning, the run folder's own seed<S>/strategies/strategies.json last; no pipeline run is needed."""
    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    gaps = {42: 0.01, 1: 0.02, 2: 0.06, 3: 0.5}
    _strategies_json(tmp_path / "docs" / "seed42.json", {"gates": [(gaps[42], 0.0), None]})
    for seed in (1, 2):
        _strategies_json(tmp_path / "elsewhere" / f"SST-2_seed{seed}" / "strategies.json",
                         {"gates": [(gaps[seed], 0.0), None]})
    # the run folder's file for seed 2 loses to the template's; seed 3 is not asked for
    argv = ["--seeds", "42,1,2", "--summarize_only", "--output_root", "runs", "--strategies_json",
            "42=docs/seed42.json,elsewhere/{task}_seed{seed}/strategies.json"]
    for seed in (2, 3):
        _strategies_json(reproduce.run_folder(reproduce.parse_args(argv)) / reproduce.STRATEGIES_JSON.format(
            seed=seed), {"gates": [(gaps[3], 0.0), None]})
    drawn = []
    monkeypatch.setattr(reproduce.plot_tradeoff, "plot_series", lambda series, path, *a: drawn.append(path.name))
    reproduce.main(argv)
    summary = json.loads((tmp_path / "runs" / "SST-2_quick.json").read_text())
    assert summary["seeds"] == [] and summary["strategies"]["seeds"] == [42, 1, 2]
    assert summary["strategies"]["files"]["2"] == str(tmp_path / "elsewhere" / "SST-2_seed2" / "strategies.json")
    assert summary["strategies"]["gap_over_static_frontier"]["gates"]["0.3"]["gap"]["values"] == [0.01, 0.02, 0.06]
    assert "| gates | +0.030 ± 0.026 [0.000] | — |" in (tmp_path / "runs" / "SST-2_quick.md").read_text()
    assert drawn == ["SST-2_quick_strategies.png"]  # no pipeline run: no pipeline plot


def test_strategies_plot_draws_the_static_frontier_of_the_reporting_halves(tmp_path, monkeypatch):
    """The static subnets on the reporting halves (each seed's mean over its halvings, then over seeds), their
    upper envelope, and each strategy's choices: all series on the same examples."""
    halvings = [[[0.25, 0.70], [0.5, 0.80], [0.5, 0.74], [0.75, 0.77], [1.0, 0.84]],
                [[0.25, 0.72], [0.5, 0.78], [0.5, 0.76], [0.75, 0.75], [1.0, 0.82]]]  # means: 0.71 0.79 0.75 0.76 0.83
    files = {seed: _strategies_json(tmp_path / f"{seed}.json", {"static subnet": [(0.0, 0.0), (0.0, 0.0)],
                                                                "gates": [(0.01, 0.0), (0.02, 0.0)]},
                                    static_reporting=halvings) for seed in (1, 2)}
    summary = {"task": "SST-2", "profile": "quick", "metric": "acc",
               "strategies": reproduce.strategies_summary(files, "SST-2")}
    assert [p["score"]["mean"] for p in summary["strategies"]["static_reporting"]] == pytest.approx(
        [0.71, 0.79, 0.75, 0.76, 0.83])
    drawn = {}
    monkeypatch.setattr(reproduce.plot_tradeoff, "plot_series",
                        lambda series, path, *a: drawn.update({s["label"]: s for s in series}))
    reproduce.plot_strategies(summary, tmp_path / "x.png")
    assert list(drawn) == ["every static subnet", "static frontier (their upper envelope)", "static subnet", "gates"]
    frontier = drawn["static frontier (their upper envelope)"]
    # 0.76 at 0.75 lies under the envelope (0.79 -> 0.83): the frontier passes above it, at 0.81
    assert frontier["x"] == [0.25, 0.5, 0.75, 1.0] and frontier["y"] == pytest.approx([0.71, 0.79, 0.81, 0.83])
    assert drawn["gates"]["x"] == pytest.approx([0.25, 0.45]) and drawn["gates"]["y"] == pytest.approx([0.81, 0.82])


def test_plot_series_writes_a_png(tmp_path):
    series = [{"label": "a", "x": [0.5, 0.25], "y": [0.8, 0.7], "yerr": [0.01, 0.02], "ls": "--"},
              {"label": "b", "x": [0.3], "y": [0.75], "marker": "*"}]
    reproduce.plot_tradeoff.plot_series(series, tmp_path / "p.png", "title", "acc", {"plain": 0.79})
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(task="MRPC"), "strategies of MRPC, not SST-2"),
    (lambda r: r.update(budgets=[0.3, 0.7], summary={"gates": {"0.3": None, "0.7": None}}),
     "budgets 0.3,0.7 differ from"),
    (lambda r: r["summary"]["gates"].pop("0.5"), "not a valid strategies.json (KeyError"),
    (lambda r: r["summary"]["gates"]["0.3"]["gap"].update(mean="high"), "not a valid strategies.json (ValueError"),
])
def test_a_wrong_strategies_file_is_one_error_naming_it(tmp_path, change, message):
    good = _strategies_json(tmp_path / "good.json", {"gates": [(0.01, 0.0), None]})
    result = json.loads(good.read_text())
    change(result)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(result))
    with pytest.raises(reproduce.CLIError, match=re.escape(message)) as err:
        reproduce.strategies_summary({1: good, 2: bad}, "SST-2")
    assert str(bad) in str(err.value)


def test_strategies_json_items_are_a_seed_or_a_template(capsys):
    assert reproduce.strategies_sources("42=a/b.json,r/{seed}.json") == [(42, "a/b.json"), (None, "r/{seed}.json")]
    with pytest.raises(SystemExit) as exit_:
        reproduce.parse_args(["--strategies_json", "runs/strategies.json"])
    assert exit_.value.code == 2 and "neither SEED=PATH nor a path holding {seed}" in capsys.readouterr().err


def test_strategies_run_after_the_pipeline_and_are_reused_while_up_to_date(tmp_path, monkeypatch):
    import os

    monkeypatch.setattr(reproduce, "ROOT", tmp_path)
    calls = []
    monkeypatch.setattr(reproduce, "shell", lambda script, env, *args: calls.append(script))
    monkeypatch.setattr(reproduce.subprocess, "run",
                        lambda command, cwd: calls.append(command) or type("Done", (), {"returncode": 0}))

    def run(*flags: str) -> list:
        calls.clear()
        reproduce.run_all(reproduce.parse_args(["--seeds", "1", "--no_baselines", *flags]))
        return calls

    seed = reproduce.run_folder(reproduce.parse_args([])) / "seed1"
    (seed / "wd_bert_gates").mkdir(parents=True)
    (seed / "wd_bert_gates" / "model.safetensors").write_bytes(b"")
    pipeline = ["run_glue.sh", "train_glue.sh", "gate_inference.sh"]
    assert run("--strategies_args", "--halvings 3")[:3] == pipeline and len(calls) == 4
    command = calls[3]
    assert command[1].endswith("compare_strategies.py") and command[-2:] == ["--halvings", "3"]
    assert command[command.index("--max_seq_length") + 1] == "64"  # the quick profile's
    assert command[command.index("--output_dir") + 1] == str(seed / "strategies")
    result = _strategies_json(seed / "strategies" / "strategies.json", {"gates": [(0.01, 0.0), None]})
    payload = json.loads(result.read_text())
    result.write_text(json.dumps({**payload, "command": " ".join(command[1:])}))  # as compare_strategies.py does
    assert run("--strategies_args", "--halvings 3") == pipeline  # reused
    assert len(run("--strategies_args", "--halvings 4")) == 4  # other arguments: made again
    later = result.stat().st_mtime + 10
    os.utime(seed / "wd_bert_gates" / "model.safetensors", (later, later))  # the gates were retrained
    assert len(run("--strategies_args", "--halvings 3")) == 4
    _strategies_json(tmp_path / "elsewhere" / "seed1.json", {"gates": [(0.01, 0.0), None]})
    assert run("--strategies_json", "1=elsewhere/seed1.json") == pipeline  # a file given for the seed
    assert run("--no_strategies") == pipeline
