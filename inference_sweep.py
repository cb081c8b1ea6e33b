"""Every inference setting of gate_inference.sh from one process: one model load and one tokenisation of dev.

At each batch size of --batch_sizes: every static subnet (--static_widths x --static_depths; the depths of one
width from one encoder pass, as depth subnets are prefixes of each other), width-dynamic inference with the
task's class -> width map from --dynamic_config, and width+depth-dynamic inference with early exit at each
of --thresholds (these gated settings run their gates and layers up to the first off-ramp once per batch:
until an example can exit, their paths are the same), and one confidence cascade of static subnets (--cascade,
--cascade_thresholds, --cascade_rule; default SWEEP_CASCADE, the setting docs/results.md's SST-2 quick
measurement chose most often at a FLOPs budget of 0.3; --no_cascade leaves it out). Each setting's report
is the one `train_gate.py --do_eval` writes for the same flags (same numbers; the latency of a setting that
shares layers is the shared part's plus its own), in
<inference_dir>/<setting>_b<batch>/inference_results.json, its printout in <setting>_b<batch>.log beside it.
With --flops_budget, then train_gate_new.py --calibrate's calibration for those budgets at the first batch
size, on the same loaded model, into <inference_dir>/calibrated/. Where the time went (wall and CPU seconds
of the model load, tokenisation, static subnets, gated settings, cascade and calibration):
<inference_dir>/sweep_timings.json. All other flags are train_gate.py's (--task_name, --data_dir, --model_dir,
--max_seq_length, --record_gpu_time, --num_threads, ...); the sweep chooses the mode, widths, depth,
threshold, batch size and output folder of each setting itself.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import train_gate
import train_gate_new
import utils_glue
from cli import (
    COUNT,
    NON_NEGATIVE,
    CLIError,
    calibration_flags,
    finish_training_args,
    model_options,
    multiplier_list,
    run_cli,
    setup_logging,
    setup_run_device,
    validate_subnets,
    validate_task_args,
)
from routed_inference import (
    apply_saved_defaults,
    check_cascade_flags,
    evaluated_run,
    exit_rule_reports,
    load_inference_data,
    static_depth_reports,
)
from run_folder import check_writable, clean_up_on_failure
from transformers_ext.environment import set_seed
from transformers_ext.errors import reading
from transformers_ext.files import write_json, write_text
from transformers_ext.loading import load_model

TIMINGS_FILE = "sweep_timings.json"
FALLBACK_DYNAMIC_WIDTHS = "0.5,0.75,0.75,0.75"  # the README's example map, for a task the config file lacks
# The sweep's cascade row: the 2-stage max-softmax cascade chosen most often (10 of 20 halvings, median threshold
# 0.31) at FLOPs budget 0.3 on the make-demo model (docs/results.md, "Which dynamic inference pays"): 0.826 at
# 0.28 of the FLOPs on the reporting halves. A default for the table, not a calibrated choice for other models.
SWEEP_CASCADE = {"cascade": [(0.25, 0.5), (0.75, 0.75)], "cascade_thresholds": [0.3], "cascade_rule": None}


def _list_of(item_type):
    def parse(value: str) -> list[str]:
        items = [v.strip() for v in value.replace(" ", ",").split(",") if v.strip()]
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        for item in items:
            item_type(item)
        return items  # as written: the folder names use them (wd_dynamic_t0.3)

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = train_gate.build_parser(__doc__)
    group = parser.add_argument_group("sweep")
    g = group.add_argument
    g("--inference_dir", required=True, help="Folder of the settings' result folders.")
    g("--batch_sizes", type=_list_of(COUNT), default=["32"], help="Comma (or space) list of batch sizes.")
    g("--static_widths", type=_list_of(multiplier_list), default=["1.0", "0.75", "0.5", "0.25"],
      help="Widths of the static subnets.")
    g("--static_depths", type=_list_of(multiplier_list), default=["1.0", "0.75", "0.5"],
      help="Depths of the static subnets.")
    g("--thresholds", type=_list_of(NON_NEGATIVE), default=["0.1", "0.3", "0.5"],
      help="Exit thresholds of the width+depth-dynamic runs.")
    g("--dynamic_config", default="best_tradeoff_inference_config.json",
      help=f"The task's width_mult_list in this JSON file is the dynamic runs' class -> width map (a task it "
           f"lacks: {FALLBACK_DYNAMIC_WIDTHS}).")
    g("--no_cascade", action="store_true",
      help="Leave out the cascade row (default: --cascade if given, else w0.25_d0.5,w0.75_d0.75 at threshold 0.3).")
    g("--flops_budget", type=_list_of(NON_NEGATIVE), default=None,
      help="Calibrate for these FLOPs budgets afterwards (train_gate_new.py --calibrate --flops_budget).")
    g("--reuse_existing", action="store_true",
      help="Skip the settings whose inference_results.json (calibration_results.json) already exists.")
    return utils_glue.setup_custom_task(finish_training_args(parser.parse_args(argv)))


def dynamic_widths(path: str, task: str) -> str:
    """The task's class -> width map in a best_tradeoff_inference_config.json-style file, as a comma list."""
    with reading(Path(path)):
        text = Path(path).read_text(encoding="utf-8")
    try:
        entries = json.loads(text.replace(",\n}", "\n}").replace(",}", "}"))
    except json.JSONDecodeError as err:
        raise CLIError(f"--dynamic_config {path}: cannot read JSON ({err})") from None
    entry = entries.get(task) if isinstance(entries, dict) else None
    if not isinstance(entry, dict):
        return FALLBACK_DYNAMIC_WIDTHS
    widths = ",".join(map(str, entry.get("width_mult_list") or []))
    try:
        multiplier_list(widths)
    except argparse.ArgumentTypeError as err:
        raise CLIError(f"--dynamic_config {path}: {task}.width_mult_list: {err}") from None
    return widths


