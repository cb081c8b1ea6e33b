"""train_gate.py's inference from its flags (SPEC §5-6): the flags completed from the gate folder's saved
settings and a --config file, the one `RoutingSetting` they describe (checked against the model), the splits
to run, and a run through the library's evaluation path (`transformers_ext.evaluation`) into the printed
report, inference_results.json and the prediction files. inference_sweep.py, train_gate_new.py and
run_glue.py --do_predict run through the same functions."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import utils_glue
from cli import NON_NEGATIVE, CLIError, multiplier_list, non_negative_list
from transformers_ext import layers_kept
from transformers_ext.cascade import CLASSIFICATION_RULES, REGRESSION_RULES, Cascade
from transformers_ext.environment import precision_name
from transformers_ext.evaluation import (
    Evaluation,
    EvaluationOptions,
    Timing,
    evaluate_exit_rules,
    evaluate_routed,
    evaluate_static_depths,
    print_report,
    routed_report,
)
from transformers_ext.files import write_json
from transformers_ext.routing import CASCADE_MODE, MODES, RoutingSetting, routing_defaults

logger = logging.getLogger("flexbert")


def apply_saved_defaults(args: argparse.Namespace, model) -> None:
    """Flags left at None take the gate folder's saved settings (validated when the folder was loaded): the
    trained class -> width map (dynamic modes; static runs default to full width) and the exit threshold."""
    config = model.config
    if args.width_mult_list is None:
        dynamic = (args.w_dynamic or args.wd_dynamic) and args.fixed_gate is None
        saved = getattr(config, "gate_class_to_width", None) or getattr(config, "gate_setting", None)
        args.width_mult_list = list(saved) if dynamic and saved and not args.do_train else [1.0]
    args.exit_threshold, _ = routing_defaults(config, args.exit_threshold)


CONFIG_KEYS = ("width_mult_list", "exit_threshold", "mode", "early_exit")
CASCADE_KEYS = ("mode", "cascade_stages", "cascade_thresholds", "cascade_rule")  # `Cascade.entry()`


def apply_config_file(args: argparse.Namespace, spec: utils_glue.TaskSpec) -> None:
    """The task's entry of --config, type-checked (numbers are numbers, early_exit a JSON boolean), applied
    to the flags the command line left unset; a flag set to a different value than the file's is refused."""
    where = f"--config {args.config}"
    try:
        text = Path(args.config).read_text(encoding="utf-8")
        # The reference's file has a trailing comma; tolerate it.
        entries = json.loads(text.replace(",\n}", "\n}").replace(",}", "}"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CLIError(f"{where}: cannot read JSON ({type(err).__name__}: {err})") from None
    entry = entries.get(spec.name) if isinstance(entries, dict) else None
    if not isinstance(entry, dict):
        raise CLIError(f"{where} has no entry for task {spec.name}")
    if entry.get("mode") == CASCADE_MODE:
        _apply_cascade_entry(args, spec, entry, where)
        return
    unknown = sorted(set(entry) - set(CONFIG_KEYS))
    if unknown:
        raise CLIError(f"{where}: unknown key(s) {', '.join(unknown)} for {spec.name} "
                       f"(known: {', '.join(CONFIG_KEYS)}; a cascade: {', '.join(CASCADE_KEYS)})")

    def bad(key: str, why: str) -> CLIError:
        return CLIError(f"{where}: {spec.name}.{key} {why}, got {json.dumps(entry.get(key))}")

    widths = entry.get("width_mult_list")
    if not isinstance(widths, list) or not all(isinstance(w, int | float) and not isinstance(w, bool) for w in widths):
        raise bad("width_mult_list", "must be a list of numbers")
    threshold = entry.get("exit_threshold")
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)):
        raise bad("exit_threshold", "must be a number")
    for key, check in (("width_mult_list", multiplier_list), ("exit_threshold", NON_NEGATIVE)):
        try:  # the flags' own types: the same ranges as on the command line
            if entry.get(key) is not None:
                check(entry[key])
        except argparse.ArgumentTypeError as err:
            raise CLIError(f"{where}: {spec.name}.{key}: {err}") from None
    widths = multiplier_list(widths)
    threshold = None if threshold is None else NON_NEGATIVE(threshold)
    mode = entry.get("mode", "wd_dynamic")
    if mode not in MODES:
        raise CLIError(f"{where}: unknown mode {json.dumps(mode)} for {spec.name} "
                       f"(one of {', '.join(MODES + (CASCADE_MODE,))})")
    early_exit = entry.get("early_exit", mode in ("wd_dynamic", "d_dynamic"))
    if not isinstance(early_exit, bool):
        raise bad("early_exit", "must be true or false (a JSON boolean)")

    def refuse(given: str, saved: str) -> CLIError:
        return CLIError(f"{given} contradicts {where}, which gives {saved} for {spec.name}; drop one")

    flagged = [m for m in MODES if getattr(args, m)] + ([CASCADE_MODE] if args.cascade else [])
    if flagged and flagged != [mode]:
        raise refuse(" ".join("--" + m for m in flagged), f"mode {mode}")
    given = args.width_mult_list
    if given is not None and [round(w, 6) for w in given] != [round(w, 6) for w in widths]:
        raise refuse(f"--width_mult_list {','.join(f'{w:g}' for w in given)}",
                     f"width_mult_list {','.join(f'{w:g}' for w in widths)}")
    if threshold is not None and args.exit_threshold is not None and args.exit_threshold != threshold:
        raise refuse(f"--exit_threshold {args.exit_threshold:g}", f"exit_threshold {threshold:g}")
    if args.early_exit and not early_exit:
        raise refuse("--early_exit", "early_exit false")
    args.width_mult_list = widths
    if threshold is not None:
        args.exit_threshold = threshold
    for m in MODES:
        setattr(args, m, m == mode)
    args.early_exit = early_exit


