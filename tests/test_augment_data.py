"""augment_data.py: output format, originals and labels kept, replacement rate, determinism, clean errors."""

import os
import random
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_in_process

import augment_data
from utils_glue import get_examples, read_tsv

ROOT = Path(__file__).resolve().parents[1]
WORDS = (
    "the a of in is was and to cat dog bird house car tree river city man woman child play run walk see saw "
    "big small red green happy sad old new fast slow eat ate book read write paris london john mary found "
    "weapons iraq yet no"
).split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[unused0]", ".", ",", "!", "1", "2", "##s", "##ing", "##ed",
         *WORDS]
RTE_ROWS = [
    ("0", "The big dog saw a small cat in the house.", "A dog saw a cat.", "entailment"),
    ("1", "Mary read the old book in London.", "Mary was in Paris.", "not_entailment"),
    ("2", "John walked to the river with a happy child.", "John is sad.", "not_entailment"),
    ("3", "The red car is fast and the green car is slow.", "A car is fast.", "entailment"),
    ("4", "No weapons found in Iraq yet, 12 birds playing!", "Weapons found.", "not_entailment"),
    ("5", "A woman ate the new book.", "The woman ate.", "entailment"),
]


def _save_model(path: Path, with_head: bool) -> Path:
    from transformers import BertConfig, BertForMaskedLM, BertModel

    path.mkdir()
    (path / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    (BertForMaskedLM if with_head else BertModel)(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"mlm": _save_model(root / "mlm", True), "encoder": _save_model(root / "encoder", False)}


@pytest.fixture
def rte_dir(tmp_path):
    data = tmp_path / "RTE"
    data.mkdir()
    lines = ["index\tsentence1\tsentence2\tlabel"] + ["\t".join(r) for r in RTE_ROWS]
    (data / "train.tsv").write_text("\n".join(lines) + "\n")
    return data


def run(data_dir, model_dir, *extra) -> int:
    return augment_data.main(["--task_name", "rte", "--data_dir", str(data_dir), "--model_dir", str(model_dir),
                              "--N", "8", *extra])


def aug_rows(data_dir) -> list[list[str]]:
    return [fields for _, fields in read_tsv(data_dir / "train_aug.tsv")]


@pytest.mark.parametrize("model", ["mlm", "encoder"])
def test_output_round_trips_and_keeps_originals_and_labels(models, rte_dir, model):
    assert run(rte_dir, models[model]) == 0
    rows = aug_rows(rte_dir)
    assert rows[0] == ["index", "sentence1", "sentence2", "label"]
    body = rows[1:]
    examples = get_examples("rte", rte_dir, "aug")
    assert len(examples) == len(RTE_ROWS) + len(body)
    assert len(body) > 2 * len(RTE_ROWS)  # variants were made
    originals = {r[0]: list(r) for r in RTE_ROWS}
    for fields in body:
        orig = originals[fields[0]]
        assert fields[3] == orig[3]  # label preserved
        # one text column varies at a time; the other is the original sentence
        assert fields[1] == orig[1] or fields[2] == orig[2]
    for idx, orig in originals.items():
        group = [f for f in body if f[0] == idx]
        assert group.count(orig) == 2  # once per text column, each followed by that column's variants
        second = group.index(orig, 1)
        for col, part in ((1, group[1:second]), (2, group[second + 1:])):
            assert len(part) <= 8  # at most N variants
            texts = [f[col] for f in part]
            assert len(set(texts)) == len(texts) and orig[col] not in texts
            assert all(f[3 - col] == orig[3 - col] for f in part)  # the other column is the original


def test_replacement_rate_close_to_p():
    tokens = [f"w{i}" for i in range(20)]
    cands = {i: ["x", "y", "z"] for i in range(0, 20, 2)}
    rng = random.Random(0)
    for p in (0.1, 0.4, 0.8):
        changed = sum(new != old for _ in range(500)
                      for i, (new, old) in enumerate(zip(augment_data.sample_variant(tokens, cands, p, rng), tokens))
                      if i in cands)
        assert abs(changed / (500 * len(cands)) - p) < 0.05
        # non-candidate positions never change
        assert all(augment_data.sample_variant(tokens, cands, p, rng)[i] == tokens[i] for i in range(1, 20, 2))


def test_variants_distinct_and_at_most_n():
    rng = random.Random(1)
    variants = augment_data.draw_variants("a b", ["a", "b"], {0: ["c", "d"]}, 50, 0.5, rng)
    assert sorted(variants) == ["c b", "d b"]
    assert augment_data.draw_variants("a b", ["a", "b"], {}, 50, 0.5, rng) == []
    assert len(augment_data.draw_variants("a b c", ["a", "b", "c"], {i: list("xyzuv") for i in range(3)}, 4, 0.9,
                                          rng)) <= 4


def test_candidates_skip_stop_words_and_non_alphabetic(models):
    tokenizer, model, has_mlm = augment_data.load_model(models["mlm"])
    assert has_mlm
    neighbours = augment_data.bert_neighbour_index(model, tokenizer, 5)
    aug = augment_data.Augmenter(tokenizer, model, neighbours, m=5, p=0.4, n=5, seed=0)
    tokens, cands = aug.candidates("The Dog, 12 birds and playing in Paris!")
    assert tokens == ["the", "dog", ",", "12", "birds", "and", "playing", "in", "paris", "!"]
    assert sorted(cands) == [1, 4, 6, 8]
    for words in cands.values():
        assert words and all(not w.startswith("##") and not w.startswith("[") for w in words)
    # multi-piece words use embedding neighbours: whole alphabetic vocab words other than the word itself
    assert all(w.isalpha() and w != "birds" for w in cands[4])


def test_model_without_mlm_head_uses_neighbours(models, rte_dir, caplog):
    tokenizer, model, has_mlm = augment_data.load_model(models["encoder"])
    assert not has_mlm
    with caplog.at_level("INFO", logger="augment_data"):
        assert run(rte_dir, models["encoder"]) == 0
    assert sum("no masked-LM head" in r.message for r in caplog.records) == 1


def test_glove_neighbours_keep_title_case(models, rte_dir, tmp_path):
    glove = tmp_path / "glove.txt"
    vecs = {"paris": "1 0 0", "london": "0.9 0.1 0", "rome": "0.8 0 0.2", "dog": "0 1 0", "puppy": "0 0.9 0.1"}
    glove.write_text("".join(f"{w} {v}\n" for w, v in vecs.items()))
    index = augment_data.load_glove(glove, m=2)
    assert index.neighbours(["Paris", "dog", "unknownword"]) == [["London", "Rome"], ["puppy", "london"], []]
    assert run(rte_dir, models["encoder"], "--glove_embs", str(glove)) == 0
    assert len(aug_rows(rte_dir)) > 1 + 2 * len(RTE_ROWS)


def test_deterministic_with_seed_and_max_examples(models, rte_dir, tmp_path):
    out1, out2, out3 = tmp_path / "a.tsv", tmp_path / "b.tsv", tmp_path / "c.tsv"
    assert run(rte_dir, models["mlm"], "--seed", "7", "--max_examples", "3", "--output", str(out1)) == 0
    assert run(rte_dir, models["mlm"], "--seed", "7", "--max_examples", "3", "--output", str(out2)) == 0
    assert run(rte_dir, models["mlm"], "--seed", "8", "--max_examples", "3", "--output", str(out3)) == 0
    assert out1.read_bytes() == out2.read_bytes()
    assert out1.read_bytes() != out3.read_bytes()
    assert {f[0] for _, f in read_tsv(out1)[1:]} == {"0", "1", "2"}
    assert not (rte_dir / "train_aug.tsv").exists()


def test_cola_has_no_header(models, tmp_path):
    data = tmp_path / "CoLA"
    data.mkdir()
    (data / "train.tsv").write_text("gj04\t1\t\tThe dog saw a big cat.\ngj04\t0\t*\tCat the dog saw.\n")
    args = ["--task_name", "CoLA", "--data_dir", str(data), "--model_dir", str(models["mlm"]), "--N", "5"]
    assert augment_data.main(args) == 0
    rows = aug_rows(data)
    assert rows[0] == ["gj04", "1", "", "The dog saw a big cat."]
    assert len(get_examples("cola", data, "aug")) == 2 + len(rows)
    assert {r[1] for r in rows} == {"1", "0"}


def test_missing_data_dir_is_a_clean_error(models, tmp_path):
    """As a script (`python augment_data.py`, run in this process): one `error:` line naming the folder."""
    argv = ["--task_name", "RTE", "--data_dir", str(tmp_path / "nope"), "--model_dir", str(models["mlm"])]
    code, _, stderr, _ = run_in_process([sys.executable, str(ROOT / "augment_data.py"), *argv], dict(os.environ))
    assert code != 0
    assert "Traceback" not in stderr
    assert stderr.strip().startswith("error:") and "nope" in stderr
    assert not (tmp_path / "nope").exists()


def test_bad_inputs_are_clean_errors_without_output(models, rte_dir, tmp_path):
    # missing model dir
    assert run(rte_dir, tmp_path / "no_model") == 2
    # a malformed training row (too few columns)
    with open(rte_dir / "train.tsv", "a") as f:
        f.write("6\tonly one column\n")
    assert run(rte_dir, models["mlm"]) == 2
    assert not (rte_dir / "train_aug.tsv").exists()
    assert list(rte_dir.glob(".train_aug*")) == []


def test_help_lists_every_flag():
    out = augment_data.build_parser().format_help()  # the parser itself: no interpreter just to read --help
    for flag in ("--task_name", "--data_dir", "--model_dir", "--glove_embs", "--N", "--p", "--M", "--max_examples",
                 "--seed", "--output", "--cpu"):
        assert flag in out


@pytest.mark.parametrize(("cuda", "flags", "device"), [(True, (), "cuda"), (True, ("--cpu",), "cpu"),
                                                        (False, (), "cpu")])
def test_masked_lm_runs_on_the_gpu_when_there_is_one(models, rte_dir, tmp_path, monkeypatch, cuda, flags, device):
    """The model goes to CUDA when available (not --cpu); the masked LM's inputs follow the model's device."""
    load = augment_data.load_model
    moved = []

    def recording_load(model_dir):
        tokenizer, model, has_mlm = load(model_dir)
        monkeypatch.setattr(model, "to", lambda target: moved.append(str(target)) or model)  # stays on the CPU
        return tokenizer, model, has_mlm

    monkeypatch.setattr(augment_data, "load_model", recording_load)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert run(rte_dir, models["mlm"], "--max_examples", "2", "--output", str(tmp_path / "aug.tsv"), *flags) == 0
    assert moved == [device]


def test_embedded_model(tmp_path, minilm_dir):
    model_dir = minilm_dir
    data = tmp_path / "RTE"
    data.mkdir()
    lines = ["index\tsentence1\tsentence2\tlabel"] + ["\t".join(r) for r in RTE_ROWS[:2]]
    (data / "train.tsv").write_text("\n".join(lines) + "\n")
    assert run(data, model_dir) == 0
    rows = aug_rows(data)[1:]
    assert len(rows) > 2 * 2 and all(r[3] == dict((x[0], x[3]) for x in RTE_ROWS)[r[0]] for r in rows)


def test_a_truncated_model_file_is_one_error_line(models, rte_dir, tmp_path, capsys):
    import shutil

    model = tmp_path / "truncated"
    shutil.copytree(models["mlm"], model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert run(rte_dir, model) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot load a BERT model from {model}: ")
    assert not (rte_dir / "train_aug.tsv").exists()


def test_a_folder_where_the_training_file_should_be_is_bad_input(models, rte_dir, capsys):
    (rte_dir / "train.tsv").unlink()
    (rte_dir / "train.tsv").mkdir()
    assert run(rte_dir, models["mlm"]) == 2  # bad input, not an environment fault (exit 1)
    assert capsys.readouterr().err.strip() == f"error: {rte_dir / 'train.tsv'}: is a folder, not a data file"
