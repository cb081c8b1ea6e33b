"""Train width gates on a frozen flexible BERT (--do_train --training_phase traingate), or run inference
(--do_eval) in one of four modes (SPEC §5-6):

  --static                  one fixed subnet: --width_mult_list of identical widths, one --depth_mult_list
  --w_dynamic               gates choose each layer's width among --width_mult_list (class -> width), depth 1
  --d_dynamic --early_exit  fixed width, entropy-based early exit at the off-ramps
  --wd_dynamic [--early_exit --exit_threshold T]   both

Inference prints the task metrics, the FLOPs of the path each example took (reference unit and true
FLOPs, relative to the full model), width/exit histograms and latency, and writes
output_dir/inference_results.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from tensorboardX import SummaryWriter
from torch.utils.data import TensorDataset

import utils_glue
from cli import (
    COUNT,
    MULTIPLIER,
    NON_NEGATIVE,
    POSITIVE,
    STEPS,
    ArgumentParser,
    CLIError,
    add_task_args,
    add_training_args,
    finish_training_args,
    layer_list,
    model_options,
    multiplier_list,
    parsed_command,
    progress,
    run_cli,
    setup_logging,
    validate_subnets,
    validate_task_args,
)
from run_folder import check_writable, clean_up_on_failure, prepare_output_dir
from transformers_ext import (
    DEFAULT_EXIT_THRESHOLD,
    StaticRouter,
    dynamic_forward,
    heads_kept,
    layers_kept,
    path_macs,
    static_output,
)
from transformers_ext.environment import (
    autocast,
    precision_name,
    set_seed,
    setup_device,
    setup_numerics,
    tf32_enabled,
)
from transformers_ext.files import write_json, write_text
from transformers_ext.flops import flops_summary
from transformers_ext.gate_training import RESULTS_FILE, GateTrainingConfig, RunRecord, check_config, train_gates
from transformers_ext.loading import load_model
from transformers_ext.routing import routing_defaults
from utils_glue import epoch_batches

logger = logging.getLogger("flexbert")
MODES = ("static", "w_dynamic", "d_dynamic", "wd_dynamic")


def build_parser(description: str | None = __doc__) -> ArgumentParser:
    """train_gate.py's flags (inference_sweep.py adds its own group to them)."""
    parser = ArgumentParser(description=description)
    add_task_args(parser)
    add_training_args(parser, learning_rate=2e-4, epochs=10.0, logging_steps=100, seed=200)
    a = parser.add_argument
    a("--do_eval", action="store_true", help="Run inference on the dev set (ignored with --do_train).")
    a("--do_predict", action="store_true",
      help="Inference on the test split too (test.tsv; MNLI test_matched.tsv and test_mismatched.tsv; or "
           "--test_file), in any mode: writes predict_results_<task>.txt (index<TAB>prediction, label names; "
           "regression: 3 decimals) into --output_dir, as Hugging Face run_glue does. Ignored with --do_train.")
    a("--save_predictions", action="store_true",
      help="Write predictions_<split>.jsonl for dev and (with --do_predict) test: per example its index, "
           "prediction, label (null if unknown), the width each layer ran at, heads per layer, layers executed, "
           "whether it exited early, and its MACs and FLOPs.")
    a("--width_mult_list", type=multiplier_list, default=None,
      help="Training: the gate classes' widths (= --gate_setting). Inference: class -> width map "
           "(C entries; untrained widths such as 0.55 allowed); default: the map the gates were trained with "
           "(dynamic modes) or 1.0 (static).")
    a("--depth_mult_list", type=multiplier_list, default=[1.0],
      help="Inference depth (one value; dynamic modes need 1.0).")
    a("--gate_setting", type=multiplier_list, default=[1.0],
      help="Widths whose correctness defines the gate targets; must match --width_mult_list for training.")
    a("--training_phase", default="dynabertw", help="'traingate' to train gates (with --do_train).")
    a("--num_gates", type=COUNT, default=None,
      help="Gates per model (a divisor of the layer count; default one per layer).")
    a("--gate_class_weights", default="histogram",
      help="'histogram' (N/(C*n_c) over training targets), 'reference' (the paper's per-task table) or a "
           "comma list of C weights.")
    a("--max_class_weight", type=POSITIVE, default=None,
      help="Clip every class weight to at most this. The histogram rule gives a class with n_c of N examples "
           "N/(C*n_c): 131 for 7 of 3,668 MRPC pairs, so a handful of examples outweigh the rest (default: no "
           "clipping, as the reference).")
    a("--regression_threshold", type=POSITIVE, default=0.5,
      help="Regression (STS-B) gate targets: a subnet is right if |prediction - label| < this.")
    a("--gate_loss", choices=["reference", "every_width"], default="every_width",
      help="Gate training loss. every_width: every example's target counts on the states of every width, so "
           "the gate must read the input; reference (SPEC 5.4): on the states of the all-width-k model only "
           "examples whose target is k count, so a gate can score by recognising the width of its input (on a "
           "tiny BERT with random targets the later gates did so at 98-100 %% and routed every input alike).")
    a("--backbone_dropout", action="store_true",
      help="Backbone dropout on while computing the training batches' gate inputs (the reference's train mode; "
           "recomputes them every batch instead of once). Targets are always computed in eval mode.")
    a("--fixed_gate", type=MULTIPLIER, default=None, help="Inference: force this width everywhere (gates not run).")
    a("--static", action="store_true", help="Static subnet inference.")
    a("--w_dynamic", action="store_true", help="Width-dynamic inference (gates), depth 1.0.")
    a("--d_dynamic", action="store_true", help="Depth-dynamic only: early exit at a fixed width.")
    a("--wd_dynamic", action="store_true", help="Width- and depth-dynamic inference (gates + --early_exit).")
    a("--early_exit", action="store_true", help="Exit at an off-ramp when the prediction entropy is low.")
    a("--exit_threshold", type=NON_NEGATIVE, default=None,
      help="Exit iff entropy (natural log) < this; regression (STS-B): iff the prediction moved less than "
           "this since the previous off-ramp (default: the gate folder's saved threshold, else "
           f"{DEFAULT_EXIT_THRESHOLD:g}). The entropy of C classes lies in [0, ln C] (0.69 for 2, 1.10 for 3, "
           "2.30 for 10): a threshold at or "
           "above ln C exits every example at the first off-ramp.")
    a("--off_ramps", type=layer_list, default=None,
      help="0-based layers followed by an off-ramp (default: last layer of each trained depth < 1, "
           "e.g. 5,8 for 12 layers; 2,3 for 6).")
    a("--record_gpu_time", action="store_true",
      help="Record latency: CUDA events around each batch's forward on GPU, wall-clock on CPU. The timed region "
           "is the routed forward (under --fp16/--bf16 autocast); MAC counting and copies are outside it.")
    a("--record_cpu_time", action="store_true", help="Record wall-clock latency per batch.")
    a("--timing_warmup", type=STEPS, default=None,
      help="Batches run before timing starts (excluded; default 1 on CPU, 10 on CUDA, where the first batches "
           "pay for kernel selection and allocator growth).")
    a("--config", default=None,
      help="JSON file such as best_tradeoff_inference_config.json: applies the task's width_mult_list, "
           "exit_threshold, mode and early_exit (types checked). A flag that contradicts the file (another mode, "
           "width list, threshold, or --early_exit where the file says false) is refused; equal values are fine.")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return utils_glue.setup_custom_task(finish_training_args(build_parser().parse_args(argv)))


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
    unknown = sorted(set(entry) - set(CONFIG_KEYS))
    if unknown:
        raise CLIError(f"{where}: unknown key(s) {', '.join(unknown)} for {spec.name} "
                       f"(known: {', '.join(CONFIG_KEYS)})")

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
        raise CLIError(f"{where}: unknown mode {json.dumps(mode)} for {spec.name} (one of {', '.join(MODES)})")
    early_exit = entry.get("early_exit", mode in ("wd_dynamic", "d_dynamic"))
    if not isinstance(early_exit, bool):
        raise bad("early_exit", "must be true or false (a JSON boolean)")

    def refuse(given: str, saved: str) -> CLIError:
        return CLIError(f"{given} contradicts {where}, which gives {saved} for {spec.name}; drop one")

    flagged = [m for m in MODES if getattr(args, m)]
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


