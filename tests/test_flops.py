"""Analytic MAC counts (SPEC §6.5): hand-computed values, agreement with torch's FlopCounterMode on the eager
model, and the BERT-base reference number."""

from __future__ import annotations

import pytest
import torch
from conftest import SHAPES, make_config, make_inputs, make_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import BertConfig

from transformers_ext import flops_summary, layer_macs, path_macs, subnet_macs


def hand_macs(shape: dict[str, int], width: float, depth: float, seq_len: int, num_labels: int = 2):
    """(linear, attention) MACs of the static subnet from the rounding rules (SPEC §0, §2.1, §6.5)."""
    h, H, I, L = (shape[k] for k in ("hidden_size", "num_attention_heads", "intermediate_size", "num_hidden_layers"))
    dh = h // H
    k = round(H * width)
    f = max(1, k * I // H)
    n = round(L * depth)
    linear = n * seq_len * (4 * h * k * dh + 2 * h * f) + h * h + h * num_labels
    attention = n * 2 * seq_len * seq_len * k * dh
    return linear, attention


CASES = [
    ("small", 1.0, 1.0), ("small", 0.5, 1.0), ("small", 0.25, 0.5), ("small", 0.75, 0.75),
    ("medium", 1.0, 1.0), ("medium", 0.75, 0.75), ("medium", 0.5, 0.5), ("medium", 0.25, 1.0),
]


@pytest.mark.parametrize("name, width, depth", CASES)
@pytest.mark.parametrize("seq_len", [16, 128])
def test_subnet_macs_match_hand_count(name, width, depth, seq_len):
    config = make_config(**SHAPES[name])
    macs = subnet_macs(config, width, depth, seq_len)
    linear, attention = hand_macs(SHAPES[name], width, depth, seq_len)
    assert macs == {"linear": linear, "attention": attention, "total": linear + attention}


def test_hand_count_literals():
    # small (h32, H8, dh4, I64, L4), T=16, full: per layer 16*(4*32*32 + 2*32*64) = 131072 linear and
    # 2*16*16*32 = 16384 attention; + pooler 1024 + classifier 64
    assert subnet_macs(make_config(**SHAPES["small"]), 1.0, 1.0, 16) == {
        "linear": 4 * 131072 + 1088, "attention": 4 * 16384, "total": 4 * 131072 + 1088 + 4 * 16384}
    # medium (h48, H12, dh4, I96, L6), w=0.75 -> 9 heads / 72 neurons, d=0.75 -> rnd(4.5) = 4 layers, T=16:
    # per layer 16*(4*48*36 + 2*48*72) = 221184 linear, 2*256*36 = 18432 attention; + 2304 + 96
    macs = subnet_macs(make_config(**SHAPES["medium"]), 0.75, 0.75, 16)
    assert macs["linear"] == 4 * 221184 + 2400
    assert macs["attention"] == 4 * 18432


def test_layer_macs_and_path_macs_extras():
    config = make_config(**SHAPES["small"], num_labels=3)
    # 2 heads -> 16 neurons: 10*(4*32*8 + 2*32*16) = 20480, attention 2*100*8 = 1600
    assert layer_macs(config, 10, 2) == (20480, 1600)
    # all 8 heads -> 64 neurons: 10*(4*32*32 + 2*32*64) = 81920, attention 2*100*32 = 6400
    assert layer_macs(config, 10, 8) == (81920, 6400)
    base = path_macs(config, 10, [2, 8])
    assert base["linear"] == 20480 + 81920 + 32 * 32 + 32 * 3
    with_extras = path_macs(config, 10, [2, 8], num_gates_run=2, num_off_ramps_run=1, num_gate_classes=4)
    assert with_extras["linear"] - base["linear"] == 2 * (32 * 32 + 32 * 4) + (32 * 32 + 32 * 3)
    assert with_extras["attention"] == base["attention"] == 1600 + 6400
    # an example that left at an off-ramp after its first layer: no final head
    exited = path_macs(config, 10, [2], num_off_ramps_run=1, exited=True)
    assert exited == {"linear": 20480 + 32 * 32 + 32 * 3, "attention": 1600, "total": 20480 + 1120 + 1600}


@pytest.mark.parametrize("name, width, depth", CASES)
def test_flop_counter_agrees_with_subnet_macs(name, width, depth):
    config = make_config(**SHAPES[name], attn_implementation="eager")
    model = make_model(config)
    subnet = model.subnet(width, depth)
    batch, seq_len = 2, 16
    input_ids, attention_mask, token_type_ids = make_inputs(batch=batch, seq_len=seq_len, pad=False)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids, attention_mask, token_type_ids, subnet=subnet)
    counted = counter.get_total_flops()
    analytic = batch * 2 * subnet_macs(config, width, depth, seq_len)["total"]
    assert abs(counted - analytic) <= 0.01 * counted
    assert counted == analytic  # exact in fact: only dense layers and the two attention products are counted


def test_bert_base_reference_number():
    # SPEC §6.5: full BERT-base, 2 labels, 12 gates of 4 classes, T=128
    config = BertConfig(num_labels=2)
    macs = path_macs(config, 128, [12] * 12, num_gates_run=12, num_gate_classes=4)
    assert macs["linear"] == 10_879_342_080
    assert round(2 * macs["linear"] / 1e10, 5) == 2.17587
    # the reference runs a 13th gate
    thirteen = path_macs(config, 128, [12] * 12, num_gates_run=13, num_gate_classes=4)
    assert round(2 * thirteen["linear"] / 1e10, 5) == 2.17599


def test_flops_summary():
    summary = flops_summary({"linear": 3e9, "attention": 1e9, "total": 4e9},
                            {"linear": 10e9, "attention": 2e9, "total": 12e9})
    assert summary == pytest.approx({"flops": 0.6, "true_flops": 8e9, "relative_flops": 1 / 3,
                                     "relative_linear_flops": 0.3}, rel=1e-12)
    config = BertConfig(num_labels=2)
    full = subnet_macs(config, 1.0, 1.0, 128)
    half = subnet_macs(config, 0.5, 0.5, 128)
    summary = flops_summary(half, full)
    # half width and half depth keep about a quarter of the dense-layer work
    assert 0.24 < summary["relative_linear_flops"] < 0.26
    assert flops_summary(full, full)["relative_flops"] == 1.0

