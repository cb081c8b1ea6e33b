"""Which dynamic inference pays: every strategy's gap over the static frontier at equal FLOPs, on one trained
gated model (no retraining).

One pass per fixed path over dev caches every example's outputs (transformers_ext/baselines.py): the width
patterns (--pattern_blocks blocks of layers, each at any of the widths; the uniform ones are the static
subnets, and every depth prefix is read at the off-ramps), the trained gates, the shuffled gate (--shuffles
permutations of the gates' paths) and --noise_samples dropout samples of one subnet. Then, for each of
--halvings seeded halvings of dev (calibration.split_indices, seeds --first_seed, --first_seed + 1, ...), each
strategy's setting is chosen on the calibration half for each --flops_budgets budget (the best score within
the budget there) and reported on the other half, as its score minus the static frontier of that half at its
FLOPs:
  static subnet            the static subnets themselves (a check: about 0 or below by construction)
  mixed-width static       the width patterns and their depth prefixes (MatFormer's Mix'n'Match)
  cascade <rule>, k stages confidence cascades of k static subnets, thresholds on a quantile grid
  gates                    the trained gates (their class -> width map), without or with early exit
  shuffled gate            the gates' paths given to other examples, without or with early exit
  d_dynamic w<W>           depth-only early exit at a fixed width
The oracles use all of dev: the per-example oracle over the 24-path set (the full-depth patterns and the
uniform shallower subnets), over K random paths of it, and over K dropout samples of one subnet.

Writes <output_dir>/strategies.json (every halving's choices) and strategies.md (the table), and keeps the
per-example outputs in <output_dir>/per_example_outputs.pt (reused by a rerun with the same inputs).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import sys
import time
from pathlib import Path

import torch

import utils_glue
from cli import (
    COUNT,
    MULTIPLIER,
    STEPS,
    ArgumentParser,
    CLIError,
    comma_items,
    int_list,
    multiplier_list,
    run_cli,
    setup_logging,
)
from transformers_ext import default_off_ramps, layers_kept, path_macs
from transformers_ext.baselines import (
    Halves,
    cascade_candidates,
    choose_and_report,
    collect_gates,
    collect_paths,
    exit_cache,
    exit_candidates,
    fixed_candidates,
    full_model_macs,
    oracle_score,
    predictions_of,
    score,
    shuffled_paths,
    spread,
)
from transformers_ext.calibration import split_indices
from transformers_ext.cascade import CLASSIFICATION_RULES, REGRESSION_RULES
from transformers_ext.files import torch_save, write_json, write_text
from transformers_ext.loading import load_model

logger = logging.getLogger("compare_strategies")
OUTPUTS_FILE = "per_example_outputs.pt"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__)
    a = parser.add_argument
    a("--model_dir", required=True, help="A trained gated model folder (train_gate.py --do_train's output).")
    a("--task_name", default="SST-2", help="GLUE task of the model.")
    a("--data_dir", default="data/SST-2", help="Task folder with dev.tsv.")
    a("--output_dir", required=True, help="Where strategies.json / strategies.md and the cached outputs go.")
    a("--max_seq_length", type=COUNT, default=128, help="Tokens per example; FLOPs are counted at this length.")
    a("--max_eval_samples", type=COUNT, default=None, help="Use only the first N dev examples.")
    a("--flops_budgets", type=multiplier_list, default=[0.2, 0.3, 0.5, 0.7],
      help="Relative FLOPs budgets (fractions of the full model's) at which every strategy is compared.")
    a("--halvings", type=COUNT, default=10, help="How many seeded calibration/reporting halvings of dev.")
    a("--first_seed", type=int, default=42, help="Seed of the first halving (then +1, +2, ...).")
    a("--widths", type=multiplier_list, default=None,
      help="Widths of the static subnets, patterns and cascade stages (default: the gates' classes).")
    a("--depths", type=multiplier_list, default=[0.5, 0.75, 1.0],
      help="Depths of the static subnets (each < 1 needs an off-ramp after its last layer).")
    a("--pattern_blocks", type=COUNT, default=2,
      help="Mixed-width patterns: the layers in this many equal blocks, each block at any width "
           "(2: widths^2 patterns; must divide the number of layers).")
    a("--cascade_rules", type=comma_items, default=None,
      help="Cascade rules (default: max_softmax,entropy for classification, agreement for regression).")
    a("--cascade_grid", type=int_list, default=[24, 6],
      help="Threshold grid per cascade length: the k-th value is the number of quantile bins of each "
           "threshold for cascades of k + 1 stages (24,6: 2-stage cascades on 23 thresholds, 3-stage on 5 x 5; "
           "0 skips that length).")
    a("--shuffles", type=STEPS, default=1, help="Shuffled-gate permutations (0: none).")
    a("--noise_samples", type=STEPS, default=8, help="Dropout samples of --noise_width for the noise oracle (0: none).")
    a("--noise_width", type=MULTIPLIER, default=1.0,
      help="Width of the full-depth subnet whose dropout samples make the noise oracle.")
    a("--batch_size", type=COUNT, default=64, help="Examples per forward.")
    a("--num_threads", type=COUNT, default=None, help="CPU threads for torch (default: torch's choice).")
    a("--cache_dir", default=None, help="Feature cache folder (default $FLEXBERT_CACHE or ~/.cache/flexbert).")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def validate(args: argparse.Namespace):
    """The task and rules, checked before anything is loaded."""
    spec = utils_glue.get_task(args.task_name)
    if not Path(args.data_dir).is_dir():
        raise CLIError(f"--data_dir {args.data_dir} does not exist")
    if not Path(args.model_dir).is_dir():
        raise CLIError(f"--model_dir {args.model_dir} does not exist")
    metric = utils_glue.primary_metric(spec.name)
    if metric not in ("acc", "mcc", "pearson"):
        raise CLIError(f"{spec.name}'s metric {metric} cannot be scored from per-example outputs")
    allowed = REGRESSION_RULES if spec.is_regression else CLASSIFICATION_RULES
    args.cascade_rules = args.cascade_rules or list(allowed)
    if bad := [r for r in args.cascade_rules if r not in allowed]:
        raise CLIError(f"--cascade_rules: '{bad[0]}' does not fit {spec.name}; choose from {','.join(allowed)}")
    if any(g < 0 or g == 1 for g in args.cascade_grid):
        raise CLIError("--cascade_grid values must be 0 (skip) or >= 2 quantile bins")
    return spec, metric


# ---- the per-example outputs (the only forwards) ---------------------------------------------------------------
def patterns(config, widths: list[float], blocks: int) -> list[tuple[int, ...]]:
    """Heads per layer of every pattern: the layers in `blocks` equal blocks, each at any of `widths`."""
    num_layers = config.num_hidden_layers
    if num_layers % blocks:
        raise CLIError(f"--pattern_blocks {blocks} must divide the number of layers ({num_layers})")
    heads = [round(w * config.num_attention_heads) for w in widths]
    return [tuple(h for h in combo for _ in range(num_layers // blocks))
            for combo in itertools.product(heads, repeat=blocks)]


def collect_outputs(args: argparse.Namespace, model, inputs, off_ramps: list[int], widths: list[float]) -> dict:
    config = model.config
    seq_len = args.max_seq_length
    began = time.perf_counter()
    paths = {}
    for pattern in patterns(config, widths, args.pattern_blocks):
        paths[pattern] = collect_paths(model, inputs, torch.tensor(pattern), off_ramps, args.batch_size)
        logger.info("pattern %s done (%.0f s)", pattern, time.perf_counter() - began)
    class_to_width = list(getattr(config, "gate_class_to_width", None) or config.gate_setting)
    gates, gate_heads = collect_gates(model, inputs, class_to_width, off_ramps, seq_len, args.batch_size)
    shuffled = [exit_cache(collect_paths(model, inputs, shuffled_paths(gate_heads, seed), off_ramps,
                                         args.batch_size), config, seq_len) for seed in range(args.shuffles)]
    noise_heads = torch.full((config.num_hidden_layers,), round(args.noise_width * config.num_attention_heads))
    noise = [collect_paths(model, inputs, noise_heads, [], args.batch_size, dropout_seed=k).logits
             for k in range(args.noise_samples)]
    logger.info("all per-example outputs in %.0f s", time.perf_counter() - began)
    return {"paths": paths, "gates": gates, "gate_class_to_width": class_to_width,
            "gate_heads_per_layer": gate_heads.float().mean(0).tolist(), "shuffled": shuffled,
            "noise": torch.stack(noise) if noise else None, "seconds": time.perf_counter() - began}


def cached_outputs(args, model, inputs, off_ramps, widths) -> dict:
    """The per-example outputs, from <output_dir>/per_example_outputs.pt when it was made from the same inputs."""
    key = {"model_dir": str(Path(args.model_dir).resolve()), "task": args.task_name, "data_dir": args.data_dir,
           "max_seq_length": args.max_seq_length, "max_eval_samples": args.max_eval_samples, "widths": widths,
           "off_ramps": off_ramps, "pattern_blocks": args.pattern_blocks, "shuffles": args.shuffles,
           "noise_samples": args.noise_samples, "noise_width": args.noise_width, "examples": len(inputs[0])}
    path = Path(args.output_dir) / OUTPUTS_FILE
    if path.is_file():
        saved = torch.load(path, weights_only=False)
        if saved.get("key") == key:
            logger.info("reusing the per-example outputs in %s", path)
            return saved["outputs"]
    outputs = collect_outputs(args, model, inputs, off_ramps, widths)
    torch_save({"key": key, "outputs": outputs}, path)
    return outputs


# ---- strategies over the cache ---------------------------------------------------------------------------------
def run_length(heads: tuple[int, ...], num_heads: int) -> str:
    """'w0.75x3+0.25x1': the widths of a path, layer runs collapsed."""
    runs = [(h, len(list(g))) for h, g in itertools.groupby(heads)]
    return "w" + "+".join(f"{h / num_heads:g}x{n}" for h, n in runs)


def fixed_configurations(outputs: dict, config, seq_len: int, widths: list[float], depths: list[float]):
    """(statics, mixed): (width, depth) -> (logits, MACs) of the static subnets, and name -> (logits, MACs) of
    every pattern at every depth it can stop at (an off-ramp or the end), duplicates dropped."""
    num_heads, statics, mixed = config.num_attention_heads, {}, {}
    for pattern, out in outputs["paths"].items():
        for layers, logits in out.exits():
            prefix = pattern[:layers]
            mixed.setdefault(run_length(prefix, num_heads), (logits, path_macs(config, seq_len, prefix)["total"]))
    for w, d in itertools.product(widths, depths):
        pattern = (round(w * num_heads),) * config.num_hidden_layers
        layers = layers_kept(config, d)
        found = [logits for n, logits in outputs["paths"][pattern].exits() if n == layers]
        if not found:
            raise CLIError(f"--depths {d}: no off-ramp after layer {layers} (off-ramps: the model's config)")
        statics[(w, d)] = (found[0], path_macs(config, seq_len, pattern[:layers])["total"])
    return statics, mixed


def compare(args, outputs: dict, config, labels: torch.Tensor, metric: str, widths: list[float]) -> dict:
    """Every halving's choice per strategy and budget, and the gaps' mean +- std over halvings."""
    seq_len, num_labels, budgets = args.max_seq_length, config.num_labels, args.flops_budgets
    statics, mixed = fixed_configurations(outputs, config, seq_len, widths, args.depths)
    static_logits = {k: v[0] for k, v in statics.items()}
    static_macs = {k: v[1] for k, v in statics.items()}
    uniform = {w: exit_cache(outputs["paths"][(round(w * config.num_attention_heads),) * config.num_hidden_layers],
                             config, seq_len) for w in widths}
    full = full_model_macs(config, seq_len)
    per_halving = []
    for seed in range(args.first_seed, args.first_seed + args.halvings):
        cal, rep = (torch.tensor(rows) for rows in split_indices(len(labels), seed))
        halves = Halves(labels, metric, num_labels, full, cal, rep)
        static = fixed_candidates({f"static w{w:g} d{d:g}": v for (w, d), v in statics.items()})
        static_reporting = [halves.evaluate(*static.outcome(k, rep), rep)[::-1] for k in range(len(static.names))]
        strategies = {"static subnet": static, "mixed-width static": fixed_candidates(mixed)}
        for stages, grid in enumerate(args.cascade_grid, start=2):
            for rule in args.cascade_rules if grid else []:
                strategies[f"cascade {rule}, {stages} stages"] = cascade_candidates(
                    static_logits, static_macs, rule, stages, grid, halves)
        strategies["gates"] = exit_candidates(outputs["gates"], halves)
        for k, cache in enumerate(outputs["shuffled"]):
            strategies["shuffled gate" + (f" #{k + 1}" if len(outputs["shuffled"]) > 1 else "")] = exit_candidates(
                cache, halves)
        for w in widths:
            strategies[f"d_dynamic w{w:g}"] = exit_candidates(uniform[w], halves)
        per_halving.append({"seed": seed, "static_reporting": static_reporting, "strategies": {
            name: {str(b): (None if r is None else vars(r)) for b, r in
                   choose_and_report(candidates, halves, budgets, static_reporting).items()}
            for name, candidates in strategies.items()}})
        logger.info("halving %d done", seed)
    summary = {}
    for name in per_halving[0]["strategies"]:
        summary[name] = {}
        for b in map(str, budgets):
            chosen = [h["strategies"][name][b] for h in per_halving]
            reported = [r for r in chosen if r is not None and r["gap"] is not None]
            summary[name][b] = None if not reported else {
                "gap": spread([r["gap"] for r in reported]), "halvings": len(reported),
                "reporting_score": spread([r["reporting_score"] for r in reported]),
                "reporting_flops": spread([r["reporting_flops"] for r in reported]),
                "settings": sorted({r["setting"] for r in reported})}
    return {"per_halving": per_halving, "summary": summary,
            "oracles": oracles(args, outputs, config, labels, metric, statics)}


def oracles(args, outputs: dict, config, labels: torch.Tensor, metric: str, statics: dict) -> dict:
    """All of dev: the 24-path oracle (full-depth patterns + uniform shallower subnets), the oracle over K random
    paths of that set (mean over 50 draws), and over K dropout samples of one subnet. Classification only."""
    if config.num_labels == 1:
        return {}
    paths = [out.logits for out in outputs["paths"].values()]
    paths += [logits for (w, d), (logits, _) in statics.items() if d < 1]
    correct = torch.stack([predictions_of(x) == labels.double() for x in paths])
    result = {"paths": len(paths), "path_oracle": oracle_score(correct),
              "full_model": score(metric, predictions_of(statics[(1.0, 1.0)][0]), labels, config.num_labels)}
    if outputs["noise"] is not None:
        k = len(outputs["noise"])
        noisy = torch.stack([predictions_of(x) == labels.double() for x in outputs["noise"]])
        gen = torch.Generator().manual_seed(0)
        draws = [oracle_score(correct[torch.randperm(len(paths), generator=gen)[:k]]) for _ in range(50)]
        result |= {"noise_samples": k, "noise_width": args.noise_width, "noise_oracle": oracle_score(noisy),
                   "noise_sample_accuracy": spread(noisy.double().mean(1).tolist()),
                   f"path_oracle_{k}_random_paths": spread(draws)}
    return result


def markdown(result: dict, args) -> str:
    budgets = [str(b) for b in args.flops_budgets]
    lines = [f"Gap over the static frontier (reporting half, {args.halvings} halvings, seeds {args.first_seed}.."
             f"{args.first_seed + args.halvings - 1}): mean ± std; (n) where fewer halvings had a setting within "
             "the budget", "", "| strategy | " + " | ".join(f"FLOPs ≤ {b}" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for name, per_budget in result["summary"].items():
        cells = []
        for b in budgets:
            v = per_budget[b]
            cells.append("—" if v is None else f"{v['gap']['mean']:+.3f} ± {v['gap']['std']:.3f}"
                         + ("" if v["halvings"] == args.halvings else f" ({v['halvings']})"))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    o = result["oracles"]
    if o:
        lines += ["", f"Oracles on all of dev: full model {o['full_model']:.3f}; any of the {o['paths']} fixed paths "
                  f"right {o['path_oracle']:.3f}"]
        if "noise_oracle" in o:
            k = o["noise_samples"]
            lines[-1] += (f"; any of {k} random paths of them {o[f'path_oracle_{k}_random_paths']['mean']:.3f}; "
                          f"any of {k} dropout samples of w{o['noise_width']:g} d1 {o['noise_oracle']:.3f} (one sample "
                          f"{o['noise_sample_accuracy']['mean']:.3f} ± {o['noise_sample_accuracy']['std']:.3f})")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    setup_logging()
    spec, metric = validate(args)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    model, tokenizer = load_model(args.model_dir, spec, max_seq_length=args.max_seq_length)
    model.eval()
    if model.gates is None:
        raise CLIError(f"--model_dir {args.model_dir} has no gates (train them with train_gate.py --do_train)")
    config = model.config
    widths = args.widths or [float(w) for w in config.gate_setting]
    off_ramps = list(getattr(config, "off_ramps", None) or default_off_ramps(config.num_hidden_layers, args.depths))
    dataset = utils_glue.load_dataset(args.task_name, args.data_dir, "dev", tokenizer, args.max_seq_length,
                                      args.max_eval_samples, args.cache_dir)
    *inputs, labels = dataset.tensors
    if len(labels) < 4:
        raise CLIError("need at least 4 dev examples to halve")
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    outputs = cached_outputs(args, model, inputs, off_ramps, widths)
    result = compare(args, outputs, config, labels, metric, widths)
    result |= {"command": " ".join(sys.argv), "task": spec.name, "metric": metric, "examples": len(labels),
               "budgets": args.flops_budgets, "gate_class_to_width": outputs["gate_class_to_width"],
               "gate_mean_heads_per_layer": outputs["gate_heads_per_layer"], "forward_seconds": outputs["seconds"]}
    write_json(Path(args.output_dir) / "strategies.json", result)
    table = markdown(result, args)
    write_text(Path(args.output_dir) / "strategies.md", table)
    print(table)


if __name__ == "__main__":
    run_cli(main)
