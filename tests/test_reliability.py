"""Reliability (issue 9): bad input gives one clear `error:` line, a non-zero exit, no traceback and no new or
changed files; checkpoints are never torn (a run SIGKILLed while it saves still loads); a killed run resumed from
its checkpoint ends with the weights of an uninterrupted run; a non-finite loss stops the run naming the step.

Every entry point runs as a subprocess on a tiny random BERT (h32, L4, H4, I64, 64 positions) and a synthetic
RTE folder; the Python bad-input cases are forked from a launcher that imports torch/transformers once (see
LAUNCHER; RELIABILITY_FRESH=1 starts a fresh interpreter per case instead)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import cli_argv, save_model_folder
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
    return w


def _snapshot(path: Path) -> dict | None:
    """Every file and folder below `path` with size and mtime (None when `path` does not exist)."""
    if not path.exists():
        return None
    snap = {".": (path.is_dir(), path.stat().st_size if path.is_file() else 0, path.stat().st_mtime_ns)}
    if path.is_dir():
        for p in sorted(path.rglob("*")):
            st = p.stat()
            snap[str(p.relative_to(path))] = (p.is_dir(), st.st_size if p.is_file() else 0, st.st_mtime_ns)
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
         ["bad_config.json", "json"]),
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
    Case("glue-not-a-flag", _glue("--widht_mult_list", "0.5"), ["unrecognized", "--widht_mult_list"]),
    # -- the pipeline scripts forward their extra flags
    Case("sh-run-glue-width", ["run_glue.sh", "--width_mult_list", "0,1"], ["width_mult_list", "(0, 1]"],
         env=SH_ENV),
    Case("sh-train-glue-gate-setting", ["train_glue.sh", "--gate_setting", "0.5,1.0"],
         ["gate_setting", "width_mult_list"], env={**SH_ENV, "WD_BERT": "{bert}"}),
    Case("sh-gate-inference-modes", ["gate_inference.sh", "--w_dynamic"], ["conflicting modes"],
         env={**SH_ENV, "MODEL": "{bert}", "BATCH_SIZES": "8"}),
    Case("sh-gate-inference-no-gates", ["gate_inference.sh", "--fixed_gate", "0.0001"], ["fixed_gate"],
         env={**SH_ENV, "MODEL": "{bert}", "BATCH_SIZES": "8"}),
    # -- augment_data.py and plot_tradeoff.py
    Case("augment-unknown-task", _augment(task="NOPE"), ["unknown task", "NOPE"], out_exists=True),
    Case("augment-missing-data-dir", _augment(data="{in}/no_such_dir"), ["no_such_dir"], out_exists=True),
    Case("augment-bad-label", _augment(data="{bad_label}"), ["train.tsv:7", "maybe"], out_exists=True),
    Case("augment-non-utf8", _augment(data="{latin1}"), ["train.tsv:5", "utf-8"], out_exists=True),
    Case("augment-not-bert", _augment(model="{gpt2}"), ["gpt2"], out_exists=True),
    Case("augment-p-range", _augment("--p", "1.5"), ["--p"], out_exists=True),
    Case("plot-missing-dir", ["plot_tradeoff.py", "--inference_dir", "{in}/nothing", "--output_dir", "{out}"],
         ["inference_dir", "nothing"]),
    Case("plot-corrupt-json", ["plot_tradeoff.py", "--inference_dir", "{bad_runs}", "--output_dir", "{out}"],
         ["inference_results.json"]),
    Case("plot-no-results", ["plot_tradeoff.py", "--inference_dir", "{empty_dir}", "--output_dir", "{out}"],
         ["no */inference_results.json"]),
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
# cases on 2 cores. So a launcher process (sys.executable, repo root as cwd, the test's environment) imports
# them once and forks one child per case; the child runs the script file as `__main__` with the case's argv,
# its stdout/stderr going to files, and exits with the script's status (an uncaught exception prints its
# traceback and exits 1, as Python does). RELIABILITY_FRESH=1 runs every case as a fresh `python script.py`.
LAUNCHER = r"""
import json, os, runpy, sys, time, traceback
import torch, transformers, tensorboardX, utils_glue, transformers_ext.trainer, run_glue, train_gate  # noqa
jobs, parallel = json.loads(sys.stdin.read()), int(sys.argv[1])
running, done = {}, {}
def start(job):
    pid = os.fork()
    if pid:
        running[pid] = (job["id"], time.time())
        return
    code = 1
    try:
        for fd, name in ((1, job["stdout"]), (2, job["stderr"])):
            os.dup2(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = job["argv"]
        sys.path[0] = os.path.dirname(job["argv"][0])
        runpy.run_path(job["argv"][0], run_name="__main__")
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
        if not isinstance(exit.code, int | None):
            print(exit.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
queue = list(jobs)
while queue or running:
    while queue and len(running) < parallel:
        start(queue.pop(0))
    pid, status = os.wait()
    name, t0 = running.pop(pid)
    done[name] = {"rc": os.waitstatus_to_exitcode(status), "seconds": time.time() - t0}
print(json.dumps(done))
"""


def _prepare(case: Case, world: dict[str, Path]) -> tuple[list[str], dict[str, str], Path]:
    """(argv, env, watched folder) of a case; creates its output folder when the case wants one."""
    out = Path(_expand(case.out, world, world["outs"])) if case.out else world["outs"] / case.id
    if case.out_exists:
        out.mkdir()
    cmd = [_expand(c, world, out) for c in case.cmd]
    env = _env(world, PYTHON=PY, **{k: _expand(v, world, out) for k, v in case.env.items()})
    argv = ["bash", str(ROOT / cmd[0]), *cmd[1:]] if cmd[0].endswith(".sh") else [PY, str(ROOT / cmd[0]), *cmd[1:]]
    return argv, env, out


def _run_fresh(argv: list[str], env: dict[str, str]) -> tuple[int, str, str, float]:
    start = time.time()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    return proc.returncode, proc.stdout, proc.stderr, time.time() - start


def _run_forked(jobs: dict[str, list[str]], world: dict[str, Path], logs: Path) -> dict[str, tuple]:
    """Python cases through the launcher: {id: (returncode, stdout, stderr, seconds)}."""
    logs.mkdir()
    payload = [{"id": i, "argv": argv[1:], "stdout": str(logs / f"{i}.out"), "stderr": str(logs / f"{i}.err")}
               for i, argv in jobs.items()]
    proc = subprocess.run([PY, "-c", LAUNCHER, "2"], input=json.dumps(payload), cwd=ROOT, env=_env(world),
                          capture_output=True, text=True, timeout=TIMEOUT + 5 * len(jobs))
    assert proc.returncode == 0, proc.stderr[-3000:]
    done = json.loads(proc.stdout.strip().splitlines()[-1])
    return {i: (done[i]["rc"], (logs / f"{i}.out").read_text(errors="replace"),
                (logs / f"{i}.err").read_text(errors="replace"), done[i]["seconds"]) for i in jobs}


@pytest.fixture(scope="module")
def outcomes(world) -> dict[str, Outcome]:
    inputs_before = _snapshot(world["in"])
    prepared = {c.id: _prepare(c, world) for c in CASES}
    before = {i: _snapshot(watched) for i, (_, _, watched) in prepared.items()}
    fresh = os.environ.get("RELIABILITY_FRESH") == "1"
    python_jobs = {i: argv for i, (argv, _, _) in prepared.items() if argv[0] == PY and not fresh}
    with ThreadPoolExecutor(max_workers=2 if fresh else 1) as pool:
        others = {i: pool.submit(_run_fresh, argv, env) for i, (argv, env, _) in prepared.items()
                  if i not in python_jobs}
        ran = _run_forked(python_jobs, world, world["root"] / "logs") if python_jobs else {}
        ran.update({i: f.result() for i, f in others.items()})
    results = {i: Outcome(*ran[i][:3], before[i], _snapshot(prepared[i][2]), ran[i][3]) for i in prepared}
    results["__inputs__"] = (inputs_before, _snapshot(world["in"]))
    return results


def _problems(case: Case, o: Outcome) -> list[str]:
    problems = []
    if o.returncode == 0:
        problems.append("exit status 0")
    if "Traceback" in o.stderr:
        problems.append("traceback on stderr")
    lines = [line for line in o.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    if len(errors) != 1:
        problems.append(f"{len(errors)} 'error:' lines on stderr")
    elif errors[0] != lines[-1]:
        problems.append("the error line is not the last line of stderr")
    elif not case.cmd[0].endswith(".sh") and len(lines) != 1:
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
    good = [c.id for c in CASES if not _problems(c, outcomes[c.id])]
    print(f"\nbad inputs: {len(CASES)} tried, {len(good)} answered correctly; "
          f"slowest {max(o.seconds for k, o in outcomes.items() if k != '__inputs__'):.1f}s")
    before, after = outcomes["__inputs__"]
    assert before == after, "a failing run changed its input folders"


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
    assert diff <= 1e-6
    ref, res = (json.loads((p / "eval_results.json").read_text()) for p in (reference, out))
    assert (res["best_step"], res["best_score_sum"]) == (ref["best_step"], ref["best_score_sum"])
    assert [h["step"] for h in res["history"]] == list(range(1, N_STEPS + 1))
    assert res["history"] == ref["history"]
    # the best model (saved in the folder itself) is the uninterrupted run's best model too
    assert _max_diff(load_file(str(reference / "model.safetensors")), load_file(str(out / "model.safetensors"))) \
        <= 1e-6


def test_sigkill_while_saving_leaves_a_loadable_folder(world, reference, tmp_path, one_thread):
    """SIGKILL the run the moment a checkpoint (step >= 4) is being written; the folder still loads, the latest
    complete checkpoint resumes, and the resumed run ends with the uninterrupted run's weights."""
    out = tmp_path / "killed"
    argv = [PY, str(ROOT / "run_glue.py"), *map(str, _argv(world, world["bert"], out))]
    proc = subprocess.Popen(argv, cwd=ROOT, env=_env(world), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_at = None
    deadline = time.time() + TIMEOUT
    try:
        while proc.poll() is None and time.time() < deadline:
            if out.is_dir():
                saving = [p.name for p in out.iterdir() if p.name.startswith(".tmp-checkpoint-")
                          and int(p.name.rsplit("-", 1)[1]) >= 4]
                if saving:
                    proc.send_signal(signal.SIGKILL)
                    killed_at = saving[0]
                    break
            time.sleep(0.0005)
    finally:
        proc.kill()
        stderr = proc.communicate()[1].decode(errors="replace")
    assert killed_at is not None, f"the run ended before it could be killed while saving:\n{stderr[-2000:]}"
    assert proc.returncode == -signal.SIGKILL

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
    torn = (out / killed_at).exists()  # the half-written folder is left under its temporary name
    print(f"\nSIGKILL while writing {killed_at} (left half-written: {torn}): latest complete {latest.name} loads")

    run_glue.main(_argv(world, world["bert"], out, "--resume_from_checkpoint"))
    diff = _max_diff(_final_weights(reference), _final_weights(out))
    print(f"resumed after SIGKILL: max |weight difference| = {diff:.3g}")
    assert diff <= 1e-6
    assert json.loads((out / "eval_results.json").read_text())["history"] == \
        json.loads((reference / "eval_results.json").read_text())["history"]


# ---- numerical faults ------------------------------------------------------------------------------------------
def test_non_finite_loss_stops_the_run(world, tmp_path):
    out = tmp_path / "nan"
    argv = [PY, str(ROOT / "run_glue.py"), *map(str, _argv(world, world["bert"], out, learning_rate=1e30))]
    proc = subprocess.run(argv, cwd=ROOT, env=_env(world), capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "non-finite loss" in errors[0], proc.stderr[-2000:]
    assert "at step 1 " in errors[0] and "d1_w1" in errors[0]
    # nothing saved: no model, no checkpoint, no results
    saved = [p.name for p in out.iterdir()] if out.exists() else []
    assert not [n for n in saved if n != "runs"], saved
