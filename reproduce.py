"""Reproduce the paper's claims over seeds for one task and profile, with ablations and plain baselines.

For every seed it runs the project's pipeline (run_glue.sh -> train_glue.sh -> gate_inference.sh, each stage
reused when it already finished, so a killed run continues where it stopped), then:
  ablation no_graft   the width, depth and final stages again without --graft_during_training (full profile;
                      the quick profile's 1-epoch width stage never grafts)
  baselines           plain fine-tuning of the full model (the pipeline's own teacher stage) and of its first
                      rnd(d*L) layers for every trained depth d < 1, with the teacher's recipe and budget
  strategies          compare_strategies.py on the seed's gated model (seed<S>/strategies/strategies.json, reused
                      when made by the same command after the model): every strategy chosen on a calibration
                      half of dev per FLOPs budget, scored on the other half as its gap over the static frontier
and writes <output_root>/<task>_<profile>.{json,md,png} (outputs/reproduce by default; the shipped results
in docs/reproduce are replaced only when asked, with --docs_dir docs/reproduce): mean +- std over seeds of
every subnet after every stage, of every inference mode (score, relative FLOPs, latency), the static frontier
and the dynamic points with error bars, the gap of each dynamic point above the static frontier at its FLOPs,
and the baselines; per strategy and budget, mean +- std over seeds of each seed's mean gap over its halvings,
the oracles (24 fixed paths, K dropout samples of one subnet) and <name>_strategies.png (every strategy's
choices on the reporting halves). --summarize_only --strategies_json aggregates strategies.json files made
elsewhere.

Extra arguments after `--` go to every run_glue.py call (e.g. `-- --pooling mean`); --gate_args to
train_gate.py's gate training.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

import plot_tradeoff
import run_profile
from cli import ArgumentParser, CLIError, comma_items, int_list, run_cli
from transformers_ext.baselines import frontier_at, spread
from transformers_ext.errors import reading
from transformers_ext.files import write_json, write_text
from utils_glue import get_task, primary_metric

ROOT = Path(__file__).resolve().parent
PHASES = ("dynabertw", "dynabert", "final_finetuning")
TRAINED_DEPTHS = (0.5, 0.75)  # the depths < 1 that run_glue.sh trains; their plain baselines
STRATEGIES_JSON = "seed{seed}/strategies/strategies.json"  # compare_strategies.py's output, under the run folder


def strategies_sources(value: str) -> list[tuple[int | None, str]]:
    """--strategies_json: (seed or None, path) of each item: SEED=PATH for one seed, or a path template
    holding {seed} (and optionally {task}) for every seed."""
    sources = []
    for item in comma_items(value):
        seed, sep, path = item.partition("=")
        if sep and seed.isdigit():
            sources.append((int(seed), path))
        elif "{seed}" in item:
            sources.append((None, item))
        else:
            raise argparse.ArgumentTypeError(f"'{item}' is neither SEED=PATH nor a path holding {{seed}}")
    return sources


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = ArgumentParser(description=__doc__)
    a = parser.add_argument
    a("--task_name", default="SST-2", help="GLUE task.")
    a("--profile", choices=run_profile.profile_names(), default="quick",
      help="run_glue.sh's profile (configs/<profile>.json; docs/profiles.md).")
    a("--seeds", type=int_list, default=[1, 2, 3], help="Comma list of seeds.")
    a("--data_dir", default=None, help="Task folder (default: data/<task> as the shell scripts).")
    a("--model_dir", default=None, help="Pretrained BERT (default: the embedded model, as the shell scripts).")
    a("--output_root", default="outputs/reproduce", help="Where the runs go (<root>/<task>_<profile>/...).")
    a("--docs_dir", default=None,
      help="Where the JSON, Markdown and PNG summaries go (default: --output_root, next to the runs; pass "
           "docs/reproduce to replace the shipped results).")
    a("--tag", default="", help="Suffix of the run folders and summary names, to keep variants apart.")
    a("--no_ablations", action="store_true",
      help="Skip the no-grafting ablation (the quick profile never runs it: its 1-epoch width stage does not graft).")
    a("--no_baselines", action="store_true", help="Skip the plain first-layers baselines.")
    a("--gate_args", default="",
      help="Extra arguments of the gate training (one string, e.g. '--gate_loss every_width').")
    a("--no_strategies", action="store_true", help="Skip compare_strategies.py on each seed's gated model.")
    a("--strategies_args", default="--halvings 20 --shuffles 2",
      help="Arguments of compare_strategies.py (one string; --max_seq_length defaults to the profile's).")
    a("--strategies_json", type=strategies_sources, default=[],
      help="Where else each seed's strategies.json is (comma list, the first existing wins, then "
           f"<run folder>/{STRATEGIES_JSON}; relative to the repository, as --output_root): SEED=PATH, or a "
           "template such as 'runs/strategies/{task}_seed{seed}/strategies.json'. A seed found there is not "
           "compared again.")
    a("--summarize_only", action="store_true", help="Do not run anything; summarise the finished runs.")
    a("--note", default="", help="A sentence recorded in the summaries (e.g. which code version ran).")
    args = parser.parse_args(argv)
    args.run_glue_args = extra
    get_task(args.task_name)
    return args


# ---- running --------------------------------------------------------------------------------------------------
def run_folder(args: argparse.Namespace) -> Path:
    return ROOT / args.output_root / f"{args.task_name}_{args.profile}{args.tag}"


def shell(script: str, env: dict[str, str], *script_args: str) -> None:
    print(f"\n>>> {' '.join(f'{k}={v}' for k, v in env.items())} bash {script} {' '.join(script_args)}", flush=True)
    proc = subprocess.run(["bash", str(ROOT / script), *script_args], env={**os.environ, **env}, cwd=ROOT)
    if proc.returncode:
        raise CLIError(f"{script} failed (exit {proc.returncode}) with {env}; rerun to continue where it stopped")


def base_env(args: argparse.Namespace, out_dir: Path) -> dict[str, str]:
    env = {"TASK": args.task_name, "OUT_DIR": str(out_dir), "PROFILE": args.profile, "PYTHON": sys.executable}
    if args.data_dir:
        env["DATA_DIR"] = args.data_dir
    if args.model_dir:
        env["BERT_DIR"] = args.model_dir
    return env


def truncated_model(args: argparse.Namespace, num_layers: int, folder: Path) -> Path:
    """The pretrained model's first `num_layers` layers as a model folder: config edited, the weights of the
    later layers dropped (a folder whose weights hold more layers than its config is refused on loading), the
    other files (tokenizer, 1_Pooling/ with the model's pooling) linked."""
    from safetensors.torch import load_file, save_file

    weights_file = folder / "model.safetensors"
    if (folder / "config.json").is_file() and weights_file.is_file() and not weights_file.is_symlink():
        return folder  # (an older version linked the full model's weights: rebuilt)
    if weights_file.is_symlink():
        weights_file.unlink()
    source = Path(args.model_dir or subprocess.run(
        ["bash", "-c", "source pipeline_env.sh && echo $BERT_DIR"], cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "PYTHON": sys.executable}).stdout.strip())
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = num_layers
    folder.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        target = folder / item.name
        if item.name not in ("config.json", "model.safetensors") and not target.exists():
            target.symlink_to(item.resolve())
    weights = {k: v for k, v in load_file(str(source / "model.safetensors")).items()
               if (layer := re.search(r"(?:^|\.)encoder\.layer\.(\d+)\.", k)) is None or int(layer[1]) < num_layers}
    save_file(weights, str(folder / "model.safetensors.tmp"), metadata={"format": "pt"})
    os.replace(folder / "model.safetensors.tmp", folder / "model.safetensors")
    write_json(folder / "config.json", config)  # last: its presence marks a finished folder
    return folder


