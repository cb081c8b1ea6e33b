"""Your own data (issue 18 §1): --train_file / --validation_file / --test_file in csv, tsv and json lines,
column names, labels inferred from the training file (or read back from the model's id2label), accuracy +
macro-F1, one-line errors naming file, line and column, and a 3-class task through finetuning, gate training
and width- and depth-dynamic inference with early exit."""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_argv, save_model_folder
from transformers import BertConfig

import augment_data
import run_glue
import train_gate
import utils_glue
from cli import run_cli
from utils_glue import DataError

WORDS = "the a cat dog bird sat ran ate saw on in mat house tree park red blue big small happy sad".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "not", ".", ","] + WORDS
MAX_LEN = 20


def _args(**flags) -> argparse.Namespace:
    base = {"task_name": "QNLI", "data_dir": "nowhere", "model_dir": None, "train_file": None,
            "validation_file": None, "test_file": None, "text_column": None, "text_pair_column": None,
            "label_column": None, "is_regression": False}
    base.update({k: str(v) if isinstance(v, Path) else v for k, v in flags.items()})
    return argparse.Namespace(**base)


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ---- reading ---------------------------------------------------------------------------------------------
def test_the_three_formats_read_alike(tmp_path):
    rows = [("a cat, \"sat\"", "on the mat", "pos"), ("the dog", "ran", "neg"), ("a bird", "ate", "neutral")]
    csv_text = "sentence1,sentence2,label\n" + "".join(
        ",".join('"' + c.replace('"', '""') + '"' for c in r) + "\n" for r in rows)
    tsv_text = "sentence1\tsentence2\tlabel\n" + "".join("\t".join(r) + "\n" for r in rows)
    json_text = "".join(json.dumps({"sentence1": a, "sentence2": b, "label": y}) + "\n" for a, b, y in rows)
    got = {}
    for suffix, text in ((".csv", csv_text), (".tsv", tsv_text), (".jsonl", json_text)):
        path = _write(tmp_path / f"train{suffix}", text)
        args = utils_glue.setup_custom_task(_args(train_file=path))
        assert args.task_name == "custom" and args.data_dir == str(tmp_path)
        spec = utils_glue.get_task("custom")
        got[suffix] = [(e.text_a, e.text_b, e.label) for e in utils_glue.get_examples("custom", "x", "train")]
        assert spec.labels == ("neg", "neutral", "pos") and spec.num_labels == 3 and spec.text_b is not None
    assert got[".csv"] == got[".tsv"] == got[".jsonl"] == rows


def test_labels_inferred_sorted_numeric_and_regression(tmp_path):
    def labels(values, **kw):
        path = _write(tmp_path / "t.csv", "text,label\n" + "".join(f"w{i},{v}\n" for i, v in enumerate(values)))
        utils_glue.setup_custom_task(_args(train_file=path, task_name="mine", **kw))
        return utils_glue.get_task("mine")

    assert labels(["b", "c", "a", "b"]).labels == ("a", "b", "c")
    assert labels(["10", "2", "1", "2"]).labels == ("1", "2", "10")  # numerically, not "1" < "10" < "2"
    spec = labels([f"{0.1 * i:.1f}" for i in range(12)])  # numbers written as floats: regression
    assert spec.is_regression and spec.num_labels == 1
    assert labels(["3.0", "4.0"]).is_regression  # a float column, as HF run_glue
    spec = labels([str(i) for i in range(20)])  # 20 integer class ids (banking77-style): classification
    assert not spec.is_regression and spec.labels == tuple(str(i) for i in range(20))
    assert labels(["1", "2", "1"], is_regression=True).is_regression
    single = labels(["x", "y"])
    assert single.text_b is None and single.files.text_column == "text"  # no sentence2: single-text task
    assert utils_glue.primary_metric("mine") == "acc"