# ---- gate training (transformers_ext.gate_training) ---------------------------------------------------------
def gate_training_config(args: argparse.Namespace, spec: utils_glue.TaskSpec, num_layers: int
                         ) -> GateTrainingConfig:
    """The gate-training options of the flags, checked before any work."""
    if [round(w, 6) for w in args.width_mult_list] != [round(w, 6) for w in args.gate_setting]:
        raise CLIError(
            f"--gate_setting {args.gate_setting} must equal --width_mult_list {args.width_mult_list} when "
            "training gates (same length and values)"
        )
    config = GateTrainingConfig(
        task=spec.name, gate_setting=list(args.gate_setting), num_gates=args.num_gates,
        class_weights=parse_class_weights(args.gate_class_weights), max_class_weight=args.max_class_weight,
        regression_threshold=args.regression_threshold, gate_loss=args.gate_loss,
        backbone_dropout=args.backbone_dropout, train_batch_size=args.per_gpu_train_batch_size,
        eval_batch_size=args.per_gpu_eval_batch_size, learning_rate=args.learning_rate,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, epochs=args.num_train_epochs,
        accumulation=args.gradient_accumulation_steps, logging_steps=args.logging_steps, seed=args.seed,
        precision=precision_name(args.fp16, args.bf16), exit_threshold=args.exit_threshold,
        off_ramps=args.off_ramps)
    check_config(config, num_layers)
    return config


