"""Export one sub-network of a flexible BERT as a deployable Hugging Face folder.

Static (the default): the first rnd(w*H) heads and FFN neurons of each of the first rnd(d*L) layers, as a
physically smaller model.safetensors. A full-width subnet with [CLS] pooling is an ordinary BERT and loads
with stock transformers, no remote code:

  AutoModelForSequenceClassification.from_pretrained(OUT)

anything else (narrower, mean pooling, gated) ships its modeling code with `auto_map` in config.json:

  AutoModelForSequenceClassification.from_pretrained(OUT, trust_remote_code=True)

Gated (--gated, for a train_gate.py gate folder): backbone + gates + off-ramps cut to --depth_mult, with the
routing fixed in config.json (--width_mult_list class -> width map, --early_exit, --exit_threshold,
--off_ramps; defaults: the gate folder's saved settings). Its forward routes each example as
`train_gate.py --do_eval --w_dynamic / --wd_dynamic --early_exit` does.

Example:
  python export_subnet.py --model_dir out/final --width_mult 0.5 --depth_mult 0.75 --output_dir out/w05_d075
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

import utils_glue
from cli import (
    MULTIPLIER,
    NON_NEGATIVE,
    ArgumentParser,
    CLIError,
    add_output_args,
    layer_list,
    multiplier_list,
    parsed_command,
    run_cli,
    setup_logging,
)
from transformers_ext.errors import reading, writing
from transformers_ext.export import deploy_config_keys, export_gated, export_subnet, remote_code_files
from transformers_ext.inference import DEFAULT_EXIT_THRESHOLD
from transformers_ext.loading import check_model_weights, validate_config
from transformers_ext.modeling_flexbert import FlexBertForSequenceClassification, make_subnet
from transformers_ext.routing import routing_defaults
from transformers_ext.saving import model_card, set_config_keys, write_model_folder


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(prog="export_subnet.py", description=__doc__)
    a = parser.add_argument
    a("--model_dir", required=True, help="A model folder of run_glue.py (or train_gate.py, with --gated).")
    a("--output_dir", required=True, help="The folder to write (created; written atomically).")
    a("--width_mult", type=MULTIPLIER, default=None, help="Static export: the width (default 1.0).")
    a("--depth_mult", type=MULTIPLIER, default=1.0, help="The depth: the first rnd(d*L) layers are kept.")
    a("--gated", action="store_true", help="Export the gates and off-ramps with the backbone (a gate folder).")
    a("--width_mult_list", type=multiplier_list, default=None,
      help="--gated: the gate classes' widths (default: the map the gates were trained with).")
    a("--early_exit", action="store_true", help="--gated: exit at the off-ramps when the entropy is low.")
    a("--exit_threshold", type=NON_NEGATIVE, default=None,
      help="--gated --early_exit: the entropy threshold (default: the folder's saved one, else "
           f"{DEFAULT_EXIT_THRESHOLD:g}).")
    a("--off_ramps", type=layer_list, default=None,
      help="--gated --early_exit: 0-based layers followed by an off-ramp (default: the folder's saved ones).")
    a("--overwrite_output_dir", action="store_true", help="Replace an existing, non-empty --output_dir.")
    add_output_args(parser)
    return parser.parse_args(argv)


def load_source(model_dir: str) -> tuple[FlexBertForSequenceClassification, object]:
    """The model folder, validated like the training scripts' input (config, weights' shapes), loaded."""
    path = Path(model_dir)
    if not path.is_dir():
        raise CLIError(f"--model_dir {model_dir} {'is not a folder' if path.exists() else 'does not exist'}")
    if not (path / "config.json").is_file():
        raise CLIError(f"--model_dir {model_dir} has no config.json (not a Hugging Face model folder)")
    with reading(path / "config.json"):
        config = AutoConfig.from_pretrained(model_dir)
    if config.model_type != "bert":
        raise CLIError(f"--model_dir {model_dir} holds a '{config.model_type}' model, not a BERT")
    validate_config(config, str(path / "config.json"))
    check_model_weights(path, config, str(path / "config.json"))
    with reading(f"--model_dir {model_dir} (tokenizer)"):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    with reading(f"--model_dir {model_dir} (weights)"):
        model = FlexBertForSequenceClassification.from_pretrained(model_dir, config=config,
                                                                  attn_implementation="eager")
    return model.eval(), tokenizer


def build(args: argparse.Namespace, model: FlexBertForSequenceClassification) -> tuple[torch.nn.Module, list[str]]:
    """The exported model and the card's notes on it."""
    config = model.config
    try:
        if not args.gated:
            if any(v is not None for v in (args.width_mult_list, args.exit_threshold, args.off_ramps)) \
                    or args.early_exit:
                raise CLIError("--width_mult_list, --early_exit, --exit_threshold and --off_ramps need --gated")
            width = 1.0 if args.width_mult is None else args.width_mult
            subnet = make_subnet(config, width, args.depth_mult)
            small = export_subnet(model, width, args.depth_mult)
            return small, [f"exported subnet: width {width:g} ({subnet.num_heads} of {config.num_attention_heads} "
                           f"heads, {subnet.num_neurons} FFN neurons), depth {args.depth_mult:g} "
                           f"({subnet.num_layers} of {config.num_hidden_layers} layers) of `{args.model_dir}`"]
        if args.width_mult is not None:
            raise CLIError("--gated exports the gates, which choose the width: give --width_mult_list, "
                           "not --width_mult")
        if model.gates is None:
            raise CLIError(f"--gated: --model_dir {args.model_dir} has no gates (train them with train_gate.py "
                           "--do_train --training_phase traingate)")
        widths = args.width_mult_list or list(getattr(config, "gate_class_to_width", None) or config.gate_setting)
        threshold, ramps = routing_defaults(config, args.exit_threshold, args.off_ramps)
        if any(i >= config.num_hidden_layers for i in ramps):
            raise CLIError(f"--off_ramps {ramps} must be layers 0..{config.num_hidden_layers - 1}")
        small = export_gated(model, args.depth_mult, widths, args.early_exit, threshold, ramps)
        exits = f"early exit below entropy {threshold:g} at off-ramps {small.config.off_ramps}" \
            if args.early_exit else "no early exit"
        return small, [f"exported gated model: depth {args.depth_mult:g} ({small.config.num_hidden_layers} layers), "
                       f"gates over widths {widths}, {exits}, of `{args.model_dir}`"]
    except ValueError as err:  # an impossible width/depth for this model
        raise CLIError(str(err)) from None


