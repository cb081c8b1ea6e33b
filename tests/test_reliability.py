"""Reliability (issue 9): bad input gives one clear `error:` line, a non-zero exit, no traceback and no new or
changed files; checkpoints are never torn (a run SIGKILLed while it saves still loads); a killed run resumed from
its checkpoint ends with the weights of an uninterrupted run; a non-finite loss stops the run naming the step.

Every entry point runs on a tiny random BERT (h32, L4, H4, I64, 64 positions) and a synthetic RTE folder; the
Python bad-input cases run their script inside the test process (`run_in_process`), a few per entry point as a
real process (RELIABILITY_FRESH=1: every case)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import cli_argv, run_in_process, save_model_folder
from safetensors.torch import load_file
from transformers import BertConfig

import run_glue
from transformers_ext import FlexBertForSequenceClassification

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
WORDS = [
    "the", "a", "cat", "dog", "bird", "man", "woman", "child", "sat", "ran", "ate", "saw", "likes", "on", "in",
    "under", "near", "mat", "house", "tree", "park", "road", "red", "blue", "big", "small", "old", "new", "happy",
    "sad", "today", "yesterday", "is", "was", "very", "quite", "and", "then",
]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "not", ".", ","] + WORDS
RTE_HEADER = "index\tsentence1\tsentence2\tlabel"
STSB_HEADER = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
TIMEOUT = 120


# ---- tiny model, tokenizer and data ----------------------------------------------------------------------
def _rte_rows(n: int, seed: int) -> list[str]:
    """RTE rows; the label is `not_entailment` exactly when sentence2 contains 'not'."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        s1 = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 7))) + " ."
        s2 = [rng.choice(WORDS) for _ in range(rng.randint(3, 5))]
        if i % 2:
            s2.insert(rng.randint(0, len(s2) - 1), "not")
        rows.append(f"{i}\t{s1}\t{' '.join(s2)} .\t{'not_entailment' if i % 2 else 'entailment'}")
    return rows


def _write_task(folder: Path, train: list[str] | bytes, dev: list[str] | None = None,
                header: str = RTE_HEADER) -> Path:
    folder.mkdir(parents=True)
    if isinstance(train, bytes):
        (folder / "train.tsv").write_bytes(train)
    else:
        (folder / "train.tsv").write_text("\n".join([header, *train]) + "\n", encoding="utf-8")
    dev = _rte_rows(12, 1) if dev is None else dev
    (folder / "dev.tsv").write_text("\n".join([header, *dev]) + "\n", encoding="utf-8")
    return folder


