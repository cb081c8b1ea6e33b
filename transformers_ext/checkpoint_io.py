"""Files in and out: loading a model + tokenizer with clear errors, HF folders and resumable checkpoints
written atomically, the output-folder policy, and the RNG state a resumed run restores."""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer

from .cli import CLIError
from .modeling_flexbert import FlexBertForSequenceClassification


# ---- the one atomic writer ---------------------------------------------------------------------------------
def atomic_write(path: str | Path, write: Callable[[Path], None], tmp_name: str | None = None) -> None:
    """`write(tmp)` to a temporary file (or folder) beside `path`, then rename it into place: a kill at any
    moment leaves the old `path` or the new one, never a torn one. Files get the umask's permissions.
    `tmp_name` fixes the temporary name (it is a file when `write` is called)."""
    path = Path(path)
    if tmp_name is None:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        tmp = Path(name)
    else:
        tmp = path.parent / tmp_name
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.touch()
    try:
        write(tmp)
        if tmp.is_file():
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


def torch_save(obj, path: str | Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


# ---- models ------------------------------------------------------------------------------------------------
def load_model_and_tokenizer(
    model_dir: str,
    spec,
    args: argparse.Namespace | None = None,
) -> tuple[FlexBertForSequenceClassification, object]:
    """Our BERT + its tokenizer from an HF folder or hub id, with clear errors for what is not a BERT.
    `spec` is the task's `utils_glue.TaskSpec`; `args` supplies dropout, lower-casing and attention."""
    path = Path(model_dir)
    if path.exists() and not (path / "config.json").is_file():
        raise CLIError(f"--model_dir {model_dir} has no config.json (not a Hugging Face model folder)")
    looks_like_hub_id = not path.exists() and not model_dir.startswith((".", "/", "~")) and model_dir.count("/") <= 1
    if not path.exists() and not looks_like_hub_id:
        raise CLIError(f"--model_dir {model_dir} does not exist")
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as err:  # hub id unreachable offline, unreadable JSON, ...
        raise CLIError(f"--model_dir {model_dir}: cannot read the model config ({type(err).__name__})") from None
    if config.model_type != "bert":
        raise CLIError(f"--model_dir {model_dir} holds a '{config.model_type}' model, not a BERT")
    if path.is_dir() and not (path / "vocab.txt").is_file():
        raise CLIError(f"--model_dir {model_dir} has no vocab.txt (tokenizer vocabulary)")
    other_task = getattr(config, "finetuning_task", None) not in (None, spec.name.lower())
    if other_task and config.num_labels != spec.num_labels:
        raise CLIError(
            f"--model_dir {model_dir} was fine-tuned for {config.finetuning_task} with {config.num_labels} "
            f"labels, not {spec.name}"
        )
    saved_labels = config.num_labels
    config.num_labels = spec.num_labels
    config.finetuning_task = spec.name.lower()
    if getattr(args, "pooling", None):
        config.pooling = args.pooling
    if args is not None and hasattr(args, "hidden_dropout_prob"):
        config.hidden_dropout_prob = args.hidden_dropout_prob
        config.attention_probs_dropout_prob = args.attention_probs_dropout_prob
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, do_lower_case=getattr(args, "do_lower_case", True))
        model = FlexBertForSequenceClassification.from_pretrained(
            model_dir, config=config, attn_implementation=getattr(args, "attn_implementation", "sdpa")
        )
    except OSError as err:
        raise CLIError(f"--model_dir {model_dir}: cannot load model ({str(err).splitlines()[0]})") from None
    except RuntimeError as err:  # transformers refuses a saved classifier of another size
        if "mismatched" not in str(err):
            raise
        raise CLIError(f"--model_dir {model_dir} has a classifier with {saved_labels} outputs but {spec.name} needs "
                       f"{spec.num_labels} (a model fine-tuned for another task?)") from None
    max_positions = model.config.max_position_embeddings
    if args is not None and args.max_seq_length > max_positions:
        raise CLIError(f"--max_seq_length {args.max_seq_length} exceeds the model's {max_positions} positions")
    return model, tokenizer


