"""The README's entry point for width-dynamic (--w_dynamic) and width+depth-dynamic (--wd_dynamic --early_exit)
inference: without --calibrate it is train_gate.py (the reference runs every mode through train_gate.py).

--calibrate chooses the setting (the gates' class -> width map and exit threshold, transformers_ext/calibration.py;
a static subnet or a confidence cascade of them, calibration_candidates.py: --calibration_strategies) for
--flops_budget B (the best score at <= B of the full model's FLOPs) and/or --max_drop D (the fewest FLOPs within
D of the full model's score), each a comma list, on a calibration split, and reports the choice on examples it
did not see: a seeded half of dev (GLUE's or --validation_file) chooses and the other half reports, or the
labelled --calibration_file chooses and all of dev reports. Written into --output_dir: per objective
<objective>/inference_config.json (for --config) and its inference on the reporting half (and on all of dev,
labelled); calibration_results.json, calibration_pareto.csv (every candidate's Pareto front on the calibration
split, for plot_tradeoff.py), calibration_split.json (the halves' dev positions), static_reporting/ (subnets).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from torch.utils.data import TensorDataset

import cli
import routed_inference
import train_gate
import utils_glue
from cli import CLIError
from routed_inference import load_inference_data, run_inference, static_depth_reports
from transformers_ext import calibration_report as report
from transformers_ext.calibration import Calibrator, Objective, monotone_maps, scorable, search_space, split_indices
from transformers_ext.calibration_candidates import check_strategies, static_points, strategy_candidates
from transformers_ext.environment import set_seed
from transformers_ext.files import write_json, write_text
from transformers_ext.inference import DEFAULT_EXIT_THRESHOLD
from transformers_ext.loading import load_model
from transformers_ext.routing import MODES, routing_defaults, trained_depths

RESULTS_FILE, PARETO_FILE, SPLIT_FILE = "calibration_results.json", "calibration_pareto.csv", "calibration_split.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = train_gate.build_parser(__doc__)
    cli.add_calibration_args(parser)
    return utils_glue.setup_custom_task(cli.finish_training_args(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> dict | None:
    """`python train_gate_new.py ...`: the calibration (its results) with --calibrate, else train_gate.main."""
    args = parse_args(argv)
    if not args.calibrate:
        given = [f"--{dest}" for dest, default in cli.calibration_flags([]).items() if getattr(args, dest) != default]
        if given:
            raise CLIError(f"{given[0]} needs --calibrate")
        return train_gate.main(argv)
    cli.setup_logging(0)
    spec, objectives = check_calibration_args(args)
    device, _, _ = cli.setup_run_device(args)
    set_seed(args.seed)
    model, tokenizer = load_model(args.model_dir, spec, **cli.model_options(args))
    return run_calibration(args, spec, objectives, model, tokenizer, device)


def check_calibration_args(args: argparse.Namespace) -> tuple[utils_glue.TaskSpec, list[Objective]]:
    """(task, objectives) of a calibration, every flag checked before the model is loaded."""
    spec = cli.validate_task_args(args)
    conflicts = [f"--{m}" for m in MODES if getattr(args, m)] + [flag for flag, given in (
        ("--do_train", args.do_train), ("--config", args.config), ("--early_exit", args.early_exit),
        ("--fixed_gate", args.fixed_gate is not None), ("--cascade", args.cascade is not None),
        ("--exit_threshold", args.exit_threshold is not None)) if given]
    if conflicts:
        raise CLIError(f"--calibrate chooses the mode, widths and threshold itself; drop {conflicts[0]}")
    objectives = [Objective("flops_budget", b) for b in args.flops_budget or []]
    objectives += [Objective("max_drop", d) for d in args.max_drop or []]
    if not objectives:
        raise CLIError("--calibrate needs --flops_budget B and/or --max_drop D")
    if len({o.name for o in objectives}) != len(objectives):
        raise CLIError("--flops_budget / --max_drop repeat a value")
    if args.calibration_config and len(objectives) > 1:
        raise CLIError("--calibration_config takes one objective; give one --flops_budget or --max_drop value")
    if not scorable(utils_glue.primary_metric(spec.name)):
        raise CLIError(f"--calibrate cannot score {spec.name}'s metric {utils_glue.primary_metric(spec.name)}")
    if spec.is_custom and spec.files.validation is None:
        raise CLIError("--calibrate reports on dev: pass --validation_file")
    if args.calibration_file is not None and not Path(args.calibration_file).is_file():
        raise CLIError(f"--calibration_file {args.calibration_file} does not exist")
    check_strategies(args.calibration_strategies, args.calibration_cascade_grid)
    return spec, objectives


def _run_args(args: argparse.Namespace, out_dir: Path, **settings) -> argparse.Namespace:
    """One train_gate.py inference run's flags: output into `out_dir`, the given routing flags, latency
    recorded, no test predictions."""
    a = argparse.Namespace(**vars(args))
    a.output_dir, a.do_eval, a.do_predict = str(out_dir), True, False
    a.early_exit, a.fixed_gate, a.config, a.exit_threshold = False, None, None, DEFAULT_EXIT_THRESHOLD
    a.record_gpu_time = a.record_gpu_time or not a.record_cpu_time
    vars(a).update({mode: False for mode in MODES} | settings)
    return a


def run_calibration(args: argparse.Namespace, spec: utils_glue.TaskSpec, objectives: list[Objective], model,
                    tokenizer, device, dev: dict[str, TensorDataset] | None = None) -> dict:
    """The calibration of a loaded model; `dev`: the dev splits' features when already loaded (the sweep's)."""
    metric, config = utils_glue.primary_metric(spec.name), model.config
    if model.gates is None:
        raise CLIError(f"--calibrate needs gates, but --model_dir {args.model_dir} has none "
                       "(train them with train_gate.py --do_train --training_phase traingate)")
    trained, start, grid = search_space(config, args.width_mult_list, args.calibration_grid)
    cli.validate_subnets(config, {"--calibration_grid": grid, "--width_mult_list": start}, {})
    _, off_ramps = routing_defaults(config, None, args.off_ramps)
    if any(not 0 <= i < config.num_hidden_layers for i in off_ramps):
        raise CLIError(f"--off_ramps {off_ramps} must be layers 0..{config.num_hidden_layers - 1}")
    dev = dev or load_inference_data(_run_args(args, Path(args.output_dir)), spec, tokenizer)
    dev = {s: dev[s] for s in utils_glue.split_names(spec.name, "dev")}  # MNLI: mismatched reported whole
    first, n_dev = next(iter(dev)), len(next(iter(dev.values())))
    if args.calibration_file is not None:
        path = Path(args.calibration_file)
        examples = utils_glue.read_custom_examples(spec, path) if spec.is_custom else \
            utils_glue.read_examples(spec, path, spec.train_header)
        cal_set = utils_glue.convert_examples_to_features(examples, tokenizer, args.max_seq_length, spec).tensors
        halves, split, reporting, rep_label = None, f"--calibration_file {path}", dev, f"all of dev ({n_dev} examples)"
        if len(examples) < 2:
            raise CLIError(f"--calibration_file {path} needs at least 2 examples")
    elif n_dev < 2:
        raise CLIError("--calibrate needs at least 2 dev examples to split")
    else:  # in-memory halves of dev's features; positions in file order, as predictions_dev.jsonl numbers them
        halves = dict(zip(("calibration", "reporting"), split_indices(n_dev, args.calibration_seed), strict=True))
        cal_set = [t[halves["calibration"]] for t in dev[first].tensors]
        reporting = {**dev, first: TensorDataset(*(t[halves["reporting"]] for t in dev[first].tensors))}
        split = f"seeded half of dev ({len(cal_set[0])} of {n_dev}, --calibration_seed {args.calibration_seed})"
        rep_label = f"reporting half of dev ({len(reporting[first])} examples not used for calibration)"

    out = Path(args.output_dir)  # input validated: from here on the output folder is written
    out.mkdir(parents=True, exist_ok=True)
    if halves is not None:
        write_text(out / SPLIT_FILE, json.dumps(halves) + "\n")
    model.to(device).eval()
    maps = len(monotone_maps(grid, len(trained)))
    bar = cli.progress(total=maps if maps <= args.calibration_max_exhaustive else None, leave=False,
                       desc=f"calibration maps ({len(cal_set[0])} examples)")
    calibrator = Calibrator(model, cal_set, metric, off_ramps, args.max_seq_length, args.calibration_batch_size,
                            device, progress=lambda *_: bar.update(1))
    reference = calibrator.full_model_score()
    depths = sorted(trained_depths(config))  # the backbone's trained depths
    others = strategy_candidates(model, calibrator.batches, calibrator.labels, metric, args.max_seq_length, trained,
                                 depths, args.calibration_strategies, args.calibration_cascade_grid)
    search = calibrator.search(grid, len(trained), objectives, start, reference, args.calibration_max_exhaustive,
                               args.within_se, others, gates="gates" in args.calibration_strategies)
    bar.close()
    front = calibrator.pareto(others)
    report.write_pareto(out / PARETO_FILE, front, metric)

    statics = {}  # the backbone's depths of a width from one pass
    for width in [] if args.no_static_baselines else trained:
        runs = {d: _run_args(args, out / "static_reporting" / f"static_w{width}_d{float(d)}", static=True,
                             width_mult_list=[width], depth_mult_list=[d]) for d in depths}
        reports = static_depth_reports(runs, spec, model, device, reporting)
        for d, a in runs.items():
            statics[Path(a.output_dir).name] = report.logged(reports[d].finish, Path(a.output_dir), metric, rep_label)
    if statics:  # the order of one run per subnet
        statics = {n: statics[n] for n in (f"static_w{w}_d{float(d)}" for d in depths for w in trained)}

    def run(folder: Path, config: Path, data: dict[str, TensorDataset], label: str) -> dict:
        a = _run_args(args, folder, width_mult_list=None, exit_threshold=None, config=str(config))
        routed_inference.apply_config_file(a, spec)  # the entry as train_gate.py --config applies it
        routed_inference.apply_saved_defaults(a, model)
        return report.logged(lambda: run_inference(a, spec, model, tokenizer, device, data), folder, metric, label)

    objectives_out = {}
    for objective in objectives:
        chosen, folder = search["chosen"][objective], out / objective.name
        folder.mkdir(exist_ok=True)
        config_entry = report.config_entry(chosen)
        record = report.choice_record(objective, chosen, metric, reference, len(cal_set[0]), split, off_ramps)
        report.write_config(folder / "inference_config.json", spec.name, config_entry, record)
        if args.calibration_config:
            report.write_config(Path(args.calibration_config), spec.name, config_entry, record, merge=True)
        reported = run(folder / "reporting", folder / "inference_config.json", reporting, rep_label)
        all_dev = None if halves is None else run(folder / "all_dev", folder / "inference_config.json", dev,
                                                  f"all of dev ({n_dev} examples, including the calibration half)")
        objectives_out[objective.name] = report.objective_results(
            objective, chosen, folder / "inference_config.json", reported, all_dev, statics)
    results = {"task": spec.name, "metric": metric, "model_dir": args.model_dir, "max_seq_length": args.max_seq_length,
               "calibration_split": split, "calibration_examples": len(cal_set[0]), "reporting": rep_label,
               "full_model_calibration_score": reference, "grid": grid, "start_map": list(start),
               "off_ramps": off_ramps, "strategies": args.calibration_strategies, **report.search_record(search),
               "pareto_points": len(front), "pareto_csv": str(out / PARETO_FILE), "objectives": objectives_out,
               "static_reporting": statics, "static_calibration": static_points(others)}
    write_json(out / RESULTS_FILE, results)
    print(report.format_results(results))
    return results


if __name__ == "__main__":
    cli.run_cli(main)