def width_stage_grafts(profile: str) -> bool:
    """Whether the profile's width stage grafts: with --graft_during_training and at least 2 epochs (grafting
    never fires in the last epoch, SPEC), so that a no-grafting rerun differs (the quick profile's 1-epoch width
    stage runs without it: a rerun would repeat the run bit for bit)."""
    width = run_profile.load_profile(profile)["stages"]["width"]
    return bool(width.get("graft")) and float(width["num_train_epochs"]) >= 2


def run_all(args: argparse.Namespace) -> None:
    root = run_folder(args)
    gate_args = args.gate_args.split()
    ablate = not args.no_ablations and width_stage_grafts(args.profile)
    if not args.no_ablations and not ablate:
        print(f"reproduce.py: no no-grafting ablation in the {args.profile} profile (its width stage never grafts)")
    for seed in args.seeds:
        out = root / f"seed{seed}"
        env = base_env(args, out)
        seed_args = ["--seed", str(seed), *args.run_glue_args]
        shell("run_glue.sh", env, *seed_args)
        shell("train_glue.sh", env, "--seed", str(seed), *gate_args)
        shell("gate_inference.sh", env, "--seed", str(seed))
        if ablate:
            shell("run_glue.sh", {**base_env(args, root / f"seed{seed}_no_graft"), "TEACHER_DIR": str(out / "teacher"),
                                  "GRAFT": "0", "STAGES": "width depth final"}, *seed_args)
        if not args.no_strategies:
            run_strategies(args, seed, out)
        if not args.no_baselines:
            num_layers = read_config_layers(out / "teacher")
            for depth in TRAINED_DEPTHS:
                n = rnd(depth, num_layers)
                model = truncated_model(args, n, root / f"pretrained_first_{n}_layers")
                shell("run_glue.sh", {**base_env(args, root / f"seed{seed}_plain_{n}_layers"), "BERT_DIR": str(model),
                                      "STAGES": "teacher"}, *seed_args)


