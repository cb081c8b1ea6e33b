"""The command-line layer shared by the scripts: the one-line error contract (library exceptions become one
`error:` line and the README's exit codes), argument types, logging and progress-bar settings, and the flag
groups each script adds (so that every `--help` lists only the flags its script reads)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from tqdm.auto import tqdm

import utils_glue
from transformers_ext import ranges
from transformers_ext.calibration_candidates import CASCADE_GRID, STRATEGIES
from transformers_ext.environment import setup_device, setup_numerics
from transformers_ext.errors import InputError, WriteError
from transformers_ext.modeling_flexbert import heads_kept, layers_kept
from transformers_ext.progress import set_progress_bar
from transformers_ext.ranges import Bounded, RangeError
from transformers_ext.saving import command_line


class CLIError(InputError):
    """A user error: printed as one line `error: ...`, exit code 2, no traceback."""


def run_cli(main: Callable[[], None]) -> None:
    """Run a script's main(). The one place where failures become the one-line contract on stderr: bad input
    (the library's InputError, CLIError, the data layer's DataError) `error: ...` and exit 2; environment
    faults (unreadable input, unwritable or full disk: OSError, the library's WriteError) exit 1; an
    interrupt exit 130. The library's loaders and writers name the file in their errors."""
    try:
        main()
        _leave_process_group()
    except InputError as err:
        _fail(err, 2)
    except OSError as err:  # unreadable input, unwritable output folder, full disk, ...
        _fail(describe_os_error(err), 1)
    except KeyboardInterrupt:
        _fail("interrupted", 130)


def _leave_process_group() -> None:
    """torchrun: after a successful run every rank waits for the others and leaves the process group. A gloo
    group left to the interpreter's exit can abort a finished rank ("terminate called without an active
    exception", exit -6), which torchrun reports as a failure."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def describe_os_error(err: OSError) -> str:
    """`path: problem` for an OSError (Python's str() adds `[Errno N]` and quotes)."""
    if isinstance(err, WriteError) or not err.strerror:
        return str(err)
    name = f"{err.filename}: " if err.filename else ""
    return f"{name}{err.strerror}" + (f" -> {err.filename2}" if err.filename2 else "")


def _fail(message: object, code: int) -> None:
    for bar in list(getattr(tqdm, "_instances", ())):  # open bars leave the cursor mid-line
        bar.close()
    text = " ".join(str(message).split("\n")[0].split()) or type(message).__name__
    print(f"error: {text}", file=sys.stderr)
    sys.exit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, `error: <problem> (see <prog> --help)`, exit status 2, and
    whose help texts show each flag's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        apply_output_args(namespace)
        # a main(argv) called in-process (a test, a notebook) runs this argv, not the process's sys.argv
        _OUTPUT["command"] = None if args is None else [self.prog, *map(str, args)]
        return namespace, extras


# What --log_level / --disable_tqdm of the last parsed command line asked for, and that command line: read by
# `trainer.setup_logging`, `progress` and the model cards, so that every script honours them without threading
# them through every call.
_OUTPUT: dict[str, object] = {"log_level": "info", "disable_tqdm": False, "command": None}


def apply_output_args(args: argparse.Namespace) -> None:
    _OUTPUT["log_level"] = getattr(args, "log_level", None) or "info"
    _OUTPUT["disable_tqdm"] = bool(getattr(args, "disable_tqdm", False))


def parsed_command() -> str:
    """The command line of the last parse, quoted for a shell: the script and the argv given to its main()
    (a test or notebook calling main(argv) in-process), else sys.argv. The model cards record it."""
    return command_line(_OUTPUT["command"] or sys.argv)


def log_level() -> str:
    return str(_OUTPUT["log_level"])


def progress_disabled() -> bool:
    """--disable_tqdm, or TQDM_DISABLE set to a true value in the environment. (tqdm reads TQDM_* only when
    it is imported and an explicit `disable=` overrides it, so every bar of ours asks here.)"""
    env = os.environ.get("TQDM_DISABLE", "").strip().lower()
    return bool(_OUTPUT["disable_tqdm"]) or env in ("1", "true", "yes", "on")


def progress(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar that honours --disable_tqdm and TQDM_DISABLE (on top of the caller's own `disable`)."""
    if progress_disabled():
        kwargs["disable"] = True
    return tqdm(iterable, **kwargs)


set_progress_bar(progress)  # the library's bars (training, importance, subnet evaluation) are these


def setup_logging(rank: int = 0) -> None:
    """The log format, at --log_level (of the command line last parsed) on rank 0, warnings elsewhere."""
    level = getattr(logging, log_level().upper())
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
        level=level if rank == 0 else max(level, logging.WARNING), force=True,
    )
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The module docstring as written, and after every flag `(default: X)` (unless its help states it or it
    has none) and its declared range (`bounded` types)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        notes = []
        unset = action.default is None or action.default is False or action.default is argparse.SUPPRESS
        if not ("default" in text or unset or not action.option_strings):
            value = action.default
            if isinstance(value, list):
                value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
            notes.append(f"default: {value}")
        declared = getattr(action.type, "range_text", None)
        if declared:
            notes.append(declared)
        return f"{text} ({'; '.join(notes)})" if notes else text


# ---- argument types ---------------------------------------------------------------------------------------
# Every numeric flag has a declared range (`transformers_ext.ranges`), checked here while parsing: argparse
# then reports `error: argument --flag: must be ..., got X`. Values from files (--config, a gate folder's
# config.json) go through the same types.
class bounded(Bounded):  # lower case: used like the built-in types, type=bounded(int, 1)
    """An argparse type: a finite int or float in [low, high] (`low_open` / `high_open` exclude the end)."""

    @classmethod
    def of(cls, check: Bounded) -> bounded:
        return cls(check.kind, check.low, check.high, low_open=check.low_open, high_open=check.high_open)

    def __call__(self, value: str | int | float) -> int | float:
        try:
            return super().__call__(value)
        except RangeError as err:
            raise argparse.ArgumentTypeError(str(err)) from None


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    if value.lower() in ("1", "true", "yes", "y", "on"):
        return True
    if value.lower() in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got '{value}'")


def comma_items(value: str) -> list[str]:
    """The items of a comma list ([] for a blank one); an empty item is refused: `0.5,,0.75` is a typo, not
    two widths."""
    items = [v.strip() for v in value.split(",")]
    if not any(items):
        return []
    if not all(items):
        raise argparse.ArgumentTypeError(f"'{value}' has an empty item between its commas")
    return items


def _checked_items(value: str | Sequence, example: str) -> list:
    """The items of a non-empty comma list (or of a list, as in a JSON file); `example` shows a good one."""
    items = comma_items(value) if isinstance(value, str) else list(value)
    if not items:
        raise argparse.ArgumentTypeError(f"empty list; give {example}")
    return items


def multiplier_list(value: str | Sequence[float]) -> list[float]:
    """A comma list of width/depth multipliers, each in (0, 1] (or a list of numbers, as in a JSON file)."""
    return [MULTIPLIER(item) for item in _checked_items(value, "comma-separated ratios such as 0.25,0.5,0.75,1.0")]


def subnet_list(value: str) -> list[tuple[float, float]]:
    """A comma list of static subnets spelled `w<width>_d<depth>` (w0.25_d0.5,w1.0_d1.0), each ratio in (0, 1]."""
    subnets = []
    for item in _checked_items(value, "subnets such as w0.25_d0.5,w0.75_d1.0"):
        width, _, depth = item.partition("_")
        if not (width.startswith("w") and depth.startswith("d")):
            raise argparse.ArgumentTypeError(f"'{item}' is not a subnet spelled w<width>_d<depth>, e.g. w0.25_d0.5")
        subnets.append((MULTIPLIER(width[1:]), MULTIPLIER(depth[1:])))
    return subnets


def non_negative_list(value: str | Sequence[float]) -> list[float]:
    """A non-empty comma list of numbers >= 0 (thresholds), or a list of numbers (as in a JSON file)."""
    return [NON_NEGATIVE(item) for item in _checked_items(value, "comma-separated numbers >= 0")]


def int_list(value: str) -> list[int]:
    try:
        return [int(v) for v in comma_items(value)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}' is not a comma list of integers") from None


def layer_list(value: str | Sequence[int]) -> list[int]:
    """A non-empty comma list of 0-based layer indices (the upper bound is the model's: checked at load)."""
    items = comma_items(value) if isinstance(value, str) else list(value)
    if not items:
        raise argparse.ArgumentTypeError("empty list; give 0-based layer indices such as 2,3")
    return [LAYER(item) for item in items]


def number_list(check: Callable) -> Callable[[str], list[float]]:
    """An argparse type: a non-empty comma list of numbers, each checked by `check` (a bounded type)."""

    def parse(value: str) -> list[float]:
        try:
            items = [check(v) for v in comma_items(value)]
        except argparse.ArgumentTypeError as err:
            raise argparse.ArgumentTypeError(f"'{value}' must be a comma list of numbers: {err}") from None
        if not items:
            raise argparse.ArgumentTypeError("empty list")
        return items

    return parse


MULTIPLIER = bounded.of(ranges.MULTIPLIER)  # a width or depth ratio
LAYER = bounded.of(ranges.LAYER)
COUNT = bounded.of(ranges.COUNT)  # sizes, batches, examples, threads
STEPS = bounded.of(ranges.STEPS)  # step counts where 0 means "none" / "off"
NON_NEGATIVE = bounded.of(ranges.NON_NEGATIVE)  # loss weights, weight decay, thresholds
POSITIVE = bounded.of(ranges.POSITIVE)
PROBABILITY = bounded.of(ranges.PROBABILITY)  # dropout
SEED = bounded.of(ranges.SEED)  # numpy's seed range


# ---- flag groups ------------------------------------------------------------------------------------------
def add_task_args(parser: argparse.ArgumentParser) -> None:
    """Task, data, model and output: every script (the reference's names and meanings)."""
    a = parser.add_argument
    a("--model_type", default="bert", choices=["bert"], help="Model family; only BERT-style models (checked).")
    a("--task_name", default="QNLI", help="GLUE task: CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI.")
    a("--data_dir", default="data/QNLI/", help="Folder with the task's train.tsv / dev.tsv.")
    a("--model_dir", default="model/QNLI/bert/", help="Input model folder (HF format, with vocab.txt) or hub id.")
    a("--output_dir", default="dyna_bert/QNLI/", help="Where checkpoints, results and logs are written.")
    a("--max_seq_length", type=bounded(int, 3), default=128, help="Tokens per example after truncation/padding.")
    a("--do_lower_case", type=str2bool, nargs="?", const=True, default=None,
      help="Lower-case input (true/false). Default: the tokenizer's own setting (tokenizer_config.json; a "
           "cased model stays cased); the flag forces it either way.")
    a("--per_gpu_eval_batch_size", type=COUNT, default=32, help="Evaluation batch size per device.")
    a("--max_eval_samples", type=COUNT, default=None, help="Use only the first N dev examples.")
    a("--overwrite_output_dir", action="store_true",
      help="Allow writing into a folder holding another run (a rerun of the same script needs no flag). Never "
           "allows writing into the input --model_dir: only run_glue.py's final_finetuning does that.")
    a("--no_cuda", "--cpu", dest="cpu", action="store_true", help="Run on CPU even if CUDA is available.")
    a("--num_threads", type=COUNT, default=None, help="CPU threads for torch (default: torch's choice).")
    a("--cache_dir", default=None, help="Feature cache folder (default $FLEXBERT_CACHE or ~/.cache/flexbert).")
    a("--attn_implementation", choices=["sdpa", "eager"], default="sdpa",
      help="Attention kernel: sdpa (fast) or eager (explicit matmuls; what FlopCounterMode checks).")
    add_data_file_args(parser)


def add_data_file_args(parser: argparse.ArgumentParser) -> None:
    """Your own data instead of a GLUE folder (Hugging Face run_glue's names): utils_glue.setup_custom_task
    turns them into the run's task after parsing."""
    a = parser.add_argument
    a("--train_file", default=None,
      help="Training data: .csv, .tsv or .json/.jsonl (json lines), with a header naming the columns. With any "
           "of these three files the task is defined by them (--task_name only names the run; a GLUE name "
           "becomes 'custom') and --data_dir is not read.")
    a("--validation_file", default=None, help="Dev data (same format and columns; labels needed).")
    a("--test_file", default=None, help="Test data for --do_predict (labels optional; an index/idx/id column "
                                         "keys the predictions, else the row number from 0).")
    a("--text_column", default=None, help="Column of the (first) text (default: sentence1, else sentence or text).")
    a("--text_pair_column", default=None,
      help="Column of the second text (default: sentence2 when the file has it; otherwise a single-text task).")
    a("--label_column", default=None, help="Column of the label (default: label).")
    a("--is_regression", action="store_true",
      help="The label is a number to predict (default: inferred; regression when every label is a number and "
           "some are written as floats, e.g. 2.5 or 3.0; integer labels are class ids).")
    add_output_args(parser)


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """How much a script prints: the log level and the progress bars (every script)."""
    a = parser.add_argument
    a("--log_level", choices=LOG_LEVELS, default="info",
      help="Level of the flexbert log messages (other processes of torchrun log warnings and above).")
    a("--disable_tqdm", action="store_true",
      help="No progress bars (also when the environment sets TQDM_DISABLE=1).")


def add_training_args(parser: argparse.ArgumentParser, learning_rate: float, epochs: float, logging_steps: int,
                      seed: int) -> None:
    """The training loop's flags (`trainer.fit`), with the script's defaults."""
    a = parser.add_argument
    a("--do_train", action="store_true", help="Train.")
    a("--learning_rate", type=POSITIVE, default=learning_rate, help="Peak AdamW learning rate.")
    a("--num_train_epochs", type=bounded(float, 0, low_open=True), default=epochs,
      help="Training epochs; a fraction runs that share of the last epoch's updates, as Hugging Face's Trainer "
           "(0.5: half an epoch).")
    a("--per_gpu_train_batch_size", type=COUNT, default=32, help="Training batch size per device/process.")
    a("--gradient_accumulation_steps", type=COUNT, default=1,
      help="Batches accumulated per optimizer update (at most the batches of one epoch; checked on the data).")
    a("--weight_decay", type=NON_NEGATIVE, default=0.0, help="AdamW decoupled weight decay (not on biases/LayerNorm).")
    a("--warmup_steps", type=STEPS, default=0, help="Linear learning-rate warm-up steps.")
    a("--logging_steps", type=STEPS, default=logging_steps,
      help="Evaluate (and checkpoint) every N updates; 0: only at the end.")
    a("--seed", type=SEED, default=seed, help="Random seed (model init, data order, dropout).")
    a("--max_train_samples", type=COUNT, default=None, help="Use only the first N training examples.")
    a("--data_aug", action="store_true",
      help="Train on the augmented file (train_{TASK}_aug_with_logits.tsv or train_aug.tsv; see augment_data.py).")
    a("--hidden_dropout_prob", type=PROBABILITY, default=0.1, help="Dropout on hidden states (applied to the config).")
    a("--attention_probs_dropout_prob", type=PROBABILITY, default=0.1, help="Dropout on attention probabilities.")
    a("--load_checkpoint", action="store_true", help="Resume from the latest checkpoint in --output_dir.")
    a("--resume_from_checkpoint", nargs="?", const="latest", default=None,
      help="Resume from a checkpoint folder (or the latest in --output_dir when no path is given).")
    a("--fp16", action="store_true", help="float16 autocast with loss scaling (CUDA only).")
    a("--bf16", action="store_true", help="bfloat16 autocast (CPU or CUDA).")
    a("--tf32", action="store_true",
      help="TF32 matmuls on CUDA (Ampere and later): faster fp32, 10-bit mantissa products; off: exact fp32.")
    a("--deterministic", action="store_true",
      help="Deterministic kernels (torch.use_deterministic_algorithms; on CUDA also CUBLAS_WORKSPACE_CONFIG): "
           "reruns on the same GPU give identical results, somewhat slower.")


def add_calibration_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("calibration (train_gate_new.py)").add_argument
    g("--calibrate", action="store_true", help="Choose the class -> width map and exit threshold on a calibration "
      "split (needs --flops_budget and/or --max_drop), then report the choice on examples it did not see.")
    g("--flops_budget", type=number_list(POSITIVE), default=None, help="Objective: the best score at relative "
      "FLOPs (true FLOPs / the full model's) <= B; a comma list gives one chosen setting per budget.")
    g("--max_drop", type=number_list(NON_NEGATIVE), default=None, help="Objective: the fewest FLOPs at a score >= "
      "the full model's on the calibration split - D (0.01 = one point); a comma list gives one setting each.")
    g("--within_se", type=NON_NEGATIVE, default=1.0, help="FLOPs budgets: of the settings within the budget "
      "whose calibration score is at most this many standard errors below the best, take the one with the most "
      "FLOPs (0: the best score, ties to fewer FLOPs); on a few hundred examples smaller differences are noise.")
    g("--calibration_file", default=None, help="Labelled file in the dev set's format to calibrate on; the report "
      "then uses all of dev (default: a seeded half of dev calibrates, the other half reports).")
    g("--calibration_seed", type=SEED, default=42, help="Seed of the dev split into calibration/reporting halves.")
    g("--calibration_grid", type=multiplier_list, default=None,
      help="Widths a class may map to (default: the trained widths plus 0.55, 0.6, 0.65).")
    g("--calibration_max_exhaustive", type=STEPS, default=256,
      help="Evaluate every monotone map when there are at most this many, else coordinate ascent.")
    g("--calibration_batch_size", type=COUNT, default=64, help="Batch size of the calibration forwards "
      "(length-sorted, padding trimmed; results do not depend on it).")
    g("--calibration_config", default=None, help="Also merge the chosen entry into this JSON file "
      "(best_tradeoff_inference_config.json format); one objective only.")
    g("--no_static_baselines", action="store_true", help="Skip running every static subnet on the reporting split.")
    g("--calibration_strategies", type=comma_items, default=list(STRATEGIES), help="What each budget chooses "
      "among, whichever wins on the calibration split: gates (class -> width map and exit threshold), static "
      "(every static subnet), cascade (confidence cascades of static subnets: which subnets, which thresholds).")
    g("--calibration_cascade_grid", type=int_list, default=list(CASCADE_GRID), help="Cascades: quantile bins of "
      "each threshold per cascade length (as compare_strategies.py --cascade_grid: 24,6 = 2-stage cascades on 23 "
      "thresholds, 3-stage on 5 x 5; 0 skips a length).")


def calibration_flags(argv: list[str]) -> dict:
    """The calibration flags' values (by dest) in `argv`, which holds calibration flags only ([]: the defaults)."""
    parser = ArgumentParser(prog="train_gate_new.py", add_help=False)
    add_calibration_args(parser)
    return vars(parser.parse_args(argv))


def finish_training_args(args: argparse.Namespace) -> argparse.Namespace:
    if getattr(args, "load_checkpoint", False) and args.resume_from_checkpoint is None:
        args.resume_from_checkpoint = "latest"
    if getattr(args, "fp16", False) and getattr(args, "bf16", False):
        raise CLIError("--fp16 and --bf16 exclude each other: pick one precision")
    return args


def setup_run_device(args: argparse.Namespace) -> tuple[torch.device, int, int]:
    """(device, rank, world size) of a script's run (`environment.setup_device`), its fp32 numerics set by
    --tf32 / --deterministic. --fp16 is refused off CUDA, in training and inference alike: float16 autocast
    is a GPU's precision (its loss scaling is CUDA's), bfloat16 the CPU's."""
    device, rank, world = setup_device(args.cpu, args.num_threads)
    if getattr(args, "fp16", False) and device.type != "cuda":
        raise CLIError("--fp16 needs a CUDA device; use --bf16 on CPU")
    setup_numerics(device, args.tf32, args.deterministic)
    return device, rank, world


def validate_task_args(args: argparse.Namespace) -> utils_glue.TaskSpec:
    """The task and its data folder (numeric flags are range-checked by their argparse types)."""
    spec = utils_glue.get_task(args.task_name)
    if not Path(args.data_dir).is_dir():
        raise CLIError(f"--data_dir {args.data_dir} does not exist")
    return spec


# load_model's keyword arguments and the flags that give them (a script without the flag keeps the folder's)
MODEL_OPTIONS = ("max_seq_length", "pooling", "hidden_dropout_prob", "attention_probs_dropout_prob", "do_lower_case",
                 "attn_implementation")


def model_options(args: argparse.Namespace) -> dict:
    """`transformers_ext.loading.load_model`'s keyword arguments from the flags this script has."""
    return {name: getattr(args, name) for name in MODEL_OPTIONS if getattr(args, name, None) is not None}


def validate_subnets(config, widths: dict[str, Sequence[float]], depths: dict[str, Sequence[float]]) -> None:
    """Every width multiplier must keep at least one head and every depth multiplier one layer of this model;
    `widths` / `depths` map the flag that gave them to the values."""
    for check, flags in ((heads_kept, widths), (layers_kept, depths)):
        for flag, values in flags.items():
            for value in values:
                try:
                    check(config, value)
                except ValueError as err:
                    raise CLIError(f"{flag}: {err}") from None
