"""Golden data for tests/test_equivalence.py: the whole pipeline on a tiny deterministic setup, recorded
from the code in this checkout, in two sets:

  parity    the reference's computation order (one forward and backward per subnet in the depth and final
            stages, the reference's gate loss, [CLS] pooling, full padding) over every step and mode
  defaults  what users run: prefix-shared depth and final stages, the every-width gate loss, mean pooling
            (read from the starting folder's 1_Pooling/config.json, as for the embedded MiniLM), the width
            stage distilled from the teacher (--width_distil always), padding trimmed and batches grouped by
            length; short schedules and a few inference runs

Regenerate (only from code known to be right; commit the code first, so that the recorded commit is it):

    .venv/bin/python tests/golden/make_golden.py

This module is the single definition of the equivalence test's inputs, steps and flags: the test imports
`GOLDEN_SETS` and `run_pipeline` from here and compares what they produce now with the files written here.
What is built and run (all on CPU, `--num_threads 1 --seed 1`):

  inputs      a random tiny BERT folder (conftest's SMALL shape: h32, L4, H8, I64, vocab TINY_VOCAB, seed 0)
              and an RTE folder (48 train / 24 dev rows and a 24-row augmented file with logit labels) made
              from TINY_VOCAB words by a seeded `random.Random` (label: 'not' in sentence 2, 10% flipped)
  parity      run_glue.py finetuning -> dynabertw --graft_during_training (6 grafts)
              -> dynabert (depths 0.5/0.75/1, widths 0.25..1) -> final_finetuning -> train_gate.py traingate;
              plus a side branch dynabertw --data_aug from the fine-tuned teacher; then train_gate.py /
              train_gate_new.py --do_eval in every mode (static at three width/depth pairs, w_dynamic,
              wd_dynamic --early_exit, d_dynamic --early_exit, --config) at eval batch 1 and 32, on the
              trained gates and on a copy of that folder with N(0, 1) random gate weights ("mixed": its gates
              route the examples of one batch to different widths)
  defaults    finetuning -> dynabertw -> dynabert -> final_finetuning -> traingate, then static, w_dynamic
              and wd_dynamic --early_exit inference
  per example the adapter `per_example_outputs` of tests/test_equivalence.py on the dev set (one batch of 24)
              for static and dynamic settings of the gated models

Recorded: the starting BERT's weights (`initial_model.safetensors`, shared by both sets: the test starts
from them, so a change of the model class's random-init order cannot masquerade as a CLI difference; it is
checked separately); every tensor of each training step's model.safetensors (`<set>/<step>.safetensors`);
the eval/gate result JSONs and config.json of each training step, and inference_results.json (minus latency
keys and the model path) plus the printed report of each inference run (`results.json`, one entry per set);
the dev features and the per-example outputs (`<set>/per_example.safetensors`). `results.json`'s "_meta"
records where the goldens come from: the commit (and whether the tree had other changes), the machine
fingerprint (`machine_fingerprint`: it decides whether the test compares bit for bit), and each step's argv
and each per-example setting, which the test requires to equal its own.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import shlex
import shutil
import subprocess
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
import torch.nn.functional as F  # noqa: E402
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
META_KEY = "_meta"  # results.json's entry on where the goldens come from (not a golden set)
PER_EXAMPLE_FIELDS = ("logits", "heads", "width_class", "exit_layer", "linear_macs", "attention_macs")
# Keys of inference_results.json that depend on the machine or the folder, not on the numerics.
VOLATILE_REPORT_KEYS = ("model_dir",)
VOLATILE_RESULT_KEYS = ("latency_ms_per_batch", "latency_ms_per_example", "examples_per_second",
                        "gpu_latency", "cpu_latency")
VOLATILE_EVAL_KEYS = ("train_seconds",)
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path")
# Intended additions to the training steps' config.json since the goldens were recorded: key -> {step: the
# value the code must now write there}. The goldens are not regenerated for them, so every other key and
# every tensor is still compared with the recording; the test expects the recorded config plus these keys
# (`expected_training_record`). Once the goldens are regenerated they hold the keys and the entries are inert.
#   depth_mult_list  the depths the backbone was trained with (DEPTHS, saved descending by run_glue.py's
#                    depth stages; the gate folder inherits its backbone's config): the default off-ramps
#                    are placed after them (routing.trained_depths)
CONFIG_ADDITIONS = {"depth_mult_list": dict.fromkeys(("dynabert", "final_finetuning", "gates"), [1.0, 0.75, 0.5])}


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


def input_paths(root: Path) -> dict[str, Path]:
    return {"root": root, "bert": root / "bert", "data": root / TASK, "cache": root / "cache",
            "config_file": root / "inference_config.json"}


def build_inputs(root: Path, initial_weights: dict[str, torch.Tensor] | None = None,
                 pretrained_pooling: str | None = None) -> dict[str, Path]:
    """The model folder, the task data, a feature cache and an inference --config file under `root`.

    With `initial_weights` (the recorded GOLDEN_INITIAL), those replace the freshly initialised weights of
    the model folder: the pipeline then starts from the same BERT even if a refactor changes the order in
    which the model class draws its random init (which no CLI step depends on). `pretrained_pooling`
    ("mean" / "cls") writes the folder's 1_Pooling/config.json, as a sentence-transformers model has."""
    paths = input_paths(Path(root))
    write_initial_model(paths["bert"])
    if initial_weights is not None:
        save_file(initial_weights, str(paths["bert"] / "model.safetensors"), metadata={"format": "pt"})
    if pretrained_pooling is not None:
        (paths["bert"] / "1_Pooling").mkdir()
        (paths["bert"] / "1_Pooling" / "config.json").write_text(json.dumps(
            {"word_embedding_dimension": SMALL["hidden_size"], "pooling_mode_cls_token": pretrained_pooling == "cls",
             "pooling_mode_mean_tokens": pretrained_pooling == "mean"}) + "\n")
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
    """One CLI run. `model` is "bert" or the name of an earlier step (whose output folder is the input)."""

    name: str
    script: str  # run_glue | train_gate | train_gate_new
    model: str
    flags: dict = field(default_factory=dict)
    switches: tuple[str, ...] = ()