def run_strategies(args: argparse.Namespace, seed: int, out: Path) -> None:
    """compare_strategies.py on the seed's gated model, unless --strategies_json names a file for the seed, or
    the seed's strategies.json was made by the same command after the model's last change."""
    model, result = out / "wd_bert_gates", out / "strategies" / "strategies.json"
    command = [sys.executable, str(ROOT / "compare_strategies.py"), "--model_dir", str(model),
               "--task_name", args.task_name, "--data_dir", args.data_dir or f"data/{args.task_name}",
               "--output_dir", str(result.parent),
               "--max_seq_length", str(run_profile.load_profile(args.profile)["max_seq_length"]),
               *args.strategies_args.split()]
    found = strategies_files(args).get(seed)
    if found not in (None, result) or (found and made_after(result, model, " ".join(command[1:]))):
        print(f"reproduce.py: reusing {found}", flush=True)
        return
    print(f"\n>>> {' '.join(command)}", flush=True)
    if subprocess.run(command, cwd=ROOT).returncode:
        raise CLIError(f"compare_strategies.py failed on {model}; rerun to continue where it stopped")


def made_after(result: Path, model: Path, command: str) -> bool:
    """Whether compare_strategies.py's `result` was written by `command` (its arguments) after every file of
    `model` (a retrained or replaced model, or other arguments, make it stale)."""
    newest = max((p.stat().st_mtime for p in model.iterdir()), default=0) if model.is_dir() else float("inf")
    try:
        return result.stat().st_mtime >= newest and json.loads(result.read_text(encoding="utf-8"))["command"] == command
    except (OSError, ValueError, KeyError, TypeError):  # unreadable or not compare_strategies.py's: made again
        return False


def read_config_layers(model_dir: Path) -> int:
    return json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]


def rnd(mult: float, total: int) -> int:
    from transformers_ext.modeling_flexbert import _rnd

    return _rnd(mult, total)


# ---- summarising -----------------------------------------------------------------------------------------------
def subnet_name(key: str) -> str:
    """run_glue's 'd0.75_w0.5' -> the summary's 'w0.5_d0.75'."""
    depth, width = key[1:].split("_w")
    return f"w{width}_d{depth}"


def stage_scores(folder: Path, phase: str, metric: str) -> dict[str, float]:
    path = folder / f"eval_results_{phase}.json"
    if not path.is_file():
        return {}
    best = json.loads(path.read_text())["best"]
    return {subnet_name(k): v[metric] for k, v in best.items()}


def collect(per_seed: list[dict[str, float]]) -> dict[str, dict]:
    keys = [k for k in per_seed[0] if all(k in s for s in per_seed)] if per_seed else []
    return {k: spread([s[k] for s in per_seed]) for k in keys}


