"""The one training loop (`fit`) behind run_glue.py and train_gate.py, with what it needs around it: the
optimizer and schedule, the non-finite-loss guard, and Hugging Face's result files (subnet evaluation:
evaluation.evaluate_subnets; seeding, devices and precision: environment.py; the all-reduce under torchrun:
distributed.py).

`fit` owns: epochs of deterministic (resumable) batches, gradient accumulation, AMP, the all-reduce under
torchrun, clipping, the optimizer/scheduler step, evaluation every `eval_every` updates and at the end
(keeping the best score), checkpoints after each evaluation, resume, the progress bar and TensorBoard. A
script supplies what differs: the batches, the losses of one batch, the evaluation, and hooks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from transformers import get_linear_schedule_with_warmup

from .checkpoints import rng_state, set_rng_state
from .distributed import all_reduce_gradients
from .environment import autocast
from .errors import InputError
from .progress import progress_bar


# ---- optimisation ----------------------------------------------------------------------------------------
def build_optimizer(params: Sequence[tuple[str, torch.nn.Parameter]], lr: float, weight_decay: float,
                    warmup_steps: int, total_steps: int):
    """AdamW (eps 1e-8, decoupled decay except biases/LayerNorm weights) and a linear warm-up/decay."""
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in params if not any(k in n for k in no_decay)], "weight_decay": weight_decay},
        {"params": [p for n, p in params if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, eps=1e-8)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, max(total_steps, 1))
    return optimizer, scheduler


def check_finite(loss: torch.Tensor, step: int, subnet: str) -> None:
    if not torch.isfinite(loss):
        raise InputError(f"non-finite loss ({loss.item()}) at step {step} on subnet {subnet}; nothing was saved "
                         "for this step (lower --learning_rate or check the data)")


# ---- the loop ----------------------------------------------------------------------------------------------
@dataclass
class Schedule:
    """How long `fit` runs: `epochs` epochs of `updates_per_epoch` updates (each `accumulation` batches),
    stopping after `total_updates`. Fractional epochs as Hugging Face's Trainer: total updates =
    ceil(epochs x updates per epoch), the last epoch run partly (integer epochs: exactly epochs x updates)."""

    epochs: int
    updates_per_epoch: int
    total_updates: int
    accumulation: int = 1

    @classmethod
    def make(cls, num_batches: int, accumulation: int, epochs: float, max_steps: int = 0) -> Schedule:
        updates_per_epoch = num_batches // accumulation
        if updates_per_epoch == 0:  # 0 updates would save the untrained model as the best one
            raise InputError(f"--gradient_accumulation_steps {accumulation} is more than an epoch's batches "
                             f"({num_batches}): no update would run")
        if max_steps > 0:
            return cls(-(-max_steps // updates_per_epoch), updates_per_epoch, max_steps, accumulation)
        total = math.ceil(round(epochs * updates_per_epoch, 6))  # 0.1 x 30 is 3.0000000000000004, not 4 updates
        if total == 0:
            raise InputError(f"--num_train_epochs {epochs:g} of {updates_per_epoch} updates per epoch is 0 updates: "
                             "nothing would be trained")
        return cls(math.ceil(total / updates_per_epoch), updates_per_epoch, total, accumulation)


@dataclass
class LoopState:
    global_step: int = 0
    epoch: int = 0  # the epoch being run (on resume: the one to continue)
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    best_score: float = -math.inf
    history: list[dict] = field(default_factory=list)
    # trainer_state.json-style entries: {"loss", "learning_rate", "epoch", "step"} every `log_every` updates
    log_history: list[dict] = field(default_factory=list)
    loss_sum: float = 0.0  # summed per-update training loss of all updates so far (train_loss = loss_sum / steps)
    window_loss: float = 0.0  # ... and of the updates since the last log_history entry
    window_steps: int = 0


@dataclass
class Hooks:
    """What a script plugs into `fit`. All optional.

    before_batch(state): called before each batch's losses (e.g. a temperature schedule).
    after_update(state): called after each optimizer update (e.g. neural grafting).
    evaluate(state) -> (score, record): higher score is better; `record` goes into `state.history`.
    on_best(state, record): the score improved (save the best model).
    after_evaluate(state, record, improved): results files.
    save_checkpoint(state_dict): persist a resumable checkpoint (called after each evaluation).
    extra_state() -> dict / load_extra_state(dict): script state that a checkpoint must carry.
    """

    before_batch: Callable[[LoopState], None] | None = None
    after_update: Callable[[LoopState], None] | None = None
    evaluate: Callable[[LoopState], tuple[float, dict]] | None = None
    on_best: Callable[[LoopState, dict], None] | None = None
    after_evaluate: Callable[[LoopState, dict, bool], None] | None = None
    save_checkpoint: Callable[[dict], None] | None = None
    extra_state: Callable[[], dict] | None = None
    load_extra_state: Callable[[dict], None] | None = None


class GradientBalancer:
    """Per-loss gradient normalisation (one of issue 17's candidates against the narrow and shallow subnets'
    gradients being drowned by the wide ones): `take()` after each loss's backward moves that gradient out of
    `.grad` as g / |g|; `restore()` puts back sum_i g_i / |g_i| * mean_i |g_i| (the plain sum's scale when the
    norms are equal). Parameters no loss reached keep `.grad = None` (AdamW then skips them, as unbalanced)."""

    def __init__(self, params: Sequence[torch.nn.Parameter]):
        self.params = list(params)
        self.sum: list[torch.Tensor | None] = [None] * len(self.params)
        self.norms: list[torch.Tensor] = []

    def take(self) -> None:
        grads = [p.grad for p in self.params]
        present = [g for g in grads if g is not None]
        if not present:
            return
        norm = torch.nn.utils.get_total_norm(present)  # the norm clip_grad_norm_ measures
        self.norms.append(norm)
        scale = 1.0 / norm.clamp_min(1e-12)  # a device tensor: no host sync per loss
        for i, (p, g) in enumerate(zip(self.params, grads, strict=True)):
            if g is not None:
                self.sum[i] = g * scale if self.sum[i] is None else self.sum[i].add_(g * scale)
                p.grad = None

    def restore(self) -> None:
        mean_norm = torch.stack(self.norms).mean() if self.norms else None
        for p, total in zip(self.params, self.sum, strict=True):
            p.grad = None if total is None else total.mul_(mean_norm)
        self.sum, self.norms = [None] * len(self.params), []


def fit(
    *,
    params: Sequence[tuple[str, torch.nn.Parameter]],
    optimizer: torch.optim.Optimizer,
    scheduler,
    schedule: Schedule,
    batches: Callable[[int, int], Iterable],
    losses: Callable[[object, LoopState], Iterator[tuple[str, torch.Tensor]]],
    hooks: Hooks,
    eval_every: int = 0,
    eval_on_start: bool = False,
    resume: dict | None = None,
    world: int = 1,
    is_main: bool = True,
    precision: str = "fp32",
    device_type: str = "cpu",
    writer=None,
    desc: str = "train",
    zero_grad: Callable[[], None] | None = None,
    log_every: int = 0,
    balance_losses: bool = False,
) -> LoopState:
    """Train. `batches(epoch, start_batch)` yields the epoch's batches from `start_batch` on; `losses(batch,
    state)` yields (name, loss) pairs, each backpropagated (scaled by 1/accumulation) as soon as it is
    yielded, so that one subnet's graph is freed before the next is built. `resume` is a checkpoint's state
    (optimizer, scheduler, RNG, counters, best score, history and the hooks' extra state).
    `eval_on_start`: evaluate before the first update as well (not on resume); that record competes for the
    best model like any other.

    Every `log_every` updates (and at the end) the mean training loss since the previous entry, the learning
    rate and the (fractional) epoch are appended to `state.log_history`, as Hugging Face's trainer_state.json;
    the loss of one update is the sum over the yielded losses, averaged over its accumulated batches.

    `balance_losses`: each yielded loss's gradient is rescaled to unit norm before the sum, and the sum to the
    mean of those norms (`GradientBalancer`), so that every subnet pulls the shared weights equally hard."""
    trainable = [p for _, p in params]
    balancer = GradientBalancer(trainable) if balance_losses else None
    state = LoopState()
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        state = LoopState(resume["global_step"], resume["epoch"], resume["batch_in_epoch"], resume["best_score"],
                          resume["history"], resume.get("log_history", []), resume.get("loss_sum", 0.0),
                          resume.get("window_loss", 0.0), resume.get("window_steps", 0))
        set_rng_state(resume["rng"])
        if hooks.load_extra_state is not None:
            hooks.load_extra_state(resume)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    mixed_precision = autocast(precision, device_type)
    zero_grad = zero_grad or (lambda: optimizer.zero_grad(set_to_none=True))

    def evaluate(epoch: int, batch_in_epoch: int, checkpoint: bool = True) -> None:
        if hooks.evaluate is None:
            return
        state.epoch, state.batch_in_epoch = epoch, batch_in_epoch
        score, record = hooks.evaluate(state)
        improved = score > state.best_score
        state.history.append(record)
        if not is_main:
            return
        if improved:
            state.best_score = score
            if hooks.on_best is not None:
                hooks.on_best(state, record)
        if hooks.after_evaluate is not None:
            hooks.after_evaluate(state, record, improved)
        if checkpoint and hooks.save_checkpoint is not None:
            hooks.save_checkpoint({
                "global_step": state.global_step, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "best_score": state.best_score, "history": state.history, "rng": rng_state(),
                "log_history": state.log_history, "loss_sum": state.loss_sum, "window_loss": state.window_loss,
                "window_steps": state.window_steps,
                **(hooks.extra_state() if hooks.extra_state is not None else {}),
            })

    total, accumulation = schedule.total_updates, schedule.accumulation
    bar = progress_bar(total=total, initial=state.global_step, desc=desc, disable=not is_main)

    def log_entry() -> None:
        if state.window_steps == 0:
            return
        state.log_history.append({
            "loss": state.window_loss / state.window_steps, "learning_rate": scheduler.get_last_lr()[0],
            "epoch": round(state.global_step / schedule.updates_per_epoch, 4), "step": state.global_step})
        state.window_loss, state.window_steps = 0.0, 0
    start_epoch, start_batch = state.epoch, state.batch_in_epoch
    if eval_on_start and resume is None:
        evaluate(0, 0, checkpoint=False)  # nothing to resume at step 0
    update_loss = 0.0
    for epoch in range(start_epoch, schedule.epochs):
        first = start_batch if epoch == start_epoch else 0
        for batch_idx, batch in enumerate(batches(epoch, first), start=first):
            if batch_idx >= schedule.updates_per_epoch * accumulation:
                break  # micro-batches after the epoch's last full update would only leak into the next epoch
            if hooks.before_batch is not None:
                hooks.before_batch(state)
            if batch_idx % accumulation == 0:
                update_loss = 0.0
            pending = {}
            with mixed_precision:
                for name, loss in losses(batch, state):
                    loss = loss / accumulation
                    (scaler.scale(loss) if scaler else loss).backward()
                    pending[name] = loss.detach().float()
                    if balancer is not None:
                        balancer.take()
            # the batch's losses read to the host at once (one device sync, not two per loss), checked before
            # any optimizer step: a non-finite loss stops the run with nothing saved for this step
            logged = dict(zip(pending, torch.stack(list(pending.values())).tolist(), strict=True))
            for name, value in logged.items():
                if not math.isfinite(value):
                    check_finite(torch.tensor(value * accumulation), state.global_step, name)
            update_loss += sum(logged.values())  # each already divided by `accumulation`: the mean over batches
            if (batch_idx + 1) % accumulation:
                continue
            if balancer is not None:
                balancer.restore()
            all_reduce_gradients(trainable, world)
            if scaler:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            zero_grad()
            state.global_step += 1
            state.loss_sum += update_loss
            state.window_loss += update_loss
            state.window_steps += 1
            if log_every > 0 and state.global_step % log_every == 0:
                log_entry()
            bar.update(1)
            bar.set_postfix(loss=f"{sum(logged.values()):.4f}")
            if writer is not None:
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], state.global_step)
                for key, value in logged.items():
                    writer.add_scalar(f"train/loss/{key}", value, state.global_step)
            if hooks.after_update is not None:
                hooks.after_update(state)
            if eval_every > 0 and state.global_step % eval_every == 0:
                evaluate(epoch, batch_idx + 1)
            if state.global_step >= total:
                break
        if state.global_step >= total:
            break
    bar.close()
    log_entry()
    if not state.history or state.history[-1]["step"] != state.global_step:
        evaluate(schedule.epochs, 0)
    return state


# ---- Hugging Face-style result files -----------------------------------------------------------------------
def flat_eval_results(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """`{"eval_d1_w0.5_acc": ...}` from per-subnet metrics (`evaluation.evaluate_subnets`), as HF's
    all_results.json."""
    return {f"eval_{key}_{name}": value for key, metrics in results.items() for name, value in metrics.items()}


def train_metrics(state: LoopState, schedule: Schedule, num_examples: int, runtime: float) -> dict[str, float]:
    """train_loss (mean per-update loss of the whole run), train_runtime (seconds of this process),
    train_samples_per_second (examples of the epochs run / runtime) and the epoch reached, as HF's Trainer."""
    epochs = state.global_step / schedule.updates_per_epoch
    return {"epoch": round(epochs, 4), "train_loss": state.loss_sum / max(state.global_step, 1),
            "train_runtime": round(runtime, 4),
            "train_samples_per_second": round(num_examples * epochs / runtime, 3) if runtime > 0 else 0.0}


def trainer_state(state: LoopState, schedule: Schedule, eval_entry: Callable[[dict], dict], log_every: int = 0,
                  best_step: int | None = None, summary: dict | None = None) -> dict:
    """trainer_state.json as HF's Trainer writes it: counters, the best evaluation and `log_history`, the
    training-loss entries and each evaluation (`eval_entry(record)`: its flat eval_* values) in step order,
    then `summary` (the train_* metrics) once training ended."""
    per_epoch = schedule.updates_per_epoch
    evals = [{**eval_entry(r), "epoch": round(r["step"] / per_epoch, 4), "step": r["step"]} for r in state.history]
    log = sorted(state.log_history + evals, key=lambda e: (e["step"], "loss" not in e))
    if summary is not None:
        log.append({**summary, "step": state.global_step})
    return {"global_step": state.global_step, "max_steps": schedule.total_updates, "num_train_epochs": schedule.epochs,
            "epoch": round(state.global_step / per_epoch, 4), "logging_steps": log_every,
            "best_metric": state.best_score if math.isfinite(state.best_score) else None,
            "best_global_step": best_step, "log_history": log}
