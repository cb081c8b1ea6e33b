"""What run_glue.py and train_gate.py share: CLI errors and argument types, seeding and devices
(incl. torchrun), model/tokenizer loading, deterministic resumable batching, optimizer and schedule,
evaluation of sub-networks, atomic checkpoints and logging."""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import TensorDataset
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoTokenizer, get_linear_schedule_with_warmup

import utils_glue

from .modeling_flexbert import FlexBertForSequenceClassification

logger = logging.getLogger("flexbert")


# ---- errors and argument types ------------------------------------------------------------------------
class CLIError(Exception):
    """A user error: printed as one line `error: ...`, exit code 2, no traceback."""


def run_cli(main: Callable[[], None]) -> None:
    """Run a script's main(): user errors become one `error:` line on stderr and a non-zero exit."""
    try:
        main()
    except (CLIError, utils_glue.DataError) as err:
        _close_progress_bars()
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # unreadable input, unwritable output folder, full disk, ...
        _close_progress_bars()
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        _close_progress_bars()
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


def _close_progress_bars() -> None:
    """End open tqdm bars (they leave the cursor mid-line) so that the error starts a line of its own."""
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, `error: <problem> (see <prog> --help)`, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


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


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Flags shared by run_glue.py and train_gate.py (the reference's names and meanings)."""
    a = parser.add_argument
    a("--model_type", default="bert", choices=["bert"], help="Model family (only BERT-style models).")
    a("--task_name", default="QNLI", help="GLUE task: CoLA, SST-2, MRPC, STS-B, QQP, MNLI, QNLI, RTE, WNLI.")
    a("--data_dir", default="data/QNLI/", help="Folder with the task's train.tsv / dev.tsv.")
    a("--model_dir", default="model/QNLI/bert/", help="Input model folder (HF format, with vocab.txt).")
    a("--output_dir", default="dyna_bert/QNLI/", help="Where checkpoints, results and logs are written.")
    a("--max_seq_length", type=int, default=128, help="Tokens per example after truncation/padding.")
    a("--do_train", action="store_true", help="Train.")
    a("--evaluate_during_training", type=str2bool, nargs="?", const=True, default=True,
      help="Evaluate every --logging_steps updates (true/false).")
    a("--do_lower_case", type=str2bool, nargs="?", const=True, default=True,
      help="Lower-case input (true/false); overrides the tokenizer's own setting, so keep true for uncased models.")
    a("--per_gpu_train_batch_size", type=int, default=32, help="Training batch size per device/process.")
    a("--per_gpu_eval_batch_size", type=int, default=32, help="Evaluation batch size per device.")
    a("--gradient_accumulation_steps", type=int, default=1, help="Batches accumulated per optimizer update.")
    a("--weight_decay", type=float, default=0.0, help="AdamW decoupled weight decay (not on biases/LayerNorm).")
    a("--warmup_steps", type=int, default=0, help="Linear learning-rate warm-up steps.")
    a("--hidden_dropout_prob", type=float, default=0.1, help="Dropout on hidden states (applied to the config).")
    a("--attention_probs_dropout_prob", type=float, default=0.1, help="Dropout on attention probabilities.")
    a("--data_aug", action="store_true",
      help="Train on the augmented file (train_{TASK}_aug_with_logits.tsv or train_aug.tsv; see augment_data.py).")
    a("--depth_lambda1", type=float, default=1.0, help="Depth phase: weight of the logit distillation loss.")
    a("--depth_lambda2", type=float, default=1.0, help="Depth phase: weight of the hidden-state MSE loss.")
    a("--width_lambda1", type=float, default=1.0, help="Width phase (--data_aug): weight of logit distillation.")
    a("--width_lambda2", type=float, default=0.1, help="Width phase (--data_aug): weight of hidden-state MSE.")
    a("--max_train_samples", type=int, default=None, help="Use only the first N training examples.")
    a("--max_eval_samples", type=int, default=None, help="Use only the first N dev examples.")
    a("--overwrite_output_dir", action="store_true", help="Allow writing into a folder holding another run.")
    a("--no_cuda", "--cpu", dest="cpu", action="store_true", help="Run on CPU even if CUDA is available.")
    a("--num_threads", type=int, default=None, help="CPU threads for torch (default: torch's choice).")
    a("--cache_dir", default=None, help="Feature cache folder (default $FLEXBERT_CACHE or ~/.cache/flexbert).")
    a("--attn_implementation", choices=["sdpa", "eager"], default="sdpa",
      help="Attention kernel: sdpa (fast) or eager (explicit matmuls; what FlopCounterMode checks).")


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


def validate_common_args(args: argparse.Namespace) -> utils_glue.TaskSpec:
    spec = utils_glue.get_task(args.task_name)
    if not Path(args.data_dir).is_dir():
        raise CLIError(f"--data_dir {args.data_dir} does not exist")
    for name in ("per_gpu_train_batch_size", "per_gpu_eval_batch_size", "gradient_accumulation_steps"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name} must be at least 1")
    for name in ("max_train_samples", "max_eval_samples"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise CLIError(f"--{name} must be at least 1")
    if args.max_seq_length <= 2:
        raise CLIError(f"--max_seq_length {args.max_seq_length} leaves no room for text (needs > 2)")
    return spec


# ---- seeding, devices, torchrun -----------------------------------------------------------------------
def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def setup_device(cpu: bool = False, num_threads: int | None = None) -> tuple[torch.device, int, int]:
    """(device, rank, world_size). Under torchrun, joins the process group (nccl on GPU, gloo on CPU)."""
    if num_threads:
        torch.set_num_threads(num_threads)
    use_cuda = torch.cuda.is_available() and not cpu
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), rank, world
    return torch.device("cpu"), rank, world


def all_reduce_gradients(params: Sequence[torch.nn.Parameter], world: int) -> None:
    """Average gradients over processes once per update (DDP semantics; done once for all subnets)."""
    if world == 1:
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def setup_logging(rank: int = 0) -> None:
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
        level=logging.INFO if rank == 0 else logging.WARNING, force=True,
    )
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