def parse_class_weights(text: str) -> str | list[float]:
    """--gate_class_weights: "histogram", "reference" or a comma list of weights >= 0, not all 0."""
    if text in ("histogram", "reference"):
        return text
    try:
        weights = [NON_NEGATIVE(x) for x in text.split(",")]
    except argparse.ArgumentTypeError as err:
        raise CLIError(f"--gate_class_weights '{text}' is not histogram, reference or a comma list of numbers "
                       f">= 0 ({err})") from None
    if not sum(weights) > 0:
        raise CLIError(f"--gate_class_weights {text}: every weight is 0")
    return weights


def run_gate_training(args: argparse.Namespace, config: GateTrainingConfig, spec: utils_glue.TaskSpec, model,
                      tokenizer, device: torch.device, rank: int = 0, world: int = 1) -> None:
    """Gate training on the flags' data, into --output_dir."""
    output_dir = prepare_output_dir(args, RESULTS_FILE, create=False)  # created once input is validated
    load = dict(tokenizer=tokenizer, max_seq_length=args.max_seq_length, cache_dir=args.cache_dir)
    train_set = utils_glue.load_dataset(args.task_name, args.data_dir, "aug" if args.data_aug else "train",
                                        max_examples=args.max_train_samples, **load)
    dev_splits = ["dev", "dev_mm"] if spec.name == "MNLI" else ["dev"]
    dev_sets = [utils_glue.load_dataset(args.task_name, args.data_dir, s, max_examples=args.max_eval_samples, **load)
                for s in dev_splits]
    record = RunRecord(flags=vars(args), base_model=args.model_dir, command=parsed_command())
    train_gates(config, model, tokenizer, train_set, dev_sets, output_dir, record, device, rank, world,
                args.resume_from_checkpoint, SummaryWriter)


# ---- inference ---------------------------------------------------------------------------------------------
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


@dataclass
class RoutingChoice:
    """One inference setting, resolved and validated against the model: the mode, the class -> width map (None
    when every example runs at `fixed_width`), the depth and the off-ramps early exit would use."""

    mode: str
    class_to_width: list[float] | None
    fixed_width: float | None
    depth: float
    off_ramps: list[int]


def resolve_setting(args: argparse.Namespace, model) -> RoutingChoice:
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
    return RoutingChoice(mode, args.width_mult_list if fixed is None else None, fixed, depth, off_ramps)


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