@dataclass(frozen=True)
class GoldenSet:
    """One recorded pipeline: its steps (training first) and per-example settings, as keyword arguments of
    the original `transformers_ext.gates.dynamic_forward` (`per_example_outputs` in the test maps them onto
    whatever API the checkout has) on one batch of the 24 dev examples (padded to MAX_LEN, as train_gate.py's
    inference feeds them). `pretrained_pooling`: the starting folder's 1_Pooling/config.json, if any."""

    name: str
    train_steps: tuple[Step, ...]
    inference_steps: tuple[Step, ...]
    per_example_settings: dict[str, tuple[str, dict]]
    pretrained_pooling: str | None = None

    @property
    def folder(self) -> Path:
        return GOLDEN_DIR / self.name

    @property
    def per_example_file(self) -> Path:
        return self.folder / "per_example.safetensors"

    @property
    def train_step_names(self) -> list[str]:
        return [s.name for s in self.train_steps]

    @property
    def inference_step_names(self) -> list[str]:
        return [s.name for s in self.inference_steps]


_TRAIN = {"per_gpu_train_batch_size": 8, "per_gpu_eval_batch_size": 16, "logging_steps": 6}
_SUBNETS = {"width_mult_list": WIDTHS, "depth_mult_list": DEPTHS}
_GATES = {"training_phase": "traingate", "width_mult_list": WIDTHS, "gate_setting": WIDTHS,
          "per_gpu_train_batch_size": 8, "per_gpu_eval_batch_size": 16, "learning_rate": 1e-2}

