"""Files in and out: a model folder validated completely (config, weights' shapes, vocabulary) and loaded
with clear errors, HF folders and resumable checkpoints written atomically, the output-folder policy, and the
RNG state a resumed run restores.

Library errors never escape from here as tracebacks: a file that cannot be read becomes an `InputError`
naming it (exit 2 in the scripts), one that cannot be written a `WriteError` naming it (exit 1)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoTokenizer

from .errors import InputError, error_detail, one_line, reading, writing
from .modeling_flexbert import FlexBertForSequenceClassification
from .ranges import LAYER, MULTIPLIER, NON_NEGATIVE, PROBABILITY, RangeError


# ---- the one atomic writer ---------------------------------------------------------------------------------
def atomic_write(path: str | Path, write: Callable[[Path], None], tmp_name: str | None = None) -> None:
    """`write(tmp)` to a temporary file (or folder) beside `path`, then rename it into place: a kill at any
    moment leaves the old `path` or the new one, never a torn one. Files get the umask's permissions.
    `tmp_name` fixes the temporary name (it is a file when `write` is called). A failure raises WriteError
    and leaves no temporary behind."""
    path = Path(path)
    tmp = None
    try:
        with writing(path):
            if tmp_name is None:
                fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                os.close(fd)
                tmp = Path(name)
            else:
                tmp = path.parent / tmp_name
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.touch()
            write(tmp)
            if tmp.is_file():
                honour_umask(tmp)
            os.replace(tmp, path)
    finally:
        if tmp is not None and tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp is not None and tmp.exists():
            tmp.unlink()


def honour_umask(path: Path) -> None:
    """Give a file the permissions a plain open() would (0666 minus the umask): mkstemp, and the libraries
    that write through it (safetensors via save_pretrained), leave 0600, unreadable to the group."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