def _write_model_folder(model, tokenizer, folder: Path, extra_files: dict[str, str] | None = None) -> None:
    """An ordinary HF folder: config.json, model.safetensors, tokenizer files, vocab.txt (+ extra files)."""
    folder.mkdir(parents=True, exist_ok=True)
    model_to_save = model.module if hasattr(model, "module") else model
    model_to_save.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    (folder / "vocab.txt").write_text("".join(token + "\n" for token, _ in vocab), encoding="utf-8")
    for name, text in (extra_files or {}).items():
        (folder / name).write_text(text)


def save_model(model: FlexBertForSequenceClassification, tokenizer, output_dir: str | Path,
               extra_files: dict[str, str] | None = None) -> None:
    """Write the HF folder into `output_dir` (which may hold other files, e.g. the input model for in-place
    final fine-tuning): everything goes to a temporary folder first, then each file is renamed into place,
    config.json last."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output_dir, prefix=".saving-"))
    try:
        _write_model_folder(model, tokenizer, tmp, extra_files)
        for file in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
            os.replace(file, output_dir / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_output_dir(args: argparse.Namespace, marker: str, create: bool = True) -> Path:
    """Create the output folder; refuse one that holds another run unless --overwrite_output_dir. Writing
    back into the input model folder (the README's final fine-tuning) and resuming are allowed. With
    create=False only the checks run (a run validates everything first and creates the folder last)."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--output_dir {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite_output_dir:
        same_as_input = Path(args.model_dir).resolve() == out.resolve()
        resuming = getattr(args, "resume_from_checkpoint", None) is not None
        if not (same_as_input or resuming or (out / marker).is_file()):
            raise CLIError(
                f"--output_dir {out} is not empty and holds another run; pass --overwrite_output_dir to reuse it"
            )
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


# ---- resumable checkpoints ---------------------------------------------------------------------------------
TRAINING_STATE = "training_state.pt"


def save_checkpoint(output_dir: Path, model, tokenizer, state: dict) -> None:
    """Write checkpoint-{step}/ (model folder + training_state.pt) atomically; older checkpoints are removed
    afterwards, hidden first, so a kill mid-way never leaves a half-deleted checkpoint-*."""
    final = output_dir / f"checkpoint-{state['global_step']}"

    def write(tmp: Path) -> None:
        tmp.unlink()
        _write_model_folder(model, tokenizer, tmp)
        torch.save(state, tmp / TRAINING_STATE)

    if final.exists():  # the same step saved again: move the old folder aside (removed below)
        final.rename(output_dir / f".old-checkpoint-{state['global_step']}-{os.getpid()}")
    atomic_write(final, write, tmp_name=f".tmp-checkpoint-{state['global_step']}")
    for old in [*output_dir.glob("checkpoint-*"), *output_dir.glob(".old-checkpoint-*")]:
        if old != final:
            hidden = old if old.name.startswith(".") else old.rename(output_dir / f".old-{old.name}-{os.getpid()}")
            shutil.rmtree(hidden, ignore_errors=True)


def find_checkpoint(output_dir: Path, requested: str) -> Path:
    """The checkpoint folder to resume from: `requested`, or the latest complete one in `output_dir`."""
    if requested != "latest":
        path = Path(requested)
        if not (path / TRAINING_STATE).is_file():
            raise CLIError(f"--resume_from_checkpoint {requested} is not a checkpoint folder (no {TRAINING_STATE})")
        return path
    checkpoints = [c for c in output_dir.glob("checkpoint-*") if c.name.split("-", 1)[1].isdigit()]
    checkpoints = sorted((c for c in checkpoints if (c / TRAINING_STATE).is_file()),
                         key=lambda p: int(p.name.split("-", 1)[1]))
    if not checkpoints:
        raise CLIError(f"no checkpoint to resume from in {output_dir}")
    return checkpoints[-1]


def resume_checkpoint(output_dir: Path, requested: str, model: torch.nn.Module, device: torch.device
                      ) -> tuple[Path, dict]:
    """Find the checkpoint (`requested` folder or "latest" in `output_dir`), load its weights into `model`
    and return (its folder, its training state)."""
    from safetensors.torch import load_file

    ckpt = find_checkpoint(output_dir, requested)
    state = torch.load(ckpt / TRAINING_STATE, weights_only=False)
    model.load_state_dict(load_file(ckpt / "model.safetensors", device=str(device)), strict=False)
    return ckpt, state


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