def test_labels_follow_the_model_config(tmp_path):
    """A later stage keeps the teacher's label order (config.id2label), even where sorting would differ."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert", "finetuning_task": "custom",
                                                   "id2label": {"0": "pos", "1": "neg", "2": "neutral"}}))
    path = _write(tmp_path / "t.csv", "sentence1,label\na,neg\nb,pos\n")
    utils_glue.setup_custom_task(_args(train_file=path, model_dir=model))
    assert utils_glue.get_task("custom").labels == ("pos", "neg", "neutral")
    test = _write(tmp_path / "test.csv", "id,sentence1\n7,a\n9,b\n")  # a test file alone: labels from the model
    utils_glue.setup_custom_task(_args(test_file=test, model_dir=model))
    assert utils_glue.get_task("custom").labels == ("pos", "neg", "neutral")
    assert [e.index for e in utils_glue.get_examples("custom", "x", "test")] == ["7", "9"]
    (model / "config.json").write_text(json.dumps({"model_type": "bert", "id2label": {"0": "LABEL_0", "1": "LABEL_1"}}))
    with pytest.raises(DataError, match="cannot tell the labels from a test file alone"):
        utils_glue.setup_custom_task(_args(test_file=test, model_dir=model))


def test_hf_unlabelled_test_examples(tmp_path):
    """A test split exported from Hugging Face datasets marks missing labels with -1: read as no label; in a
    training or dev file -1 stays an unknown label (one clear error)."""
    train = _write(tmp_path / "train.jsonl", "".join(json.dumps({"sentence": w, "label": y}) + "\n"
                                                    for w, y in (("a", 0), ("b", 1), ("c", 0))))
    test = _write(tmp_path / "test.jsonl", "".join(json.dumps({"idx": i, "sentence": w, "label": y}) + "\n"
                                                  for i, (w, y) in enumerate((("a", -1), ("b", 1)))))
    utils_glue.setup_custom_task(_args(train_file=train, test_file=test))
    assert [(e.index, e.label) for e in utils_glue.get_examples("custom", "x", "test")] == [("0", None), ("1", "1")]
    dev = _write(tmp_path / "dev.jsonl", json.dumps({"sentence": "a", "label": -1}) + "\n")
    utils_glue.setup_custom_task(_args(train_file=train, validation_file=dev))
    with pytest.raises(DataError, match="unknown label '-1'"):
        utils_glue.get_examples("custom", "x", "dev")


def test_macro_f1_and_accuracy(tmp_path):
    path = _write(tmp_path / "t.csv", "sentence1,label\na,x\nb,y\nc,z\n")
    utils_glue.setup_custom_task(_args(train_file=path))
    labels = np.array([0, 0, 1, 1, 2, 2])
    preds = np.array([0, 1, 1, 1, 2, 0])
    m = utils_glue.compute_metrics("custom", preds, labels)
    # per class F1: 0 -> P 1/2 R 1/2 = 0.5; 1 -> P 2/3 R 1 = 0.8; 2 -> P 1 R 1/2 = 2/3
    assert m["acc"] == pytest.approx(4 / 6) and m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    logits = np.eye(3)[preds]
    assert utils_glue.compute_metrics("custom", logits, labels) == m


def test_glue_tasks_unchanged():
    args = _args(task_name="RTE", data_dir="data/RTE")
    assert utils_glue.setup_custom_task(args) is args and args.task_name == "RTE"
    assert not utils_glue.get_task("rte").is_custom
    assert set(utils_glue.compute_metrics("mrpc", np.array([1, 0]), np.array([1, 1]))) == {"acc", "f1", "acc_and_f1"}


def test_glue_test_layouts(tmp_path):
    """GLUE test files: no label, the index first, the texts where each task's test layout has them."""
    _write(tmp_path / "test.tsv", "index\tsentence\n0\tgood movie\n1\tbad movie\n")
    ex = utils_glue.get_examples("SST-2", tmp_path, "test")
    assert [(e.index, e.text_a, e.text_b, e.label) for e in ex] == [("0", "good movie", None, None),
                                                                    ("1", "bad movie", None, None)]
    _write(tmp_path / "test.tsv", "id\tquestion1\tquestion2\n5\tq one\tq two\n")
    assert [(e.index, e.text_a, e.text_b) for e in utils_glue.get_examples("QQP", tmp_path, "test")] == [
        ("5", "q one", "q two")]
    header = "index\tpromptID\tpairID\tgenre\tb1\tb2\tp1\tp2\tsentence1\tsentence2\n"
    _write(tmp_path / "test_matched.tsv", header + "0\t1\t2\tg\tx\tx\tx\tx\tA premise.\tA hypothesis.\n")
    _write(tmp_path / "test_mismatched.tsv", header + "0\t1\t2\tg\tx\tx\tx\tx\tOther.\tText.\n")
    assert utils_glue.get_examples("MNLI", tmp_path, "test")[0].text_b == "A hypothesis."
    assert utils_glue.get_examples("MNLI", tmp_path, "test_mm")[0].text_a == "Other."
    assert utils_glue.predictions_file_name("MNLI", "test_mm") == "predict_results_mnli-mm.txt"


