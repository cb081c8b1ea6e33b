"""FlexBert: equality with stock HF BERT, width/depth slicing (rounding, views, used parameters), invalid
multipliers, and gated / early-exit dynamic inference (SPEC §0, §2, §5, §6, §10)."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import SHAPES, make_config, make_inputs, make_model
from torch.overrides import TorchFunctionMode
from transformers import BertConfig, BertForSequenceClassification

from transformers_ext import (
    FlexBertForSequenceClassification,
    Subnet,
    default_off_ramps,
    dynamic_forward,
    gate_logits,
    gate_targets,
    heads_kept,
    layers_kept,
    make_subnet,
    neurons_kept,
    path_macs,
    subnet_macs,
)
from transformers_ext.gates import gate_loss, gumbel_softmax_probs, is_correct, temperature_at

ATOL = 1e-5
GATE_SETTING = [0.25, 0.5, 0.75, 1.0]


def stock_copy(model: FlexBertForSequenceClassification, **config_changes) -> BertForSequenceClassification:
    """Stock HF BERT with our weights (strict unless layers are dropped)."""
    config = copy.deepcopy(model.config)
    for key, value in config_changes.items():
        setattr(config, key, value)
    ref = BertForSequenceClassification(config).eval()
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("gates.")}
    strict = "num_hidden_layers" not in config_changes
    result = ref.load_state_dict(state, strict=strict)
    assert not result.missing_keys
    return ref


def expected_heads(num_heads: int, width: float) -> int:
    return round(num_heads * width)  # Python round: half to even


def expected_neurons(num_heads: int, intermediate: int, width: float) -> int:
    return max(1, expected_heads(num_heads, width) * intermediate // num_heads)


# ---- full width and depth = stock Hugging Face BERT ------------------------------------------------------
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_full_model_equals_stock_hf(shape, attn):
    config = make_config(**shape, num_labels=3, attn_implementation=attn)
    model = make_model(config)
    ref = stock_copy(model)
    assert ref.config._attn_implementation == attn
    input_ids, attention_mask, token_type_ids = make_inputs(batch=4, seq_len=12)
    assert (attention_mask == 0).any()
    ours = model(input_ids, attention_mask, token_type_ids)
    theirs = ref(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                 output_hidden_states=True)
    torch.testing.assert_close(ours.logits, theirs.logits, atol=ATOL, rtol=0)
    assert len(ours.hidden_states) == config.num_hidden_layers + 1
    for mine, stock in zip(ours.hidden_states, theirs.hidden_states, strict=True):
        torch.testing.assert_close(mine, stock, atol=ATOL, rtol=0)


def test_parameter_names_match_hf_checkpoints():
    model = make_model(make_config())
    ref = BertForSequenceClassification(model.config)
    assert set(model.state_dict()) == set(ref.state_dict())
    assert "bert.encoder.layer.0.attention.self.query.weight" in model.state_dict()


def test_loss_cross_entropy_and_mse():
    input_ids, attention_mask, token_type_ids = make_inputs(batch=4)
    model = make_model(make_config(num_labels=3))
    labels = torch.tensor([0, 2, 1, 2])
    out = model(input_ids, attention_mask, token_type_ids, labels=labels)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels))
    reg = make_model(make_config(num_labels=1))
    targets = torch.tensor([0.5, 1.0, 4.5, 3.0])
    out = reg(input_ids, attention_mask, token_type_ids, labels=targets)
    assert out.logits.shape == (4, 1)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits.view(-1), targets))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_all_ones_head_mask_changes_nothing(attn):
    model = make_model(make_config(attn_implementation=attn))
    inputs = make_inputs()
    ones = torch.ones(4, 8)
    torch.testing.assert_close(model(*inputs, head_mask=ones).logits, model(*inputs).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_head_mask_scales_that_heads_context(attn):
    # head_mask[l, j] multiplies head j's attention probabilities, i.e. its context: the same as scaling the
    # value rows (+bias) of head j in layer l
    model = make_model(make_config(attn_implementation=attn))
    inputs = make_inputs()
    head_mask = torch.ones(4, 8)
    head_mask[1, 3] = 0.5
    head_mask[2, 0] = 0.0
    masked = model(*inputs, head_mask=head_mask).logits
    with torch.no_grad():
        for layer, head, scale in [(1, 3, 0.5), (2, 0, 0.0)]:
            value = model.bert.encoder.layer[layer].attention.self.value
            value.weight[head * 4 : (head + 1) * 4] *= scale
            value.bias[head * 4 : (head + 1) * 4] *= scale
    torch.testing.assert_close(masked, model(*inputs).logits, atol=ATOL, rtol=0)


# ---- depth ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, depth, layers",
    [("small", 0.5, 2), ("small", 0.75, 3), ("small", 0.25, 1), ("medium", 0.5, 3), ("medium", 0.75, 4)],
)
def test_depth_runs_first_layers_like_truncated_hf(name, depth, layers):
    # medium: L=6, d=0.75 -> rnd(4.5) = 4 (half to even), not 5
    assert round(SHAPES[name]["num_hidden_layers"] * depth) == layers
    config = make_config(**SHAPES[name])
    model = make_model(config)
    subnet = model.subnet(1.0, depth)
    assert subnet.num_layers == layers
    inputs = make_inputs(batch=3)
    out = model(*inputs, subnet=subnet)
    assert len(out.hidden_states) == layers + 1
    ref = stock_copy(model, num_hidden_layers=layers)
    theirs = ref(input_ids=inputs[0], attention_mask=inputs[1], token_type_ids=inputs[2])
    torch.testing.assert_close(out.logits, theirs.logits, atol=ATOL, rtol=0)


# ---- width ----------------------------------------------------------------------------------------------
def zeroed_reference(model: FlexBertForSequenceClassification, width: float) -> BertForSequenceClassification:
    """Stock full-width BERT that computes our width-`width` subnet: the value rows (+bias) of the dropped
    heads and the intermediate rows (+bias) of the dropped neurons are zeroed, so those heads' context and
    those neurons' GELU output are exactly 0 and their output-dense columns contribute nothing."""
    config = model.config
    heads = expected_heads(config.num_attention_heads, width)
    neurons = expected_neurons(config.num_attention_heads, config.intermediate_size, width)
    rows = heads * config.hidden_size // config.num_attention_heads
    ref = stock_copy(model)
    with torch.no_grad():
        for layer in ref.bert.encoder.layer:
            layer.attention.self.value.weight[rows:] = 0
            layer.attention.self.value.bias[rows:] = 0
            layer.intermediate.dense.weight[neurons:] = 0
            layer.intermediate.dense.bias[neurons:] = 0
    return ref


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("width", [0.25, 0.5, 0.75])
def test_width_equals_full_model_with_dropped_units_zeroed(shape, attn, width):
    config = make_config(**shape, attn_implementation=attn)
    model = make_model(config)
    subnet = model.subnet(width, 1.0)
    assert subnet.num_heads == expected_heads(config.num_attention_heads, width)
    inputs = make_inputs(batch=3)
    ref = zeroed_reference(model, width)
    theirs = ref(input_ids=inputs[0], attention_mask=inputs[1], token_type_ids=inputs[2]).logits
    torch.testing.assert_close(model(*inputs, subnet=subnet).logits, theirs, atol=ATOL, rtol=0)
    # and the sliced model really differs from the full one
    assert (model(*inputs, subnet=model.subnet(1.0, 1.0)).logits - theirs).abs().max() > 1e-4


