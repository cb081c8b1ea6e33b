"""Gate training (SPEC §5): on a frozen backbone, the gates learn which width of the gate setting each input
needs. The gate inputs (the [CLS] states every gate reads at every width) and targets (the narrowest width
that gets the example right) are computed once, then the gates train on them with `fit`; the best gates by
dev loss are saved with the backbone, the class -> width map and the off-ramps in its config."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

from .batching import epoch_batches, in_dataset_order, length_sorted_batches, num_batches, trim_padding
from .checkpoints import resume_checkpoint, save_checkpoint
from .distributed import map_shared
from .environment import set_seed
from .errors import InputError
from .files import write_json
from .gates import (
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
from .inference import default_off_ramps, dynamic_forward
from .progress import progress_bar
from .routing import trained_depths
from .saving import model_card, save_model
from .trainer import Hooks, Schedule, build_optimizer, fit, train_metrics, trainer_state

logger = logging.getLogger("flexbert")
RESULTS_FILE = "gate_results.json"
# Gate inputs are kept in memory when they fit; larger sets (MNLI, QQP, augmented data) recompute per batch.
GATE_CACHE_BYTES = 4 * 2**30


@dataclass(frozen=True)
class GateTrainingConfig:
    """The gate-training options (train_gate.py builds them once from its flags)."""

    task: str  # the task's name: the reference's class-weight table, the results, the model card
    gate_setting: list[float]  # the widths the gate classes stand for
    num_gates: int | None = None  # a divisor of the layer count; None: one gate per layer
    class_weights: str | list[float] = "histogram"  # "histogram", "reference" or one weight per class
    max_class_weight: float | None = None  # every class weight clipped to this (None: no clipping)
    regression_threshold: float = 0.5  # regression targets: right if |prediction - label| < this
    gate_loss: str = "every_width"  # or "reference" (SPEC 5.4)
    backbone_dropout: bool = False  # fresh backbone dropout per training batch (gate inputs recomputed)
    train_batch_size: int = 32  # per process
    eval_batch_size: int = 64
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    epochs: float = 10.0
    accumulation: int = 1  # batches per update
    logging_steps: int = 100  # evaluate (and checkpoint) every this many updates; 0: at the end only
    seed: int = 200
    precision: str = "fp32"  # "fp16" / "bf16": autocast
    exit_threshold: float | None = None  # saved into the gate folder's config for inference
    off_ramps: list[int] | None = None  # ditto; None: the last layer of each trained depth < 1


@dataclass(frozen=True)
class RunRecord:
    """What a gate folder records of the run that made it."""

    flags: dict  # the run's flags: training_args.json, and checked when a checkpoint is resumed
    base_model: str  # the backbone folder (model card)
    command: str  # the command line (model card)


def check_config(config: GateTrainingConfig, num_layers: int) -> None:
    """Everything about the options that can be wrong, checked before any work."""
    if len(config.gate_setting) < 2:
        raise InputError("--gate_setting needs at least two widths for gates to choose between")
    num_gates = config.num_gates or num_layers
    if num_gates < 1 or num_layers % num_gates:
        raise InputError(f"--num_gates {num_gates} must divide the model's {num_layers} layers")
    class_weights(config, None)


def class_weights(config: GateTrainingConfig, targets: torch.Tensor | None) -> list[float] | None:
    """The class weights of the gate loss, clipped to --max_class_weight. Without targets (to check the
    options before any work) None for "histogram", which needs them."""
    rule, num_classes = config.class_weights, len(config.gate_setting)
    if rule == "histogram":
        if targets is None:
            return None
        return clip_weights(histogram_class_weights(targets, num_classes), config.max_class_weight)
    if rule == "reference":
        if config.task not in REFERENCE_CLASS_WEIGHTS or num_classes != 4:
            raise InputError(f"--gate_class_weights reference has no row for {config.task} with {num_classes} "
                             "classes")
        return clip_weights(REFERENCE_CLASS_WEIGHTS[config.task], config.max_class_weight)
    if len(rule) != num_classes:
        raise InputError(f"--gate_class_weights has {len(rule)} values for {num_classes} classes")
    return clip_weights(rule, config.max_class_weight)


def clip_weights(weights: list[float], cap: float | None) -> list[float]:
    """--max_class_weight: each weight at most `cap` (None: unchanged)."""
    return list(weights) if cap is None else [min(float(w), cap) for w in weights]


class GateInputs:
    """The [CLS] vectors the gates read at every gate-setting width, `[C, G, B, h]` for a batch of example
    indices, and each width's correctness `[C, N]` (hence the targets). With the backbone frozen and in eval
    mode these are fixed, so they are computed once when they fit in GATE_CACHE_BYTES; otherwise, and with
    `backbone_dropout` (fresh dropout noise per batch, as the reference), they are recomputed per batch.

    Under torchrun each rank computes a share of the batches and every rank gathers all of them: the same
    inputs and targets on every replica, each example's computed by one process as a lone process would."""

    def __init__(self, model, dataset: TensorDataset, config: GateTrainingConfig, device: torch.device,
                 backbone_dropout: bool = False, rank: int = 0, world: int = 1):
        self.model, self.dataset, self.config, self.device = model, dataset, config, device
        self.backbone_dropout = backbone_dropout
        num_classes, num_gates, hidden = len(config.gate_setting), model.config.num_gates, model.config.hidden_size
        keep = num_classes * num_gates * len(dataset) * hidden * 4 <= GATE_CACHE_BYTES and not backbone_dropout
        batch_size = config.eval_batch_size

        def inputs_of(item) -> list[torch.Tensor]:
            states, correct = self._compute(item[1], dropout=False)
            if world == 1:
                return [states, correct] if keep else [correct]
            # padded to a whole batch, as all-gather needs; booleans as bytes (not every backend has bool)
            padded = [torch.nn.functional.pad(correct.to(torch.uint8), (0, batch_size - correct.shape[1]))]
            if keep:
                padded.insert(0, torch.nn.functional.pad(states, (0, 0, 0, batch_size - states.shape[2])))
            return padded

        def no_inputs() -> list[torch.Tensor]:
            correct = torch.zeros(num_classes, batch_size, dtype=torch.uint8, device=device)
            if not keep:
                return [correct]
            dtype = next(model.parameters()).dtype
            return [torch.zeros(num_classes, num_gates, batch_size, hidden, dtype=dtype, device=device), correct]

        states, correct, indices = [], [], []
        batches = list(length_sorted_batches(dataset, config.eval_batch_size))
        bar = progress_bar(total=len(batches), desc="gate inputs and targets", leave=False, disable=rank != 0)
        for (idx, _), computed in map_shared(batches, inputs_of, no_inputs, rank, world):
            n = len(idx)
            correct.append(computed[-1][:, :n].bool().cpu())
            indices.append(idx)
            if keep:
                states.append(computed[0][:, :, :n].cpu())
            bar.update(1)
        bar.close()
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
                                               self.config.gate_setting, self.config.regression_threshold)
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


