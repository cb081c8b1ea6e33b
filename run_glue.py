"""Train a BERT whose width- and depth-subnets all work (SPEC §2-4).

Phases (--training_phase):
  finetuning        ordinary fine-tuning of a pretrained BERT: the task-specific teacher (ours, not in the
                    reference, which expects a downloaded one)
  dynabertw         rewire heads/neurons by importance, then train all widths at full depth; distil from the
                    teacher with --data_aug, else gold labels; --graft_during_training applies neural grafting
  dynabert          all depth x width subnets, distilled from the width-adaptive model
  final_finetuning  gold labels for all subnets
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tensorboardX import SummaryWriter
from tqdm.auto import tqdm

import utils_glue
from transformers_ext import compute_importance, graft, rewire
from transformers_ext.distillation import hidden_mse_loss, logit_kd_loss, teacher_layer_map
from transformers_ext.training import (
    ArgumentParser,
    CLIError,
    add_common_args,
    all_reduce_gradients,
    build_optimizer,
    check_finite,
    epoch_batches,
    evaluate_subnets,
    format_subnet_table,
    load_model_and_tokenizer,
    multiplier_list,
    num_batches,
    prepare_output_dir,
    rng_state,
    run_cli,
    save_model,
    set_rng_state,
    set_seed,
    setup_device,
    setup_logging,
    subnet_key,
    trim_padding,
    validate_common_args,
    validate_subnets,
    write_json,
)

logger = logging.getLogger("flexbert")
PHASES = ("finetuning", "dynabertw", "dynabert", "final_finetuning")
RESULTS_FILE = "eval_results.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    a = parser.add_argument
    a("--learning_rate", type=float, default=2e-5, help="Peak AdamW learning rate.")
    a("--num_train_epochs", type=float, default=3.0, help="Training epochs (int() of it are run).")
    a("--max_steps", type=int, default=0,
      help="If > 0: stop after this many updates, overriding --num_train_epochs (the learning rate decays to 0 "
           "over them; grafting keeps SPEC's per-epoch schedule), e.g. to compare runs at equal cost.")
    a("--logging_steps", type=int, default=400, help="Evaluate all subnets (and checkpoint) every N updates.")
    a("--seed", type=int, default=42, help="Random seed (model init, data order, dropout).")
    a("--num_workers", type=int, default=16,
      help="Accepted for compatibility; features are pre-tensorised and batched in-process.")
    a("--width_mult_list", type=multiplier_list, default=[0.25, 0.5, 0.75, 1.0],
      help="Width multipliers trained and evaluated (comma list).")
    a("--depth_mult_list", type=multiplier_list, default=[1.0], help="Depth multipliers (comma list).")
    a("--training_phase", choices=PHASES, default="dynabertw", help="Which stage of the pipeline to run.")
    a("--graft_during_training", action="store_true",
      help="dynabertw only: neural grafting about 3 times per epoch, none in the last epoch.")
    a("--importance_split", choices=["train", "dev"], default="train",
      help="Data for head/neuron importance (rewiring, grafting); 'dev' mimics the reference.")
    a("--importance_max_examples", type=int, default=None, help="Examples used for importance (default all).")
    a("--sequential_sampler", action="store_true", help="Unshuffled training order (the reference's sampler).")
    a("--trim_padding", action="store_true",
      help="Train on batches trimmed to their longest example (faster; changes the hidden-state MSE, which "
           "the reference averages over padding too). Evaluation always trims: its results are unchanged.")
    a("--group_by_length", action="store_true",
      help="Shuffle, then sort each run of 50 batches by length so batches hold similar lengths; with "
           "--trim_padding this skips most padding (1.5-1.9x fewer tokens on MRPC/RTE at length 128).")
    a("--load_checkpoint", action="store_true", help="Resume from the latest checkpoint in --output_dir.")
    a("--resume_from_checkpoint", nargs="?", const="latest", default=None,
      help="Resume from a checkpoint folder (or the latest in --output_dir when no path is given).")
    a("--fp16", action="store_true", help="float16 autocast with loss scaling (CUDA only).")
    a("--bf16", action="store_true", help="bfloat16 autocast (CPU or CUDA).")
    args = parser.parse_args(argv)
    if args.load_checkpoint and args.resume_from_checkpoint is None:
        args.resume_from_checkpoint = "latest"
    return args


def phase_subnets(args: argparse.Namespace) -> tuple[list[float], list[float]]:
    """Widths and depths trained (and evaluated) in this phase, descending."""
    if args.training_phase == "finetuning":
        return [1.0], [1.0]
    depths = [1.0] if args.training_phase == "dynabertw" else args.depth_mult_list
    return sorted(args.width_mult_list, reverse=True), sorted(depths, reverse=True)


def graft_schedule(num_examples: int, batch_size: int, epochs: int) -> tuple[int, int]:
    """(graft_step, graft_stop): about 3 grafts per epoch, none in the last (SPEC §3)."""
    steps_per_epoch = num_examples / batch_size
    return max(1, int(steps_per_epoch / 3)), int(steps_per_epoch * (epochs - 1))


def should_graft(step: int, graft_step: int, graft_stop: int) -> bool:
    return step > 0 and step % graft_step == 0 and step <= graft_stop


def subnet_loss(
    args: argparse.Namespace,
    model,
    batch: list[torch.Tensor],
    teacher_out,
    width: float,
    depth: float,
) -> torch.Tensor:
    """The loss of one (width, depth) subnet for this phase."""
    input_ids, attention_mask, token_type_ids, labels = batch
    model.set_width_depth(width, depth)
    out = model(input_ids, attention_mask, token_type_ids, labels=labels)
    phase = args.training_phase
    if phase == "dynabertw" and teacher_out is not None:
        layer_map = list(range(len(out.hidden_states)))
        return args.width_lambda1 * logit_kd_loss(out.logits, teacher_out.logits) + args.width_lambda2 * (
            hidden_mse_loss(out.hidden_states, teacher_out.hidden_states, layer_map)
        )
    if phase == "dynabert":
        layer_map = teacher_layer_map(model.num_layers_kept, depth, model.config.num_hidden_layers)
        return args.depth_lambda1 * logit_kd_loss(out.logits, teacher_out.logits) + args.depth_lambda2 * (
            hidden_mse_loss(out.hidden_states, teacher_out.hidden_states, layer_map)
        )
    return out.loss


def find_checkpoint(output_dir: Path, requested: str) -> Path:
    if requested != "latest":
        path = Path(requested)
        if not (path / "training_state.pt").is_file():
            raise CLIError(f"--resume_from_checkpoint {requested} is not a checkpoint folder (no training_state.pt)")
        return path
    checkpoints = [c for c in output_dir.glob("checkpoint-*") if c.name.split("-", 1)[1].isdigit()]
    checkpoints = sorted((c for c in checkpoints if (c / "training_state.pt").is_file()),
                         key=lambda p: int(p.name.split("-", 1)[1]))
    if not checkpoints:
        raise CLIError(f"no checkpoint to resume from in {output_dir}")
    return checkpoints[-1]


def save_checkpoint(output_dir: Path, model, tokenizer, state: dict) -> None:
    """Write checkpoint-{step}/ completely under a temporary name, then rename it: a kill at any moment
    leaves the previous complete checkpoint. Older checkpoints are removed afterwards."""
    final = output_dir / f"checkpoint-{state['global_step']}"
    tmp = output_dir / f".tmp-checkpoint-{state['global_step']}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tokenizer, tmp)
    torch.save(state, tmp / "training_state.pt")
    if final.exists():  # the same step saved again: move the old folder aside rather than delete it first
        final.rename(output_dir / f".old-checkpoint-{state['global_step']}-{os.getpid()}")
    tmp.rename(final)
    for old in [*output_dir.glob("checkpoint-*"), *output_dir.glob(".old-checkpoint-*")]:
        if old != final:  # hidden first, then deleted: a kill mid-way never leaves a half-deleted checkpoint-*
            hidden = old if old.name.startswith(".") else old.rename(output_dir / f".old-{old.name}-{os.getpid()}")
            shutil.rmtree(hidden, ignore_errors=True)


def train(args: argparse.Namespace) -> dict:
    spec = utils_glue.get_task(args.task_name)
    device, rank, world = setup_device(args.cpu, args.num_threads)
    is_main = rank == 0
    if args.fp16 and device.type != "cuda":
        raise CLIError("--fp16 needs a CUDA device; use --bf16 on CPU")
    output_dir = prepare_output_dir(args, RESULTS_FILE, create=False)  # created once all input is validated
    if world > 1:  # every process checks the folder before rank 0 starts writing into it
        torch.distributed.barrier()
    set_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model_dir, spec, args)
    phase = args.training_phase
    trained_widths, trained_depths = phase_subnets(args)
    validate_subnets(model.config, {"--width_mult_list": trained_widths}, {"--depth_mult_list": trained_depths})
    if phase == "final_finetuning" and args.data_aug:
        logger.warning("final_finetuning uses gold labels on the original data: --data_aug ignored")
    use_aug = args.data_aug and phase in ("dynabertw", "dynabert")

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
    if (phase == "dynabertw" and use_aug) or phase == "dynabert":
        teacher = copy.deepcopy(model).eval()  # un-rewired, full width and depth
        for p in teacher.parameters():
            p.requires_grad_(False)
    model.to(device)
    if teacher is not None:
        teacher.to(device)

    importance_set = None
    if phase == "dynabertw":
        importance_set = (
            utils_glue.load_dataset(args.task_name, args.data_dir, "train", **load)
            if args.importance_split == "train" else dev_sets["dev"]
        )

    def importance() -> tuple[torch.Tensor, torch.Tensor]:
        batches = (trim_padding(b) for b in epoch_batches(importance_set, args.per_gpu_eval_batch_size, 0, 0, False))
        return compute_importance(model, batches, device, args.importance_max_examples)

    widths, depths = phase_subnets(args)
    updates_per_epoch = num_batches(train_set, args.per_gpu_train_batch_size, world) // args.gradient_accumulation_steps
    if args.max_steps > 0:
        if updates_per_epoch == 0:
            raise CLIError(f"--max_steps {args.max_steps}: {len(train_set)} examples make no full update "
                           f"(batch {args.per_gpu_train_batch_size} x {world} x {args.gradient_accumulation_steps})")
        t_total, epochs = args.max_steps, -(-args.max_steps // updates_per_epoch)
    else:
        epochs = int(args.num_train_epochs)
        t_total = updates_per_epoch * epochs
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(model, params, args.learning_rate, args.weight_decay,
                                           args.warmup_steps, t_total)
    scaler = torch.amp.GradScaler("cuda") if args.fp16 else None
    autocast = (torch.autocast(device.type, dtype=torch.float16 if args.fp16 else torch.bfloat16)
                if (args.fp16 or args.bf16) else nullcontext())
    graft_step, graft_stop = graft_schedule(len(train_set), args.per_gpu_train_batch_size, epochs)

    global_step, start_epoch, start_batch, best_score, history = 0, 0, 0, float("-inf"), []
    if args.resume_from_checkpoint:
        ckpt = find_checkpoint(output_dir, args.resume_from_checkpoint)
        state = torch.load(ckpt / "training_state.pt", weights_only=False)
        if state["args"].get("training_phase") != phase:
            raise CLIError(f"{ckpt} is a checkpoint of phase {state['args'].get('training_phase')}, not {phase}")
        from safetensors.torch import load_file

        model.load_state_dict(load_file(ckpt / "model.safetensors", device=str(device)), strict=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        global_step, start_epoch, start_batch = state["global_step"], state["epoch"], state["batch_in_epoch"]
        best_score, history = state["best_score"], state["history"]
        set_rng_state(state["rng"])
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt, global_step, start_epoch, start_batch)
    else:
        if phase == "dynabertw":
            logger.info("rewiring: head and neuron importance on the %s split", args.importance_split)
            rewire(model, *importance())
        set_seed(args.seed)  # again before the loop (SPEC §4.1)

    output_dir.mkdir(parents=True, exist_ok=True)
    writer = SummaryWriter(str(output_dir / "runs")) if is_main else None
    logger.info("***** %s on %s: %d examples, %d epochs, %d updates, subnets depth %s x width %s *****",
                phase, spec.name, len(train_set), epochs, t_total, depths, widths)
    if phase == "dynabertw" and args.graft_during_training:
        logger.info("grafting every %d updates until update %d", graft_step, graft_stop)

    def evaluate_and_save(epoch: int, batch_in_epoch: int) -> None:
        nonlocal best_score
        results = evaluate_subnets(model, args.task_name, dev_sets, widths, depths,
                                   args.per_gpu_eval_batch_size, device)
        for key, metrics in results.items():  # diverged weights: stop before saving them as a model
            check_finite(torch.tensor(metrics["eval_loss"]), global_step, key)
        metric = utils_glue.primary_metric(args.task_name)
        score = sum(r[metric] for r in results.values())
        improved = score > best_score
        history.append({"step": global_step, "score_sum": score, "results": results})
        logger.info("step %d, %s per subnet (sum %.4f%s):\n%s", global_step, metric, score,
                    ", new best" if improved else "", format_subnet_table(results, metric))
        if writer is not None:
            for key, metrics in results.items():
                for name, value in metrics.items():
                    writer.add_scalar(f"eval/{key}/{name}", value, global_step)
            writer.add_scalar("eval/score_sum", score, global_step)
        if not is_main:
            return
        if improved:
            best_score = score
            save_model(model, tokenizer, output_dir)
            write_json(output_dir / "training_args.json", vars(args))
            txt = output_dir / "eval_results.txt"  # appended by rewriting it atomically: never a torn file
            lines = [f"{key} {k} = {v}\n" for key, metrics in results.items() for k, v in metrics.items()]
            lines.append(f"step {global_step} best {metric} per subnet: {[r[metric] for r in results.values()]}\n")
            utils_glue.atomic_write_text(txt, (txt.read_text() if txt.is_file() else "") + "".join(lines))
        best = max(history, key=lambda h: h["score_sum"])
        summary = {"task": spec.name, "phase": phase, "metric": metric, "best_step": best["step"],
                   "best_score_sum": best["score_sum"], "best": best["results"], "history": history}
        # eval_results.json is the latest phase's; the per-phase copy survives in-place final fine-tuning.
        write_json(output_dir / RESULTS_FILE, summary)
        write_json(output_dir / f"eval_results_{phase}.json", summary)
        save_checkpoint(output_dir, model, tokenizer, {
            "global_step": global_step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "best_score": best_score, "history": history, "rng": rng_state(), "args": vars(args),
        })

    lengths = train_set.tensors[1].sum(1) if args.group_by_length else None
    if args.group_by_length and not args.trim_padding:
        logger.warning("--group_by_length without --trim_padding changes the order but saves no compute")
    if args.group_by_length and args.sequential_sampler:
        logger.warning("--group_by_length has no effect with --sequential_sampler (it groups a shuffled order)")
    model.train()
    train_start = time.time()
    progress = tqdm(total=t_total, initial=global_step, desc=f"{phase} {spec.name}", disable=not is_main)
    for epoch in range(start_epoch, epochs):
        batches = epoch_batches(train_set, args.per_gpu_train_batch_size, args.seed, epoch,
                                shuffle=not args.sequential_sampler, rank=rank, world=world,
                                start_batch=start_batch if epoch == start_epoch else 0, lengths=lengths)
        for batch_idx, batch in enumerate(batches, start=start_batch if epoch == start_epoch else 0):
            if batch_idx >= updates_per_epoch * args.gradient_accumulation_steps:
                break  # micro-batches after the epoch's last full update would only leak into the next epoch
            batch = [t.to(device) for t in (trim_padding(batch) if args.trim_padding else batch)]
            with autocast:
                teacher_out = None
                if teacher is not None:
                    with torch.no_grad():
                        teacher_out = teacher(*batch[:3])
                losses = {}
                for d in depths:
                    for w in widths:
                        loss = subnet_loss(args, model, batch, teacher_out, w, d)
                        check_finite(loss, global_step, subnet_key(w, d))
                        loss = loss / args.gradient_accumulation_steps
                        (scaler.scale(loss) if scaler else loss).backward()
                        losses[subnet_key(w, d)] = loss.item()
            if (batch_idx + 1) % args.gradient_accumulation_steps:
                continue
            all_reduce_gradients([p for _, p in params], world)
            if scaler:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            model.zero_grad(set_to_none=True)
            global_step += 1
            progress.update(1)
            progress.set_postfix(loss=f"{sum(losses.values()):.4f}")
            if writer is not None:
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], global_step)
                for key, value in losses.items():
                    writer.add_scalar(f"train/loss/{key}", value, global_step)
            if phase == "dynabertw" and args.graft_during_training and should_graft(global_step, graft_step,
                                                                                      graft_stop):
                head_imp, neuron_imp = importance()
                graft(model, head_imp, neuron_imp)
                model.zero_grad(set_to_none=True)
                logger.info("grafted at step %d", global_step)
            if args.evaluate_during_training and args.logging_steps > 0 and global_step % args.logging_steps == 0:
                evaluate_and_save(epoch, batch_idx + 1)
            if global_step >= t_total:
                break
        if global_step >= t_total:
            break
    progress.close()
    if not history or history[-1]["step"] != global_step:
        evaluate_and_save(epochs, 0)
    elapsed = time.time() - train_start
    if is_main:
        summary = json.loads((output_dir / RESULTS_FILE).read_text())
        summary["train_seconds"] = elapsed
        write_json(output_dir / RESULTS_FILE, summary)
        write_json(output_dir / f"eval_results_{phase}.json", summary)
        logger.info("best step %d (score sum %.4f); model saved to %s; %.1f s",
                    summary["best_step"], summary["best_score_sum"], output_dir, elapsed)
    if writer is not None:
        writer.close()
    return {"best_score": best_score, "global_step": global_step}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging(int(os.environ.get("RANK", "0")))
    validate_common_args(args)
    if args.graft_during_training and args.training_phase != "dynabertw":
        logger.warning("--graft_during_training only applies to --training_phase dynabertw; ignored")
    if args.max_steps < 0:
        raise CLIError(f"--max_steps must be >= 0, got {args.max_steps}")
    if not args.do_train:
        raise CLIError("nothing to do: pass --do_train (evaluation of subnets runs during and after training)")
    train(args)


if __name__ == "__main__":
    run_cli(main)