# The parity set follows the reference's computation order, which bit-identity with the pre-refactor code
# was proven for: prefix-shared training (the default) sums the depths' gradients in another order, so the
# depth and final stages run one pass per subnet, and the gates learn with the reference's loss rule.
PARITY_TRAIN_STEPS = (
    # 48 examples / batch 8 = 6 updates per epoch; every run_glue step evaluates (and checkpoints) every 6
    Step("finetuning", "run_glue", "bert",
         {**_TRAIN, "training_phase": "finetuning", "learning_rate": 5e-3, "num_train_epochs": 8}),
    # graft_schedule(48, 8, 3) = (2, 12): grafts after updates 2, 4, ..., 12
    Step("dynabertw", "run_glue", "finetuning",
         {**_TRAIN, "training_phase": "dynabertw", "width_mult_list": WIDTHS, "learning_rate": 3e-3,
          "num_train_epochs": 3}, ("--graft_during_training",)),
    # 48 train + 24 augmented rows, distilled from the fine-tuned model (logits + hidden-state MSE)
    Step("dynabertw_aug", "run_glue", "finetuning",
         {**_TRAIN, "training_phase": "dynabertw", "width_mult_list": WIDTHS, "learning_rate": 2e-3,
          "num_train_epochs": 2}, ("--data_aug",)),
    Step("dynabert", "run_glue", "dynabertw",
         {**_TRAIN, **_SUBNETS, "training_phase": "dynabert", "learning_rate": 3e-3, "num_train_epochs": 3},
         ("--separate_subnet_passes",)),
    Step("final_finetuning", "run_glue", "dynabert",
         {**_TRAIN, **_SUBNETS, "training_phase": "final_finetuning", "learning_rate": 2e-3, "num_train_epochs": 2},
         ("--separate_subnet_passes",)),
    # 6 updates per epoch, 3 epochs, validated every 2 updates
    Step("gates", "train_gate", "final_finetuning",
         {**_GATES, "num_train_epochs": 3, "logging_steps": 2, "gate_loss": "reference"}),
)


def _parity_inference_steps() -> tuple[Step, ...]:
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
    return tuple(steps)


def _parity_per_example_settings() -> dict[str, tuple[str, dict]]:
    settings = {
        "static_w0.5_d0.75": ("gates", {"fixed_width": 0.5, "depth_mult": 0.75}),
        "static_w1_d1": ("gates", {"fixed_width": 1.0, "depth_mult": 1.0}),
        "d_dynamic_w0.75": ("gates", {"fixed_width": 0.75, "early_exit": True,
                                      "exit_threshold": EXIT_THRESHOLD["d_dynamic"], "off_ramps": OFF_RAMPS}),
    }
    for model in ("gates", "mixed"):
        settings[f"w_dynamic_{model}"] = (model, {"class_to_width": WIDTH_LIST})
        settings[f"wd_dynamic_{model}"] = (model, {
            "class_to_width": WIDTH_LIST, "early_exit": True, "exit_threshold": EXIT_THRESHOLD[model],
            "off_ramps": OFF_RAMPS})
        settings[f"w_dynamic_{model}_d0.5"] = (model, {"class_to_width": WIDTH_LIST, "depth_mult": 0.5})
    return settings


PARITY = GoldenSet("parity", PARITY_TRAIN_STEPS, _parity_inference_steps(), _parity_per_example_settings())

