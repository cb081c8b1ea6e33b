"""The command-line layer shared by the scripts: the one-line error contract, argument types, and the flag
groups each script adds (so that every `--help` lists only the flags its script reads)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from tqdm.auto import tqdm

import utils_glue


class CLIError(Exception):
    """A user error: printed as one line `error: ...`, exit code 2, no traceback."""


def run_cli(main: Callable[[], None]) -> None:
    """Run a script's main(): user errors become one `error:` line on stderr and a non-zero exit."""
    try:
        main()
    except (CLIError, utils_glue.DataError) as err:
        _fail(err, 2)
    except OSError as err:  # unreadable input, unwritable output folder, full disk, ...
        _fail(err, 1)
    except KeyboardInterrupt:
        _fail("interrupted", 130)


def _fail(message: object, code: int) -> None:
    for bar in list(getattr(tqdm, "_instances", ())):  # open bars leave the cursor mid-line
        bar.close()
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, `error: <problem> (see <prog> --help)`, exit status 2, and
    whose help texts show each flag's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and `(default: X)` after every flag whose help does not state it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if "default" in text or unset or not action.option_strings:
            return text
        value = action.default
        if isinstance(value, list):
            value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
        return f"{text} (default: {value})"


# ---- argument types ---------------------------------------------------------------------------------------
def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if value.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got '{value}'")


def multiplier_list(value: str) -> list[float]:
    """A comma list of width/depth multipliers, each in (0, 1]."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError("empty list; give comma-separated ratios such as 0.25,0.5,0.75,1.0")
    result = []
    for item in items:
        try:
            x = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{item}' is not a number") from None
        if not 0 < x <= 1:
            raise argparse.ArgumentTypeError(f"ratio {item} must be in (0, 1]")
        result.append(x)
    return result


def int_list(value: str) -> list[int]:
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a comma list of integers") from None


# ---- flag groups ------------------------------------------------------------------------------------------
def add_task_args(parser: argparse.ArgumentParser) -> None:
    """Task, data, model and output: every script (the reference's names and meanings)."""
    a = parser.add_argument
    a("--model_type", default="bert", choices=["bert"], help="Model family; only BERT-style models (checked).")
    a("--task_name", default="QNLI", help="GLUE task: CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI.")
    a("--data_dir", default="data/QNLI/", help="Folder with the task's train.tsv / dev.tsv.")
    a("--model_dir", default="model/QNLI/bert/", help="Input model folder (HF format, with vocab.txt) or hub id.")
    a("--output_dir", default="dyna_bert/QNLI/", help="Where checkpoints, results and logs are written.")
    a("--max_seq_length", type=int, default=128, help="Tokens per example after truncation/padding.")
    a("--do_lower_case", type=str2bool, nargs="?", const=True, default=True,
      help="Lower-case input (true/false); overrides the tokenizer's own setting, so keep true for uncased models.")
    a("--per_gpu_eval_batch_size", type=int, default=32, help="Evaluation batch size per device.")
    a("--max_eval_samples", type=int, default=None, help="Use only the first N dev examples.")
    a("--overwrite_output_dir", action="store_true", help="Allow writing into a folder holding another run.")
    a("--no_cuda", "--cpu", dest="cpu", action="store_true", help="Run on CPU even if CUDA is available.")
    a("--num_threads", type=int, default=None, help="CPU threads for torch (default: torch's choice).")
    a("--cache_dir", default=None, help="Feature cache folder (default $FLEXBERT_CACHE or ~/.cache/flexbert).")
    a("--attn_implementation", choices=["sdpa", "eager"], default="sdpa",
      help="Attention kernel: sdpa (fast) or eager (explicit matmuls; what FlopCounterMode checks).")


def add_training_args(parser: argparse.ArgumentParser, learning_rate: float, epochs: float, logging_steps: int,
                      seed: int) -> None:
    """The training loop's flags (`trainer.fit`), with the script's defaults."""
    a = parser.add_argument
    a("--do_train", action="store_true", help="Train.")
    a("--learning_rate", type=float, default=learning_rate, help="Peak AdamW learning rate.")
    a("--num_train_epochs", type=float, default=epochs, help="Training epochs (int() of it are run).")
    a("--per_gpu_train_batch_size", type=int, default=32, help="Training batch size per device/process.")
    a("--gradient_accumulation_steps", type=int, default=1, help="Batches accumulated per optimizer update.")
    a("--weight_decay", type=float, default=0.0, help="AdamW decoupled weight decay (not on biases/LayerNorm).")
    a("--warmup_steps", type=int, default=0, help="Linear learning-rate warm-up steps.")
    a("--logging_steps", type=int, default=logging_steps, help="Evaluate (and checkpoint) every N updates.")
    a("--seed", type=int, default=seed, help="Random seed (model init, data order, dropout).")
    a("--max_train_samples", type=int, default=None, help="Use only the first N training examples.")
    a("--data_aug", action="store_true",
      help="Train on the augmented file (train_{TASK}_aug_with_logits.tsv or train_aug.tsv; see augment_data.py).")
    a("--hidden_dropout_prob", type=float, default=0.1, help="Dropout on hidden states (applied to the config).")
    a("--attention_probs_dropout_prob", type=float, default=0.1, help="Dropout on attention probabilities.")
    a("--load_checkpoint", action="store_true", help="Resume from the latest checkpoint in --output_dir.")
    a("--resume_from_checkpoint", nargs="?", const="latest", default=None,
      help="Resume from a checkpoint folder (or the latest in --output_dir when no path is given).")
    a("--fp16", action="store_true", help="float16 autocast with loss scaling (CUDA only).")
    a("--bf16", action="store_true", help="bfloat16 autocast (CPU or CUDA).")


def finish_training_args(args: argparse.Namespace) -> argparse.Namespace:
    if getattr(args, "load_checkpoint", False) and args.resume_from_checkpoint is None:
        args.resume_from_checkpoint = "latest"
    return args


def validate_task_args(args: argparse.Namespace) -> utils_glue.TaskSpec:
    spec = utils_glue.get_task(args.task_name)
    if not Path(args.data_dir).is_dir():
        raise CLIError(f"--data_dir {args.data_dir} does not exist")
    for name in ("per_gpu_train_batch_size", "per_gpu_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name, 1) < 1:
            raise CLIError(f"--{name} must be at least 1")
    for name in ("max_train_samples", "max_eval_samples"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            raise CLIError(f"--{name} must be at least 1")
    if args.max_seq_length <= 2:
        raise CLIError(f"--max_seq_length {args.max_seq_length} leaves no room for text (needs > 2)")
    return spec


def validate_subnets(config, widths: dict[str, Sequence[float]], depths: dict[str, Sequence[float]]) -> None:
    """Every width multiplier must keep at least one head and every depth multiplier one layer of this model;
    `widths` / `depths` map the flag that gave them to the values."""
    from .modeling_flexbert import heads_kept, layers_kept

    for check, flags in ((heads_kept, widths), (layers_kept, depths)):
        for flag, values in flags.items():
            for value in values:
                try:
                    check(config, value)
                except ValueError as err:
                    raise CLIError(f"{flag}: {err}") from None
