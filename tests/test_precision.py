"""Routed inference and the layers under autocast (bf16 on CPU; the same code paths as fp16/bf16 on CUDA),
and the host syncs of routing: every inference mode and the exported routed model give fp32's predictions
and close logits under bf16 autocast, the residual is added in fp32 as Hugging Face's BERT does, a gate
group's widths are read to the host once, and the MACs are counted outside the forward; latency skips its
warm-up batches, and the GPU benchmarks refuse a host without CUDA in one line."""

from __future__ import annotations

import pytest
import torch
from conftest import make_config, make_inputs, make_model
from transformers.models.bert.modeling_bert import BertOutput, BertSelfOutput

from transformers_ext import inference
from transformers_ext.export import export_gated
from transformers_ext.inference import default_off_ramps, dynamic_forward
from transformers_ext.modeling_flexbert import FlexOutput, FlexSelfOutput
from transformers_ext.modeling_routed import RoutedFlexBertForSequenceClassification

# bf16 keeps 8 bits of mantissa: on this 4-layer tiny BERT the logits move by up to 5.3e-3 (measured).
BF16_LOGIT_ATOL = 2e-2
WIDTHS = [0.25, 0.5, 0.75, 1.0]


def _gated_model(attn: str = "eager", num_gates: int = 4):
    model = make_model(make_config(num_hidden_layers=4, attn_implementation=attn), seed=3)
    torch.manual_seed(5)
    model.add_gates(WIDTHS, num_gates)
    with torch.no_grad():  # gates that spread the batch over several widths
        for gate in model.gates:
            torch.nn.init.normal_(gate.dense.weight, std=0.5)
            torch.nn.init.normal_(gate.classifier.weight, std=1.0)
        model.classifier.weight.mul_(30)  # confident enough for some examples to leave at the off-ramps
    return model.eval()


MODES = {
    "static": dict(fixed_width=0.5, depth_mult=0.75),
    "w_dynamic": dict(class_to_width=WIDTHS),
    "wd_dynamic_early_exit": dict(class_to_width=WIDTHS, early_exit=True, exit_threshold=0.67, off_ramps=[1, 2]),
    "d_dynamic": dict(fixed_width=0.75, early_exit=True, exit_threshold=0.67, off_ramps=[1, 2]),
}


