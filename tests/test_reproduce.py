"""reproduce.py's summary: the static frontier, the dynamic points' gap above it, mean +- std over seeds, and
the JSON layout other tools read, on a synthetic tree of finished runs (nothing is trained)."""

from __future__ import annotations

import json
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
    reproduce.run_all(reproduce.parse_args(["--profile", profile, "--seeds", "1,2", "--no_baselines"]))
    pipeline = ["run_glue.sh", "train_glue.sh", "gate_inference.sh"]
    per_seed = pipeline if profile == "quick" else pipeline + ["run_glue.sh"]
    assert [script for script, _ in calls] == per_seed * 2
    assert [graft for _, graft in calls].count("0") == (0 if profile == "quick" else 2)