# ---- model loading --------------------------------------------------------------------------------------
def load_model_and_tokenizer(
    model_dir: str,
    spec: utils_glue.TaskSpec,
    args: argparse.Namespace | None = None,
) -> tuple[FlexBertForSequenceClassification, object]:
    """Our BERT + its tokenizer from an HF folder or hub id, with clear errors for what is not a BERT."""
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
    if args is not None:
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


def save_model(model: FlexBertForSequenceClassification, tokenizer, output_dir: str | Path,
               extra_files: dict[str, str] | None = None) -> None:
    """Write an ordinary HF folder (config.json, model.safetensors, tokenizer files, vocab.txt) atomically:
    everything goes to a temporary folder first, then each file is renamed into place."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output_dir, prefix=".saving-"))
    try:
        model_to_save = model.module if hasattr(model, "module") else model
        model_to_save.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
        (tmp / "vocab.txt").write_text("".join(token + "\n" for token, _ in vocab), encoding="utf-8")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        for file in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):  # config last
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


def write_json(path: str | Path, obj) -> None:
    utils_glue.atomic_write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


# ---- batching ---------------------------------------------------------------------------------------------
LENGTH_GROUP = 50  # global batches sorted together by --group_by_length (Hugging Face's megabatch size)

def trim_padding(batch: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Drop padding columns beyond the longest example of the batch (results are unchanged: padded keys
    are masked out)."""
    length = int(batch[1].sum(1).max())
    return [t[:, :length] if t.dim() == 2 else t for t in batch]


