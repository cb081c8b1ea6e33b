"""The README's entry point for width-dynamic (--w_dynamic) and width+depth-dynamic (--wd_dynamic
--early_exit) inference: without --calibrate it takes exactly train_gate.py's flags and runs the same code (the
reference ships no such file; its scripts run every mode through train_gate.py).

--calibrate chooses the class -> width map and the exit threshold for you (transformers_ext/calibration.py):
--flops_budget 0.5 (the best score at <= 50 % of the full model's FLOPs) and/or --max_drop 0.01 (the fewest
FLOPs within 0.01 of the full model's score), each a comma list. The choice is made on a calibration split
and reported on examples it did not see: by default a seeded half of dev chooses and the other half reports;
with --calibration_file the user's labelled split chooses and all of dev reports. Per objective it writes
<output_dir>/<objective>/inference_config.json (the format of best_tradeoff_inference_config.json, for
--config), then runs that setting with train_gate.py's inference on the reporting half (and on all of dev,
labelled as such). Also written: calibration_results.json, calibration_pareto.csv (the Pareto front of all
candidates on the calibration split; plot_tradeoff.py draws it), the two splits as data folders, and every
static subnet on the reporting half for comparison. All other flags are train_gate.py's (--task_name,
--data_dir, --model_dir, --output_dir, --max_seq_length, --per_gpu_eval_batch_size, --off_ramps, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import utils_glue
from cli import (
    NON_NEGATIVE,
    ArgumentParser,
    CLIError,
    model_options,
    multiplier_list,
    progress,
    run_cli,
    setup_logging,
    validate_subnets,
    validate_task_args,
)
from train_gate import (
    MODES,
    apply_config_file,
    load_inference_data,
    main,
    parse_args,
    run_inference,
    static_depth_reports,
)
from transformers_ext.calibration import (
    CONFUSION_METRICS,
    REGRESSION_METRICS,
    Calibrator,
    Objective,
    monotone_maps,
    split_indices,
)
from transformers_ext.files import write_json, write_text
from transformers_ext.inference import DEFAULT_EXIT_THRESHOLD
from transformers_ext.loading import load_model
from transformers_ext.routing import TRAINED_DEPTHS, routing_defaults
from transformers_ext.trainer import set_seed, setup_device

__all__ = ["calibrate", "calibration_parser", "entry", "main"]
logger = logging.getLogger("flexbert")
EXTRA_GRID = (0.55, 0.6, 0.65)  # untrained widths searched besides the trained ones (the reference's configs)
RESULTS_FILE = "calibration_results.json"
PARETO_FILE = "calibration_pareto.csv"
CALIBRATION_KEY = "calibration"  # top-level key of the written config files: task -> what the choice was made on
PARETO_COLUMNS = ["relative_flops", "score", "metric", "mode", "width_mult_list", "exit_threshold", "flops",
                  "relative_linear_flops", "mean_layers_executed"]


def _number_list(value: str) -> list[float]:
    try:
        items = [float(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a comma list of numbers") from None
    if not items or any(not x >= 0 for x in items):
        raise argparse.ArgumentTypeError(f"'{value}' must be a comma list of numbers >= 0")
    return items


def calibration_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="train_gate_new.py", add_help=False, allow_abbrev=False,
                            description="Calibration flags (all other flags: train_gate.py's, listed below).")
    a = parser.add_argument
    a("--calibrate", action="store_true",
      help="Choose the class -> width map and exit threshold on a calibration split (needs --flops_budget "
           "and/or --max_drop), then report the choice on examples it did not see.")
    a("--flops_budget", type=_number_list, default=None,
      help="Objective: the best score at relative FLOPs (true FLOPs / the full model's) <= B; a comma list "
           "gives one chosen setting per budget.")
    a("--max_drop", type=_number_list, default=None,
      help="Objective: the fewest FLOPs at a score >= the full model's score on the calibration split - D "
           "(in metric units: 0.01 = one point); a comma list gives one setting each.")
    a("--within_se", type=NON_NEGATIVE, default=1.0,
      help="FLOPs budgets: of the settings within the budget whose calibration score is at most this many "
           "standard errors below the best, take the one with the most FLOPs (0: the best score, ties to fewer "
           "FLOPs). On a few hundred calibration examples, differences below one standard error are noise.")
    a("--calibration_file", default=None,
      help="Labelled TSV in the task's dev format to calibrate on; the report then uses all of dev "
           "(default: a seeded half of dev calibrates, the other half reports).")
    a("--calibration_seed", type=int, default=42, help="Seed of the dev split into calibration/reporting halves.")
    a("--calibration_grid", type=multiplier_list, default=None,
      help="Widths a class may map to (default: the trained widths plus 0.55, 0.6, 0.65).")
    a("--calibration_max_exhaustive", type=int, default=256,
      help="Evaluate every monotone map when there are at most this many, else coordinate ascent.")
    a("--calibration_batch_size", type=int, default=64,
      help="Batch size of the calibration forwards (length-sorted, padding trimmed; results do not depend on it).")
    a("--calibration_config", default=None,
      help="Also merge the chosen entry into this JSON file (best_tradeoff_inference_config.json format); "
           "one objective only.")
    a("--no_static_baselines", action="store_true",
      help="Skip running every static subnet on the reporting split.")
    return parser


CALIBRATION_FLAGS = ("--flops_budget", "--max_drop", "--within_se", "--calibration_file", "--calibration_seed",
                     "--calibration_grid", "--calibration_max_exhaustive", "--calibration_batch_size",
                     "--calibration_config", "--no_static_baselines")


def entry(argv: list[str] | None = None) -> None:
    """`python train_gate_new.py ...`: calibration with --calibrate, else train_gate.main."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = calibration_parser()
    if any(a in ("-h", "--help") for a in argv):
        print(parser.format_help())
        main(["--help"])
        return
    own, rest = parser.parse_known_args(argv)
    if not own.calibrate:
        given = [f for f in CALIBRATION_FLAGS if any(a == f or a.startswith(f + "=") for a in argv)]
        if given:
            raise CLIError(f"{given[0]} needs --calibrate")
        main(rest)
        return
    calibrate(own, rest)


