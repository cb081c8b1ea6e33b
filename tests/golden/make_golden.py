"""Golden data for tests/test_equivalence.py: the whole pipeline on a tiny deterministic setup, recorded
from the code in this checkout.

    .venv/bin/python tests/golden/make_golden.py      # writes tests/golden/*.safetensors and results.json

This module is also the single definition of the equivalence test's inputs and steps: the test imports
`build_inputs`, the step lists and `run_pipeline` from here and compares what they produce now with the
files written here. What is built and run (all on CPU, `--num_threads 1 --seed 1`):

  inputs      a random tiny BERT folder (conftest's SMALL shape: h32, L4, H8, I64, vocab TINY_VOCAB, seed 0)
              and an RTE folder (48 train / 24 dev rows and a 24-row augmented file with logit labels) made
              from TINY_VOCAB words by a seeded `random.Random` (label: 'not' in sentence 2, 10% flipped)
  training    run_glue.py finetuning -> dynabertw --graft_during_training (6 grafts)
              -> dynabert (depths 0.5/0.75/1, widths 0.25..1) -> final_finetuning -> train_gate.py traingate;
              plus a side branch dynabertw --data_aug from the fine-tuned teacher
  inference   train_gate.py / train_gate_new.py --do_eval in every mode (static at three width/depth
              pairs, w_dynamic, wd_dynamic --early_exit, d_dynamic --early_exit, --config) at eval batch 1
              and 32, on the trained gates and on a copy of that folder with N(0, 1) random gate weights
              ("mixed": its gates route the examples of one batch to different widths)
  per example the adapter `per_example_outputs` of tests/test_equivalence.py on the dev set (one batch of 24)
              for static and dynamic settings of both gated models

Recorded: the starting BERT's weights (`initial_model.safetensors`: the test starts from them, so a change
of the model class's random-init order cannot masquerade as a CLI difference; it is checked separately);
every tensor of each training step's model.safetensors (`<step>.safetensors`); the eval/gate
result JSONs and config.json of each training step, and inference_results.json (minus latency keys and
the model path) plus the printed report of each inference run (`results.json`); the dev features and the
per-example outputs (`per_example.safetensors`).
"""

from __future__ import annotations

import contextlib
import io
import json
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

GOLDEN_DIR = Path(__file__).resolve().parent
TESTS_DIR = GOLDEN_DIR.parent
REPO_ROOT = TESTS_DIR.parent
for _path in (REPO_ROOT, TESTS_DIR):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402
from conftest import SMALL, TINY_VOCAB, cli_argv, make_config, save_model_folder  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

TASK = "RTE"
SEED = 1  # --seed of every CLI step
MODEL_SEED = 0  # torch seed of the random initial BERT
DATA_SEED = 0  # random.Random seed of the TSV rows
MIXED_GATES_SEED = 8  # torch.Generator seed of the "mixed" gate weights
MAX_LEN = 24
N_TRAIN, N_DEV, N_AUG = 48, 24, 24
LABEL_NOISE = 0.1  # share of rows whose label contradicts the rule
WIDTHS = "0.25,0.5,0.75,1.0"
DEPTHS = "0.5,0.75,1.0"
WIDTH_LIST = [0.25, 0.5, 0.75, 1.0]
OFF_RAMPS = [1, 2]  # the default for L=4 and trained depths 0.5 / 0.75 (after layers 2 and 3)
# Entropy thresholds (nats) at which, on the 24 dev examples, some exit at each off-ramp and some run all 4
# layers (the tiny model's off-ramp entropies all lie near 0.15; `check_coverage` checks the split when the
# goldens are written): wd_dynamic on the trained gates, d_dynamic at width 0.75, wd_dynamic on "mixed".
EXIT_THRESHOLD = {"gates": 0.16, "d_dynamic": 0.148, "mixed": 0.148}
WORDS = [w for w in TINY_VOCAB[5:] if w.isalpha() and w != "not"]  # the plain words of conftest's vocabulary

GOLDEN_RESULTS = GOLDEN_DIR / "results.json"
GOLDEN_INITIAL = GOLDEN_DIR / "initial_model.safetensors"
GOLDEN_PER_EXAMPLE = GOLDEN_DIR / "per_example.safetensors"
PER_EXAMPLE_FIELDS = ("logits", "heads", "width_class", "exit_layer", "linear_macs", "attention_macs")
# Keys of inference_results.json that depend on the machine or the folder, not on the numerics.
VOLATILE_REPORT_KEYS = ("model_dir",)
VOLATILE_RESULT_KEYS = ("latency_ms_per_batch", "latency_ms_per_example", "examples_per_second",
                        "gpu_latency", "cpu_latency")