class Stopwatch:
    """Latency of a forward: CUDA events with --record_gpu_time on a GPU, else wall-clock (synchronised on a
    GPU). `start()`, then `mark()` at points of interest; `seconds(mark)` is the time from start to the mark."""

    def __init__(self, device: torch.device, cuda_events: bool):
        self.device, self.cuda_events = device, cuda_events

    def start(self) -> None:
        if self.cuda_events:
            self.begin = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        elif self.device.type == "cuda":
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def mark(self):
        if self.cuda_events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - self.t0

    def seconds(self, mark) -> float:
        if self.cuda_events:
            torch.cuda.synchronize()
            return self.begin.elapsed_time(mark) / 1000
        return mark


class InferenceReport:
    """One setting's results gathered batch by batch (`add`), split by split (`end_split`), into the report that
    `finish` prints and writes (inference_results.json, prediction files)."""

    def __init__(self, args: argparse.Namespace, spec, model, setting: RoutingChoice, device: torch.device):
        self.args, self.spec, self.model, self.setting, self.device = args, spec, model, setting, device
        dev_splits, self.test_splits = inference_splits(args, spec)
        self.report_splits = dev_splits or self.test_splits
        self.cuda_events = args.record_gpu_time and device.type == "cuda"
        self.precision = precision_name(args.fp16, args.bf16)
        # a GPU needs several batches to reach its steady clock and caches; a CPU one
        self.warmup = args.timing_warmup if args.timing_warmup is not None else 10 if device.type == "cuda" else 1
        self.results, self.record = {}, {"heads": [], "exit": [], "classes": []}
        self.macs_sum = {"linear": 0.0, "attention": 0.0, "total": 0.0}
        self.batch_times, self.n_examples_timed, self.n_total = [], 0, 0
        self.test_logits, self.example_records = {}, {}

    def begin_split(self, split: str, num_examples: int) -> None:
        args = self.args
        self.logits_all, self.labels_all = [], []
        self.indices = example_indices(args, split, num_examples) \
            if (args.save_predictions or split in self.test_splits) else None

    def add(self, split: str, b: int, num_batches: int, labels: torch.Tensor, out, elapsed: float) -> None:
        args, setting = self.args, self.setting
        self.logits_all.append(out.logits.float().cpu())
        self.labels_all.append(labels.cpu())
        if args.save_predictions:
            start_index = b * args.per_gpu_eval_batch_size
            self.example_records.setdefault(split, []).extend(utils_glue.prediction_records(
                self.spec, split, self.indices[start_index : start_index + len(labels)], self.logits_all[-1],
                self.labels_all[-1], out, setting.class_to_width, setting.fixed_width))
        if split not in self.report_splits:
            return
        if b >= self.warmup or num_batches <= self.warmup:
            self.batch_times.append(elapsed)
            self.n_examples_timed += len(labels)
        for key in ("linear", "attention"):
            self.macs_sum[key] += float(getattr(out, f"{key}_macs").sum())
        self.macs_sum["total"] = self.macs_sum["linear"] + self.macs_sum["attention"]
        self.record["heads"].append(out.heads.cpu())
        self.record["exit"].append(out.exit_layer.cpu())
        self.record["classes"].append(out.width_class.cpu())
        self.n_total += len(labels)

    def end_split(self, split: str) -> None:
        logits, labels = torch.cat(self.logits_all), torch.cat(self.labels_all)
        if split in self.test_splits:
            self.test_logits[split] = (self.indices, logits)
            return
        metrics = utils_glue.compute_metrics(self.args.task_name, logits.numpy(), labels.numpy())
        loss = self.model.compute_loss(logits, labels).item()
        if split == "dev":
            self.results.update(metrics)
            self.results["eval_loss"] = loss
        else:
            self.results["acc_mm"] = metrics["acc"]

    def finish(self) -> dict:
        args, config, setting, results = self.args, self.model.config, self.setting, self.results
        fixed = setting.fixed_width
        full = path_macs(config, args.max_seq_length, [config.num_attention_heads] * config.num_hidden_layers)
        mean_macs = {k: v / self.n_total for k, v in self.macs_sum.items()}
        results.update(flops_summary(mean_macs, full))
        heads = torch.cat(self.record["heads"])
        exits = torch.cat(self.record["exit"])
        results["mean_layers_executed"] = float(exits.float().mean())
        results["exit_layer_histogram"] = {int(k): int(v) for k, v in sorted(Counter(exits.tolist()).items())}
        width_of_heads = {0: "skipped"}
        for w in sorted(set(args.width_mult_list) | ({fixed} if fixed else set())):
            width_of_heads.setdefault(heads_kept(config, w), f"{w:g}")
        results["width_histogram_per_layer"] = [
            {width_of_heads.get(int(k), str(int(k))): int(v) for k, v in sorted(Counter(heads[:, i].tolist()).items())}
            for i in range(config.num_hidden_layers)
        ]
        timed = args.record_gpu_time or args.record_cpu_time
        if self.batch_times and timed:
            total_time = sum(self.batch_times)
            results["latency_ms_per_batch"] = 1000 * total_time / len(self.batch_times)
            results["latency_ms_per_example"] = 1000 * total_time / self.n_examples_timed
            results["examples_per_second"] = self.n_examples_timed / total_time
            if self.cuda_events:
                results["gpu_latency"] = results["latency_ms_per_batch"]  # reference: ms per batch
            else:
                results["cpu_latency"] = total_time / len(self.batch_times)  # reference: seconds per batch
        report = {
            "task": self.spec.name, "mode": setting.mode, "width_mult_list": args.width_mult_list,
            "depth_mult": setting.depth, "early_exit": args.early_exit,
            "exit_threshold": args.exit_threshold if args.early_exit else None,
            "off_ramps": setting.off_ramps if args.early_exit else None, "fixed_width": fixed,
            "batch_size": args.per_gpu_eval_batch_size, "max_seq_length": args.max_seq_length,
            "device": str(self.device), "timing": ("cuda_events" if self.cuda_events else "wall_clock")
            if timed else None,
            "precision": self.precision, "tf32": tf32_enabled(self.device),
            "model_dir": args.model_dir, "num_examples": self.n_total, "results": results,
        }
        print_report(report)
        out_dir = Path(args.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "inference_results.json", report)
        write_predictions(args, self.spec, out_dir, self.test_logits, self.example_records)
        return report