def _write_model(folder: Path, seed: int = 0, num_labels: int = 2) -> Path:
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
    return save_model_folder(folder, VOCAB, config, seed)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Inputs (good and bad) under `in/`, per-case outputs under `out/`, the feature cache under `cache/`."""
    root = tmp_path_factory.mktemp("reliability")
    inp = root / "in"
    w = {"root": root, "in": inp, "outs": root / "out", "cache": root / "cache"}
    w["outs"].mkdir()
    w["bert"] = _write_model(inp / "bert")
    w["bert_reg"] = _write_model(inp / "bert_reg", num_labels=1)  # a regression head (STS-B)
    w["rte"] = _write_task(inp / "RTE", _rte_rows(32, 0))
    good = _rte_rows(8, 2)
    w["missing_col"] = _write_task(inp / "missing_col", good[:3] + ["3\tonly one sentence\tentailment"] + good[4:])
    w["bad_label"] = _write_task(inp / "bad_label", good[:5] + ["5\ta cat .\ta dog .\tmaybe"] + good[6:])
    stsb = [f"{i}\tmain\tf\t2012\t{i}\tnone\tnone\tthe cat sat .\tthe dog ran .\t{i % 5}.0" for i in range(6)]
    w["stsb"] = _write_task(inp / "STS-B", stsb[:2] + [stsb[2].rsplit("\t", 1)[0] + "\thigh"] + stsb[3:],
                            dev=stsb, header=STSB_HEADER)
    w["empty_file"] = _write_task(inp / "empty_file", b"")
    latin1 = "\n".join([RTE_HEADER, *good[:3], "3\tle caf\xe9 .\tthe cat .\tentailment", *good[4:]]) + "\n"
    w["latin1"] = _write_task(inp / "latin1", latin1.encode("latin-1"))
    (inp / "empty_dir").mkdir()
    w["empty_dir"] = inp / "empty_dir"
    w["gpt2"] = inp / "gpt2"
    w["gpt2"].mkdir()
    (w["gpt2"] / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2, "n_embd": 32}))
    w["novocab"] = inp / "checkpoint-4"  # a checkpoint folder without vocab.txt (nor any tokenizer file)
    w["novocab"].mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(w["bert"] / name, w["novocab"] / name)
    w["bad_json"] = inp / "bad_config.json"
    w["bad_json"].write_text('{"RTE": {"width_mult_list": [0.5, 1.0], ')
    w["latin1_json"] = inp / "latin1_config.json"
    w["latin1_json"].write_bytes(b'{"RTE": {"width_mult_list": [0.5], "mode": "st\xe9tic"}}')
    w["taken"] = inp / "taken"  # an unrelated run's folder
    w["taken"].mkdir()
    (w["taken"] / "notes.txt").write_text("someone else's results\n")
    (w["taken"] / "predictions.tsv").write_text("0\t1\n")
    w["bad_runs"] = inp / "inference"  # plot_tradeoff input with a corrupt result file
    (w["bad_runs"] / "static_w1.0_d1.0_b32").mkdir(parents=True)
    (w["bad_runs"] / "static_w1.0_d1.0_b32" / "inference_results.json").write_text('{"task": "RTE", "res')
    _write_round_two(w)
    return w


def _variant(w: dict[str, Path], name: str, source: str = "bert", files: dict[str, str | bytes | None] | None = None,
             config: dict | None = None) -> Path:
    """A copy of the model folder `source` with some files replaced (None: removed) and config keys changed."""
    folder = w["in"] / name
    shutil.copytree(w[source], folder, symlinks=True)
    for file, content in (files or {}).items():
        if content is None:
            (folder / file).unlink()
        elif isinstance(content, bytes):
            (folder / file).write_bytes(content)
        else:
            (folder / file).write_text(content, encoding="utf-8")
    if config:
        saved = json.loads((folder / "config.json").read_text())
        saved.update(config)
        (folder / "config.json").write_text(json.dumps(saved))
    w[name] = folder
    return folder


def _training_state(**args) -> dict:
    """A training state of the shape trainer.fit saves, for a run with `args`."""
    return {"global_step": 2, "epoch": 0, "batch_in_epoch": 2, "optimizer": {"state": {}, "param_groups": []},
            "scheduler": {}, "best_score": 0.5, "history": [], "rng": {}, "args": args}


def _write_round_two(w: dict[str, Path]) -> None:
    """Inputs of issue 19's cases: corrupt model folders, contradicting saved settings, checkpoints to resume
    from that do not fit, folders a run must not write into, results files of the wrong shape."""
    inp = w["in"]
    weights = (w["bert"] / "model.safetensors").read_bytes()
    # -- model folders a library chokes on
    _variant(w, "trunc_weights", files={"model.safetensors": weights[: len(weights) // 2]})
    _variant(w, "tiny_weights", files={"model.safetensors": weights[:5]})
    _variant(w, "no_weights", files={"model.safetensors": None})
    _variant(w, "empty_vocab", files={"vocab.txt": "", "tokenizer.json": None})
    big = VOCAB[:8] + [f"filler{i}" for i in range(40)] + WORDS  # the data's words get ids past the embedding
    _variant(w, "big_vocab", files={"vocab.txt": "\n".join(big) + "\n", "tokenizer.json": None})
    _variant(w, "no_unk", files={"vocab.txt": "\n".join(v for v in VOCAB if v != "[UNK]") + "\n",
                                 "tokenizer.json": None})
    _variant(w, "h30", config={"hidden_size": 30})
    _variant(w, "config_garbage", files={"config.json": "{not json"})
    _variant(w, "config_string_size", config={"num_hidden_layers": "4"})
    _variant(w, "config_list", files={"config.json": "[1, 2]"})
    _variant(w, "more_layers", config={"num_hidden_layers": 6})  # the weights hold 4
    _variant(w, "bad_pooling", config={"pooling": "max"})
    _variant(w, "bad_trained_depths", config={"depth_mult_list": [0.5, 2]})
    w["other_shape"] = save_model_folder(inp / "other_shape", VOCAB, BertConfig(  # weights of another model
        vocab_size=len(VOCAB), hidden_size=48, num_hidden_layers=4, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=64))
    # -- gate folders whose saved settings contradict the weights or are of the wrong type
    gated = FlexBertForSequenceClassification.from_pretrained(str(w["bert"]))
    gated.add_gates([0.5, 1.0], 4)
    gated.config.gate_class_to_width = [0.5, 1.0]
    gated.config.off_ramps = [1, 2]
    _variant(w, "gated")
    gated.save_pretrained(str(w["gated"]))
    _variant(w, "gates_2_of_4", source="gated", config={"num_gates": 2})
    _variant(w, "gates_unlisted", source="gated", config={"gate_setting": None})
    _variant(w, "saved_threshold_str", source="gated", config={"exit_threshold": "low"})
    _variant(w, "saved_map_length", source="gated", config={"gate_class_to_width": [0.5, 0.75, 1.0]})
    _variant(w, "saved_off_ramp", source="gated", config={"off_ramps": [1, 9]})
    _variant(w, "saved_gates_not_divisor", source="gated", config={"num_gates": 3})
    # -- --config files
    for name, entry in {
        "cfg_early_exit_str": {"width_mult_list": [0.5, 1.0], "mode": "wd_dynamic", "early_exit": "false"},
        "cfg_wd": {"width_mult_list": [0.5, 1.0], "mode": "wd_dynamic", "exit_threshold": 0.1},
        "cfg_width_str": {"width_mult_list": ["0.5", "1.0"], "mode": "w_dynamic"},
        "cfg_threshold_str": {"width_mult_list": [0.5, 1.0], "exit_threshold": "0.1"},
        "cfg_threshold_neg": {"width_mult_list": [0.5, 1.0], "exit_threshold": -1},
        "cfg_typo": {"width_mult_list": [0.5, 1.0], "exit_treshold": 0.1},
        "cfg_static_no_exit": {"width_mult_list": [1.0, 1.0], "mode": "static", "early_exit": False},
    }.items():
        w[name] = inp / f"{name}.json"
        w[name].write_text(json.dumps({"RTE": entry}))
    # -- checkpoints to resume a finetuning run of `bert` from
    def checkpoint(name: str, state: dict | bytes, source: str = "bert") -> None:
        _variant(w, name, source=source)
        if isinstance(state, bytes):
            (w[name] / "training_state.pt").write_bytes(state)
        else:
            torch.save(state, w[name] / "training_state.pt")

    good_args = {"training_phase": "finetuning", "task_name": "RTE", "per_gpu_train_batch_size": 8}
    checkpoint("ckpt_state_trunc", b"")
    torch.save(_training_state(**good_args), inp / "state.pt")
    checkpoint("ckpt_state_half", (inp / "state.pt").read_bytes()[:200])
    (inp / "state.pt").unlink()
    checkpoint("ckpt_state_list", [1, 2, 3])  # type: ignore[arg-type]
    checkpoint("ckpt_other_shape", _training_state(**good_args), source="other_shape")
    checkpoint("ckpt_weights_trunc", _training_state(**good_args), source="trunc_weights")
    checkpoint("ckpt_other_phase", _training_state(**{**good_args, "training_phase": "dynabertw"}))
    checkpoint("ckpt_other_batch", _training_state(**{**good_args, "per_gpu_train_batch_size": 16}))
    checkpoint("ckpt_bad_optimizer", _training_state(**good_args))
    checkpoint("ckpt_gates_2", _training_state(training_phase="traingate", task_name="RTE"))  # 2 gates, not 4
    gated.add_gates([0.5, 1.0], 2)
    gated.save_pretrained(str(w["ckpt_gates_2"]))
    # -- a finished run of the teacher: the input of the next stage, which must not write into it
    _variant(w, "teacher")
    (w["teacher"] / "eval_results.json").write_text('{"best_step": 4}\n')
    shutil.copytree(w["ckpt_bad_optimizer"], w["teacher"] / "checkpoint-4")
    (inp / "teacher_link").symlink_to(w["teacher"])
    w["teacher_link"] = inp / "teacher_link"
    w["plain_file"] = inp / "plain_file.txt"
    w["plain_file"].write_text("not a folder\n")
    # -- inference folders for plot_tradeoff with results files of the wrong shape
    def runs(name: str, report) -> None:
        w[name] = inp / name
        (w[name] / "static_w1.0_d1.0_b32").mkdir(parents=True)
        (w[name] / "static_w1.0_d1.0_b32" / "inference_results.json").write_text(json.dumps(report))

    ok = {"task": "RTE", "mode": "static", "batch_size": 32,
          "results": {"acc": 0.5, "relative_flops": 1.0, "flops": 1.0, "mean_layers_executed": 4}}
    runs("runs_list", [ok])
    runs("runs_no_results", {k: v for k, v in ok.items() if k != "results"})
    runs("runs_score_str", {**ok, "results": {**ok["results"], "acc": "high"}})
    runs("runs_unknown_task", {**ok, "task": "FOO"})
    runs("runs_batch_str", {**ok, "batch_size": "32"})
    runs("runs_results_list", {**ok, "results": [0.5]})


def _snapshot(path: Path) -> dict | None:
    """Every file and folder below `path` with size, mtime and (files) a hash of the content; None when `path`
    does not exist."""
    if not path.exists():
        return None

    def entry(p: Path) -> tuple:
        st = p.stat()
        digest = hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else None
        return p.is_dir(), st.st_size if p.is_file() else 0, st.st_mtime_ns, digest

    snap = {".": entry(path)}
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            snap[str(p.relative_to(path))] = entry(p)
    return snap


def _env(world: dict[str, Path], **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(FLEXBERT_CACHE=str(world["cache"]), PYTHONPATH=str(ROOT), TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    env.update(extra)
    return env


# ---- the bad-input table -----------------------------------------------------------------------------------
@dataclass
class Case:
    id: str
    cmd: list[str]  # entry point and flags; {name} is replaced by world[name], {out} by the case's output folder
    expect: list[str]  # substrings of the error line (case-insensitive)
    out_exists: bool = False  # the output folder exists (empty) before the run
    env: dict[str, str] = field(default_factory=dict)  # for the .sh scripts ({out} and {name} expanded)
    out: str | None = None  # the output folder, if not the case's own (fresh) folder under outs/
    code: int = 2  # the exit status: 2 bad input, 1 an environment fault
    fsize: int | None = None  # RLIMIT_FSIZE in bytes (writes beyond it fail as on a full disk); runs fresh
    logs: bool = False  # the run's log lines may come before the error line (a fault found during the work)
    process: bool = False  # runs as a real process (else inside the test process; .sh scripts: always real)


def _glue(*flags: str, phase: str = "finetuning", data: str = "{rte}", model: str = "{bert}") -> list[str]:
    return ["run_glue.py", "--do_train", "--task_name", "RTE", "--data_dir", data, "--model_dir", model,
            "--output_dir", "{out}", "--training_phase", phase, "--max_seq_length", "24",
            "--per_gpu_train_batch_size", "8", "--num_threads", "1", "--cpu", *flags]


def _gate(*flags: str, script: str = "train_gate.py", model: str = "{bert}", data: str = "{rte}") -> list[str]:
    return [script, "--task_name", "RTE", "--data_dir", data, "--model_dir", model, "--output_dir", "{out}",
            "--max_seq_length", "24", "--num_threads", "1", "--cpu", *flags]


def _eval(*flags: str, **kw) -> list[str]:
    return _gate("--do_eval", *flags, **kw)


def _traingate(*flags: str, **kw) -> list[str]:
    return _gate("--do_train", "--training_phase", "traingate", "--num_train_epochs", "1", *flags, **kw)


def _augment(*flags: str, data: str = "{rte}", model: str = "{bert}", task: str = "RTE") -> list[str]:
    return ["augment_data.py", "--task_name", task, "--data_dir", data, "--model_dir", model,
            "--output", "{out}/train_aug.tsv", "--max_examples", "2", *flags]


SH_ENV = {"TASK": "RTE", "DATA_DIR": "{rte}", "BERT_DIR": "{bert}", "OUT_DIR": "{out}", "QUICK": "0",
          "MAX_SEQ_LENGTH": "24"}

CASES = [
    # -- task and data
    Case("glue-unknown-task", _glue("--task_name", "FOO"), ["unknown task", "FOO"]),
    Case("gate-unknown-task", _eval("--task_name", "MNLX"), ["unknown task", "MNLX"]),
    Case("glue-missing-data-dir", _glue(data="{in}/no_such_dir"), ["data_dir", "no_such_dir", "does not exist"]),
    Case("glue-empty-data-dir", _glue(data="{empty_dir}"), ["train.tsv", "not found"]),
    Case("gate-empty-data-dir", _eval("--static", data="{empty_dir}"), ["dev.tsv", "not found"]),
    Case("glue-missing-column", _glue(data="{missing_col}"), ["train.tsv:5", "columns"]),
    Case("glue-unknown-label", _glue(data="{bad_label}"), ["train.tsv:7", "unknown label 'maybe'"]),
    Case("glue-stsb-score", _glue("--task_name", "STS-B", data="{stsb}", model="{bert_reg}"),
         ["train.tsv:4", "'high' is not a number"]),
    Case("glue-classifier-size", _glue("--task_name", "STS-B", data="{stsb}"), ["classifier", "2", "STS-B", "1"]),
    Case("glue-empty-file", _glue(data="{empty_file}"), ["train.tsv", "no examples"]),
    Case("glue-non-utf8", _glue(data="{latin1}"), ["train.tsv:5", "utf-8"]),
    Case("traingate-non-utf8", _traingate("--width_mult_list", "0.5,1.0", "--gate_setting", "0.5,1.0",
                                          data="{latin1}"), ["train.tsv:5", "utf-8"]),
    Case("glue-data-aug-missing", _glue("--data_aug", phase="dynabertw"), ["--data_aug", "train_aug.tsv"]),
    # -- model folder
    Case("glue-model-missing", _glue(model="{in}/no_model"), ["model_dir", "no_model", "does not exist"]),
    Case("glue-model-not-bert", _glue(model="{gpt2}"), ["gpt2", "not a bert"]),
    Case("glue-checkpoint-no-vocab", _glue(model="{novocab}"), ["checkpoint-4", "vocab.txt"]),
    Case("gate-model-empty-dir", _eval("--static", model="{empty_dir}"), ["empty_dir", "config.json"]),
    Case("glue-resume-missing", _glue("--resume_from_checkpoint", "{in}/no_ckpt"), ["no_ckpt", "checkpoint"]),
    Case("glue-resume-none-yet", _glue("--resume_from_checkpoint"), ["no checkpoint to resume"]),
    # -- width / depth multipliers
    Case("glue-negative-max-steps", _glue("--max_steps", "-2"), ["--max_steps", "-2"]),
    Case("glue-width-empty", _glue("--width_mult_list", "", phase="dynabertw"), ["width_mult_list", "empty"]),
    Case("glue-width-zero", _glue("--width_mult_list", "0,0.5", phase="dynabertw"), ["width_mult_list", "0"]),
    Case("glue-width-negative", _glue("--width_mult_list", "-0.5", phase="dynabertw"), ["-0.5", "(0, 1]"]),
    Case("glue-width-above-one", _glue("--width_mult_list", "0.5,1.5", phase="dynabertw"), ["1.5", "(0, 1]"]),
    Case("glue-width-not-number", _glue("--width_mult_list", "0.5,abc", phase="dynabertw"),
         ["abc", "not a number"]),
    Case("glue-width-no-head", _glue("--width_mult_list", "0.1,1.0", phase="dynabertw"),
         ["width_mult_list", "0.1", "no attention head"]),
    Case("glue-depth-no-layer", _glue("--depth_mult_list", "0.1,1.0", phase="dynabert"),
         ["depth_mult_list", "0.1", "no layer"]),
    Case("gate-depth-no-layer", _eval("--static", "--width_mult_list", "1.0", "--depth_mult_list", "0.01"),
         ["0.01", "no layer"]),
    Case("gate-width-not-number", _eval("--static", "--width_mult_list", "x"), ["'x' is not a number"]),
    Case("gate-fixed-gate-no-head", _eval("--d_dynamic", "--early_exit", "--fixed_gate", "0.05"),
         ["fixed_gate", "0.05"]),
    # -- gates and modes
    Case("traingate-setting-length", _traingate("--width_mult_list", "0.5,1.0", "--gate_setting", "0.25,0.5,1.0"),
         ["gate_setting", "width_mult_list"]),
    Case("gate-w-dynamic-no-gates", _eval("--w_dynamic", "--width_mult_list", "0.25,0.5,0.75,1.0",
                                          script="train_gate_new.py"), ["w_dynamic", "no", "gates"]),
    Case("gate-conflicting-modes", _eval("--static", "--w_dynamic", "--width_mult_list", "1.0"),
         ["conflicting modes", "--static", "--w_dynamic"]),
    Case("gate-config-bad-json", _eval("--config", "{bad_json}", script="train_gate_new.py"),
         ["bad_config.json", "json"], process=True),
    Case("gate-config-non-utf8", _eval("--config", "{latin1_json}"), ["latin1_config.json"]),
    Case("gate-config-missing", _eval("--config", "{in}/nope.json"), ["nope.json"]),
    Case("gate-off-ramp-range", _eval("--d_dynamic", "--early_exit", "--off_ramps", "9"), ["off_ramps", "9"]),
    # -- output folder, sequence length, numbers
    Case("glue-output-taken", _glue(), ["output_dir", "overwrite_output_dir"], out="{taken}"),
    Case("traingate-output-taken", _traingate("--width_mult_list", "0.5,1.0", "--gate_setting", "0.5,1.0"),
         ["output_dir", "overwrite_output_dir"], out="{taken}"),
    Case("glue-seq-len-2", _glue("--max_seq_length", "2"), ["max_seq_length", "2"]),
    Case("glue-seq-len-too-long", _glue("--max_seq_length", "65"), ["max_seq_length", "65", "64"]),
    Case("gate-seq-len-too-long", _eval("--static", "--max_seq_length", "512"), ["max_seq_length", "512", "64"]),
    Case("glue-batch-zero", _glue("--per_gpu_train_batch_size", "0"), ["per_gpu_train_batch_size"]),
    Case("glue-fp16-on-cpu", _glue("--fp16"), ["fp16", "cuda"]),
    Case("glue-predict-fp16-on-cpu", [a for a in _glue("--do_predict", "--fp16") if a != "--do_train"],
         ["fp16", "cuda"]),
    Case("gate-eval-fp16-on-cpu", _eval("--static", "--fp16"), ["fp16", "cuda"]),
    Case("calibrate-fp16-on-cpu", _eval("--calibrate", "--flops_budget", "0.5", "--fp16", script="train_gate_new.py"),
         ["fp16", "cuda"]),
    Case("glue-fp16-and-bf16", _glue("--fp16", "--bf16"), ["--fp16", "--bf16", "pick one"]),
    Case("traingate-fp16-and-bf16", _traingate("--gate_setting", "0.5,1.0", "--fp16", "--bf16"),
         ["--fp16", "--bf16", "pick one"]),
    Case("calibrate-fp16-and-bf16", _eval("--calibrate", "--flops_budget", "0.5", "--bf16", "--fp16",
                                          script="train_gate_new.py"), ["--fp16", "--bf16", "pick one"]),
    Case("glue-not-a-flag", _glue("--widht_mult_list", "0.5"), ["unrecognized", "--widht_mult_list"]),
    # -- the pipeline scripts forward their extra flags
    Case("sh-run-glue-width", ["run_glue.sh", "--width_mult_list", "0,1"], ["width_mult_list", "(0, 1]"],
         env=SH_ENV),
    Case("sh-train-glue-gate-setting", ["train_glue.sh", "--gate_setting", "0.5,1.0"],
         ["gate_setting", "width_mult_list"], env={**SH_ENV, "WD_BERT": "{bert}"}),
    Case("sh-gate-inference-no-gates", ["gate_inference.sh", "--fixed_gate", "0.0001"], ["fixed_gate"],
         env={**SH_ENV, "MODEL": "{bert}", "BATCH_SIZES": "8"}),
    # -- augment_data.py and plot_tradeoff.py
    Case("augment-unknown-task", _augment(task="NOPE"), ["unknown task", "NOPE"], out_exists=True),
    Case("augment-missing-data-dir", _augment(data="{in}/no_such_dir"), ["no_such_dir"], out_exists=True),
    Case("augment-bad-label", _augment(data="{bad_label}"), ["train.tsv:7", "maybe"], out_exists=True),
    Case("augment-non-utf8", _augment(data="{latin1}"), ["train.tsv:5", "utf-8"], out_exists=True),
    Case("augment-not-bert", _augment(model="{gpt2}"), ["gpt2"], out_exists=True, process=True),
    Case("augment-p-range", _augment("--p", "1.5"), ["--p"], out_exists=True),
    Case("plot-missing-dir", ["plot_tradeoff.py", "--inference_dir", "{in}/nothing", "--output_dir", "{out}"],
         ["inference_dir", "nothing"]),
    Case("plot-corrupt-json", ["plot_tradeoff.py", "--inference_dir", "{bad_runs}", "--output_dir", "{out}"],
         ["inference_results.json"], process=True),
    Case("plot-no-results", ["plot_tradeoff.py", "--inference_dir", "{empty_dir}", "--output_dir", "{out}"],
         ["no */inference_results.json"]),
]

# ---- round two (issue 19): one block per class of failure --------------------------------------------------
_W2 = ("--width_mult_list", "0.5,1.0", "--gate_setting", "0.5,1.0")  # gate training on two classes
UNWRITABLE = "/proc/flexbert-reliability/out"  # even root cannot create files in /proc


def _plot(runs: str, out: str = "{out}") -> list[str]:
    return ["plot_tradeoff.py", "--inference_dir", runs, "--output_dir", out]


CASES += [
    # 1. library errors on a corrupt model folder, checkpoint or disk become one line naming the file
    Case("glue-weights-truncated", _glue(model="{trunc_weights}"), ["trunc_weights/model.safetensors", "cannot read"],
         process=True),
    Case("gate-weights-truncated", _eval("--static", model="{trunc_weights}"), ["trunc_weights/model.safetensors"],
         process=True),
    Case("glue-weights-header", _glue(model="{tiny_weights}"), ["tiny_weights/model.safetensors", "header"]),
    Case("glue-weights-missing", _glue(model="{no_weights}"), ["no_weights", "no weights", "model.safetensors"]),
    Case("glue-vocab-empty", _glue(model="{empty_vocab}"), ["empty_vocab/vocab.txt", "empty vocabulary"]),
    Case("traingate-vocab-empty", _traingate(*_W2, model="{empty_vocab}"), ["vocab.txt", "empty"]),
    Case("glue-vocab-no-unk", _glue(model="{no_unk}"), ["no_unk/vocab.txt", "[UNK]"]),
    Case("glue-vocab-too-large", _glue(model="{big_vocab}"), ["big_vocab/vocab.txt", "86 tokens", "46 rows"]),
    Case("gate-vocab-too-large", _eval("--static", model="{big_vocab}"), ["vocab.txt", "vocab_size"]),
    Case("glue-heads-not-divisor", _glue(model="{h30}"),
         ["h30/config.json", "hidden_size 30", "num_attention_heads 4"]),
    Case("glue-config-garbage", _glue(model="{config_garbage}"), ["config_garbage/config.json", "cannot read"]),
    Case("glue-config-string-size", _glue(model="{config_string_size}"), ["config_string_size", "num_hidden_layers"]),
    Case("glue-config-not-object", _glue(model="{config_list}"), ["config_list/config.json", "not a json object"]),
    Case("glue-config-more-layers", _glue(model="{more_layers}"), ["more_layers/model.safetensors", "4 layers", "6"]),
    Case("glue-resume-state-empty", _glue("--resume_from_checkpoint", "{ckpt_state_trunc}"),
         ["ckpt_state_trunc/training_state.pt", "cannot read"]),
    Case("glue-resume-state-truncated", _glue("--resume_from_checkpoint", "{ckpt_state_half}"),
         ["ckpt_state_half/training_state.pt", "cannot read"]),
    Case("glue-resume-state-not-dict", _glue("--resume_from_checkpoint", "{ckpt_state_list}"),
         ["ckpt_state_list/training_state.pt", "not a training state"]),
    Case("glue-resume-other-shape", _glue("--resume_from_checkpoint", "{ckpt_other_shape}"),
         ["ckpt_other_shape/model.safetensors", "shape", "[46, 48]", "[46, 32]"]),
    Case("glue-resume-weights-truncated", _glue("--resume_from_checkpoint", "{ckpt_weights_trunc}"),
         ["ckpt_weights_trunc/model.safetensors", "cannot read"]),
    Case("glue-resume-bad-optimizer", _glue("--resume_from_checkpoint", "{ckpt_bad_optimizer}"),
         ["ckpt_bad_optimizer/training_state.pt", "optimizer"]),
    Case("glue-disk-full", _glue("--logging_steps", "2"), ["cannot write", "model.safetensors"], code=1,
         fsize=100_000, logs=True),
    Case("traingate-disk-full", _traingate(*_W2), ["cannot write", "model.safetensors"], code=1, fsize=100_000,
         logs=True),
    Case("gate-disk-full", _eval("--static"), ["cannot write", "inference_results.json"], code=1, fsize=300,
         logs=True),
    # 2. every numeric flag has a declared range
    Case("glue-lr-negative", _glue("--learning_rate", "-0.001"), ["argument --learning_rate", "> 0", "-0.001"]),
    Case("glue-lr-nan", _glue("--learning_rate", "nan"), ["argument --learning_rate", "finite"]),
    Case("glue-weight-decay-negative", _glue("--weight_decay", "-0.1"), ["argument --weight_decay", ">= 0"]),
    Case("glue-dropout-one", _glue("--hidden_dropout_prob", "1.0"), ["argument --hidden_dropout_prob", "[0, 1)"]),
    Case("glue-attention-dropout-negative", _glue("--attention_probs_dropout_prob", "-0.1"),
         ["argument --attention_probs_dropout_prob", "[0, 1)"]),
    Case("glue-epochs-zero", _glue("--num_train_epochs", "0"), ["argument --num_train_epochs", "> 0"]),
    Case("glue-accumulation-too-large", _glue("--gradient_accumulation_steps", "5"),
         ["--gradient_accumulation_steps 5", "(4)", "no update"]),
    Case("traingate-accumulation-too-large", _traingate(*_W2, "--gradient_accumulation_steps", "9"),
         ["--gradient_accumulation_steps 9", "no update"]),
    Case("glue-warmup-negative", _glue("--warmup_steps", "-1"), ["argument --warmup_steps", ">= 0"]),
    Case("glue-logging-negative", _glue("--logging_steps", "-5"), ["argument --logging_steps"]),
    Case("glue-seed-negative", _glue("--seed", "-1"), ["argument --seed", "-1"]),
    Case("glue-lambda-negative", _glue("--depth_lambda2", "-1", phase="dynabert"), ["argument --depth_lambda2"]),
    Case("glue-importance-zero", _glue("--importance_max_examples", "0", phase="dynabertw"),
         ["argument --importance_max_examples", ">= 1"]),
    Case("glue-threads-zero", _glue("--num_threads", "0"), ["argument --num_threads", ">= 1"]),
    Case("glue-batch-not-integer", _glue("--per_gpu_eval_batch_size", "2.5"),
         ["argument --per_gpu_eval_batch_size", "not an integer"]),
    Case("traingate-num-gates-zero", _traingate(*_W2, "--num_gates", "0"), ["argument --num_gates", ">= 1"]),
    Case("traingate-off-ramps-beyond", _traingate(*_W2, "--off_ramps", "1,7"), ["--off_ramps 1,7", "0..3"]),
    Case("traingate-regression-threshold-zero", _traingate(*_W2, "--regression_threshold", "0"),
         ["argument --regression_threshold", "> 0"]),
    Case("gate-off-ramps-empty", _eval("--d_dynamic", "--early_exit", "--off_ramps", ""),
         ["argument --off_ramps", "empty"]),
    Case("gate-exit-threshold-negative", _eval("--wd_dynamic", "--early_exit", "--exit_threshold", "-0.5"),
         ["argument --exit_threshold", ">= 0"]),
    Case("gate-fixed-gate-above-one", _eval("--d_dynamic", "--early_exit", "--fixed_gate", "1.5"),
         ["argument --fixed_gate", "(0, 1]"]),
    Case("gate-timing-warmup-negative", _eval("--static", "--timing_warmup", "-1"), ["argument --timing_warmup"]),
    Case("traingate-class-weights-negative", _traingate(*_W2, "--gate_class_weights", "1,-1"),
         ["--gate_class_weights", ">= 0"]),
    Case("traingate-class-weights-zero", _traingate(*_W2, "--gate_class_weights", "0,0"),
         ["--gate_class_weights", "every weight is 0"]),
    # 3. saved settings are checked on load; flags that contradict --config are refused
    Case("gate-gates-config-2-weights-4", _eval("--w_dynamic", model="{gates_2_of_4}"),
         ["gates_2_of_4/model.safetensors", "4 gates", "2"]),
    Case("gate-gates-unlisted", _eval("--static", model="{gates_unlisted}"), ["4 gates", "config.json has 0"]),
    Case("gate-saved-threshold-string", _eval("--wd_dynamic", "--early_exit", model="{saved_threshold_str}"),
         ["saved_threshold_str/config.json", "exit_threshold", "'low'"]),
    Case("gate-saved-map-length", _eval("--w_dynamic", model="{saved_map_length}"),
         ["gate_class_to_width", "3 widths", "2 gate classes"]),
    Case("gate-saved-off-ramp", _eval("--wd_dynamic", "--early_exit", model="{saved_off_ramp}"),
         ["saved_off_ramp/config.json", "off_ramps", "0..3"]),
    Case("gate-saved-gates-not-divisor", _eval("--w_dynamic", model="{saved_gates_not_divisor}"),
         ["num_gates 3", "4 layers"]),
    Case("glue-saved-pooling", _glue(model="{bad_pooling}"), ["bad_pooling/config.json", "pooling", "'max'"]),
    Case("traingate-saved-trained-depths", _traingate(*_W2, model="{bad_trained_depths}"),
         ["bad_trained_depths/config.json", "depth_mult_list", "(0, 1]", "2"]),
    Case("gate-config-early-exit-string", _eval("--config", "{cfg_early_exit_str}", model="{gated}"),
         ["cfg_early_exit_str.json", "early_exit", "boolean"]),
    Case("gate-config-contradicts-static", _eval("--static", "--config", "{cfg_wd}", model="{gated}"),
         ["--static contradicts", "cfg_wd.json", "wd_dynamic"]),
    Case("gate-config-contradicts-widths", _eval("--width_mult_list", "1.0,1.0", "--config", "{cfg_wd}",
                                                 model="{gated}"), ["--width_mult_list 1,1", "0.5,1"]),
    Case("gate-config-contradicts-threshold", _eval("--exit_threshold", "0.3", "--config", "{cfg_wd}",
                                                    model="{gated}"), ["--exit_threshold 0.3", "0.1"]),
    Case("gate-config-contradicts-early-exit", _eval("--early_exit", "--config", "{cfg_static_no_exit}"),
         ["--early_exit contradicts", "early_exit false"]),
    Case("gate-config-widths-strings", _eval("--config", "{cfg_width_str}", model="{gated}"),
         ["cfg_width_str.json", "width_mult_list", "numbers"]),
    Case("gate-config-threshold-string", _eval("--config", "{cfg_threshold_str}", model="{gated}"),
         ["cfg_threshold_str.json", "a number"]),
    Case("gate-config-threshold-negative", _eval("--config", "{cfg_threshold_neg}", model="{gated}"),
         ["cfg_threshold_neg.json", "RTE.exit_threshold", ">= 0"]),
    Case("gate-config-unknown-key", _eval("--config", "{cfg_typo}", model="{gated}"), ["exit_treshold", "unknown"]),
    Case("glue-resume-other-phase", _glue("--resume_from_checkpoint", "{ckpt_other_phase}"),
         ["ckpt_other_phase", "--training_phase dynabertw", "not finetuning"]),
    Case("glue-resume-other-batch", _glue("--resume_from_checkpoint", "{ckpt_other_batch}"),
         ["ckpt_other_batch", "--per_gpu_train_batch_size 16", "not 8"]),
    Case("traingate-resume-glue-checkpoint", _traingate(*_W2, "--resume_from_checkpoint", "{ckpt_other_phase}"),
         ["ckpt_other_phase", "--training_phase dynabertw", "not traingate"], logs=True),  # after the gate inputs
    Case("traingate-resume-other-gates", _traingate(*_W2, "--resume_from_checkpoint", "{ckpt_gates_2}"),
         ["ckpt_gates_2/model.safetensors", "2 gates", "has 4"], logs=True),
    # 4. only final_finetuning writes into its input folder; a run never replaces its input checkpoint
    Case("glue-width-stage-in-place", _glue(phase="dynabertw", model="{teacher}"),
         ["--output_dir", "is the input --model_dir", "final_finetuning"], out="{teacher}"),
    Case("glue-depth-stage-in-place-overwrite", _glue("--overwrite_output_dir", phase="dynabert", model="{teacher}"),
         ["is the input --model_dir"], out="{teacher}"),
    Case("glue-teacher-in-place", _glue(model="{teacher}"), ["is the input --model_dir"], out="{teacher}"),
    Case("glue-in-place-via-symlink", _glue(phase="dynabertw", model="{teacher}"), ["is the input --model_dir"],
         out="{teacher_link}"),
    Case("glue-resume-in-place", _glue("--resume_from_checkpoint", phase="dynabertw", model="{teacher}"),
         ["is the input --model_dir"], out="{teacher}"),
    Case("traingate-in-place", _traingate(*_W2, model="{teacher}"), ["is the input --model_dir"], out="{teacher}"),
    Case("glue-input-checkpoint-inside-output", _glue("--overwrite_output_dir", model="{teacher}/checkpoint-4"),
         ["checkpoint-4", "inside --output_dir"], out="{teacher}"),
    # 5. an unusable output folder is reported before the work, by every script
    Case("glue-output-unwritable", _glue(), ["--output_dir", "not writable"], out=UNWRITABLE),
    Case("traingate-output-unwritable", _traingate(*_W2), ["--output_dir", "not writable"], out=UNWRITABLE),
    Case("gate-output-unwritable", _eval("--static"), ["--output_dir", "not writable"], out=UNWRITABLE),
    Case("gate-output-under-a-file", _eval("--static"), ["plain_file.txt is not a folder"],
         out="{plain_file}/out"),
    Case("plot-output-unwritable", _plot("{bad_runs}", UNWRITABLE), ["--output_dir", "not writable"],
         out=UNWRITABLE),
    # 7. plot_tradeoff.py on results files of the wrong JSON shape
    Case("plot-json-list", _plot("{runs_list}"), ["runs_list/static_w1.0_d1.0_b32/inference_results.json", "list"]),
    Case("plot-json-no-results", _plot("{runs_no_results}"), ["inference_results.json", "results"]),
    Case("plot-json-score-string", _plot("{runs_score_str}"), ["inference_results.json", "results.acc"]),
    Case("plot-json-unknown-task", _plot("{runs_unknown_task}"), ["inference_results.json", "FOO"]),
    Case("plot-json-batch-string", _plot("{runs_batch_str}"), ["inference_results.json", "batch_size"]),
    Case("plot-json-results-list", _plot("{runs_results_list}"), ["inference_results.json", "results"]),
]


@dataclass
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    before: dict | None
    after: dict | None
    seconds: float


def _expand(text: str, world: dict[str, Path], out: Path) -> str:
    return text.format(out=out, **{k: str(v) for k, v in world.items()})


# A Python entry point costs ~5 s of imports (torch, transformers, scipy) per process, too slow for dozens of
# cases on 2 cores. So the cases run inside the test process, as the real process runs them: the script file
# is executed as `__main__` with the case's argv and environment (its run_cli turns failures into the one-line
# contract and an exit status) and stdout/stderr captured. The cases marked `process` run as real processes,
# one per entry point, to prove what the process itself prints and returns; so do the shell scripts.
# RELIABILITY_FRESH=1 runs every case as a fresh `python script.py`.
def _prepare(case: Case, world: dict[str, Path]) -> tuple[list[str], dict[str, str], Path]:
    """(argv, env, watched folder) of a case; creates its output folder when the case wants one."""
    out = Path(_expand(case.out, world, world["outs"])) if case.out else world["outs"] / case.id
    if case.out_exists:
        out.mkdir()
    cmd = [_expand(c, world, out) for c in case.cmd]
    env = _env(world, PYTHON=PY, **{k: _expand(v, world, out) for k, v in case.env.items()})
    argv = ["bash", str(ROOT / cmd[0]), *cmd[1:]] if cmd[0].endswith(".sh") else [PY, str(ROOT / cmd[0]), *cmd[1:]]
    return argv, env, out


def _run_fresh(argv: list[str], env: dict[str, str], fsize: int | None = None) -> tuple[int, str, str, float]:
    """A fresh process; with `fsize`, files cannot grow past that many bytes (writes fail with EFBIG, as on a
    full disk; SIGXFSZ is ignored so that the write fails instead of killing the process)."""

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    start = time.time()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT,
                          preexec_fn=limit_file_size if fsize else None)
    return proc.returncode, proc.stdout, proc.stderr, time.time() - start


@pytest.fixture(scope="module")
def outcomes(world) -> dict[str, Outcome]:
    inputs_before = _snapshot(world["in"])
    prepared = {c.id: _prepare(c, world) for c in CASES}
    before = {i: _snapshot(watched) for i, (_, _, watched) in prepared.items()}
    fresh = os.environ.get("RELIABILITY_FRESH") == "1"
    limits = {c.id: c.fsize for c in CASES}
    in_process = {c.id for c in CASES if not (fresh or c.process or c.cmd[0].endswith(".sh"))}
    with ThreadPoolExecutor(max_workers=2) as pool:  # the real processes run beside the in-process cases
        others = {i: pool.submit(_run_fresh, argv, env, limits[i]) for i, (argv, env, _) in prepared.items()
                  if i not in in_process}
        ran = {i: run_in_process(argv, env, limits[i]) for i, (argv, env, _) in prepared.items() if i in in_process}
        ran.update({i: f.result() for i, f in others.items()})
    results = {i: Outcome(*ran[i][:3], before[i], _snapshot(prepared[i][2]), ran[i][3]) for i in prepared}
    results["__inputs__"] = (inputs_before, _snapshot(world["in"]))
    return results


def _problems(case: Case, o: Outcome) -> list[str]:
    problems = []
    if o.returncode != case.code:
        problems.append(f"exit status {o.returncode}, not {case.code}")
    if "Traceback" in o.stderr:
        problems.append("traceback on stderr")
    lines = [line for line in o.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    if len(errors) != 1:
        problems.append(f"{len(errors)} 'error:' lines on stderr")
    elif errors[0] != lines[-1]:
        problems.append("the error line is not the last line of stderr")
    elif not case.cmd[0].endswith(".sh") and not case.logs and len(lines) != 1:
        problems.append(f"{len(lines) - 1} other lines on stderr")
    else:
        missing = [s for s in case.expect if s.lower() not in errors[0].lower()]
        if missing:
            problems.append(f"error line does not name {missing}")
    if o.before != o.after:
        problems.append(f"output folder changed: {o.before} -> {o.after}")
    return problems


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, outcomes):
    o = outcomes[case.id]
    problems = _problems(case, o)
    assert not problems, f"{case.id}: {problems}\nstderr:\n{o.stderr[-3000:]}\nstdout:\n{o.stdout[-1500:]}"


def test_bad_input_table(outcomes):
    """The table's size and tally, and the inputs (model and data folders) left as they were."""
    assert len(CASES) >= 25
    scripts = {c.cmd[0] for c in CASES}
    assert scripts >= {"run_glue.py", "train_gate.py", "train_gate_new.py", "augment_data.py", "plot_tradeoff.py",
                       "run_glue.sh", "train_glue.sh", "gate_inference.sh"}
    real = {c.cmd[0] for c in CASES if c.process or c.cmd[0].endswith(".sh")}  # one line from the process itself
    assert real == scripts
    good = [c.id for c in CASES if not _problems(c, outcomes[c.id])]
    print(f"\nbad inputs: {len(CASES)} tried, {len(good)} answered correctly; "
          f"slowest {max(o.seconds for k, o in outcomes.items() if k != '__inputs__'):.1f}s")
    before, after = outcomes["__inputs__"]
    assert before == after, "a failing run changed its input folders"