def _apply_cascade_entry(args: argparse.Namespace, spec, entry: dict, where: str) -> None:
    """A cascade entry of --config (`Cascade.entry()`: cascade_stages [[width, depth], ...], cascade_thresholds,
    cascade_rule), type-checked and applied as the --cascade flags; a contradicting flag is refused."""
    unknown = sorted(set(entry) - set(CASCADE_KEYS))
    if unknown:
        raise CLIError(f"{where}: key(s) {', '.join(unknown)} do not apply to {spec.name}'s cascade entry "
                       f"(known: {', '.join(CASCADE_KEYS)})")
    stages, thresholds, rule = (entry.get(k) for k in CASCADE_KEYS[1:])

    def bad(key: str, why: str) -> CLIError:
        return CLIError(f"{where}: {spec.name}.{key} {why}, got {json.dumps(entry.get(key))}")

    numbers = (int, float)
    if not (isinstance(stages, list) and stages and all(
            isinstance(s, list) and len(s) == 2 and all(isinstance(x, numbers) and not isinstance(x, bool) for x in s)
            for s in stages)):
        raise bad("cascade_stages", "must be a non-empty list of [width, depth] pairs")
    if not isinstance(thresholds, list) or any(isinstance(t, bool) or not isinstance(t, numbers) for t in thresholds):
        raise bad("cascade_thresholds", "must be a list of numbers")
    if rule is not None and rule not in CLASSIFICATION_RULES + REGRESSION_RULES:
        raise bad("cascade_rule", f"must be one of {', '.join(CLASSIFICATION_RULES + REGRESSION_RULES)}")
    try:
        stages = [tuple(multiplier_list(s)) for s in stages]
        thresholds = non_negative_list(thresholds) if thresholds else []
    except argparse.ArgumentTypeError as err:
        raise CLIError(f"{where}: {spec.name}: {err}") from None

    def refuse(given: str, saved: str) -> CLIError:
        return CLIError(f"{given} contradicts {where}, which gives {saved} for {spec.name}; drop one")

    flagged = [m for m in MODES if getattr(args, m)]
    if flagged:
        raise refuse(" ".join("--" + m for m in flagged), "mode cascade")
    for flag, given, saved in (("--cascade", args.cascade, stages),
                               ("--cascade_thresholds", args.cascade_thresholds, thresholds),
                               ("--cascade_rule", args.cascade_rule, rule)):
        if given is not None and given != saved:
            raise refuse(f"{flag} {given}", f"{saved}")
    args.cascade, args.cascade_thresholds, args.cascade_rule = stages, thresholds, rule