# ---- errors: one line naming file, line and column -------------------------------------------------------
@pytest.mark.parametrize(("name", "text", "message"), [
    ("train.csv", "sentence1,label\na,x\nb,y,extra\n", "train.csv:3: expected 2 csv columns as in the header "
                                                        "(sentence1, label), found 3"),
    ("train.csv", "sentence1,label\na,x\nb,\n", "train.csv:3: column 'label' (label) is empty"),
    ("train.jsonl", '{"sentence1": "a", "label": "x"}\n{"sentence1": "b", "label": \n',
     "train.jsonl:2: invalid JSON"),
    ("train.jsonl", '{"sentence1": "a", "label": "x"}\n{"sentence1": "b"}\n',
     "train.jsonl:2: column 'label' (label) missing"),
    ("train.csv", "text1,label\na,x\nb,y\n", "train.csv:1: no column 'sentence1' (columns: text1, label); name it "
                                             "with --text_column"),
    ("train.txt", "x", "train.txt: unknown data format '.txt'"),
])
def test_bad_training_files(tmp_path, name, text, message):
    path = _write(tmp_path / name, text)
    with pytest.raises(DataError) as info:
        utils_glue.setup_custom_task(_args(train_file=path))
    assert str(info.value).startswith(f"{path}") and message in str(info.value)


def test_unknown_label_in_dev_is_one_line_exit_2(tmp_path, capsys):
    train = _write(tmp_path / "train.csv", "sentence1,label\na,x\nb,y\n")
    dev = _write(tmp_path / "dev.csv", "sentence1,label\na,x\nb,y\nc,maybe\n")
    model = _model(tmp_path / "model", 2)
    argv = ["--train_file", str(train), "--validation_file", str(dev), "--model_dir", str(model), "--output_dir",
            str(tmp_path / "out"), "--do_train", "--cpu", "--training_phase", "finetuning", "--max_seq_length", "16",
            "--cache_dir", str(tmp_path / "cache")]
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: run_glue.main(argv))
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err and err.count("error:") == 1
    assert err.splitlines()[-1] == (f"error: {dev}:4: column 'label' (label): unknown label 'maybe' (expected "
                                    "one of x, y, the labels of the training file)")
    assert not (tmp_path / "out").exists()


def test_data_flags_need_files():
    with pytest.raises(DataError, match="--label_column applies to"):
        utils_glue.setup_custom_task(_args(label_column="y"))


# ---- a 3-class task through the pipeline -------------------------------------------------------------------
def _model(folder: Path, num_labels: int) -> Path:
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                        initializer_range=0.2)
    return save_model_folder(folder, VOCAB, config, 0)