VOLATILE_EVAL_KEYS = ("train_seconds",)
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path")


# ---- inputs ------------------------------------------------------------------------------------------------
def _sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) + " ."


def _rte_rows(rng: random.Random, n: int, logits: bool) -> list[str]:
    """RTE rows, alternately entailment / not_entailment; sentence2 holds 'not' exactly in the not_entailment
    rows (a learnable rule). With `logits` the label column holds two teacher-like logits (utils_glue takes
    their argmax), as augment_data.py writes."""
    rows = ["index\tsentence1\tsentence2\tlabel"]
    for i in range(n):
        negated = i % 2 == 1
        words = _sentence(rng, 2, 5).split()
        if negated:
            words.insert(rng.randint(0, len(words) - 1), "not")
        if rng.random() < LABEL_NOISE:
            negated = not negated  # a wrong label: no subnet fits all, so they disagree and gate targets mix
        if logits:
            a, b = round(rng.uniform(-2, 2), 4), round(rng.uniform(-2, 2), 4)
            label = f"{min(a, b)} {max(a, b)}" if negated else f"{max(a, b)} {min(a, b)}"
        else:
            label = "not_entailment" if negated else "entailment"
        rows.append(f"{i}\t{_sentence(rng, 3, 8)}\t{' '.join(words)}\t{label}")
    return rows


def write_task_data(folder: Path) -> Path:
    rng = random.Random(DATA_SEED)
    folder.mkdir(parents=True)
    for name, n, logits in (("train.tsv", N_TRAIN, False), ("dev.tsv", N_DEV, False),
                            (f"train_{TASK}_aug_with_logits.tsv", N_AUG, True)):
        (folder / name).write_text("\n".join(_rte_rows(rng, n, logits)) + "\n", encoding="utf-8")
    return folder


def write_initial_model(folder: Path) -> Path:
    """The random starting BERT (+ tokenizer over TINY_VOCAB), initialised by the checkout's model class."""
    return save_model_folder(folder, TINY_VOCAB, make_config(**SMALL), seed=MODEL_SEED)


def build_inputs(root: Path, initial_weights: dict[str, torch.Tensor] | None = None) -> dict[str, Path]:
    """The model folder, the task data, a feature cache and an inference --config file under `root`.

    With `initial_weights` (the recorded GOLDEN_INITIAL), those replace the freshly initialised weights of
    the model folder: the pipeline then starts from the same BERT even if a refactor changes the order in
    which the model class draws its random init (which no CLI step depends on)."""
    root = Path(root)
    paths = {"root": root, "bert": root / "bert", "data": root / TASK, "cache": root / "cache",
             "config_file": root / "inference_config.json"}
    write_initial_model(paths["bert"])
    if initial_weights is not None:
        save_file(initial_weights, str(paths["bert"] / "model.safetensors"), metadata={"format": "pt"})
    write_task_data(paths["data"])
    paths["config_file"].write_text(json.dumps(
        {TASK: {"width_mult_list": [0.5, 0.75, 0.75, 1.0], "exit_threshold": EXIT_THRESHOLD["mixed"],
                "mode": "wd_dynamic"}}) + "\n")
    return paths


def make_mixed_gates(src: Path, dst: Path) -> Path:
    """A copy of a gated model folder whose gate weights and biases are N(0, 1) draws of a seeded generator:
    gates that send the examples of one batch to different widths (the trained tiny gates send all to 0.25)."""
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    gen = torch.Generator().manual_seed(MIXED_GATES_SEED)
    gate_names = sorted(k for k in weights if k.startswith("gates."))
    assert gate_names, f"{src} has no gates"
    for name in gate_names:
        weights[name] = torch.randn(weights[name].shape, generator=gen)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    return dst


