"""Importance scoring, rewiring (most important first) and neural grafting (SPEC §2.3, §3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import SHAPES, make_config, make_inputs, make_model

from transformers_ext import compute_importance, graft, graft_pairs, rewire

DH = 4  # head size of every tiny config here


def make_batches(num_batches: int = 3, batch: int = 2, num_labels: int = 2, seed: int = 0):
    batches = []
    for i in range(num_batches):
        input_ids, attention_mask, token_type_ids = make_inputs(batch=batch, seq_len=10, seed=seed + i)
        labels = torch.arange(batch) % num_labels
        batches.append((input_ids, attention_mask, token_type_ids, labels))
    return batches


def layer_tensors(layer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in layer.named_parameters()}


def head_rows(head: int) -> slice:
    return slice(head * DH, (head + 1) * DH)


# ---- rewiring -------------------------------------------------------------------------------------------
def test_rewire_moves_blocks_by_hand_importance_and_keeps_full_width_function(shape):
    config = make_config(**shape, num_labels=3)
    model = make_model(config)
    L, H, I = config.num_hidden_layers, config.num_attention_heads, config.intermediate_size
    gen = torch.Generator().manual_seed(7)
    # distinct importances; layer 0's most important head is the last one, least important the first
    head_importance = torch.stack([torch.randperm(H, generator=gen).float() for _ in range(L)])
    head_importance[0] = torch.arange(H).float()
    neuron_importance = torch.rand(L, I, generator=gen)
    inputs = make_inputs(batch=3)
    before_logits = model(*inputs).logits
    before = [layer_tensors(layer) for layer in model.bert.encoder.layer]
    untouched = {n: p.detach().clone() for n, p in model.named_parameters() if ".layer." not in n}

    rewire(model, head_importance, neuron_importance)

    torch.testing.assert_close(model(*inputs).logits, before_logits, atol=1e-5, rtol=0)
    for n, p in model.named_parameters():
        if n in untouched:
            assert torch.equal(p, untouched[n]), n
    for i, layer in enumerate(model.bert.encoder.layer):
        old, new = before[i], layer_tensors(layer)
        head_order = sorted(range(H), key=lambda j: -head_importance[i, j].item())
        if i == 0:
            assert head_order[0] == H - 1
        for new_pos, old_head in enumerate(head_order):
            for proj in ("query", "key", "value"):
                for kind in ("weight", "bias"):
                    name = f"attention.self.{proj}.{kind}"
                    assert torch.equal(new[name][head_rows(new_pos)], old[name][head_rows(old_head)]), name
            name = "attention.output.dense.weight"
            assert torch.equal(new[name][:, head_rows(new_pos)], old[name][:, head_rows(old_head)])
        neuron_order = torch.argsort(neuron_importance[i], descending=True)
        assert torch.equal(new["intermediate.dense.weight"], old["intermediate.dense.weight"][neuron_order])
        assert torch.equal(new["intermediate.dense.bias"], old["intermediate.dense.bias"][neuron_order])
        assert torch.equal(new["output.dense.weight"], old["output.dense.weight"][:, neuron_order])
        for name in ("attention.output.dense.bias", "output.dense.bias", "attention.output.LayerNorm.weight",
                     "output.LayerNorm.bias"):
            assert torch.equal(new[name], old[name]), name


def test_rewire_makes_most_important_head_survive_slicing():
    config = make_config(**SHAPES["small"])  # 8 heads: width 0.25 keeps 2
    model = make_model(config)
    query0 = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    head_importance = torch.zeros(4, 8)
    head_importance[:, 5] = 3.0  # best
    head_importance[:, 2] = 2.0  # second
    rewire(model, head_importance, torch.zeros(4, 64))
    new_query0 = model.bert.encoder.layer[0].attention.self.query.weight
    assert torch.equal(new_query0[:4], query0[20:24])
    assert torch.equal(new_query0[4:8], query0[8:12])
    # equal importances keep their relative order (stable sort): old heads 0, 1, 3, 4, 6, 7 follow
    for new_pos, old_head in enumerate([0, 1, 3, 4, 6, 7], start=2):
        assert torch.equal(new_query0[head_rows(new_pos)], query0[head_rows(old_head)])


# ---- importance -----------------------------------------------------------------------------------------
def hand_importance(model, batches):
    """sum_b |g_b| with fresh gradients per batch, eval mode, via autograd.grad (SPEC §2.3)."""
    config = model.config
    L, H = config.num_hidden_layers, config.num_attention_heads
    heads = torch.zeros(L, H)
    neurons = torch.zeros(L, config.intermediate_size)
    model.eval()
    for input_ids, attention_mask, token_type_ids, labels in batches:
        mask = torch.ones(L, H, requires_grad=True)
        logits = model(input_ids, attention_mask, token_type_ids, head_mask=mask).logits
        if config.num_labels == 1:  # regression: squared error of the one output
            loss = ((logits.view(-1) - labels) ** 2).mean()
        else:
            loss = F.cross_entropy(logits, labels)
        params = []
        for layer in model.bert.encoder.layer:
            params += [layer.intermediate.dense.weight, layer.intermediate.dense.bias, layer.output.dense.weight]
        grads = torch.autograd.grad(loss, [mask, *params])
        heads += grads[0].abs()
        for i in range(L):
            w1, b1, w2 = params[3 * i : 3 * i + 3]
            g1, gb1, g2 = grads[1 + 3 * i : 4 + 3 * i]
            neurons[i] += ((w1 * g1).sum(1) + b1 * gb1).abs().detach() + (w2 * g2).sum(0).abs().detach()
    return heads, neurons


@pytest.mark.parametrize("name, training", [("small", True), ("medium", False)])
def test_compute_importance_shapes_values_and_no_side_effects(name, training):
    shape = SHAPES[name]
    config = make_config(**shape, attn_implementation="sdpa")
    model = make_model(config)
    model.train(training)
    batches = make_batches()
    heads, neurons = compute_importance(model, batches)
    assert heads.shape == (config.num_hidden_layers, config.num_attention_heads)
    assert neurons.shape == (config.num_hidden_layers, config.intermediate_size)
    assert all(p.grad is None for p in model.parameters())
    assert model.training is training
    assert all(m.training is training for m in model.modules())
    # (was: width/depth restored to (0.5, 0.5); the model now holds no width/depth state at all)
    assert not any(hasattr(model, a) for a in ("width_mult", "depth_mult", "num_layers_kept", "num_heads_kept"))
    assert torch.all(heads > 0) and torch.all(neurons >= 0) and neurons.sum() > 0
    # equals sum over batches of |per-batch gradient| (gradients zeroed per batch, not accumulated)
    expected_heads, expected_neurons = hand_importance(model, batches)
    torch.testing.assert_close(heads, expected_heads, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(neurons, expected_neurons, rtol=1e-4, atol=1e-7)


def test_compute_importance_max_examples():
    model = make_model(make_config())
    batches = make_batches(num_batches=4, batch=2)
    limited = compute_importance(model, batches, max_examples=3)  # batches of 2: stops after two batches
    first_two = compute_importance(model, batches[:2])
    for got, want in zip(limited, first_two, strict=True):
        torch.testing.assert_close(got, want)
    everything = compute_importance(model, batches)
    assert not torch.allclose(everything[0], first_two[0])


def test_compute_importance_regression_uses_mse():
    model = make_model(make_config(num_labels=1))
    batches = [(*make_inputs(batch=2, seq_len=8, seed=s), torch.tensor([0.5, 3.0])) for s in (1, 2)]
    heads, neurons = compute_importance(model, batches)
    assert heads.shape == (4, 8) and neurons.shape == (4, 64)
    expected_heads, expected_neurons = hand_importance(model, batches)  # |gradient| of the mean squared error
    torch.testing.assert_close(heads, expected_heads, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(neurons, expected_neurons, rtol=1e-4, atol=1e-7)


# ---- grafting -------------------------------------------------------------------------------------------
def test_graft_pairs_even_and_odd():
    weak, strong = graft_pairs(torch.tensor([0.5, 0.1, 0.9, 0.3]))
    assert strong.tolist() == [2, 0] and weak.tolist() == [1, 3]
    weak, strong = graft_pairs(torch.tensor([0.5, 0.1, 0.9]))  # median (0) untouched
    assert strong.tolist() == [2] and weak.tolist() == [1]
    weak, strong = graft_pairs(torch.tensor([4.0, 0.0, 3.0, 1.0, 2.0]))
    assert strong.tolist() == [0, 2] and weak.tolist() == [1, 3]


def expected_graft(old: dict[str, torch.Tensor], head_order, neuron_order, dh: int):
    """new[a] = 0.9*old[a] + 0.1*old[b] for (weakest, strongest), (2nd weakest, 2nd strongest), ... written
    out entry by entry, all reads from `old`."""
    new = {k: v.clone() for k, v in old.items()}
    m = len(head_order) // 2
    for i in range(m):
        a, b = head_order[-1 - i], head_order[i]
        ra, rb = slice(a * dh, (a + 1) * dh), slice(b * dh, (b + 1) * dh)
        for proj in ("query", "key", "value"):
            for kind in ("weight", "bias"):
                name = f"attention.self.{proj}.{kind}"
                new[name][ra] = 0.9 * old[name][ra] + 0.1 * old[name][rb]
        name = "attention.output.dense.weight"
        new[name][:, ra] = 0.9 * old[name][:, ra] + 0.1 * old[name][:, rb]
    m = len(neuron_order) // 2
    for i in range(m):
        a, b = neuron_order[-1 - i], neuron_order[i]
        for name in ("intermediate.dense.weight", "intermediate.dense.bias"):
            new[name][a] = 0.9 * old[name][a] + 0.1 * old[name][b]
        new["output.dense.weight"][:, a] = 0.9 * old["output.dense.weight"][:, a] + 0.1 * old["output.dense.weight"][
            :, b]
    return new


@pytest.mark.parametrize(
    "shape",
    [
        {"hidden_size": 12, "num_hidden_layers": 2, "num_attention_heads": 3, "intermediate_size": 9},  # odd
        SHAPES["small"],
    ],
    ids=["3heads-odd", "small"],
)
def test_graft_blends_weakest_half_only(shape):
    config = make_config(**shape)
    model = make_model(config)
    L, H, I = config.num_hidden_layers, config.num_attention_heads, config.intermediate_size
    gen = torch.Generator().manual_seed(3)
    head_importance = torch.stack([torch.randperm(H, generator=gen).float() for _ in range(L)])
    neuron_importance = torch.rand(L, I, generator=gen)
    before = [layer_tensors(layer) for layer in model.bert.encoder.layer]
    outside = {n: p.detach().clone() for n, p in model.named_parameters() if ".layer." not in n}

    graft(model, head_importance, neuron_importance)

    for n, p in model.named_parameters():
        if n in outside:
            assert torch.equal(p, outside[n]), n
    for i, layer in enumerate(model.bert.encoder.layer):
        old, new = before[i], layer_tensors(layer)
        head_order = sorted(range(H), key=lambda j: -head_importance[i, j].item())
        neuron_order = torch.argsort(neuron_importance[i], descending=True).tolist()
        want = expected_graft(old, head_order, neuron_order, DH)
        for name in old:
            torch.testing.assert_close(new[name], want[name], atol=1e-7, rtol=1e-6, msg=name)
        # strong units, the median (odd counts) and output biases / LayerNorms are untouched
        kept_heads = head_order[: (H + 1) // 2]
        for head in kept_heads:
            for proj in ("query", "key", "value"):
                name = f"attention.self.{proj}.weight"
                assert torch.equal(new[name][head_rows(head)], old[name][head_rows(head)])
        for name in ("attention.output.dense.bias", "output.dense.bias", "output.LayerNorm.weight"):
            assert torch.equal(new[name], old[name])
        weakest = head_order[-1]
        assert not torch.equal(new["attention.self.query.weight"][head_rows(weakest)],
                               old["attention.self.query.weight"][head_rows(weakest)])
        changed_neurons = (new["intermediate.dense.weight"] != old["intermediate.dense.weight"]).any(1)
        assert changed_neurons.sum().item() == I // 2
        if I % 2:
            median = neuron_order[I // 2]
            assert not changed_neurons[median]
        if H % 2:
            median = head_order[H // 2]
            assert torch.equal(new["attention.self.value.weight"][head_rows(median)],
                               old["attention.self.value.weight"][head_rows(median)])
            assert torch.equal(new["attention.output.dense.weight"][:, head_rows(median)],
                               old["attention.output.dense.weight"][:, head_rows(median)])


def test_graft_no_reordering_and_no_grad():
    model = make_model(make_config())
    heads = torch.arange(32, dtype=torch.float).view(4, 8)  # already in ascending order: weakest = head 0
    neurons = torch.arange(256, dtype=torch.float).view(4, 64)
    query = model.bert.encoder.layer[1].attention.self.query.weight.detach().clone()
    graft(model, heads, neurons)
    new = model.bert.encoder.layer[1].attention.self.query.weight
    # head 0 (weakest) blended with head 7 (strongest), in place; head 7 itself unchanged
    torch.testing.assert_close(new[0:4], 0.9 * query[0:4] + 0.1 * query[28:32])
    assert torch.equal(new[28:32], query[28:32])
    assert all(p.grad is None for p in model.parameters())
