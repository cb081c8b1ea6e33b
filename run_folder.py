"""The output folder of a training run: the rules a run checks before any work (writable, not another
run's folder unless --overwrite_output_dir, never the input model's), and the clean-up of a failed run."""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cli import CLIError
from transformers_ext.checkpoints import complete_checkpoints

# What the training scripts write into their output folder: a folder holding only these (and runs/, which
# is created first) is a run of ours killed before it wrote its results, and may be rerun.
_RUN_FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "vocab.txt",
              "special_tokens_map.json", "training_args.json", "runs", "README.md"}
_RUN_PREFIXES = ("checkpoint-", ".tmp-checkpoint-", ".old-", ".saving-", ".done-")


def _is_killed_run(out: Path) -> bool:
    entries = [e.name for e in out.iterdir()]
    return (out / "runs").is_dir() and all(
        e in _RUN_FILES or e.startswith(_RUN_PREFIXES) or (e.startswith(".") and e.endswith(".tmp")) for e in entries)


def check_writable(folder: str | Path, flag: str = "--output_dir") -> None:
    """Fail now rather than after the work: `folder` (existing or to be created) must be a folder this
    process can write into. Probes with a temporary file in the nearest existing folder, removed at once
    (its modification time restored), so nothing changes."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise CLIError(f"{flag} {folder}: {existing} is not a folder")
    stat = existing.stat()
    try:
        fd, name = tempfile.mkstemp(dir=existing, prefix=".write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        where = "" if existing == folder else f" ({existing} cannot hold new files)"
        raise CLIError(f"{flag} {folder} is not writable{where}: {err.strerror or err}") from None
    finally:
        with contextlib.suppress(OSError):
            os.utime(existing, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def prepare_output_dir(args: argparse.Namespace, marker: str, create: bool = True,
                       may_write_input: bool = False) -> Path:
    """The output-folder policy, checked before any work: the folder must be writable; one that holds
    another run is refused unless --overwrite_output_dir (a run of this script, with its `marker` results
    file, or one killed before it wrote any, may be rerun; resuming is allowed). Writing into the input
    model folder is refused unless `may_write_input` (the README's in-place final fine-tuning), and so is an
    input that is a checkpoint inside the output folder (checkpoints there are replaced). With create=False
    only the checks run (a run validates everything first and creates the folder last)."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--output_dir {out} exists and is not a folder")
    model = Path(args.model_dir)
    same_as_input = model.exists() and model.resolve() == out.resolve()
    if same_as_input and not may_write_input:
        raise CLIError(f"--output_dir {out} is the input --model_dir, whose model this run would overwrite; only "
                         "--training_phase final_finetuning may write into its input folder")
    if model.exists() and out.resolve() in model.resolve().parents:
        inner = model.resolve().relative_to(out.resolve()).parts[0]
        if inner.startswith("checkpoint-"):
            raise CLIError(f"--model_dir {model} is a checkpoint inside --output_dir {out}, whose checkpoints "
                             "this run replaces; copy it elsewhere or choose another --output_dir")
    check_writable(out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite_output_dir:
        resuming = getattr(args, "resume_from_checkpoint", None) is not None
        if not (same_as_input or resuming or (out / marker).is_file() or _is_killed_run(out)):
            raise CLIError(
                f"--output_dir {out} is not empty and holds another run; pass --overwrite_output_dir to reuse it"
            )
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


@contextlib.contextmanager
def clean_up_on_failure(folder: str | Path) -> Iterator[None]:
    """A run that fails (any error, not an interrupt) leaves nothing behind: what it created in its output
    folder is removed (the folder too, if the run created it; the folder's modification time is restored
    otherwise), unless the folder holds a complete checkpoint to resume from. Rank 0 only."""
    folder = Path(folder)
    before = {e.name for e in folder.iterdir()} if folder.is_dir() else None
    stat = folder.stat() if before is not None else None
    try:
        yield
    except Exception:
        if folder.is_dir() and os.environ.get("RANK", "0") == "0" and not complete_checkpoints(folder):
            if before is None:
                shutil.rmtree(folder, ignore_errors=True)
            else:
                for entry in folder.iterdir():
                    if entry.name in before:
                        continue
                    if entry.is_dir():
                        shutil.rmtree(entry, ignore_errors=True)
                    else:
                        entry.unlink(missing_ok=True)
                with contextlib.suppress(OSError):
                    os.utime(folder, ns=(stat.st_atime_ns, stat.st_mtime_ns))
        raise
