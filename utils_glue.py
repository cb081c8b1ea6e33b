"""GLUE data layer: TSV readers for the nine tasks, augmented-data files, feature conversion with caching,
and metrics (SPEC §1)."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from transformers_ext.batching import (  # noqa: F401  (LENGTH_GROUP, num_batches: the data layer's batching API)
    LENGTH_GROUP,
    epoch_batches,
    length_sorted_batches,
    num_batches,
    trim_padding,
)
from transformers_ext.errors import InputError
from transformers_ext.files import torch_save, write_text


class DataError(InputError, ValueError):
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
    # GLUE's test files: no labels, an index column first; texts where the task's test layout puts them
    test_files: tuple[str, ...] = ("test.tsv",)
    test_text_a: int | None = None  # None: the training layout's column
    test_text_b: int | None = None
    files: DataFiles | None = None  # set for a task defined by --train_file/--validation_file/--test_file

    @property
    def is_custom(self) -> bool:
        return self.files is not None

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
    "cola": TaskSpec("CoLA", ("0", "1"), 3, None, 1, train_header=False, test_text_a=1),
    "sst-2": TaskSpec("SST-2", ("0", "1"), 0, None, 1, test_text_a=1),
    "mrpc": TaskSpec("MRPC", ("0", "1"), 3, 4, 0),
    "sts-b": TaskSpec("STS-B", None, 7, 8, -1),
    "qqp": TaskSpec("QQP", ("0", "1"), 3, 4, 5, skip_short_rows=True, test_text_a=1, test_text_b=2),
    "mnli": TaskSpec(
        "MNLI", ("entailment", "neutral", "contradiction"), 8, 9, -1,
        dev_files=("dev_matched.tsv", "dev_mismatched.tsv"),
        test_files=("test_matched.tsv", "test_mismatched.tsv"),
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


# Tasks defined by data files (`register_task`), looked up before the GLUE names: the run's --task_name.
CUSTOM_TASKS: dict[str, TaskSpec] = {}
CUSTOM_METRIC_KEYS = ("acc", "macro_f1")
REGRESSION_METRIC_KEYS = ("pearson", "spearmanr", "corr")


def get_task(task_name: str) -> TaskSpec:
    key = task_name.lower()
    if key in CUSTOM_TASKS:
        return CUSTOM_TASKS[key]
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
    label: str | float | None  # None: a test example (no label known)
    index: str | None = None  # test files' index / id column: the key of the predictions file


def read_tsv(path: str | Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) per non-empty line: UTF-8 (BOM stripped), TAB-separated, no quote processing."""
    path = Path(path)
    text = _read_text(path)
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


def read_test_examples(spec: TaskSpec, path: str | Path) -> list[InputExample]:
    """A GLUE test file: a header, no labels, the index in column 0 and the texts at the task's test layout."""
    rows = read_tsv(path)
    if len(rows) < 2:
        raise DataError(f"{path}: no examples in file")
    text_a = spec.text_a if spec.test_text_a is None else spec.test_text_a
    text_b = spec.text_b if spec.test_text_b is None else spec.test_text_b
    need = max(text_a, text_b if text_b is not None else 0) + 1
    examples = []
    for line_no, fields in rows[1:]:
        if len(fields) < need:
            raise DataError(f"{path}:{line_no}: expected at least {need} tab-separated columns, found {len(fields)}")
        examples.append(InputExample(f"{Path(path).name}-{line_no}", fields[text_a],
                                     fields[text_b] if text_b is not None else None, None, fields[0]))
    return examples


# ---- your own data: csv / tsv / json lines ------------------------------------------------------------------
@dataclass(frozen=True)
class DataFiles:
    """The files and column names of a task defined by --train_file / --validation_file / --test_file."""

    train: str | None
    validation: str | None
    test: str | None
    text_column: str
    text_pair_column: str | None  # None: single-sentence task
    label_column: str


