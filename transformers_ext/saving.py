"""Saving: an ordinary Hugging Face folder (config.json, model.safetensors, tokenizer files, vocab.txt)
written atomically, and its model card (README.md)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import writing
from .files import honour_umask
from .modeling_flexbert import FlexBertForSequenceClassification


def stock_loadable(config) -> bool:
    """Whether stock `BertForSequenceClassification` computes this model: the [CLS] pooling of BERT and every
    head of the original size (an exported narrower subnet records `attention_head_size`, which stock code
    does not read)."""
    heads_ok = getattr(config, "attention_head_size", None) in (None, config.hidden_size // config.num_attention_heads)
    divisible = config.hidden_size % config.num_attention_heads == 0
    return getattr(config, "pooling", None) in (None, "cls") and heads_ok and divisible


def write_model_folder(model, tokenizer, folder: Path, extra_files: dict[str, str] | None = None,
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
        write_model_folder(model, tokenizer, tmp, extra_files, named=output_dir)
        with writing(output_dir):
            for file in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
                os.replace(file, output_dir / file.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def command_line(argv: list[str] | None = None) -> str:
    """The command that is running, quoted for a shell (the script as it was called, then its arguments)."""
    argv = list(sys.argv if argv is None else argv)
    return shlex.join(["python", *argv]) if argv and argv[0].endswith(".py") else shlex.join(argv)


def _hub_id(name: str | None) -> bool:
    # base_model in a card's metadata must be a hub id; a local folder is only named in the text
    return bool(name) and not Path(name).exists() and name.count("/") == 1 and not name.startswith((".", "/", "~"))


def model_card(*, task: str, phase: str, base_model: str | None, config, results: dict | None = None,
               metric: str | None = None, command: str | None = None, notes: list[str] | None = None) -> str:
    """README.md for a saved model folder: Hugging Face metadata, what it is (base model, task, phase,
    labels, size), how it was made (the command line), how to load it and its dev results per subnet
    (`results`: {"d{depth}_w{width}": {metric: value}}, as `evaluation.evaluate_subnets`)."""
    # a gated export ships its routed class (auto_map): stock code would drop the routing
    loadable = stock_loadable(config) and not getattr(config, "auto_map", None)
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
        if getattr(config, "custom_pipelines", None):
            lines += ["or as a pipeline (label names back; pairs as `{\"text\": ..., \"text_pair\": ...}`):", "",
                      "```python", "from transformers import pipeline",
                      "classify = pipeline(\"text-classification\", model=FOLDER, trust_remote_code=True)",
                      "classify(\"a sentence\")", "```", ""]
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