# The defaults set: every flag the CLI defaults to is left out (prefix-shared depth and final stages, the
# every-width gate loss, pooling from the starting folder's 1_Pooling/config.json, the gates' trained class ->
# width map at inference); what run_glue.sh's stages add is passed: padding trimmed with batches grouped by
# length, and the quick profile's width stage distilled from the teacher. Short schedules (evaluated at the
# end only) keep it cheap: it guards the default paths, the parity set guards the breadth.
_USER_STAGE = ("--trim_padding", "--group_by_length")
_SHORT = {"per_gpu_train_batch_size": 8, "per_gpu_eval_batch_size": 16, "logging_steps": 0}
DEFAULTS_EXIT_THRESHOLD = 0.62  # on the dev set: 4 examples exit after layer 2, 15 after 3, 5 run all 4
DEFAULTS = GoldenSet(
    "defaults",
    train_steps=(
        Step("finetuning", "run_glue", "bert",
             {**_SHORT, "training_phase": "finetuning", "learning_rate": 5e-3, "num_train_epochs": 8}, _USER_STAGE),
        Step("dynabertw", "run_glue", "finetuning",
             {**_SHORT, "training_phase": "dynabertw", "width_mult_list": WIDTHS, "width_distil": "always",
              "learning_rate": 1e-3, "num_train_epochs": 2}, _USER_STAGE),
        Step("dynabert", "run_glue", "dynabertw",
             {**_SHORT, **_SUBNETS, "training_phase": "dynabert", "learning_rate": 5e-4, "num_train_epochs": 2},
             _USER_STAGE),
        Step("final_finetuning", "run_glue", "dynabert",
             {**_SHORT, **_SUBNETS, "training_phase": "final_finetuning", "learning_rate": 1e-4,
              "num_train_epochs": 1}, _USER_STAGE),
        Step("gates", "train_gate", "final_finetuning", {**_GATES, "num_train_epochs": 2, "logging_steps": 6}),
    ),
    inference_steps=(
        Step("static_w0.5_d0.75_b32", "train_gate", "gates",
             {"width_mult_list": "0.5,0.5,0.5,0.5", "depth_mult_list": 0.75, "per_gpu_eval_batch_size": 32},
             ("--static",)),
        Step("w_dynamic_b1", "train_gate_new", "gates", {"per_gpu_eval_batch_size": 1}, ("--w_dynamic",)),
        Step("wd_dynamic_b32", "train_gate_new", "gates",
             {"exit_threshold": DEFAULTS_EXIT_THRESHOLD, "per_gpu_eval_batch_size": 32},
             ("--wd_dynamic", "--early_exit")),
    ),
    per_example_settings={
        "static_w0.5_d0.75": ("gates", {"fixed_width": 0.5, "depth_mult": 0.75}),
        "wd_dynamic": ("gates", {"class_to_width": WIDTH_LIST, "early_exit": True,
                                 "exit_threshold": DEFAULTS_EXIT_THRESHOLD, "off_ramps": OFF_RAMPS}),
    },
    pretrained_pooling="mean",
)

GOLDEN_SETS = {s.name: s for s in (PARITY, DEFAULTS)}


def _layout(root: Path, golden_set: GoldenSet) -> tuple[dict[str, Path], dict[str, Path]]:
    """(input paths, model folders by step name) of a pipeline run under `root`."""
    paths = input_paths(root)
    folders = {"bert": paths["bert"], "mixed": root / "mixed"}
    folders.update({s.name: root / "runs" / s.name for s in golden_set.train_steps + golden_set.inference_steps})
    return paths, folders


def step_argv(golden_set: GoldenSet, step: Step, root: Path) -> list[str]:
    """The argv of one step of a pipeline run under `root` (`Path("{root}")` gives the recorded form)."""
    paths, folders = _layout(root, golden_set)
    options = {"task_name": TASK, "data_dir": paths["data"], "model_dir": folders[step.model],
               "output_dir": folders[step.name], "cache_dir": paths["cache"], "max_seq_length": MAX_LEN,
               "num_threads": 1, "seed": SEED}
    options.update({k: str(v).format(**paths) for k, v in step.flags.items()})
    mode = ("--do_train",) if step in golden_set.train_steps else ("--do_eval",)
    return cli_argv(options, *step.switches, switches=(*mode, "--cpu"))


def recorded_steps(golden_set: GoldenSet) -> dict:
    """What results.json's _meta records of a set's definition: every step's command line (paths under
    "{root}") and every per-example setting. The test requires the goldens' record to equal the current one."""
    return {"argv": {s.name: shlex.join(step_argv(golden_set, s, Path("{root}")))
                     for s in golden_set.train_steps + golden_set.inference_steps},
            "per_example_settings": {name: [model, setting]
                                     for name, (model, setting) in golden_set.per_example_settings.items()}}


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