DATA_FORMATS = {".csv": "csv", ".tsv": "tsv", ".json": "json", ".jsonl": "json"}
INDEX_COLUMNS = ("index", "idx", "id")  # a test file's column that keys the predictions (else the row number)
INTEGER_LITERAL = re.compile(r"[+-]?\d+")  # class ids (HF run_glue: an integer label column is classification)


def data_format(path: str | Path) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in DATA_FORMATS:
        raise DataError(f"{path}: unknown data format '{suffix or Path(path).name}' (use .csv, .tsv, .json or .jsonl)")
    return DATA_FORMATS[suffix]


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a folder, not a data file") from None
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 text") from None


def read_table(path: str | Path) -> tuple[list[str], list[tuple[int, dict]]]:
    """(column names, [(line number, row)]) of a csv (quoted as Excel writes it), tsv (TAB-separated, no
    quoting, as GLUE's files) or json-lines file (one object per line). The first line of csv/tsv is the
    header; every row must have its columns. A bad line raises DataError naming file and line."""
    path = Path(path)
    fmt = data_format(path)
    text = _read_text(path)
    rows: list[tuple[int, dict]] = []
    if fmt == "json":
        columns: dict[str, None] = {}
        for line_no, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{line_no}: invalid JSON ({err.msg} at column {err.colno}); expected one "
                                "JSON object per line (json lines)") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object per line, got {type(obj).__name__}")
            columns.update(dict.fromkeys(obj))
            rows.append((line_no, obj))
        if not rows:
            raise DataError(f"{path}: no examples in file")
        return list(columns), rows
    if fmt == "tsv":
        records = [(n, line.rstrip("\r").split("\t")) for n, line in enumerate(text.split("\n"), start=1)]
        records = [(n, fields) for n, fields in records if fields != [""]]
    else:
        reader = csv.reader(io.StringIO(text, newline=""))  # str.splitlines would also split at U+2028 etc.
        records, start = [], 1
        try:
            for fields in reader:
                if fields:
                    records.append((start, fields))
                start = reader.line_num + 1
        except csv.Error as err:
            raise DataError(f"{path}:{reader.line_num}: bad CSV ({err})") from None
    if not records:
        raise DataError(f"{path}: empty file (expected a header line with the column names)")
    header = [h.strip() for h in records[0][1]]
    if len(records) == 1:
        raise DataError(f"{path}: no examples in file (only the header)")
    for line_no, fields in records[1:]:
        if len(fields) != len(header):
            raise DataError(f"{path}:{line_no}: expected {len(header)} {fmt} columns as in the header "
                            f"({', '.join(header)}), found {len(fields)}")
        rows.append((line_no, dict(zip(header, fields, strict=True))))
    return header, rows


def _cell(path: Path, line_no: int, row: dict, column: str, what: str) -> str | float | None:
    """The value of `column` (`what` it is for the message), None when empty."""
    if column not in row:
        raise DataError(f"{path}:{line_no}: column '{column}' ({what}) missing")
    value = row[column]
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise DataError(f"{path}:{line_no}: column '{column}' ({what}): expected a string or number, "
                        f"got {json.dumps(value)[:40]}")
    return value