def check_cascade_flags(args: argparse.Namespace) -> None:
    """--cascade takes no other mode's flags; --cascade_thresholds / --cascade_rule need it. (The thresholds'
    count and the stages' order are checked against the model by `resolve_setting`.)"""
    if not args.cascade:
        for flag in ("cascade_thresholds", "cascade_rule"):
            if getattr(args, flag) is not None:
                raise CLIError(f"--{flag} needs --cascade")
        return
    others = [f"--{m}" for m in MODES if getattr(args, m)]
    others += [flag for flag, given in (("--early_exit", args.early_exit),
                                        ("--fixed_gate", args.fixed_gate is not None),
                                        ("--width_mult_list", args.width_mult_list is not None),
                                        ("--do_train", args.do_train)) if given]
    if others:
        raise CLIError(f"conflicting modes: --cascade runs its own static subnets; drop {others[0]}")


def resolve_cascade(args: argparse.Namespace, model) -> RoutingSetting:
    """The cascade the --cascade flags describe, checked against the model (rule fits the task, one threshold
    per step, stages cheap to expensive at --max_seq_length)."""
    config = model.config
    rule = args.cascade_rule or (REGRESSION_RULES[0] if config.num_labels == 1 else CLASSIFICATION_RULES[0])
    try:
        cascade = Cascade(tuple(args.cascade), tuple(args.cascade_thresholds or ()), rule)
        cascade.check_model(config, args.max_seq_length)
        for width, depth in cascade.stages:
            model.subnet(width, depth)  # validates the pair
    except ValueError as err:
        raise CLIError(f"--cascade: {err}") from None
    widths = [w for w, _ in cascade.stages]
    return RoutingSetting(widths, None, 1.0, False, args.exit_threshold, (), CASCADE_MODE, cascade)


def select_mode(args: argparse.Namespace, model) -> str:
    """Validate the mode flags against the widths/depth given (the reference's checks, made correct)."""
    chosen = [m for m in MODES if getattr(args, m)]
    if len(chosen) > 1:
        raise CLIError(f"conflicting modes: {', '.join('--' + m for m in chosen)}; choose one")
    identical = len(set(args.width_mult_list)) == 1
    mode = chosen[0] if chosen else ("static" if identical else "w_dynamic")
    if len(args.depth_mult_list) != 1:
        raise CLIError(f"inference takes one depth, got --depth_mult_list {args.depth_mult_list}")
    num_classes = len(model.config.gate_setting) if model.gates is not None else None
    if mode in ("static", "d_dynamic") and not identical and args.fixed_gate is None:
        raise CLIError(f"--{mode} needs identical widths in --width_mult_list, got {args.width_mult_list}")
    if mode in ("w_dynamic", "wd_dynamic", "d_dynamic") and args.depth_mult_list[0] != 1.0:
        raise CLIError(f"--{mode} runs at depth 1.0, got --depth_mult_list {args.depth_mult_list[0]}")
    if mode in ("w_dynamic", "wd_dynamic") and args.fixed_gate is None:
        if model.gates is None:
            raise CLIError(f"--{mode} needs gates, but --model_dir {args.model_dir} has none "
                           "(train them with train_gate.py --do_train --training_phase traingate)")
        if len(args.width_mult_list) != num_classes:
            raise CLIError(f"--width_mult_list has {len(args.width_mult_list)} widths but the gates have "
                           f"{num_classes} classes")
    if mode == "d_dynamic" and not args.early_exit:
        raise CLIError("--d_dynamic needs --early_exit")
    if args.early_exit and mode in ("static", "w_dynamic"):
        raise CLIError(f"--early_exit does not apply to --{mode}; use --wd_dynamic or --d_dynamic")
    return mode