# ---- steps -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    """One CLI run. `model` is "bert" or the name of an earlier step (whose output folder is the input);
    `parity` names the PARITY_FLAGS entry appended to the argv (training steps only)."""

    name: str
    script: str  # run_glue | train_gate | train_gate_new
    model: str
    flags: dict = field(default_factory=dict)
    switches: tuple[str, ...] = ()
    parity: str | None = None


_TRAIN = {"per_gpu_train_batch_size": 8, "per_gpu_eval_batch_size": 16, "logging_steps": 6}
_SUBNETS = {"width_mult_list": WIDTHS, "depth_mult_list": DEPTHS}
TRAIN_STEPS = [
    # 48 examples / batch 8 = 6 updates per epoch; every run_glue step evaluates (and checkpoints) every 6
    Step("finetuning", "run_glue", "bert",
         {**_TRAIN, "training_phase": "finetuning", "learning_rate": 5e-3, "num_train_epochs": 8},
         parity="finetuning"),
    # graft_schedule(48, 8, 3) = (2, 12): grafts after updates 2, 4, ..., 12
    Step("dynabertw", "run_glue", "finetuning",
         {**_TRAIN, "training_phase": "dynabertw", "width_mult_list": WIDTHS, "learning_rate": 3e-3,
          "num_train_epochs": 3}, ("--graft_during_training",), parity="dynabertw"),
    # 48 train + 24 augmented rows, distilled from the fine-tuned model (logits + hidden-state MSE)
    Step("dynabertw_aug", "run_glue", "finetuning",
         {**_TRAIN, "training_phase": "dynabertw", "width_mult_list": WIDTHS, "learning_rate": 2e-3,
          "num_train_epochs": 2}, ("--data_aug",), parity="dynabertw"),
    Step("dynabert", "run_glue", "dynabertw",
         {**_TRAIN, **_SUBNETS, "training_phase": "dynabert", "learning_rate": 3e-3, "num_train_epochs": 3},
         parity="dynabert"),
    Step("final_finetuning", "run_glue", "dynabert",
         {**_TRAIN, **_SUBNETS, "training_phase": "final_finetuning", "learning_rate": 2e-3, "num_train_epochs": 2},
         parity="final_finetuning"),
    # 6 updates per epoch, 3 epochs, validated every 2 updates
    Step("gates", "train_gate", "final_finetuning",
         {"training_phase": "traingate", "width_mult_list": WIDTHS, "gate_setting": WIDTHS,
          "per_gpu_train_batch_size": 8, "per_gpu_eval_batch_size": 16, "learning_rate": 1e-2,
          "num_train_epochs": 3, "logging_steps": 2}, parity="traingate"),
]
TRAIN_STEP_NAMES = [s.name for s in TRAIN_STEPS]


def _inference_steps() -> list[Step]:
    """Every run at eval batch 1 and 32 (named `..._b1` / `..._b32`), except the --config run (32)."""
    runs = [(f"static_w{w:g}_d{d:g}", "train_gate", "gates", {"width_mult_list": ",".join([str(w)] * 4),
                                                             "depth_mult_list": d}, ("--static",))
            for w, d in ((0.5, 0.75), (0.25, 0.5), (1.0, 1.0))]
    runs.append(("d_dynamic_w0.75", "train_gate", "gates",
                 {"width_mult_list": "0.75,0.75,0.75,0.75", "exit_threshold": EXIT_THRESHOLD["d_dynamic"]},
                 ("--d_dynamic", "--early_exit")))
    for model in ("gates", "mixed"):
        runs.append((f"w_dynamic_{model}", "train_gate_new", model, {"width_mult_list": WIDTHS}, ("--w_dynamic",)))
        runs.append((f"wd_dynamic_{model}", "train_gate_new", model,
                     {"width_mult_list": WIDTHS, "exit_threshold": EXIT_THRESHOLD[model]},
                     ("--wd_dynamic", "--early_exit")))
    steps = [Step(f"{name}_b{bs}", script, model, {**flags, "per_gpu_eval_batch_size": bs}, switches)
             for bs in (1, 32) for name, script, model, flags, switches in runs]
    steps.append(Step("config_file_mixed_b32", "train_gate", "mixed",
                      {"config": "{config_file}", "per_gpu_eval_batch_size": 32}))
    return steps


INFERENCE_STEPS = _inference_steps()
INFERENCE_STEP_NAMES = [s.name for s in INFERENCE_STEPS]

# Per-example settings, as keyword arguments of the original `transformers_ext.gates.dynamic_forward`
# (`per_example_outputs` in the test maps them onto whatever API the checkout has), on one batch of the
# 24 dev examples (padded to MAX_LEN, as train_gate.py's inference feeds them).
PER_EXAMPLE_SETTINGS: dict[str, tuple[str, dict]] = {
    "static_w0.5_d0.75": ("gates", {"fixed_width": 0.5, "depth_mult": 0.75}),
    "static_w1_d1": ("gates", {"fixed_width": 1.0, "depth_mult": 1.0}),
    "d_dynamic_w0.75": ("gates", {"fixed_width": 0.75, "early_exit": True,
                                  "exit_threshold": EXIT_THRESHOLD["d_dynamic"], "off_ramps": OFF_RAMPS}),
}
for _model in ("gates", "mixed"):
    PER_EXAMPLE_SETTINGS[f"w_dynamic_{_model}"] = (_model, {"class_to_width": WIDTH_LIST})
    PER_EXAMPLE_SETTINGS[f"wd_dynamic_{_model}"] = (_model, {
        "class_to_width": WIDTH_LIST, "early_exit": True, "exit_threshold": EXIT_THRESHOLD[_model],
        "off_ramps": OFF_RAMPS})
    PER_EXAMPLE_SETTINGS[f"w_dynamic_{_model}_d0.5"] = (_model, {"class_to_width": WIDTH_LIST, "depth_mult": 0.5})


def step_argv(step: Step, paths: dict[str, Path], folders: dict[str, Path],
              parity_flags: dict[str, list[str]]) -> list[str]:
    options = {"task_name": TASK, "data_dir": paths["data"], "model_dir": folders[step.model],
               "output_dir": folders[step.name], "cache_dir": paths["cache"], "max_seq_length": MAX_LEN,
               "num_threads": 1, "seed": SEED}
    options.update({k: str(v).format(**paths) for k, v in step.flags.items()})
    mode = ("--do_train",) if step.name in TRAIN_STEP_NAMES else ("--do_eval",)
    extra = list(parity_flags.get(step.parity, [])) if step.parity else []
    return cli_argv(options, *step.switches, *extra, switches=(*mode, "--cpu"))


def _script_main(script: str) -> Callable[[list[str]], None]:
    if script == "run_glue":
        import run_glue

        return run_glue.main
    if script == "train_gate":
        import train_gate

        return train_gate.main
    import train_gate_new

    return train_gate_new.main


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


def _drop(d: dict, keys) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def training_record(step: Step, out: Path) -> dict:
    record = {"config": _drop(_read_json(out / "config.json"), VOLATILE_CONFIG_KEYS)}
    if step.script == "run_glue":
        record["eval_results"] = _drop(_read_json(out / "eval_results.json"), VOLATILE_EVAL_KEYS)
    else:
        record["gate_results"] = _read_json(out / "gate_results.json")
    return record


def inference_record(out: Path, stdout: str) -> dict:
    report = _drop(_read_json(out / "inference_results.json"), VOLATILE_REPORT_KEYS)
    report["results"] = _drop(report["results"], VOLATILE_RESULT_KEYS)
    return {"report": report, "stdout": stdout}


def dev_features(paths: dict[str, Path], model_dir: Path):
    """The dev set's (input_ids, attention_mask, token_type_ids, labels), tokenised as the scripts do."""
    from transformers import AutoTokenizer

    import utils_glue

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), do_lower_case=True)
    dataset = utils_glue.load_dataset(TASK, paths["data"], "dev", tokenizer, MAX_LEN, cache_dir=paths["cache"])
    return dataset.tensors