def summarize(args: argparse.Namespace) -> dict:
    root = run_folder(args)
    metric = primary_metric(args.task_name)
    seeds = [s for s in args.seeds if (root / f"seed{s}" / "inference").is_dir()]
    strategies = strategies_files(args)
    if not seeds and not strategies:
        raise CLIError(f"no finished seed under {root} and no strategies.json (--strategies_json)")
    stage_dirs = {"dynabertw": "w_bert", "dynabert": "wd_bert", "final_finetuning": "wd_bert"}
    stages = {p: collect([stage_scores(root / f"seed{s}" / d, p, metric) for s in seeds])
              for p, d in stage_dirs.items()}
    stages["teacher"] = collect([stage_scores(root / f"seed{s}" / "teacher", "finetuning", metric) for s in seeds])

    modes, gaps = {}, {}
    # inference/ is the pipeline's; inference_<variant>/ (e.g. gates trained another way on the same backbone)
    # are listed as "<variant>:<run>"
    folders = sorted({p.name for s in seeds for p in (root / f"seed{s}").glob("inference*") if p.is_dir()})
    runs = sorted({(f, p.parent.name) for s in seeds for f in folders
                   for p in (root / f"seed{s}" / f).glob("*/inference_results.json")})
    for folder, name in runs:
        run = name if folder == "inference" else f"{folder.removeprefix('inference_')}:{name}"
        reports = [root / f"seed{s}" / folder / name / "inference_results.json" for s in seeds]
        reports = [json.loads(r.read_text())["results"] for r in reports if r.is_file()]
        if len(reports) == len(seeds):
            modes[run] = {"score": spread([r[metric] for r in reports]),
                          "rel_flops": spread([r["relative_flops"] for r in reports])}
            if all("latency_ms_per_example" in r for r in reports):
                modes[run]["ms_per_example"] = spread([r["latency_ms_per_example"] for r in reports])
    for batch in sorted({r.rsplit("_b", 1)[1] for r in modes}):
        static = [r for r in modes if r.startswith("static_") and r.endswith(f"_b{batch}")]
        for run in (r for r in modes if not r.split(":")[-1].startswith("static_") and r.endswith(f"_b{batch}")):
            per_seed = []
            for i in range(len(seeds)):
                points = [(modes[r]["rel_flops"]["values"][i], modes[r]["score"]["values"][i]) for r in static]
                edge = frontier_at(points, modes[run]["rel_flops"]["values"][i])
                if edge is not None:
                    per_seed.append(modes[run]["score"]["values"][i] - edge)
            if len(per_seed) == len(seeds):
                gaps[run] = spread(per_seed)

    baselines = {"plain_full_model": stages["teacher"].get("w1_d1")}
    for n in sorted({int(p.name.split("_")[2]) for p in root.glob("seed*_plain_*_layers")}):
        found = collect([stage_scores(root / f"seed{s}_plain_{n}_layers" / "teacher", "finetuning", metric)
                         for s in seeds if (root / f"seed{s}_plain_{n}_layers" / "teacher").is_dir()])
        if "w1_d1" in found:
            baselines[f"plain_first_{n}_layers"] = found["w1_d1"]
    ablations = {"no_graft": {p: collect([stage_scores(root / f"seed{s}_no_graft" / stage_dirs[p], p, metric)
                                          for s in seeds if (root / f"seed{s}_no_graft").is_dir()])
                              for p in PHASES}}
    graft_effect = {}  # paired per seed: with grafting - without, for every subnet of every stage
    no_graft = [s for s in seeds if (root / f"seed{s}_no_graft").is_dir()]
    for phase in PHASES:
        pairs = [(stage_scores(root / f"seed{s}" / stage_dirs[phase], phase, metric),
                  stage_scores(root / f"seed{s}_no_graft" / stage_dirs[phase], phase, metric)) for s in no_graft]
        keys = [k for k in (pairs[0][0] if pairs else {}) if all(k in a and k in b for a, b in pairs)]
        graft_effect[phase] = {k: spread([a[k] - b[k] for a, b in pairs]) for k in keys}
    return {"task": args.task_name, "profile": args.profile, "seeds": seeds, "metric": metric, "note": args.note,
            "shared_teacher": False, "run_glue_args": args.run_glue_args, "gate_args": args.gate_args,
            "stages": stages, "modes": modes, "dynamic_gap_over_static_frontier": gaps,
            "baselines": baselines, "ablations": ablations, "graft_effect": graft_effect,
            "calibration": calibration_summary(root, seeds), "gate_routing": routing_summary(root, seeds),
            "strategies": strategies_summary(strategies, get_task(args.task_name).name) if strategies else None}