def resolve_setting(args: argparse.Namespace, model) -> RoutingSetting:
    """The setting the flags describe (after `apply_saved_defaults`), validated against the model."""
    if getattr(args, "cascade", None):
        return resolve_cascade(args, model)
    mode = select_mode(args, model)
    num_labels = model.config.num_labels
    if args.early_exit and num_labels > 1 and args.exit_threshold >= math.log(num_labels):
        # the entropy of C classes never exceeds ln C: such a threshold is "always exit", likely a unit mix-up
        logger.warning("--exit_threshold %g >= ln %d = %.3f, the largest entropy of %d classes: every example "
                       "exits at the first off-ramp", args.exit_threshold, num_labels, math.log(num_labels),
                       num_labels)
    config = model.config
    depth = args.depth_mult_list[0]
    try:
        layers_kept(config, depth)
        fixed = args.fixed_gate if args.fixed_gate is not None else (
            args.width_mult_list[0] if mode in ("static", "d_dynamic") else None)
        if fixed is not None:
            model.subnet(fixed, depth)  # validates the pair
    except ValueError as err:
        raise CLIError(str(err)) from None
    _, off_ramps = routing_defaults(config, args.exit_threshold, args.off_ramps)
    if any(not 0 <= i < config.num_hidden_layers for i in off_ramps):
        raise CLIError(f"--off_ramps {off_ramps} must be layers 0..{config.num_hidden_layers - 1}")
    return RoutingSetting(args.width_mult_list, fixed, depth, args.early_exit, args.exit_threshold, off_ramps, mode)


def inference_splits(args: argparse.Namespace, spec) -> tuple[list[str], list[str]]:
    """(dev splits, test splits). The report (metrics, FLOPs, histograms, latency) is dev's; --do_predict adds
    the test splits, whose predictions are written but not reported (a task of your own without
    --validation_file: reported on test)."""
    has_dev = args.do_eval or not (spec.is_custom and spec.files.validation is None)
    dev_splits = utils_glue.split_names(args.task_name, "dev") if has_dev else []
    test_splits = utils_glue.split_names(args.task_name, "test") if args.do_predict else []
    return dev_splits, test_splits


def load_inference_data(args: argparse.Namespace, spec, tokenizer) -> dict[str, TensorDataset]:
    """The features of every split `inference_splits` names (dev capped at --max_eval_samples)."""
    load = dict(tokenizer=tokenizer, max_seq_length=args.max_seq_length, cache_dir=args.cache_dir)
    dev_splits, test_splits = inference_splits(args, spec)
    datasets = {s: utils_glue.load_dataset(args.task_name, args.data_dir, s, max_examples=args.max_eval_samples,
                                           **load) for s in dev_splits}
    datasets.update({s: utils_glue.load_dataset(args.task_name, args.data_dir, s, **load) for s in test_splits})
    return datasets


def example_indices(task_name: str, data_dir: str, split: str, n: int) -> list[str]:
    """The keys of a split's examples in prediction files: a test file's index column (GLUE's `index`, QQP's
    `id`; for your own file index/idx/id, else the row number), a dev example's position from 0."""
    if split.startswith("test"):
        examples = utils_glue.get_examples(task_name, data_dir, split)
        if len(examples) != n:  # the features are built from the same examples: a mismatch is a bug
            raise RuntimeError(f"{split}: {len(examples)} examples but {n} features")
        return [e.index for e in examples]
    return [str(i) for i in range(n)]


class PredictionRecords:
    """Per-example prediction records of a run (--save_predictions), keyed by each split's example indices."""

    def __init__(self, spec, task_name: str, data_dir: str, datasets: dict[str, TensorDataset],
                 setting: RoutingSetting):
        self.spec, self.setting = spec, setting
        self.indices = {s: example_indices(task_name, data_dir, s, len(d)) for s, d in datasets.items()}

    def __call__(self, split: str, start: int, logits: torch.Tensor, labels: torch.Tensor, out) -> list[dict]:
        records = utils_glue.prediction_records(self.spec, split, self.indices[split][start : start + len(labels)],
                                                logits, labels, out, self.setting.class_to_width,
                                                self.setting.fixed_width)
        if self.setting.cascade is not None:  # the stage that answered (the example ran it and those before)
            names = self.setting.cascade.stage_names
            for record, stage in zip(records, out.stage.tolist(), strict=True):
                record["cascade_stage"] = names[stage]
        return records