def gate_epoch_loss(model, states, targets, weights, temperature, noise: Sequence[torch.Tensor] | None = None,
                    rule: str = "reference") -> tuple[torch.Tensor, list]:
    """Summed weighted loss over widths (descending) for one batch of precomputed gate inputs, plus the
    per-width losses. `states`: [C, G, B, h]; `rule`: --gate_loss; `noise`: the Gumbel noise's Exp(1) draws
    `[G, B, C]` per width, widest first (`validation_noise`; None: drawn from the global generator)."""
    per_width = []
    weight_tensor = torch.tensor(weights, device=states.device)
    for i, k in enumerate(reversed(range(states.shape[0]))):
        probs = gumbel_softmax_probs(gates_on(model.gates, states[k]), temperature,
                                     exp=None if noise is None else noise[i])
        if rule == "every_width":
            per_width.append(every_width_gate_loss(probs, targets, weight_tensor))
        else:
            per_width.append(gate_loss(probs, targets, k, weights[k]))
    return sum(per_width), per_width


def train_gates(config: GateTrainingConfig, model, tokenizer, train_set: TensorDataset,
                dev_sets: list[TensorDataset], output_dir: Path, run: RunRecord, device: torch.device,
                rank: int = 0, world: int = 1, resume_from: str | None = None,
                summary_writer: Callable[[str], object] | None = None) -> None:
    """Train gates on the frozen `model` with `train_set`, keep the best by gate loss on `dev_sets` (MNLI:
    matched, mismatched) and save them with the backbone into `output_dir` (gate_results.json and Hugging
    Face's all_results.json / trainer_state.json beside). `resume_from`: a checkpoint folder or "latest".
    `summary_writer(log_dir)`: a TensorBoard writer (e.g. tensorboardX's SummaryWriter) for the curves."""
    num_layers = model.config.num_hidden_layers
    check_config(config, num_layers)
    num_gates = config.num_gates or num_layers
    model.add_gates(config.gate_setting, num_gates)
    model.to(device)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("gates."))
    model.eval()
    is_main = rank == 0

    num_classes = len(config.gate_setting)
    schedule = Schedule.make(num_batches(train_set, config.train_batch_size, world),  # checked before the
                             config.accumulation, config.epochs)  # gate inputs are computed

    logger.info("computing gate targets: %d widths x %d train + %d dev examples", num_classes, len(train_set),
                sum(len(d) for d in dev_sets))
    train_inputs = GateInputs(model, train_set, config, device, config.backbone_dropout, rank, world)
    dev_inputs = [GateInputs(model, d, config, device, rank=rank, world=world) for d in dev_sets]
    train_targets = train_inputs.targets
    hist = torch.bincount(train_targets, minlength=num_classes).tolist()
    logger.info("train target histogram (class: count): %s", dict(zip(config.gate_setting, hist, strict=True)))
    weights = class_weights(config, train_targets)
    logger.info("class weights: %s", [round(w, 3) for w in weights])

    set_seed(config.seed)
    batch_size = config.train_batch_size
    n_train = len(train_targets)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer, scheduler = build_optimizer(params, config.learning_rate, config.weight_decay, config.warmup_steps,
                                           schedule.total_updates)
    resume = None
    if resume_from:
        ckpt, resume = resume_checkpoint(output_dir, resume_from, model, device, run.flags, optimizer)
        logger.info("resumed from %s at step %d", ckpt, resume["global_step"])
    output_dir.mkdir(parents=True, exist_ok=True)
    # one run folder per phase (and run), as run_glue.py: runs of different phases never overlay
    writer = summary_writer(str(output_dir / "runs" / f"traingate_{time.strftime('%Y%m%d-%H%M%S')}")) \
        if is_main and summary_writer is not None else None
    temperature = 1.0
    # Train-time states as a dataset of indices so the shared batching gives a seeded random order.
    index_set = torch.utils.data.TensorDataset(torch.arange(n_train))

    def evaluate(state) -> tuple[float, dict]:
        val = validate_gates(model, dev_inputs, weights, temperature, config, device, rank, world)
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
        save_gated_model(config, run, model, tokenizer, output_dir)

    def write_results(state, record=None, improved=False, extra: dict | None = None) -> None:
        write_json(output_dir / RESULTS_FILE, {
            "task": config.task, "gate_setting": config.gate_setting, "num_gates": num_gates, "class_weights": weights,
            "gate_loss": config.gate_loss, "train_target_histogram": hist, "best_dev_loss": -state.best_score,
            "history": state.history, **(extra or {}),
        })
        # Hugging Face's result files beside ours (train_* once training ended), as run_glue.py writes them
        best = max(state.history, key=lambda r: -r["loss"])
        train = None if record is not None else train_metrics(state, schedule, n_train, time.time() - train_start)
        write_json(output_dir / "all_results.json", {**gate_eval_results(best), **(train or {})})
        write_json(output_dir / "trainer_state.json", trainer_state(state, schedule, gate_eval_results,
                                                                    config.logging_steps, best["step"], train))

    def before_batch(state) -> None:
        nonlocal temperature
        temperature = temperature_at(state.global_step, n_train, batch_size, schedule.epochs, temperature)

    def batch_losses(batch, state):
        states, targets = train_inputs.batch(batch[0])
        yield "gates", gate_epoch_loss(model, states, targets, weights, temperature, rule=config.gate_loss)[0]
        if writer is not None:
            writer.add_scalar("train/temperature", temperature, state.global_step + 1)

    def load_extra_state(saved: dict) -> None:
        nonlocal temperature
        temperature = saved["temperature"]

    hooks = Hooks(
        before_batch=before_batch, evaluate=evaluate, after_evaluate=write_results,
        on_best=on_best,
        save_checkpoint=lambda state: save_checkpoint(output_dir, model, tokenizer, {**state, "args": run.flags}),
        extra_state=lambda: {"temperature": temperature}, load_extra_state=load_extra_state,
    )
    model.gates.train()
    train_start = time.time()
    state = fit(params=params, optimizer=optimizer, scheduler=scheduler, schedule=schedule,
        batches=lambda epoch, start: epoch_batches(index_set, batch_size, config.seed, epoch, rank=rank, world=world,
                                                   start_batch=start),
        losses=batch_losses, hooks=hooks, eval_every=config.logging_steps, resume=resume, world=world,
        is_main=is_main, precision=config.precision,
        device_type=device.type, writer=writer, desc=f"traingate {config.task}", log_every=config.logging_steps)
    if writer is not None:
        writer.close()
    if is_main and best_gates:  # how the best gates route dev examples at inference (states of chosen widths)
        model.gates.load_state_dict(best_gates)
        routed = routed_gate_report(model, dev_sets[0], dev_inputs[0].targets, config, device)
        logger.info("best gates on dev, routed as at inference: accuracy per gate %s, routing entropy per gate "
                    "%s (nats; 0 = every input gets the same width)", [round(a, 3) for a in routed["gate_acc"]],
                    [round(e, 3) for e in routed["routing_entropy"]])
        write_results(state, extra={"routed_dev": routed})
    logger.info("gates saved with the backbone to %s", output_dir)