def _label_text(value: str | float) -> str:
    """A label as a class name: JSON numbers 1 and 1.0 both name class "1"."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _as_number(value: str | float) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def resolve_columns(path: str | Path, columns: list[str], text_column: str | None, text_pair_column: str | None,
                    label_column: str | None, need_label: bool) -> tuple[str, str | None, str]:
    """The text, pair and label columns of a file: as given, else HF run_glue's names (`sentence1`,
    `sentence2`, `label`); `sentence` or `text` serve as the text column when there is no `sentence1`, and a
    file without `sentence2` is a single-sentence task."""
    def missing(flag: str, name: str) -> DataError:
        return DataError(f"{path}:1: no column '{name}' (columns: {', '.join(columns)}); name it with {flag}")

    if text_column is None:
        text_column = next((c for c in ("sentence1", "sentence", "text") if c in columns), "sentence1")
    if text_column not in columns:
        raise missing("--text_column", text_column)
    if text_pair_column is None:
        text_pair_column = "sentence2" if "sentence2" in columns else None
    elif text_pair_column not in columns:
        raise missing("--text_pair_column", text_pair_column)
    label_column = label_column or "label"
    if need_label and label_column not in columns:
        raise missing("--label_column", label_column)
    return text_column, text_pair_column, label_column


def infer_labels(path: str | Path, rows: list[tuple[int, dict]], column: str, is_regression: bool = False
                 ) -> tuple[str, ...] | None:
    """The label list of a training file: None (regression) with `is_regression` or when every label is a
    number and some are written as floats (2.5, 3.0; as HF run_glue, whose float label column is a regression
    target); else the distinct labels sorted (numerically when all are integers: 2 before 10)."""
    values = []
    for line_no, row in rows:
        value = _cell(Path(path), line_no, row, column, "label")
        if value is None:
            raise DataError(f"{path}:{line_no}: column '{column}' (label) is empty")
        values.append((line_no, value))
    numbers = [_as_number(v) for _, v in values]
    if is_regression:
        for (line_no, value), x in zip(values, numbers, strict=True):
            if x is None:
                raise DataError(f"{path}:{line_no}: column '{column}' (label): '{value}' is not a number "
                                "(--is_regression)")
        return None
    names = sorted({_label_text(v) for _, v in values})
    if all(x is not None for x in numbers):
        integers = all(isinstance(v, int) or (isinstance(v, str) and INTEGER_LITERAL.fullmatch(v.strip()))
                       for _, v in values)
        if not integers:
            return None
        names.sort(key=float)
    if len(names) < 2:
        raise DataError(f"{path}: column '{column}' (label) has only one value ({names[0]}); a classifier needs "
                        "at least two classes (pass --is_regression for a numeric target)")
    return tuple(names)


def read_custom_examples(spec: TaskSpec, path: str | Path, labelled: bool = True, augmented: bool = False
                         ) -> list[InputExample]:
    """The examples of one of the task's files; `labelled=False` (the test file) reads labels when the column
    is there and leaves them None otherwise (and for a classification label of -1, Hugging Face's mark of an
    unlabelled test example)."""
    files = spec.files
    path = Path(path)
    columns, rows = read_table(path)
    text, pair, label_col = resolve_columns(path, columns, files.text_column, files.text_pair_column,
                                            files.label_column, need_label=labelled)
    if pair is None and files.text_pair_column is not None:
        raise DataError(f"{path}:1: no column '{files.text_pair_column}' (the text pair column of the training "
                        f"file; columns: {', '.join(columns)})")
    has_label = label_col in columns
    index_col = next((c for c in INDEX_COLUMNS if c in columns), None)
    examples = []
    for n, (line_no, row) in enumerate(rows):
        where = f"{path}:{line_no}"
        a = _cell(path, line_no, row, text, "text")
        b = _cell(path, line_no, row, pair, "text pair") if pair is not None else None
        label = None
        if has_label:
            value = _cell(path, line_no, row, label_col, "label")
            if value is None:
                if labelled:
                    raise DataError(f"{where}: column '{label_col}' (label) is empty")
            elif spec.is_regression:
                label = _as_number(value)
                if label is None:
                    raise DataError(f"{where}: column '{label_col}' (label): '{value}' is not a number "
                                    "(the task is a regression)")
            elif not labelled and _label_text(value) == "-1" and "-1" not in spec.labels:
                label = None  # Hugging Face datasets mark unlabelled test examples with -1
            else:
                name = _label_text(value)
                label = name if name in spec.labels else None
                if label is None and augmented:  # the teacher's logits, as in GLUE augmented files
                    label = _parse_label(spec, str(value), where, augmented=True)
                if label is None:
                    raise DataError(f"{where}: column '{label_col}' (label): unknown label '{name}' (expected "
                                    f"one of {', '.join(spec.labels)}, the labels of the training file)")
        index = _label_text(row[index_col]) if index_col is not None and row.get(index_col) is not None else str(n)
        examples.append(InputExample(f"{path.name}-{line_no}", "" if a is None else str(a),
                                     None if pair is None else ("" if b is None else str(b)), label, index))
    return examples


def custom_augmented_file(train_file: str | Path) -> Path:
    """Where augment_data.py writes the augmented copy of a --train_file: `<stem>_aug<suffix>` beside it."""
    train_file = Path(train_file)
    return train_file.with_name(f"{train_file.stem}_aug{train_file.suffix}")


def _config_labels(model_dir: str | None) -> tuple[tuple[str, ...] | None, dict]:
    """The label names saved in a model folder's config.json (`id2label` in id order), unless they are
    transformers' placeholders LABEL_0, LABEL_1, ...; and the raw config (empty when unreadable)."""
    if not model_dir:
        return None, {}
    try:
        raw = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None, {}
    if not isinstance(raw, dict):
        return None, {}
    id2label = raw.get("id2label")
    if not isinstance(id2label, dict) or not id2label:
        return None, raw
    try:
        names = tuple(str(id2label[k]) for k in sorted(id2label, key=int))
    except (ValueError, TypeError):
        return None, raw
    if all(name == f"LABEL_{i}" for i, name in enumerate(names)):
        return None, raw
    return names, raw