def _assert_same_predictions(low: torch.Tensor, full: torch.Tensor) -> None:
    """Same argmax except where fp32's top two logits are within the bf16 tolerance (a tie at this precision),
    and logits within it."""
    assert low.dtype == torch.float32
    top2 = full.topk(2, dim=-1).values
    decided = (top2[:, 0] - top2[:, 1]) > 2 * BF16_LOGIT_ATOL
    assert decided.any()
    assert torch.equal(low.argmax(-1)[decided], full.argmax(-1)[decided])
    torch.testing.assert_close(low, full, atol=BF16_LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_inference_mode_under_bf16_autocast(mode, attn):
    model = _gated_model(attn)
    inputs = make_inputs(batch=16, seq_len=12, seed=2)
    full = dynamic_forward(model, *inputs, **MODES[mode])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = dynamic_forward(model, *inputs, **MODES[mode])
    _assert_same_predictions(low.logits, full.logits)
    if mode != "static":  # the routing is the one the logits came from: widths and exits agree where decided
        assert (low.heads == full.heads).float().mean() > 0.8
    assert torch.equal(low.linear_macs, inference.executed_macs(model.config, 12, low.record)[0])


def test_exported_routed_model_under_bf16_autocast():
    model = _gated_model(num_gates=2)
    exported = export_gated(model, 1.0, WIDTHS, early_exit=True, exit_threshold=0.67,
                            off_ramps=default_off_ramps(4, (0.5, 0.75, 1.0)))
    routed = RoutedFlexBertForSequenceClassification(exported.config)
    routed.load_state_dict(exported.state_dict())
    routed.eval()
    inputs = make_inputs(batch=16, seq_len=12, seed=2)
    with torch.no_grad():
        full = routed(*inputs).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = routed(*inputs).logits
    _assert_same_predictions(low, full)


@pytest.mark.parametrize(("ours", "theirs"), [(FlexSelfOutput, BertSelfOutput), (FlexOutput, BertOutput)])
def test_residual_is_added_in_fp32_under_autocast(ours, theirs):
    """Hugging Face's BERT adds the fp32 residual to the half-precision sublayer output out of place (the sum
    is fp32): ours gives its output bit for bit."""
    config = make_config()
    torch.manual_seed(0)
    hf = theirs(config).eval()
    flex = ours(config).eval()
    flex.load_state_dict(hf.state_dict())
    width = hf.dense.in_features
    gen = torch.Generator().manual_seed(1)
    sublayer_in, residual = torch.randn(2, 5, width, generator=gen), torch.randn(2, 5, 32, generator=gen)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(flex(sublayer_in, residual), hf(sublayer_in, residual))


def test_a_gate_groups_widths_are_read_once(monkeypatch):
    """With 2 gates over 4 layers, the encoder reads the per-example widths to the host once per gate (the
    layers of a group share them), not once per layer; the logits are those of per-layer grouping."""
    model = _gated_model(num_gates=2)
    inputs = make_inputs(batch=8, seq_len=12, seed=2)
    calls = []
    unique = torch.Tensor.unique
    monkeypatch.setattr(torch.Tensor, "unique", lambda self, *a, **k: calls.append(1) or unique(self, *a, **k))
    out = dynamic_forward(model, *inputs, class_to_width=WIDTHS)
    assert len(calls) == 2
    # the batch really is split over widths in both gate groups
    assert len(set(out.heads[:, 0].tolist())) > 1 and len(set(out.heads[:, 2].tolist())) > 1


def test_macs_are_counted_outside_the_forward(monkeypatch):
    """The MAC count (a host sync) is not part of the routed forward, which a latency measurement times: it
    runs on first access to linear_macs / attention_macs."""
    model = _gated_model()
    calls = []
    count = inference.executed_macs
    monkeypatch.setattr(inference, "executed_macs", lambda *a: calls.append(1) or count(*a))
    out = dynamic_forward(model, *make_inputs(batch=4, seq_len=12), class_to_width=WIDTHS)
    assert calls == []
    linear, attention = out.linear_macs, out.attention_macs
    assert calls == [1] and linear.shape == attention.shape == (4,)
    assert out.attention_macs is attention  # counted once


class _NoElementReads(torch.Tensor):
    def __getitem__(self, index):
        raise AssertionError("a per-example field was read element by element (one device sync each)")


def test_prediction_records_read_each_tensor_once():
    from types import SimpleNamespace

    import utils_glue

    model = _gated_model()
    inputs = make_inputs(batch=4, seq_len=12)
    out = dynamic_forward(model, *inputs, class_to_width=WIDTHS, early_exit=True, exit_threshold=0.6,
                          off_ramps=[1, 2])
    fields = ("heads", "width_class", "exit_layer", "exited", "linear_macs", "attention_macs")
    guarded = SimpleNamespace(**{f: getattr(out, f).as_subclass(_NoElementReads) for f in fields})
    spec = utils_glue.get_task("RTE")
    labels = torch.tensor([0, 1, 1, 0]).as_subclass(_NoElementReads)
    rows = utils_glue.prediction_records(spec, "dev", list("abcd"), out.logits, labels, guarded, WIDTHS, None)
    assert [r["exit_layer"] for r in rows] == out.exit_layer.tolist()
    assert [r["linear_macs"] for r in rows] == out.linear_macs.tolist()
    assert [r["label"] for r in rows] == ["entailment", "not_entailment", "not_entailment", "entailment"]


def test_subnet_evaluation_honours_bf16():
    """Subnet evaluation runs under autocast for precision "bf16": logits close to fp32's, not equal."""
    from conftest import subnet_predictions
    from torch.utils.data import TensorDataset

    model = _gated_model()
    input_ids, attention_mask, token_type_ids = make_inputs(batch=16, seq_len=12, seed=6)
    dataset = TensorDataset(input_ids, attention_mask, token_type_ids, torch.arange(16) % 2)
    full, _, full_loss = subnet_predictions(model, dataset, 0.5, 0.75)
    low, _, low_loss = subnet_predictions(model, dataset, 0.5, 0.75, precision="bf16")
    assert low.dtype == full.dtype and not (low == full).all()
    _assert_same_predictions(torch.from_numpy(low), torch.from_numpy(full))
    assert abs(low_loss - full_loss) < 2e-2


def test_deterministic_and_tf32_settings(monkeypatch):
    from transformers_ext.environment import setup_numerics, tf32_enabled

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        setup_numerics(torch.device("cpu"), tf32=True, deterministic=True)
        assert torch.are_deterministic_algorithms_enabled()
        assert __import__("os").environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert not tf32_enabled(torch.device("cpu"))  # TF32 is a CUDA matmul mode only
    finally:
        torch.use_deterministic_algorithms(before)


class _HostSyncCounter:
    """Counts the aten ops of a CPU run that on CUDA make the host wait for the device: reading a value
    (item/bool/tolist: `_local_scalar_dense`), `nonzero`, `unique`, and indexing or index-assignment with a
    boolean mask (whose kernel counts the mask's true entries on the host)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self
        self.ops: list[str] = []

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.overloadpacket.__name__
                masked = name in ("index", "index_put", "index_put_") and any(
                    isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or ()))
                if masked or name in ("_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive"):
                    counter.ops.append("bool_index" if masked else name)
                return func(*args, **(kwargs or {}))

        self.mode = Mode()

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_host_syncs_of_one_routed_batch(mode):
    """A routed batch of 16 (4 layers, a gate per layer, off-ramps after layers 1 and 2, where examples
    leave) reads no value and indexes no boolean mask on the host: static routing syncs never, a gate once
    (`unique` of its widths, then `nonzero` per width group), an off-ramp where some leave twice (before, an
    exit cost 8 syncs: `any`, 5 boolean-mask indexings, the encoder's 2)."""
    model = _gated_model()
    inputs = make_inputs(batch=16, seq_len=12, seed=2)
    with _HostSyncCounter() as syncs:
        out = dynamic_forward(model, *inputs, **MODES[mode])
    gated, exits = "class_to_width" in MODES[mode], "early_exit" in MODES[mode]
    assert set(syncs.ops) <= {"_unique2", "nonzero"}
    assert syncs.ops.count("_unique2") == (4 if gated else 0)
    if exits:  # examples left at both off-ramps
        assert set(out.exit_layer.tolist()) == {2, 3, 4}
    if not gated:
        assert syncs.ops.count("nonzero") == (4 if exits else 0)


def test_timing_warms_up_longer_on_a_gpu_and_skips_the_warm_up_batches():
    """--record_gpu_time uses CUDA events on a GPU (wall-clock elsewhere); the default warm-up is 10 batches
    on a GPU, 1 on the CPU, and the warm-up batches are left out of the latency (not of the scores)."""
    from torch.utils.data import TensorDataset

    from transformers_ext.evaluation import EvaluationOptions, Timing, evaluate_routed
    from transformers_ext.routing import RoutingSetting

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert Timing.on(cuda, True, False, None) == Timing(True, True, 10)
    assert Timing.on(cpu, True, False, None) == Timing(True, False, 1)
    assert Timing.on(cuda, False, True, 3) == Timing(True, False, 3)  # --record_cpu_time: wall-clock
    dataset = TensorDataset(*make_inputs(batch=10, seq_len=12), torch.arange(10) % 2)
    evaluation = evaluate_routed(_gated_model(), {"dev": dataset}, RoutingSetting(WIDTHS, 0.5), cpu,
                                 EvaluationOptions(4, timing=Timing(True, False, 2), reported=["dev"]))
    assert len(evaluation.batch_times) == 1 and evaluation.n_examples_timed == 2  # the third batch: 2 examples
    assert evaluation.n_total == 10


def test_bench_gpu_without_cuda_is_one_line(capsys):
    """benchmarks/bench_gpu.py on a host without CUDA: exit status 2 and one `error:` line, nothing measured."""
    import importlib.util
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    bench_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_gpu)
    assert bench_gpu.main(["--quick"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: bench_gpu.py needs a CUDA device") and err.count("\n") == 1


def test_gpu_smoke_without_cuda_asks_for_the_dry_run(tmp_path):
    """benchmarks/gpu_smoke.sh without --cpu on a host without CUDA: one `error:` line naming --cpu, exit 2,
    before any step runs."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(["bash", str(root / "benchmarks" / "gpu_smoke.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable, "SMOKE_DIR": str(tmp_path / "smoke")},
                          timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == ["error: no CUDA device (torch.cuda.is_available() is False); run with "
                                        "--cpu for the dry run"]
    assert not (tmp_path / "smoke" / "logs").exists()
