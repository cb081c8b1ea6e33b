"""torchrun on gloo (2 processes): prediction alone ends, each process predicting a share; head/neuron
importance, gate inputs and every evaluation (subnets, routed settings, gate validation) are computed in
shares and gathered, so they equal one process's and replicas whose own importance scores would differ
still rewire and graft identically."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from test_run_glue import MAX_LEN, ROOT, _argv, _free_port, make_env

import run_glue
from transformers_ext import compute_importance
from transformers_ext.evaluation import (
    EvaluationOptions,
    Timing,
    evaluate_routed,
    evaluate_static_depths,
    evaluate_subnets,
)
from transformers_ext.gate_training import GateInputs, GateTrainingConfig, validate_gates
from transformers_ext.loading import load_model
from transformers_ext.routing import RoutingSetting
from utils_glue import compute_metrics, get_task, importance_batches, load_dataset


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    return make_env(tmp_path_factory.mktemp("distributed"))


def _torchrun(launcher: Path, argv: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    """2 processes; on a timeout the whole process group (launcher and workers) is killed, then re-raised."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(launcher), *argv]
    proc_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with subprocess.Popen(cmd, cwd=ROOT, env=proc_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_torchrun_predict_only_ends(env, tmp_path):
    """--do_predict without --do_train: each process predicts every other batch of 2 (7 examples: the last
    round has one batch for two processes), rank 0 writes the predictions, every process exits, and the files
    equal one process's (the per-example records too)."""
    rows = [f"{i}\tthe cat sat .\tthe {'dog did not run' if i % 2 else 'cat ran'} ." for i in range(7)]
    (env["data"] / "test.tsv").write_text("index\tsentence1\tsentence2\n" + "\n".join(rows) + "\n",
                                          encoding="utf-8")
    argv = [a for a in _argv(env, env["bert"], tmp_path / "predict", "finetuning", "--do_predict",
                             "--save_predictions", per_gpu_eval_batch_size=2) if a != "--do_train"]
    try:
        proc = _torchrun(ROOT / "run_glue.py", argv, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("torchrun run_glue.py --do_predict hung")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = (tmp_path / "predict" / "predict_results_rte.txt").read_text().splitlines()
    assert lines[0] == "index\tprediction" and [line.split("\t")[0] for line in lines[1:]] == list("0123456")
    threads = torch.get_num_threads()
    try:
        run_glue.main([a if a != str(tmp_path / "predict") else str(tmp_path / "alone") for a in argv])
    finally:
        torch.set_num_threads(threads)
    for name in ("predict_results_rte.txt", "predictions_test.jsonl"):
        assert (tmp_path / "predict" / name).read_text() == (tmp_path / "alone" / name).read_text(), name


PERTURBED_RANK_LAUNCHER = """\
import os, sys
sys.path.insert(0, {root!r})
import torch
import torch.distributed as dist
import run_glue
from transformers_ext import rewiring

from transformers_ext import evaluation

fit, map_shared, evaluation_share = run_glue.fit, rewiring.map_shared, evaluation.map_shared_objects
scored, evaluated = [], []


def counted_evaluation_share(items, compute, rank, world):
    def counted(batch):
        evaluated.append(1)
        return compute(batch)
    return evaluation_share(items, counted, rank, world)


def perturbed_map_shared(items, compute, placeholder, rank, world):
    def perturbed(batch):  # this rank's scores of its own batches
        heads, neurons = compute(batch)
        scored.append(1)
        if os.environ["RANK"] == "1":  # differ: had each rank summed its own, the replicas would part
            heads, neurons = heads.flip(-1) + 1e-3, neurons.flip(-1) + 1e-3
        return heads, neurons
    return map_shared(items, perturbed, placeholder, rank, world)


def checked_fit(**kwargs):
    state = fit(**kwargs)
    flat = torch.cat([p.detach().reshape(-1) for _, p in kwargs["params"]])
    copies = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, flat)
    if dist.get_rank() == 0:
        with open({report!r}, "w") as f:
            f.write(str(all(torch.equal(copies[0], c) for c in copies[1:])))
    with open({report!r} + "." + os.environ["RANK"], "w") as f:
        f.write(str(len(scored)))
    with open({report!r} + ".eval." + os.environ["RANK"], "w") as f:
        f.write(str(len(evaluated)))
    return state


rewiring.map_shared, run_glue.fit, evaluation.map_shared_objects = (perturbed_map_shared, checked_fit,
                                                                   counted_evaluation_share)
run_glue.run_cli(run_glue.main)
"""


def test_torchrun_replicas_stay_identical_after_rewiring_and_grafting(env, tmp_path):
    """Each rank scores half of the importance batches, and rank 1's scores are off; the replicas' weights
    are still bit-identical at the end of a width stage that rewires and grafts, because every rank sums
    the same gathered scores."""
    report = tmp_path / "identical.txt"
    launcher = tmp_path / "launch.py"
    launcher.write_text(PERTURBED_RANK_LAUNCHER.format(root=str(ROOT), report=str(report)))
    # 32 training examples in importance batches of 5: 7 batches, the last round with one batch for two ranks
    argv = _argv(env, env["bert"], tmp_path / "width", "dynabertw", "--graft_during_training",
                 per_gpu_train_batch_size=2, per_gpu_eval_batch_size=5, num_train_epochs=2, logging_steps=0,
                 width_mult_list="0.5,1.0")
    proc = _torchrun(launcher, argv)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # grafts on the global batch (2 x 2): 32 / 4 = 8 updates per epoch, a graft every 2 up to update 8
    assert "grafting every 2 updates until update 8" in proc.stderr
    grafts = proc.stderr.count("grafted at step")
    assert grafts == 4
    assert report.read_text() == "True"
    # the rewiring and every graft scored 7 batches: rank 0 the 1st, 3rd, 5th and 7th, rank 1 the others
    assert [Path(f"{report}.{rank}").read_text() for rank in (0, 1)] == [str(4 * (1 + grafts)), str(3 * (1 + grafts))]
    # the one evaluation (at the end) ran its 16 dev examples in batches of 5 at 2 widths: rank 0 ran the 1st
    # and 3rd batch of each width, rank 1 the 2nd and 4th
    assert [Path(f"{report}.eval.{rank}").read_text() for rank in (0, 1)] == ["4", "4"]
    assert json.loads((tmp_path / "width" / "eval_results.json").read_text())["phase"] == "dynabertw"


SHARED_WORK_LAUNCHER = """\
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import torch
import torch.distributed as dist
import test_distributed
from transformers_ext.environment import setup_device

device, rank, world = setup_device(cpu=True)
result = getattr(test_distributed, {work!r})({bert!r}, {data!r}, {cache!r}, rank, world)
if rank == 0:
    torch.save(result, {result!r})
dist.destroy_process_group()
"""


def _two_processes_and_one(env, tmp_path: Path, work: Callable[..., dict]) -> tuple[dict, dict]:
    """(rank 0's result, one process's) of `work(bert, data, cache, rank, world)`: under 2-process torchrun,
    and in this process alone with one thread, as torchrun's processes (OMP_NUM_THREADS=1)."""
    result = tmp_path / f"{work.__name__}.pt"
    launcher = tmp_path / f"launch_{work.__name__}.py"
    launcher.write_text(SHARED_WORK_LAUNCHER.format(
        root=str(ROOT), tests=str(Path(__file__).parent), work=work.__name__, bert=str(env["bert"]),
        data=str(env["data"]), cache=str(env["cache"]), result=str(result)))
    proc = _torchrun(launcher, [])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.load(result, weights_only=True), work(str(env["bert"]), str(env["data"]), str(env["cache"]))
    finally:
        torch.set_num_threads(threads)


def importance_and_gate_inputs(bert: str, data: str, cache: str, rank: int = 0, world: int = 1
                               ) -> dict[str, torch.Tensor]:
    """Head/neuron importance over the 32 training examples (7 batches of 5) and the gate inputs and targets
    of the same examples (7 batches, the last of 2), computed by this process's share under torchrun."""
    torch.manual_seed(0)
    model, tokenizer = load_model(bert, get_task("RTE"))
    dataset = load_dataset("RTE", data, "train", tokenizer, MAX_LEN, cache_dir=cache)
    heads, neurons = compute_importance(model, importance_batches(dataset, 5, None, False), rank=rank, world=world)
    config = GateTrainingConfig(task="RTE", gate_setting=[0.25, 0.5, 1.0], eval_batch_size=5)
    model.add_gates(config.gate_setting, model.config.num_hidden_layers)
    model.eval()
    inputs = GateInputs(model, dataset, config, torch.device("cpu"), rank=rank, world=world)
    return {"heads": heads, "neurons": neurons, "states": inputs.states, "correct": inputs.correct,
            "targets": inputs.targets}


def test_torchrun_importance_and_gate_inputs_equal_one_process(env, tmp_path):
    """Under 2-process torchrun each rank computes half of the batches of head/neuron importance and of the
    gate inputs; every rank gathers all of them and combines them in one process's order. The results equal
    one process's: the gate targets exactly, the float results within 1e-6 relative (measured: bit-identical;
    only a kernel that rounds otherwise with torchrun's one thread per process could differ)."""
    shared, alone = _two_processes_and_one(env, tmp_path, importance_and_gate_inputs)
    assert alone["heads"].abs().sum() > 0 and alone["states"].shape == (3, 4, 32, alone["states"].shape[-1])
    for name in ("heads", "neurons", "states"):
        diff = float((shared[name] - alone[name]).abs().max())
        print(f"{name}: max |2 processes - 1 process| = {diff:.3g}")
        torch.testing.assert_close(shared[name], alone[name], rtol=1e-6, atol=0)
    assert torch.equal(shared["correct"], alone["correct"]) and torch.equal(shared["targets"], alone["targets"])


LATENCY = ("latency_ms_per_batch", "latency_ms_per_example", "examples_per_second", "cpu_latency")


def evaluations(bert: str, data: str, cache: str, rank: int = 0, world: int = 1) -> dict:
    """On the 32 RTE training examples in batches of 5 (7 batches, the last round one batch for two processes):
    run_glue's subnet evaluation (2 widths x 2 depths), routed evaluation of a gated setting with early exit
    and of static depths from one pass (per-example records, latency taken out) and gate validation, each
    run by this process's share under torchrun."""
    torch.manual_seed(0)
    model, tokenizer = load_model(bert, get_task("RTE"))
    dataset = load_dataset("RTE", data, "train", tokenizer, MAX_LEN, cache_dir=cache)
    metrics = functools.partial(compute_metrics, "RTE")
    subnets = evaluate_subnets(model, metrics, {"dev": dataset}, [1.0, 0.5], [1.0, 0.5], 5, torch.device("cpu"),
                               rank=rank, world=world)
    config = GateTrainingConfig(task="RTE", gate_setting=[0.5, 1.0], eval_batch_size=5)
    model.add_gates(config.gate_setting, model.config.num_hidden_layers)
    model.eval()
    with torch.no_grad():  # the untrained head's predictions are near uniform (entropy 0.6931): a sharper one
        model.classifier.weight.mul_(100)  # gives entropies of 0.685-0.687, so that some examples exit early

    def records(split, start, logits, labels, out) -> list[dict]:
        return [{"index": start + i, "logits": row.tolist(), "exit": int(e)}
                for i, (row, e) in enumerate(zip(logits, out.exit_layer, strict=True))]

    options = EvaluationOptions(5, timing=Timing(record=True), scored=["dev"], reported=["dev"],
                                compute_metrics=metrics, example_records=records, rank=rank, world=world)
    gated = RoutingSetting([0.5, 1.0], early_exit=True, exit_threshold=0.686, off_ramps=[0, 1, 2], mode="wd_dynamic")
    static = {d: RoutingSetting([0.5, 1.0], 0.5, d) for d in (1.0, 0.5)}
    routed = {"gated": evaluate_routed(model, {"dev": dataset}, gated, torch.device("cpu"), options),
              **evaluate_static_depths(model, {"dev": dataset}, static, torch.device("cpu"), options)}
    dev = GateInputs(model, dataset, config, torch.device("cpu"), rank=rank, world=world)
    validation = validate_gates(model, [dev], [1.0, 2.0], 0.5, config, torch.device("cpu"), rank, world)
    return {"subnets": subnets, "validation": validation, **{
        str(key): {"logits": e.logits["dev"], "records": e.records["dev"],
                   "results": {k: v for k, v in e.results(MAX_LEN).items() if k not in LATENCY}}
        for key, e in routed.items()}}


def test_torchrun_evaluation_equals_one_process(env, tmp_path):
    """Under 2-process torchrun subnet evaluation, routed evaluation and gate validation run each process's
    share of the batches and gather the rest: every result equals one process's bit for bit (metrics, loss,
    logits, per-example records, FLOPs and histograms, gate loss and accuracy)."""
    shared, alone = _two_processes_and_one(env, tmp_path, evaluations)
    exits = alone["gated"]["results"]["exit_layer_histogram"]
    assert len(exits) > 1 and sum(exits.values()) == 32, exits  # some examples left at an off-ramp, some did not
    assert set(alone["subnets"]) == {"d1_w1", "d1_w0.5", "d0.5_w1", "d0.5_w0.5"}
    assert shared["subnets"] == alone["subnets"] and shared["validation"] == alone["validation"]
    for key in ("gated", "1.0", "0.5"):
        assert torch.equal(shared[key]["logits"], alone[key]["logits"]), key
        assert shared[key]["records"] == alone[key]["records"] and len(alone[key]["records"]) == 32
        assert shared[key]["results"] == alone[key]["results"], key