def settings(args: argparse.Namespace, widths: str) -> list[tuple[str, dict]]:
    """(name, flag values) of every setting at one batch size, in gate_inference.sh's order."""
    runs = [(f"static_w{w}_d{d}", {"static": True, "width_mult_list": multiplier_list(",".join([w] * 4)),
                                   "depth_mult_list": multiplier_list(d)})
            for d in args.static_depths for w in args.static_widths]
    dynamic = {"width_mult_list": multiplier_list(widths), "depth_mult_list": [1.0]}
    runs.append(("w_dynamic", {"w_dynamic": True, **dynamic}))
    runs += [(f"wd_dynamic_t{t}", {"wd_dynamic": True, "early_exit": True, "exit_threshold": NON_NEGATIVE(t),
                                   **dynamic}) for t in args.thresholds]
    if not args.no_cascade:
        cascade = ({key: getattr(args, key) for key in SWEEP_CASCADE} if args.cascade else SWEEP_CASCADE)
        runs.append(("cascade", dict(cascade)))
    return runs


CHOSEN = ("static", "w_dynamic", "d_dynamic", "wd_dynamic", "early_exit", "fixed_gate", "exit_threshold", "config",
          "do_train")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(int(os.environ.get("RANK", "0")))
    spec = validate_task_args(args)
    given = [flag for flag in CHOSEN if getattr(args, flag) not in (None, False)]
    if given or args.width_mult_list is not None:
        raise CLIError("conflicting modes: the sweep chooses every setting's mode, widths, depth and threshold "
                       f"itself; drop --{(given or ['width_mult_list'])[0]}")
    if args.no_cascade and args.cascade:
        raise CLIError("--no_cascade contradicts --cascade; drop one")
    check_cascade_flags(args)
    inference_dir = Path(args.inference_dir)
    widths = dynamic_widths(args.dynamic_config, spec.name)
    todo = []
    for bs in args.batch_sizes:
        for name, flags in settings(args, widths):
            out = inference_dir / f"{name}_b{bs}"
            if args.reuse_existing and (out / "inference_results.json").is_file():
                print(f"reusing {out}")
            else:
                todo.append((name, int(bs), out, flags))
    calibrated = inference_dir / "calibrated"
    calibration = None
    if args.flops_budget:
        if args.reuse_existing and (calibrated / train_gate_new.RESULTS_FILE).is_file():
            print(f"reusing {calibrated}")
        else:
            cal_args = _setting_args(args, calibrated, int(args.batch_sizes[0]), calibration_flags(
                ["--calibrate", "--flops_budget", ",".join(args.flops_budget)]))
            calibration = (cal_args, *train_gate_new.check_calibration_args(cal_args))
    if not todo and calibration is None:
        return
    device, _, _ = setup_run_device(args)
    set_seed(args.seed)
    timings = StageTimes()
    with timings.stage("model_load"):
        model, tokenizer = load_model(args.model_dir, spec, **model_options(args))
    runs = []
    for name, bs, out, flags in todo:
        run_args = _setting_args(args, out, bs, flags)
        apply_saved_defaults(run_args, model)
        validate_subnets(model.config, {"--width_mult_list": run_args.width_mult_list},
                         {"--depth_mult_list": run_args.depth_mult_list})
        check_writable(out)
        runs.append((name, run_args))
    with timings.stage("tokenisation"):
        datasets = load_inference_data(args, spec, tokenizer)
    _run_all(runs, spec, model, device, datasets, timings)
    if calibration is not None:
        print(f"-- calibration for FLOPs budgets {' '.join(args.flops_budget)}")
        log = io.StringIO()
        with timings.stage("calibration"), contextlib.redirect_stdout(log):
            train_gate_new.run_calibration(*calibration, model, tokenizer, device, datasets)
        text = log.getvalue()
        write_text(inference_dir / "calibrated.log", text)
        print(text[max(text.find("***** Calibration"), 0):], end="")  # the summary
    write_json(inference_dir / TIMINGS_FILE, timings.seconds)


