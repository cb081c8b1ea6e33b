"""Models and checkpoints made elsewhere load here: a checkpoint written on a GPU resumes on a CPU-only host
(each process maps it onto its own device), the GPUs' RNG state is restored only onto as many GPUs, and a
hub folder saved in float16 loads and trains in float32."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from conftest import TINY_VOCAB, make_config, make_model, save_model_folder
from safetensors.torch import load_file, save_file

from transformers_ext import checkpoints
from transformers_ext.checkpoints import resume_checkpoint, rng_state, save_checkpoint, set_rng_state
from transformers_ext.loading import load_model
from transformers_ext.trainer import build_optimizer
from utils_glue import get_task


def _one_step(model) -> torch.optim.Optimizer:
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer, _ = build_optimizer(params, 1e-3, 0.0, 0, 10)
    model.train()
    ids = torch.tensor([[2, 7, 8, 9, 3], [2, 10, 11, 3, 0]])
    mask = (ids != 0).long()
    loss = model(ids, mask, torch.zeros_like(ids), labels=torch.tensor([0, 1])).loss
    loss.backward()
    optimizer.step()
    return optimizer


def test_a_checkpoint_saved_on_a_gpu_resumes_on_the_cpu(tmp_path, tiny_tokenizer, monkeypatch):
    model = make_model(make_config())
    optimizer = _one_step(model)
    state = {"global_step": 1, "epoch": 0, "batch_in_epoch": 1, "optimizer": optimizer.state_dict(),
             "scheduler": {}, "best_score": 0.5, "history": [], "rng": rng_state(), "args": {"seed": 1}}
    # torch.save records each storage's device; tag them all as cuda:0, as a GPU run writes them
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        save_checkpoint(tmp_path, model, tiny_tokenizer, state)
    with pytest.raises(RuntimeError, match="CUDA"):  # what loading it without a map_location does here
        torch.load(tmp_path / "checkpoint-1" / checkpoints.TRAINING_STATE, weights_only=False)

    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(kw.get("map_location")) or real_load(*a, **kw))
    fresh = make_model(make_config(), seed=1)
    fresh_optimizer, _ = build_optimizer([(n, p) for n, p in fresh.named_parameters()], 1e-3, 0.0, 0, 10)
    device = torch.device("cpu")  # under torchrun: this rank's own device
    ckpt, resumed = resume_checkpoint(tmp_path, "latest", fresh, device, {"seed": 1}, fresh_optimizer)
    assert loads == [device]
    assert ckpt.name == "checkpoint-1" and resumed["global_step"] == 1
    exp_avg = resumed["optimizer"]["state"][0]["exp_avg"]
    assert exp_avg.device.type == "cpu"
    assert torch.equal(exp_avg, optimizer.state_dict()["state"][0]["exp_avg"])
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def _cuda_host(monkeypatch, gpus: int) -> list:
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    return restored


@pytest.mark.parametrize("gpus", [1, 2, 3])
def test_gpu_rng_state_is_restored_only_onto_as_many_gpus(monkeypatch, gpus):
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
             "cuda": [torch.full((16,), i, dtype=torch.uint8) for i in range(2)]}  # saved on 2 GPUs
    expected = (random.random(), np.random.rand(), torch.rand(1))
    restored = _cuda_host(monkeypatch, gpus)
    if gpus == 2:
        set_rng_state(state)
        assert len(restored) == 1 and [int(s[0]) for s in restored[0]] == [0, 1]
    else:
        with pytest.warns(UserWarning, match="RNG state of 2 GPU"):
            set_rng_state(state)
        assert restored == []
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected  # the CPU streams always


def test_a_float16_hub_folder_loads_and_trains_in_float32(tmp_path):
    folder = save_model_folder(tmp_path / "fp16", TINY_VOCAB, make_config())
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v.half() for k, v in weights.items()}, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config.update(torch_dtype="float16", dtype="float16")  # transformers 4 and 5 spellings
    (folder / "config.json").write_text(json.dumps(config))

    model, _ = load_model(str(folder), get_task("RTE"))
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _one_step(model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    for name, value in before.items():  # every weight the loss reaches moved, from the fp16 values
        assert torch.equal(value, weights[name].half().float()), name
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) > len(before) // 2