def torch_save(obj, path: str | Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


# ---- models ------------------------------------------------------------------------------------------------
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_CONFIG_SIZES = {"vocab_size": 1, "hidden_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1,
                 "intermediate_size": 1, "max_position_embeddings": 3, "type_vocab_size": 1}


def _config_value(where: str, key: str, value, check: Callable):
    if isinstance(value, str):  # a number written as a string is a hand-edited or foreign file: refused
        raise InputError(f"{where}: {key} {value!r} is a string, not a number")
    try:
        return check(value)
    except (RangeError, TypeError, ValueError) as err:
        raise InputError(f"{where}: {key} {value!r} is invalid ({err})") from None


def _config_list(where: str, key: str, value, item: Callable) -> list:
    if not isinstance(value, list | tuple) or not value:
        raise InputError(f"{where}: {key} must be a non-empty list, got {value!r}")
    return [_config_value(where, key, v, item) for v in value]


def validate_config(config, where: str) -> None:
    """The architecture and the saved gate / early-exit settings of a config, before anything is built from
    it: types, ranges and consistency (heads divide the hidden size, gates divide the layers, one width per
    gate class, off-ramps inside the model)."""
    from transformers.activations import ACT2FN

    for key, low in _CONFIG_SIZES.items():
        value = getattr(config, key, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{where}: {key} must be an integer >= {low}, got {value!r}")
    if config.hidden_size % config.num_attention_heads:
        raise InputError(f"{where}: hidden_size {config.hidden_size} is not a multiple of num_attention_heads "
                         f"{config.num_attention_heads}")
    if not isinstance(config.hidden_act, str) or config.hidden_act not in ACT2FN:
        raise InputError(f"{where}: unknown hidden_act {config.hidden_act!r}")
    for key in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
        _config_value(where, key, getattr(config, key, 0.0), PROBABILITY)
    if getattr(config, "classifier_dropout", None) is not None:
        _config_value(where, "classifier_dropout", config.classifier_dropout, PROBABILITY)
    eps = getattr(config, "layer_norm_eps", 1e-12)
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
        raise InputError(f"{where}: layer_norm_eps must be a number > 0, got {eps!r}")
    if getattr(config, "pooling", None) not in (None, "cls", "mean"):
        raise InputError(f"{where}: pooling must be 'cls' or 'mean', got {config.pooling!r}")
    layers = config.num_hidden_layers
    if getattr(config, "gate_setting", None):
        setting = _config_list(where, "gate_setting", config.gate_setting, MULTIPLIER)
        num_gates = getattr(config, "num_gates", None)
        if isinstance(num_gates, bool) or not isinstance(num_gates, int) or num_gates < 1 or layers % num_gates:
            raise InputError(f"{where}: num_gates {num_gates!r} must be an integer dividing the {layers} layers")
        saved_map = getattr(config, "gate_class_to_width", None)
        if saved_map is not None:
            saved_map = _config_list(where, "gate_class_to_width", saved_map, MULTIPLIER)
            if len(saved_map) != len(setting):
                raise InputError(f"{where}: gate_class_to_width has {len(saved_map)} widths for the {len(setting)} "
                                 "gate classes of gate_setting")
    if getattr(config, "off_ramps", None) is not None:
        for layer in _config_list(where, "off_ramps", config.off_ramps, LAYER):
            if layer >= layers:
                raise InputError(f"{where}: off_ramps {config.off_ramps} must be layers 0..{layers - 1}")
    if getattr(config, "exit_threshold", None) is not None:
        _config_value(where, "exit_threshold", config.exit_threshold, NON_NEGATIVE)


def _weight_shapes(folder: Path) -> tuple[Path, dict[str, tuple[int, ...]]]:
    """(the weights file, {tensor name: shape}) of a model folder, reading only the headers; HF's key
    conventions are normalised (a bare `BertModel`'s names get the `bert.` prefix, LayerNorm gamma/beta)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    if (folder / "model.safetensors").is_file():
        file, shards = folder / "model.safetensors", [folder / "model.safetensors"]
    elif (folder / "model.safetensors.index.json").is_file():
        file = folder / "model.safetensors.index.json"
        with reading(file):
            weight_map = json.loads(file.read_text(encoding="utf-8"))["weight_map"]
            shards = [folder / name for name in sorted(set(weight_map.values()))]
    elif (folder / "pytorch_model.bin").is_file():
        file = folder / "pytorch_model.bin"
        with reading(file):
            state = torch.load(file, map_location="meta", weights_only=True)
            shapes = {k: tuple(v.shape) for k, v in state.items()}
        shards = []
    else:
        raise InputError(f"{folder} has no weights ({' or '.join(WEIGHT_FILES)})")
    for shard in shards:
        with reading(shard), safe_open(str(shard), framework="pt") as f:  # checks the header and the size
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    legacy = {".gamma": ".weight", ".beta": ".bias"}
    shapes = {next((k[: -len(a)] + b for a, b in legacy.items() if k.endswith(a) and "LayerNorm" in k), k): v
              for k, v in shapes.items()}
    if not any(k.startswith("bert.") for k in shapes):
        shapes = {k if k.startswith(("classifier.", "gates.", "cls.")) else f"bert.{k}": v for k, v in shapes.items()}
    return file, shapes


def _indices(keys, prefix: str) -> set[int]:
    return {int(k[len(prefix):].split(".", 1)[0]) for k in keys if k.startswith(prefix)
            and k[len(prefix):].split(".", 1)[0].isdigit()}


def _expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    buffers = {name for name, _ in model.named_buffers()}
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in buffers}


def check_weights(file: Path, found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                  against: str, optional: tuple[str, ...] = (), task: str | None = None) -> None:
    """The tensors of `file` against the shapes `expected` by `against` (config.json, or the model being
    trained): same layers and gates, same shapes; names starting with `optional` may be missing (a
    pretrained BERT has no classifier); tensors the model does not use (an MLM head) are ignored."""
    for prefix, what in (("bert.encoder.layer.", "layers"), ("gates.", "gates")):
        have, want = _indices(found, prefix), _indices(expected, prefix)
        if have != want:
            raise InputError(f"{file} holds {len(have)} {what} but {against} has {len(want)}")
    for key, shape in expected.items():
        if key in found and found[key] != shape:
            if key.startswith("classifier."):
                raise InputError(f"{file} has a classifier with {found[key][0]} outputs but {task or against} needs "
                                 f"{shape[0]} (a model fine-tuned for another task?)")
            raise InputError(f"{file}: {key} has shape {list(found[key])} but {against} needs {list(shape)} "
                             "(weights of another model?)")
    missing = [k for k in expected if k not in found and not k.startswith(optional)]
    if missing:
        raise InputError(f"{file} lacks {len(missing)} tensor(s) {against} needs, e.g. {missing[0]}")


def _check_tokenizer(tokenizer, config, model_dir: str) -> None:
    """The vocabulary must hold its special tokens and fit the embedding matrix, and the tokenizer must
    encode a sentence pair (an empty vocab.txt loads, then fails on the first example)."""
    path = Path(model_dir)
    source = next((path / n for n in ("tokenizer.json", "vocab.txt") if (path / n).is_file()), model_dir)
    vocab = tokenizer.get_vocab()
    backend = getattr(tokenizer, "_tokenizer", None)  # the vocabulary proper, without the added special tokens
    base = backend.get_vocab(with_added_tokens=False) if hasattr(backend, "get_vocab") else vocab
    if not base:
        raise InputError(f"{source}: empty vocabulary")
    specials = [t for t in (tokenizer.unk_token, tokenizer.cls_token, tokenizer.sep_token, tokenizer.pad_token) if t]
    missing = [t for t in specials if t not in vocab or (t == tokenizer.unk_token and t not in base)]
    if missing:
        raise InputError(f"{source}: the vocabulary lacks the special token(s) {', '.join(missing)}")
    if max(vocab.values()) >= config.vocab_size:
        raise InputError(f"{source}: {len(vocab)} tokens (ids up to {max(vocab.values())}) but the model's "
                         f"embedding has {config.vocab_size} rows (config.json vocab_size)")
    with reading(source):
        tokenizer("the first sentence .", "the second one .")


def validate_model_dir(model_dir: str, spec, args=None):
    """Everything about an input model folder that can be checked without loading it, before any output is
    touched: config.json (a BERT, valid sizes and saved settings, the task's labels, room for
    --max_seq_length), and the weights' shapes against the config (layers, gates, classifier). Returns the
    config, set up for the task. A hub id is checked once downloaded (its config only)."""
    path = Path(model_dir)
    if path.exists() and not path.is_dir():
        raise InputError(f"--model_dir {model_dir} is a file, not a model folder")
    if path.exists() and not (path / "config.json").is_file():
        raise InputError(f"--model_dir {model_dir} has no config.json (not a Hugging Face model folder)")
    looks_like_hub_id = not path.exists() and not model_dir.startswith((".", "/", "~")) and model_dir.count("/") <= 1
    if not path.exists() and not looks_like_hub_id:
        raise InputError(f"--model_dir {model_dir} does not exist")
    where = f"{path / 'config.json'}" if path.is_dir() else f"--model_dir {model_dir}"
    if path.is_dir():
        with reading(path / "config.json"):
            raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise InputError(f"{where}: not a JSON object")
        if raw.get("model_type", "bert") != "bert":
            raise InputError(f"--model_dir {model_dir} holds a '{raw.get('model_type')}' model, not a BERT")
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except Exception as err:  # hub id unreachable offline, a config transformers refuses, ...
        raise InputError(f"--model_dir {model_dir}: cannot read the model config ({type(err).__name__}: "
                         f"{error_detail(err)})") from None
    if config.model_type != "bert":
        raise InputError(f"--model_dir {model_dir} holds a '{config.model_type}' model, not a BERT")
    validate_config(config, where)
    if path.is_dir() and not (path / "vocab.txt").is_file():
        raise InputError(f"--model_dir {model_dir} has no vocab.txt (tokenizer vocabulary)")
    other_task = getattr(config, "finetuning_task", None) not in (None, spec.name.lower())
    if other_task and config.num_labels != spec.num_labels:
        raise InputError(
            f"--model_dir {model_dir} was fine-tuned for {config.finetuning_task} with {config.num_labels} "
            f"labels, not {spec.name}"
        )
    config.num_labels = spec.num_labels
    set_task_labels(config, spec)
    config.finetuning_task = spec.name.lower()
    if args is not None and args.max_seq_length > config.max_position_embeddings:
        raise InputError(f"--max_seq_length {args.max_seq_length} exceeds the model's {config.max_position_embeddings} "
                         "positions")
    if path.is_dir():
        file, found = _weight_shapes(path)
        with torch.device("meta"):
            expected = _expected_shapes(FlexBertForSequenceClassification(config))
        check_weights(file, found, expected, where, optional=("classifier.", "bert.pooler."), task=spec.name)
    return config


def pretrained_pooling(model_dir: str | Path) -> str | None:
    """The pooling a sentence-transformers folder was trained with (its `1_Pooling/config.json`): "mean" or
    "cls", else None. A model is fine-tuned best with the summary it was pre-trained to produce: the embedded
    MiniLM's intermediate [CLS] vectors barely depend on the input, its token means do."""
    file = Path(model_dir) / "1_Pooling" / "config.json"
    try:
        modes = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(modes, dict):
        return None
    if modes.get("pooling_mode_mean_tokens") and not modes.get("pooling_mode_cls_token"):
        return "mean"
    if modes.get("pooling_mode_cls_token") and not modes.get("pooling_mode_mean_tokens"):
        return "cls"
    return None


def set_task_labels(config, spec) -> None:
    """The task's label names in config.id2label / label2id (what pipelines and the hub widget show instead
    of LABEL_0...); a regression task (no labels) keeps transformers' default."""
    if spec.labels:
        config.id2label = dict(enumerate(spec.labels))
        config.label2id = {label: i for i, label in enumerate(spec.labels)}


def stock_loadable(config) -> bool:
    """Whether stock `BertForSequenceClassification` computes this model: the [CLS] pooling of BERT and every
    head of the original size (an exported narrower subnet records `attention_head_size`, which stock code
    does not read)."""
    heads_ok = getattr(config, "attention_head_size", None) in (None, config.hidden_size // config.num_attention_heads)
    divisible = config.hidden_size % config.num_attention_heads == 0
    return getattr(config, "pooling", None) in (None, "cls") and heads_ok and divisible


def load_model_and_tokenizer(
    model_dir: str,
    spec,
    args=None,
) -> tuple[FlexBertForSequenceClassification, object]:
    """Our BERT + its tokenizer from an HF folder or hub id, validated first (`validate_model_dir`); the
    tokenizer's vocabulary is checked against the embedding. `spec` is the task's `utils_glue.TaskSpec`;
    `args` supplies dropout, lower-casing and attention."""
    config = validate_model_dir(model_dir, spec, args)
    if getattr(args, "pooling", None):
        config.pooling = args.pooling
    elif getattr(config, "pooling", None) is None and pretrained_pooling(model_dir):
        config.pooling = pretrained_pooling(model_dir)
    if args is not None and hasattr(args, "hidden_dropout_prob"):
        config.hidden_dropout_prob = args.hidden_dropout_prob
        config.attention_probs_dropout_prob = args.attention_probs_dropout_prob
    with reading(f"--model_dir {model_dir} (tokenizer)"):
        # None (the default): the tokenizer's own setting, so a cased model is not silently lower-cased
        lower = getattr(args, "do_lower_case", None)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, **({} if lower is None else {"do_lower_case": lower}))
    _check_tokenizer(tokenizer, config, model_dir)
    with reading(f"--model_dir {model_dir} (weights)"):
        model = FlexBertForSequenceClassification.from_pretrained(
            model_dir, config=config, attn_implementation=getattr(args, "attn_implementation", "sdpa")
        )
    return model, tokenizer


def _write_model_folder(model, tokenizer, folder: Path, extra_files: dict[str, str] | None = None,
                        named: Path | None = None) -> None:
    """An ordinary HF folder: config.json, model.safetensors, tokenizer files, vocab.txt (+ extra files).
    A failed write raises WriteError naming the file as it will be called in `named` (the final folder)."""
    named = named or folder
    model_to_save = model.module if hasattr(model, "module") else model
    with writing(named / "model.safetensors"):
        folder.mkdir(parents=True, exist_ok=True)
        model_to_save.save_pretrained(folder)
    if stock_loadable(model_to_save.config):  # save_pretrained names our class, which stock code cannot build
        set_config_keys(folder / "config.json", {"architectures": ["BertForSequenceClassification"]},
                        named / "config.json")
    with writing(named / "tokenizer.json"):
        tokenizer.save_pretrained(folder)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    with writing(named / "vocab.txt"):
        (folder / "vocab.txt").write_text("".join(token + "\n" for token, _ in vocab), encoding="utf-8")
    for name, text in (extra_files or {}).items():
        with writing(named / name):
            (folder / name).write_text(text)
    for file in folder.iterdir():
        if file.is_file():
            honour_umask(file)


def set_config_keys(file: Path, keys: dict, named: Path | None = None) -> None:
    """Set `keys` in a config.json written by save_pretrained (same layout: sorted keys, indent 2)."""
    with writing(named or file):
        config = json.loads(file.read_text(encoding="utf-8"))
        config.update(keys)
        file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save_model(model: FlexBertForSequenceClassification, tokenizer, output_dir: str | Path,
               extra_files: dict[str, str] | None = None) -> None:
    """Write the HF folder into `output_dir` (which may hold other files, e.g. the input model for in-place
    final fine-tuning): everything goes to a temporary folder first, then each file is renamed into place,
    config.json last. A failure (full disk, ...) raises WriteError and leaves no temporary behind."""
    output_dir = Path(output_dir)
    with writing(output_dir):
        output_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=output_dir, prefix=".saving-"))
    try:
        _write_model_folder(model, tokenizer, tmp, extra_files, named=output_dir)
        with writing(output_dir):
            for file in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
                os.replace(file, output_dir / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---- model cards ------------------------------------------------------------------------------------------
def command_line(argv: list[str] | None = None) -> str:
    """The command that is running, quoted for a shell (the script as it was called, then its arguments)."""
    import shlex
    import sys

    argv = list(sys.argv if argv is None else argv)
    return shlex.join(["python", *argv]) if argv and argv[0].endswith(".py") else shlex.join(argv)


def _hub_id(name: str | None) -> bool:
    # base_model in a card's metadata must be a hub id; a local folder is only named in the text
    return bool(name) and not Path(name).exists() and name.count("/") == 1 and not name.startswith((".", "/", "~"))


def model_card(*, task: str, phase: str, base_model: str | None, config, results: dict | None = None,
               metric: str | None = None, command: str | None = None, notes: list[str] | None = None) -> str:
    """README.md for a saved model folder: Hugging Face metadata, what it is (base model, task, phase,
    labels, size), how it was made (the command line), how to load it and its dev results per subnet
    (`results`: {"d{depth}_w{width}": {metric: value}}, as `trainer.evaluate_subnets`)."""
    loadable = stock_loadable(config)
    meta = ["---", "library_name: transformers", "pipeline_tag: text-classification",
            "tags:", "- flexbert", "- dynabert", "- text-classification"]
    if _hub_id(base_model):
        meta.append(f"base_model: {base_model}")
    meta.append("---")
    labels = getattr(config, "id2label", None) or {}
    label_text = ", ".join(str(labels[k]) for k in sorted(labels)) if getattr(config, "num_labels", 1) > 1 else \
        "regression (one score)"
    lines = [*meta, "", f"# Flexible BERT: {task}, {phase}", "",
             "A width- and depth-dynamic BERT (DynaBERT-style) trained with this repository's scripts.", "",
             f"- base model: `{base_model}`" if base_model else "- base model: (not recorded)",
             f"- task: {task}; labels: {label_text}",
             f"- phase: {phase}",
             f"- size: {config.num_hidden_layers} layers, {config.num_attention_heads} heads, hidden "
             f"{config.hidden_size}, FFN {config.intermediate_size}"
             + (f", pooling {config.pooling}" if getattr(config, "pooling", None) else "")]
    if getattr(config, "gate_setting", None):
        lines.append(f"- width gates: {getattr(config, 'num_gates', '?')} gates choosing among widths "
                     f"{list(config.gate_setting)}; off-ramps after layers {getattr(config, 'off_ramps', None)}")
    lines += [f"- {note}" for note in notes or []]
    lines += ["", "## Command line", "", "```bash", command or command_line(), "```", "", "## Loading", ""]
    if loadable:
        lines += ["Stock transformers loads the full model (width 1, depth 1):", "", "```python",
                  "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
                  "model = AutoModelForSequenceClassification.from_pretrained(FOLDER)",
                  "tokenizer = AutoTokenizer.from_pretrained(FOLDER)", "```", ""]
    elif getattr(config, "auto_map", None):
        lines += ["```python", "from transformers import AutoModelForSequenceClassification",
                  "model = AutoModelForSequenceClassification.from_pretrained(FOLDER, trust_remote_code=True)",
                  "```", ""]
    lines += ["Any subnet with this repository's class: `FlexBertForSequenceClassification.from_pretrained(FOLDER)`, "
              "then `model(..., subnet=model.subnet(width, depth))`; `export_subnet.py` writes one subnet as a "
              "smaller folder that stock transformers (or `trust_remote_code=True`) loads.", ""]
    if results:
        names = list(next(iter(results.values())))
        if metric in names:
            names.remove(metric)
            names.insert(0, metric)
        lines += ["## Dev results per subnet", "", "| depth | width | " + " | ".join(names) + " |",
                  "|---|---|" + "---|" * len(names)]
        for key, metrics in results.items():
            depth, width = key[1:].split("_w")
            cells = [f"{metrics[n]:.4f}" if isinstance(metrics.get(n), float) else str(metrics.get(n, ""))
                     for n in names]
            lines.append(f"| {depth} | {width} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


# ---- the output folder -------------------------------------------------------------------------------------
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
        raise InputError(f"{flag} {folder}: {existing} is not a folder")
    stat = existing.stat()
    try:
        fd, name = tempfile.mkstemp(dir=existing, prefix=".write-test-")
        os.close(fd)
        os.unlink(name)
    except OSError as err:
        where = "" if existing == folder else f" ({existing} cannot hold new files)"
        raise InputError(f"{flag} {folder} is not writable{where}: {err.strerror or err}") from None
    finally:
        with contextlib.suppress(OSError):
            os.utime(existing, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def prepare_output_dir(args, marker: str, create: bool = True,
                       may_write_input: bool = False) -> Path:
    """The output-folder policy, checked before any work: the folder must be writable; one that holds
    another run is refused unless --overwrite_output_dir (a run of this script, with its `marker` results
    file, or one killed before it wrote any, may be rerun; resuming is allowed). Writing into the input
    model folder is refused unless `may_write_input` (the README's in-place final fine-tuning), and so is an
    input that is a checkpoint inside the output folder (checkpoints there are replaced). With create=False
    only the checks run (a run validates everything first and creates the folder last)."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--output_dir {out} exists and is not a folder")
    model = Path(args.model_dir)
    same_as_input = model.exists() and model.resolve() == out.resolve()
    if same_as_input and not may_write_input:
        raise InputError(f"--output_dir {out} is the input --model_dir, whose model this run would overwrite; only "
                         "--training_phase final_finetuning may write into its input folder")
    if model.exists() and out.resolve() in model.resolve().parents:
        inner = model.resolve().relative_to(out.resolve()).parts[0]
        if inner.startswith("checkpoint-"):
            raise InputError(f"--model_dir {model} is a checkpoint inside --output_dir {out}, whose checkpoints "
                             "this run replaces; copy it elsewhere or choose another --output_dir")
    check_writable(out)
    if out.is_dir() and any(out.iterdir()) and not args.overwrite_output_dir:
        resuming = getattr(args, "resume_from_checkpoint", None) is not None
        if not (same_as_input or resuming or (out / marker).is_file() or _is_killed_run(out)):
            raise InputError(
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
        if folder.is_dir() and os.environ.get("RANK", "0") == "0" and not _checkpoints(folder):
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


# ---- resumable checkpoints ---------------------------------------------------------------------------------
TRAINING_STATE = "training_state.pt"
# What a checkpoint's training state holds (trainer.fit writes it) and the run settings a resume must share.
_STATE_KEYS = {"global_step": int, "epoch": int, "batch_in_epoch": int, "optimizer": dict, "scheduler": dict,
               "best_score": float, "history": list, "rng": dict, "args": dict}
_SAME_ON_RESUME = ("task_name", "training_phase", "per_gpu_train_batch_size", "gradient_accumulation_steps",
                   "max_train_samples", "data_aug", "width_mult_list", "depth_mult_list", "gate_setting",
                   "num_gates")


def save_checkpoint(output_dir: Path, model, tokenizer, state: dict) -> None:
    """Write checkpoint-{step}/ (model folder + training_state.pt) atomically; older checkpoints are removed
    afterwards, hidden first, so a kill mid-way never leaves a half-deleted checkpoint-*."""
    final = output_dir / f"checkpoint-{state['global_step']}"

    def write(tmp: Path) -> None:
        tmp.unlink()
        _write_model_folder(model, tokenizer, tmp, named=final)
        with writing(final / TRAINING_STATE):
            torch.save(state, tmp / TRAINING_STATE)

    if final.exists():  # the same step saved again: move the old folder aside (removed below)
        final.rename(output_dir / f".old-checkpoint-{state['global_step']}-{os.getpid()}")
    atomic_write(final, write, tmp_name=f".tmp-checkpoint-{state['global_step']}")
    for old in [*output_dir.glob("checkpoint-*"), *output_dir.glob(".old-checkpoint-*")]:
        if old != final:
            hidden = old if old.name.startswith(".") else old.rename(output_dir / f".old-{old.name}-{os.getpid()}")
            shutil.rmtree(hidden, ignore_errors=True)


def _checkpoints(output_dir: Path) -> list[Path]:
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
    checkpoints = _checkpoints(output_dir)
    if not checkpoints:
        raise InputError(f"no checkpoint to resume from in {output_dir}")
    return checkpoints[-1]


def _check_training_state(file: Path, state, args) -> None:
    if not isinstance(state, dict):
        raise InputError(f"{file}: not a training state")
    for key, kind in _STATE_KEYS.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise InputError(f"{file}: training state lacks a valid '{key}' (a checkpoint of another program?)")
    if args is None:
        return
    saved, current = state["args"], vars(args)
    for key in _SAME_ON_RESUME:
        if key in saved and key in current and saved[key] != current[key]:
            phase = "--training_phase" if key == "training_phase" else f"--{key}"
            raise InputError(f"{file.parent} is a checkpoint of a run with {phase} {saved[key]}, not {current[key]}; "
                             "resume with the flags it was started with")


def resume_checkpoint(output_dir: Path, requested: str, model: torch.nn.Module, device: torch.device,
                      args=None, optimizer=None) -> tuple[Path, dict]:
    """Find the checkpoint (`requested` folder or "latest" in `output_dir`), check it against this run (its
    weights' names and shapes against `model`, its training state's contents, the run settings that must
    not change: phase, task, batch size, subnets, gates; its optimizer state against `optimizer`), load its
    weights into `model` and return (its folder, its training state)."""
    from safetensors.torch import load_file

    ckpt = find_checkpoint(output_dir, requested)
    with reading(ckpt / TRAINING_STATE):
        state = torch.load(ckpt / TRAINING_STATE, weights_only=False)
    _check_training_state(ckpt / TRAINING_STATE, state, args)
    weights_file, found = _weight_shapes(ckpt)
    check_weights(weights_file, found, _expected_shapes(model), "the model being trained")
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
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