class StageTimes:
    """Wall-clock and CPU seconds (this process, every thread) spent in each named stage, summed over its runs.
    CPU time as well: on shared cores the wall clock also counts other programs' work."""

    def __init__(self):
        self.seconds: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            spent = self.seconds.setdefault(name, {"wall": 0.0, "cpu": 0.0})
            spent["wall"] += time.perf_counter() - wall
            spent["cpu"] += time.process_time() - cpu


def _setting_args(args: argparse.Namespace, out: Path, batch_size: int, flags: dict) -> argparse.Namespace:
    """One setting's flags: the sweep's, with its output folder, batch size and routing flags."""
    run_args = argparse.Namespace(**vars(args))
    run_args.output_dir, run_args.per_gpu_eval_batch_size = str(out), batch_size
    for key in SWEEP_CASCADE:  # only the cascade row is a cascade
        setattr(run_args, key, None)
    for key, value in flags.items():
        setattr(run_args, key, value)
    return run_args


def _run_all(runs: list[tuple[str, argparse.Namespace]], spec, model, device, datasets: dict,
             timings: StageTimes) -> None:
    """Every setting, in order; at one batch size, the static subnets of one width share their encoder passes
    (prefix sharing) and the gated settings of one width map their layers before the first off-ramp. Each
    group's time (evaluation and report) goes to `timings` under static, gated or cascade."""
    done = set()
    for i, (_, run_args) in enumerate(runs):
        if i in done:
            continue
        kind = _shared_kind(run_args)
        group = {j: a for j, (_, a) in enumerate(runs) if j not in done and _shared_kind(a) == kind}
        with timings.stage("cascade" if run_args.cascade else "static" if run_args.static else "gated"):
            if run_args.cascade:  # shares nothing
                finished = {i: evaluated_run(run_args, spec, model, device, datasets)}
            elif run_args.static:
                reports = static_depth_reports({a.depth_mult_list[0]: a for a in group.values()}, spec, model,
                                               device, datasets)
                finished = {j: reports[a.depth_mult_list[0]] for j, a in group.items()}
            else:
                finished = exit_rule_reports({j: a for j, a in group.items()}, spec, model, device, datasets)
            for j, a in group.items():
                _finish(runs[j][0], a, finished[j].finish)
        done.update(group)


def _shared_kind(run_args: argparse.Namespace) -> tuple:
    """Settings that share work: static ones of one width, or gated ones of one width map, at one batch size
    (a cascade: none)."""
    return run_args.static, run_args.width_mult_list, run_args.per_gpu_eval_batch_size, run_args.cascade


def _finish(name: str, run_args: argparse.Namespace, run) -> None:
    """Run (or finish) one setting; its printout goes to <output_dir>.log, as one process per setting kept it."""
    out = Path(run_args.output_dir)
    print(f"-- {name} (batch {run_args.per_gpu_eval_batch_size})")
    log = io.StringIO()
    with clean_up_on_failure(str(out)), contextlib.redirect_stdout(log):
        run()
    write_text(out.parent / f"{out.name}.log", log.getvalue())


if __name__ == "__main__":
    run_cli(main)
