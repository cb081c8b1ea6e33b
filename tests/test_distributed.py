"""torchrun on gloo (2 processes): prediction alone ends (rank 0 predicts without waiting for ranks that
have left), and head/neuron importance is computed once and broadcast, so replicas whose own importance
scores would differ still rewire and graft identically."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from test_run_glue import ROOT, _argv, _free_port, make_env


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
    """--do_predict without --do_train: rank 0 writes the predictions, and every process exits."""
    (env["data"] / "test.tsv").write_text("index\tsentence1\tsentence2\n0\tthe cat sat .\tthe cat ran .\n"
                                          "1\ta dog ran .\tthe dog did not run .\n", encoding="utf-8")
    out = tmp_path / "predict"
    argv = [a for a in _argv(env, env["bert"], out, "finetuning") if a != "--do_train"] + ["--do_predict"]
    try:
        proc = _torchrun(ROOT / "run_glue.py", argv, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("torchrun run_glue.py --do_predict hung")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = (out / "predict_results_rte.txt").read_text().splitlines()
    assert lines[0] == "index\tprediction" and [line.split("\t")[0] for line in lines[1:]] == ["0", "1"]


PERTURBED_RANK_LAUNCHER = """\
import os, sys
sys.path.insert(0, {root!r})
import torch
import torch.distributed as dist
import run_glue

compute_importance, fit = run_glue.compute_importance, run_glue.fit
calls = []


def perturbed_importance(*args, **kwargs):
    heads, neurons = compute_importance(*args, **kwargs)
    calls.append(1)
    if os.environ["RANK"] == "1":  # this rank's scores differ: alone, it would rewire and graft otherwise
        heads, neurons = heads.flip(-1) + 1e-3, neurons.flip(-1) + 1e-3
    return heads, neurons


def checked_fit(**kwargs):
    state = fit(**kwargs)
    flat = torch.cat([p.detach().reshape(-1) for _, p in kwargs["params"]])
    copies = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, flat)
    if dist.get_rank() == 0:
        with open({report!r}, "w") as f:
            f.write(str(all(torch.equal(copies[0], c) for c in copies[1:])))
    with open({report!r} + "." + os.environ["RANK"], "w") as f:
        f.write(str(len(calls)))
    return state


run_glue.compute_importance, run_glue.fit = perturbed_importance, checked_fit
run_glue.run_cli(run_glue.main)
"""


def test_torchrun_replicas_stay_identical_after_rewiring_and_grafting(env, tmp_path):
    """Rank 1's own importance scores are reversed; the replicas' weights are still bit-identical at the end
    of a width stage that rewires and grafts, because importance comes from rank 0 alone."""
    report = tmp_path / "identical.txt"
    launcher = tmp_path / "launch.py"
    launcher.write_text(PERTURBED_RANK_LAUNCHER.format(root=str(ROOT), report=str(report)))
    argv = _argv(env, env["bert"], tmp_path / "width", "dynabertw", "--graft_during_training",
                 per_gpu_train_batch_size=4, num_train_epochs=2, logging_steps=0, width_mult_list="0.5,1.0")
    proc = _torchrun(launcher, argv)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    grafts = proc.stderr.count("grafted at step")
    assert grafts >= 2
    assert report.read_text() == "True"
    # rank 0 computed the scores of the rewiring and of every graft; rank 1 computed none of them
    assert [Path(f"{report}.{rank}").read_text() for rank in (0, 1)] == [str(1 + grafts), "0"]
    assert json.loads((tmp_path / "width" / "eval_results.json").read_text())["phase"] == "dynabertw"