def calibration_summary(root: Path, seeds: list[int]) -> dict:
    """Per calibration run (a `calibrated*` folder under seed<S>/inference or seed<S>) and objective: on the
    reporting half, the chosen setting's score and FLOPs, its score minus the best static subnet's at equal
    or higher FLOPs (issue 20's criterion: >= -0.005), and minus the static frontier interpolated at its FLOPs
    on the same half (issue 17's comparison, with the setting chosen on data the score does not use)."""
    out = {}
    for name in sorted({p.parent.name for s in seeds for p in (root / f"seed{s}").glob("**/calibrated*/"
                                                                                        "calibration_results.json")}):
        files = [next((root / f"seed{s}").glob(f"**/{name}/calibration_results.json"), None) for s in seeds]
        if any(f is None for f in files):
            continue
        results = [json.loads(f.read_text()) for f in files]
        per_seed = [r["objectives"] for r in results]
        statics = [[(v["relative_flops"], v["score"]) for v in r.get("static_reporting", {}).values()]
                   for r in results]
        out[name] = {objective: {
            "reporting_score": spread([r[objective]["reporting"]["score"] for r in per_seed]),
            "reporting_rel_flops": spread([r[objective]["reporting"]["relative_flops"] for r in per_seed]),
            "minus_best_static_at_or_above": spread(gaps) if len(gaps := [
                r[objective]["reporting"]["score"] - r[objective]["best_static_at_or_above_reporting_flops"]["score"]
                for r in per_seed if r[objective].get("best_static_at_or_above_reporting_flops")]) == len(per_seed)
            else None,  # no static subnet costs as much (or --no_static_baselines)
            "gap_over_static_frontier": spread(gaps) if len(gaps := [
                r[objective]["reporting"]["score"] - edge for r, points in zip(per_seed, statics, strict=True)
                if (edge := frontier_at(points, r[objective]["reporting"]["relative_flops"])) is not None])
            == len(per_seed) else None,
        } for objective in per_seed[0]}
    return out


def routing_summary(root: Path, seeds: list[int]) -> dict:
    """Routing entropy (nats) per gate of each gate folder (`wd_bert_gates*`), from gate_results.json."""
    out = {}
    for name in sorted({p.parent.name for s in seeds for p in (root / f"seed{s}").glob("wd_bert_gates*/"
                                                                                        "gate_results.json")}):
        reports = [json.loads((root / f"seed{s}" / name / "gate_results.json").read_text()).get("routed_dev", {})
                   for s in seeds if (root / f"seed{s}" / name / "gate_results.json").is_file()]
        entropies = [r["routing_entropy"] for r in reports if "routing_entropy" in r]
        if len(entropies) == len(seeds):
            out[name] = [spread([e[g] for e in entropies]) for g in range(len(entropies[0]))]
    return out


# ---- strategies over seeds ------------------------------------------------------------------------------------
def strategies_files(args: argparse.Namespace) -> dict[int, Path]:
    """Each seed's strategies.json: the first existing of --strategies_json's, else the run folder's."""
    found = {}
    for seed in args.seeds:
        candidates = [ROOT / path.replace("{seed}", str(seed)).replace("{task}", args.task_name)
                      for only, path in args.strategies_json if only in (None, seed)]
        candidates.append(run_folder(args) / STRATEGIES_JSON.format(seed=seed))
        if path := next((c for c in candidates if c.is_file()), None):
            found[seed] = path
    return found


def read_strategies(path: Path, task: str) -> dict:
    """What the summary uses of one compare_strategies.py strategies.json, its shape checked: budgets; per
    strategy and budget the mean gap, the gap's std over halvings, the reporting score and FLOPs (None where
    no setting fits the budget); the oracles; the static subnets' (FLOPs, score) on the reporting halves,
    averaged over halvings (None when the file was saved without its per-halving choices)."""
    with reading(path):
        result = json.loads(path.read_text(encoding="utf-8"))
    try:
        if result["task"] != task:
            raise CLIError(f"{path}: strategies of {result['task']}, not {task}")
        budgets = [str(float(b)) for b in result["budgets"]]
        cells = {name: {b: None if (c := per_budget[b]) is None else {
            "gap": float(c["gap"]["mean"]), "halving_std": float(c["gap"]["std"]), "halvings": int(c["halvings"]),
            "score": float(c["reporting_score"]["mean"]), "flops": float(c["reporting_flops"]["mean"])}
            for b in budgets} for name, per_budget in result["summary"].items()}
        halvings = [h["static_reporting"] for h in result.get("per_halving") or []]
        static = [tuple(statistics.fmean(float(h[k][i]) for h in halvings) for i in (0, 1))
                  for k in range(len(halvings[0]))] if halvings else None
        return {"budgets": budgets, "cells": cells, "oracles": dict(result.get("oracles") or {}), "static": static}
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
        raise CLIError(f"{path}: not a valid strategies.json ({type(err).__name__}: {err})") from None


ORACLE_CONSTANTS = ("paths", "noise_samples", "noise_width")  # what the oracles were made of, not scores


