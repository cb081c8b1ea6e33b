"""Train width gates on a frozen flexible BERT (--do_train --training_phase traingate), or run inference
(--do_eval) in one of four modes (SPEC §5-6):

  --static                  one fixed subnet: --width_mult_list of identical widths, one --depth_mult_list
  --w_dynamic               gates choose each layer's width among --width_mult_list (class -> width), depth 1
  --d_dynamic --early_exit  fixed width, entropy-based early exit at the off-ramps
  --wd_dynamic [--early_exit --exit_threshold T]   both
  --cascade w0.25_d0.5,w0.75_d0.75 --cascade_thresholds 0.3   a confidence cascade of static subnets

Inference prints the task metrics, the FLOPs of the path each example took (reference unit and true
FLOPs, relative to the full model), width/exit histograms and latency, and writes
output_dir/inference_results.json.
"""

from __future__ import annotations

import argparse
import logging
import os

import torch
from tensorboardX import SummaryWriter

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
    non_negative_list,
    parsed_command,
    run_cli,
    setup_logging,
    setup_run_device,
    subnet_list,
    validate_subnets,
    validate_task_args,
)
from routed_inference import (
    apply_config_file,
    apply_saved_defaults,
    check_cascade_flags,
    run_inference,
)
from run_folder import check_writable, clean_up_on_failure, prepare_output_dir
from transformers_ext import DEFAULT_EXIT_THRESHOLD
from transformers_ext.cascade import CLASSIFICATION_RULES, REGRESSION_RULES
from transformers_ext.environment import precision_name, set_seed
from transformers_ext.gate_training import RESULTS_FILE, GateTrainingConfig, RunRecord, check_config, train_gates
from transformers_ext.loading import load_model

logger = logging.getLogger("flexbert")


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
    a("--skip_train_samples", type=STEPS, default=0,
      help="Gate training: skip the first N training examples (file order) -- those the backbone trained on, "
           "e.g. its stages' --max_train_samples -- so that the gate targets say which width is right on "
           "sentences the backbone has not memorised; --max_train_samples then counts from example N. Refused "
           "when no example is left. With --data_aug it counts the original examples first: the augmented "
           "ones (appended after them, also those made from skipped sentences) are kept.")
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
    a("--cascade", type=subnet_list, default=None,
      help="Confidence-cascade inference (no gates): static subnets w<width>_d<depth>, comma-separated, cheap to "
           "expensive (each strictly more FLOPs). Every example runs the first; one whose uncertainty is at or "
           "above that step's --cascade_thresholds value runs the next (from the embeddings: nothing is reused), "
           "and so on; the last stage answers for everyone left. FLOPs count every stage an example ran. Not "
           "with --static/--w_dynamic/--d_dynamic/--wd_dynamic/--early_exit/--fixed_gate/--width_mult_list.")
    a("--cascade_thresholds", type=non_negative_list, default=None,
      help="With --cascade: one threshold per step (stages - 1); an example keeps a stage's answer iff its "
           "uncertainty < the threshold (0: always escalate). max_softmax: 1 - top probability, in [0, 1 - 1/C]; "
           "entropy: nats, in [0, ln C]; agreement (regression): |prediction - previous stage's|.")
    a("--cascade_rule", choices=CLASSIFICATION_RULES + REGRESSION_RULES, default=None,
      help="With --cascade: the uncertainty (default: max_softmax for classification, agreement for "
           "regression; the first stage of an agreement cascade answers for nobody).")
    a("--config", default=None,
      help="JSON file such as best_tradeoff_inference_config.json: applies the task's width_mult_list, "
           "exit_threshold, mode and early_exit (types checked), or for mode \"cascade\" its cascade_stages "
           "([[width, depth], ...]), cascade_thresholds and cascade_rule. A flag that contradicts the file "
           "(another mode, width list, threshold, or --early_exit where the file says false) is refused; equal "
           "values are fine.")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return utils_glue.setup_custom_task(finish_training_args(build_parser().parse_args(argv)))


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
                                        max_examples=args.max_train_samples, skip_examples=args.skip_train_samples,
                                        **load)
    if args.skip_train_samples:  # said only when asked for: a bad-input answer stays one line
        first = args.skip_train_samples
        logger.info("gate targets from training examples %d..%d (0-based, file order)", first,
                    first + len(train_set) - 1)
    dev_splits = ["dev", "dev_mm"] if spec.name == "MNLI" else ["dev"]
    dev_sets = [utils_glue.load_dataset(args.task_name, args.data_dir, s, max_examples=args.max_eval_samples, **load)
                for s in dev_splits]
    record = RunRecord(flags=vars(args), base_model=args.model_dir, command=parsed_command())
    train_gates(config, model, tokenizer, train_set, dev_sets, output_dir, record, device, rank, world,
                args.resume_from_checkpoint, SummaryWriter)


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
    check_cascade_flags(args)
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
    device, rank, world = setup_run_device(args)
    set_seed(args.seed)
    model, tokenizer = load_model(args.model_dir, spec, **model_options(args))
    apply_saved_defaults(args, model)
    widths = {"--width_mult_list": args.width_mult_list, "--gate_setting": args.gate_setting}
    depths = {"--depth_mult_list": args.depth_mult_list}
    if args.fixed_gate is not None:
        widths["--fixed_gate"] = [args.fixed_gate]
    if args.cascade:
        widths["--cascade"], depths["--cascade"] = zip(*args.cascade, strict=True)
    validate_subnets(model.config, widths, depths)
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
