"""GLUE data layer (SPEC §1): readers for all nine tasks, augmented files, malformed input, feature conversion,
caching and metrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, TINY_VOCAB, missing_input

import utils_glue
from utils_glue import DataError, compute_metrics, convert_examples_to_features, get_examples, get_task, load_dataset


def write_tsv(path: Path, rows: list[list[str]], header: list[str] | None = None, newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ([header] if header else []) + rows
    path.write_text("".join("\t".join(row) + newline for row in lines), encoding="utf-8")
    return path


def ids(*tokens: str) -> list[int]:
    return [TINY_VOCAB.index(t) for t in tokens]


# ---- the shared GLUE files ------------------------------------------------------------------------------
# MRPC: the shared README says 3668 train rows, but that is the file's line count; after its header the file
# has 3667 data rows.
REAL_COUNTS = {"CoLA": (8551, 1043), "SST-2": (67349, 872), "MRPC": (3667, 408), "RTE": (2490, 277),
               "WNLI": (635, 71)}


@pytest.mark.parametrize("ci, outcome", [(None, pytest.skip.Exception), ("false", pytest.skip.Exception),
                                         ("true", pytest.fail.Exception), ("1", pytest.fail.Exception)])
def test_missing_shared_input_fails_under_ci(monkeypatch, ci, outcome):
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(outcome, match="GLUE data not found"):
        missing_input("GLUE data not found at /nowhere")


@pytest.mark.parametrize("task", sorted(REAL_COUNTS))
def test_real_glue_files_parse(glue_dir, task):
    folder = glue_dir / task
    if not folder.is_dir():
        missing_input(f"{folder} absent")
    spec = get_task(task)
    train = get_examples(task, folder, "train")
    dev = get_examples(task, folder, "dev")
    assert (len(train), len(dev)) == REAL_COUNTS[task]
    for example in train[:200] + dev:
        assert example.label in spec.labels
        assert example.text_a.strip()
        assert (example.text_b is None) == (spec.text_b is None)
        assert example.text_b is None or example.text_b.strip()
    # both classes occur
    assert {e.label for e in dev} == set(spec.labels)


def test_real_mrpc_uses_official_columns(glue_dir):
    folder = glue_dir / "MRPC"
    if not folder.is_dir():
        missing_input(f"{folder} absent")
    first = get_examples("mrpc", folder, "train")[0]  # the file starts with a UTF-8 BOM
    assert first.label == "1"
    assert first.text_a.startswith("Amrozi accused his brother")
    assert first.text_b.startswith("Referring to him as only")


def test_real_cola_has_no_header(glue_dir):
    folder = glue_dir / "CoLA"
    if not folder.is_dir():
        missing_input(f"{folder} absent")
    first = get_examples("CoLA", folder, "train")[0]
    assert first.label == "1"
    assert first.text_a == "Our friends won't buy this analysis, let alone the next one we propose."


def test_shipped_rte_copy_parses():
    train = get_examples("rte", REPO_ROOT / "data" / "RTE", "train")
    dev = get_examples("RTE", REPO_ROOT / "data" / "RTE", "dev")
    assert (len(train), len(dev)) == (2490, 277)
    assert train[0].label == "not_entailment" and train[0].text_b == "Weapons of Mass Destruction Found in Iraq."


# ---- synthetic files for the tasks without shared data --------------------------------------------------
def test_sts_b_float_labels(tmp_path):
    header = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
              "score"]
    rows = [["0", "main-captions", "MSRvid", "2012test", "0001", "none", "none", "A plane is taking off.",
             "An air plane is taking off.", "5.000"],
            ["1", "main-captions", "MSRvid", "2012test", "0004", "none", "none", "A man plays a flute.",
             "A man plays a big flute.", "3.800"]]
    write_tsv(tmp_path / "train.tsv", rows, header)
    write_tsv(tmp_path / "dev.tsv", rows[1:], header)
    train = get_examples("sts-b", tmp_path, "train")
    assert [e.label for e in train] == [5.0, 3.8]
    assert train[0].text_a == "A plane is taking off." and train[0].text_b == "An air plane is taking off."
    assert get_examples("STS-B", tmp_path, "dev")[0].label == 3.8
    assert get_task("sts-b").is_regression and get_task("sts-b").num_labels == 1


def test_qqp_short_rows_skipped(tmp_path):
    header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
    rows = [["1", "10", "11", "How old are you?", "What is your age?", "1"],
            ["2", "12", "13", "only one question"],
            ["3", "14", "15", "Why?", "Why not?", "0"]]
    write_tsv(tmp_path / "train.tsv", rows, header)
    train = get_examples("qqp", tmp_path, "train")
    assert [(e.text_a, e.text_b, e.label) for e in train] == [
        ("How old are you?", "What is your age?", "1"), ("Why?", "Why not?", "0")]


def test_mnli_matched_and_mismatched(tmp_path):
    cols = ["index", "promptID", "pairID", "genre", "sentence1_binary_parse", "sentence2_binary_parse",
            "sentence1_parse", "sentence2_parse", "sentence1", "sentence2"]
    train_row = ["0", "1", "1e", "gov", "(x)", "(y)", "(X)", "(Y)", "A premise.", "A hypothesis.", "neutral",
                 "neutral"]
    write_tsv(tmp_path / "train.tsv", [train_row], cols + ["label1", "gold_label"])
    dev_header = cols + ["label1", "label2", "label3", "label4", "label5", "gold_label"]
    matched = ["0", "2", "2c", "fiction", "(x)", "(y)", "(X)", "(Y)", "Matched premise.", "Matched hyp.",
               "contradiction", "contradiction", "neutral", "contradiction", "contradiction", "contradiction"]
    mismatched = ["0", "3", "3e", "letters", "(x)", "(y)", "(X)", "(Y)", "Mismatched premise.", "Mm hyp.",
                  "entailment", "entailment", "entailment", "neutral", "entailment", "entailment"]
    write_tsv(tmp_path / "dev_matched.tsv", [matched], dev_header)
    write_tsv(tmp_path / "dev_mismatched.tsv", [mismatched], dev_header)
    assert [(e.text_a, e.label) for e in get_examples("mnli", tmp_path, "train")] == [("A premise.", "neutral")]
    dev = get_examples("MNLI", tmp_path, "dev")
    assert [(e.text_a, e.text_b, e.label) for e in dev] == [("Matched premise.", "Matched hyp.", "contradiction")]
    dev_mm = get_examples("mnli-mm", tmp_path, "dev_mm")
    assert [(e.text_a, e.label) for e in dev_mm] == [("Mismatched premise.", "entailment")]
    assert get_task("mnli").labels == ("entailment", "neutral", "contradiction")
    with pytest.raises(DataError):
        get_examples("rte", tmp_path, "dev_mm")


def test_qnli_columns(tmp_path):
    header = ["index", "question", "sentence", "label"]
    write_tsv(tmp_path / "dev.tsv", [["0", "What is it?", "It is a cat.", "entailment"],
                                     ["1", "Who?", "Nobody knows.", "not_entailment"]], header)
    dev = get_examples("qnli", tmp_path, "dev")
    assert [(e.text_a, e.text_b, e.label) for e in dev] == [
        ("What is it?", "It is a cat.", "entailment"), ("Who?", "Nobody knows.", "not_entailment")]


def test_no_quote_processing_crlf_and_bom(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_bytes(
        b"\xef\xbb\xbfsentence\tlabel\r\n"  # UTF-8 BOM, CRLF line ends, a trailing empty line
        b'he said "hi \t1\r\n'
        b'a "quoted, text" here\t0\r\n\r\n'
    )
    train = get_examples("sst-2", tmp_path, "train")
    assert [(e.text_a, e.label) for e in train] == [('he said "hi ', "1"), ('a "quoted, text" here', "0")]
    rows = utils_glue.read_tsv(path)
    assert rows[0] == (1, ["sentence", "label"])  # BOM stripped, \r dropped


def test_task_names_any_case():
    assert get_task("SST-2") is get_task("sst-2")
    assert get_task("MNLI-MM") is get_task("mnli")
    with pytest.raises(DataError, match="unknown task"):
        get_task("squad")


# ---- malformed input ------------------------------------------------------------------------------------
RTE_HEADER = ["index", "sentence1", "sentence2", "label"]


def test_wrong_column_count_names_file_and_line(tmp_path):
    path = write_tsv(tmp_path / "train.tsv", [["0", "a", "b", "entailment"], ["1", "only a"]], RTE_HEADER)
    with pytest.raises(DataError) as err:
        get_examples("rte", tmp_path, "train")
    assert f"{path}:3" in str(err.value) and "column" in str(err.value)


def test_unknown_label_names_file_and_line(tmp_path):
    path = write_tsv(tmp_path / "dev.tsv", [["good movie", "1"], ["bad movie", "1"], ["meh", "2"]],
                     ["sentence", "label"])
    with pytest.raises(DataError) as err:
        get_examples("sst-2", tmp_path, "dev")
    assert f"{path}:4" in str(err.value) and "'2'" in str(err.value)


def test_non_numeric_sts_b_score(tmp_path):
    row = ["0", "g", "f", "y", "i", "s1", "s2", "A.", "B.", "high"]
    path = write_tsv(tmp_path / "dev.tsv", [row], ["h"] * 10)
    with pytest.raises(DataError) as err:
        get_examples("sts-b", tmp_path, "dev")
    assert f"{path}:2" in str(err.value) and "high" in str(err.value)


def test_non_utf8_bytes(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_bytes(b"index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tcaf\xe9\tb\tentailment\n")
    with pytest.raises(DataError) as err:
        get_examples("rte", tmp_path, "train")
    assert f"{path}:3" in str(err.value) and "UTF-8" in str(err.value)


@pytest.mark.parametrize("content", ["", "index\tsentence1\tsentence2\tlabel\n", "\n\n"])
def test_empty_file(tmp_path, content):
    path = tmp_path / "dev.tsv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        get_examples("rte", tmp_path, "dev")
    assert str(path) in str(err.value)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DataError) as err:
        get_examples("rte", tmp_path, "train")
    assert str(tmp_path / "train.tsv") in str(err.value)
    with pytest.raises(DataError):
        get_examples("rte", tmp_path / "nope", "train")


# ---- augmented data -------------------------------------------------------------------------------------
def rte_train(folder: Path) -> None:
    write_tsv(folder / "train.tsv", [["0", "orig a", "orig b", "entailment"]], RTE_HEADER)


def test_augmented_logits_numeric_argmax(tmp_path):
    rte_train(tmp_path)
    rows = [["0", "x1", "y1", "0.1 0.9"],
            ["1", "x2", "y2", "-0.5 -1.2"],  # numeric argmax 0; a string argmax would pick "-1.2"
            ["2", "x3", "y3", "10.2 9.1"],  # numeric argmax 0; a string argmax would pick "9.1"
            ["3", "x4", "y4", "not_entailment"]]
    write_tsv(tmp_path / "train_RTE_aug_with_logits.tsv", rows, RTE_HEADER)
    write_tsv(tmp_path / "train_aug.tsv", [["9", "ignored", "ignored", "entailment"]], RTE_HEADER)
    examples = get_examples("rte", tmp_path, "aug")
    assert [e.text_a for e in examples] == ["orig a", "x1", "x2", "x3", "x4"]  # appended after the originals
    assert [e.label for e in examples] == ["entailment", "not_entailment", "entailment", "entailment",
                                           "not_entailment"]
    assert len(get_examples("rte", tmp_path, "train")) == 1  # training split itself unchanged


def test_augmented_fallback_train_aug(tmp_path):
    rte_train(tmp_path)
    write_tsv(tmp_path / "train_aug.tsv", [["0", "v1", "w1", "not_entailment"], ["0", "v2", "w2", "entailment"]],
              RTE_HEADER)
    examples = get_examples("rte", tmp_path, "aug")
    assert [(e.text_a, e.label) for e in examples] == [
        ("orig a", "entailment"), ("v1", "not_entailment"), ("v2", "entailment")]


def test_augmented_missing_mentions_augment_script(tmp_path):
    rte_train(tmp_path)
    with pytest.raises(DataError, match="augment_data.py"):
        get_examples("rte", tmp_path, "aug")
    wnli = tmp_path / "WNLI"
    write_tsv(wnli / "train.tsv", [["0", "a", "b", "1"]], RTE_HEADER)
    with pytest.raises(DataError, match="augment_data.py"):  # WNLI too: no silent train.tsv duplicate
        get_examples("wnli", wnli, "aug")


def test_augmented_bad_logits(tmp_path):
    rte_train(tmp_path)
    path = write_tsv(tmp_path / "train_RTE_aug_with_logits.tsv",
                     [["0", "x", "y", "0.1 0.9"], ["1", "x", "y", "0.1 0.2 0.7"]], RTE_HEADER)
    with pytest.raises(DataError) as err:
        get_examples("rte", tmp_path, "aug")
    assert f"{path}:3" in str(err.value)


def test_augmented_cola_without_header_and_sts_b_float(tmp_path):
    cola = tmp_path / "CoLA"
    write_tsv(cola / "train.tsv", [["gj04", "1", "", "The cat sat."]])
    write_tsv(cola / "train_CoLA_aug_with_logits.tsv", [["gj04", "0.2 0.8", "", "A cat sat."],
                                                        ["gj04", "1.5 -2.0", "", "Cat the sat."]])
    assert [(e.text_a, e.label) for e in get_examples("cola", cola, "aug")] == [
        ("The cat sat.", "1"), ("A cat sat.", "1"), ("Cat the sat.", "0")]
    stsb = tmp_path / "STS-B"
    header = ["h"] * 10
    write_tsv(stsb / "train.tsv", [["0", "g", "f", "y", "i", "s1", "s2", "A.", "B.", "4.2"]], header)
    write_tsv(stsb / "train_STS-B_aug_with_logits.tsv", [["0", "g", "f", "y", "i", "s1", "s2", "C.", "D.", "1.25"]],
              header)
    assert [e.label for e in get_examples("sts-b", stsb, "aug")] == [4.2, 1.25]


# ---- feature conversion ---------------------------------------------------------------------------------
def test_single_sentence_features(tiny_tokenizer):
    spec = get_task("sst-2")
    examples = [utils_glue.InputExample("g-1", "The CAT sat", None, "1")]
    input_ids, attention_mask, token_type_ids, labels = convert_examples_to_features(
        examples, tiny_tokenizer, 8, spec).tensors
    assert input_ids[0].tolist() == ids("[CLS]", "the", "cat", "sat", "[SEP]") + [0, 0, 0]
    assert attention_mask[0].tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    assert token_type_ids[0].tolist() == [0] * 8
    assert labels.tolist() == [1] and labels.dtype == torch.long


def test_pair_features_token_types_and_padding(tiny_tokenizer):
    spec = get_task("rte")
    examples = [utils_glue.InputExample("g-1", "the cat", "dog ran home", "not_entailment"),
                utils_glue.InputExample("g-2", "a dog", "the mats", "entailment")]
    input_ids, attention_mask, token_type_ids, labels = convert_examples_to_features(
        examples, tiny_tokenizer, 12, spec).tensors
    assert input_ids.shape == (2, 12)
    assert input_ids[0].tolist() == ids("[CLS]", "the", "cat", "[SEP]", "dog", "ran", "home", "[SEP]") + [0] * 4
    assert token_type_ids[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0]
    assert attention_mask[0].tolist() == [1] * 8 + [0] * 4
    # WordPiece: "mats" -> mat ##s
    assert input_ids[1].tolist() == ids("[CLS]", "a", "dog", "[SEP]", "the", "mat", "##s", "[SEP]") + [0] * 4
    assert labels.tolist() == [1, 0]


def test_longest_first_truncation(tiny_tokenizer):
    spec = get_task("rte")
    long_a = utils_glue.InputExample("g", "the cat sat on the mat", "dog dog", "entailment")  # 6 + 2 tokens
    long_b = utils_glue.InputExample("g", "dog dog", "the cat sat on the mat", "entailment")
    both = utils_glue.InputExample("g", "the cat sat on the mat .", "dog dog dog dog", "entailment")  # 7 + 4
    input_ids, attention_mask, token_type_ids, _ = convert_examples_to_features(
        [long_a, long_b, both], tiny_tokenizer, 9, spec).tensors
    # 9 - 3 special tokens = 6 text tokens: drop the last token of the longer segment until it fits
    assert input_ids[0].tolist() == ids("[CLS]", "the", "cat", "sat", "on", "[SEP]", "dog", "dog", "[SEP]")
    assert input_ids[1].tolist() == ids("[CLS]", "dog", "dog", "[SEP]", "the", "cat", "sat", "on", "[SEP]")
    assert input_ids[2].tolist() == ids("[CLS]", "the", "cat", "sat", "[SEP]", "dog", "dog", "dog", "[SEP]")
    assert token_type_ids[0].tolist() == [0] * 6 + [1] * 3
    assert token_type_ids[1].tolist() == [0] * 4 + [1] * 5
    assert attention_mask.sum().item() == 27


def test_regression_features_are_float(tiny_tokenizer):
    spec = get_task("sts-b")
    examples = [utils_glue.InputExample("g", "a cat", "a dog", 3.8), utils_glue.InputExample("g", "a", "b", 0.0)]
    labels = convert_examples_to_features(examples, tiny_tokenizer, 8, spec).tensors[3]
    assert labels.dtype == torch.float and labels.tolist() == pytest.approx([3.8, 0.0])


def test_load_dataset_caches(tmp_path, tiny_tokenizer, monkeypatch):
    data = tmp_path / "RTE"
    write_tsv(data / "train.tsv", [["0", "the cat sat", "a dog", "entailment"],
                                   ["1", "the dog ran home", "the cat", "not_entailment"]], RTE_HEADER)
    cache = tmp_path / "cache"
    first = load_dataset("rte", data, "train", tiny_tokenizer, 16, cache_dir=cache)
    cached = list(cache.glob("*.pt"))
    assert len(cached) == 1 and cached[0].name.startswith("RTE_train_16_")
    assert first.tensors[0].shape == (2, 16)

    def no_conversion(*args, **kwargs):
        raise AssertionError("features were converted again instead of read from the cache")

    monkeypatch.setattr(utils_glue, "convert_examples_to_features", no_conversion)
    second = load_dataset("rte", data, "train", tiny_tokenizer, 16, cache_dir=cache)
    for a, b in zip(first.tensors, second.tensors, strict=True):
        assert torch.equal(a, b)
    # another max_seq_length or changed data is a different cache entry
    monkeypatch.undo()
    load_dataset("rte", data, "train", tiny_tokenizer, 12, cache_dir=cache)
    assert len(list(cache.glob("*.pt"))) == 2
    write_tsv(data / "train.tsv", [["0", "the cat sat", "a dog", "not_entailment"]], RTE_HEADER)
    changed = load_dataset("rte", data, "train", tiny_tokenizer, 16, cache_dir=cache)
    assert changed.tensors[3].tolist() == [1]
    # a corrupt cache entry is rebuilt
    cached[0].write_bytes(b"garbage")
    write_tsv(data / "train.tsv", [["0", "the cat sat", "a dog", "entailment"],
                                   ["1", "the dog ran home", "the cat", "not_entailment"]], RTE_HEADER)
    rebuilt = load_dataset("rte", data, "train", tiny_tokenizer, 16, cache_dir=cache)
    assert torch.equal(rebuilt.tensors[0], first.tensors[0])
    limited = load_dataset("rte", data, "train", tiny_tokenizer, 16, max_examples=1, cache_dir=cache)
    assert len(limited) == 1


# ---- metrics --------------------------------------------------------------------------------------------
def test_cola_mcc():
    labels = np.array([1, 1, 0, 0])
    preds = np.array([1, 0, 0, 0])  # TP 1, FN 1, TN 2, FP 0
    result = compute_metrics("cola", preds, labels)
    assert list(result) == ["mcc"]
    assert result["mcc"] == pytest.approx((1 * 2 - 0 * 1) / math.sqrt((1 + 0) * (1 + 1) * (2 + 0) * (2 + 1)))


def test_mrpc_acc_f1_from_logits():
    labels = np.array([1, 0, 1, 1, 0])
    preds = np.array([1, 1, 0, 1, 0])
    logits = np.stack([1 - preds, preds], axis=1).astype(float) * 2.0 - 1.0
    result = compute_metrics("mrpc", logits, labels)
    assert list(result) == ["acc", "f1", "acc_and_f1"]
    assert result["acc"] == pytest.approx(0.6)
    assert result["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # TP 2, FP 1, FN 1
    assert result["acc_and_f1"] == pytest.approx((0.6 + 4 / 6) / 2)
    assert list(compute_metrics("qqp", logits, labels)) == ["acc", "f1", "acc_and_f1"]


def test_sts_b_correlations():
    preds = np.array([[1.0], [2.0], [3.0], [4.0]])
    labels = np.array([2.0, 4.0, 6.0, 9.0])
    result = compute_metrics("sts-b", preds, labels)
    assert list(result) == ["pearson", "spearmanr", "corr"]
    pearson = 11.5 / math.sqrt(5.0 * 26.75)  # sum dx*dy / sqrt(sum dx^2 * sum dy^2), by hand
    assert result["pearson"] == pytest.approx(pearson)
    assert result["spearmanr"] == pytest.approx(1.0)
    assert result["corr"] == pytest.approx((pearson + 1.0) / 2)
    result = compute_metrics("sts-b", np.array([4.0, 3.0, 1.0, 2.0]), labels)
    assert result["spearmanr"] == pytest.approx(1 - 6 * (9 + 1 + 4 + 4) / (4 * 15))


@pytest.mark.parametrize("task", ["sst-2", "qnli", "rte", "wnli", "mnli"])
def test_accuracy(task):
    labels = np.array([0, 1, 1, 0, 1])
    preds = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4], [0.0, 1.0]])
    assert compute_metrics(task, preds, labels) == {"acc": pytest.approx(0.8)}


def test_metric_keys_and_primary():
    for task in ["cola", "sst-2", "mrpc", "sts-b", "qqp", "qnli", "rte", "wnli"]:
        preds = np.array([0.1, 0.9, 0.4, 0.7]) if task == "sts-b" else np.array([0, 1, 1, 0])
        assert tuple(compute_metrics(task, preds, np.array([0, 1, 1, 1]))) == utils_glue.METRIC_KEYS[task]
    assert utils_glue.primary_metric("CoLA") == "mcc"
    assert utils_glue.primary_metric("sts-b") == "pearson"
    assert utils_glue.primary_metric("mnli-mm") == "acc"
    assert utils_glue.METRIC_KEYS["mnli"] == ("acc", "acc_mm")