def write_folder(args: argparse.Namespace, small, tokenizer, notes: list[str]) -> Path:
    """Everything into a hidden folder beside --output_dir, then renamed into place: a kill or a full disk
    leaves the old folder (or none), never a half-written one."""
    out = Path(args.output_dir)
    tmp = out.parent / f".{out.name}.exporting-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    routed = bool(getattr(small.config, "routing", None))
    keys = deploy_config_keys(small.config, routed)
    for key, value in keys.items():
        setattr(small.config, key, value)  # the card describes the folder as written
    task = getattr(small.config, "finetuning_task", None) or "?"
    try:
        task = utils_glue.get_task(task).name
    except utils_glue.DataError:
        pass
    card = model_card(task=task, phase="export", base_model=args.model_dir, config=small.config, notes=notes,
                      command=parsed_command())
    try:
        with writing(out):
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        write_model_folder(small, tokenizer, tmp, {"README.md": card}, named=out)
        set_config_keys(tmp / "config.json", keys, out / "config.json")
        if "auto_map" in keys:
            with writing(out):
                remote_code_files(tmp)
        with writing(out):
            if out.exists():
                out.rename(old)
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    out, source = Path(args.output_dir), Path(args.model_dir)
    if source.exists() and out.exists() and out.resolve() == source.resolve():
        raise CLIError(f"--output_dir {out} is the input --model_dir; choose another folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite_output_dir:
        raise CLIError(f"--output_dir {out} exists and is not empty; pass --overwrite_output_dir to replace it")
    model, tokenizer = load_source(args.model_dir)
    small, notes = build(args, model)
    write_folder(args, small, tokenizer, notes)
    size = (out / "model.safetensors").stat().st_size
    how = "trust_remote_code=True" if (out / "modeling_flexbert.py").is_file() else "stock transformers"
    print(json.dumps({"output_dir": str(out), "model.safetensors_bytes": size, "loads_with": how,
                      "num_parameters": sum(p.numel() for p in small.parameters())}))


if __name__ == "__main__":
    run_cli(main)
