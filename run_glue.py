"""Train a BERT whose width- and depth-subnets all work (SPEC §2-4).

Phases (--training_phase):
  finetuning        ordinary fine-tuning of a pretrained BERT: the task-specific teacher (ours, not in the
                    reference, which expects a downloaded one)
  dynabertw         rewire heads/neurons by importance, then train all widths at full depth; distil from the
                    teacher with --data_aug, else gold labels; --graft_during_training applies neural grafting
  dynabert          all depth x width subnets, distilled from the width-adaptive model
  final_finetuning  gold labels for all subnets

Depth subnets are prefixes of each other, so by default one forward per width serves every depth: the head
is applied after each depth's last layer, the depths' losses are summed and backpropagated once
(--separate_subnet_passes runs one forward and backward per subnet instead, as the reference).
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tensorboardX import SummaryWriter

import utils_glue
from cli import (
    COUNT,
    MULTIPLIER,
    NON_NEGATIVE,
    STEPS,
    ArgumentParser,
    CLIError,
    add_task_args,
    add_training_args,
    finish_training_args,
    model_options,
    multiplier_list,
    parsed_command,
    run_cli,
    setup_logging,
    setup_run_device,
    str2bool,
    validate_subnets,
    validate_task_args,
)
from routed_inference import PredictionRecords
from run_folder import check_writable, clean_up_on_failure, prepare_output_dir
from transformers_ext import compute_importance, graft, rewire
from transformers_ext.batching import trim_padding
from transformers_ext.checkpoints import resume_checkpoint, save_checkpoint
from transformers_ext.distillation import hidden_mse_loss, logit_kd_loss, teacher_layer_map
from transformers_ext.environment import precision_name, set_seed
from transformers_ext.evaluation import (
    EvaluationOptions,
    evaluate_routed,
    evaluate_subnets,
    format_subnet_table,
    subnet_key,
)
from transformers_ext.files import write_json, write_text
from transformers_ext.loading import load_model
from transformers_ext.routing import RoutingSetting, record_trained_depths
from transformers_ext.saving import model_card, save_model
from transformers_ext.trainer import (
    Hooks,
    Schedule,
    build_optimizer,
    check_finite,
    fit,
    flat_eval_results,
    train_metrics,
    trainer_state,
)

logger = logging.getLogger("flexbert")
RESULTS_FILE = "eval_results.json"


# ---- phases --------------------------------------------------------------------------------------------------
def gold_loss(args, model, logits, hidden_states, labels, teacher_out, depth) -> torch.Tensor:
    return model.compute_loss(logits, labels)


def width_distil_loss(args, model, logits, hidden_states, labels, teacher_out, depth) -> torch.Tensor:
    """dynabertw with --data_aug or --width_distil always: logit KD + hidden-state MSE layer by layer; else
    gold labels (no teacher)."""
    if teacher_out is None:
        return gold_loss(args, model, logits, hidden_states, labels, teacher_out, depth)
    layer_map = list(range(len(hidden_states)))
    return args.width_lambda1 * logit_kd_loss(logits, teacher_out.logits) + args.width_lambda2 * (
        hidden_mse_loss(hidden_states, teacher_out.hidden_states, layer_map))


def depth_distil_loss(args, model, logits, hidden_states, labels, teacher_out, depth) -> torch.Tensor:
    """dynabert: logit KD + hidden-state MSE against the teacher layers m(j) = floor(j / d)
    (--depth_hidden_kd last: the last kept state against the teacher's last only; none: logit KD only)."""
    kd = args.depth_lambda1 * logit_kd_loss(logits, teacher_out.logits)
    if args.depth_hidden_kd == "none":
        return kd
    layer_map = teacher_layer_map(len(hidden_states) - 1, depth, model.config.num_hidden_layers)
    if args.depth_hidden_kd == "last":
        hidden_states, layer_map = hidden_states[-1:], layer_map[-1:]
    return kd + args.depth_lambda2 * hidden_mse_loss(hidden_states, teacher_out.hidden_states, layer_map)


@dataclass(frozen=True)
class Phase:
    loss: Callable  # (args, model, logits, hidden_states, labels, teacher_out, depth) -> loss of one subnet
    teacher: str  # "never", "with_aug" (with --data_aug, or --width_distil always) or "always"
    train_widths: bool  # train --width_mult_list (else full width only)
    train_depths: bool  # train --depth_mult_list (else full depth only)
    rewire: bool  # rewire by importance before training; the only phase that may graft
    data_aug: bool  # --data_aug applies


PHASES: dict[str, Phase] = {
    "finetuning": Phase(gold_loss, "never", False, False, False, True),
    "dynabertw": Phase(width_distil_loss, "with_aug", True, False, True, True),
    "dynabert": Phase(depth_distil_loss, "always", True, True, False, True),
    "final_finetuning": Phase(gold_loss, "never", True, True, False, False),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="run_glue.py", description=__doc__)
    add_task_args(parser)
    add_training_args(parser, learning_rate=2e-5, epochs=3.0, logging_steps=400, seed=42)
    a = parser.add_argument
    a("--evaluate_during_training", type=str2bool, nargs="?", const=True, default=True,
      help="Evaluate every --logging_steps updates (true/false); the end of training is always evaluated.")
    a("--eval_on_start", action="store_true",
      help="Also evaluate every subnet before the first update (as Hugging Face's flag); that evaluation competes "
           "for the best model, so final_finetuning in place keeps its input model unless training beats it.")
    a("--max_steps", type=STEPS, default=0,
      help="If > 0: stop after this many updates, overriding --num_train_epochs (the learning rate decays to 0 "
           "over them; grafting keeps SPEC's per-epoch schedule), e.g. to compare runs at equal cost.")
    a("--width_mult_list", type=multiplier_list, default=[0.25, 0.5, 0.75, 1.0],
      help="Width multipliers trained and evaluated (comma list).")
    a("--depth_mult_list", type=multiplier_list, default=[1.0], help="Depth multipliers (comma list).")
    a("--training_phase", choices=list(PHASES), default="dynabertw", help="Which stage of the pipeline to run.")
    a("--depth_lambda1", type=NON_NEGATIVE, default=1.0, help="dynabert: weight of the logit distillation loss.")
    a("--depth_lambda2", type=NON_NEGATIVE, default=1.0, help="dynabert: weight of the hidden-state MSE loss.")
    a("--depth_hidden_kd", choices=["layer_map", "last", "none"], default="layer_map",
      help="dynabert's hidden-state MSE: layer_map (SPEC: every kept state j against teacher layer floor(j/d); "
           "shallow depths pull the shared prefix layers toward different teacher layers), last (only the last "
           "kept state, against the teacher's last) or none (logit KD only).")
    a("--width_distil", choices=["with_aug", "always"], default="with_aug",
      help="dynabertw: distil every width from the teacher (the input model, full width) only with --data_aug "
           "(with_aug, the reference; gold labels otherwise) or also on the original data (always).")
    a("--width_lambda1", type=NON_NEGATIVE, default=1.0,
      help="dynabertw with distillation (--width_distil): weight of logit distillation.")
    a("--width_lambda2", type=NON_NEGATIVE, default=0.1,
      help="dynabertw with distillation (--width_distil): weight of hidden-state MSE.")
    a("--graft_during_training", action="store_true",
      help="dynabertw only: neural grafting about 3 times per epoch, none in the last epoch.")
    a("--pooling", choices=["cls", "mean"], default=None,
      help="What the head, off-ramps and gates read: the [CLS] vector (BERT's pooler) or the mean over tokens "
           "(for models pre-trained with mean pooling, such as the embedded MiniLM). Saved in config.json, so "
           "later stages inherit it (default: the model's config.pooling, else the pooling of a "
           "sentence-transformers folder's 1_Pooling/config.json, which is mean for the embedded MiniLM, else cls).")
    a("--separate_subnet_passes", action="store_true",
      help="One forward and backward per (width, depth) subnet, as the reference, instead of one per width "
           "shared by all depths (same gradient up to float rounding without dropout; about 2x slower).")
    a("--balance_subnet_gradients", action="store_true",
      help="Rescale each loss's gradient to unit norm before summing, then the sum to the mean of the norms, so "
           "that every subnet pulls the shared weights equally hard (an issue-17 candidate; not the reference). "
           "The unit is one backward: a (width, depth) subnet with --separate_subnet_passes, else one width with "
           "all its depths.")
    a("--importance_split", choices=["train", "dev"], default="train",
      help="Data for head/neuron importance (rewiring, grafting); 'dev' mimics the reference.")
    a("--importance_max_examples", type=COUNT, default=None, help="Examples used for importance (default all).")
    a("--sequential_sampler", action="store_true", help="Unshuffled training order (the reference's sampler).")
    a("--trim_padding", action="store_true",
      help="Train on batches trimmed to their longest example (faster; changes the hidden-state MSE, which "
           "the reference averages over padding too). Evaluation always trims, in length order: its results "
           "are unchanged.")
    a("--group_by_length", action="store_true",
      help="Shuffle, then sort each run of 50 batches by length so batches hold similar lengths; with "
           "--trim_padding this skips most padding (1.5-1.9x fewer tokens on MRPC/RTE at length 128). "
           "Also batches the head/neuron importance examples by length (the same examples; importance sums "
           "|gradient| per batch, so its values change).")
    a("--do_predict", action="store_true",
      help="Predict the test split (test.tsv; MNLI test_matched/test_mismatched.tsv; or --test_file) with the "
           "static subnet --width_mult x --depth_mult: predict_results_<task>.txt (index<TAB>prediction, label "
           "names; regression: 3 decimals) in --output_dir, as Hugging Face run_glue. After --do_train it uses "
           "the best model saved; without it, the trained model in --model_dir.")
    a("--width_mult", type=MULTIPLIER, default=1.0, help="--do_predict: the subnet's width multiplier.")
    a("--depth_mult", type=MULTIPLIER, default=1.0, help="--do_predict: the subnet's depth multiplier.")
    a("--save_predictions", action="store_true",
      help="--do_predict: also predictions_test.jsonl, one JSON object per example (index, prediction, label if "
           "known, width per layer, layers executed, MACs and FLOPs).")
    return utils_glue.setup_custom_task(finish_training_args(parser.parse_args(argv)))


def predict(args: argparse.Namespace, model_dir: str) -> None:
    """--do_predict: the static subnet (--width_mult, --depth_mult) of the model in `model_dir` on the task's
    test split(s); the files are written atomically into --output_dir. Under torchrun every process predicts
    its share of the batches and rank 0 writes the files."""
    spec = utils_glue.get_task(args.task_name)
    device, rank, world = setup_run_device(args)
    if world > 1:  # after --do_train: the best model rank 0 saved is complete before any process reads it
        torch.distributed.barrier()
    model, tokenizer = load_model(model_dir, spec, **model_options(args))
    validate_subnets(model.config, {"--width_mult": [args.width_mult]}, {"--depth_mult": [args.depth_mult]})
    load = dict(tokenizer=tokenizer, max_seq_length=args.max_seq_length, cache_dir=args.cache_dir)
    datasets = {split: utils_glue.load_dataset(args.task_name, args.data_dir, split, **load)
                for split in utils_glue.split_names(args.task_name, "test")}
    setting = RoutingSetting([args.width_mult], args.width_mult, args.depth_mult)
    records = PredictionRecords(spec, args.task_name, args.data_dir, datasets, setting)
    evaluation = evaluate_routed(model, datasets, setting, device, EvaluationOptions(
        args.per_gpu_eval_batch_size, precision_name(args.fp16, args.bf16),
        example_records=records if args.save_predictions else None, rank=rank, world=world))
    if rank != 0:
        return
    test_logits = {split: (records.indices[split], evaluation.logits[split]) for split in datasets}
    for line in utils_glue.write_predictions(spec, args.task_name, Path(args.output_dir), test_logits,
                                             evaluation.records):
        logger.info("subnet w%g d%g: %s", args.width_mult, args.depth_mult, line)


def phase_subnets(args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Widths and depths trained (and evaluated) in this phase, descending."""
    phase = PHASES[args.training_phase]
    widths = args.width_mult_list if phase.train_widths else [1.0]
    depths = args.depth_mult_list if phase.train_depths else [1.0]
    return sorted(widths, reverse=True), sorted(depths, reverse=True)


def graft_schedule(num_examples: int, batch_size: int, epochs: int) -> tuple[int, int]:
    """(graft_step, graft_stop): about 3 grafts per epoch, none in the last (SPEC §3). `batch_size`: the global
    batch (per process x processes), so that under torchrun the grafts land at the same fractions of training."""
    steps_per_epoch = num_examples / batch_size
    return max(1, int(steps_per_epoch / 3)), int(steps_per_epoch * (epochs - 1))


def should_graft(step: int, graft_step: int, graft_stop: int) -> bool:
    return step > 0 and step % graft_step == 0 and step <= graft_stop


def subnet_loss(args: argparse.Namespace, model, batch: list[torch.Tensor], teacher_out, width: float,
                depth: float) -> torch.Tensor:
    """The loss of one (width, depth) subnet for this phase, from a forward of its own."""
    input_ids, attention_mask, token_type_ids, labels = batch
    out = model(input_ids, attention_mask, token_type_ids, subnet=model.subnet(width, depth))
    return PHASES[args.training_phase].loss(args, model, out.logits, out.hidden_states, labels, teacher_out, depth)


def prefix_shared_loss(args: argparse.Namespace, model, batch: list[torch.Tensor], teacher_out, width: float,
                       depths: list[float]) -> torch.Tensor:
    """The summed loss of every depth at one width from ONE forward of the deepest subnet: the depth-d
    subnet's hidden states are that forward's first rnd(d*L)+1, and its head runs on the last of them. One
    backward of the sum gives the sum of the subnets' gradients."""
    input_ids, attention_mask, token_type_ids, labels = batch
    subnets = {d: model.subnet(width, d) for d in depths}
    deepest = max(subnets.values(), key=lambda s: s.num_layers)
    out = model(input_ids, attention_mask, token_type_ids, subnet=deepest)
    loss_of = PHASES[args.training_phase].loss
    total = 0
    for d, subnet in subnets.items():
        n = subnet.num_layers
        logits = out.logits if n == deepest.num_layers else model.classify(out.hidden_states[n], attention_mask)
        total = total + loss_of(args, model, logits, out.hidden_states[: n + 1], labels, teacher_out, d)
    return total


def train(args: argparse.Namespace) -> dict:
    spec = utils_glue.get_task(args.task_name)
    phase_name, phase = args.training_phase, PHASES[args.training_phase]
    device, rank, world = setup_run_device(args)
    is_main = rank == 0
    output_dir = prepare_output_dir(args, RESULTS_FILE, create=False,  # created once all input is validated
                                    may_write_input=phase_name == "final_finetuning")
    if world > 1:  # every process checks the folder before rank 0 starts writing into it
        torch.distributed.barrier()
    set_seed(args.seed)
    model, tokenizer = load_model(args.model_dir, spec, **model_options(args))
    widths, depths = phase_subnets(args)
    validate_subnets(model.config, {"--width_mult_list": widths}, {"--depth_mult_list": depths})
    # saved with the model: gate training and inference put their default off-ramps after these depths
    record_trained_depths(model.config, depths if phase.train_depths else None)
    if args.data_aug and not phase.data_aug:
        logger.warning("%s uses gold labels on the original data: --data_aug ignored", phase_name)
    use_aug = args.data_aug and phase.data_aug

    load = dict(tokenizer=tokenizer, max_seq_length=args.max_seq_length, cache_dir=args.cache_dir)
    train_set = utils_glue.load_dataset(
        args.task_name, args.data_dir, "aug" if use_aug else "train", max_examples=args.max_train_samples, **load
    )
    dev_sets = {"dev": utils_glue.load_dataset(args.task_name, args.data_dir, "dev",
                                               max_examples=args.max_eval_samples, **load)}
    if spec.name == "MNLI":
        dev_sets["dev_mm"] = utils_glue.load_dataset(args.task_name, args.data_dir, "dev_mm",
                                                     max_examples=args.max_eval_samples, **load)

    teacher = None
    if phase.teacher == "always" or (phase.teacher == "with_aug" and (use_aug or args.width_distil == "always")):
        teacher = copy.deepcopy(model).eval()  # un-rewired, full width and depth
        for p in teacher.parameters():
            p.requires_grad_(False)
    model.to(device)
    if teacher is not None:
        teacher.to(device)

    importance_set = None
    if phase.rewire:
        importance_set = (
            utils_glue.load_dataset(args.task_name, args.data_dir, "train", **load)
            if args.importance_split == "train" else dev_sets["dev"]
        )

    def importance() -> tuple[torch.Tensor, torch.Tensor]:
        """Under torchrun each rank scores a share of the batches and every rank sums all of them in one order:
        replicas that rewired or grafted on scores differing in a last bit would stay different for the rest
        of the run (only gradients are averaged)."""
        batches = utils_glue.importance_batches(importance_set, args.per_gpu_eval_batch_size,
                                                args.importance_max_examples, args.group_by_length)
        return compute_importance(model, batches, device, args.importance_max_examples, rank, world)

    try:
        schedule = Schedule.make(utils_glue.num_batches(train_set, args.per_gpu_train_batch_size, world),
                                 args.gradient_accumulation_steps, args.num_train_epochs, args.max_steps)
    except CLIError as err:
        raise CLIError(f"{err} ({len(train_set)} examples, batch {args.per_gpu_train_batch_size} x {world} x "
                       f"{args.gradient_accumulation_steps})") from None
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, args.learning_rate, args.weight_decay, args.warmup_steps,
                                           schedule.total_updates)
    graft_step, graft_stop = graft_schedule(len(train_set), args.per_gpu_train_batch_size * world, schedule.epochs)

    resume = None
    if args.resume_from_checkpoint:
        ckpt, resume = resume_checkpoint(output_dir, args.resume_from_checkpoint, model, device, vars(args), optimizer)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt, resume["global_step"],
                    resume["epoch"], resume["batch_in_epoch"])
    else:
        if phase.rewire:
            logger.info("rewiring: head and neuron importance on the %s split", args.importance_split)
            rewire(model, *importance())
        set_seed(args.seed)  # again before the loop (SPEC §4.1)

    output_dir.mkdir(parents=True, exist_ok=True)
    # one run folder per phase (and run): final fine-tuning in place does not overlay the depth phase's curves
    writer = SummaryWriter(str(output_dir / "runs" / f"{phase_name}_{time.strftime('%Y%m%d-%H%M%S')}")) \
        if is_main else None
    logger.info("***** %s on %s: %d examples, %d epochs, %d updates, subnets depth %s x width %s *****",
                phase_name, spec.name, len(train_set), schedule.epochs, schedule.total_updates, depths, widths)
    grafting = phase.rewire and args.graft_during_training
    if grafting and graft_stop < graft_step:
        logger.warning("--graft_during_training: no graft will happen (none in the last epoch, and %d epoch(s) "
                       "of %d updates leave none before it)", schedule.epochs, schedule.total_updates)
    elif grafting:
        logger.info("grafting every %d updates until update %d", graft_step, graft_stop)
    metric = utils_glue.primary_metric(args.task_name)
    task_metrics = functools.partial(utils_glue.compute_metrics, args.task_name)

    def evaluate(state) -> tuple[float, dict]:
        results = evaluate_subnets(model, task_metrics, dev_sets, widths, depths, args.per_gpu_eval_batch_size,
                                   device, precision_name(args.fp16, args.bf16), rank, world)
        for key, metrics in results.items():  # diverged weights: stop before saving them as a model
            check_finite(torch.tensor(metrics["eval_loss"]), state.global_step, key)
        score = sum(r[metric] for r in results.values())
        logger.info("step %d, %s per subnet (sum %.4f%s):\n%s", state.global_step, metric, score,
                    ", new best" if score > state.best_score else "", format_subnet_table(results, metric))
        if writer is not None:
            for key, metrics in results.items():
                for name, value in metrics.items():
                    writer.add_scalar(f"eval/{key}/{name}", value, state.global_step)
            writer.add_scalar("eval/score_sum", score, state.global_step)
        return score, {"step": state.global_step, "score_sum": score, "results": results}

    def on_best(state, record: dict) -> None:
        card = model_card(task=spec.name, phase=phase_name, base_model=args.model_dir, config=model.config,
                          results=record["results"], metric=metric, command=parsed_command(),
                          notes=[f"best evaluation: step {state.global_step} of {schedule.total_updates}"])
        save_model(model, tokenizer, output_dir, {"README.md": card})
        write_json(output_dir / "training_args.json", vars(args))
        txt = output_dir / "eval_results.txt"  # appended by rewriting it atomically: never a torn file
        lines = [f"{key} {k} = {v}\n" for key, metrics in record["results"].items() for k, v in metrics.items()]
        lines.append(f"step {state.global_step} best {metric} per subnet: "
                     f"{[r[metric] for r in record['results'].values()]}\n")
        write_text(txt, (txt.read_text() if txt.is_file() else "") + "".join(lines))

    def write_summary(state, record=None, improved=False, extra: dict | None = None) -> None:
        best = max(state.history, key=lambda h: h["score_sum"])
        summary = {"task": spec.name, "phase": phase_name, "metric": metric, "best_step": best["step"],
                   "best_score_sum": best["score_sum"], "best": best["results"], "history": state.history,
                   **(extra or {})}
        # eval_results.json is the latest phase's; the per-phase copy survives in-place final fine-tuning.
        write_json(output_dir / RESULTS_FILE, summary)
        write_json(output_dir / f"eval_results_{phase_name}.json", summary)
        # Hugging Face's result files beside ours: flat all_results.json (the best evaluation; train_* once
        # training ended) and trainer_state.json with the per-logging-step training loss
        train = None if extra is None or "train_seconds" not in extra else train_metrics(
            state, schedule, len(train_set), extra["train_seconds"])
        write_json(output_dir / "all_results.json", {**({"epoch": train["epoch"]} if train else {}),
                                                    **flat_eval_results(best["results"]), **(train or {})})
        write_json(output_dir / "trainer_state.json", trainer_state(
            state, schedule, lambda r: {**flat_eval_results(r["results"]), "eval_score_sum": r["score_sum"]},
            args.logging_steps, best["step"], train))

    def after_update(state) -> None:
        if grafting and should_graft(state.global_step, graft_step, graft_stop):
            graft(model, *importance())
            model.zero_grad(set_to_none=True)
            logger.info("grafted at step %d", state.global_step)

    lengths = train_set.tensors[1].sum(1) if args.group_by_length else None
    if args.group_by_length and not args.trim_padding:
        logger.warning("--group_by_length without --trim_padding changes the order but saves no compute")
    if args.group_by_length and args.sequential_sampler:
        logger.warning("--group_by_length has no effect with --sequential_sampler (it groups a shuffled order)")

    def batches(epoch: int, start_batch: int):
        return utils_glue.epoch_batches(train_set, args.per_gpu_train_batch_size, args.seed, epoch,
                                        shuffle=not args.sequential_sampler, rank=rank, world=world,
                                        start_batch=start_batch, lengths=lengths)

    def batch_losses(batch, state):
        batch = [t.to(device) for t in (trim_padding(batch) if args.trim_padding else batch)]
        teacher_out = None
        if teacher is not None:
            with torch.no_grad():
                teacher_out = teacher(*batch[:3])
        if args.separate_subnet_passes or len(depths) == 1:
            for d in depths:
                for w in widths:
                    yield subnet_key(w, d), subnet_loss(args, model, batch, teacher_out, w, d)
        else:
            for w in widths:
                # "d1-0.75-0.5_w0.5": one name TensorBoard accepts for the depths sharing this forward
                yield f"d{'-'.join(f'{d:g}' for d in depths)}_w{w:g}", prefix_shared_loss(
                    args, model, batch, teacher_out, w, depths)

    hooks = Hooks(after_update=after_update, evaluate=evaluate, on_best=on_best, after_evaluate=write_summary,
                  save_checkpoint=lambda state: save_checkpoint(output_dir, model, tokenizer,
                                                                {**state, "args": vars(args)}))
    model.train()
    train_start = time.time()
    state = fit(params=params, optimizer=optimizer, scheduler=scheduler, schedule=schedule, batches=batches,
                losses=batch_losses, hooks=hooks, resume=resume, world=world, is_main=is_main,
                eval_every=args.logging_steps if args.evaluate_during_training and args.logging_steps > 0 else 0,
                eval_on_start=args.eval_on_start,
                precision=precision_name(args.fp16, args.bf16), device_type=device.type,
                writer=writer, desc=f"{phase_name} {spec.name}", zero_grad=lambda: model.zero_grad(set_to_none=True),
                log_every=args.logging_steps, balance_losses=args.balance_subnet_gradients)
    elapsed = time.time() - train_start
    if is_main:
        write_summary(state, extra={"train_seconds": elapsed})
        best = max(state.history, key=lambda h: h["score_sum"])
        logger.info("best step %d (score sum %.4f); model saved to %s; %.1f s",
                    best["step"], best["score_sum"], output_dir, elapsed)
    if writer is not None:
        writer.close()
    return {"best_score": state.best_score, "global_step": state.global_step}