def expected_training_record(recorded: dict, step: str) -> dict:
    """A training step's recorded result files with the CONFIG_ADDITIONS for that step that the recording
    predates: what the current code must produce."""
    additions = {key: values[step] for key, values in CONFIG_ADDITIONS.items()
                 if step in values and key not in recorded["config"]}
    return {**recorded, "config": {**recorded["config"], **additions}}


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


def run_pipeline(root: Path, golden_set: GoldenSet, per_example_outputs: Callable,
                 initial_weights: dict[str, torch.Tensor] | None = None) -> PipelineOutput:
    """Build the inputs under `root` (see build_inputs), run every step of `golden_set` in-process, and
    collect what the goldens record. `per_example_outputs(model, input_ids, attention_mask, token_type_ids,
    **setting)` returns {field: tensor} for PER_EXAMPLE_FIELDS."""
    root = Path(root)
    paths = build_inputs(root, initial_weights, golden_set.pretrained_pooling)
    folders = _layout(root, golden_set)[1]
    result = PipelineOutput(load_file(str(paths["bert"] / "model.safetensors")), {}, {}, {}, {})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # also what --num_threads 1 sets process-wide
    try:
        for step in golden_set.train_steps + golden_set.inference_steps:
            if step.model == "mixed" and not folders["mixed"].exists():
                make_mixed_gates(folders["gates"], folders["mixed"])
            start = time.perf_counter()
            stdout = io.StringIO()
            with contextlib.redirect_stdout(stdout):
                _script_main(step.script)(step_argv(golden_set, step, root))
            result.seconds[step.name] = time.perf_counter() - start
            out = folders[step.name]
            if step in golden_set.train_steps:
                result.weights[step.name] = load_file(str(out / "model.safetensors"))
                result.records[step.name] = training_record(step, out)
            else:
                result.records[step.name] = inference_record(out, stdout.getvalue())

        input_ids, attention_mask, token_type_ids, labels = dev_features(paths, folders["gates"])
        for name, tensor in (("input_ids", input_ids), ("attention_mask", attention_mask),
                             ("token_type_ids", token_type_ids), ("labels", labels)):
            result.per_example[f"inputs/{name}"] = tensor
        models = {}
        for setting_name, (model_name, setting) in golden_set.per_example_settings.items():
            if model_name not in models:
                models[model_name] = load_model(folders[model_name])
            with torch.no_grad():
                out = per_example_outputs(models[model_name], input_ids, attention_mask, token_type_ids, **setting)
            assert set(out) == set(PER_EXAMPLE_FIELDS), f"{setting_name}: adapter returned {sorted(out)}"
            for key in PER_EXAMPLE_FIELDS:
                result.per_example[f"{setting_name}/{key}"] = out[key].detach().cpu().contiguous()
    finally:
        torch.set_num_threads(threads)
    return result


