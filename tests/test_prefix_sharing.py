"""Prefix-shared training and evaluation (issue 16): one forward per width serves every depth.

Depth subnets are prefixes, so the deepest run's hidden state after layer rnd(d*L) is the depth-d subnet's.
Without dropout the gradient of the summed shared loss must equal the sum of the separate subnets'
gradients, parameter by parameter, and subnet evaluation must give the separate subnets' scores exactly.
The gradient comparison runs in float64: the random model's hidden-state MSE gradients reach ~200, where
float32's different summation order alone differs by 3e-5."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import make_config, make_inputs, make_model, subnet_predictions
from torch.utils.data import TensorDataset

import run_glue
import utils_glue
from transformers_ext.evaluation import evaluate_subnets

WIDTHS = [1.0, 0.75, 0.5, 0.25]
DEPTHS = [1.0, 0.75, 0.5]


def _model(num_labels: int, seed: int = 0, pooling: str = "cls"):
    config = make_config(hidden_size=32, num_hidden_layers=4, num_attention_heads=8, intermediate_size=64,
                         num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                         pooling=pooling)
    return make_model(config, seed)


def _batch(num_labels: int, batch: int = 6, seq_len: int = 12, seed: int = 3) -> list[torch.Tensor]:
    input_ids, attention_mask, token_type_ids = make_inputs(batch, seq_len, seed)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.rand(batch, generator=gen) * 5 if num_labels == 1 else torch.randint(0, num_labels, (batch,),
                                                                                         generator=gen)
    return [input_ids, attention_mask, token_type_ids, labels]


def _gradients(model, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("phase, extra", [
    ("dynabert", []), ("dynabert", ["--data_aug"]), ("final_finetuning", []),
])
@pytest.mark.parametrize("num_labels", [2, 1], ids=["classification", "regression"])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_prefix_shared_gradient_equals_sum_of_separate_subnets(phase, extra, num_labels, pooling):
    args = run_glue.parse_args(["--training_phase", phase, "--depth_mult_list", "0.5,0.75,1.0", *extra])
    model = _model(num_labels, pooling=pooling).double().train()
    teacher = _model(num_labels, seed=1, pooling=pooling).double().eval()
    batch = _batch(num_labels)
    if num_labels == 1:
        batch[3] = batch[3].double()
    with torch.no_grad():
        teacher_out = teacher(*batch[:3]) if run_glue.PHASES[phase].teacher != "never" else None
    widths, depths = run_glue.phase_subnets(args)
    assert (widths, depths) == (WIDTHS, DEPTHS)

    separate = sum(run_glue.subnet_loss(args, model, batch, teacher_out, w, d) for d in depths for w in widths)
    separate_grads = _gradients(model, separate)
    shared = sum(run_glue.prefix_shared_loss(args, model, batch, teacher_out, w, depths) for w in widths)
    shared_grads = _gradients(model, shared)

    torch.testing.assert_close(shared, separate, rtol=0, atol=1e-5)
    assert separate_grads.keys() == shared_grads.keys()
    assert len(shared_grads) == len(list(model.parameters()))  # every parameter gets a gradient
    for name, grad in separate_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("num_labels, task", [(2, "RTE"), (1, "STS-B")])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_prefix_shared_evaluation_scores_equal_separate_subnets(num_labels, task, pooling):
    model = _model(num_labels, pooling=pooling)
    dataset = TensorDataset(*_batch(num_labels, batch=20, seed=5))
    results = evaluate_subnets(model, functools.partial(utils_glue.compute_metrics, task),
                               {"dev": dataset}, WIDTHS, DEPTHS, 8, torch.device("cpu"))
    assert list(results) == [f"d{d:g}_w{w:g}" for d in DEPTHS for w in WIDTHS]
    for d in DEPTHS:
        for w in WIDTHS:
            subnet = model.subnet(w, d)
            with torch.no_grad():  # separate forwards of the subnet itself, one batch of 8 at a time
                logits = torch.cat([model(*[t[i:i + 8] for t in dataset.tensors[:3]], subnet=subnet).logits
                                    for i in range(0, 20, 8)])
            # bit-identical on some CPUs; others pick kernels by shape and differ in the last bits (4e-9 seen)
            torch.testing.assert_close(torch.from_numpy(subnet_predictions(model, dataset, w, d)[0]),
                                       logits, rtol=0, atol=1e-6)

            expected = utils_glue.compute_metrics(task, logits.numpy(), dataset.tensors[3].numpy())
            for key, value in expected.items():
                assert results[f"d{d:g}_w{w:g}"][key] == pytest.approx(value, rel=0, abs=1e-6)