def eval_batches(dataset: TensorDataset, batch_size: int) -> list[list[torch.Tensor]]:
    """Inference batches: file order, padded to --max_seq_length (the FLOPs unit), as the reference."""
    return list(epoch_batches(dataset, batch_size, 0, 0, shuffle=False))


def run_inference(args: argparse.Namespace, spec, model, tokenizer, device,
                  datasets: dict[str, TensorDataset] | None = None) -> dict:
    """One setting's inference (`datasets`: the splits' features when already loaded)."""
    setting = resolve_setting(args, model)
    datasets = load_inference_data(args, spec, tokenizer) if datasets is None else datasets
    model.to(device).eval()
    report = InferenceReport(args, spec, model, setting, device)
    stopwatch = Stopwatch(device, report.cuda_events)
    for split, dataset in datasets.items():
        report.begin_split(split, len(dataset))
        batches = eval_batches(dataset, args.per_gpu_eval_batch_size)
        for b, batch in enumerate(progress(batches, desc=f"{setting.mode} {spec.name} {split}", leave=False)):
            input_ids, attention_mask, token_type_ids, labels = (t.to(device) for t in batch)
            stopwatch.start()
            with autocast(report.precision, device.type):
                out = dynamic_forward(
                    model, input_ids, attention_mask, token_type_ids, class_to_width=setting.class_to_width,
                    fixed_width=setting.fixed_width, depth_mult=setting.depth, early_exit=args.early_exit,
                    exit_threshold=args.exit_threshold, off_ramps=setting.off_ramps,
                )
            report.add(split, b, len(batches), labels, out, stopwatch.seconds(stopwatch.mark()))
        report.end_split(split)
    return report.finish()