def test_sdpa_and_eager_agree_when_sliced():
    eager = make_model(make_config(**SHAPES["medium"], attn_implementation="eager"))
    sdpa = make_model(make_config(**SHAPES["medium"], attn_implementation="sdpa"))
    inputs = make_inputs(batch=3)
    for width, depth in [(0.25, 0.5), (0.75, 0.75)]:
        torch.testing.assert_close(eager(*inputs, subnet=eager.subnet(width, depth)).logits,
                                   sdpa(*inputs, subnet=sdpa.subnet(width, depth)).logits, atol=ATOL, rtol=0)


def test_subnet_is_a_value_and_the_model_holds_no_width_state():
    # (was: the width/depth setting persists and switches back; the model now has no such setting)
    model = make_model(make_config(**SHAPES["medium"]))
    inputs = make_inputs()
    full = model(*inputs).logits
    half = model.subnet(0.5, 0.5)
    assert half == Subnet(6, 48, 3) == make_subnet(model.config, 0.5, 0.5)
    assert (half.num_heads, half.num_neurons, half.num_layers) == (6, 48, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        half.num_heads = 12
    small_1 = model(*inputs, subnet=half).logits
    torch.testing.assert_close(model(*inputs, subnet=half).logits, small_1, atol=0, rtol=0)
    wide = model.subnet(0.5, 1.0)  # same width, full depth
    assert (wide.num_heads, wide.num_layers) == (6, 6)
    assert model.subnet(1.0, 1.0) == model.subnet() == Subnet(12, 96, 6)
    # running a subnet changed nothing: subnet=None (and the full subnet) is the full model, bit for bit
    torch.testing.assert_close(model(*inputs).logits, full, atol=0, rtol=0)
    torch.testing.assert_close(model(*inputs, subnet=model.subnet(1.0, 1.0)).logits, full, atol=0, rtol=0)
    for name in ("num_heads_kept", "num_neurons_kept", "num_layers_kept", "width_mult", "depth_mult",
                 "set_width_depth"):
        assert not hasattr(model, name), name


# ---- rounding rules -------------------------------------------------------------------------------------
BERT_BASE = BertConfig()  # H=12, I=3072, L=12, h=768


@pytest.mark.parametrize(
    "width, heads, neurons",
    [(0.25, 3, 768), (0.5, 6, 1536), (0.55, 7, 1792), (0.6, 7, 1792), (0.65, 8, 2048), (0.75, 9, 2304),
     (1.0, 12, 3072)],
)
def test_bert_base_width_table(width, heads, neurons):
    assert heads_kept(BERT_BASE, width) == heads == expected_heads(12, width)
    assert neurons_kept(BERT_BASE, heads) == neurons


@pytest.mark.parametrize(
    "num_heads, intermediate, width, heads, neurons",
    [
        (12, 1536, 0.25, 3, 384),  # MiniLM-L6-H384
        (12, 1536, 0.5, 6, 768),
        (12, 1536, 0.75, 9, 1152),
        (6, 48, 0.25, 2, 16),  # rnd(1.5) = 2
        (6, 48, 0.75, 4, 32),  # rnd(4.5) = 4, half to even (floor(x+0.5) would give 5)
        (8, 64, 0.3125, 2, 16),  # rnd(2.5) = 2
        (8, 64, 0.1875, 2, 16),  # rnd(1.5) = 2
        (12, 100, 0.55, 7, 58),  # f = 7*100//12 = 58, from the rounded head ratio (not int(100*0.55) = 55)
        (12, 2, 0.25, 3, 1),  # 3*2//12 = 0 -> at least 1 neuron
    ],
)
def test_heads_and_neurons_rounding(num_heads, intermediate, width, heads, neurons):
    config = BertConfig(hidden_size=num_heads * 4, num_attention_heads=num_heads, intermediate_size=intermediate)
    assert heads_kept(config, width) == heads == expected_heads(num_heads, width)
    assert neurons_kept(config, heads) == neurons


@pytest.mark.parametrize(
    "num_layers, depth, layers",
    [(12, 0.5, 6), (12, 0.75, 9), (6, 0.5, 3), (6, 0.75, 4), (10, 0.75, 8), (4, 0.25, 1), (4, 1.0, 4)],
)
def test_layers_rounding(num_layers, depth, layers):
    config = BertConfig(num_hidden_layers=num_layers)
    assert layers_kept(config, depth) == layers == round(num_layers * depth)


@pytest.mark.parametrize("width", [0.0, -0.5, 1.5, 1.0001, float("nan"), 0.05, 0.0625])
def test_impossible_width_raises(width):
    # 0.05 * 8 = 0.4 and 0.0625 * 8 = 0.5 both round to 0 heads
    model = make_model(make_config())
    with pytest.raises(ValueError):
        model.subnet(width, 1.0)
    with pytest.raises(ValueError):
        heads_kept(model.config, width)
    with pytest.raises(ValueError):
        subnet_macs(model.config, width, 1.0, 16)


@pytest.mark.parametrize("depth", [0.0, -1.0, 1.01, 2.0, float("nan"), 0.1, 0.125])
def test_impossible_depth_raises(depth):
    # L=4: 0.1 * 4 = 0.4 and 0.125 * 4 = 0.5 both round to 0 layers
    model = make_model(make_config())
    with pytest.raises(ValueError):
        model.subnet(1.0, depth)
    with pytest.raises(ValueError):
        layers_kept(model.config, depth)


# ---- used parameters and views --------------------------------------------------------------------------
class LinearRecorder(TorchFunctionMode):
    """Records the weight and bias tensors of every F.linear call (nn.Linear calls it too)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            self.calls.append((weight, bias))
        return func(*args, **kwargs)


def hand_used_linear_entries(shape: dict[str, int], width: float, depth: float, num_labels: int) -> int:
    """Weight + bias entries of the dense layers a (width, depth) forward uses."""
    h, H, I, L = shape["hidden_size"], shape["num_attention_heads"], shape["intermediate_size"], shape[
        "num_hidden_layers"]
    dh = h // H
    k = round(H * width)
    f = max(1, k * I // H)
    n = round(L * depth)
    per_layer = (
        3 * (k * dh * h + k * dh)  # query, key, value: k*dh rows + bias entries
        + (h * k * dh + h)  # attention output: k*dh columns, whole bias
        + (f * h + f)  # intermediate: f rows + bias entries
        + (h * f + h)  # FFN output: f columns, whole bias
    )
    return n * per_layer + (h * h + h) + (h * num_labels + num_labels)


@pytest.mark.parametrize(
    "name, width, depth",
    [("small", 1.0, 1.0), ("small", 0.5, 1.0), ("small", 0.25, 0.5), ("small", 0.75, 0.75),
     ("medium", 1.0, 1.0), ("medium", 0.75, 0.75), ("medium", 0.25, 0.5), ("medium", 0.5, 1.0)],
)
def test_used_parameter_counts_and_views(name, width, depth):
    shape = SHAPES[name]
    model = make_model(make_config(**shape, num_labels=3))
    subnet = model.subnet(width, depth)
    with LinearRecorder() as recorder:
        model(*make_inputs(batch=2), subnet=subnet)
    used = sum(w.numel() + (0 if b is None else b.numel()) for w, b in recorder.calls)
    assert used == hand_used_linear_entries(shape, width, depth, 3)
    # 6 dense layers per executed layer + pooler + classifier
    assert len(recorder.calls) == 6 * round(shape["num_hidden_layers"] * depth) + 2
    # every weight/bias fed to F.linear is a parameter or a view of one (same storage, same start): no copies
    starts = {p.data_ptr() for p in model.parameters()}
    for weight, bias in recorder.calls:
        assert weight.data_ptr() in starts
        assert bias is None or bias.data_ptr() in starts


def test_hand_count_literals():
    # small (h32, H8, dh4, I64), 3 labels; by hand: w=0.5 -> k=4, f=32: 3*(16*32+16) + (32*16+32) + (32*32+32)
    # + (32*32+32) = 4240 per layer; pooler 1056, classifier 99
    assert hand_used_linear_entries(SHAPES["small"], 0.5, 1.0, 3) == 4 * 4240 + 1056 + 99
    # medium (h48, H12, dh4, I96), w=0.75 -> k=9, f=72; d=0.75 -> 4 layers:
    # 3*(36*48+36) + (48*36+48) + (72*48+72) + (48*72+48) = 5292 + 1776 + 3528 + 3504 = 14100
    assert hand_used_linear_entries(SHAPES["medium"], 0.75, 0.75, 3) == 4 * 14100 + 2352 + 147


def test_slicing_expressions_are_views():
    model = make_model(make_config(**SHAPES["medium"]))
    layer = model.bert.encoder.layer[0]
    rows = heads_kept(model.config, 0.5) * 4
    for weight in (layer.attention.self.query.weight, layer.intermediate.dense.weight):
        sliced = weight[:rows]
        assert sliced.data_ptr() == weight.data_ptr() and sliced._base is weight
    for weight in (layer.attention.output.dense.weight, layer.output.dense.weight):
        sliced = weight[:, :rows]
        assert sliced.data_ptr() == weight.data_ptr() and sliced._base is weight


# ---- gates and dynamic inference ------------------------------------------------------------------------
def gated_model(name: str = "small", num_labels: int = 2, num_gates: int | None = None, seed: int = 0):
    config = make_config(**SHAPES[name], num_labels=num_labels)
    model = make_model(config, seed=seed)
    model.add_gates(GATE_SETTING, num_gates=num_gates or config.num_hidden_layers)
    return model


def force_gate_class(gate, cls: int) -> None:
    with torch.no_grad():
        gate.dense.weight.zero_()
        gate.classifier.weight.zero_()
        gate.classifier.bias.zero_()
        gate.classifier.bias[cls] = 10.0


def randomise_gates(model, seed: int = 0, std: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.gates.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def test_add_gates_init_and_config():
    model = gated_model()
    assert model.config.gate_setting == GATE_SETTING and model.config.num_gates == 4
    assert len(model.gates) == 4
    for gate in model.gates:
        assert gate.classifier.out_features == 4
        assert torch.all(gate.dense.bias == 0) and torch.all(gate.classifier.bias == 0)
        assert 0.01 < gate.dense.weight.std().item() < 0.03
    with pytest.raises(ValueError):
        model.add_gates(GATE_SETTING, num_gates=3)  # 3 does not divide 4 layers
    with pytest.raises(ValueError):
        model.add_gates(GATE_SETTING, num_gates=0)


@pytest.mark.parametrize("name, width, depth", [("small", 0.5, 1.0), ("small", 0.25, 0.5), ("medium", 0.75, 0.75)])
def test_dynamic_fixed_width_equals_static_subnet(name, width, depth):
    model = make_model(make_config(**SHAPES[name]))
    inputs = make_inputs(batch=4)
    out = dynamic_forward(model, *inputs, fixed_width=width, depth_mult=depth)
    torch.testing.assert_close(out.logits, model(*inputs, subnet=model.subnet(width, depth)).logits, atol=ATOL, rtol=0)
    n, k = layers_kept(model.config, depth), heads_kept(model.config, width)
    assert torch.all(out.exit_layer == n) and torch.all(out.gates_run == 0)
    assert torch.all(out.heads[:, :n] == k) and torch.all(out.heads[:, n:] == 0)
    macs = subnet_macs(model.config, width, depth, inputs[0].shape[1])
    assert torch.all(out.linear_macs == macs["linear"]) and torch.all(out.attention_macs == macs["attention"])


@pytest.mark.parametrize(
    "name, cls, class_to_width",
    [("small", 0, GATE_SETTING), ("small", 2, GATE_SETTING), ("small", 3, GATE_SETTING),
     ("medium", 1, GATE_SETTING), ("medium", 1, [0.25, 0.55, 0.6, 1.0]), ("medium", 2, [0.25, 0.55, 0.6, 1.0])],
)
def test_gates_forced_to_one_class_equal_static_subnet(name, cls, class_to_width):
    model = gated_model(name)
    for gate in model.gates:
        force_gate_class(gate, cls)
    inputs = make_inputs(batch=4, seq_len=12)
    out = dynamic_forward(model, *inputs, class_to_width=class_to_width)
    width = class_to_width[cls]
    torch.testing.assert_close(out.logits, model(*inputs, subnet=model.subnet(width, 1.0)).logits, atol=1e-6, rtol=0)
    config = model.config
    L, h = config.num_hidden_layers, config.hidden_size
    assert torch.all(out.width_class == cls)
    assert torch.all(out.heads == heads_kept(config, width))
    assert torch.all(out.gates_run == L) and torch.all(out.exit_layer == L)
    gate_macs = L * (h * h + h * len(class_to_width))
    expected = subnet_macs(config, width, 1.0, 12)["total"]
    assert torch.all(out.linear_macs + out.attention_macs - gate_macs == expected)
    assert torch.all(out.linear_macs == subnet_macs(config, width, 1.0, 12, num_gates_run=L)["linear"])


def manual_route(model, inputs, class_to_width, b):
    """Example b routed by hand: every gate reads the [CLS] vector of the state before its layer group."""
    from transformers_ext.modeling_flexbert import extended_attention_mask

    input_ids, attention_mask, token_type_ids = (t[b : b + 1] for t in inputs)
    hidden = model.embed(input_ids, token_type_ids)
    mask = extended_attention_mask(attention_mask, hidden.dtype)
    r = model.config.num_hidden_layers // model.config.num_gates
    classes = []
    for i, layer in enumerate(model.bert.encoder.layer):
        if i % r == 0:
            cls = model.gates[i // r](hidden[:, 0]).argmax(-1).item()
        classes.append(cls)
        heads = heads_kept(model.config, class_to_width[cls])
        hidden = layer(hidden, mask, heads, neurons_kept(model.config, heads))
    return classes, model.classify(hidden)


@pytest.mark.parametrize("num_gates", [6, 3])
def test_random_gates_follow_manual_routing(num_gates):
    model = gated_model("medium", num_labels=3, num_gates=num_gates)
    randomise_gates(model, seed=11)
    inputs = make_inputs(batch=6, seq_len=12, seed=2)
    out = dynamic_forward(model, *inputs, class_to_width=GATE_SETTING)
    assert len(out.width_class.unique()) > 1
    with torch.no_grad():
        for b in range(6):
            classes, logits = manual_route(model, inputs, GATE_SETTING, b)
            assert out.width_class[b].tolist() == classes
            torch.testing.assert_close(out.logits[b : b + 1], logits, atol=ATOL, rtol=0)


def test_gate_groups_with_fewer_gates_than_layers():
    model = gated_model("small", num_gates=2)  # r = 2: gate 0 reads embeddings -> layers 0,1; gate 1 -> 2,3
    force_gate_class(model.gates[0], 0)
    force_gate_class(model.gates[1], 3)
    inputs = make_inputs(batch=3)
    out = dynamic_forward(model, *inputs, class_to_width=GATE_SETTING)
    assert out.heads.tolist() == [[2, 2, 8, 8]] * 3
    assert out.width_class.tolist() == [[0, 0, 3, 3]] * 3
    assert out.gates_run.tolist() == [2, 2, 2]
    # manual route with the model's building blocks
    from transformers_ext.modeling_flexbert import extended_attention_mask

    hidden = model.embed(inputs[0], inputs[2])
    mask = extended_attention_mask(inputs[1], hidden.dtype)
    for i, heads in enumerate([2, 2, 8, 8]):
        hidden = model.bert.encoder.layer[i](hidden, mask, heads, neurons_kept(model.config, heads))
    torch.testing.assert_close(out.logits, model.classify(hidden), atol=1e-6, rtol=0)
    expected = path_macs(model.config, inputs[0].shape[1], [2, 2, 8, 8], num_gates_run=2, num_gate_classes=4)
    assert torch.all(out.linear_macs == expected["linear"]) and torch.all(out.attention_macs == expected["attention"])


def test_width_class_marks_only_executed_layers():
    model = gated_model("medium", num_gates=3)  # r = 2
    out = dynamic_forward(model, *make_inputs(), class_to_width=GATE_SETTING, depth_mult=0.5)  # layers 0..2
    assert torch.all(out.exit_layer == 3) and torch.all(out.gates_run == 2)
    assert torch.all(out.heads[:, 3:] == 0) and torch.all(out.width_class[:, 3:] == -1)
    assert torch.all(out.width_class[:, :3] >= 0)
    randomise_gates(model, seed=0)
    with torch.no_grad():
        model.classifier.weight.mul_(100.0)
    out = dynamic_forward(model, *make_inputs(batch=6), class_to_width=GATE_SETTING, early_exit=True, off_ramps=[2],
                          exit_threshold=0.3)
    assert 3 in out.exit_layer.tolist() and 6 in out.exit_layer.tolist()  # exits in the middle of a gate group
    assert torch.equal(out.width_class == -1, out.heads == 0)
    for b, n in enumerate(out.exit_layer.tolist()):
        assert torch.all(out.heads[b, :n] > 0) and torch.all(out.heads[b, n:] == 0)


def test_gate_logits_shape_and_inputs():
    model = gated_model("small", num_gates=2)
    inputs = make_inputs(batch=3)
    states = model(*inputs).hidden_states
    logits = gate_logits(model, states)
    assert logits.shape == (2, 3, 4)
    torch.testing.assert_close(logits[1], model.gates[1](states[2][:, 0]))  # gate 1 reads the state after layer 1


def test_dynamic_forward_without_gates_raises():
    model = make_model(make_config())
    with pytest.raises(ValueError):
        dynamic_forward(model, *make_inputs(), class_to_width=GATE_SETTING)


@pytest.mark.parametrize("width, depth", [(0.0, 1.0), (1.5, 1.0), (0.05, 1.0), (1.0, 0.0), (1.0, 0.1)])
def test_dynamic_forward_rejects_impossible_multipliers(width, depth):
    model = make_model(make_config())  # 8 heads, 4 layers
    with pytest.raises(ValueError):
        dynamic_forward(model, *make_inputs(), fixed_width=width, depth_mult=depth)
    gated = gated_model()
    with pytest.raises(ValueError):
        dynamic_forward(gated, *make_inputs(), class_to_width=[0.25, 0.5, 0.75, width], depth_mult=depth)


def _per_example(model, inputs, **kwargs):
    return [dynamic_forward(model, *(t[b : b + 1] for t in inputs), **kwargs) for b in range(inputs[0].shape[0])]


def _assert_batch_matches_singles(batched, singles):
    for b, single in enumerate(singles):
        torch.testing.assert_close(batched.logits[b : b + 1], single.logits, atol=ATOL, rtol=0)
        for field in ("heads", "width_class", "exit_layer", "gates_run", "off_ramps_run", "linear_macs",
                      "attention_macs"):
            assert torch.equal(getattr(batched, field)[b : b + 1], getattr(single, field)), field


def test_mixed_routing_batch_equals_batch_size_one():
    model = gated_model("medium", num_labels=3)
    randomise_gates(model, seed=3)
    inputs = make_inputs(batch=8, seq_len=12, seed=5)
    batched = dynamic_forward(model, *inputs, class_to_width=GATE_SETTING)
    # real mixed routing: some layer runs several widths inside the batch
    assert max(len(batched.heads[:, i].unique()) for i in range(6)) > 1
    _assert_batch_matches_singles(batched, _per_example(model, inputs, class_to_width=GATE_SETTING))


def test_mixed_routing_with_early_exit_batch_equals_batch_size_one():
    model = gated_model("medium", num_labels=2)
    randomise_gates(model, seed=4)
    with torch.no_grad():
        model.classifier.weight.mul_(100.0)  # spread the off-ramp entropies
    inputs = make_inputs(batch=8, seq_len=12, seed=6)
    # threshold 0.27 lies well between the off-ramp entropies of these examples: some exit, some do not
    kwargs = {"class_to_width": GATE_SETTING, "early_exit": True, "off_ramps": [2, 3], "exit_threshold": 0.27}
    batched = dynamic_forward(model, *inputs, **kwargs)
    assert 3 in batched.exit_layer.tolist() and 6 in batched.exit_layer.tolist()
    assert len(batched.heads[:, 0].unique()) > 1 or len(batched.heads[:, 1].unique()) > 1
    _assert_batch_matches_singles(batched, _per_example(model, inputs, **kwargs))


def test_early_exit_threshold_extremes():
    model = make_model(make_config(**SHAPES["small"]))  # L=4, off-ramps after layers 1 and 2
    inputs = make_inputs(batch=5)
    T, h, C = inputs[0].shape[1], 32, 2
    full = model(*inputs).logits
    never = dynamic_forward(model, *inputs, fixed_width=1.0, early_exit=True, exit_threshold=0.0, off_ramps=[1, 2])
    torch.testing.assert_close(never.logits, full, atol=ATOL, rtol=0)
    assert torch.all(never.exit_layer == 4) and torch.all(never.off_ramps_run == 2)
    assert torch.all(never.linear_macs == subnet_macs(model.config, 1.0, 1.0, T)["linear"] + 2 * (h * h + h * C))

    always = dynamic_forward(model, *inputs, fixed_width=1.0, early_exit=True, exit_threshold=1e9, off_ramps=[1, 2])
    assert torch.all(always.exit_layer == 2) and torch.all(always.off_ramps_run == 1)
    first_two = model.subnet(1.0, 0.5)  # the first two layers
    torch.testing.assert_close(always.logits, model(*inputs, subnet=first_two).logits, atol=ATOL, rtol=0)
    expected = path_macs(model.config, T, [8, 8], num_off_ramps_run=1, exited=True)
    assert torch.all(always.linear_macs == expected["linear"])
    assert torch.all(always.attention_macs == expected["attention"])

    # without early_exit the threshold is ignored; an off-ramp after the last layer is never run
    off = dynamic_forward(model, *inputs, fixed_width=1.0, early_exit=False, exit_threshold=1e9, off_ramps=[1, 2])
    assert torch.all(off.exit_layer == 4) and torch.all(off.off_ramps_run == 0)
    last = dynamic_forward(model, *inputs, fixed_width=1.0, early_exit=True, exit_threshold=1e9, off_ramps=[3])
    assert torch.all(last.exit_layer == 4) and torch.all(last.off_ramps_run == 0)


def test_early_exit_needs_entropy_strictly_below_threshold():
    model = make_model(make_config(**SHAPES["small"]))
    with torch.no_grad():  # uniform off-ramp probabilities: entropy exactly ln 2 (in float32)
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
    p = torch.full((2,), 0.5)
    entropy = -(p * p.log()).sum().item()
    inputs = make_inputs(batch=2)
    at = dynamic_forward(model, *inputs, fixed_width=1.0, early_exit=True, exit_threshold=entropy, off_ramps=[1])
    assert torch.all(at.exit_layer == 4)
    above = dynamic_forward(model, *inputs, fixed_width=1.0, early_exit=True, exit_threshold=entropy + 1e-6,
                            off_ramps=[1])
    assert torch.all(above.exit_layer == 2)


def test_early_exit_regression_never_at_first_ramp():
    model = make_model(make_config(**SHAPES["small"], num_labels=1))
    inputs = make_inputs(batch=4)
    always = dynamic_forward(model, *inputs, fixed_width=0.5, early_exit=True, exit_threshold=1e9, off_ramps=[0, 2])
    assert torch.all(always.exit_layer == 3) and torch.all(always.off_ramps_run == 2)
    three_layers = model.subnet(0.5, 0.75)  # 3 layers
    torch.testing.assert_close(always.logits, model(*inputs, subnet=three_layers).logits, atol=ATOL, rtol=0)
    never = dynamic_forward(model, *inputs, fixed_width=0.5, early_exit=True, exit_threshold=0.0, off_ramps=[0, 2])
    assert torch.all(never.exit_layer == 4)


def test_gate_targets_first_correct_width_else_last_class():
    correct = torch.tensor(
        [[False, True, False, False, True],
         [True, True, False, False, False],
         [False, False, True, False, True]]
    )
    assert gate_targets(correct).tolist() == [1, 0, 2, 3, 0]
    assert gate_targets(torch.zeros(3, 2, dtype=torch.bool)).tolist() == [3, 3]
    assert gate_targets(torch.tensor([[True], [False]])).tolist() == [0]


def test_is_correct_classification_and_regression():
    logits = torch.tensor([[0.1, 0.9], [2.0, -1.0], [0.3, 0.2]])
    assert is_correct(logits, torch.tensor([1, 1, 0]), 0.5).tolist() == [True, False, True]
    preds = torch.tensor([[1.0], [2.0], [3.0]])
    assert is_correct(preds, torch.tensor([1.4, 2.5, 2.0]), 0.5).tolist() == [True, False, False]


def test_gate_loss_masked_mean():
    probs = torch.tensor([[[0.25, 0.75], [0.5, 0.5]], [[0.9, 0.1], [0.2, 0.8]]])  # [G=2, B=2, C=2]
    targets = torch.tensor([1, 0])
    loss = gate_loss(probs, targets, class_index=1, weight=2.0)
    # only example 0 has target 1: entries -log(0.75), -log(0.1); mean over G*B = 4 entries
    expected = 2.0 * (-math.log(0.75) - math.log(0.1)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    tiny = gate_loss(torch.tensor([[[1.0, 0.0]]]), torch.tensor([1]), 1, 1.0)
    assert tiny.item() == pytest.approx(-math.log(1e-6), rel=1e-6)


def test_gumbel_softmax_probs():
    gen = torch.Generator().manual_seed(0)
    probs = gumbel_softmax_probs(torch.zeros(3, 5, 4), 0.5, generator=gen)
    assert probs.shape == (3, 5, 4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(3, 5))
    strong = gumbel_softmax_probs(torch.tensor([[0.0, 1000.0]]), 1.0)
    assert strong[0, 1].item() == pytest.approx(1.0)


def test_temperature_schedule_sst2():
    # SPEC §5.5: SST-2, N=67349, B=32, E=3
    taus = [round(temperature_at(s, 67349, 32, 3, 1.0), 3) for s in range(500, 4001, 500)]
    assert taus == [0.909, 0.826, 0.751, 0.683, 0.621, 0.564, 0.513, 0.5]
    rate = -math.log(0.3) / (67349 / 32 * 3)
    for step in (500, 1000, 2500):
        assert temperature_at(step, 67349, 32, 3, 1.0) == pytest.approx(math.exp(-rate * step), rel=1e-12)
    assert temperature_at(0, 67349, 32, 3, 1.0) == 1.0
    assert temperature_at(750, 67349, 32, 3, 0.909) == 0.909  # unchanged between multiples of 500


def test_temperature_schedule_rte():
    # RTE (N=2490, B=32, E=8): r = 1.934e-3, tau 1.0 until step 500, then 0.5
    assert -math.log(0.3) / (2490 / 32 * 8) == pytest.approx(1.934e-3, rel=1e-3)
    assert temperature_at(499, 2490, 32, 8, 1.0) == 1.0
    assert temperature_at(500, 2490, 32, 8, 1.0) == 0.5
    assert temperature_at(1000, 2490, 32, 8, 0.5) == 0.5


def test_default_off_ramps():
    assert default_off_ramps(12, [0.5, 0.75, 1.0]) == [5, 8]
    assert default_off_ramps(6, [0.5, 0.75, 1.0]) == [2, 3]
    assert default_off_ramps(10, [0.75, 1.0]) == [7]
    assert default_off_ramps(12, [1.0]) == []


# ---- the embedded real model (skips when not installed) -------------------------------------------------
def test_embedded_minilm_equals_stock_hf_and_flops(minilm_dir):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = FlexBertForSequenceClassification.from_pretrained(str(minilm_dir), attn_implementation="eager").eval()
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.hidden_size) == (6, 12, 384)
    # the checkpoint's encoder weights really were loaded (names map onto ours)
    stored = load_file(str(minilm_dir / "model.safetensors"))
    key = next(k for k in stored if k.endswith("encoder.layer.3.attention.self.query.weight"))
    torch.testing.assert_close(model.bert.encoder.layer[3].attention.self.query.weight, stored[key])
    ref = stock_copy(model)
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 30000, (2, 16), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    token_type_ids = torch.zeros_like(input_ids)
    ours = model(input_ids, attention_mask, token_type_ids).logits
    theirs = ref(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert config.num_labels == 2
    assert 2 * subnet_macs(config, 1.0, 1.0, 128)["total"] == 2_869_200_384
    assert 2 * subnet_macs(config, 0.5, 1.0, 128)["total"] == 1_434_748_416
    assert 2 * subnet_macs(config, 0.25, 0.5, 128)["total"] == 358_909_440
