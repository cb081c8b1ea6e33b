"""Loading a model folder: config.json validated completely (a BERT, sizes, saved gate and early-exit
settings), the weights' shapes checked against it from the file headers, the vocabulary against the
embedding, then our model and its tokenizer loaded in float32, each failure an `InputError` naming the file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer
from transformers.activations import ACT2FN

from .errors import InputError, error_detail, reading
from .modeling_flexbert import FlexBertForSequenceClassification
from .ranges import LAYER, MULTIPLIER, NON_NEGATIVE, PROBABILITY, RangeError
from .routing import TRAINED_DEPTHS_KEY

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
    gate class, off-ramps inside the model, trained depths in (0, 1])."""
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
    if getattr(config, TRAINED_DEPTHS_KEY, None) is not None:
        _config_list(where, TRAINED_DEPTHS_KEY, getattr(config, TRAINED_DEPTHS_KEY), MULTIPLIER)


def weight_shapes(folder: Path) -> tuple[Path, dict[str, tuple[int, ...]]]:
    """(the weights file, {tensor name: shape}) of a model folder, reading only the headers; HF's key
    conventions are normalised (a bare `BertModel`'s names get the `bert.` prefix, LayerNorm gamma/beta)."""
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


def expected_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
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


def check_model_weights(folder: Path, config, against: str, optional: tuple[str, ...] = (),
                        task: str | None = None) -> None:
    """The weights of a model folder against the shapes our model built from `config` has (`check_weights`),
    from the file headers only."""
    file, found = weight_shapes(folder)
    with torch.device("meta"):
        expected = expected_shapes(FlexBertForSequenceClassification(config))
    check_weights(file, found, expected, against, optional=optional, task=task)


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


def validate_model_dir(model_dir: str, spec, max_seq_length: int | None = None):
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
    if max_seq_length is not None and max_seq_length > config.max_position_embeddings:
        raise InputError(f"--max_seq_length {max_seq_length} exceeds the model's {config.max_position_embeddings} "
                         "positions")
    if path.is_dir():
        check_model_weights(path, config, where, optional=("classifier.", "bert.pooler."), task=spec.name)
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


def load_model(
    model_dir: str,
    spec,
    *,
    max_seq_length: int | None = None,
    pooling: str | None = None,
    hidden_dropout_prob: float | None = None,
    attention_probs_dropout_prob: float | None = None,
    do_lower_case: bool | None = None,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
) -> tuple[FlexBertForSequenceClassification, object]:
    """Our BERT + its tokenizer from an HF folder or hub id, validated first (`validate_model_dir`, which
    also checks room for `max_seq_length` tokens); the tokenizer's vocabulary is checked against the
    embedding. `spec` is the task's `utils_glue.TaskSpec`. `pooling`: the summary the classifier reads
    (default: the folder's, else a sentence-transformers folder's own); dropout probabilities left None keep
    the config's; `do_lower_case` None keeps the tokenizer's own setting (a cased model stays cased).

    The weights are loaded as `dtype`, float32 by default whatever the folder was saved in: a hub checkpoint
    saved in float16 is trained in float32 (mixed precision is autocast's job, not the weights')."""
    config = validate_model_dir(model_dir, spec, max_seq_length)
    if pooling:
        config.pooling = pooling
    elif getattr(config, "pooling", None) is None and pretrained_pooling(model_dir):
        config.pooling = pretrained_pooling(model_dir)
    if hidden_dropout_prob is not None:
        config.hidden_dropout_prob = hidden_dropout_prob
    if attention_probs_dropout_prob is not None:
        config.attention_probs_dropout_prob = attention_probs_dropout_prob
    with reading(f"--model_dir {model_dir} (tokenizer)"):
        options = {} if do_lower_case is None else {"do_lower_case": do_lower_case}
        tokenizer = AutoTokenizer.from_pretrained(model_dir, **options)
    _check_tokenizer(tokenizer, config, model_dir)
    with reading(f"--model_dir {model_dir} (weights)"):
        model = FlexBertForSequenceClassification.from_pretrained(
            model_dir, config=config, attn_implementation=attn_implementation, dtype=dtype
        )
    return model, tokenizer