def main(argv: list[str] | None = None) -> None:
    """Flags are range-checked while parsing; the task, data, model folder (`loading.load_model`) and
    output folder (`prepare_output_dir`: writable, not the input model except in final_finetuning, not
    another run's) are validated before anything is written; a failed run removes the output folder it
    created unless a checkpoint there can be resumed."""
    args = parse_args(argv)
    setup_logging(int(os.environ.get("RANK", "0")))
    spec = validate_task_args(args)
    if spec.is_custom:
        logger.info(utils_glue.describe_task(spec))
    if args.graft_during_training and not PHASES[args.training_phase].rewire:
        logger.warning("--graft_during_training only applies to --training_phase dynabertw; ignored")
    if not (args.do_train or args.do_predict):
        raise CLIError("nothing to do: pass --do_train (evaluation of subnets runs during and after training) "
                       "or --do_predict (test predictions of a trained model)")
    if args.do_train and args.do_predict:  # a missing or malformed test file fails now, not after training
        for split in utils_glue.split_names(args.task_name, "test"):
            utils_glue.get_examples(args.task_name, args.data_dir, split)
    if args.do_train:
        with clean_up_on_failure(args.output_dir):
            train(args)
    if args.do_predict:
        if not args.do_train:  # predictions are written at the end: an unusable folder is reported now
            check_writable(args.output_dir)
        predict(args, args.output_dir if args.do_train else args.model_dir)


if __name__ == "__main__":
    run_cli(main)