def custom_task(name: str, files: DataFiles, is_regression: bool = False, model_dir: str | None = None
                ) -> TaskSpec:
    """The TaskSpec of a task defined by files, registered under `name` (so the scripts' `--task_name` finds
    it). Labels: the model folder's `id2label` when it names every label of the training file (later stages
    keep the label order the teacher was trained with), else those of the training file, sorted (else of the
    validation file, for inference without a training file)."""
    source = files.train or files.validation or files.test
    if source is None:
        raise DataError("no data file given (--train_file, --validation_file or --test_file)")
    columns, rows = read_table(source)
    labelled = source != files.test
    text, pair, label_col = resolve_columns(source, columns, files.text_column, files.text_pair_column,
                                            files.label_column, need_label=labelled)
    files = DataFiles(files.train, files.validation, files.test, text, pair, label_col)
    saved, raw = _config_labels(model_dir)
    saved_regression = raw.get("finetuning_task") == name.lower() and raw.get("num_labels", len(raw.get(
        "id2label") or {})) == 1
    if not labelled:  # a test file alone: the labels can only come from the model
        if saved is None and not (is_regression or saved_regression):
            raise DataError(f"{source}: cannot tell the labels from a test file alone and --model_dir "
                            f"{model_dir} names none (config.json id2label); give --train_file or "
                            "--validation_file too")
        labels = None if is_regression or saved_regression else saved
    else:
        labels = infer_labels(source, rows, label_col, is_regression or saved_regression)
        if labels is not None and saved is not None and set(labels) <= set(saved):
            labels = saved
    spec = TaskSpec(name, labels, 0, None if pair is None else 1, -1, files=files)
    CUSTOM_TASKS[name.lower()] = spec
    return spec


def _custom_examples(spec: TaskSpec, split: str) -> list[InputExample]:
    files = spec.files
    flag, path = {"train": ("--train_file", files.train), "aug": ("--train_file", files.train),
                  "dev": ("--validation_file", files.validation), "test": ("--test_file", files.test)}.get(
        split, (None, None))
    if flag is None:
        raise DataError(f"task {spec.name} (your own data) has no '{split}' split")
    if path is None:
        raise DataError(f"task {spec.name}: this needs the {split} split; pass {flag}")
    if split == "aug":
        aug = custom_augmented_file(path)
        if not aug.is_file():
            raise DataError(f"--data_aug: no augmented training file {aug}; make one with: python augment_data.py "
                            f"--train_file {path} --model_dir <BERT model>")
        return _custom_examples(spec, "train") + read_custom_examples(spec, aug, augmented=True)
    return read_custom_examples(spec, path, labelled=split != "test")


