"""The training loop's per-loss gradient balancing (`run_glue.py --balance_subnet_gradients`): each loss's
gradient is rescaled to unit norm, the sum to the mean of the norms."""

from __future__ import annotations

import pytest
import torch

from transformers_ext.trainer import GradientBalancer, Hooks, Schedule, fit


def _losses(shared: torch.nn.Parameter, own: torch.nn.Parameter):
    """Two losses: the first reaches both parameters with a large gradient, the second only `shared`."""
    x, y = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.1])
    yield "wide", 10 * (shared * x).sum() + (own * torch.tensor([12.0, 0.0])).sum()
    yield "narrow", (shared * y).sum()


def _expected(shared_grads: list[torch.Tensor], own_grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g1 = torch.cat([shared_grads[0], own_grad])  # the first loss's whole gradient
    n1, n2 = g1.norm(), shared_grads[1].norm()
    mean = (n1 + n2) / 2
    return (shared_grads[0] / n1 + shared_grads[1] / n2) * mean, own_grad / n1 * mean


def test_balancer_rescales_each_loss_to_unit_norm_then_to_the_mean_norm():
    shared, own, untouched = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    balancer = GradientBalancer([shared, own, untouched])
    for _, loss in _losses(shared, own):
        loss.backward()
        balancer.take()
        assert shared.grad is None  # moved out, so the next loss's gradient is its own
    balancer.restore()
    want_shared, want_own = _expected([torch.tensor([30.0, 40.0]), torch.tensor([0.0, 0.1])], torch.tensor([12.0, 0.0]))
    assert torch.allclose(shared.grad, want_shared) and torch.allclose(own.grad, want_own)
    assert untouched.grad is None  # no loss reached it: AdamW skips it, as without balancing
    # unbalanced, the narrow loss's share of the shared gradient would be 0.1 / 50; balanced it is half
    assert shared.grad[1] / shared.grad.norm() > 0.5


@pytest.mark.parametrize("balance", [False, True])
def test_fit_applies_the_balanced_gradient(balance):
    shared, own = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([shared, own], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    fit(params=[("shared", shared), ("own", own)], optimizer=optimizer, scheduler=scheduler,
        schedule=Schedule(1, 1, 1), batches=lambda epoch, start: [None],
        losses=lambda batch, state: _losses(shared, own), hooks=Hooks(), balance_losses=balance)
    grads = [torch.tensor([30.0, 40.0]), torch.tensor([0.0, 0.1])]
    if balance:
        want_shared, want_own = _expected(grads, torch.tensor([12.0, 0.0]))
    else:
        want_shared, want_own = grads[0] + grads[1], torch.tensor([12.0, 0.0])
    total = torch.cat([want_shared, want_own]).norm()  # fit clips the update's gradient norm to 1
    assert torch.allclose(shared.detach(), -1e-3 * want_shared / total, atol=1e-7)
    assert torch.allclose(own.detach(), -1e-3 * want_own / total, atol=1e-7)


def test_all_reduce_gradients_averages_over_processes(monkeypatch):
    """torchrun: each parameter's gradient becomes the mean over the processes (DDP), not their sum. The other
    process is simulated: all_reduce adds its gradients."""
    import torch.distributed as dist

    from transformers_ext.distributed import all_reduce_gradients

    a, b, frozen = (torch.nn.Parameter(torch.zeros(n)) for n in (2, 3, 1))
    a.grad, b.grad = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0, 5.0])
    other = torch.tensor([3.0, 0.0, -1.0, 2.0, 9.0])  # the other process's gradients of a and b, flattened

    def all_reduce(tensor, *args, **kwargs):
        tensor.add_(other)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    all_reduce_gradients([a, frozen, b], world=2)
    assert a.grad.tolist() == [2.0, 1.0] and b.grad.tolist() == [1.0, 3.0, 7.0] and frozen.grad is None


def _count_host_reads(monkeypatch) -> list[str]:
    """Records every read of a tensor's value to the host (item, tolist, bool, float): each is a device sync."""
    reads = []
    for name in ("item", "tolist", "__bool__", "__float__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _n=name, _f=original: reads.append(_n) or _f(self, *a))
    return reads


@pytest.mark.parametrize("balance", [False, True])
def test_fit_reads_the_losses_to_the_host_once_per_batch(monkeypatch, balance):
    """Two losses per batch, four batches: one read of the batch's losses each (not a finite check and an
    item() per loss, nor a norm per loss when balancing); the logged losses are still the exact values."""
    shared, own = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([shared, own], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    reads = _count_host_reads(monkeypatch)
    state = fit(params=[("shared", shared), ("own", own)], optimizer=optimizer, scheduler=scheduler,
                schedule=Schedule(1, 2, 2, accumulation=2), batches=lambda epoch, start: [None] * 4,
                losses=lambda batch, state: _losses(shared, own), hooks=Hooks(), balance_losses=balance, log_every=1)
    monkeypatch.undo()
    assert reads == ["tolist"] * 4
    assert state.global_step == 2 and state.log_history[0]["loss"] == 0.0  # the parameters start at 0
    assert state.log_history[1]["loss"] < 0  # the first update moved them against the gradient


def test_fit_stops_on_a_non_finite_loss_before_the_update():
    weight = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def losses(batch, state):
        yield "fine", weight.sum()
        yield "broken", weight.sum() * float("nan")

    from transformers_ext.errors import InputError

    with pytest.raises(InputError, match="non-finite loss .* on subnet broken"):
        fit(params=[("w", weight)], optimizer=optimizer, scheduler=scheduler, schedule=Schedule(1, 1, 1),
            batches=lambda epoch, start: [None], losses=losses, hooks=Hooks())
    assert torch.equal(weight.detach(), torch.ones(2))  # no optimizer step
