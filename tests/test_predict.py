"""Test-set predictions (issue 18 §2): train_gate.py --do_predict in every inference mode, run_glue.py
--do_predict for a static subnet without training, Hugging Face run_glue's predict_results_<task>.txt
(label names; three decimals for STS-B; MNLI matched and mismatched), and --save_predictions' per-example
JSON lines, whose FLOPs are the executed path's (`flops.executed_macs`)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import cli_argv, save_model_folder
from transformers import BertConfig

import run_glue
import train_gate
import utils_glue
from transformers_ext import evaluation
from transformers_ext.loading import load_model
from transformers_ext.saving import save_model

WORDS = "the a cat dog bird sat ran ate saw on in mat house tree park red blue big small happy sad".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "not", "."] + WORDS
MAX_LEN = 16
N_TEST = 11


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 7)))


def _write_sst2(folder: Path) -> None:
    rng = random.Random(0)
    folder.mkdir(parents=True)
    labelled = "sentence\tlabel\n" + "".join(f"{_sentence(rng)}\t{i % 2}\n" for i in range(10))
    (folder / "train.tsv").write_text(labelled)
    (folder / "dev.tsv").write_text(labelled)
    (folder / "test.tsv").write_text("index\tsentence\n" + "".join(f"{i}\t{_sentence(rng)}\n" for i in range(N_TEST)))


def _write_stsb(folder: Path) -> None:
    rng = random.Random(1)
    folder.mkdir(parents=True)
    head = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2"
    labelled = head + "\tscore\n" + "".join(f"{i}\tg\tf\t2012\t{i}\tn\tn\t{_sentence(rng)}\t{_sentence(rng)}\t"
                                            f"{rng.uniform(0, 5):.2f}\n" for i in range(10))
    (folder / "train.tsv").write_text(labelled)
    (folder / "dev.tsv").write_text(labelled)
    (folder / "test.tsv").write_text(head + "\n" + "".join(f"{i}\tg\tf\t2012\t{i}\tn\tn\t{_sentence(rng)}\t"
                                                           f"{_sentence(rng)}\n" for i in range(N_TEST)))


def _write_mnli(folder: Path) -> None:
    rng = random.Random(2)
    folder.mkdir(parents=True)
    head = "index\tpromptID\tpairID\tgenre\tb1\tb2\tp1\tp2\tsentence1\tsentence2"
    labels = ("entailment", "neutral", "contradiction")
    labelled = head + "\tgold_label\n" + "".join(f"{i}\t1\t2\tg\tx\tx\tx\tx\t{_sentence(rng)}\t{_sentence(rng)}\t"
                                                 f"{labels[i % 3]}\n" for i in range(9))
    for name in ("train.tsv", "dev_matched.tsv", "dev_mismatched.tsv"):
        (folder / name).write_text(labelled)
    for name, n in (("test_matched.tsv", N_TEST), ("test_mismatched.tsv", 5)):
        (folder / name).write_text(head + "\n" + "".join(f"{i}\t1\t2\tg\tx\tx\tx\tx\t{_sentence(rng)}\t"
                                                         f"{_sentence(rng)}\n" for i in range(n)))


def _config(num_labels: int) -> BertConfig:
    return BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, num_labels=num_labels, initializer_range=0.2)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    data = {"SST-2": root / "SST-2", "STS-B": root / "STS-B", "MNLI": root / "MNLI"}
    _write_sst2(data["SST-2"])
    _write_stsb(data["STS-B"])
    _write_mnli(data["MNLI"])
    models = {task: save_model_folder(root / f"model_{task}", VOCAB, _config(n), 0)
              for task, n in (("SST-2", 2), ("STS-B", 1), ("MNLI", 3))}
    # a gated SST-2 model: random gates over widths 0.5, 1.0 (inference only reads them)
    spec = utils_glue.get_task("SST-2")
    model, tokenizer = load_model(str(models["SST-2"]), spec)
    torch.manual_seed(3)
    model.add_gates([0.5, 1.0], 4)
    model.config.gate_class_to_width = [0.5, 1.0]
    model.config.off_ramps = [1]
    save_model(model, tokenizer, root / "gated")
    models["gated"] = root / "gated"
    return {"root": root, "data": data, "models": models, "cache": root / "cache"}


def _flags(env, task: str, model: Path, out: Path, **extra) -> dict:
    return {"task_name": task, "data_dir": env["data"][task], "model_dir": model, "output_dir": out,
            "cache_dir": env["cache"], "max_seq_length": MAX_LEN, "per_gpu_eval_batch_size": 4, "num_threads": 1,
            **extra}


def _predict_lines(path: Path) -> list[list[str]]:
    lines = path.read_text().splitlines()
    assert lines[0] == "index\tprediction"
    return [line.split("\t") for line in lines[1:]]


MODES = {
    "static": (("--static",), {"width_mult_list": "0.5", "depth_mult_list": "0.75"}),
    "w_dynamic": (("--w_dynamic",), {}),
    "d_dynamic": (("--d_dynamic", "--early_exit"), {"width_mult_list": "1.0", "exit_threshold": 0.69}),
    "wd_dynamic": (("--wd_dynamic", "--early_exit"), {"exit_threshold": 0.69}),
    "config": ((), {"config": "CONFIG"}),
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_train_gate_do_predict_every_mode(env, mode, tmp_path):
    switches, extra = MODES[mode]
    if "config" in extra:
        path = tmp_path / "cfg.json"
        path.write_text(json.dumps({"SST-2": {"width_mult_list": [0.5, 1.0], "exit_threshold": 0.6,
                                              "mode": "wd_dynamic"}}))
        extra = {"config": path}
    out = tmp_path / "out"
    outputs = []
    real = evaluation.dynamic_forward

    def spy(*args, **kwargs):
        outputs.append(real(*args, **kwargs))
        return outputs[-1]

    with mock.patch.object(evaluation, "dynamic_forward", spy):
        train_gate.main(cli_argv(_flags(env, "SST-2", env["models"]["gated"], out, **extra), switches=(
            "--cpu", "--do_predict", "--save_predictions", *switches)))
    rows = _predict_lines(out / "predict_results_sst-2.txt")
    assert [r[0] for r in rows] == [str(i) for i in range(N_TEST)] and {r[1] for r in rows} <= {"0", "1"}
    dev = [json.loads(x) for x in (out / "predictions_dev.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (out / "predictions_test.jsonl").read_text().splitlines()]
    assert len(dev) == 10 and len(test) == N_TEST
    assert [r["prediction"] for r in test] == [r[1] for r in rows]
    assert [r["label"] for r in dev] == [str(i % 2) for i in range(10)] and all(r["label"] is None for r in test)
    assert set(test[0]) == {"split", "index", "prediction", "label", "widths", "heads", "exit_layer", "exited_early",
                            "linear_macs", "attention_macs", "flops"}
    # FLOPs per example, counted by hand (h32, 4 heads of 8, I64, T=16): a layer with k heads (16k neurons)
    # 16*(4*32*8k + 2*32*16k) = 32768k linear and 2*16*16*8k = 4096k attention MACs; the final head, each
    # off-ramp and each gate (2 classes) 32*32 + 32*2 = 1088; gates and off-ramps run from each batch's record
    ran = [(int(g), int(o)) for out_ in outputs for g, o in zip(out_.record.gates_run, out_.record.off_ramps_run)]
    expected = []
    for r, (gates_run, off_ramps_run) in zip(dev + test, ran, strict=True):
        linear = 32768 * sum(r["heads"]) + 1088 * (int(not r["exited_early"]) + gates_run + off_ramps_run)
        attention = 4096 * sum(r["heads"])
        assert (r["linear_macs"], r["attention_macs"]) == (linear, attention)
        expected.append(2 * (linear + attention))
    assert [r["flops"] for r in dev + test] == expected
    for r in dev + test:
        assert len(r["widths"]) == 4 and r["exit_layer"] == sum(h > 0 for h in r["heads"])
        assert all((w is None) == (h == 0) for w, h in zip(r["widths"], r["heads"], strict=True))
        assert {w for w in r["widths"] if w is not None} <= {0.5, 1.0}
    if mode == "static":
        assert all(r["widths"] == [0.5, 0.5, 0.5, None] for r in dev + test)


def test_run_glue_do_predict_static_subnet(env, tmp_path):
    """Without --do_train, on a model folder: the subnet w0.5 d0.5's argmax, and its analytic FLOPs."""
    out = tmp_path / "out"
    run_glue.main(cli_argv(_flags(env, "SST-2", env["models"]["SST-2"], out, width_mult=0.5, depth_mult=0.5),
                           switches=("--cpu", "--do_predict", "--save_predictions")))
    rows = _predict_lines(out / "predict_results_sst-2.txt")
    spec = utils_glue.get_task("SST-2")
    model, tokenizer = load_model(str(env["models"]["SST-2"]), spec)
    data = utils_glue.load_dataset("SST-2", env["data"]["SST-2"], "test", tokenizer, MAX_LEN, cache_dir=env["cache"])
    with torch.no_grad():
        logits = model(*data.tensors[:3], subnet=model.subnet(0.5, 0.5)).logits
    assert [r[1] for r in rows] == [str(int(i)) for i in logits.argmax(-1)]
    records = [json.loads(x) for x in (out / "predictions_test.jsonl").read_text().splitlines()]
    # by hand: 2 of 4 layers with 2 of 4 heads, 2 * 32768 * 2 + 1088 linear and 2 * 4096 * 2 attention MACs
    assert all(r["flops"] == 2 * (132160 + 16384) and r["widths"] == [0.5, 0.5, None, None] for r in records)
    assert not (out / "eval_results.json").exists()  # nothing trained


