"""What a Hugging Face user expects (issue 18, sections 3-5): task labels in config.json, HF-style result
files and a model card beside ours, one TensorBoard run folder per phase, group-readable results, deployable
subnet exports (stock or trust_remote_code loading with the sliced subnet's logits), the tokenizer's own
casing, fractional epochs, offline-loading causes and the progress-bar switches."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from conftest import SMALL, TINY_VOCAB, cli_argv, make_config, make_inputs, make_model
from test_run_glue import VOCAB, _argv, _one_thread, _run, make_env  # noqa: F401 (autouse fixture)
from transformers import AutoModelForSequenceClassification, BertTokenizer

import cli
import export_subnet
import run_glue
import train_gate
from cli import model_options
from transformers_ext.errors import InputError
from transformers_ext.files import write_json
from transformers_ext.inference import dynamic_forward
from transformers_ext.loading import load_model
from transformers_ext.trainer import Schedule
from utils_glue import get_task

RTE_LABELS = {"0": "entailment", "1": "not_entailment"}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    return make_env(tmp_path_factory.mktemp("hf_user"))


@pytest.fixture(scope="module")
def finetuned(env) -> Path:
    out = env["root"] / "ft"
    old = os.umask(0o022)  # a group-readable umask: the result files must follow it (mkstemp gives 0600)
    try:
        _run(env, env["bert"], out, "finetuning", logging_steps=2, num_train_epochs=2)
    finally:
        os.umask(old)
    return out


@pytest.fixture(scope="module")
def depth_then_final(env, finetuned) -> Path:
    """dynabert then final_finetuning in place: two phases writing into one folder."""
    out = env["root"] / "depth"
    _run(env, finetuned, out, "dynabert", width_mult_list="0.5,1.0", depth_mult_list="0.5,1.0", logging_steps=4)
    _run(env, out, out, "final_finetuning", width_mult_list="0.5,1.0", depth_mult_list="0.5,1.0", logging_steps=4)
    return out


# ---- 3. labels, result files, cards ------------------------------------------------------------------------
def test_config_has_task_labels_and_stock_architecture(finetuned):
    config = json.loads((finetuned / "config.json").read_text())
    assert config["id2label"] == RTE_LABELS
    assert config["label2id"] == {"entailment": 0, "not_entailment": 1}
    assert config["architectures"] == ["BertForSequenceClassification"]
    stock = AutoModelForSequenceClassification.from_pretrained(finetuned).eval()
    assert type(stock).__name__ == "BertForSequenceClassification"
    assert stock.config.id2label == {0: "entailment", 1: "not_entailment"}


def test_all_results_and_trainer_state(finetuned):
    ours = json.loads((finetuned / "eval_results.json").read_text())
    flat = json.loads((finetuned / "all_results.json").read_text())
    best = ours["best"]["d1_w1"]
    assert flat["eval_d1_w1_acc"] == best["acc"] and flat["eval_d1_w1_eval_loss"] == best["eval_loss"]
    assert {"train_loss", "train_runtime", "train_samples_per_second"} <= flat.keys()
    assert flat["train_runtime"] > 0 and flat["train_samples_per_second"] > 0
    state = json.loads((finetuned / "trainer_state.json").read_text())
    train_log = [e for e in state["log_history"] if "loss" in e]
    # 32 examples / batch 8 = 4 updates per epoch, 2 epochs, an entry every 2 updates
    assert [e["step"] for e in train_log] == [2, 4, 6, 8]
    assert [e["epoch"] for e in train_log] == [0.5, 1.0, 1.5, 2.0]
    assert all(e["loss"] > 0 and e["learning_rate"] >= 0 for e in train_log)
    assert train_log[0]["learning_rate"] > train_log[-1]["learning_rate"]  # linear decay
    assert flat["train_loss"] == pytest.approx(sum(e["loss"] for e in train_log) / 4)
    evals = [e for e in state["log_history"] if "eval_d1_w1_acc" in e]
    assert [e["step"] for e in evals] == [h["step"] for h in ours["history"]]
    assert state["global_step"] == 8 and state["best_global_step"] == ours["best_step"]


def test_model_card(finetuned):
    card = (finetuned / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers")
    assert "task: RTE" in card and "phase: finetuning" in card and str(finetuned.parent / "bert") in card
    # the command line as it ran: the script and the argv given to main(), not the process's (pytest's)
    command = card.split("## Command line\n\n```bash\n")[1].split("\n```")[0]
    assert command.startswith("python run_glue.py --do_train --cpu --task_name RTE "), command
    assert f"--output_dir {finetuned} " in command and "--training_phase finetuning" in command
    best = json.loads((finetuned / "eval_results.json").read_text())["best"]["d1_w1"]
    assert f"| 1 | 1 | {best['acc']:.4f} |" in card


def test_result_files_group_readable(finetuned, tmp_path):
    for name in ("eval_results.json", "all_results.json", "trainer_state.json", "training_args.json",
                 "README.md", "config.json", "model.safetensors"):
        assert stat.S_IMODE((finetuned / name).stat().st_mode) & 0o040, name
    old = os.umask(0o027)
    try:
        write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o640


def test_one_tensorboard_run_per_phase(depth_then_final):
    runs = sorted(p.name.rsplit("_", 1)[0] for p in (depth_then_final / "runs").iterdir())
    assert runs == ["dynabert", "final_finetuning"]
    for run in (depth_then_final / "runs").iterdir():
        assert any(f.name.startswith("events.out.tfevents") for f in run.iterdir())


# ---- 4. deployable subnets ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, object]:
    folder = tmp_path_factory.mktemp("export") / "src"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
    BertTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))
    model = make_model(make_config(**SMALL, num_labels=3))
    model.save_pretrained(folder)
    return folder, model


def _export(src: Path, out: Path, *flags: str) -> None:
    export_subnet.main(["--model_dir", str(src), "--output_dir", str(out), *flags])


def _logits(model, inputs) -> torch.Tensor:
    return model(input_ids=inputs[0], attention_mask=inputs[1], token_type_ids=inputs[2]).logits


@pytest.mark.parametrize("width, depth, remote", [(1.0, 0.5, False), (1.0, 0.75, False), (0.5, 0.75, True),
                                                  (0.25, 1.0, True)])
def test_export_loads_with_auto_class(source, tmp_path, width, depth, remote):
    src, model = source
    out = tmp_path / "out"
    _export(src, out, "--width_mult", str(width), "--depth_mult", str(depth))
    config = json.loads((out / "config.json").read_text())
    assert ("auto_map" in config) == remote and (out / "modeling_flexbert.py").is_file() == remote
    if not remote:  # stock transformers, no remote code at all
        loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
        assert type(loaded).__module__.startswith("transformers.models.bert")
    else:
        with pytest.raises(Exception):  # noqa: B017 - stock BERT cannot build a narrower subnet
            AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=False)
        loaded = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True).eval()
        assert type(loaded).__module__.startswith("transformers_modules")
    inputs = make_inputs(batch=4)
    expected = model(*inputs, subnet=model.subnet(width, depth)).logits
    torch.testing.assert_close(_logits(loaded, inputs), expected, atol=1e-5, rtol=0)
    assert (out / "model.safetensors").stat().st_size < (src / "model.safetensors").stat().st_size
    assert (out / "README.md").is_file() and not list(tmp_path.glob(".out.*"))


def test_export_mean_pooling_needs_remote_code(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
    BertTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))
    model = make_model(make_config(**SMALL, pooling="mean"))
    model.save_pretrained(folder)
    _export(folder, tmp_path / "out", "--depth_mult", "0.5")
    assert "auto_map" in json.loads((tmp_path / "out" / "config.json").read_text())
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    inputs = make_inputs()
    torch.testing.assert_close(_logits(loaded, inputs), model(*inputs, subnet=model.subnet(1.0, 0.5)).logits,
                               atol=1e-5, rtol=0)


def test_export_gated_routes_like_dynamic_inference(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
    BertTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))
    model = make_model(make_config(**SMALL))
    model.add_gates([0.25, 0.5, 0.75, 1.0], num_gates=4)
    with torch.no_grad():  # gates that choose different widths for different examples
        for gate in model.gates:
            gate.classifier.weight.normal_(0, 2.0)
    model.config.off_ramps = [1, 2]
    model.save_pretrained(folder)
    _export(folder, tmp_path / "out", "--gated", "--early_exit", "--exit_threshold", "0.6", "--depth_mult", "0.75")
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert loaded.config.num_hidden_layers == 3 and len(loaded.gates) == 3
    inputs = make_inputs(batch=6)
    expected = dynamic_forward(model, *inputs, class_to_width=[0.25, 0.5, 0.75, 1.0], depth_mult=0.75,
                               early_exit=True, exit_threshold=0.6, off_ramps=[1, 2])
    assert len(set(expected.heads[:, 0].tolist())) > 1  # the gates really route
    torch.testing.assert_close(_logits(loaded, inputs), expected.logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("flags", [("--gated", "--early_exit", "--depth_mult", "0.5"), ("--width_mult", "0.5")])
def test_export_in_text_classification_pipeline(tmp_path, caplog, flags):
    """A gated or a narrowed export in `pipeline("text-classification", trust_remote_code=True)`: no error
    logged (the stock check knows only the library's own classes), the label names and the model's own
    probabilities back, for single texts and for pairs."""
    import logging

    from transformers import pipeline

    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n")
    BertTokenizer.from_pretrained(str(folder)).save_pretrained(str(folder))
    model = make_model(make_config(**SMALL, num_labels=3, id2label={0: "neg", 1: "neutral", 2: "pos"},
                                   label2id={"neg": 0, "neutral": 1, "pos": 2}))
    model.add_gates([0.25, 0.5, 0.75, 1.0], num_gates=4)
    with torch.no_grad():
        model.classifier.weight.normal_(0, 2.0)  # confident, different answers for different texts
    model.save_pretrained(folder)
    _export(folder, tmp_path / "out", *flags)
    transformers_logger = logging.getLogger("transformers")  # it does not propagate to the root logger
    transformers_logger.addHandler(caplog.handler)
    try:
        classify = pipeline("text-classification", model=str(tmp_path / "out"), trust_remote_code=True)
        texts = ["the cat sat on the mat", "a very bad movie", {"text": "the dog ran home", "text_pair": "a cat"}]
        answers = classify(texts)
    finally:
        transformers_logger.removeHandler(caplog.handler)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    tokenizer = BertTokenizer.from_pretrained(str(tmp_path / "out"))
    for text, answer in zip(texts, answers, strict=True):
        pair = (text["text"], text["text_pair"]) if isinstance(text, dict) else (text,)
        encoded = tokenizer(*pair, return_tensors="pt")
        with torch.no_grad():
            probs = loaded(**encoded).logits.softmax(-1)[0]
        assert answer["label"] == ["neg", "neutral", "pos"][int(probs.argmax())]
        assert answer["score"] == pytest.approx(float(probs.max()), abs=1e-5)


@pytest.mark.parametrize("flags, message", [
    (("--width_mult", "0.05"), "keeps no attention head"),
    (("--depth_mult", "0.1"), "keeps no layer"),
    (("--gated",), "has no gates"),
])
def test_export_errors_are_one_line(source, tmp_path, capsys, flags, message):
    src, _ = source
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(lambda: _export(src, tmp_path / "out", *flags))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and message in err and "\n" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.iterdir())


def test_export_missing_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.run_cli(lambda: _export(tmp_path / "nope", tmp_path / "out"))
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err


# ---- 5. silent misconfigurations ---------------------------------------------------------------------------
def _cased_folder(folder: Path) -> Path:
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Hello", "hello", "world", "."]
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer.from_pretrained(str(folder), do_lower_case=False).save_pretrained(str(folder))
    torch.manual_seed(0)
    from transformers_ext import FlexBertForSequenceClassification

    FlexBertForSequenceClassification(make_config()).save_pretrained(folder)
    return folder


def test_cased_tokenizer_stays_cased(tmp_path):
    folder = _cased_folder(tmp_path / "cased")
    args = run_glue.parse_args(["--model_dir", str(folder), "--task_name", "RTE", "--max_seq_length", "32"])
    assert args.do_lower_case is None
    _, tokenizer = load_model(str(folder), get_task("RTE"), **model_options(args))
    assert tokenizer.tokenize("Hello world") == ["Hello", "world"]
    forced = run_glue.parse_args(["--model_dir", str(folder), "--task_name", "RTE", "--max_seq_length", "32",
                                  "--do_lower_case"])
    _, tokenizer = load_model(str(folder), get_task("RTE"), **model_options(forced))
    assert tokenizer.tokenize("Hello world") == ["hello", "world"]


def test_schedule_fractional_epochs():
    assert Schedule.make(10, 1, 0.5) == Schedule(1, 10, 5, 1)
    assert Schedule.make(10, 1, 2.5) == Schedule(3, 10, 25, 1)
    assert Schedule.make(30, 1, 0.1).total_updates == 3  # not 4 (0.1 * 30 = 3.0000000000000004)
    assert Schedule.make(7, 2, 3.0) == Schedule(3, 3, 9, 2)  # integer epochs as before
    assert Schedule.make(10, 1, 0.01).total_updates == 1  # a tenth of an update still runs one
    with pytest.raises(InputError, match="is 0 updates"):  # rounds to 0: would save the untrained model
        Schedule.make(10, 1, 1e-8)


def test_half_epoch_runs_half_the_updates(env):
    out = env["root"] / "half"
    results = _run(env, env["bert"], out, "finetuning", num_train_epochs=0.5, logging_steps=0)
    # 32 examples / batch 8: 4 updates per epoch, half of them
    assert results["best_step"] == 2 or results["history"][-1]["step"] == 2
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and state["max_steps"] == 2
    assert json.loads((out / "all_results.json").read_text())["epoch"] == 0.5


def test_offline_error_shows_the_cause(env, monkeypatch):
    from transformers_ext import loading

    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        try:
            raise ConnectionError("We couldn't connect to 'https://huggingface.co' (offline mode)")
        except ConnectionError as cause:
            raise OSError() from cause

    monkeypatch.setattr(loading.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(InputError) as info:
        load_model(str(env["bert"]), get_task("RTE"))
    assert len(calls) == 1  # the loader the scripts use is the one patched
    assert "couldn't connect" in str(info.value) and "\n" not in str(info.value)


def test_disable_tqdm_and_env(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    run_glue.parse_args([])
    assert not cli.progress_disabled() and not cli.progress(range(3), disable=False).disable
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert cli.progress_disabled() and cli.progress(range(3), disable=False).disable
    monkeypatch.delenv("TQDM_DISABLE")
    run_glue.parse_args(["--disable_tqdm", "--log_level", "warning"])
    assert cli.progress_disabled() and cli.log_level() == "warning"
    train_gate.parse_args([])  # every parse sets them again
    assert not cli.progress_disabled() and cli.log_level() == "info"


def test_log_level_applies(env, caplog, capsys):
    import logging

    from cli import setup_logging

    run_glue.parse_args(["--log_level", "error"])
    setup_logging(0)
    assert logging.getLogger().level == logging.ERROR
    run_glue.parse_args([])
    setup_logging(0)
    assert logging.getLogger().level == logging.INFO


def test_progress_bar_on_importance(env, capsys, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    run_glue.main(_argv(env, env["bert"], env["root"] / "imp", "dynabertw", width_mult_list="0.5,1.0",
                        num_train_epochs=1, logging_steps=0))
    assert "importance: " in capsys.readouterr().err  # the bar (the log line says "importance on")
    run_glue.main(_argv(env, env["bert"], env["root"] / "imp2", "dynabertw", "--disable_tqdm",
                        width_mult_list="0.5,1.0", num_train_epochs=1, logging_steps=0))
    assert "importance: " not in capsys.readouterr().err


_ = (VOCAB, cli_argv)  # shared helpers of the run_glue tests