def oracle_summary(oracles: dict[int, dict]) -> dict:
    """Each oracle's score over the seeds that have oracles (classification): mean +- std over seeds; for the
    oracles that are themselves a spread (one dropout sample, K random paths), of their means."""
    found = {seed: o for seed, o in oracles.items() if o}
    if not found:
        return {}
    out = {"seeds": list(found)}
    for key in (k for k in next(iter(found.values())) if all(k in o for o in found.values())):
        values = [o[key] for o in found.values()]
        if key in ORACLE_CONSTANTS:
            out[key] = values[0] if len(set(values)) == 1 else values
        else:
            out[key] = spread([v["mean"] if isinstance(v, dict) else v for v in values])
    return out


def strategies_summary(files: dict[int, Path], task: str) -> dict:
    """Per strategy and budget, over seeds: each seed's mean gap over its halvings, mean +- sample std over
    seeds ('seeds': which seeds had a setting within the budget; 'halving_std': the std over halvings,
    averaged over those seeds); the best strategy per budget by mean gap among those every seed has; the
    oracles; the static subnets on the reporting halves (mean +- std over seeds, for the plot)."""
    per_seed = {seed: read_strategies(path, task) for seed, path in files.items()}
    first = next(iter(files))
    for seed, result in per_seed.items():
        if result["budgets"] != per_seed[first]["budgets"]:
            raise CLIError(f"{files[seed]}: budgets {','.join(result['budgets'])} differ from {files[first]}'s "
                           f"{','.join(per_seed[first]['budgets'])}")
    budgets = per_seed[first]["budgets"]
    names = list(dict.fromkeys(name for result in per_seed.values() for name in result["cells"]))
    gaps = {}
    for name in names:
        gaps[name] = {}
        for b in budgets:
            found = {seed: c for seed, r in per_seed.items() if (c := r["cells"].get(name, {}).get(b))}
            gaps[name][b] = None if not found else {
                "gap": spread([c["gap"] for c in found.values()]), "seeds": list(found),
                "halving_std": statistics.fmean(c["halving_std"] for c in found.values()),
                "halvings": [c["halvings"] for c in found.values()],
                "reporting_score": spread([c["score"] for c in found.values()]),
                "reporting_flops": spread([c["flops"] for c in found.values()])}
    best = {}
    for b in budgets:
        complete = [name for name in names if gaps[name][b] and len(gaps[name][b]["seeds"]) == len(per_seed)]
        winner = max(complete, key=lambda name: gaps[name][b]["gap"]["mean"], default=None)
        best[b] = None if winner is None else {"strategy": winner, "gap": gaps[winner][b]["gap"]}
    statics = [r["static"] for r in per_seed.values()]
    static = None if any(s is None or len(s) != len(statics[0]) for s in statics) else [
        {"rel_flops": spread([s[k][0] for s in statics]), "score": spread([s[k][1] for s in statics])}
        for k in range(len(statics[0]))]
    return {"seeds": list(per_seed), "files": {str(seed): str(path) for seed, path in files.items()},
            "budgets": budgets, "std": "sample std over seeds of each seed's mean gap over its halvings",
            "gap_over_static_frontier": gaps, "best": best,
            "oracles": oracle_summary({seed: r["oracles"] for seed, r in per_seed.items()}),
            "static_reporting": static}


