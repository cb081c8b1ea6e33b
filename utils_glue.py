"""GLUE data layer: TSV readers for the nine tasks, augmented-data files, feature conversion with caching,
and metrics (SPEC §1)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef
from torch.utils.data import TensorDataset


class DataError(ValueError):
    """Bad input data: the message names the file (and line) at fault."""


@dataclass(frozen=True)
class TaskSpec:
    name: str  # canonical GLUE folder name, also used in augmented file names
    labels: tuple[str, ...] | None  # None = regression
    text_a: int
    text_b: int | None
    label_col: int  # -1 = last column
    train_header: bool = True
    dev_files: tuple[str, ...] = ("dev.tsv",)
    skip_short_rows: bool = False  # QQP has a few truncated rows, skipped as GLUE's reference does

    @property
    def is_regression(self) -> bool:
        return self.labels is None

    @property
    def num_labels(self) -> int:
        return 1 if self.labels is None else len(self.labels)

    @property
    def min_columns(self) -> int:
        cols = [self.text_a, self.label_col] + ([self.text_b] if self.text_b is not None else [])
        if self.label_col == -1:  # the label is the last column, after the texts: a row missing one is short
            cols.append(max(cols) + 1)
        return max(max(cols) + 1, 2)


_NLI = ("entailment", "not_entailment")
TASKS: dict[str, TaskSpec] = {
    "cola": TaskSpec("CoLA", ("0", "1"), 3, None, 1, train_header=False),
    "sst-2": TaskSpec("SST-2", ("0", "1"), 0, None, 1),
    "mrpc": TaskSpec("MRPC", ("0", "1"), 3, 4, 0),
    "sts-b": TaskSpec("STS-B", None, 7, 8, -1),
    "qqp": TaskSpec("QQP", ("0", "1"), 3, 4, 5, skip_short_rows=True),
    "mnli": TaskSpec(
        "MNLI", ("entailment", "neutral", "contradiction"), 8, 9, -1,
        dev_files=("dev_matched.tsv", "dev_mismatched.tsv"),
    ),
    "qnli": TaskSpec("QNLI", _NLI, 1, 2, -1),
    "rte": TaskSpec("RTE", _NLI, 1, 2, -1),
    "wnli": TaskSpec("WNLI", ("0", "1"), 1, 2, -1),
}
# Primary metric first (SPEC §1.2); the model is selected on it.
METRIC_KEYS = {
    "cola": ("mcc",),
    "sst-2": ("acc",),
    "mrpc": ("acc", "f1", "acc_and_f1"),
    "sts-b": ("pearson", "spearmanr", "corr"),
    "qqp": ("acc", "f1", "acc_and_f1"),
    "mnli": ("acc", "acc_mm"),
    "qnli": ("acc",),
    "rte": ("acc",),
    "wnli": ("acc",),
}


def get_task(task_name: str) -> TaskSpec:
    key = task_name.lower()
    if key == "mnli-mm":
        key = "mnli"
    if key not in TASKS:
        raise DataError(f"unknown task '{task_name}'; choose one of: {', '.join(s.name for s in TASKS.values())}")
    return TASKS[key]


@dataclass
class InputExample:
    guid: str
    text_a: str
    text_b: str | None
    label: str | float


def read_tsv(path: str | Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) per non-empty line: UTF-8 (BOM stripped), TAB-separated, no quote processing."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 text") from None
    rows = [(n, line.rstrip("\r").split("\t")) for n, line in enumerate(text.split("\n"), start=1)]
    return [(n, fields) for n, fields in rows if fields != [""]]


def _parse_label(spec: TaskSpec, field: str, where: str, augmented: bool) -> str | float:
    field = field.strip()
    if spec.is_regression:
        try:
            return float(field)
        except ValueError:
            raise DataError(f"{where}: STS-B score '{field}' is not a number") from None
    if field in spec.labels:
        return field
    if augmented:
        # Augmented files may carry the teacher's logits: several numbers -> numeric argmax.
        try:
            logits = [float(x) for x in field.split()]
        except ValueError:
            logits = []
        if len(logits) == len(spec.labels):
            return spec.labels[int(np.argmax(logits))]
    raise DataError(f"{where}: unknown label '{field}' (expected one of {', '.join(spec.labels)})")


def read_examples(spec: TaskSpec, path: str | Path, has_header: bool, augmented: bool = False) -> list[InputExample]:
    rows = read_tsv(path)
    if not rows or (has_header and len(rows) == 1):
        raise DataError(f"{path}: no examples in file")
    if has_header:
        rows = rows[1:]
    examples = []
    for line_no, fields in rows:
        where = f"{path}:{line_no}"
        if len(fields) < spec.min_columns:
            if spec.skip_short_rows:
                continue
            raise DataError(f"{where}: expected at least {spec.min_columns} tab-separated columns, found {len(fields)}")
        label = _parse_label(spec, fields[spec.label_col], where, augmented)
        text_b = fields[spec.text_b] if spec.text_b is not None else None
        examples.append(InputExample(f"{Path(path).name}-{line_no}", fields[spec.text_a], text_b, label))
    return examples


def augmented_file(spec: TaskSpec, data_dir: str | Path) -> Path:
    """The augmented training file: `train_{TASK}_aug_with_logits.tsv`, else `train_aug.tsv` (SPEC §1.3)."""
    candidates = [Path(data_dir) / f"train_{spec.name}_aug_with_logits.tsv", Path(data_dir) / "train_aug.tsv"]
    for path in candidates:
        if path.is_file():
            return path
    raise DataError(
        f"--data_aug: no augmented training file in {data_dir} (looked for {candidates[0].name} and "
        f"{candidates[1].name}); make one with: python augment_data.py --task_name {spec.name} "
        f"--data_dir {data_dir} --model_dir <BERT model>"
    )


def get_examples(task_name: str, data_dir: str | Path, split: str) -> list[InputExample]:
    """split: `train`, `aug` (train + augmented examples appended), `dev`, `dev_mm` (MNLI mismatched)."""
    spec = get_task(task_name)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data dir {data_dir} does not exist")
    if split == "train":
        return read_examples(spec, data_dir / "train.tsv", spec.train_header)
    if split == "aug":
        aug = augmented_file(spec, data_dir)
        has_header = spec.train_header if aug.name == "train_aug.tsv" or spec.name != "CoLA" else False
        return get_examples(task_name, data_dir, "train") + read_examples(spec, aug, has_header, augmented=True)
    if split == "dev":
        return read_examples(spec, data_dir / spec.dev_files[0], spec.train_header)
    if split == "dev_mm":
        if len(spec.dev_files) < 2:
            raise DataError(f"task {spec.name} has no mismatched dev set")
        return read_examples(spec, data_dir / spec.dev_files[1], spec.train_header)
    raise ValueError(f"unknown split {split}")


def convert_examples_to_features(
    examples: list[InputExample], tokenizer, max_seq_length: int, spec: TaskSpec
) -> TensorDataset:
    """`[CLS] A [SEP] (B [SEP])`, longest-first truncation, right-padded with 0 to `max_seq_length`."""
    texts_a = [e.text_a for e in examples]
    texts_b = [e.text_b for e in examples] if spec.text_b is not None else None
    enc = tokenizer(
        texts_a, texts_b, max_length=max_seq_length, truncation="longest_first",
        padding="max_length", return_tensors="pt", return_token_type_ids=True, return_attention_mask=True,
    )
    if spec.is_regression:
        labels = torch.tensor([float(e.label) for e in examples], dtype=torch.float)
    else:
        index = {label: i for i, label in enumerate(spec.labels)}
        labels = torch.tensor([index[e.label] for e in examples], dtype=torch.long)
    return TensorDataset(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], labels)


def _tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    lower = getattr(tokenizer, "do_lower_case", None)
    return hashlib.sha1(repr((vocab, lower, type(tokenizer).__name__)).encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    return Path(os.environ.get("FLEXBERT_CACHE", Path.home() / ".cache" / "flexbert"))


def load_dataset(
    task_name: str,
    data_dir: str | Path,
    split: str,
    tokenizer,
    max_seq_length: int,
    max_examples: int | None = None,
    cache_dir: str | Path | None = None,
) -> TensorDataset:
    """Tokenised features for one split, cached per (files, split, tokenizer, max_seq_length)."""
    spec = get_task(task_name)
    examples = get_examples(task_name, data_dir, split)
    if max_examples is not None:
        examples = examples[:max_examples]
    key = hashlib.sha1(
        repr((spec.name, split, max_seq_length, _tokenizer_fingerprint(tokenizer),
              [(e.text_a, e.text_b, e.label) for e in examples])).encode()
    ).hexdigest()[:20]
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache / f"{spec.name}_{split}_{max_seq_length}_{key}.pt"
    if path.is_file():
        try:
            return TensorDataset(*torch.load(path, weights_only=True))
        except Exception:  # a corrupt cache entry is rebuilt, never trusted
            pass
    dataset = convert_examples_to_features(examples, tokenizer, max_seq_length, spec)
    try:
        from transformers_ext.checkpoint_io import torch_save  # here: checkpoint_io -> cli -> utils_glue is a cycle

        cache.mkdir(parents=True, exist_ok=True)
        torch_save(list(dataset.tensors), path)
    except OSError:
        pass  # caching is an optimisation; a read-only cache dir is fine
    return dataset


# ---- batching -------------------------------------------------------------------------------------------
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


# ---- metrics ------------------------------------------------------------------------------------------
def compute_metrics(task_name: str, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metrics of one dev set; `preds` are logits `[N, C]` (argmax taken) or regression outputs `[N]`/`[N,1]`."""
    spec = get_task(task_name)
    preds = np.asarray(preds)
    labels = np.asarray(labels)
    if spec.is_regression:
        preds = preds.reshape(-1)
        pearson = float(pearsonr(preds, labels)[0]) if np.std(preds) > 0 and np.std(labels) > 0 else 0.0
        spearman = float(spearmanr(preds, labels)[0]) if np.std(preds) > 0 and np.std(labels) > 0 else 0.0
        return {"pearson": pearson, "spearmanr": spearman, "corr": (pearson + spearman) / 2}
    if preds.ndim == 2:
        preds = preds.argmax(-1)
    acc = float((preds == labels).mean())
    key = task_name.lower()
    if key == "cola":
        return {"mcc": float(matthews_corrcoef(labels, preds))}
    if key in ("mrpc", "qqp"):
        f1 = float(f1_score(labels, preds, pos_label=1, zero_division=0))
        return {"acc": acc, "f1": f1, "acc_and_f1": (acc + f1) / 2}
    return {"acc": acc}


def primary_metric(task_name: str) -> str:
    return METRIC_KEYS["mnli" if task_name.lower() == "mnli-mm" else task_name.lower()][0]