def load_model(model_dir: Path):
    from transformers_ext import FlexBertForSequenceClassification

    return FlexBertForSequenceClassification.from_pretrained(str(model_dir), attn_implementation="sdpa").eval()


@dataclass
class PipelineOutput:
    initial: dict[str, torch.Tensor]  # the starting BERT's model.safetensors
    weights: dict[str, dict[str, torch.Tensor]]  # training step -> model.safetensors
    records: dict[str, dict]  # step -> JSON-able record
    per_example: dict[str, torch.Tensor]  # "<setting>/<field>" and "inputs/<name>" -> tensor
    seconds: dict[str, float]


def run_pipeline(root: Path, parity_flags: dict[str, list[str]], per_example_outputs: Callable,
                 initial_weights: dict[str, torch.Tensor] | None = None) -> PipelineOutput:
    """Build the inputs under `root` (see build_inputs), run every step in-process, and collect what the
    goldens record. `per_example_outputs(model, input_ids, attention_mask, token_type_ids, **setting)`
    returns {field: tensor} for PER_EXAMPLE_FIELDS."""
    paths = build_inputs(root, initial_weights)
    folders = {"bert": paths["bert"], "mixed": root / "mixed"}
    folders.update({s.name: root / "runs" / s.name for s in TRAIN_STEPS + INFERENCE_STEPS})
    result = PipelineOutput(load_file(str(paths["bert"] / "model.safetensors")), {}, {}, {}, {})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # also what --num_threads 1 sets process-wide
    try:
        for step in TRAIN_STEPS + INFERENCE_STEPS:
            if step.model == "mixed" and not folders["mixed"].exists():
                make_mixed_gates(folders["gates"], folders["mixed"])
            start = time.perf_counter()
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout):
                _script_main(step.script)(step_argv(step, paths, folders, parity_flags))
            result.seconds[step.name] = time.perf_counter() - start
            out = folders[step.name]
            if step.name in TRAIN_STEP_NAMES:
                result.weights[step.name] = load_file(str(out / "model.safetensors"))
                result.records[step.name] = training_record(step, out)
            else:
                result.records[step.name] = inference_record(out, stdout.getvalue())

        input_ids, attention_mask, token_type_ids, labels = dev_features(paths, folders["gates"])
        for name, tensor in (("input_ids", input_ids), ("attention_mask", attention_mask),
                             ("token_type_ids", token_type_ids), ("labels", labels)):
            result.per_example[f"inputs/{name}"] = tensor
        models = {name: load_model(folders[name]) for name in ("gates", "mixed")}
        for setting_name, (model_name, setting) in PER_EXAMPLE_SETTINGS.items():
            with torch.no_grad():
                out = per_example_outputs(models[model_name], input_ids, attention_mask, token_type_ids, **setting)
            assert set(out) == set(PER_EXAMPLE_FIELDS), f"{setting_name}: adapter returned {sorted(out)}"
            for key in PER_EXAMPLE_FIELDS:
                result.per_example[f"{setting_name}/{key}"] = out[key].detach().cpu().contiguous()
    finally:
        torch.set_num_threads(threads)
    return result


