"""Resumable checkpoints: checkpoint-{step}/ (a model folder and training_state.pt) written atomically,
found, checked against the run that resumes it, loaded onto this process's device; and the RNG state a
resumed run restores."""

from __future__ import annotations

import os
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from .errors import InputError, one_line, reading, writing
from .files import atomic_write
from .loading import check_weights, expected_shapes, weight_shapes
from .saving import write_model_folder

TRAINING_STATE = "training_state.pt"
# What a checkpoint's training state holds (trainer.fit writes it) and the run settings a resume must share.
_STATE_KEYS = {"global_step": int, "epoch": int, "batch_in_epoch": int, "optimizer": dict, "scheduler": dict,
               "best_score": float, "history": list, "rng": dict, "args": dict}
_SAME_ON_RESUME = ("task_name", "training_phase", "per_gpu_train_batch_size", "gradient_accumulation_steps",
                   "max_train_samples", "skip_train_samples", "data_aug", "width_mult_list", "depth_mult_list",
                   "gate_setting", "num_gates")


def save_checkpoint(output_dir: Path, model, tokenizer, state: dict) -> None:
    """Write checkpoint-{step}/ (model folder + training_state.pt) atomically; older checkpoints are removed
    afterwards, hidden first, so a kill mid-way never leaves a half-deleted checkpoint-*."""
    final = output_dir / f"checkpoint-{state['global_step']}"

    def write(tmp: Path) -> None:
        tmp.unlink()
        write_model_folder(model, tokenizer, tmp, named=final)
        with writing(final / TRAINING_STATE):
            torch.save(state, tmp / TRAINING_STATE)

    if final.exists():  # the same step saved again: move the old folder aside (removed below)
        final.rename(output_dir / f".old-checkpoint-{state['global_step']}-{os.getpid()}")
    atomic_write(final, write, tmp_name=f".tmp-checkpoint-{state['global_step']}")
    for old in [*output_dir.glob("checkpoint-*"), *output_dir.glob(".old-checkpoint-*")]:
        if old != final:
            hidden = old if old.name.startswith(".") else old.rename(output_dir / f".old-{old.name}-{os.getpid()}")
            shutil.rmtree(hidden, ignore_errors=True)


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The complete checkpoints in `output_dir`, oldest first."""
    checkpoints = [c for c in output_dir.glob("checkpoint-*") if c.name.split("-", 1)[1].isdigit()]
    return sorted((c for c in checkpoints if (c / TRAINING_STATE).is_file()),
                  key=lambda p: int(p.name.split("-", 1)[1]))


def find_checkpoint(output_dir: Path, requested: str) -> Path:
    """The checkpoint folder to resume from: `requested`, or the latest complete one in `output_dir`."""
    if requested != "latest":
        path = Path(requested)
        if not (path / TRAINING_STATE).is_file():
            raise InputError(f"--resume_from_checkpoint {requested} is not a checkpoint folder (no {TRAINING_STATE})")
        return path
    checkpoints = complete_checkpoints(output_dir)
    if not checkpoints:
        raise InputError(f"no checkpoint to resume from in {output_dir}")
    return checkpoints[-1]


def _check_training_state(file: Path, state, run_settings: dict | None) -> None:
    if not isinstance(state, dict):
        raise InputError(f"{file}: not a training state")
    for key, kind in _STATE_KEYS.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise InputError(f"{file}: training state lacks a valid '{key}' (a checkpoint of another program?)")
    if run_settings is None:
        return
    saved, current = state["args"], run_settings
    for key in _SAME_ON_RESUME:
        if key in saved and key in current and saved[key] != current[key]:
            phase = "--training_phase" if key == "training_phase" else f"--{key}"
            raise InputError(f"{file.parent} is a checkpoint of a run with {phase} {saved[key]}, not {current[key]}; "
                             "resume with the flags it was started with")


def resume_checkpoint(output_dir: Path, requested: str, model: torch.nn.Module, device: torch.device,
                      run_settings: dict | None = None, optimizer=None) -> tuple[Path, dict]:
    """Find the checkpoint (`requested` folder or "latest" in `output_dir`), check it against this run (its
    weights' names and shapes against `model`, its training state's contents, the settings in `run_settings`
    (the run's flags) that must not change: phase, task, batch size, subnets, gates; its optimizer state
    against `optimizer`), load its weights into `model` and return (its folder, its training state).

    Every tensor is loaded onto `device`, this process's own: a checkpoint written on a GPU resumes on a
    CPU-only host, and under torchrun each rank maps rank 0's optimizer state onto its own GPU."""
    ckpt = find_checkpoint(output_dir, requested)
    with reading(ckpt / TRAINING_STATE):
        state = torch.load(ckpt / TRAINING_STATE, map_location=device, weights_only=False)
    _check_training_state(ckpt / TRAINING_STATE, state, run_settings)
    weights_file, found = weight_shapes(ckpt)
    check_weights(weights_file, found, expected_shapes(model), "the model being trained")
    if optimizer is not None:
        try:
            optimizer.load_state_dict(state["optimizer"])  # fit() loads it again: the same result
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            raise InputError(f"{ckpt / TRAINING_STATE}: its optimizer state does not fit the parameters being "
                             f"trained ({one_line(err)})") from None
    with reading(weights_file):
        model.load_state_dict(load_file(weights_file, device=str(device)), strict=False)
    return ckpt, state


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore `rng_state()`'s state. The CUDA generators only when this host has as many GPUs as the one that
    saved them (a resume on fewer or more GPUs warns and keeps its own; the CPU streams are restored)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    saved_cuda = state.get("cuda")
    if saved_cuda is None or not torch.cuda.is_available():
        return
    if len(saved_cuda) != torch.cuda.device_count():
        warnings.warn(f"the checkpoint holds the RNG state of {len(saved_cuda)} GPU(s) but this host has "
                      f"{torch.cuda.device_count()}: the GPUs' random streams start afresh", stacklevel=2)
        return
    torch.cuda.set_rng_state_all([s.cpu() for s in saved_cuda])