class _LayerClock:
    """A static router that marks the stopwatch after every layer (the latency of each depth's prefix)."""

    def __init__(self, subnet, stopwatch: Stopwatch):
        self.inner, self.stopwatch, self.marks = StaticRouter(subnet), stopwatch, []
        self.num_layers = subnet.num_layers

    def heads(self, layer_index: int, hidden: torch.Tensor, mask: torch.Tensor) -> int:
        return self.inner.heads(layer_index, hidden, mask)

    def after_layer(self, layer_index: int, hidden: torch.Tensor, mask: torch.Tensor) -> None:
        self.marks.append(self.stopwatch.mark())


@torch.no_grad()
def static_depth_reports(runs: dict[float, argparse.Namespace], spec, model, device,
                         datasets: dict[str, TensorDataset]) -> dict[float, InferenceReport]:
    """Static inference of one width at several depths ({depth: its flags}, same width, batch size and data)
    from one encoder pass per batch (`static_output`): each depth's report equals its own run_inference's,
    except the latency, which is the pass up to that depth's last layer plus its head. The reports are complete
    but not yet printed or written (`finish`)."""
    settings = {d: resolve_setting(args, model) for d, args in runs.items()}
    if any(s.mode != "static" for s in settings.values()) or len({s.fixed_width for s in settings.values()}) != 1:
        raise ValueError("static_depth_reports takes static settings of one width")
    any_args = next(iter(runs.values()))
    subnets = {d: model.subnet(s.fixed_width, d) for d, s in settings.items()}
    deepest = max(subnets.values(), key=lambda s: s.num_layers)
    model.to(device).eval()
    reports = {d: InferenceReport(args, spec, model, settings[d], device) for d, args in runs.items()}
    precision = next(iter(reports.values())).precision
    stopwatch = Stopwatch(device, any_args.record_gpu_time and device.type == "cuda")
    for split, dataset in datasets.items():
        for report in reports.values():
            report.begin_split(split, len(dataset))
        batches = eval_batches(dataset, any_args.per_gpu_eval_batch_size)
        for b, batch in enumerate(progress(batches, desc=f"static {spec.name} {split}", leave=False)):
            input_ids, attention_mask, token_type_ids, labels = (t.to(device) for t in batch)
            stopwatch.start()
            router = _LayerClock(deepest, stopwatch)
            with autocast(precision, device.type):
                states = model.encode(input_ids, attention_mask, token_type_ids, router)
            for d, subnet in subnets.items():
                head_start = stopwatch.mark()
                with autocast(precision, device.type):
                    out = static_output(model, input_ids, attention_mask, states, subnet)
                head = stopwatch.seconds(stopwatch.mark()) - stopwatch.seconds(head_start)
                prefix = stopwatch.seconds(router.marks[subnet.num_layers - 1])
                reports[d].add(split, b, len(batches), labels, out, prefix + head)
        for report in reports.values():
            report.end_split(split)
    return reports


def example_indices(args: argparse.Namespace, split: str, n: int) -> list[str]:
    """The keys of a split's examples in prediction files: a test file's index column (GLUE's `index`, QQP's
    `id`; for your own file index/idx/id, else the row number), a dev example's position from 0."""
    if split.startswith("test"):
        examples = utils_glue.get_examples(args.task_name, args.data_dir, split)
        if len(examples) != n:  # the features are built from the same examples: a mismatch is a bug
            raise RuntimeError(f"{split}: {len(examples)} examples but {n} features")
        return [e.index for e in examples]
    return [str(i) for i in range(n)]


