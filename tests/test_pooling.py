"""`config.pooling = "mean"` (run_glue.py --pooling mean): the head, the off-ramps and the gates read the mean
over real tokens instead of the [CLS] vector; padding must not change any result, and batched routing must
still equal batch size 1."""

from __future__ import annotations

import pytest
import torch
from conftest import SHAPES, make_config, make_inputs, make_model

from transformers_ext import FlexBertForSequenceClassification, dynamic_forward
from transformers_ext.gates import gate_cls_states

GATE_SETTING = [0.25, 0.5, 0.75, 1.0]


def _mean_model(num_labels: int = 2, seed: int = 0) -> FlexBertForSequenceClassification:
    model = make_model(make_config(**SHAPES["medium"], num_labels=num_labels), seed=seed)
    model.config.pooling = "mean"
    return model


def test_mean_summary_is_the_masked_token_mean():
    model = _mean_model()
    input_ids, attention_mask, token_type_ids = make_inputs(batch=4, seq_len=12, seed=2)
    hidden = torch.randn(4, 12, model.config.hidden_size)
    summary = model.summary(hidden, attention_mask)
    for b in range(4):
        n = int(attention_mask[b].sum())
        torch.testing.assert_close(summary[b], hidden[b, :n].mean(0), atol=1e-6, rtol=0)
    extended = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0  # the encoder's additive form
    torch.testing.assert_close(model.summary(hidden, extended), summary, atol=0, rtol=0)
    model.config.pooling = "cls"
    assert torch.equal(model.summary(hidden, attention_mask), hidden[:, 0])


def test_mean_pooling_logits_ignore_padding_and_differ_from_cls():
    model = _mean_model()
    input_ids, attention_mask, token_type_ids = make_inputs(batch=4, seq_len=12, seed=2)
    subnet = model.subnet(0.5, 0.5)
    with torch.no_grad():
        padded = model(input_ids, attention_mask, token_type_ids, subnet=subnet).logits
        for b in range(4):
            n = int(attention_mask[b].sum())
            alone = model(input_ids[b:b + 1, :n], attention_mask[b:b + 1, :n], token_type_ids[b:b + 1, :n],
                          subnet=subnet).logits
            torch.testing.assert_close(padded[b:b + 1], alone, atol=1e-5, rtol=0)
        model.config.pooling = "cls"
        cls = model(input_ids, attention_mask, token_type_ids, subnet=subnet).logits
    assert (cls - padded).abs().max() > 1e-3


def test_mean_pooling_gates_read_the_token_mean_and_batched_routing_equals_singles():
    model = _mean_model(num_labels=3)
    model.add_gates(GATE_SETTING, num_gates=model.config.num_hidden_layers)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in model.gates.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
        model.classifier.weight.mul_(100.0)
    inputs = make_inputs(batch=8, seq_len=12, seed=6)
    out = model(*inputs)
    states = gate_cls_states(model, out.hidden_states, inputs[1])
    torch.testing.assert_close(states[0], model.summary(out.hidden_states[0], inputs[1]), atol=0, rtol=0)
    # the embeddings' token mean differs between inputs, so the first gate can route by input
    assert states[0].std(0).mean() > 0.05

    kwargs = {"class_to_width": GATE_SETTING, "early_exit": True, "off_ramps": [2, 3], "exit_threshold": 0.5}
    batched = dynamic_forward(model, *inputs, **kwargs)
    for b in range(8):
        single = dynamic_forward(model, *(t[b:b + 1] for t in inputs), **kwargs)
        torch.testing.assert_close(batched.logits[b:b + 1], single.logits, atol=1e-5, rtol=0)
        for field in ("heads", "width_class", "exit_layer", "linear_macs"):
            assert torch.equal(getattr(batched, field)[b:b + 1], getattr(single, field)), field


def test_pooling_is_saved_with_the_model(tmp_path):
    model = _mean_model()
    model.save_pretrained(tmp_path)
    loaded = FlexBertForSequenceClassification.from_pretrained(str(tmp_path))
    assert loaded.config.pooling == "mean"
    inputs = make_inputs(batch=3, seq_len=10, seed=1)
    with torch.no_grad():
        # (loaded with sdpa attention, the original eager: equal up to float rounding)
        torch.testing.assert_close(loaded.eval()(*inputs).logits, model.eval()(*inputs).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("pooling", [None, "mean"])
def test_run_glue_pooling_flag(pooling):
    import run_glue

    args = run_glue.parse_args(["--training_phase", "finetuning"] + (["--pooling", pooling] if pooling else []))
    assert args.pooling == pooling


@pytest.mark.parametrize("modes, expected", [
    ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": False}, "mean"),
    ({"pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}, "cls"),
    ({"pooling_mode_mean_tokens": True, "pooling_mode_cls_token": True}, None),
    (None, None),
])
def test_default_pooling_follows_a_sentence_transformers_pooling_config(tmp_path, modes, expected):
    import json

    from transformers import BertTokenizer

    from transformers_ext.loading import load_model, pretrained_pooling
    from utils_glue import get_task

    model = make_model(make_config(**SHAPES["small"]), seed=0)
    model.save_pretrained(tmp_path)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(model.config.vocab_size - 5)]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    if modes is not None:
        (tmp_path / "1_Pooling").mkdir()
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(modes))
    assert pretrained_pooling(tmp_path) == expected
    loaded, _ = load_model(str(tmp_path), get_task("SST-2"), max_seq_length=16)
    assert getattr(loaded.config, "pooling", None) == expected
    loaded, _ = load_model(str(tmp_path), get_task("SST-2"), max_seq_length=16, pooling="cls")  # the flag wins
    assert loaded.config.pooling == "cls"
