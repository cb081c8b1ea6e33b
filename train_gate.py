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
import os
import time
from pathlib import Path

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
    parsed_command,
    progress,
    run_cli,
    setup_logging,
    validate_subnets,
    validate_task_args,
)
from routed_inference import (  # load_inference_data and static_depth_reports: for train_gate_new.py
    apply_config_file,
    apply_saved_defaults,
    load_inference_data,  # noqa: F401
    run_inference,
    static_depth_reports,  # noqa: F401
)
from run_folder import check_writable, clean_up_on_failure, prepare_output_dir
from transformers_ext import (
    DEFAULT_EXIT_THRESHOLD,
    default_off_ramps,
    dynamic_forward,
)
from transformers_ext.batching import in_dataset_order, length_sorted_batches, trim_padding
from transformers_ext.checkpoints import resume_checkpoint, save_checkpoint
from transformers_ext.files import write_json
from transformers_ext.gates import (
    REFERENCE_CLASS_WEIGHTS,
    every_width_gate_loss,
    gate_inputs_and_correctness,
    gate_loss,
    gate_targets,
    gates_on,
    gumbel_softmax_probs,
    histogram_class_weights,
    layers_per_gate,
    temperature_at,
)
from transformers_ext.loading import load_model
from transformers_ext.routing import MODES, TRAINED_DEPTHS  # noqa: F401 (MODES: for train_gate_new.py)
from transformers_ext.saving import model_card, save_model
from transformers_ext.trainer import (
    Hooks,
    Schedule,
    build_optimizer,
    fit,
    precision_name,
    set_seed,
    setup_device,
    setup_numerics,
    train_metrics,
    trainer_state,
)
from utils_glue import epoch_batches, num_batches

logger = logging.getLogger("flexbert")
RESULTS_FILE = "gate_results.json"


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


# ---- gate training -----------------------------------------------------------------------------------------
# Gate inputs are kept in memory when they fit; larger sets (MNLI, QQP, augmented data) recompute per batch.
GATE_CACHE_BYTES = 4 * 2**30