def evaluation_options(args: argparse.Namespace, spec, device: torch.device, datasets: dict[str, TensorDataset],
                       setting: RoutingSetting) -> EvaluationOptions:
    """How the flags evaluate a setting: batch size, precision, timing, which splits are scored and reported,
    the task's metrics and (--save_predictions) the per-example records."""
    dev_splits, test_splits = inference_splits(args, spec)
    return EvaluationOptions(
        args.per_gpu_eval_batch_size, precision_name(args.fp16, args.bf16),
        Timing.on(device, args.record_gpu_time, args.record_cpu_time, args.timing_warmup), dev_splits,
        dev_splits or test_splits, functools.partial(utils_glue.compute_metrics, args.task_name),
        PredictionRecords(spec, args.task_name, args.data_dir, datasets, setting) if args.save_predictions else None,
        f"{spec.name} ")


class InferenceRun:
    """A finished evaluation of one setting, ready to be reported: `finish()` prints the report and writes
    output_dir/inference_results.json and the prediction files."""

    def __init__(self, args: argparse.Namespace, spec, evaluation: Evaluation, device: torch.device):
        self.args, self.spec, self.evaluation, self.device = args, spec, evaluation, device

    def finish(self) -> dict:
        args, evaluation = self.args, self.evaluation
        report = routed_report(evaluation, self.spec.name, args.per_gpu_eval_batch_size, args.max_seq_length,
                               self.device, precision_name(args.fp16, args.bf16), args.model_dir)
        print_report(report)
        out_dir = Path(args.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "inference_results.json", report)
        _, test_splits = inference_splits(args, self.spec)
        indices = evaluation.example_records.indices if evaluation.example_records else {}
        test_logits = {s: (indices.get(s) or example_indices(args.task_name, args.data_dir, s,
                                                             len(evaluation.logits[s])), evaluation.logits[s])
                       for s in test_splits}
        for line in utils_glue.write_predictions(self.spec, args.task_name, out_dir, test_logits, evaluation.records):
            print(f" {line}")
        return report


def run_inference(args: argparse.Namespace, spec, model, tokenizer, device,
                  datasets: dict[str, TensorDataset] | None = None) -> dict:
    """One setting's inference, reported (`datasets`: the splits' features when already loaded)."""
    datasets = load_inference_data(args, spec, tokenizer) if datasets is None else datasets
    return evaluated_run(args, spec, model, device, datasets).finish()


def evaluated_run(args: argparse.Namespace, spec, model, device, datasets: dict[str, TensorDataset]
                  ) -> InferenceRun:
    """One setting's inference on `datasets`, complete but not yet reported (`finish`)."""
    setting = resolve_setting(args, model)
    evaluation = evaluate_routed(model, datasets, setting, device,
                                 evaluation_options(args, spec, device, datasets, setting))
    return InferenceRun(args, spec, evaluation, device)


def static_depth_reports(runs: dict[float, argparse.Namespace], spec, model, device,
                         datasets: dict[str, TensorDataset]) -> dict[float, InferenceRun]:
    """Static inference of one width at several depths ({depth: its flags}, same width, batch size and data)
    from one encoder pass per batch (`evaluate_static_depths`): each depth's report equals its own
    run_inference's, except the latency. The runs are complete but not yet reported (`finish`)."""
    return _shared_runs(evaluate_static_depths, runs, spec, model, device, datasets)


def exit_rule_reports(runs: dict, spec, model, device, datasets: dict[str, TensorDataset]) -> dict:
    """Gated inference with one class -> width map and batch size under several exit rules ({key: its flags}:
    none, or early exit at a threshold), the layers before the first off-ramp run once per batch
    (`evaluate_exit_rules`): each report equals its own run_inference's, except the latency. The runs are
    complete but not yet reported (`finish`)."""
    return _shared_runs(evaluate_exit_rules, runs, spec, model, device, datasets)


def _shared_runs(evaluate, runs: dict, spec, model, device, datasets: dict[str, TensorDataset]) -> dict:
    settings = {key: resolve_setting(args, model) for key, args in runs.items()}
    first = next(iter(runs))  # the settings share everything evaluation_options reads
    evaluations = evaluate(model, datasets, settings, device,
                           evaluation_options(runs[first], spec, device, datasets, settings[first]))
    return {key: InferenceRun(args, spec, evaluations[key], device) for key, args in runs.items()}
