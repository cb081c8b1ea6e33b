"""run_glue.py end to end on a tiny random BERT and a synthetic RTE folder (SPEC §3, §4): the four phases
chain through their output folders, losses, the grafting schedule, the depth phase's layer map and gradients,
best-checkpoint selection, exact resume, and torchrun (2 processes) against one process."""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import cli_argv, save_model_folder
from safetensors.torch import load_file
from torch.utils.data import TensorDataset
from transformers import BertConfig

import run_glue
import train_gate
from transformers_ext import FlexBertForSequenceClassification
from transformers_ext.batching import LENGTH_GROUP, epoch_batches, in_dataset_order, length_sorted_batches
from transformers_ext.distillation import hidden_mse_loss, logit_kd_loss, teacher_layer_map
from transformers_ext.evaluation import subnet_key
from utils_glue import importance_batches

ROOT = Path(__file__).resolve().parent.parent
WORDS = [
    "the", "a", "cat", "dog", "bird", "man", "woman", "child", "sat", "ran", "ate", "saw", "likes", "on", "in",
    "under", "near", "mat", "house", "tree", "park", "road", "red", "blue", "big", "small", "old", "new", "happy",
    "sad", "today", "yesterday", "is", "was", "very", "quite", "and", "then",
]
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "not", "never", ".", ","] + WORDS
MAX_LEN = 24


# ---- tiny model, tokenizer and data ----------------------------------------------------------------------
def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + " ."