def write_three_class(folder: Path, n: int = 24, seed: int = 0) -> dict[str, Path]:
    """train.csv / dev.csv (labels) and test.csv (an id column, no labels) of a 3-class pair task whose label
    names do not sort as they appear."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)

    def sentence() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))

    labels = ["zebra", "apple", "mango"]
    rows = [(sentence(), sentence(), labels[i % 3]) for i in range(n)]
    files = {}
    for name, part in (("train", rows), ("dev", rows[: n // 2])):
        files[name] = _write(folder / f"{name}.csv", "premise,hypothesis,label\n"
                             + "".join(f"{a},{b},{y}\n" for a, b, y in part))
    files["test"] = _write(folder / "test.csv", "id,premise,hypothesis\n"
                           + "".join(f"t{i},{a},{b}\n" for i, (a, b, _) in enumerate(rows[:7])))
    return files


@pytest.fixture(scope="module")
def three_class(tmp_path_factory):
    """finetuning -> dynabertw -> dynabert -> gates on a 3-class CSV task (flags as a user would type them)."""
    root = tmp_path_factory.mktemp("three")
    files = write_three_class(root / "data")
    model = _model(root / "bert", 3)
    common = {"train_file": files["train"], "validation_file": files["dev"], "text_column": "premise",
              "text_pair_column": "hypothesis", "task_name": "fruit", "max_seq_length": MAX_LEN,
              "per_gpu_train_batch_size": 8, "per_gpu_eval_batch_size": 8, "num_threads": 1,
              "cache_dir": root / "cache"}
    stages = [("teacher", model, {"training_phase": "finetuning", "learning_rate": 1e-3}),
              ("width", root / "teacher", {"training_phase": "dynabertw", "width_mult_list": "0.5,1.0"}),
              ("depth", root / "width", {"training_phase": "dynabert", "width_mult_list": "0.5,1.0",
                                         "depth_mult_list": "0.5,1.0"})]
    for name, src, flags in stages:
        run_glue.main(cli_argv({**common, "model_dir": src, "output_dir": root / name, "num_train_epochs": 1,
                                "logging_steps": 0, **flags}, switches=("--cpu", "--do_train")))
    train_gate.main(cli_argv({**common, "model_dir": root / "depth", "output_dir": root / "gates",
                              "training_phase": "traingate", "width_mult_list": "0.5,1.0", "gate_setting": "0.5,1.0",
                              "num_train_epochs": 1, "logging_steps": 2, "learning_rate": 1e-2},
                             switches=("--cpu", "--do_train")))
    return {"root": root, "files": files, "common": common}


def test_three_class_pipeline_keeps_label_order(three_class):
    root = three_class["root"]
    for stage in ("teacher", "width", "depth", "gates"):
        config = json.loads((root / stage / "config.json").read_text())
        assert config["finetuning_task"] == "fruit"
        assert [config["id2label"][str(i)] for i in range(3)] == ["apple", "mango", "zebra"], stage
    results = json.loads((root / "teacher" / "eval_results.json").read_text())
    metrics = results["best"][next(iter(results["best"]))]
    assert set(metrics) >= {"acc", "macro_f1"} and results["metric"] == "acc"


def test_three_class_wd_dynamic_predict(three_class):
    root, files, common = three_class["root"], three_class["files"], three_class["common"]
    out = root / "infer"
    train_gate.main(cli_argv({**common, "model_dir": root / "gates", "output_dir": out, "test_file": files["test"],
                              "exit_threshold": 0.9, "off_ramps": "1"},
                             switches=("--cpu", "--do_eval", "--do_predict", "--save_predictions", "--wd_dynamic",
                                       "--early_exit")))
    lines = (out / "predict_results_fruit.txt").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 1 + 7
    assert [line.split("\t")[0] for line in lines[1:]] == [f"t{i}" for i in range(7)]
    assert {line.split("\t")[1] for line in lines[1:]} <= {"apple", "mango", "zebra"}
    report = json.loads((out / "inference_results.json").read_text())
    assert report["num_examples"] == 12 and {"acc", "macro_f1"} <= set(report["results"])
    dev = [json.loads(x) for x in (out / "predictions_dev.jsonl").read_text().splitlines()]
    test = [json.loads(x) for x in (out / "predictions_test.jsonl").read_text().splitlines()]
    assert len(dev) == 12 and len(test) == 7
    assert [r["prediction"] for r in test] == [line.split("\t")[1] for line in lines[1:]]
    assert all(r["label"] is None for r in test) and {r["label"] for r in dev} <= {"apple", "mango", "zebra"}
    # the report's mean FLOPs are the mean of the per-example records
    mean = sum(r["flops"] for r in dev) / len(dev)
    assert math.isclose(mean, report["results"]["true_flops"], rel_tol=1e-9)
    acc = sum(r["prediction"] == r["label"] for r in dev) / len(dev)
    assert acc == pytest.approx(report["results"]["acc"])


def test_augment_own_csv_and_train_on_it(tmp_path, three_class):
    """augment_data.py --train_file writes <stem>_aug.csv beside it (same columns), which --data_aug reads."""
    files = write_three_class(tmp_path / "data", n=6)
    from test_augment_data import _save_model

    mlm = _save_model(tmp_path / "mlm", True)
    code = augment_data.main(["--train_file", str(files["train"]), "--model_dir", str(mlm), "--text_column",
                              "premise", "--text_pair_column", "hypothesis", "--N", "2", "--p", "0.5"])
    assert code == 0
    aug = tmp_path / "data" / "train_aug.csv"
    header, rows = utils_glue.read_table(aug)
    assert header == ["premise", "hypothesis", "label"] and len(rows) >= 2 * 6
    utils_glue.setup_custom_task(_args(train_file=files["train"], text_column="premise",
                                       text_pair_column="hypothesis"))
    n_train = len(utils_glue.get_examples("custom", "x", "train"))
    assert len(utils_glue.get_examples("custom", "x", "aug")) == n_train + len(rows)


# ---- the shell scripts on your own files ---------------------------------------------------------------------
def test_shell_scripts_on_own_csv(tmp_path):
    """run_glue.sh -> train_glue.sh -> gate_inference.sh with TRAIN_FILE / VALIDATION_FILE / TEST_FILE and the
    column variables (no GLUE folder anywhere): teacher, width, depth, final, gates, then every inference
    setting with its test predictions in the files' label names."""
    import os
    import subprocess
    import sys

    files = write_three_class(tmp_path / "data")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHON": sys.executable, "PROFILE": "quick", "TASK": "fruit",
           "OUT_DIR": str(tmp_path / "out"), "BERT_DIR": str(_model(tmp_path / "bert", 3)),
           "DATA_DIR": str(tmp_path / "no_glue_folder"), "TRAIN_FILE": str(files["train"]),
           "VALIDATION_FILE": str(files["dev"]), "TEST_FILE": str(files["test"]), "TEXT_COLUMN": "premise",
           "TEXT_PAIR_COLUMN": "hypothesis", "LABEL_COLUMN": "label", "MAX_SEQ_LENGTH": str(MAX_LEN),
           "BATCH_SIZES": "8", "THRESHOLDS": "0.5", "FLEXBERT_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    for script in ("run_glue.sh", "train_glue.sh", "gate_inference.sh"):
        proc = subprocess.run(["bash", str(root / script), "--num_threads", "1"], env=env, cwd=root,
                              capture_output=True, text=True)
        assert proc.returncode == 0, f"{script}: {proc.stderr[-3000:]}"
    out = tmp_path / "out"
    assert {p.name for p in out.rglob(".done-*")} == {".done-finetuning", ".done-dynabertw", ".done-dynabert",
                                                       ".done-final_finetuning", ".done-traingate"}
    for stage in ("teacher", "w_bert", "wd_bert", "wd_bert_gates"):
        config = json.loads((out / stage / "config.json").read_text())
        assert config["finetuning_task"] == "fruit", stage
        assert [config["id2label"][str(i)] for i in range(3)] == ["apple", "mango", "zebra"], stage
    settings = sorted(p.name for p in (out / "inference").iterdir() if p.is_dir())
    assert settings == sorted([f"static_w{w}_d{d}_b8" for w in ("1.0", "0.75", "0.5", "0.25")
                               for d in ("1.0", "0.75", "0.5")] + ["w_dynamic_b8", "wd_dynamic_t0.5_b8",
                                                                    "cascade_b8"])
    assert not (out / "inference" / "calibrated").exists()  # no calibration by default on your own files
    for name in settings:
        report = json.loads((out / "inference" / name / "inference_results.json").read_text())
        assert report["num_examples"] == 12, name  # dev is VALIDATION_FILE
        lines = (out / "inference" / name / "predict_results_fruit.txt").read_text().splitlines()
        assert lines[0] == "index\tprediction" and [line.split("\t")[0] for line in lines[1:]] == \
            [f"t{i}" for i in range(7)], name
        assert {line.split("\t")[1] for line in lines[1:]} <= {"apple", "mango", "zebra"}, name
    table = (out / "tradeoff.csv").read_text().splitlines()  # the trade-off table reads the own task's accuracy
    assert len(table) == 1 + len(settings) and all(",acc," in row for row in table[1:])