def validation_noise(dev_inputs: Sequence[GateInputs], config: GateTrainingConfig, num_gates: int,
                     device: torch.device) -> Iterator[tuple[int, torch.Tensor, list[torch.Tensor]]]:
    """(dev set, example indices, Gumbel noise) of every validation batch, in order. The noise is the same at
    every validation, from its own generator seeded by --seed: scores differ only by the gates, validation
    draws nothing from the training stream (nor do reruns, resumes or another --logging_steps change which
    gates are kept), and a batch's noise does not depend on which torchrun process scores it (each draws all)."""
    generator = torch.Generator(device=device).manual_seed(config.seed)
    num_classes = len(config.gate_setting)
    for split, inputs in enumerate(dev_inputs):
        for start in range(0, len(inputs), config.eval_batch_size):
            idx = torch.arange(start, min(start + config.eval_batch_size, len(inputs)))
            yield split, idx, [torch.empty(num_gates, len(idx), num_classes, device=device).exponential_(
                generator=generator) for _ in range(num_classes)]


@torch.no_grad()
def validate_gates(model, dev_inputs: Sequence[GateInputs], weights: list[float], temperature: float,
                   config: GateTrainingConfig, device: torch.device, rank: int = 0, world: int = 1) -> dict:
    """The dev gate loss (per dev set the mean over batches of the summed per-width losses, then the mean over
    dev sets) and each gate's accuracy (its argmax on the full-width states against the target). Under
    torchrun each process scores every `world`-th batch and all gather the scores (`map_shared`), which every
    process sums in one order: the result is one process's, bit for bit."""
    num_classes, num_gates = len(config.gate_setting), len(model.gates)

    def score(item) -> list[torch.Tensor]:
        split, idx, noise = item
        batch_states, batch_targets = dev_inputs[split].batch(idx)
        _, per_width = gate_epoch_loss(model, batch_states, batch_targets, weights, temperature, noise,
                                       rule=config.gate_loss)
        logits = gates_on(model.gates, batch_states[-1])
        return [torch.stack(per_width[::-1]), (logits.argmax(-1) == batch_targets).float().sum(1)]

    def no_score() -> list[torch.Tensor]:
        return [torch.zeros(num_classes, device=device), torch.zeros(num_gates, device=device)]

    model.gates.eval()
    split_loss = [torch.zeros(num_classes) for _ in dev_inputs]
    n_batches, correct, count = [0] * len(dev_inputs), torch.zeros(num_gates), 0
    for (split, idx, _), (losses, right) in map_shared(validation_noise(dev_inputs, config, num_gates, device),
                                                       score, no_score, rank, world):
        split_loss[split] += losses.cpu()
        n_batches[split] += 1
        correct += right.cpu()
        count += len(idx)
    model.gates.train()
    totals = [loss.mean() / n for loss, n in zip(split_loss, n_batches, strict=True)]
    return {"loss": float(sum(totals) / len(totals)), "gate_acc": (correct / count).tolist()}