def get_examples(task_name: str, data_dir: str | Path, split: str) -> list[InputExample]:
    """split: `train`, `aug` (train + augmented examples appended), `dev`, `dev_mm` (MNLI mismatched),
    `test`, `test_mm` (MNLI mismatched; test examples have no label). A task defined by files reads them."""
    spec = get_task(task_name)
    if spec.is_custom:
        return _custom_examples(spec, split)
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
    if split == "test":
        return read_test_examples(spec, data_dir / spec.test_files[0])
    if split == "test_mm":
        if len(spec.test_files) < 2:
            raise DataError(f"task {spec.name} has no mismatched test set")
        return read_test_examples(spec, data_dir / spec.test_files[1])
    raise ValueError(f"unknown split {split}")


def split_names(task_name: str, kind: str) -> list[str]:
    """The dev (`kind="dev"`) or test splits of a task: MNLI has matched and mismatched ones."""
    return [kind, f"{kind}_mm"] if get_task(task_name).name == "MNLI" else [kind]


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
    # test examples without a label get a placeholder (NaN / -1) that no metric or loss ever reads
    if spec.is_regression:
        labels = torch.tensor([math.nan if e.label is None else float(e.label) for e in examples], dtype=torch.float)
    else:
        index = {label: i for i, label in enumerate(spec.labels)}
        labels = torch.tensor([-1 if e.label is None else index[e.label] for e in examples], dtype=torch.long)
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
    skip_examples: int = 0,
) -> TensorDataset:
    """Tokenised features for one split, cached per (files, split, tokenizer, max_seq_length): the examples
    after the first `skip_examples` (in file order), at most `max_examples` of them. Skipping every example
    is a DataError."""
    spec = get_task(task_name)
    examples = get_examples(task_name, data_dir, split)
    if skip_examples and skip_examples >= len(examples):
        raise DataError(f"{spec.name} {split}: skipping the first {skip_examples} of its {len(examples)} examples "
                        "leaves none")
    examples = examples[skip_examples:]
    if max_examples is not None:
        examples = examples[:max_examples]
    key = hashlib.sha1(
        repr((spec.name, split, max_seq_length, _tokenizer_fingerprint(tokenizer),
              spec.labels, [(e.text_a, e.text_b, e.label) for e in examples])).encode()
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
        cache.mkdir(parents=True, exist_ok=True)
        torch_save(list(dataset.tensors), path)
    except OSError:
        pass  # caching is an optimisation; a read-only cache dir is fine
    return dataset


# ---- batching -------------------------------------------------------------------------------------------
def importance_batches(dataset: TensorDataset, batch_size: int, max_examples: int | None, by_length: bool
                       ) -> Iterator[list[torch.Tensor]]:
    """Padding-trimmed batches for head/neuron importance: whole batches in file order until `max_examples`
    are covered (so that count rounded up to a multiple of `batch_size`); `by_length`: the same examples,
    batched by length (importance sums |gradient| per batch, so its values change, not its examples)."""
    limit = None if max_examples is None else -(-max_examples // batch_size) * batch_size
    kept = TensorDataset(*(t[:limit] for t in dataset.tensors))
    if by_length:
        return (batch for _, batch in length_sorted_batches(kept, batch_size))
    return (trim_padding(batch) for batch in epoch_batches(kept, batch_size, 0, 0, False))


# ---- metrics ------------------------------------------------------------------------------------------
def compute_metrics(task_name: str, preds: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Metrics of one dev set; `preds` are logits `[N, C]` (argmax taken) or regression outputs `[N]`/`[N,1]`."""
    spec = get_task(task_name)
    preds = np.asarray(preds)
    labels = np.asarray(labels)
    # scipy and sklearn load on first use: they cost ~0.6 s per process, and the accuracy-only tasks need neither
    if spec.is_regression:
        from scipy.stats import pearsonr, spearmanr

        preds = preds.reshape(-1)
        pearson = float(pearsonr(preds, labels)[0]) if np.std(preds) > 0 and np.std(labels) > 0 else 0.0
        spearman = float(spearmanr(preds, labels)[0]) if np.std(preds) > 0 and np.std(labels) > 0 else 0.0
        return {"pearson": pearson, "spearmanr": spearman, "corr": (pearson + spearman) / 2}
    if preds.ndim == 2:
        preds = preds.argmax(-1)
    acc = float((preds == labels).mean())
    key = task_name.lower()
    if not spec.is_custom and key not in ("cola", "mrpc", "qqp"):
        return {"acc": acc}
    from sklearn.metrics import f1_score, matthews_corrcoef

    if spec.is_custom:  # every class counts alike in macro-F1, however rare (a class never seen scores 0)
        macro = float(f1_score(labels, preds, labels=list(range(spec.num_labels)), average="macro",
                               zero_division=0))
        return {"acc": acc, "macro_f1": macro}
    if key == "cola":
        return {"mcc": float(matthews_corrcoef(labels, preds))}
    f1 = float(f1_score(labels, preds, pos_label=1, zero_division=0))  # MRPC, QQP
    return {"acc": acc, "f1": f1, "acc_and_f1": (acc + f1) / 2}


def primary_metric(task_name: str) -> str:
    spec = get_task(task_name)
    if spec.is_custom:
        return (REGRESSION_METRIC_KEYS if spec.is_regression else CUSTOM_METRIC_KEYS)[0]
    return METRIC_KEYS["mnli" if task_name.lower() == "mnli-mm" else task_name.lower()][0]


# ---- predictions -----------------------------------------------------------------------------------------
def prediction_values(spec: TaskSpec, logits: np.ndarray | torch.Tensor) -> list[str | float]:
    """Per example: the predicted label's name, or the regression output."""
    logits = np.asarray(logits)
    if spec.is_regression:
        return [float(x) for x in logits.reshape(-1)]
    return [spec.labels[int(i)] for i in logits.argmax(-1)]


def predictions_text(spec: TaskSpec, indices: Sequence[str], predictions: Sequence[str | float]) -> str:
    """Hugging Face run_glue's `predict_results_<task>.txt`: `index<TAB>prediction`, label names (regression:
    three decimals, as run_glue writes STS-B)."""
    lines = ["index\tprediction"]
    for index, value in zip(indices, predictions, strict=True):
        lines.append(f"{index}\t{value:3.3f}" if spec.is_regression else f"{index}\t{value}")
    return "\n".join(lines) + "\n"


def predictions_file_name(task_name: str, split: str) -> str:
    """`predict_results_<task>.txt` (MNLI's mismatched test set: `predict_results_mnli-mm.txt`, as run_glue)."""
    name = get_task(task_name).name.lower()
    return f"predict_results_{name}{'-mm' if split.endswith('_mm') else ''}.txt"


def write_predictions(spec: TaskSpec, task_name: str, out_dir: Path, test_logits: dict[str, tuple],
                      example_records: dict[str, list[dict]]) -> list[str]:
    """predict_results_<task>.txt per test split ({split: (indices, logits)}; Hugging Face run_glue's format)
    and predictions_<split>.jsonl per split of `example_records` (one JSON object per example), each written
    atomically into `out_dir`. Returns what was written, one line per file, for the caller to show."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for split, (indices, logits) in test_logits.items():
        path = out_dir / predictions_file_name(task_name, split)
        write_text(path, predictions_text(spec, indices, prediction_values(spec, logits)))
        written.append(f"test predictions ({split}, {len(indices)} examples): {path}")
    for split, rows in example_records.items():
        path = out_dir / f"predictions_{split}.jsonl"
        write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        written.append(f"per-example predictions ({split}): {path}")
    return written


def label_value(spec: TaskSpec, label: float | int) -> str | float | None:
    """A dataset label tensor's value as written in prediction records: the class name, the float (regression),
    None for a test example without one."""
    if spec.is_regression:
        return None if math.isnan(float(label)) else float(label)
    return None if int(label) < 0 else spec.labels[int(label)]


def prediction_records(spec: TaskSpec, split: str, indices: Sequence[str], logits: torch.Tensor,
                       labels: torch.Tensor, out, class_to_width: Sequence[float] | None,
                       fixed_width: float | None) -> list[dict]:
    """One JSON-able record per example of a routed batch (`out`: a RoutedOutput, or anything with its
    per-example fields): index, prediction, label (None when unknown), the width multiplier each layer ran
    at (None: not run), heads per layer, layers executed, whether it left at an off-ramp, and its MACs and
    FLOPs (2 x (linear + attention) MACs, `flops.executed_macs`: the report's true_flops unit)."""
    predictions = prediction_values(spec, logits)
    # every per-example tensor read to the host once (not element by element: one device sync each)
    heads, width_class = out.heads.tolist(), out.width_class.tolist()
    exit_layer, exited = out.exit_layer.tolist(), out.exited.tolist()
    linear_macs, attention_macs = out.linear_macs.tolist(), out.attention_macs.tolist()
    labels = labels.tolist() if isinstance(labels, torch.Tensor) else labels
    records = []
    for i, index in enumerate(indices):
        widths = [None if h == 0 else (float(class_to_width[c]) if c >= 0 and class_to_width else fixed_width)
                  for h, c in zip(heads[i], width_class[i], strict=True)]
        linear, attention = int(linear_macs[i]), int(attention_macs[i])
        records.append({"split": split, "index": index, "prediction": predictions[i],
                        "label": label_value(spec, labels[i]), "widths": widths, "heads": heads[i],
                        "exit_layer": int(exit_layer[i]), "exited_early": bool(exited[i]),
                        "linear_macs": linear, "attention_macs": attention, "flops": 2 * (linear + attention)})
    return records


def setup_custom_task(args) -> object:
    """After parsing: with --train_file/--validation_file/--test_file, register the task the files define
    under args.task_name (a GLUE name, the default included, becomes "custom": GLUE's metrics and files do
    not apply) and point --data_dir at the files' folder. Without them, args is returned unchanged."""
    given = [getattr(args, f, None) for f in ("train_file", "validation_file", "test_file")]
    if not any(given):
        for flag in ("text_column", "text_pair_column", "label_column"):
            if getattr(args, flag, None) is not None:
                raise DataError(f"--{flag} applies to --train_file/--validation_file/--test_file only")
        if getattr(args, "is_regression", False):
            raise DataError("--is_regression applies to --train_file/--validation_file/--test_file only "
                            "(GLUE tasks have their own labels)")
        return args
    for flag, path in zip(("--train_file", "--validation_file", "--test_file"), given, strict=True):
        if path is not None:
            data_format(path)
            if not Path(path).is_file():
                raise DataError(f"{flag} {path}: file not found")
    key = args.task_name.lower()
    name = "custom" if key in TASKS or key == "mnli-mm" else args.task_name
    files = DataFiles(args.train_file, args.validation_file, args.test_file, args.text_column,
                      args.text_pair_column, args.label_column)
    spec = custom_task(name, files, getattr(args, "is_regression", False), getattr(args, "model_dir", None))
    args.task_name = spec.name
    args.data_dir = str(Path(next(p for p in given if p)).parent)  # unused by file tasks; keeps checks happy
    return args


def describe_task(spec: TaskSpec) -> str:
    """One line saying what was read from your files (the scripts log it once logging is set up)."""
    files = spec.files
    pair = f", pair column '{files.text_pair_column}'" if files.text_pair_column else " (single text)"
    kind = "regression" if spec.is_regression else f"{spec.num_labels} labels {', '.join(spec.labels)}"
    return f"task {spec.name} from your files: text column '{files.text_column}'{pair}, {kind}"