# ---- an interrupt (Ctrl-C) -------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", ["run_glue.py", "train_gate.py", "train_gate_new.py", "export_subnet.py",
                                    "plot_tradeoff.py", "reproduce.py"])
def test_interrupt_is_one_line_and_exit_130(script, world, monkeypatch):
    """KeyboardInterrupt inside a script (here: while it parses its flags) ends it with `error: interrupted`
    and exit status 130, as a shell reports Ctrl-C; no traceback."""
    import cli

    def interrupted(self, args=None, namespace=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.ArgumentParser, "parse_known_args", interrupted)
    code, _, stderr, _ = run_in_process([PY, str(ROOT / script)], _env(world))
    assert (code, stderr) == (130, "error: interrupted\n")


def test_augment_data_interrupt_exit_130(world, tmp_path, monkeypatch, capsys):
    import augment_data

    def interrupted(model_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(augment_data, "load_model", interrupted)
    code = augment_data.main(["--task_name", "RTE", "--data_dir", str(world["rte"]), "--model_dir",
                              str(world["bert"]), "--output", str(tmp_path / "train_aug.tsv")])
    assert (code, capsys.readouterr().err.splitlines()[-1]) == (130, "error: interrupted")
    assert not (tmp_path / "train_aug.tsv").exists()


# ---- the in-place final fine-tuning still works -------------------------------------------------------------
def _argv(world, model_dir, output_dir, *extra: str, **flags) -> list[str]:
    options = {
        "task_name": "RTE", "data_dir": world["rte"], "model_dir": model_dir, "output_dir": output_dir,
        "cache_dir": world["cache"], "training_phase": "finetuning", "max_seq_length": 24,
        "per_gpu_train_batch_size": 8, "per_gpu_eval_batch_size": 16, "learning_rate": 1e-3,
        "num_train_epochs": 3, "logging_steps": 1, "num_threads": 1, "seed": 7,
    }
    options.update(flags)
    return cli_argv(options, *extra, switches=("--do_train", "--cpu"))


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_final_finetuning_in_place(world, tmp_path, one_thread):
    """The README's last stage writes back into its own --model_dir: not refused as 'another run'."""
    folder = tmp_path / "wd_bert"
    shutil.copytree(world["bert"], folder)
    (folder / "notes.txt").write_text("not ours\n")
    run_glue.main(_argv(world, folder, folder, training_phase="final_finetuning", width_mult_list="0.5,1.0",
                        depth_mult_list="0.5,1.0", num_train_epochs=1, max_train_samples=8, logging_steps=4))
    results = json.loads((folder / "eval_results.json").read_text())
    assert set(results["best"]) == {"d1_w1", "d1_w0.5", "d0.5_w1", "d0.5_w0.5"}
    FlexBertForSequenceClassification.from_pretrained(str(folder))


def test_interrupted_model_save_leaves_the_previous_folder(world, tmp_path, monkeypatch):
    """save_model writes into a folder that holds a model (in-place final fine-tuning): interrupted while it
    writes the weights, the folder keeps its previous files byte for byte; with the renaming into place
    failing after its first file (a full disk), the folder still loads, each file old or new, never torn."""
    from transformers import BertTokenizer

    from transformers_ext.errors import WriteError
    from transformers_ext.saving import save_model

    folder = tmp_path / "model"
    shutil.copytree(world["bert"], folder)
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    old = FlexBertForSequenceClassification.from_pretrained(str(folder)).state_dict()
    model = FlexBertForSequenceClassification.from_pretrained(str(folder))
    with torch.no_grad():
        for param in model.parameters():
            param.add_(1.0)
    new = {k: v.clone() for k, v in model.state_dict().items()}
    tokenizer = BertTokenizer.from_pretrained(str(folder))

    save_pretrained = FlexBertForSequenceClassification.save_pretrained

    def killed_while_writing_weights(self, directory, *args, **kwargs):
        save_pretrained(self, directory, *args, **kwargs)
        weights = Path(directory) / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])  # half written when the interrupt comes
        raise KeyboardInterrupt

    monkeypatch.setattr(FlexBertForSequenceClassification, "save_pretrained", killed_while_writing_weights)
    with pytest.raises(KeyboardInterrupt):
        save_model(model, tokenizer, folder)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files

    replace, renamed = os.replace, []

    def disk_full_after_one_file(src, dst, *args, **kwargs):
        if Path(dst).parent == folder:
            renamed.append(Path(dst).name)
            if len(renamed) == 2:
                raise OSError(28, "No space left on device", str(dst))
        return replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", disk_full_after_one_file)
    with pytest.raises(WriteError, match="No space left"):
        save_model(model, tokenizer, folder)
    monkeypatch.undo()
    assert len(renamed) == 2 and (folder / "config.json").read_bytes() == files["config.json"]  # config last
    assert not list(folder.glob(".saving-*"))
    loaded = FlexBertForSequenceClassification.from_pretrained(str(folder)).state_dict()
    assert all(torch.equal(loaded[k], old[k]) for k in old) or all(torch.equal(loaded[k], new[k]) for k in new)