@torch.no_grad()
def routed_gate_report(model, dataset: TensorDataset, targets: torch.Tensor, config: GateTrainingConfig,
                       device: torch.device) -> dict:
    """Dev examples routed by the gates as at inference (each gate reads the state its predecessors' choices
    produced): per gate, the accuracy of the chosen class against the target, the histogram of chosen
    classes and its entropy."""
    chosen, indices = [], []
    for idx, batch in length_sorted_batches(dataset, config.eval_batch_size):
        ids, mask, types = (t.to(device) for t in batch[:3])
        out = dynamic_forward(model, ids, mask, types, class_to_width=config.gate_setting)
        chosen.append(out.width_class[:, :: layers_per_gate(model)].cpu())
        indices.append(idx)
    chosen = in_dataset_order(chosen, indices)  # [N, G]
    num_classes = len(config.gate_setting)
    counts = torch.stack([torch.bincount(chosen[:, g], minlength=num_classes) for g in range(chosen.shape[1])])
    probs = counts.float() / counts.sum(1, keepdim=True)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(1)
    return {"gate_acc": (chosen == targets.view(-1, 1)).float().mean(0).tolist(),
            "class_histogram_per_gate": counts.tolist(), "routing_entropy": entropy.tolist(),
            "target_histogram": torch.bincount(targets, minlength=num_classes).tolist()}


def save_gated_model(config: GateTrainingConfig, run: RunRecord, model, tokenizer, output_dir: Path) -> None:
    """The backbone + gates, with the trained class -> width map and the off-ramps in config.json: inference
    reads them as defaults."""
    saved = model.config
    saved.gate_class_to_width = list(config.gate_setting)
    if config.exit_threshold is not None:
        saved.exit_threshold = config.exit_threshold
    saved.off_ramps = config.off_ramps or default_off_ramps(saved.num_hidden_layers, trained_depths(saved))
    card = model_card(task=config.task, phase="traingate", base_model=run.base_model, config=saved,
                      command=run.command,
                      notes=["gated inference: train_gate.py --do_eval --model_dir FOLDER --w_dynamic or "
                             "--wd_dynamic --early_exit; a static setting: export_subnet.py"])
    save_model(model, tokenizer, output_dir, {"training_args.json": json.dumps(run.flags, indent=2, default=str),
                                              "README.md": card})


def gate_eval_results(record: dict) -> dict:
    """One gate evaluation as flat eval_* values (HF's all_results.json / log_history)."""
    return {"eval_loss": record["loss"], **{f"eval_gate_acc_{g}": a for g, a in enumerate(record["gate_acc"])}}