# ---- where the goldens come from ---------------------------------------------------------------------------
def kernel_fingerprint() -> str:
    """sha256 (first 16 hex digits) of a fixed, seeded, single-thread torch computation over the kernels the
    pipeline runs: linear forward and backward at its shapes and a larger one, sdpa attention with a padding
    mask and dropout, layer norm, GELU, tanh, mean pooling, (log-)softmax, cross-entropy, KL and MSE losses,
    the gradient norm and an AdamW step. It reads nothing of the code under test: a machine (CPU, BLAS
    blocking, torch build) that reproduces it rounds as the goldens' machine did."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):  # leaves the global generator as it was
            outputs = _fingerprint_computation()
    finally:
        torch.set_num_threads(threads)
    digest = hashlib.sha256()
    for tensor in outputs:
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _fingerprint_computation() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    outputs: list[torch.Tensor] = []
    for m, k, n in ((192, 32, 32), (192, 32, 96), (192, 64, 32), (24, 16, 2), (1, 32, 8), (256, 384, 1536)):
        x, w, b = (torch.randn(shape, generator=gen).requires_grad_() for shape in ((m, k), (n, k), (n,)))
        y = F.linear(x, w, b)
        y.square().sum().backward()
        outputs += [y, x.grad, w.grad, b.grad]
    batch, seq, heads, head_size = 8, 24, 8, 4
    hidden = heads * head_size
    params = {name: (0.2 * torch.randn(shape, generator=gen)).requires_grad_() for name, shape in (
        ("qkv", (3 * hidden, hidden)), ("out", (hidden, hidden)), ("up", (2 * hidden, hidden)),
        ("down", (hidden, 2 * hidden)), ("norm", (hidden,)), ("head", (2, hidden)))}
    x = torch.randn(batch, seq, hidden, generator=gen)
    lengths = torch.randint(4, seq + 1, (batch, 1), generator=gen)
    mask = torch.arange(seq) < lengths  # [B, T] right padding
    additive = torch.zeros(batch, 1, 1, seq).masked_fill(~mask[:, None, None, :], torch.finfo(x.dtype).min)
    q, k, v = F.linear(x, params["qkv"]).view(batch, seq, 3, heads, head_size).permute(2, 0, 3, 1, 4)
    torch.manual_seed(0)  # the dropout masks (global generator)
    context = F.scaled_dot_product_attention(q, k, v, attn_mask=additive, dropout_p=0.1)
    h = F.layer_norm(x + F.linear(context.transpose(1, 2).reshape(batch, seq, hidden), params["out"]),
                     (hidden,), params["norm"])
    ffn = F.linear(F.gelu(F.linear(h, params["up"])), params["down"])
    h = F.layer_norm(h + F.dropout(ffn, 0.1), (hidden,), params["norm"])
    pooled = torch.tanh(h[:, 0]) + (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    logits = F.linear(pooled, params["head"])
    labels = torch.randint(0, 2, (batch,), generator=gen)
    teacher = torch.randn(batch, 2, generator=gen).softmax(-1)
    loss = (F.cross_entropy(logits, labels) + F.mse_loss(h, x)
            + F.kl_div(logits.log_softmax(-1), teacher, reduction="batchmean"))
    loss.backward()
    grads = [p.grad.clone() for p in params.values()]
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-3, eps=1e-8, weight_decay=0.01)
    optimizer.step()
    outputs += [context, h, logits, loss, torch.nn.utils.get_total_norm(grads), *grads, *params.values()]
    return outputs


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def machine_fingerprint() -> dict[str, str]:
    """What decides whether this machine reproduces the goldens bit for bit: the kernel fingerprint and the
    torch / transformers versions (the CPU's name and SIMD level are recorded to explain a difference)."""
    import transformers

    return {"kernels": kernel_fingerprint(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cpu": _cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}


# The keys of machine_fingerprint() that must be equal for a bit-for-bit comparison.
EXACT_FINGERPRINT_KEYS = ("kernels", "torch", "transformers")


def git_state() -> dict:
    """HEAD's commit and whether the tree differs from it (other than in the golden files being written)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout

    try:
        changed = git("status", "--porcelain", "--", ".", ":(exclude)tests/golden/*.safetensors",
                      ":(exclude)tests/golden/results.json")
        return {"commit": git("rev-parse", "HEAD").strip(), "dirty": bool(changed.strip())}
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}


# ---- writing the goldens -----------------------------------------------------------------------------------
def check_coverage(golden_set: GoldenSet, result: PipelineOutput, graft_calls: list[int] | None) -> None:
    """The goldens must exercise what they claim to. Both sets: every per-example setting gives its own
    logits, and the widths disagree somewhere. Parity: grafting fired, some examples exit early at both
    off-ramps and others run all layers, and some layer runs several widths inside one batch. Defaults:
    mean pooling was picked up from 1_Pooling, and the early-exit run exits some examples at each off-ramp
    and runs others through all layers."""
    logits = [result.per_example[f"{name}/logits"] for name in golden_set.per_example_settings]
    assert all(not torch.equal(a, b) for i, a in enumerate(logits) for b in logits[i + 1:]), "equal logits"
    history = result.records["dynabertw"]["eval_results"]["history"]
    assert any(len({m["acc"] for m in h["results"].values()}) > 1 for h in history), "widths never disagree"
    for name in golden_set.inference_step_names:
        assert f"_b{result.records[name]['report']['batch_size']}" in name, name
    if golden_set is DEFAULTS:
        assert result.records["finetuning"]["config"].get("pooling") == "mean", "1_Pooling's mean pooling not used"
        hist = result.records["wd_dynamic_b32"]["report"]["results"]["exit_layer_histogram"]
        assert set(hist) == {"2", "3", "4"}, f"wd_dynamic_b32: exit histogram {hist} (tune DEFAULTS_EXIT_THRESHOLD)"
        return
    if graft_calls is not None:
        assert len(graft_calls) == 6, f"expected 6 grafts in dynabertw, got {len(graft_calls)}"
    for name in ("wd_dynamic_gates_b32", "wd_dynamic_mixed_b32", "d_dynamic_w0.75_b32"):
        hist = result.records[name]["report"]["results"]["exit_layer_histogram"]
        assert set(hist) == {"2", "3", "4"}, f"{name}: exit histogram {hist} (tune EXIT_THRESHOLD)"
    for name in ("w_dynamic_mixed", "wd_dynamic_mixed"):
        heads = result.per_example[f"{name}/heads"]
        assert max(len(heads[:, i][heads[:, i] > 0].unique()) for i in range(heads.shape[1])) > 1, name


def main() -> None:
    from test_equivalence import per_example_outputs  # the adapter the test uses

    import run_glue

    meta = {**git_state(), "fingerprint": machine_fingerprint()}
    # Count the grafts (run_glue.py's module-level `graft`, where the checkout still has one).
    graft_calls, real_graft = ([], run_glue.graft) if hasattr(run_glue, "graft") else (None, None)

    def counting_graft(*args, **kwargs):
        graft_calls.append(1)
        return real_graft(*args, **kwargs)

    start = time.perf_counter()
    results = {}
    for golden_set in GOLDEN_SETS.values():
        if real_graft is not None:
            graft_calls.clear()
            run_glue.graft = counting_graft
        try:
            with tempfile.TemporaryDirectory(prefix="flexbert-golden-") as tmp:
                results[golden_set.name] = run_pipeline(Path(tmp), golden_set, per_example_outputs)
        finally:
            if real_graft is not None:
                run_glue.graft = real_graft
        check_coverage(golden_set, results[golden_set.name], graft_calls)
    assert all(torch.equal(r.initial[k], results["parity"].initial[k]) for r in results.values()
               for k in r.initial), "the golden sets start from different BERTs"

    for old in GOLDEN_DIR.glob("**/*.safetensors"):
        old.unlink()
    records = {META_KEY: {**meta, "steps": {name: recorded_steps(s) for name, s in GOLDEN_SETS.items()}}}
    for name, result in results.items():
        folder = GOLDEN_SETS[name].folder
        folder.mkdir(exist_ok=True)
        for step, weights in result.weights.items():
            save_file(weights, str(folder / f"{step}.safetensors"))
        save_file(result.per_example, str(GOLDEN_SETS[name].per_example_file))
        records[name] = result.records
    save_file(results["parity"].initial, str(GOLDEN_INITIAL))
    GOLDEN_RESULTS.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
    for path in GOLDEN_DIR.glob("**/*.safetensors"):
        path.chmod(0o644)
    size = sum(p.stat().st_size for p in GOLDEN_DIR.glob("**/*") if p.suffix in (".safetensors", ".json"))
    print(f"goldens written to {GOLDEN_DIR} from commit {meta['commit']}{' (dirty tree)' if meta['dirty'] else ''}"
          f" on {meta['fingerprint']}: {size / 1e6:.2f} MB, {time.perf_counter() - start:.1f} s")
    for name, result in results.items():
        for step, seconds in result.seconds.items():
            print(f"  {name:9s} {step:28s} {seconds:6.2f} s")


if __name__ == "__main__":
    main()