def epoch_batches(
    dataset: TensorDataset,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    rank: int = 0,
    world: int = 1,
    start_batch: int = 0,
    lengths: torch.Tensor | None = None,
) -> Iterator[list[torch.Tensor]]:
    """Deterministic batches of one epoch: the order depends only on (seed, epoch), so a resumed run skips
    `start_batch` batches and sees exactly the data it would have seen. Under torchrun each process takes
    its share of every global batch (batch_size per process).

    With `lengths` (tokens per example) and shuffling, each run of LENGTH_GROUP global batches of the shuffled
    order is sorted longest first (Hugging Face's group_by_length): batches then hold examples of similar
    length, so trimming their padding saves most of the padded compute while the epoch stays a shuffle."""
    n = len(dataset)
    global_batch = batch_size * world
    if shuffle:
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        if lengths is not None:
            order = torch.cat([group[lengths[group].argsort(descending=True, stable=True)]
                               for group in order.split(global_batch * LENGTH_GROUP)])
    else:
        order = torch.arange(n)
    for b in range(start_batch, (n + global_batch - 1) // global_batch):
        global_chunk = order[b * global_batch : (b + 1) * global_batch]
        if len(global_chunk) < world:
            break  # a last batch too small to give every process an example is dropped (all ranks alike)
        chunk = global_chunk[rank::world]
        yield [t[chunk] for t in dataset.tensors]


def num_batches(dataset: TensorDataset, batch_size: int, world: int = 1) -> int:
    return (len(dataset) + batch_size * world - 1) // (batch_size * world)


def build_optimizer(model: torch.nn.Module, params: Sequence[tuple[str, torch.nn.Parameter]], lr: float,
                    weight_decay: float, warmup_steps: int, total_steps: int):
    """AdamW (eps 1e-8, decoupled decay except biases/LayerNorm weights) and a linear warm-up/decay."""
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for n, p in params if not any(k in n for k in no_decay)], "weight_decay": weight_decay},
        {"params": [p for n, p in params if any(k in n for k in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, eps=1e-8)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup_steps, max(total_steps, 1))
    return optimizer, scheduler


# ---- evaluation ------------------------------------------------------------------------------------------
@torch.no_grad()
def predict(model: FlexBertForSequenceClassification, dataset: TensorDataset, batch_size: int,
            device: torch.device) -> tuple[np.ndarray, np.ndarray, float]:
    """(logits, labels, mean loss) of the model's current sub-network on a dataset."""
    was_training = model.training
    model.eval()
    logits, labels, loss_sum = [], [], 0.0
    for batch in epoch_batches(dataset, batch_size, 0, 0, shuffle=False):
        input_ids, attention_mask, token_type_ids, label = (t.to(device) for t in trim_padding(batch))
        out = model(input_ids, attention_mask, token_type_ids, labels=label)
        loss_sum += out.loss.item() * len(label)
        logits.append(out.logits.float().cpu())
        labels.append(label.cpu())
    model.train(was_training)
    return torch.cat(logits).numpy(), torch.cat(labels).numpy(), loss_sum / len(dataset)


def evaluate_subnets(
    model: FlexBertForSequenceClassification,
    task_name: str,
    dev_sets: dict[str, TensorDataset],
    width_mult_list: Sequence[float],
    depth_mult_list: Sequence[float],
    batch_size: int,
    device: torch.device,
) -> dict[str, dict[str, float]]:
    """Metrics of every (depth, width) sub-network, depth descending then width descending. Keys are
    `d{depth}_w{width}`; MNLI's mismatched accuracy is added as `acc_mm`."""
    results = {}
    width, depth = model.width_mult, model.depth_mult
    subnets = [(d, w) for d in sorted(depth_mult_list, reverse=True) for w in sorted(width_mult_list, reverse=True)]
    for d, w in tqdm(subnets, desc="eval subnets", leave=False, disable=len(subnets) < 3):
        model.set_width_depth(w, d)
        logits, labels, loss = predict(model, dev_sets["dev"], batch_size, device)
        metrics = utils_glue.compute_metrics(task_name, logits, labels)
        if "dev_mm" in dev_sets:
            logits_mm, labels_mm, _ = predict(model, dev_sets["dev_mm"], batch_size, device)
            metrics["acc_mm"] = utils_glue.compute_metrics(task_name, logits_mm, labels_mm)["acc"]
        metrics["eval_loss"] = loss
        results[subnet_key(w, d)] = metrics
    model.set_width_depth(width, depth)
    return results


def subnet_key(width: float, depth: float) -> str:
    return f"d{depth:g}_w{width:g}"


def format_subnet_table(results: dict[str, dict[str, float]], metric: str) -> str:
    """Depth rows x width columns of one metric."""
    cells = {}
    for key, metrics in results.items():
        d, w = key[1:].split("_w")
        cells[(float(d), float(w))] = metrics[metric]
    depths = sorted({d for d, _ in cells}, reverse=True)
    widths = sorted({w for _, w in cells}, reverse=True)
    lines = [f"{metric:>10} | " + " ".join(f"w={w:<6g}" for w in widths)]
    lines.append("-" * len(lines[0]))
    for d in depths:
        lines.append(f"{'d=' + format(d, 'g'):>10} | " + " ".join(
            f"{cells[(d, w)]:<8.4f}" if (d, w) in cells else " " * 8 for w in widths))
    return "\n".join(lines)


# ---- resumable training state ---------------------------------------------------------------------------
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


def check_finite(loss: torch.Tensor, step: int, subnet: str) -> None:
    if not torch.isfinite(loss):
        raise CLIError(f"non-finite loss ({loss.item()}) at step {step} on subnet {subnet}; nothing was saved "
                       "for this step (lower --learning_rate or check the data)")