# ---- resume equivalence and SIGKILL while saving -------------------------------------------------------------
# 32 examples, batch 8, 3 epochs: N = 12 updates; N/2 = 6 is in the middle of the second epoch. Dropout is on
# and the order is shuffled, so matching weights need the RNG states and the data order restored.
N_STEPS = 12


def _final_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(output_dir / f"checkpoint-{N_STEPS}" / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def reference(world, tmp_path_factory) -> Path:
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run_glue.main(_argv(world, world["bert"], out))
    torch.set_num_threads(threads)
    return out


class _Stop(Exception):
    pass


def test_same_seed_same_result(world, reference, tmp_path, one_thread):
    out = tmp_path / "again"
    run_glue.main(_argv(world, world["bert"], out))
    assert _max_diff(_final_weights(reference), _final_weights(out)) == 0.0
    history = json.loads((reference / "eval_results.json").read_text())["history"]
    assert json.loads((out / "eval_results.json").read_text())["history"] == history


def test_resume_from_half_way_matches_uninterrupted(world, reference, tmp_path, monkeypatch, one_thread):
    out = tmp_path / "resumed"
    save = run_glue.save_checkpoint

    def save_then_stop(output_dir, model, tokenizer, state):
        save(output_dir, model, tokenizer, state)
        if state["global_step"] == N_STEPS // 2:
            raise _Stop  # the process "dies" right after its checkpoint at N/2

    monkeypatch.setattr(run_glue, "save_checkpoint", save_then_stop)
    with pytest.raises(_Stop):
        run_glue.main(_argv(world, world["bert"], out))
    monkeypatch.undo()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{N_STEPS // 2}"]
    state = torch.load(out / f"checkpoint-{N_STEPS // 2}" / "training_state.pt", weights_only=False)
    assert (state["global_step"], state["epoch"], state["batch_in_epoch"]) == (N_STEPS // 2, 1, 2)

    run_glue.main(_argv(world, world["bert"], out, "--resume_from_checkpoint"))
    diff = _max_diff(_final_weights(reference), _final_weights(out))
    print(f"\nresume at step {N_STEPS // 2} of {N_STEPS}: max |weight difference| = {diff:.3g}")
    assert diff == 0.0
    ref, res = (json.loads((p / "eval_results.json").read_text()) for p in (reference, out))
    assert (res["best_step"], res["best_score_sum"]) == (ref["best_step"], ref["best_score_sum"])
    assert [h["step"] for h in res["history"]] == list(range(1, N_STEPS + 1))
    assert res["history"] == ref["history"]
    # the best model (saved in the folder itself) is the uninterrupted run's best model too
    assert _max_diff(load_file(str(reference / "model.safetensors")), load_file(str(out / "model.safetensors"))) \
        == 0.0


# The run stops itself (SIGSTOP) where the test wants to kill it, and the test SIGKILLs it there: the kill
# lands exactly at that point, without polling the folder.
STOPPING_LAUNCHER = """\
import os, signal, sys
sys.path.insert(0, {root!r})
from transformers_ext import checkpoints
import {script} as script
{patch}
script.run_cli(script.main)
"""
STOP_WHILE_WRITING_CHECKPOINT_4 = """\
write = checkpoints.write_model_folder
def write_then_stop(model, tokenizer, folder, *args, **kwargs):
    write(model, tokenizer, folder, *args, **kwargs)  # the model is written, its training state not yet
    if folder.name.startswith(".tmp-checkpoint-") and int(folder.name.rsplit("-", 1)[1]) >= 4:
        os.kill(os.getpid(), signal.SIGSTOP)
checkpoints.write_model_folder = write_then_stop
"""
STOP_AFTER_FIRST_CHECKPOINT = """\
from transformers_ext import gate_training
save = gate_training.save_checkpoint
def save_then_stop(*args, **kwargs):
    save(*args, **kwargs)
    os.kill(os.getpid(), signal.SIGSTOP)
gate_training.save_checkpoint = save_then_stop
"""


def _kill_where_it_stops(script: str, patch: str, argv: list, world, tmp_path: Path) -> str:
    """Run `script` with `patch` applied and SIGKILL it when it stops itself; its stderr. Fails the test if
    the run ended without stopping."""
    launcher = tmp_path / f"stopping_{script}.py"
    launcher.write_text(STOPPING_LAUNCHER.format(root=str(ROOT), script=script, patch=patch))
    log = tmp_path / f"{script}.stderr"
    with open(log, "w") as stderr:
        proc = subprocess.Popen([PY, str(launcher), *map(str, argv)], cwd=ROOT, env=_env(world),
                                stdout=subprocess.DEVNULL, stderr=stderr)
        guard = threading.Timer(TIMEOUT, proc.kill)
        guard.start()
        try:
            _, status = os.waitpid(proc.pid, os.WUNTRACED)
        finally:
            proc.kill()
            proc.wait()
            guard.cancel()
    assert os.WIFSTOPPED(status), f"the run ended before it stopped:\n{log.read_text()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    return log.read_text()


def test_sigkill_while_saving_leaves_a_loadable_folder(world, reference, tmp_path, one_thread):
    """SIGKILL the run while it writes a checkpoint (step >= 4, its model written, not its training state); the
    folder still loads, the latest complete checkpoint resumes, and the resumed run ends with the
    uninterrupted run's weights."""
    out = tmp_path / "killed"
    _kill_where_it_stops("run_glue", STOP_WHILE_WRITING_CHECKPOINT_4, _argv(world, world["bert"], out), world,
                         tmp_path)
    saving = [p.name for p in out.iterdir() if p.name.startswith(".tmp-checkpoint-")]
    assert len(saving) == 1 and int(saving[0].rsplit("-", 1)[1]) >= 4, saving  # the half-written checkpoint
    killed_at = saving[0]

    # The folder itself: a loadable model and a parsable results file.
    FlexBertForSequenceClassification.from_pretrained(str(out))
    json.loads((out / "eval_results.json").read_text())
    json.loads((out / "training_args.json").read_text())
    for cached in world["cache"].glob("*.pt"):  # cached features: complete or absent
        torch.load(cached, weights_only=True)
    # The latest complete checkpoint (never a torn one) loads and resumes.
    checkpoints = sorted(out.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert checkpoints, "no complete checkpoint survived"
    latest = checkpoints[-1]
    for name in ("config.json", "model.safetensors", "vocab.txt", "training_state.pt"):
        assert (latest / name).is_file(), f"{latest.name} lacks {name}"
    FlexBertForSequenceClassification.from_pretrained(str(latest))
    state = torch.load(latest / "training_state.pt", weights_only=False)
    assert state["global_step"] == int(latest.name.split("-")[1]) >= 3
    assert not (out / killed_at / "training_state.pt").exists()  # left half-written, under its temporary name
    print(f"\nSIGKILL while writing {killed_at}: latest complete {latest.name} loads")

    run_glue.main(_argv(world, world["bert"], out, "--resume_from_checkpoint"))
    diff = _max_diff(_final_weights(reference), _final_weights(out))
    print(f"resumed after SIGKILL: max |weight difference| = {diff:.3g}")
    assert diff == 0.0
    assert json.loads((out / "eval_results.json").read_text())["history"] == \
        json.loads((reference / "eval_results.json").read_text())["history"]


# ---- numerical faults ------------------------------------------------------------------------------------------
def test_non_finite_loss_stops_the_run(world, tmp_path):
    out = tmp_path / "nan"
    argv = [PY, str(ROOT / "run_glue.py"), *map(str, _argv(world, world["bert"], out, learning_rate=1e30))]
    code, _, stderr, _ = run_in_process(argv, _env(world))  # `python run_glue.py ...` in this process
    assert code != 0
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "non-finite loss" in errors[0], stderr[-2000:]
    assert "at step 1 " in errors[0] and "d1_w1" in errors[0]
    # nothing saved: no model, no checkpoint, no results
    saved = [p.name for p in out.iterdir()] if out.exists() else []
    assert not [n for n in saved if n != "runs"], saved


# ---- gate training: SIGKILL, then an identical rerun or a resume (issue 19, class 6) ----------------------------
# 32 examples, batch 8, 6 epochs: 24 gate updates, an evaluation and a checkpoint every 2.
GATE_STEPS = 24


def _gate_argv(world, output_dir, *extra: str) -> list[str]:
    options = {
        "task_name": "RTE", "data_dir": world["rte"], "model_dir": world["bert"], "output_dir": output_dir,
        "cache_dir": world["cache"], "training_phase": "traingate", "max_seq_length": 24,
        "per_gpu_train_batch_size": 8, "per_gpu_eval_batch_size": 16, "learning_rate": 1e-3,
        "num_train_epochs": 6, "logging_steps": 2, "num_threads": 1, "seed": 7,
        "width_mult_list": "0.5,1.0", "gate_setting": "0.5,1.0",
    }
    return cli_argv(options, *extra, switches=("--do_train", "--cpu"))


def _gates(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if k.startswith("gates.")}


def _gate_history(folder: Path) -> list:
    return json.loads((folder / "gate_results.json").read_text())["history"]


def test_gate_training_sigkill_then_rerun_or_resume(world, tmp_path, one_thread):
    """Gate training SIGKILLed after a checkpoint: the identical command runs again (the folder is its own
    run's, not "another run"), and with --resume_from_checkpoint it ends bit-identical to an uninterrupted
    run (gates, best gates, history). A folder killed before its first evaluation (only runs/ and a
    half-written save) is rerun too."""
    import train_gate

    reference = tmp_path / "reference"
    train_gate.main(_gate_argv(world, reference))
    assert len(_gate_history(reference)) == GATE_STEPS // 2

    killed = tmp_path / "killed"
    _kill_where_it_stops("train_gate", STOP_AFTER_FIRST_CHECKPOINT, _gate_argv(world, killed), world, tmp_path)
    done = [p.name for p in killed.glob("checkpoint-*") if (p / "training_state.pt").is_file()]
    assert len(done) == 1, done
    killed_after = done[0]
    step = int(killed_after.split("-")[1])
    assert step < GATE_STEPS
    print(f"\ngate training SIGKILLed after {killed_after} of {GATE_STEPS} steps")
    resumed = tmp_path / "resumed"
    shutil.copytree(killed, resumed, symlinks=True)

    train_gate.main(_gate_argv(world, killed))  # the identical command: starts over and replaces the run
    assert _gate_history(killed) == _gate_history(reference)
    for name in ("", f"checkpoint-{GATE_STEPS}"):
        assert _max_diff(_gates(reference / name), _gates(killed / name)) == 0.0

    train_gate.main(_gate_argv(world, resumed, "--resume_from_checkpoint"))
    assert _gate_history(resumed) == _gate_history(reference)
    for name in ("", f"checkpoint-{GATE_STEPS}"):  # the best gates and the last ones
        assert _max_diff(_gates(reference / name), _gates(resumed / name)) == 0.0
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == [f"checkpoint-{GATE_STEPS}"]

    early = tmp_path / "early"  # killed before its first evaluation: TensorBoard's folder and a torn save
    (early / "runs").mkdir(parents=True)
    (early / ".saving-x1y2").mkdir()
    (early / ".saving-x1y2" / "model.safetensors").write_bytes(b"torn")
    train_gate.main(_gate_argv(world, early, "--num_train_epochs", "1"))
    assert len(_gate_history(early)) == 2
    FlexBertForSequenceClassification.from_pretrained(str(early))


def test_every_numeric_flag_declares_a_range(monkeypatch):
    """No flag of run_glue.py or train_gate.py is a bare int or float: each has a `bounded` type (its range
    shows in --help and argparse enforces it), or a list type that checks its items."""
    import cli
    import train_gate

    class Captured(Exception):
        pass

    parsers = []

    def capture(self, argv=None):
        parsers.append(self)
        raise Captured

    monkeypatch.setattr(cli.ArgumentParser, "parse_args", capture)
    for module in (run_glue, train_gate):
        with pytest.raises(Captured):
            module.parse_args([])
    bare = [f"{parser.prog} {action.option_strings[0]}" for parser in parsers for action in parser._actions
            if action.type in (int, float)]
    assert not bare, f"numeric flags without a declared range: {bare}"
    ranged = [a for p in parsers for a in p._actions if isinstance(a.type, cli.bounded)]
    assert len(ranged) >= 30
    for action in ranged:  # the range is in the help text
        assert action.type.range_text in cli.HelpFormatter("x")._get_help_string(action)