def test_stsb_floats_and_mnli_two_files(env, tmp_path):
    out = tmp_path / "stsb"
    run_glue.main(cli_argv(_flags(env, "STS-B", env["models"]["STS-B"], out), switches=("--cpu", "--do_predict")))
    rows = _predict_lines(out / "predict_results_sts-b.txt")
    assert len(rows) == N_TEST and all(len(v.split(".")[1]) == 3 for _, v in rows)
    out = tmp_path / "mnli"
    train_gate.main(cli_argv(_flags(env, "MNLI", env["models"]["MNLI"], out), switches=("--cpu", "--do_predict")))
    matched = _predict_lines(out / "predict_results_mnli.txt")
    mismatched = _predict_lines(out / "predict_results_mnli-mm.txt")
    assert len(matched) == N_TEST and len(mismatched) == 5
    assert {v for _, v in matched + mismatched} <= {"entailment", "neutral", "contradiction"}


def test_predict_needs_the_test_file(env, tmp_path, capsys):
    from cli import run_cli

    data = tmp_path / "SST-2"
    data.mkdir()
    for name in ("train.tsv", "dev.tsv"):
        (data / name).write_text((env["data"]["SST-2"] / name).read_text())
    flags = {**_flags(env, "SST-2", env["models"]["SST-2"], tmp_path / "out"), "data_dir": data}
    for switches in (("--cpu", "--do_predict"), ("--cpu", "--do_train", "--do_predict")):
        capsys.readouterr()
        with mock.patch.object(run_glue, "train", side_effect=AssertionError("trained before checking test.tsv")), \
                pytest.raises(SystemExit) as info:
            run_cli(lambda s=switches: run_glue.main(cli_argv(flags, switches=s)))
        assert info.value.code == 2
        assert capsys.readouterr().err.splitlines()[-1] == f"error: {data / 'test.tsv'}: file not found"
        assert not (tmp_path / "out").exists()