# ---- the splits ----------------------------------------------------------------------------------------------
def _dev_rows(spec, path: Path, max_examples: int | None) -> tuple[list[str], list[str]]:
    """(header lines, one raw line per example) of a dev-format TSV, validated by utils_glue's reader."""
    examples = utils_glue.read_examples(spec, path, spec.train_header)[:max_examples]
    lines = path.read_bytes().decode("utf-8-sig").split("\n")
    header = [next(line for line in lines if line.rstrip("\r"))] if spec.train_header else []
    return header, [lines[int(e.guid.rsplit("-", 1)[1]) - 1] for e in examples]


def _write_split(folder: Path, spec, data_dir: Path, header: list[str], rows: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_text(folder / spec.dev_files[0], "\n".join(header + rows) + "\n")
    for other in spec.dev_files[1:]:  # MNLI's mismatched dev set: reported whole (never calibrated on)
        if (data_dir / other).is_file():
            write_text(folder / other, (data_dir / other).read_text(encoding="utf-8-sig"))


# ---- inference runs through train_gate.run_inference ---------------------------------------------------------
def _inference_args(args, spec, data_dir: Path, out_dir: Path, max_eval: int | None, config: Path | None = None,
                    **settings) -> argparse.Namespace:
    """The flags of one train_gate.py inference run on `data_dir`, with the chosen `config` file applied as
    --config does, or the given flag values; latency always recorded."""
    a = argparse.Namespace(**vars(args))
    a.data_dir, a.output_dir, a.max_eval_samples = str(data_dir), str(out_dir), max_eval
    for mode in MODES:
        setattr(a, mode, False)
    a.early_exit, a.fixed_gate, a.config, a.exit_threshold, a.width_mult_list = False, None, None, None, None
    a.record_gpu_time = a.record_gpu_time or not a.record_cpu_time
    if config is not None:
        a.config = str(config)
        apply_config_file(a, spec)
    for key, value in settings.items():
        setattr(a, key, value)
    if a.exit_threshold is None:  # unused without early exit; inference validates it
        a.exit_threshold = DEFAULT_EXIT_THRESHOLD
    return a


def _inference(args, spec, model, tokenizer, device, data: FeatureCache, data_dir: Path, out_dir: Path,
               max_eval: int | None, config: Path | None = None, **settings) -> dict:
    """One train_gate.py inference run (its code, report and inference_results.json; its printout in
    out_dir/inference.log) on `data_dir`, with `config` applied as --config does, or the given flag values."""
    a = _inference_args(args, spec, data_dir, out_dir, max_eval, config, **settings)
    return _logged(lambda: run_inference(a, spec, model, tokenizer, device, data(a)), out_dir)


def _logged(run: Callable[[], dict], out_dir: Path) -> dict:
    """`run()` (an inference that prints and writes its report), its printout kept in out_dir/inference.log."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        report = run()
    write_text(out_dir / "inference.log", log.getvalue())
    return report


class FeatureCache:
    """Each data folder's inference features, loaded once (the runs on one folder share them)."""

    def __init__(self, spec, tokenizer, loaded: dict | None = None):
        self.spec, self.tokenizer, self.loaded = spec, tokenizer, dict(loaded or {})

    @staticmethod
    def key(a: argparse.Namespace) -> tuple[str, int | None]:
        return str(Path(a.data_dir)), a.max_eval_samples

    def __call__(self, a: argparse.Namespace) -> dict:
        key = self.key(a)
        if key not in self.loaded:
            self.loaded[key] = load_inference_data(a, self.spec, self.tokenizer)
        return self.loaded[key]


def _summary(report: dict, metric: str, path: Path, label: str) -> dict:
    r = report["results"]
    return {"data": label, "metric": metric, "score": r[metric], "relative_flops": r["relative_flops"],
            "flops": r["flops"], "mean_layers_executed": r["mean_layers_executed"],
            "latency_ms_per_example": r.get("latency_ms_per_example"), "num_examples": report["num_examples"],
            "inference_results": str(path / "inference_results.json")}


def _config_entry(chosen: dict) -> dict:
    """The task's entry of a best_tradeoff_inference_config.json-style file: what --config applies."""
    entry = {"width_mult_list": chosen["width_mult_list"], "mode": chosen["mode"]}
    if chosen["early_exit"]:
        entry["exit_threshold"] = chosen["exit_threshold"]
    return entry


def _calibration_record(objective: Objective, chosen: dict, metric: str, reference: float, n_cal: int, split: str,
                        off_ramps: list[int]) -> dict:
    """What the choice was made for and on, kept beside the entry (under the top-level key "calibration")."""
    return {objective.kind: objective.value, "metric": metric, "score": chosen["score"],
            "relative_flops": chosen["relative_flops"], "flops": chosen["flops"],
            "full_model_score": reference, "examples": n_cal, "split": split, "off_ramps": off_ramps}


def _write_config(path: Path, task: str, entry: dict, record: dict, merge: bool = False) -> None:
    """{task: entry, "calibration": {task: record}}; with `merge`, into the file's other tasks' entries."""
    entries = {}
    if merge and path.is_file():
        try:
            entries = json.loads(path.read_text(encoding="utf-8").replace(",\n}", "\n}").replace(",}", "}"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CLIError(f"--calibration_config {path}: cannot read JSON ({err})") from None
        if not isinstance(entries, dict):
            raise CLIError(f"--calibration_config {path}: not a JSON object")
    entries[task] = entry
    records = entries.get(CALIBRATION_KEY)
    entries[CALIBRATION_KEY] = {**(records if isinstance(records, dict) else {}), task: record}
    write_json(path, entries)


def _write_pareto(path: Path, front: list[dict], metric: str) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=PARETO_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for point in front:
        writer.writerow({**point, "metric": metric, "width_mult_list": ",".join(f"{w:g}" for w in
                                                                                point["width_mult_list"]),
                         "exit_threshold": "" if point["exit_threshold"] is None else repr(point["exit_threshold"])})
    write_text(path, buf.getvalue())


# ---- calibration ------------------------------------------------------------------------------------------
def calibrate(own: argparse.Namespace, rest: list[str]) -> dict:
    args = parse_args(rest)
    setup_logging(0)
    spec, objectives = check_calibration_args(own, args)
    device, _, _ = setup_device(args.cpu, args.num_threads)
    set_seed(args.seed)
    model, tokenizer = load_model(args.model_dir, spec, **model_options(args))
    return run_calibration(own, args, spec, objectives, model, tokenizer, device)


def check_calibration_args(own: argparse.Namespace, args: argparse.Namespace) -> tuple[object, list[Objective]]:
    """(task, objectives) of a calibration, every flag checked before the model is loaded."""
    spec = validate_task_args(args)
    if spec.is_custom:  # the splits below are written as GLUE dev files
        raise CLIError("--calibrate reads a GLUE data folder; with --train_file/--validation_file/--test_file "
                       "choose the setting with train_gate.py --do_eval runs (or --exit_threshold) instead")
    conflicts = [f"--{m}" for m in MODES if getattr(args, m)]
    conflicts += [flag for flag, given in (("--do_train", args.do_train), ("--config", args.config),
                                           ("--early_exit", args.early_exit),
                                           ("--fixed_gate", args.fixed_gate is not None),
                                           ("--cascade", args.cascade is not None),
                                           ("--exit_threshold", args.exit_threshold is not None)) if given]
    if conflicts:
        raise CLIError(f"--calibrate chooses the mode, widths and threshold itself; drop {conflicts[0]}")
    objectives = [Objective("flops_budget", b) for b in own.flops_budget or []]
    objectives += [Objective("max_drop", d) for d in own.max_drop or []]
    if not objectives:
        raise CLIError("--calibrate needs --flops_budget B and/or --max_drop D")
    if any(o.kind == "flops_budget" and o.value <= 0 for o in objectives):
        raise CLIError("--flops_budget must be > 0 (a fraction of the full model's FLOPs)")
    if len({o.name for o in objectives}) != len(objectives):
        raise CLIError("--flops_budget / --max_drop repeat a value")
    if own.calibration_config and len(objectives) > 1:
        raise CLIError("--calibration_config takes one objective; give one --flops_budget or --max_drop value")
    if own.calibration_batch_size < 1 or own.calibration_max_exhaustive < 0 or own.calibration_seed < 0:
        raise CLIError("--calibration_batch_size must be >= 1, --calibration_max_exhaustive and "
                       "--calibration_seed >= 0")
    metric = utils_glue.primary_metric(spec.name)
    if metric not in CONFUSION_METRICS + REGRESSION_METRICS:
        raise CLIError(f"--calibrate cannot score {spec.name}'s metric {metric}")
    calibration_file = Path(own.calibration_file) if own.calibration_file else None
    if calibration_file is not None and not calibration_file.is_file():
        raise CLIError(f"--calibration_file {calibration_file} does not exist")
    return spec, objectives


def run_calibration(own: argparse.Namespace, args: argparse.Namespace, spec, objectives: list[Objective], model,
                    tokenizer, device, features: dict | None = None) -> dict:
    """The calibration of a loaded model. `features`: inference features already loaded, keyed by (data
    folder, --max_eval_samples) as `FeatureCache` keeps them (the sweep's dev set)."""
    calibration_file = Path(own.calibration_file) if own.calibration_file else None
    metric = utils_glue.primary_metric(spec.name)
    data = FeatureCache(spec, tokenizer, features)
    config = model.config
    if model.gates is None:
        raise CLIError(f"--calibrate needs gates, but --model_dir {args.model_dir} has none "
                       "(train them with train_gate.py --do_train --training_phase traingate)")
    trained = [float(w) for w in config.gate_setting]
    start = args.width_mult_list or list(getattr(config, "gate_class_to_width", None) or trained)
    if len(start) != len(trained):
        raise CLIError(f"--width_mult_list (the search's start) has {len(start)} widths but the gates have "
                       f"{len(trained)} classes")
    grid = sorted(set(own.calibration_grid or (trained + list(EXTRA_GRID))))
    validate_subnets(config, {"--calibration_grid": grid, "--width_mult_list": start}, {})
    _, off_ramps = routing_defaults(config, None, args.off_ramps)
    if any(not 0 <= i < config.num_hidden_layers for i in off_ramps):
        raise CLIError(f"--off_ramps {off_ramps} must be layers 0..{config.num_hidden_layers - 1}")

    data_dir = Path(args.data_dir)
    dev_header, dev_rows = _dev_rows(spec, data_dir / spec.dev_files[0], args.max_eval_samples)
    if calibration_file is not None:
        cal_header, cal_rows = _dev_rows(spec, calibration_file, None)
        rep_rows, split = None, f"--calibration_file {calibration_file}"
        if len(cal_rows) < 2:
            raise CLIError(f"--calibration_file {calibration_file} needs at least 2 examples")
    else:
        if len(dev_rows) < 2:
            raise CLIError("--calibrate needs at least 2 dev examples to split")
        cal_idx, rep_idx = split_indices(len(dev_rows), own.calibration_seed)
        cal_header, cal_rows = dev_header, [dev_rows[i] for i in cal_idx]
        rep_rows = [dev_rows[i] for i in rep_idx]
        split = f"seeded half of dev ({len(cal_rows)} of {len(dev_rows)}, --calibration_seed {own.calibration_seed})"

    # input validated: from here on the output folder is written
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cal_dir = out / "calibration_split"
    _write_split(cal_dir, spec, data_dir, cal_header, cal_rows)
    if rep_rows is not None:
        rep_dir = out / "reporting_split"
        _write_split(rep_dir, spec, data_dir, dev_header, rep_rows)
        rep_max, rep_label = None, f"reporting half of dev ({len(rep_rows)} examples not used for calibration)"
    else:
        rep_dir, rep_max, rep_label = data_dir, args.max_eval_samples, f"all of dev ({len(dev_rows)} examples)"
    load = dict(tokenizer=tokenizer, max_seq_length=args.max_seq_length, cache_dir=args.cache_dir)
    cal_set = utils_glue.load_dataset(args.task_name, cal_dir, "dev", **load)

    model.to(device).eval()
    maps_in_grid = len(monotone_maps(grid, len(trained)))
    bar = progress(total=maps_in_grid if maps_in_grid <= own.calibration_max_exhaustive else None,
               desc=f"calibration maps ({len(cal_set)} examples)", leave=False)
    calibrator = Calibrator(model, cal_set.tensors, metric, off_ramps, args.max_seq_length,
                            own.calibration_batch_size, device, progress=lambda *_: bar.update(1))
    began = time.perf_counter()
    reference = calibrator.full_model_score()
    search = calibrator.search(grid, len(trained), objectives, start, reference, own.calibration_max_exhaustive,
                               own.within_se)
    bar.close()
    front = calibrator.pareto()
    _write_pareto(out / PARETO_FILE, front, metric)
    logger.info("calibration: %s search, %d of %d maps evaluated, %d (map, threshold) candidates, %.0f s",
                search["search"], search["maps_evaluated"], maps_in_grid, search["candidates_evaluated"],
                time.perf_counter() - began)

    statics = {}
    if not own.no_static_baselines:  # every depth of a width from one pass (static_depth_reports)
        for width in trained:
            paths, runs = {}, {}
            for depth in TRAINED_DEPTHS:
                name = f"static_w{float(width)}_d{float(depth)}"  # gate_inference.sh's names
                paths[depth] = (name, out / "static_reporting" / name)
                runs[depth] = _inference_args(args, spec, rep_dir, paths[depth][1], rep_max,
                                              width_mult_list=[width], depth_mult_list=[depth], static=True)
            reports = static_depth_reports(runs, spec, model, device, data(runs[TRAINED_DEPTHS[0]]))
            for depth in TRAINED_DEPTHS:
                name, path = paths[depth]
                statics[name] = _summary(_logged(reports[depth].finish, path), metric, path, rep_label)
        statics = {name: statics[name] for name in (f"static_w{float(w)}_d{float(d)}" for d in TRAINED_DEPTHS
                                                     for w in trained)}  # the order of one run per subnet

    objectives_out = {}
    for objective in objectives:
        chosen = search["chosen"][objective]
        folder = out / objective.name
        folder.mkdir(exist_ok=True)
        entry_ = _config_entry(chosen)
        record = _calibration_record(objective, chosen, metric, reference, len(cal_set), split, off_ramps)
        config_path = folder / "inference_config.json"
        _write_config(config_path, spec.name, entry_, record)
        if own.calibration_config:
            _write_config(Path(own.calibration_config), spec.name, entry_, record, merge=True)
        report = _inference(args, spec, model, tokenizer, device, data, rep_dir, folder / "reporting", rep_max,
                            config=config_path)
        reporting = _summary(report, metric, folder / "reporting", rep_label)
        all_dev = None
        if rep_rows is not None:
            report = _inference(args, spec, model, tokenizer, device, data, data_dir, folder / "all_dev",
                                args.max_eval_samples, config=config_path)
            all_dev = _summary(report, metric, folder / "all_dev",
                               f"all of dev ({len(dev_rows)} examples, including the calibration half)")
        above = [(name, s) for name, s in statics.items() if s["relative_flops"] >= reporting["relative_flops"] - 1e-9]
        best_static = max(above, key=lambda item: item[1]["score"], default=None)
        objectives_out[objective.name] = {
            "objective": {objective.kind: objective.value}, "config": str(config_path),
            "setting": {**entry_, **{k: chosen[k] for k in ("early_exit", "exit_threshold")}},
            "feasible_on_calibration": chosen["feasible"],
            "calibration": {k: chosen[k] for k in ("score", "relative_flops", "relative_linear_flops", "flops",
                                                   "mean_layers_executed")},
            "reporting": reporting, "all_dev": all_dev,
            "best_static_at_or_above_reporting_flops": None if best_static is None else
            {"run": best_static[0], **best_static[1]},
        }

    results = {
        "task": spec.name, "metric": metric, "model_dir": args.model_dir, "max_seq_length": args.max_seq_length,
        "calibration_split": split, "calibration_examples": len(cal_set), "reporting": rep_label,
        "full_model_calibration_score": reference, "grid": grid, "start_map": list(start), "off_ramps": off_ramps,
        "search": search["search"], "maps_in_grid": maps_in_grid, "maps_evaluated": search["maps_evaluated"],
        "candidates_evaluated": search["candidates_evaluated"], "search_seconds": search["seconds"],
        "forward_seconds": search["forward_seconds"], "examples_forwarded": search["examples_forwarded"],
        "pareto_points": len(front), "pareto_csv": str(out / PARETO_FILE),
        "objectives": objectives_out, "static_reporting": statics,
    }
    write_json(out / RESULTS_FILE, results)
    print(format_results(results))
    return results


def format_results(results: dict) -> str:
    def f(v, digits=4):
        return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))

    lines = [f"***** Calibration: {results['task']} ({results['metric']}) *****",
             f" calibration: {results['calibration_split']}; full model {f(results['full_model_calibration_score'])}",
             f" reporting: {results['reporting']}",
             f" search: {results['search']}, {results['maps_evaluated']} of {results['maps_in_grid']} maps evaluated "
             f"(grid {','.join(f'{w:g}' for w in results['grid'])}), {results['candidates_evaluated']} (map, "
             f"threshold) candidates, {results['search_seconds']:.1f} s; {results['examples_forwarded']} of "
             f"{results['maps_evaluated'] * results['calibration_examples']} example forwards run (the rest reused)",
             "objective | map | threshold | cal score | cal FLOPs | rep score | rep FLOPs | rep ms/ex | "
             "best static >= rep FLOPs (rep) | all-dev score | all-dev FLOPs"]
    for name, o in results["objectives"].items():
        s, c, r, a, b = o["setting"], o["calibration"], o["reporting"], o["all_dev"], \
            o["best_static_at_or_above_reporting_flops"]
        static = "-" if b is None else f"{b['run']} {b['score']:.4f} @ {b['relative_flops']:.3f}"
        lines.append(" | ".join([
            name, ",".join(f"{w:g}" for w in s["width_mult_list"]),
            f(s.get("exit_threshold")) if s["mode"] == "wd_dynamic" else "no exit",
            f(c["score"]), f(c["relative_flops"], 3), f(r["score"]), f(r["relative_flops"], 3),
            f(r["latency_ms_per_example"], 2), static, f(a and a["score"]), f(a and a["relative_flops"], 3)]))
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(entry)