# ---- writing the goldens -----------------------------------------------------------------------------------
def check_coverage(result: PipelineOutput, graft_calls: list[int] | None) -> None:
    """The goldens must exercise what they claim to: grafting fired, some examples exit early at both
    off-ramps and others run all layers, some layer runs several widths inside one batch, the widths
    disagree somewhere, and every per-example setting gives its own logits."""
    if graft_calls is not None:
        assert len(graft_calls) == 6, f"expected 6 grafts in dynabertw, got {len(graft_calls)}"
    for name in INFERENCE_STEP_NAMES:
        assert f"_b{result.records[name]['report']['batch_size']}" in name, name
    for name in ("wd_dynamic_gates_b32", "wd_dynamic_mixed_b32", "d_dynamic_w0.75_b32"):
        hist = result.records[name]["report"]["results"]["exit_layer_histogram"]
        assert set(hist) == {"2", "3", "4"}, f"{name}: exit histogram {hist} (tune EXIT_THRESHOLD)"
    for name in ("w_dynamic_mixed", "wd_dynamic_mixed"):
        heads = result.per_example[f"{name}/heads"]
        assert max(len(heads[:, i][heads[:, i] > 0].unique()) for i in range(heads.shape[1])) > 1, name
    history = result.records["dynabertw"]["eval_results"]["history"]
    assert any(len({m["acc"] for m in h["results"].values()}) > 1 for h in history), "widths never disagree"
    logits = [result.per_example[f"{name}/logits"] for name in PER_EXAMPLE_SETTINGS]
    assert all(not torch.equal(a, b) for i, a in enumerate(logits) for b in logits[i + 1:]), "equal logits"


def main() -> None:
    from test_equivalence import PARITY_FLAGS, per_example_outputs  # the flags and adapter the test uses

    import run_glue

    # Count the grafts (run_glue.py's module-level `graft`, where the checkout still has one).
    graft_calls, real_graft = ([], run_glue.graft) if hasattr(run_glue, "graft") else (None, None)

    def counting_graft(*args, **kwargs):
        graft_calls.append(1)
        return real_graft(*args, **kwargs)

    if real_graft is not None:
        run_glue.graft = counting_graft
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="flexbert-golden-") as tmp:
            result = run_pipeline(Path(tmp), PARITY_FLAGS, per_example_outputs)
    finally:
        if real_graft is not None:
            run_glue.graft = real_graft
    check_coverage(result, graft_calls)
    for old in GOLDEN_DIR.glob("*.safetensors"):
        old.unlink()
    for name, weights in result.weights.items():
        save_file(weights, str(GOLDEN_DIR / f"{name}.safetensors"))
    save_file(result.per_example, str(GOLDEN_PER_EXAMPLE))
    save_file(result.initial, str(GOLDEN_INITIAL))
    GOLDEN_RESULTS.write_text(json.dumps(result.records, indent=1, sort_keys=True) + "\n")
    for path in GOLDEN_DIR.glob("*.safetensors"):
        path.chmod(0o644)
    size = sum(p.stat().st_size for p in GOLDEN_DIR.iterdir() if p.suffix in (".safetensors", ".json"))
    print(f"goldens written to {GOLDEN_DIR}: {size / 1e6:.2f} MB, {time.perf_counter() - start:.1f} s")
    for name, seconds in result.seconds.items():
        print(f"  {name:28s} {seconds:6.2f} s")


if __name__ == "__main__":
    main()