def fmt(s: dict | None, digits: int = 3) -> str:
    return "-" if not s else f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def markdown(summary: dict) -> str:
    if not summary["seeds"]:  # no pipeline run here: only strategies.json files made elsewhere
        note = [summary["note"], ""] if summary.get("note") else []
        return "\n".join([f"# {summary['task']}, {summary['profile']} profile: strategies, {summary['metric']}", "",
                          *note, *strategies_markdown(summary["strategies"])]) + "\n"
    widths, depths = ["1", "0.75", "0.5", "0.25"], ["1", "0.75", "0.5"]
    lines = [f"# {summary['task']}, {summary['profile']} profile: {len(summary['seeds'])} seeds "
             f"({', '.join(map(str, summary['seeds']))}), {summary['metric']}, mean ± std",
             "", f"run_glue.py extra arguments: `{' '.join(summary['run_glue_args']) or 'none'}`; gate training: "
             f"`{summary['gate_args'] or 'default'}`. Each seed trains its own teacher. {summary.get('note', '')}",
             "",
             "| stage | depth | " + " | ".join(f"w={w}" for w in widths) + " |", "|---|---|" + "---|" * len(widths)]
    width_stage = "width (grafting)" if width_stage_grafts(summary["profile"]) else "width (1 epoch: no graft fires)"
    named = [(width_stage, "dynabertw"), ("depth", "dynabert"), ("final", "final_finetuning")]
    named += [(f"no grafting: {n}", p) for n, p in (("width", "dynabertw"), ("depth", "dynabert"),
                                                     ("final", "final_finetuning"))]
    for i, (name, phase) in enumerate(named):
        table = summary["stages"][phase] if i < 3 else summary["ablations"]["no_graft"].get(phase, {})
        for d in depths:
            cells = [fmt(table.get(f"w{w}_d{d}")) for w in widths]
            if any(c != "-" for c in cells):
                lines.append(f"| {name} | {d} | " + " | ".join(cells) + " |")
    effect = summary.get("graft_effect", {})
    if any(effect.values()):
        lines += ["", "| grafting - no grafting (paired per seed) | depth | " + " | ".join(f"w={w}" for w in widths)
                  + " |", "|---|---|" + "---|" * len(widths)]
        for name, phase in named[:3]:
            for d in depths:
                cells = [fmt(effect.get(phase, {}).get(f"w{w}_d{d}")) for w in widths]
                if any(c != "-" for c in cells):
                    lines.append(f"| {name} | {d} | " + " | ".join(cells) + " |")
    lines += ["", "| baseline | score |", "|---|---|"]
    lines += [f"| {k} | {fmt(v)} |" for k, v in summary["baselines"].items()]
    lines += ["", "| inference run | score | relative FLOPs | ms/example | gap over static frontier |",
              "|---|---|---|---|---|"]
    for run, m in summary["modes"].items():
        gap = summary["dynamic_gap_over_static_frontier"].get(run)
        lines.append(f"| {run} | {fmt(m['score'])} | {fmt(m['rel_flops'])} | {fmt(m.get('ms_per_example'), 2)} | "
                     f"{fmt(gap) if gap else ''} |")
    for name, objectives in summary.get("calibration", {}).items():
        lines += ["", f"| calibration `{name}`, reporting half | score | relative FLOPs | minus best static at >= "
                  "FLOPs | gap over static frontier |", "|---|---|---|---|---|"]
        lines += [f"| {o} | {fmt(v['reporting_score'])} | {fmt(v['reporting_rel_flops'])} | "
                  f"{fmt(v['minus_best_static_at_or_above'])} | {fmt(v.get('gap_over_static_frontier'))} |"
                  for o, v in objectives.items()]
    if summary.get("gate_routing"):
        lines += ["", "| gates | routing entropy per gate on dev (nats) |", "|---|---|"]
        lines += [f"| {name} | {' / '.join(fmt(e, 2) for e in per_gate)} |"
                  for name, per_gate in summary["gate_routing"].items()]
    if summary.get("strategies"):
        lines += [""] + strategies_markdown(summary["strategies"])
    return "\n".join(lines) + "\n"