def _write_rte(folder: Path, n_train: int = 32, n_dev: int = 16, seed: int = 0) -> None:
    """RTE layout; the label is `not_entailment` exactly when sentence2 contains 'not' (learnable)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True)
    for name, n in (("train.tsv", n_train), ("dev.tsv", n_dev)):
        rows = ["index\tsentence1\tsentence2\tlabel"]
        for i in range(n):
            negated = i % 2 == 1
            s1 = _sentence(rng, rng.randint(4, 7))
            words = _sentence(rng, rng.randint(3, 5)).split()
            if negated:
                words.insert(rng.randint(0, len(words) - 1), "not")
            rows.append(f"{i}\t{s1}\t{' '.join(words)}\t{'not_entailment' if negated else 'entailment'}")
        (folder / name).write_text("\n".join(rows) + "\n", encoding="utf-8")


def _tiny_config(**kwargs) -> BertConfig:
    """hidden 32, 4 layers, 4 heads (head size 8), intermediate 64."""
    options = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                   intermediate_size=64, max_position_embeddings=64, num_labels=2)
    return BertConfig(**{**options, **kwargs})


def _write_model(folder: Path, seed: int = 0) -> None:
    save_model_folder(folder, VOCAB, _tiny_config(), seed)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run far faster on one thread (and run_glue's --num_threads 1 sets it process-wide)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_env(root: Path) -> dict[str, Path]:
    """A tiny RTE folder and BERT under `root` (also test_hf_user.py's)."""
    _write_rte(root / "RTE")
    _write_model(root / "bert")
    return {"root": root, "data": root / "RTE", "bert": root / "bert", "cache": root / "cache"}


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    return make_env(tmp_path_factory.mktemp("run_glue"))


def _argv(env: dict[str, Path], model_dir: Path, output_dir: Path, phase: str, *extra: str, **flags) -> list[str]:
    options = {
        "task_name": "RTE", "data_dir": env["data"], "model_dir": model_dir, "output_dir": output_dir,
        "cache_dir": env["cache"], "training_phase": phase, "max_seq_length": MAX_LEN,
        "per_gpu_train_batch_size": 8, "per_gpu_eval_batch_size": 16, "learning_rate": 1e-3,
        "num_train_epochs": 1, "logging_steps": 2, "num_threads": 1, "seed": 42,
    }
    options.update(flags)
    return cli_argv(options, *extra, switches=("--do_train", "--cpu"))


def _run(env, model_dir, output_dir, phase, *extra, **flags) -> dict:
    run_glue.main(_argv(env, model_dir, output_dir, phase, *extra, **flags))
    return json.loads((Path(output_dir) / "eval_results.json").read_text())


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    """Every tensor within `atol` (default: bit-identical)."""
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


def _check_output_folder(folder: Path, expected_subnets: set[str]) -> dict:
    for name in ("config.json", "model.safetensors", "vocab.txt", "eval_results.json", "training_args.json"):
        assert (folder / name).is_file(), name
    results = json.loads((folder / "eval_results.json").read_text())
    assert set(results["best"]) == expected_subnets
    for metrics in results["best"].values():
        assert 0.0 <= metrics["acc"] <= 1.0
    model = FlexBertForSequenceClassification.from_pretrained(str(folder))
    assert model.config.num_labels == 2 and model.config.num_hidden_layers == 4
    loaded = model.state_dict()
    saved = _weights(folder)
    for name, tensor in saved.items():
        torch.testing.assert_close(loaded[name], tensor, atol=0, rtol=0)
    assert (folder / "vocab.txt").read_text().split("\n")[: len(VOCAB)] == VOCAB
    return results


def _subnets(widths, depths) -> set[str]:
    return {subnet_key(w, d) for w in widths for d in depths}


WIDTHS = (0.25, 0.5, 0.75, 1.0)
DEPTHS = (0.5, 0.75, 1.0)


# ---- the four phases chained through their folders ------------------------------------------------------
@pytest.fixture(scope="module")
def finetuned(env) -> Path:
    out = env["root"] / "finetuned"
    _run(env, env["bert"], out, "finetuning", num_train_epochs=2)
    return out


REWIRED_LOGITS: list[torch.Tensor] = []  # the width phase's full-width logits on _batch() right after rewiring


@pytest.fixture(scope="module")
def width_model(env, finetuned) -> Path:
    out = env["root"] / "dynabertw"
    rewire = run_glue.rewire

    def rewire_and_record(model, *importance):
        rewire(model, *importance)
        with torch.no_grad():
            REWIRED_LOGITS.append(model.eval()(*_batch()[:3]).logits)
        model.train()

    with pytest.MonkeyPatch.context() as monkeypatch:
        calls = _record_grafts(monkeypatch)
        monkeypatch.setattr(run_glue, "rewire", rewire_and_record)
        _run(env, finetuned, out, "dynabertw")
    assert calls == [], "grafted without --graft_during_training"
    return out


@pytest.fixture(scope="module")
def depth_model(env, width_model) -> Path:
    out = env["root"] / "dynabert"
    _run(env, width_model, out, "dynabert", depth_mult_list="0.5,0.75,1.0")
    return out


def test_finetuning_phase(finetuned):
    results = _check_output_folder(finetuned, {"d1_w1"})
    assert results["phase"] == "finetuning"
    # 32 examples / batch 8 = 4 updates per epoch, 2 epochs; evaluated every 2 updates
    assert [h["step"] for h in results["history"]] == [2, 4, 6, 8]
    assert (finetuned / "checkpoint-8" / "training_state.pt").is_file()


def test_dynabertw_phase(width_model, finetuned):
    results = _check_output_folder(width_model, _subnets(WIDTHS, [1.0]))
    assert results["phase"] == "dynabertw"
    # rewiring permutes heads/neurons: the full-width function starts from the fine-tuned model's
    teacher = FlexBertForSequenceClassification.from_pretrained(str(finetuned)).eval()
    with torch.no_grad():
        expected = teacher(*_batch()[:3]).logits
    assert len(REWIRED_LOGITS) == 1
    torch.testing.assert_close(REWIRED_LOGITS[0], expected, rtol=0, atol=1e-5)
    assert not torch.allclose(expected[:, 0], expected[:, 1])  # not a constant function


def test_dynabert_phase_evaluates_all_twelve_subnets(depth_model):
    results = _check_output_folder(depth_model, _subnets(WIDTHS, DEPTHS))
    assert len(results["best"]) == 12
    for entry in results["history"]:
        assert len(entry["results"]) == 12
        assert entry["score_sum"] == pytest.approx(sum(r["acc"] for r in entry["results"].values()))


def _gate_folder_config(env, backbone: Path, out: Path) -> dict:
    """Gates trained (1 epoch) on `backbone` with no --off_ramps: the saved config.json."""
    train_gate.main(_argv(env, backbone, out, "traingate", width_mult_list="0.25,0.5,0.75,1.0",
                          gate_setting="0.25,0.5,0.75,1.0", learning_rate=1e-2))
    return json.loads((out / "config.json").read_text())


def test_depth_stage_saves_its_depths_and_gate_off_ramps_default_to_them(env, width_model, tmp_path):
    """The depth stage writes the depths it trained into config.json (`depth_mult_list`, descending, as
    trained); a stage at full depth only writes none. Gates trained on it get their off-ramps after exactly
    those depths (L=4: depth 0.25 keeps 1 layer -> off-ramp 0), which inference uses by default; a backbone
    folder without the key (older runs) keeps the old default, after depths 0.5 and 0.75 (off-ramps 1, 2)."""
    assert "depth_mult_list" not in json.loads((width_model / "config.json").read_text())
    backbone = tmp_path / "dynabert"
    _run(env, width_model, backbone, "dynabert", depth_mult_list="0.25,1.0", max_steps=2)
    assert json.loads((backbone / "config.json").read_text())["depth_mult_list"] == [1.0, 0.25]

    gates = _gate_folder_config(env, backbone, tmp_path / "gates")
    assert gates["depth_mult_list"] == [1.0, 0.25] and gates["off_ramps"] == [0]
    inference = tmp_path / "inference"
    train_gate.main(cli_argv({"task_name": "RTE", "data_dir": env["data"], "model_dir": tmp_path / "gates",
                              "output_dir": inference, "cache_dir": env["cache"], "max_seq_length": MAX_LEN,
                              "num_threads": 1}, "--wd_dynamic", "--early_exit", switches=("--do_eval", "--cpu")))
    assert json.loads((inference / "inference_results.json").read_text())["off_ramps"] == [0]

    old = tmp_path / "old_backbone"  # the same backbone as an older run saved it
    shutil.copytree(backbone, old)
    config = json.loads((old / "config.json").read_text())
    del config["depth_mult_list"]
    (old / "config.json").write_text(json.dumps(config))
    old_gates = _gate_folder_config(env, old, tmp_path / "old_gates")
    assert "depth_mult_list" not in old_gates and old_gates["off_ramps"] == [1, 2]


def test_final_finetuning_phase(env, depth_model):
    out = env["root"] / "final"
    _run(env, depth_model, out, "final_finetuning", depth_mult_list="0.5,0.75,1.0")
    results = _check_output_folder(out, _subnets(WIDTHS, DEPTHS))
    assert results["phase"] == "final_finetuning"
    # the result is itself a valid input to a further phase (e.g. writing back into the same folder)
    _run(env, out, out, "final_finetuning", depth_mult_list="0.5,1.0", width_mult_list="0.5,1.0",
         logging_steps=4, max_train_samples=8)
    _check_output_folder(out, _subnets([0.5, 1.0], [0.5, 1.0]))


@pytest.mark.parametrize("phase", ["dynabert", "final_finetuning"])
def test_prefix_shared_passes_train_like_separate_passes(env, finetuned, tmp_path, phase):
    """The default path (one forward per width, its depths' losses summed: prefix_shared_loss) and
    --separate_subnet_passes (one forward and backward per subnet) give the same weights after two updates
    without dropout, up to float rounding."""
    flags = dict(width_mult_list="0.5,1.0", depth_mult_list="0.5,0.75,1.0", max_steps=2, logging_steps=2,
                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    _run(env, finetuned, tmp_path / "shared", phase, **flags)
    _run(env, finetuned, tmp_path / "separate", phase, "--separate_subnet_passes", **flags)
    shared, separate = _weights(tmp_path / "shared" / "checkpoint-2"), _weights(tmp_path / "separate" / "checkpoint-2")
    _assert_same_weights(shared, separate, atol=1e-5)
    # and the two updates did move the weights (far more than the tolerance)
    start = _weights(finetuned)
    assert max(float((shared[n] - start[n]).abs().max()) for n in start) > 1e-4


# ---- losses -------------------------------------------------------------------------------------------------
def test_logit_kd_loss_matches_formula():
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    expected = torch.stack([
        -sum(torch.softmax(teacher[b], 0)[c] * torch.log_softmax(student[b], 0)[c] for c in range(3))
        for b in range(5)
    ]).mean()
    torch.testing.assert_close(logit_kd_loss(student, teacher), expected)
    # identical logits: the loss is the teacher's entropy, its minimum over student logits
    p = torch.softmax(teacher, -1)
    torch.testing.assert_close(logit_kd_loss(teacher, teacher), -(p * p.log()).sum(-1).mean())
    # regression (one output): MSE of the two predictions
    s, t = torch.tensor([[1.0], [2.0], [4.0]]), torch.tensor([[0.0], [2.5], [1.0]])
    torch.testing.assert_close(logit_kd_loss(s, t), torch.tensor((1 + 0.25 + 9) / 3))


def test_hidden_mse_loss_is_a_sum_of_elementwise_means():
    gen = torch.Generator().manual_seed(1)
    student = [torch.randn(2, 3, 4, generator=gen) for _ in range(3)]
    teacher = [torch.randn(2, 3, 4, generator=gen) for _ in range(5)]
    layer_map = [0, 2, 4]
    expected = sum(((s - teacher[m]) ** 2).sum() / s.numel() for s, m in zip(student, layer_map))
    torch.testing.assert_close(hidden_mse_loss(student, teacher, layer_map), expected)
    with pytest.raises(ValueError):
        hidden_mse_loss(student, teacher, [0, 2])  # one teacher index per student state


@pytest.mark.parametrize(
    "num_layers, depth, expected",
    [
        (12, 0.5, [0, 2, 4, 6, 8, 10, 12]),
        (12, 0.75, [0, 1, 2, 4, 5, 6, 8, 9, 10, 12]),
        (12, 1.0, list(range(13))),
        (6, 0.5, [0, 2, 4, 6]),
        (6, 0.75, [0, 1, 2, 4, 6]),
        (4, 0.5, [0, 2, 4]),
    ],
)
def test_teacher_layer_map(num_layers, depth, expected):
    from transformers_ext import layers_kept

    n = layers_kept(_tiny_config(num_hidden_layers=num_layers), depth)
    assert teacher_layer_map(n, depth, num_layers) == expected


def _batch(seed: int = 0, size: int = 8, length: int = 12) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, len(VOCAB), (size, length), generator=gen)
    input_ids[:, 0] = VOCAB.index("[CLS]")
    attention_mask = torch.ones(size, length, dtype=torch.long)
    attention_mask[size // 2 :, length - 3 :] = 0
    input_ids[attention_mask == 0] = 0
    token_type_ids = torch.zeros(size, length, dtype=torch.long)
    token_type_ids[:, length // 2 :] = 1
    token_type_ids[attention_mask == 0] = 0
    labels = torch.randint(0, 2, (size,), generator=gen)
    return [input_ids, attention_mask, token_type_ids, labels]


def _model(seed: int) -> FlexBertForSequenceClassification:
    torch.manual_seed(seed)
    return FlexBertForSequenceClassification(_tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))


def _phase_args(phase: str, *extra: str):
    return run_glue.parse_args(["--training_phase", phase, "--depth_mult_list", "0.5,0.75,1.0", *extra])


@pytest.mark.parametrize("phase, with_teacher", [
    ("finetuning", False), ("dynabertw", False), ("dynabertw", True), ("dynabert", True), ("final_finetuning", False),
])
def test_phase_loss_decreases_on_a_fixed_batch(phase, with_teacher):
    args = _phase_args(phase)
    model = _model(0).train()
    teacher = _model(1).eval() if with_teacher else None
    batch = _batch()
    widths, depths = run_glue.phase_subnets(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)

    def total_loss() -> torch.Tensor:
        teacher_out = None
        if teacher is not None:
            with torch.no_grad():
                teacher_out = teacher(*batch[:3])
        return sum(run_glue.subnet_loss(args, model, batch, teacher_out, w, d) for d in depths for w in widths)

    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        loss = total_loss()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = total_loss().item()
    assert final < losses[0] * 0.9, (losses, final)


def test_depth_phase_loss_formula_and_gradients_stop_at_the_kept_layers():
    """At depth 0.5 of a 4-layer model the subnet runs layers 0-1 and matches teacher states [0, 2, 4]; only
    those layers (plus embeddings, pooler, classifier) receive gradients from its loss."""
    args = _phase_args("dynabert", "--depth_lambda1", "0.7", "--depth_lambda2", "0.3")
    model, teacher = _model(0).train(), _model(1).eval()
    batch = _batch()
    with torch.no_grad():
        teacher_out = teacher(*batch[:3])
    for depth, n in ((0.5, 2), (0.75, 3)):
        model.zero_grad(set_to_none=True)
        loss = run_glue.subnet_loss(args, model, batch, teacher_out, 0.5, depth)
        with torch.no_grad():
            out = model(*batch[:3], subnet=model.subnet(0.5, depth))
        assert len(out.hidden_states) == n + 1
        layer_map = {2: [0, 2, 4], 3: [0, 1, 2, 4]}[n]
        expected = 0.7 * logit_kd_loss(out.logits, teacher_out.logits) + 0.3 * sum(
            F.mse_loss(s, teacher_out.hidden_states[m]) for s, m in zip(out.hidden_states, layer_map))
        torch.testing.assert_close(loss, expected)
        loss.backward()
        for i, layer in enumerate(model.bert.encoder.layer):
            grads = [p.grad for p in layer.parameters()]
            if i < n:
                assert all(g is not None for g in grads)
                assert sum(g.abs().sum() for g in grads) > 0
            else:
                assert all(g is None or not g.any() for g in grads), f"layer {i} trained at depth {depth}"
        # width 0.5 of 4 heads (head size 8): rows 16.. of the query and neurons 32.. get no gradient
        query, inter = model.bert.encoder.layer[0].attention.self.query, model.bert.encoder.layer[0].intermediate
        assert query.weight.grad[:16].abs().sum() > 0 and not query.weight.grad[16:].any()
        assert not inter.dense.weight.grad[32:].any()
        assert model.classifier.weight.grad.abs().sum() > 0


def test_phase_subnets_order():
    widths, depths = run_glue.phase_subnets(_phase_args("dynabert", "--width_mult_list", "0.5,1.0,0.25"))
    assert widths == [1.0, 0.5, 0.25] and depths == [1.0, 0.75, 0.5]
    assert run_glue.phase_subnets(_phase_args("dynabertw")) == ([1.0, 0.75, 0.5, 0.25], [1.0])
    assert run_glue.phase_subnets(_phase_args("finetuning")) == ([1.0], [1.0])


# ---- grafting schedule ----------------------------------------------------------------------------------------
def _grafts(graft_step: int, graft_stop: int, last_step: int) -> list[int]:
    return [s for s in range(0, last_step + 1) if run_glue.should_graft(s, graft_step, graft_stop)]


def test_graft_schedule_rte_numbers():
    assert run_glue.graft_schedule(2490, 32, 3) == (25, 155)
    steps_per_epoch = -(-2490 // 32)  # 78
    assert _grafts(25, 155, 3 * steps_per_epoch) == [25, 50, 75, 100, 125, 150]
    assert run_glue.graft_schedule(2490, 32, 8) == (25, 544)
    grafts = _grafts(25, 544, 8 * steps_per_epoch)
    assert len(grafts) == 21 and grafts[-1] == 525
    assert not run_glue.should_graft(0, 25, 155)


def test_graft_schedule_small_data_does_not_divide_by_zero():
    assert run_glue.graft_schedule(40, 32, 3) == (1, 2)  # N/B = 1.25 < 3 -> graft_step 1
    assert _grafts(1, 2, 6) == [1, 2]
    assert run_glue.graft_schedule(10, 32, 1) == (1, 0)
    assert _grafts(1, 0, 5) == []


class _StepRecorder:
    """Wraps run_glue.build_optimizer to see the scheduler, whose last_epoch is the global step."""

    def __init__(self, monkeypatch):
        self.scheduler = None
        original = run_glue.build_optimizer

        def build(*args, **kwargs):
            optimizer, self.scheduler = original(*args, **kwargs)
            return optimizer, self.scheduler

        monkeypatch.setattr(run_glue, "build_optimizer", build)

    @property
    def step(self) -> int:
        return self.scheduler.last_epoch


def _record_grafts(monkeypatch) -> list[int]:
    recorder, calls = _StepRecorder(monkeypatch), []
    original = run_glue.graft

    def graft(model, head_importance, neuron_importance, *args, **kwargs):
        calls.append(recorder.step)
        assert head_importance.shape == (4, 4) and neuron_importance.shape == (4, 64)
        return original(model, head_importance, neuron_importance, *args, **kwargs)

    monkeypatch.setattr(run_glue, "graft", graft)
    return calls


def test_grafting_fires_at_scheduled_steps_in_a_real_run(env, finetuned, tmp_path, monkeypatch):
    calls = _record_grafts(monkeypatch)
    out = tmp_path / "grafted"
    # 32 examples, batch 4: 8 updates/epoch -> graft_step int(8/3) = 2, graft_stop 8 * (2 - 1) = 8
    results = _run(env, finetuned, out, "dynabertw", "--graft_during_training", per_gpu_train_batch_size=4,
                   num_train_epochs=2, logging_steps=8, width_mult_list="0.5,1.0")
    assert calls == [2, 4, 6, 8]
    assert [h["step"] for h in results["history"]] == [8, 16]
    _check_output_folder(out, _subnets([0.5, 1.0], [1.0]))


def test_one_epoch_width_stage_never_grafts_and_says_so(env, finetuned, tmp_path, monkeypatch, capfd):
    # SPEC: no graft in the last epoch, so a 1-epoch width stage (the quick profile's) grafts zero times
    calls = _record_grafts(monkeypatch)
    _run(env, finetuned, tmp_path / "one_epoch", "dynabertw", "--graft_during_training",
         per_gpu_train_batch_size=4, num_train_epochs=1, logging_steps=8, width_mult_list="0.5,1.0")
    assert calls == []
    assert "no graft will happen" in capfd.readouterr().err


def test_same_seed_gives_bit_identical_width_stage(env, finetuned, tmp_path):
    # rewiring, grafting, length-grouped shuffling and dropout all draw from seeded state: two runs must agree
    # to the bit, and a different seed must not (else the check could not fail)
    flags = dict(per_gpu_train_batch_size=4, num_train_epochs=2, logging_steps=8, width_mult_list="0.5,1.0")
    extra = ("--graft_during_training", "--group_by_length", "--trim_padding")
    runs = {name: tmp_path / name for name in ("a", "b", "other_seed")}
    for name, out in runs.items():
        _run(env, finetuned, out, "dynabertw", *extra, **flags, seed=7 if name == "other_seed" else 42)
    a, b, other = (_weights(out) for out in runs.values())
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert not all(torch.equal(a[name], other[name]) for name in a)


def test_width_distil_always_distils_every_width_from_the_input_model(env, finetuned, tmp_path, monkeypatch):
    # the reference distils the width stage only on augmented data; --width_distil always also on the original
    calls = []
    original = run_glue.logit_kd_loss

    def kd(student_logits, teacher_logits):
        calls.append(student_logits.shape)
        return original(student_logits, teacher_logits)

    monkeypatch.setattr(run_glue, "logit_kd_loss", kd)
    flags = dict(per_gpu_train_batch_size=8, num_train_epochs=1, logging_steps=8, width_mult_list="0.5,1.0")
    _run(env, finetuned, tmp_path / "gold", "dynabertw", **flags)
    assert calls == []
    _run(env, finetuned, tmp_path / "distil", "dynabertw", "--width_distil", "always", **flags)
    assert len(calls) == 2 * 4  # two widths x 4 updates (32 examples, batch 8)
    gold, distil = _weights(tmp_path / "gold"), _weights(tmp_path / "distil")
    assert not all(torch.equal(gold[name], distil[name]) for name in gold)


@pytest.mark.parametrize("max_steps, steps_evaluated", [(3, [2, 3]), (6, [2, 4, 6])])
def test_max_steps_overrides_epochs(env, finetuned, tmp_path, max_steps, steps_evaluated):
    # 32 examples / batch 8 = 4 updates per epoch; one epoch asked for, so 6 updates need a second epoch
    out = tmp_path / f"max_steps_{max_steps}"
    results = _run(env, finetuned, out, "final_finetuning", width_mult_list="1.0", max_steps=max_steps)
    assert [h["step"] for h in results["history"]] == steps_evaluated
    state = torch.load(out / f"checkpoint-{max_steps}" / "training_state.pt", weights_only=False)
    assert state["scheduler"]["last_epoch"] == max_steps
    assert state["scheduler"]["_last_lr"] == [0.0, 0.0]  # the linear decay ends exactly at the last update


def test_gradient_accumulation_leaves_no_gradient_across_epochs(env, finetuned, tmp_path, monkeypatch):
    # 32 examples / batch 12 = 3 batches per epoch: with 2 batches per update, the third would make no update
    calls, original = [], run_glue.subnet_loss

    def subnet_loss(args, model, batch, *rest):
        calls.append(len(batch[0]))
        return original(args, model, batch, *rest)

    monkeypatch.setattr(run_glue, "subnet_loss", subnet_loss)
    out = tmp_path / "accumulated"
    results = _run(env, finetuned, out, "final_finetuning", width_mult_list="1.0", num_train_epochs=2,
                   per_gpu_train_batch_size=12, gradient_accumulation_steps=2, logging_steps=100)
    assert calls == [12, 12, 12, 12]  # two full micro-batches per epoch; the 8-example leftover never runs
    assert [h["step"] for h in results["history"]] == [2]


# ---- batching ------------------------------------------------------------------------------------------------
def _length_dataset(n: int = 700, max_len: int = 40) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, max_len + 1, (n,), generator=gen)
    mask = (torch.arange(max_len)[None, :] < lengths[:, None]).long()
    return TensorDataset(torch.arange(n)[:, None] * mask, mask, torch.zeros_like(mask), torch.arange(n))


def _epoch(dataset, **kwargs) -> list[list[torch.Tensor]]:
    return list(epoch_batches(dataset, 4, seed=3, epoch=1, **kwargs))


def test_group_by_length_is_a_shuffle_with_fewer_padded_tokens():
    dataset = _length_dataset()
    lengths = dataset.tensors[1].sum(1)
    plain, grouped = _epoch(dataset), _epoch(dataset, lengths=lengths)
    ids = torch.cat([b[3] for b in grouped])
    assert sorted(ids.tolist()) == list(range(len(dataset)))  # every example once
    # the same shuffle, only reordered inside each run of LENGTH_GROUP batches (50 x 4 examples)
    plain_ids = torch.cat([b[3] for b in plain])
    for start in range(0, len(dataset), 4 * LENGTH_GROUP):
        chunk = slice(start, start + 4 * LENGTH_GROUP)
        assert sorted(ids[chunk].tolist()) == sorted(plain_ids[chunk].tolist())
        assert (lengths[ids[chunk]].diff() <= 0).all()  # longest first
    padded = {name: sum(int(b[1].sum(1).max()) * len(b[3]) for b in batches)
              for name, batches in (("plain", plain), ("grouped", grouped))}
    assert padded["grouped"] < 0.7 * padded["plain"]
    again = _epoch(dataset, lengths=lengths)
    assert all(torch.equal(a[3], b[3]) for a, b in zip(grouped, again))  # deterministic, so resumable
    resumed = _epoch(dataset, lengths=lengths, start_batch=60)
    assert all(torch.equal(a[3], b[3]) for a, b in zip(grouped[60:], resumed, strict=True))


def test_group_by_length_shards_each_global_batch_across_processes():
    dataset = _length_dataset(n=101)
    lengths = dataset.tensors[1].sum(1)
    single = list(epoch_batches(dataset, 8, seed=3, epoch=0, lengths=lengths))
    ranks = [list(epoch_batches(dataset, 4, seed=3, epoch=0, rank=r, world=2, lengths=lengths)) for r in (0, 1)]
    for whole, part0, part1 in zip(single, *ranks, strict=True):
        assert sorted(whole[3].tolist()) == sorted(part0[3].tolist() + part1[3].tolist())


def test_length_sorted_batches_cover_every_example_once_longest_first_and_trimmed():
    dataset = _length_dataset(n=103)
    lengths = dataset.tensors[1].sum(1)
    batches = list(length_sorted_batches(dataset, 8))
    assert [len(idx) for idx, _ in batches] == [8] * 12 + [7]
    order = torch.cat([idx for idx, _ in batches])
    assert sorted(order.tolist()) == list(range(103))
    assert (lengths[order].diff() <= 0).all()
    for idx, batch in batches:
        assert torch.equal(batch[3], idx)  # the batch holds exactly the indexed examples
        assert batch[1].shape[1] == int(lengths[idx].max())  # padding trimmed to the batch's longest
    padded = sum(b[1].numel() for _, b in batches)
    assert padded < 0.7 * sum(min(8, 103 - s) * int(lengths[s:s + 8].max()) for s in range(0, 103, 8))
    # in_dataset_order undoes the order, along any dimension
    assert torch.equal(in_dataset_order([b[3] for _, b in batches], [i for i, _ in batches]), torch.arange(103))
    rows = in_dataset_order([b[3][None, :].repeat(2, 1) for _, b in batches], [i for i, _ in batches], dim=1)
    assert torch.equal(rows, torch.arange(103).repeat(2, 1))


@pytest.mark.parametrize("max_examples, used", [(40, 64), (64, 64), (None, 103), (500, 103)])
def test_importance_uses_the_same_examples_in_file_order_and_by_length(max_examples, used):
    dataset = _length_dataset(n=103)
    file_order = list(importance_batches(dataset, 32, max_examples, by_length=False))
    by_length = list(importance_batches(dataset, 32, max_examples, by_length=True))
    # whole batches until max_examples are covered, in file order; the same examples grouped by length
    assert torch.cat([b[3] for b in file_order]).tolist() == list(range(used))
    assert sorted(torch.cat([b[3] for b in by_length]).tolist()) == list(range(used))
    lengths = dataset.tensors[1].sum(1)
    assert all(b[1].shape[1] == int(lengths[b[3]].max()) for b in file_order + by_length)  # trimmed


# ---- best-checkpoint selection -------------------------------------------------------------------------------
@pytest.mark.parametrize("scripted, best_step", [
    # (w=1.0, w=0.5) scores at steps 1..4: step 3 has the best full width, step 2 the best sum; a tie later
    # (step 4) does not replace the best
    ([(0.9, 0.0), (0.6, 0.6), (1.0, 0.1), (0.7, 0.5)], 2),
    # all sums negative (e.g. CoLA's MCC): the best starts at -inf, so a model is still saved
    ([(-0.5, -0.5), (-0.2, -0.3), (-0.9, -0.1), (-1.0, -1.0)], 2),
    ([(0.1, 0.1), (0.2, 0.1), (0.2, 0.2), (0.5, 0.5)], 4),
])
def test_best_checkpoint_is_the_highest_summed_score(env, finetuned, tmp_path, monkeypatch, scripted, best_step):
    recorder, snapshots = _StepRecorder(monkeypatch), {}

    def fake_evaluate(model, task_name, dev_sets, widths, depths, batch_size, device, precision="fp32", rank=0,
                      world=1):
        step = recorder.step
        snapshots[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        w1, w05 = scripted[step - 1]
        assert sorted(widths, reverse=True) == [1.0, 0.5] and list(depths) == [1.0]
        return {subnet_key(1.0, 1.0): {"acc": w1, "eval_loss": 0.0},
                subnet_key(0.5, 1.0): {"acc": w05, "eval_loss": 0.0}}

    monkeypatch.setattr(run_glue, "evaluate_subnets", fake_evaluate)
    out = tmp_path / "best"
    # 32 examples / batch 8 = 4 updates, evaluated after each
    results = _run(env, finetuned, out, "final_finetuning", logging_steps=1, width_mult_list="0.5,1.0")
    assert sorted(snapshots) == [1, 2, 3, 4]
    assert results["best_step"] == best_step
    assert results["best_score_sum"] == pytest.approx(sum(scripted[best_step - 1]))
    assert [h["step"] for h in results["history"]] == [1, 2, 3, 4]
    saved = _weights(out)
    for name, tensor in saved.items():
        torch.testing.assert_close(tensor, snapshots[best_step][name], atol=0, rtol=0)
    if best_step != 4:  # training moved on after the best step: the root folder is not the last model
        assert any(not torch.equal(saved[n], snapshots[4][n]) for n in saved)
    _assert_same_weights(_weights(out / "checkpoint-4"), {n: snapshots[4][n] for n in saved})
    state = torch.load(out / "checkpoint-4" / "training_state.pt", weights_only=False)
    assert state["best_score"] == pytest.approx(sum(scripted[best_step - 1]))


def test_eval_on_start_keeps_the_input_model_unless_training_beats_it(env, finetuned, tmp_path, monkeypatch):
    """--eval_on_start: a step-0 evaluation joins the history and competes for the best model (no checkpoint
    at step 0); here it is the best, so final fine-tuning saves its input model unchanged."""
    recorder = _StepRecorder(monkeypatch)

    def fake_evaluate(model, task_name, dev_sets, widths, depths, batch_size, device, precision="fp32", rank=0,
                      world=1):
        acc = 0.9 if recorder.step == 0 else 0.5
        return {subnet_key(w, 1.0): {"acc": acc, "eval_loss": 0.0} for w in widths}

    monkeypatch.setattr(run_glue, "evaluate_subnets", fake_evaluate)
    out = tmp_path / "start"
    results = _run(env, finetuned, out, "final_finetuning", "--eval_on_start", logging_steps=1,
                   width_mult_list="0.5,1.0")
    assert [h["step"] for h in results["history"]] == [0, 1, 2, 3, 4]
    assert results["best_step"] == 0 and results["best_score_sum"] == pytest.approx(1.8)
    assert not (out / "checkpoint-0").exists() and (out / "checkpoint-4").is_dir()
    saved, before = _weights(out), _weights(finetuned)
    assert saved.keys() == before.keys()
    _assert_same_weights(saved, before)
    assert any(not torch.equal(v, before[n]) for n, v in _weights(out / "checkpoint-4").items())  # it did train


def test_eval_on_start_changes_no_training(env, finetuned, tmp_path):
    """The step-0 evaluation draws no random numbers: the trained weights are bit-identical without it."""
    runs = {}
    for name, extra in (("plain", ()), ("start", ("--eval_on_start",))):
        results = _run(env, finetuned, tmp_path / name, "final_finetuning", *extra, width_mult_list="0.5,1.0")
        runs[name] = (results, _weights(tmp_path / name / "checkpoint-4"))
    assert [h["step"] for h in runs["start"][0]["history"]] == [0, 2, 4]
    assert runs["start"][0]["history"][1:] == runs["plain"][0]["history"]
    _assert_same_weights(runs["start"][1], runs["plain"][1])


def test_balance_subnet_gradients_reaches_the_loop_and_changes_training(env, finetuned, tmp_path, monkeypatch):
    """--balance_subnet_gradients turns on fit's per-loss balancing (one loss per subnet with separate passes)
    and so trains other weights than the plain sum."""
    seen = []
    real_fit = run_glue.fit
    monkeypatch.setattr(run_glue, "fit", lambda **kw: seen.append(kw["balance_losses"]) or real_fit(**kw))
    weights = {}
    for name, extra in (("plain", ()), ("balanced", ("--balance_subnet_gradients",))):
        _run(env, finetuned, tmp_path / name, "final_finetuning", "--separate_subnet_passes", *extra,
             width_mult_list="0.25,1.0", depth_mult_list="0.5,1.0")
        weights[name] = _weights(tmp_path / name / "checkpoint-4")
    assert seen == [False, True]
    assert any(not torch.allclose(v, weights["balanced"][n]) for n, v in weights["plain"].items())


# ---- resume ------------------------------------------------------------------------------------------------------
class _Interrupted(Exception):
    pass


def test_resume_continues_exactly(env, finetuned, tmp_path, monkeypatch):
    """dynabertw with grafting and dropout on, shuffled: 2 epochs x 4 updates, checkpoints at 3, 6, 8. A run
    killed after the step-3 checkpoint and resumed ends where the uninterrupted run ends."""
    flags = dict(num_train_epochs=2, logging_steps=3, width_mult_list="0.5,1.0", warmup_steps=2)
    extra = ("--graft_during_training", "--group_by_length", "--trim_padding")
    full = tmp_path / "full"
    full_results = _run(env, finetuned, full, "dynabertw", *extra, **flags)

    recorder = _StepRecorder(monkeypatch)
    original_save = run_glue.save_checkpoint
    lrs = {}

    def save_then_die(output_dir, model, tokenizer, state):
        original_save(output_dir, model, tokenizer, state)
        lrs[state["global_step"]] = recorder.scheduler.get_last_lr()
        if state["global_step"] == 3:
            raise _Interrupted

    monkeypatch.setattr(run_glue, "save_checkpoint", save_then_die)
    part = tmp_path / "part"
    with pytest.raises(_Interrupted):
        _run(env, finetuned, part, "dynabertw", *extra, **flags)
    assert (part / "checkpoint-3" / "training_state.pt").is_file()
    part_results = _run(env, finetuned, part, "dynabertw", "--resume_from_checkpoint", *extra, **flags)

    assert sorted(lrs) == [3, 6, 8]
    assert [h["step"] for h in part_results["history"]] == [h["step"] for h in full_results["history"]] == [3, 6, 8]
    _assert_same_weights(_weights(part / "checkpoint-8"), _weights(full / "checkpoint-8"))
    _assert_same_weights(_weights(part), _weights(full))
    full_state = torch.load(full / "checkpoint-8" / "training_state.pt", weights_only=False)
    part_state = torch.load(part / "checkpoint-8" / "training_state.pt", weights_only=False)
    assert part_state["global_step"] == full_state["global_step"] == 8
    assert part_state["scheduler"]["last_epoch"] == full_state["scheduler"]["last_epoch"] == 8
    assert part_state["scheduler"]["_last_lr"] == pytest.approx(full_state["scheduler"]["_last_lr"])
    # the LR right after the resume point continues the schedule (warm-up 2, linear decay to 0 at step 8)
    assert lrs[6] == pytest.approx([1e-3 * (8 - 6) / (8 - 2)] * len(lrs[6]))
    for a, b in zip(part_results["history"], full_results["history"]):
        assert a["score_sum"] == pytest.approx(b["score_sum"])


# ---- torchrun ------------------------------------------------------------------------------------------------------
LATE_RANK_LAUNCHER = """\
import sys
sys.path.insert(0, {root!r})
import torch
import torch.distributed as dist
import run_glue

# Rank 1 checks the output folder only once rank 0 has reached the barrier after its own check: rank 0 must not
# have written into the folder by then (else rank 1 takes it for another run's folder and refuses it). The
# broadcast pairs rank 0's arrival at its first barrier with rank 1's wait: an order, not a sleep.
barrier, prepare_output_dir = dist.barrier, run_glue.prepare_output_dir


def rank_0_reached_its_barrier():
    dist.broadcast(torch.zeros(1), src=0)


def first_barrier(*args, **kwargs):
    dist.barrier = barrier
    if dist.get_rank() == 0:
        rank_0_reached_its_barrier()
    return barrier(*args, **kwargs)


def late_prepare_output_dir(*args, **kwargs):
    if dist.get_rank() == 1:
        rank_0_reached_its_barrier()
    return prepare_output_dir(*args, **kwargs)


dist.barrier = first_barrier
run_glue.prepare_output_dir = late_prepare_output_dir
run_glue.run_cli(run_glue.main)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_processes_match_one_process(env, finetuned, tmp_path):
    """Gradients averaged over 2 processes x 4 examples = one process x 8 examples (same global batches,
    dropout off): same weights and evaluation losses after 4 updates."""
    common = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, logging_steps=2,
                  width_mult_list="0.5,1.0")
    single = tmp_path / "single"
    single_results = _run(env, finetuned, single, "final_finetuning", per_gpu_train_batch_size=8, **common)

    ddp = tmp_path / "ddp"
    argv = _argv(env, finetuned, ddp, "final_finetuning", per_gpu_train_batch_size=4, **common)
    # run_glue.py's own entry point, with rank 1 arriving late at the output-folder check: rank 0 must not
    # have written into the folder yet (else rank 1 takes it for another run's folder and refuses it)
    launcher = tmp_path / "launch_run_glue.py"
    launcher.write_text(LATE_RANK_LAUNCHER.format(root=str(ROOT)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(launcher), *argv]
    proc_env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=proc_env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp_results = json.loads((ddp / "eval_results.json").read_text())

    assert [h["step"] for h in ddp_results["history"]] == [h["step"] for h in single_results["history"]] == [2, 4]
    ddp_weights, single_weights = _weights(ddp / "checkpoint-4"), _weights(single / "checkpoint-4")
    diff = max(float((ddp_weights[n] - single_weights[n]).abs().max()) for n in single_weights)
    print(f"\ntorchrun 2 x 4 against 1 x 8 examples: max |weight difference| = {diff:.3g}")
    # float rounding of the two summation orders only (measured 6e-8; a gradient sum instead of the mean: 4e-4);
    # the average itself is checked exactly in test_trainer.py
    _assert_same_weights(ddp_weights, single_weights, atol=1e-6)
    for a, b in zip(ddp_results["history"], single_results["history"]):
        for key in a["results"]:
            assert a["results"][key]["eval_loss"] == pytest.approx(b["results"][key]["eval_loss"], abs=1e-6)
    # and the run did move away from its starting point
    assert any(not torch.allclose(t, _weights(finetuned)[n]) for n, t in _weights(single / "checkpoint-4").items())


@pytest.mark.parametrize("rule", ["last", "none"])
def test_depth_hidden_kd_variants(rule):
    """--depth_hidden_kd last: only the last kept state against the teacher's last; none: logit KD only."""
    args = _phase_args("dynabert", "--depth_lambda1", "0.7", "--depth_lambda2", "0.3", "--depth_hidden_kd", rule)
    model, teacher = _model(0).eval(), _model(1).eval()
    batch = _batch()
    with torch.no_grad():
        teacher_out = teacher(*batch[:3])
        loss = run_glue.subnet_loss(args, model, batch, teacher_out, 0.5, 0.5)
        out = model(*batch[:3], subnet=model.subnet(0.5, 0.5))
    expected = 0.7 * logit_kd_loss(out.logits, teacher_out.logits)
    if rule == "last":
        expected = expected + 0.3 * F.mse_loss(out.hidden_states[-1], teacher_out.hidden_states[-1])
    torch.testing.assert_close(loss, expected)


# ---- run_glue.sh's profiles ----------------------------------------------------------------------------------
def _stage_calls(tmp_path: Path, quick: str, **env_vars: str) -> dict[str, dict[str, str]]:
    """run_glue.sh with a stand-in Python that records each run_glue.py call: per training phase, every
    flag's effective value (argparse keeps the last of repeated flags); other calls (augment_data.py, the bf16
    probe) under their script's name."""
    log = tmp_path / f"calls-{quick}{env_vars.get('PROFILE', '')}.txt"
    stub = tmp_path / "python"
    stub.write_text('#!/usr/bin/env bash\nargs=("$@")\nfor ((i=0; i<${#args[@]}; i++)); do\n'
                    '  [ "${args[i]}" = --output_dir ] && mkdir -p "${args[i+1]}"\ndone\n'
                    f'printf "%s\\x1f" "$@" >> {log}\necho >> {log}\n')
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "QUICK": quick, "BERT_DIR": "bert", "DATA_DIR": "data",
           "OUT_DIR": str(tmp_path / f"out-{quick}{env_vars.get('PROFILE', '')}"), **env_vars}
    subprocess.run(["bash", str(ROOT / "run_glue.sh")], env=env, check=True, capture_output=True)
    calls = {}
    for line in log.read_text().splitlines():
        script, *argv = line.split("\x1f")[:-1]  # the script, its flags (the trailing separator dropped)
        flags = {}
        for i, token in enumerate(argv):
            if token.startswith("--"):
                nxt = argv[i + 1] if i + 1 < len(argv) else ""
                flags[token] = "" if nxt.startswith("--") else nxt
        calls[flags.get("--training_phase", script)] = flags
    return calls


def test_quick_profile_stage_data_and_epochs(tmp_path):
    """Each stage's training examples and epochs as README documents them: the width and depth stages see
    2,048 examples once (the width stage distilled, not grafted), the final stage 1,024; the full profile uses
    all data and grafts."""
    quick = _stage_calls(tmp_path, "1")
    assert list(quick) == ["finetuning", "dynabertw", "dynabert", "final_finetuning"]
    got = {phase: (flags.get("--max_train_samples"), flags["--num_train_epochs"]) for phase, flags in quick.items()}
    assert got == {"finetuning": ("2000", "2"), "dynabertw": ("2048", "1"), "dynabert": ("2048", "1"),
                   "final_finetuning": ("1024", "1")}
    assert quick["dynabertw"]["--width_distil"] == "always"
    assert "--graft_during_training" not in quick["dynabertw"]  # one epoch: no graft point, so no flag
    full = _stage_calls(tmp_path, "0")
    assert all("--max_train_samples" not in flags for flags in full.values())
    assert "--width_distil" not in full["dynabertw"]
    assert "--graft_during_training" in full["dynabertw"]


def test_own_files_reach_every_stage(tmp_path):
    """TRAIN_FILE / VALIDATION_FILE / TEST_FILE and the column variables become the matching flags of every
    run_glue.py call, instead of --data_dir; the run is named custom unless TASK says otherwise; the paper
    profile augments the training file itself (augment_data.py writes <stem>_aug<suffix> beside it)."""
    own = {"TRAIN_FILE": "mine/train.csv", "VALIDATION_FILE": "mine/dev.csv", "TEST_FILE": "mine/test.csv",
           "TEXT_COLUMN": "review", "TEXT_PAIR_COLUMN": "title", "LABEL_COLUMN": "stars", "IS_REGRESSION": "1"}
    calls = _stage_calls(tmp_path, "1", **own)
    assert list(calls) == ["finetuning", "dynabertw", "dynabert", "final_finetuning"]
    for flags in calls.values():
        assert {flag: flags[f"--{flag}"] for flag in ("train_file", "validation_file", "test_file", "text_column",
                                                         "text_pair_column", "label_column")} == \
            {name.lower(): value for name, value in own.items() if name != "IS_REGRESSION"}
        assert "--is_regression" in flags and "--data_dir" not in flags and flags["--task_name"] == "custom"
    (tmp_path / "paper").mkdir()
    paper = _stage_calls(tmp_path / "paper", "0", PROFILE="paper", TASK="reviews", TRAIN_FILE="mine/train.csv",
                         TEXT_COLUMN="review")
    assert paper["augment_data.py"] == {"--train_file": "mine/train.csv", "--text_column": "review",
                                        "--model_dir": "bert"}
    assert paper["dynabertw"]["--task_name"] == "reviews" and "--data_aug" in paper["dynabertw"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "train_aug.csv").write_text("review,label\n")  # already augmented: not made again
    (tmp_path / "again").mkdir()
    again = _stage_calls(tmp_path / "again", "0", PROFILE="paper", TRAIN_FILE=str(tmp_path / "mine" / "train.csv"))
    assert "augment_data.py" not in again


def test_profile_gates_stage_may_skip_training_examples(tmp_path, monkeypatch):
    """A profile's gates stage may set skip_train_samples (a train_gate.py flag, given before
    --max_train_samples); another stage may not (run_glue.py has no such flag)."""
    import run_profile

    monkeypatch.setattr(run_profile, "CONFIGS", tmp_path)
    profile = json.loads((ROOT / "configs" / "quick.json").read_text())
    profile["stages"]["gates"]["skip_train_samples"] = 2048
    (tmp_path / "skip.json").write_text(json.dumps(profile))
    gates = run_profile.stage_args(run_profile.load_profile("skip")["stages"]["gates"])
    assert gates[4:8] == ["--skip_train_samples", "2048", "--max_train_samples", "2000"]
    profile["stages"]["width"]["skip_train_samples"] = 2048
    (tmp_path / "width_skip.json").write_text(json.dumps(profile))
    with pytest.raises(run_profile.ProfileError, match="stage 'width' takes"):
        run_profile.load_profile("width_skip")


def test_paper_profile_stages(tmp_path):
    """PROFILE=paper: augmented data made first, then every stage at lr 2e-5 for 3 epochs on all data with batch
    32, --data_aug in the width and depth stages, grafting with importance on dev; QUICK=1 does not override an
    explicit PROFILE. A TEACHER_DIR holding a model run_glue.sh did not train skips the teacher stage."""
    paper = _stage_calls(tmp_path, "1", PROFILE="paper")
    assert list(paper) == ["run_profile.py", "augment_data.py", "finetuning", "dynabertw", "dynabert",
                           "final_finetuning"]  # the bf16 probe asks the project's Python first
    assert paper["augment_data.py"]["--data_dir"] == "data" and paper["augment_data.py"]["--model_dir"] == "bert"
    stages = [paper[p] for p in ("finetuning", "dynabertw", "dynabert", "final_finetuning")]
    for flags in stages:
        assert float(flags["--learning_rate"]) == 2e-5 and flags["--num_train_epochs"] == "3"
        assert flags["--per_gpu_train_batch_size"] == "32" and flags["--max_seq_length"] == "128"
        assert "--max_train_samples" not in flags and "--trim_padding" not in flags
        assert "--bf16" in flags  # the stand-in Python answers the bf16 probe with success
    assert [("--data_aug" in flags) for flags in stages] == [False, True, True, False]
    assert paper["dynabertw"]["--importance_split"] == "dev" and "--graft_during_training" in paper["dynabertw"]

    teacher = tmp_path / "downloaded"
    teacher.mkdir()
    (tmp_path / "given").mkdir()
    (teacher / "config.json").write_text("{}")
    given = _stage_calls(tmp_path / "given", "0", PROFILE="paper", TEACHER_DIR=str(teacher))
    assert "finetuning" not in given and given["dynabertw"]["--model_dir"] == str(teacher)


def test_paper_profile_runs_on_a_tiny_bert(tmp_path):
    """PROFILE=paper for real, on the tiny BERT and RTE folder (one update per stage, length 24): augment_data.py
    writes the augmented file, then every stage trains at lr 2e-5 for 3 epochs of batch 32, the width and depth
    stages on the augmented data, the width stage with importance on dev and grafting (no bf16 on a CPU). The
    depth stage's arguments are read before final fine-tuning overwrites them in place."""
    env = make_env(tmp_path / "tiny")
    out = tmp_path / "out"
    common = {**os.environ, "PYTHON": sys.executable, "PROFILE": "paper", "TASK": "RTE", "DATA_DIR": str(env["data"]),
              "BERT_DIR": str(env["bert"]), "OUT_DIR": str(out), "MAX_SEQ_LENGTH": str(MAX_LEN),
              "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    extra = ["--max_steps", "1", "--cpu", "--num_threads", "1", "--cache_dir", str(env["cache"])]

    def stages(names: str) -> None:
        proc = subprocess.run(["bash", str(ROOT / "run_glue.sh"), *extra], env={**common, "STAGES": names},
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    def stage_args(folder: Path) -> dict:
        return json.loads((folder / "training_args.json").read_text())

    stages("teacher width depth")
    augmented = (env["data"] / "train_aug.tsv").read_text().splitlines()
    assert len(augmented) > 33  # the 32 originals and their augmented copies, with the header
    got = {"finetuning": stage_args(out / "teacher"), "dynabertw": stage_args(out / "w_bert"),
           "dynabert": stage_args(out / "wd_bert")}
    stages("final")
    got["final_finetuning"] = stage_args(out / "wd_bert")
    for phase, args in got.items():
        assert args["training_phase"] == phase
        assert (args["learning_rate"], args["num_train_epochs"], args["per_gpu_train_batch_size"]) == (2e-5, 3.0, 32)
        assert args["data_aug"] == (phase in ("dynabertw", "dynabert")) and not args["bf16"]
    assert got["dynabertw"]["importance_split"] == "dev" and got["dynabertw"]["graft_during_training"]
    assert got["finetuning"]["importance_split"] == "train"  # dev only where importance is computed
    assert json.loads((out / "wd_bert" / "eval_results.json").read_text())["phase"] == "final_finetuning"
