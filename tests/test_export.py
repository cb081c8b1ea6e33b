"""save_pretrained / from_pretrained round trips and physically smaller exported subnets."""

from __future__ import annotations

import pytest
import torch
from conftest import SHAPES, make_config, make_inputs, make_model

from transformers_ext import FlexBertForSequenceClassification, dynamic_forward, export_subnet

VOCAB = 100
MAX_POS = 64
TYPES = 2


def hand_parameter_count(shape: dict[str, int], width: float, depth: float, num_labels: int) -> int:
    """Parameters of the exported (width, depth) subnet, from the rounding rules."""
    h, H, I, L = (shape[k] for k in ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers"))
    dh = h // H
    k, n = round(H * width), round(L * depth)
    f = max(1, k * I // H)
    embeddings = (VOCAB + MAX_POS + TYPES) * h + 2 * h
    layer = 3 * (k * dh * h + k * dh) + (h * k * dh + h) + 2 * h + (f * h + f) + (h * f + h) + 2 * h
    return embeddings + n * layer + (h * h + h) + (h * num_labels + num_labels)


def test_save_load_round_trip(tmp_path):
    model = make_model(make_config(**SHAPES["medium"], num_labels=3))
    inputs = make_inputs(batch=3)
    logits = model(*inputs).logits
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file()
    # the attention kernel is a load-time choice (HF defaults to sdpa): same kernel -> bit-identical logits
    loaded = FlexBertForSequenceClassification.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    assert torch.equal(loaded(*inputs).logits, logits)
    default = FlexBertForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(default(*inputs).logits, logits, atol=1e-6, rtol=0)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert torch.equal(loaded(*inputs, subnet=loaded.subnet(0.5, 0.5)).logits,
                       model(*inputs, subnet=model.subnet(0.5, 0.5)).logits)


def test_save_load_round_trip_with_gates(tmp_path):
    model = make_model(make_config())
    model.add_gates([0.25, 0.5, 0.75, 1.0], num_gates=2)
    with torch.no_grad():
        for p in model.gates.parameters():
            p.normal_(std=1.0)
    model.save_pretrained(tmp_path / "g")
    loaded = FlexBertForSequenceClassification.from_pretrained(tmp_path / "g", attn_implementation="eager").eval()
    assert loaded.config.gate_setting == [0.25, 0.5, 0.75, 1.0] and loaded.config.num_gates == 2
    assert loaded.gates is not None and len(loaded.gates) == 2
    for a, b in zip(model.gates.parameters(), loaded.gates.parameters(), strict=True):
        assert torch.equal(a, b)
    inputs = make_inputs(batch=4)
    ours = dynamic_forward(model, *inputs, class_to_width=[0.25, 0.5, 0.75, 1.0])
    theirs = dynamic_forward(loaded, *inputs, class_to_width=[0.25, 0.5, 0.75, 1.0])
    assert torch.equal(ours.logits, theirs.logits) and torch.equal(ours.heads, theirs.heads)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_load_legacy_gamma_beta_names(tmp_path, fmt):
    from safetensors.torch import save_file

    model = make_model(make_config())
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
              for k, v in model.state_dict().items()}
    assert any(k.endswith("LayerNorm.gamma") for k in legacy)
    if fmt == "safetensors":
        save_file(legacy, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(legacy, tmp_path / "pytorch_model.bin")
    loaded = FlexBertForSequenceClassification.from_pretrained(tmp_path, attn_implementation="eager").eval()
    inputs = make_inputs()
    assert torch.equal(loaded(*inputs).logits, model(*inputs).logits)


def test_load_stock_hf_base_model_folder(tmp_path):
    # a plain BertModel checkpoint (no "bert." prefix, no classifier), like a hub encoder
    from transformers import BertModel

    config = make_config(**SHAPES["small"])
    torch.manual_seed(0)
    base = BertModel(config)
    base.save_pretrained(tmp_path)
    loaded = FlexBertForSequenceClassification.from_pretrained(tmp_path)
    for name, param in base.state_dict().items():
        assert torch.equal(loaded.bert.state_dict()[name], param), name


@pytest.mark.parametrize(
    "name, width, depth",
    [("small", 0.5, 1.0), ("small", 0.25, 0.5), ("medium", 0.75, 0.75), ("medium", 0.5, 0.5), ("medium", 1.0, 0.5)],
)
def test_export_subnet_equals_sliced_model(tmp_path, name, width, depth):
    shape = SHAPES[name]
    model = make_model(make_config(**shape, num_labels=3))
    full_state = {k: v.clone() for k, v in model.state_dict().items()}
    inputs = make_inputs(batch=4)
    small = export_subnet(model, width, depth)
    # the source model is left as it was (weights unchanged; it holds no width/depth state to change)
    assert not hasattr(model, "width_mult") and not hasattr(model, "depth_mult")
    assert all(torch.equal(v, full_state[k]) for k, v in model.state_dict().items())

    sliced = model(*inputs, subnet=model.subnet(width, depth))
    exported = small(*inputs)
    assert (exported.logits - sliced.logits).abs().max().item() <= 1e-5
    assert len(exported.hidden_states) == len(sliced.hidden_states)

    k, n = round(shape["num_attention_heads"] * width), round(shape["num_hidden_layers"] * depth)
    assert small.config.num_attention_heads == k
    assert small.config.num_hidden_layers == n
    assert small.config.intermediate_size == max(1, k * shape["intermediate_size"] // shape["num_attention_heads"])
    assert small.config.hidden_size == shape["hidden_size"]
    assert sum(p.numel() for p in small.parameters()) == hand_parameter_count(shape, width, depth, 3)

    model.save_pretrained(tmp_path / "full")
    small.save_pretrained(tmp_path / "small")
    full_size = (tmp_path / "full" / "model.safetensors").stat().st_size
    small_size = (tmp_path / "small" / "model.safetensors").stat().st_size
    assert small_size < full_size
    reloaded = FlexBertForSequenceClassification.from_pretrained(tmp_path / "small").eval()
    assert reloaded.config.num_attention_heads == k and reloaded.config.num_hidden_layers == n
    assert (reloaded(*inputs).logits - sliced.logits).abs().max().item() <= 1e-5


def test_export_full_model_is_identical():
    model = make_model(make_config(**SHAPES["small"]))
    small = export_subnet(model, 1.0, 1.0)
    inputs = make_inputs()
    assert torch.equal(small(*inputs).logits, model(*inputs).logits)


def test_export_drops_gates(tmp_path):
    model = make_model(make_config(**SHAPES["small"]))
    model.add_gates([0.25, 0.5, 0.75, 1.0], num_gates=4)
    small = export_subnet(model, 0.5, 1.0)
    assert small.gates is None
    assert not getattr(small.config, "gate_setting", None)
    assert model.config.gate_setting == [0.25, 0.5, 0.75, 1.0]  # the source config is not modified
    small.save_pretrained(tmp_path / "s")
    reloaded = FlexBertForSequenceClassification.from_pretrained(tmp_path / "s")
    assert reloaded.gates is None


def test_export_rejects_impossible_multipliers():
    model = make_model(make_config())
    for width, depth in [(0.0, 1.0), (1.5, 1.0), (0.05, 1.0), (1.0, 0.0), (1.0, 0.1)]:
        with pytest.raises(ValueError):
            export_subnet(model, width, depth)