def write_predictions(args: argparse.Namespace, spec, out_dir: Path, test_logits: dict, example_records: dict
                      ) -> None:
    """predict_results_<task>.txt per test split (Hugging Face run_glue's format) and, with
    --save_predictions, predictions_<split>.jsonl (one JSON object per example), each written atomically."""
    for split, (indices, logits) in test_logits.items():
        path = out_dir / utils_glue.predictions_file_name(args.task_name, split)
        write_text(path, utils_glue.predictions_text(spec, indices, utils_glue.prediction_values(spec, logits)))
        print(f" test predictions ({split}, {len(indices)} examples): {path}")
    for split, rows in example_records.items():
        path = out_dir / f"predictions_{split}.jsonl"
        write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        print(f" per-example predictions ({split}): {path}")


def print_report(report: dict) -> None:
    mode_line = {
        "static": "static subnet inference.", "w_dynamic": "width-dynamic inference.",
        "d_dynamic": "depth-dynamic inference.", "wd_dynamic": "width- and depth-dynamic inference.",
    }[report["mode"]]
    print(f"***** Eval results: {report['task']} *****")
    print(mode_line)
    if report["early_exit"]:
        print(f" early exit threshold: {report['exit_threshold']}")
    else:
        print(f" depth ratio: [{report['depth_mult']}]")
    print(f" width ratios: {report['width_mult_list']}")
    for key in sorted(report["results"]):
        value = report["results"][key]
        if isinstance(value, float):
            print(f"  {key} = {value:.6g}")
        elif key != "width_histogram_per_layer":
            print(f"  {key} = {value}")
    for i, hist in enumerate(report["results"]["width_histogram_per_layer"]):
        print(f"  layer {i} widths: {hist}")


def main(argv: list[str] | None = None) -> None:
    """Flags are range-checked while parsing and --config is checked against them; the model folder is
    validated completely and the output folder checked (writable; for training, not another run's, not the
    input) before the work starts; a failed run removes the output folder it created (unless a checkpoint
    there can be resumed)."""
    args = parse_args(argv)
    setup_logging(int(os.environ.get("RANK", "0")))
    spec = validate_task_args(args)
    if spec.is_custom:
        logger.info(utils_glue.describe_task(spec))
    if args.config:
        apply_config_file(args, spec)
    if args.do_train and args.training_phase != "traingate":
        raise CLIError(f"--do_train in train_gate.py trains gates: pass --training_phase traingate "
                       f"(got '{args.training_phase}'; use run_glue.py for the backbone phases)")
    if not (args.do_train or args.do_eval or args.do_predict):
        raise CLIError("nothing to do: pass --do_train (train gates), --do_eval (inference on dev) or "
                       "--do_predict (predictions on test)")
    if args.do_train and (args.do_predict or args.save_predictions):
        logger.warning("--do_predict / --save_predictions apply to inference; ignored with --do_train")
    if not args.do_train:  # inference writes its results at the end: an unusable folder is reported now
        check_writable(args.output_dir)
    device, rank, world = setup_device(args.cpu, args.num_threads)
    if args.fp16 and device.type != "cuda":
        raise CLIError("--fp16 needs a CUDA device; use --bf16 on CPU")
    setup_numerics(device, args.tf32, args.deterministic)
    set_seed(args.seed)
    model, tokenizer = load_model(args.model_dir, spec, **model_options(args))
    apply_saved_defaults(args, model)
    widths = {"--width_mult_list": args.width_mult_list, "--gate_setting": args.gate_setting}
    if args.fixed_gate is not None:
        widths["--fixed_gate"] = [args.fixed_gate]
    validate_subnets(model.config, widths, {"--depth_mult_list": args.depth_mult_list})
    gate_config = gate_training_config(args, spec, model.config.num_hidden_layers) if args.do_train else None
    layers = model.config.num_hidden_layers
    if args.off_ramps is not None and max(args.off_ramps) >= layers:  # saved into the gate folder's config
        raise CLIError(f"--off_ramps {','.join(map(str, args.off_ramps))} must be layers 0..{layers - 1} of "
                       f"--model_dir {args.model_dir}")
    with clean_up_on_failure(args.output_dir):
        if args.do_train:
            run_gate_training(args, gate_config, spec, model, tokenizer, device, rank, world)
        else:
            run_inference(args, spec, model, tokenizer, device)


if __name__ == "__main__":
    run_cli(main)