def strategies_markdown(s: dict) -> list[str]:
    seeds, budgets = s["seeds"], s["budgets"]

    def gap(g: dict) -> str:  # one seed has no std over seeds
        return f"{g['mean']:+.3f}" + (f" ± {g['std']:.3f}" if len(g["values"]) > 1 else "")

    def cell(v: dict | None) -> str:
        if v is None:
            return "—"
        partial = "" if len(v["seeds"]) == len(seeds) else f" ({len(v['seeds'])} seeds)"
        return f"{gap(v['gap'])} [{v['halving_std']:.3f}]{partial}"

    halvings = sorted({n for per in s["gap_over_static_frontier"].values() for v in per.values() if v
                       for n in v["halvings"]})
    lines = [f"Gap over the static frontier per strategy: chosen on the calibration half of dev at each FLOPs "
             f"budget, scored on the reporting half ({'/'.join(map(str, halvings))} halvings per seed), "
             f"{len(seeds)} seeds ({', '.join(map(str, seeds))}). Each seed's mean over its halvings, then mean "
             "± sample std over seeds; in brackets the std over halvings, averaged over seeds; — where no "
             "setting fits the budget.", "",
             "| strategy | " + " | ".join(f"FLOPs ≤ {b}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    lines += [f"| {name} | " + " | ".join(cell(per[b]) for b in budgets) + " |"
              for name, per in s["gap_over_static_frontier"].items()]
    lines.append("| **best by mean gap** | " + " | ".join(
        "—" if (w := s["best"][b]) is None else f"{w['strategy']}: {gap(w['gap'])}"
        for b in budgets) + " |")
    o = s["oracles"]
    if o:
        k = o.get("noise_samples")
        rows = [("full model", o.get("full_model")), (f"any of the {o.get('paths')} fixed paths right",
                                                     o.get("path_oracle")),
                (f"any of {k} random paths of them", o.get(f"path_oracle_{k}_random_paths")),
                (f"any of {k} dropout samples of w{o.get('noise_width')} d1 right (noise oracle)",
                 o.get("noise_oracle")), ("one dropout sample", o.get("noise_sample_accuracy"))]
        lines += ["", f"| oracle on all of dev ({len(o['seeds'])} seeds, mean ± std) | score |", "|---|---|"]
        lines += [f"| {name} | {fmt(v)} |" for name, v in rows if v]
    return lines


def plot(summary: dict, path: Path) -> None:
    """The pipeline's runs on all of dev: static subnets and dynamic modes, mean +- std over seeds; the plain
    baselines as horizontal lines."""
    own = [r for r in summary["modes"] if ":" not in r]  # the pipeline's own runs, not the variants
    if not own:
        return
    batch = min(r.rsplit("_b", 1)[1] for r in own)
    series = []
    for kind, marker in (("static", "o"), ("dynamic", "s")):
        runs = [summary["modes"][r] for r in own
                if r.endswith(f"_b{batch}") and r.startswith("static_") == (kind == "static")]
        series.append({"label": kind, "marker": marker, **error_bars(runs, "rel_flops", "score")})
    plot_tradeoff.plot_series(series, path, f"{summary['task']} {summary['profile']}: {len(summary['seeds'])} seeds, "
                              "mean ± std", summary["metric"],
                              {k.replace("_", " "): v["mean"] for k, v in summary["baselines"].items() if v})


def error_bars(points: list[dict], flops: str, score: str) -> dict:
    """plot_tradeoff.plot_series's x, y, xerr, yerr from each point's `flops` and `score` spreads over seeds."""
    return {axis: [p[key][stat] for p in points] for axis, key, stat in (
        ("x", flops, "mean"), ("y", score, "mean"), ("xerr", flops, "std"), ("yerr", score, "std"))}


STRATEGY_MARKERS = {"static": "o", "mixed": "v", "cascade": "P", "gates": "*", "shuffled": "x", "d_dynamic": "D"}


def plot_strategies(summary: dict, path: Path) -> None:
    """Every strategy's choice at every budget on the reporting halves (each seed's mean over its halvings,
    mean +- std over seeds), with the static subnets and their frontier on the same halves where the
    strategies.json files hold their per-halving results: every series measured on the same examples."""
    s = summary["strategies"]
    series = []
    if static := s["static_reporting"]:
        points = [(p["rel_flops"]["mean"], p["score"]["mean"]) for p in static]
        xs = sorted({x for x, _ in points})
        series += [{"label": "every static subnet", "marker": "o", **error_bars(static, "rel_flops", "score")},
                   {"label": "static frontier (their upper envelope)", "marker": "", "ls": "--", "x": xs,
                    "y": [frontier_at(points, x) for x in xs]}]
    for name, per_budget in s["gap_over_static_frontier"].items():
        chosen = [v for v in per_budget.values() if v]
        if chosen:
            family = next((k for k in STRATEGY_MARKERS if name.startswith(k)), "static")
            series.append({"label": name, "marker": STRATEGY_MARKERS[family],
                           "ls": "--" if name == "static subnet" else "none",
                           **error_bars(chosen, "reporting_flops", "reporting_score")})
    plot_tradeoff.plot_series(series, path, f"{summary['task']} {summary['profile']}: strategies chosen per FLOPs "
                              f"budget, reporting halves, {len(s['seeds'])} seeds", summary["metric"])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not args.summarize_only:
        run_all(args)
    summary = summarize(args)
    docs = ROOT / (args.docs_dir or args.output_root)
    docs.mkdir(parents=True, exist_ok=True)
    name = f"{args.task_name}_{args.profile}{args.tag}"
    write_json(docs / f"{name}.json", summary)
    text = markdown(summary)
    write_text(docs / f"{name}.md", text)
    plot(summary, docs / f"{name}.png")
    if summary["strategies"]:
        plot_strategies(summary, docs / f"{name}_strategies.png")
    print(text)


if __name__ == "__main__":
    run_cli(main)