class GateInputs:
    """The [CLS] vectors the gates read at every gate-setting width, `[C, G, B, h]` for a batch of example
    indices, and each width's correctness `[C, N]` (hence the targets). With the backbone frozen and in eval
    mode these are fixed, so they are computed once when they fit in GATE_CACHE_BYTES; otherwise, and with
    `backbone_dropout` (fresh dropout noise per batch, as the reference), they are recomputed per batch."""

    def __init__(self, model, dataset, args, device, backbone_dropout: bool = False):
        self.model, self.dataset, self.args, self.device = model, dataset, args, device
        self.backbone_dropout = backbone_dropout
        size = len(args.gate_setting) * model.config.num_gates * len(dataset) * model.config.hidden_size * 4
        keep = size <= GATE_CACHE_BYTES and not backbone_dropout
        states, correct, indices = [], [], []
        for idx, batch in progress(list(length_sorted_batches(dataset, args.per_gpu_eval_batch_size)),
                                   desc="gate inputs and targets", leave=False):
            s, c = self._compute(batch, dropout=False)
            correct.append(c.cpu())
            indices.append(idx)
            if keep:
                states.append(s.cpu())
        self.correct = in_dataset_order(correct, indices, dim=1)
        self.targets = gate_targets(self.correct[:-1])
        self.states = in_dataset_order(states, indices, dim=2) if keep else None
        if device.type == "cuda":  # page-locked: each batch's copy to the GPU runs asynchronously
            self.targets = self.targets.pin_memory()
            self.states = None if self.states is None else self.states.pin_memory()

    def _compute(self, batch, dropout: bool) -> tuple[torch.Tensor, torch.Tensor]:
        self.model.train(dropout)
        try:
            return gate_inputs_and_correctness(self.model, [t.to(self.device) for t in trim_padding(batch)],
                                               self.args.gate_setting, self.args.regression_threshold)
        finally:
            self.model.eval()

    def __len__(self) -> int:
        return len(self.targets)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(states `[C, G, B, h]`, targets `[B]`) on the device, for example indices `idx`."""
        if self.states is not None:
            states = self.states[:, :, idx]
            states = states.pin_memory() if self.states.is_pinned() else states  # indexing un-pins
        else:
            states = self._compute([t[idx] for t in self.dataset.tensors], self.backbone_dropout)[0]
        targets = self.targets[idx]
        targets = targets.pin_memory() if self.targets.is_pinned() else targets
        return states.to(self.device, non_blocking=True), targets.to(self.device, non_blocking=True)


def gate_epoch_loss(model, states, targets, weights, temperature, generator=None, rule: str = "reference"
                    ) -> tuple[torch.Tensor, list]:
    """Summed weighted loss over widths (descending) for one batch of precomputed gate inputs, plus the
    per-width losses. `states`: [C, G, B, h]; `rule`: --gate_loss."""
    per_width = []
    weight_tensor = torch.tensor(weights, device=states.device)
    for k in reversed(range(states.shape[0])):
        probs = gumbel_softmax_probs(gates_on(model.gates, states[k]), temperature, generator)
        if rule == "every_width":
            per_width.append(every_width_gate_loss(probs, targets, weight_tensor))
        else:
            per_width.append(gate_loss(probs, targets, k, weights[k]))
    return sum(per_width), per_width


def class_weights(args: argparse.Namespace, spec, targets: torch.Tensor | None, num_classes: int
                  ) -> list[float] | None:
    """--gate_class_weights for `num_classes` gate classes. Called by main() without targets to validate the
    flag before any work (None for 'histogram', which needs the targets)."""
    if args.gate_class_weights == "histogram":
        if targets is None:
            return None
        return clip_weights(histogram_class_weights(targets, num_classes), args.max_class_weight)
    if args.gate_class_weights == "reference":
        if spec.name not in REFERENCE_CLASS_WEIGHTS or num_classes != 4:
            raise CLIError(f"--gate_class_weights reference has no row for {spec.name} with {num_classes} classes")
        return clip_weights(REFERENCE_CLASS_WEIGHTS[spec.name], args.max_class_weight)
    try:
        weights = [NON_NEGATIVE(x) for x in args.gate_class_weights.split(",")]
    except argparse.ArgumentTypeError as err:
        raise CLIError(f"--gate_class_weights '{args.gate_class_weights}' is not histogram, reference or "
                       f"a comma list of numbers >= 0 ({err})") from None
    if len(weights) != num_classes:
        raise CLIError(f"--gate_class_weights has {len(weights)} values for {num_classes} classes")
    if not sum(weights) > 0:
        raise CLIError(f"--gate_class_weights {args.gate_class_weights}: every weight is 0")
    return clip_weights(weights, args.max_class_weight)


def clip_weights(weights: list[float], cap: float | None) -> list[float]:
    """--max_class_weight: each weight at most `cap` (None: unchanged)."""
    return list(weights) if cap is None else [min(float(w), cap) for w in weights]


def train_gates(args: argparse.Namespace, spec, model, tokenizer, device, rank: int = 0, world: int = 1) -> None:
    if [round(w, 6) for w in args.width_mult_list] != [round(w, 6) for w in args.gate_setting]:
        raise CLIError(
            f"--gate_setting {args.gate_setting} must equal --width_mult_list {args.width_mult_list} when "
            "training gates (same length and values)"
        )
    if len(args.gate_setting) < 2:
        raise CLIError("--gate_setting needs at least two widths for gates to choose between")
    output_dir = prepare_output_dir(args, RESULTS_FILE, create=False)  # created once input is validated
    num_layers = model.config.num_hidden_layers
    num_gates = args.num_gates or num_layers
    if num_gates < 1 or num_layers % num_gates:
        raise CLIError(f"--num_gates {num_gates} must divide the model's {num_layers} layers")
    model.add_gates(args.gate_setting, num_gates)
    model.to(device)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("gates."))
    model.eval()
    is_main = rank == 0

    load = dict(tokenizer=tokenizer, max_seq_length=args.max_seq_length, cache_dir=args.cache_dir)
    train_set = utils_glue.load_dataset(args.task_name, args.data_dir, "aug" if args.data_aug else "train",
                                        max_examples=args.max_train_samples, **load)
    dev_splits = ["dev", "dev_mm"] if spec.name == "MNLI" else ["dev"]
    dev_sets = [utils_glue.load_dataset(args.task_name, args.data_dir, s, max_examples=args.max_eval_samples, **load)
                for s in dev_splits]
    num_classes = len(args.gate_setting)
    schedule = Schedule.make(num_batches(train_set, args.per_gpu_train_batch_size, world),  # checked before the
                             args.gradient_accumulation_steps, args.num_train_epochs)  # gate inputs are computed

    logger.info("computing gate targets: %d widths x %d train + %d dev examples", num_classes, len(train_set),
                sum(len(d) for d in dev_sets))
    train_inputs = GateInputs(model, train_set, args, device, backbone_dropout=args.backbone_dropout)
    dev_inputs = [GateInputs(model, d, args, device) for d in dev_sets]
    train_targets = train_inputs.targets
    hist = torch.bincount(train_targets, minlength=num_classes).tolist()
    logger.info("train target histogram (class: count): %s", dict(zip(args.gate_setting, hist, strict=True)))
    weights = class_weights(args, spec, train_targets, num_classes)
    logger.info("class weights: %s", [round(w, 3) for w in weights])

    set_seed(args.seed)
    batch_size = args.per_gpu_train_batch_size
    n_train = len(train_targets)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, args.learning_rate, args.weight_decay, args.warmup_steps,
                                           schedule.total_updates)
    resume = None
    if args.resume_from_checkpoint:
        ckpt, resume = resume_checkpoint(output_dir, args.resume_from_checkpoint, model, device, vars(args), optimizer)
        logger.info("resumed from %s at step %d", ckpt, resume["global_step"])
    output_dir.mkdir(parents=True, exist_ok=True)
    # one run folder per phase (and run), as run_glue.py: runs of different phases never overlay
    writer = SummaryWriter(str(output_dir / "runs" / f"traingate_{time.strftime('%Y%m%d-%H%M%S')}")) \
        if is_main else None
    temperature = 1.0
    # Train-time states as a dataset of indices so the shared batching gives a seeded random order.
    index_set = torch.utils.data.TensorDataset(torch.arange(n_train))

    def validate() -> dict:
        model.gates.eval()
        # The same Gumbel noise at every validation, from its own generator seeded by --seed: scores differ
        # only by the gates, and validation draws nothing from the training stream (nor do reruns, resumes
        # or another --logging_steps change which gates are kept).
        noise = torch.Generator(device=device).manual_seed(args.seed)
        with torch.no_grad():
            totals, correct, count = [], torch.zeros(num_gates), 0
            for inputs in dev_inputs:
                split_loss, n_batches = torch.zeros(num_classes), 0
                for start in range(0, len(inputs), args.per_gpu_eval_batch_size):
                    idx = torch.arange(start, min(start + args.per_gpu_eval_batch_size, len(inputs)))
                    batch_states, batch_targets = inputs.batch(idx)
                    _, per_width = gate_epoch_loss(model, batch_states, batch_targets, weights, temperature,
                                                   noise, rule=args.gate_loss)
                    split_loss += torch.stack(per_width[::-1]).cpu()
                    n_batches += 1
                    # gate accuracy: each gate's argmax on the full-width states against the target
                    logits = gates_on(model.gates, batch_states[-1])
                    correct += (logits.argmax(-1) == batch_targets).float().sum(1).cpu()
                    count += len(batch_targets)
                totals.append(split_loss.mean() / n_batches)
        model.gates.train()
        return {"loss": float(sum(totals) / len(totals)), "gate_acc": (correct / count).tolist()}

    def evaluate(state) -> tuple[float, dict]:
        val = validate()
        if writer is not None:
            writer.add_scalar("eval/loss", val["loss"], state.global_step)
            for g, acc in enumerate(val["gate_acc"]):
                writer.add_scalar(f"eval/gate_acc/{g}", acc, state.global_step)
        logger.info("step %d: dev gate loss %.4f%s; gate accuracy per gate %s", state.global_step, val["loss"],
                    " (best)" if -val["loss"] > state.best_score else "", [round(a, 3) for a in val["gate_acc"]])
        return -val["loss"], {"step": state.global_step, **val}

    best_gates: dict[str, torch.Tensor] = {}

    def on_best(state, record) -> None:
        best_gates.update({k: v.detach().clone() for k, v in model.gates.state_dict().items()})
        save_gated_model(args, model, tokenizer, output_dir)

    def write_results(state, record=None, improved=False, extra: dict | None = None) -> None:
        write_json(output_dir / RESULTS_FILE, {
            "task": spec.name, "gate_setting": args.gate_setting, "num_gates": num_gates, "class_weights": weights,
            "gate_loss": args.gate_loss, "train_target_histogram": hist, "best_dev_loss": -state.best_score,
            "history": state.history, **(extra or {}),
        })
        # Hugging Face's result files beside ours (train_* once training ended), as run_glue.py writes them
        best = max(state.history, key=lambda r: -r["loss"])
        train = None if record is not None else train_metrics(state, schedule, n_train, time.time() - train_start)
        write_json(output_dir / "all_results.json", {**gate_eval_results(best), **(train or {})})
        write_json(output_dir / "trainer_state.json", trainer_state(state, schedule, gate_eval_results,
                                                                    args.logging_steps, best["step"], train))

    def before_batch(state) -> None:
        nonlocal temperature
        temperature = temperature_at(state.global_step, n_train, batch_size, schedule.epochs, temperature)

    def batch_losses(batch, state):
        states, targets = train_inputs.batch(batch[0])
        yield "gates", gate_epoch_loss(model, states, targets, weights, temperature, rule=args.gate_loss)[0]
        if writer is not None:
            writer.add_scalar("train/temperature", temperature, state.global_step + 1)

    def load_extra_state(saved: dict) -> None:
        nonlocal temperature
        temperature = saved["temperature"]

    hooks = Hooks(
        before_batch=before_batch, evaluate=evaluate, after_evaluate=write_results,
        on_best=on_best,
        save_checkpoint=lambda state: save_checkpoint(output_dir, model, tokenizer, {**state, "args": vars(args)}),
        extra_state=lambda: {"temperature": temperature}, load_extra_state=load_extra_state,
    )
    model.gates.train()
    train_start = time.time()
    state = fit(params=params, optimizer=optimizer, scheduler=scheduler, schedule=schedule,
        batches=lambda epoch, start: epoch_batches(index_set, batch_size, args.seed, epoch, rank=rank, world=world,
                                                   start_batch=start),
        losses=batch_losses, hooks=hooks, eval_every=args.logging_steps, resume=resume, world=world,
        is_main=is_main, precision=precision_name(args),
        device_type=device.type, writer=writer, desc=f"traingate {spec.name}", log_every=args.logging_steps)
    if writer is not None:
        writer.close()
    if is_main and best_gates:  # how the best gates route dev examples at inference (states of chosen widths)
        model.gates.load_state_dict(best_gates)
        routed = routed_gate_report(model, dev_sets[0], dev_inputs[0].targets, args, device)
        logger.info("best gates on dev, routed as at inference: accuracy per gate %s, routing entropy per gate "
                    "%s (nats; 0 = every input gets the same width)", [round(a, 3) for a in routed["gate_acc"]],
                    [round(e, 3) for e in routed["routing_entropy"]])
        write_results(state, extra={"routed_dev": routed})
    logger.info("gates saved with the backbone to %s", output_dir)


@torch.no_grad()
def routed_gate_report(model, dataset, targets: torch.Tensor, args, device) -> dict:
    """Dev examples routed by the gates as at inference (each gate reads the state its predecessors' choices
    produced): per gate, the accuracy of the chosen class against the target, the histogram of chosen
    classes and its entropy."""
    chosen, indices = [], []
    for idx, batch in length_sorted_batches(dataset, args.per_gpu_eval_batch_size):
        ids, mask, types = (t.to(device) for t in batch[:3])
        out = dynamic_forward(model, ids, mask, types, class_to_width=args.gate_setting)
        chosen.append(out.width_class[:, :: layers_per_gate(model)].cpu())
        indices.append(idx)
    chosen = in_dataset_order(chosen, indices)  # [N, G]
    num_classes = len(args.gate_setting)
    counts = torch.stack([torch.bincount(chosen[:, g], minlength=num_classes) for g in range(chosen.shape[1])])
    probs = counts.float() / counts.sum(1, keepdim=True)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
    return {"gate_acc": (chosen == targets.view(-1, 1)).float().mean(0).tolist(),
            "class_histogram_per_gate": counts.tolist(), "routing_entropy": entropy.tolist(),
            "target_histogram": torch.bincount(targets, minlength=num_classes).tolist()}


def save_gated_model(args, model, tokenizer, output_dir: Path) -> None:
    """The backbone + gates, with the trained class -> width map and the off-ramps in config.json: inference
    reads them as defaults."""
    config = model.config
    config.gate_class_to_width = list(args.gate_setting)
    if args.exit_threshold is not None:
        config.exit_threshold = args.exit_threshold
    config.off_ramps = args.off_ramps or default_off_ramps(config.num_hidden_layers, TRAINED_DEPTHS)
    card = model_card(task=utils_glue.get_task(args.task_name).name, phase="traingate", base_model=args.model_dir,
                      config=config, command=parsed_command(),
                      notes=["gated inference: train_gate.py --do_eval --model_dir FOLDER --w_dynamic or "
                             "--wd_dynamic --early_exit; a static setting: export_subnet.py"])
    save_model(model, tokenizer, output_dir, {"training_args.json": json.dumps(vars(args), indent=2, default=str),
                                              "README.md": card})


def gate_eval_results(record: dict) -> dict:
    """One gate evaluation as flat eval_* values (HF's all_results.json / log_history)."""
    return {"eval_loss": record["loss"], **{f"eval_gate_acc_{g}": a for g, a in enumerate(record["gate_acc"])}}


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
    if args.do_train:
        class_weights(args, spec, None, len(args.gate_setting))
    layers = model.config.num_hidden_layers
    if args.off_ramps is not None and max(args.off_ramps) >= layers:  # saved into the gate folder's config
        raise CLIError(f"--off_ramps {','.join(map(str, args.off_ramps))} must be layers 0..{layers - 1} of "
                       f"--model_dir {args.model_dir}")
    with clean_up_on_failure(args.output_dir):
        if args.do_train:
            train_gates(args, spec, model, tokenizer, device, rank, world)
        else:
            run_inference(args, spec, model, tokenizer, device)


if __name__ == "__main__":
    run_cli(main)
