"""Section 2: static subnets. For width in {0.25, 0.5, 0.75} x depth in {0.5, 0.75, 1.0}, the measured
speed-up over the full model against the FLOPs speed-up (true FLOPs of the executed path: linear layers and
attention products), once sliced on the fly (views of the full weights) and once exported as a physically
smaller model (export_subnet). Targets at batch 32: sliced >= 0.8 x, exported >= 0.9 x the FLOPs speed-up;
batch 1 is reported."""

from __future__ import annotations

import torch
from common import (
    DEPTHS,
    SEQ_LEN,
    WIDTHS,
    Context,
    Result,
    emit,
    header,
    measure_with_retry,
    median,
    median_ratio,
)

from transformers_ext import export_subnet, subnet_macs

TARGETS = {"sliced": 0.8, "exported": 0.9}
# Ops whose work the FLOPs count covers (linear layers, attention); everything else (LayerNorm, residual adds,
# embeddings, GELU, the bias broadcast inside addmm, views) is outside it.
COUNTED_OPS = {"aten::addmm", "aten::mm", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu"}


def op_split(fn, repeats: int = 3) -> tuple[float, float]:
    """(counted, uncounted) self CPU seconds of one call of `fn`, median-free: the mean over `repeats` calls
    under torch.profiler, after one warm call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            fn()
    counted = uncounted = 0.0
    for e in prof.key_averages():
        if e.key in COUNTED_OPS:
            counted += e.self_cpu_time_total
        else:
            uncounted += e.self_cpu_time_total
    return counted / repeats / 1e6, uncounted / repeats / 1e6


def explain(name: str, full_fn, subnet_fn, flops_speedup: float) -> Result:
    """Why a subnet misses: the share of its time in ops the FLOPs count leaves out, and the best
    speed-up/FLOPs ratio possible if the counted ops scaled exactly with FLOPs."""
    full_counted, full_other = op_split(full_fn)
    sub_counted, sub_other = op_split(subnet_fn)
    ceiling = (full_counted + full_other) / (full_counted + flops_speedup * sub_other)
    share = 100 * sub_other / (sub_counted + sub_other)
    rate = full_counted / flops_speedup / sub_counted
    detail = (f"{1e3 * sub_other:.1f} of {1e3 * (sub_counted + sub_other):.1f} ms in LayerNorm, residual adds, "
              f"embeddings, GELU, bias broadcast (full model: {100 * full_other / (full_counted + full_other):.1f}%);"
              f" ceiling of speed-up/FLOPs speed-up if linear+attention scaled exactly: {ceiling:.2f}; its "
              f"linear+attention run at {rate:.2f} of the full model's FLOP rate (narrow, memory-bound GEMMs)")
    return emit(Result(f"{name}: time outside the FLOPs count", share, unit="%", detail=detail, digits=1))


def run(ctx: Context) -> list[Result]:
    header("2. static subnets: measured speed-up / FLOPs speed-up (sdpa)", ctx)
    model = ctx.model("sdpa")
    config = model.config
    full_macs = subnet_macs(config, 1.0, 1.0, SEQ_LEN)["total"]
    exported = {}
    for w in WIDTHS:
        for d in DEPTHS:
            small = export_subnet(model, w, d).eval()
            small.config._attn_implementation = "sdpa"
            exported[(w, d)] = small
    results = []
    for batch_size in (32, 1):
        x = ctx.batch(batch_size)

        def forward(net, width=None, depth=None, x=x):
            subnet = None if width is None else net.subnet(width, depth)

            def call():
                with torch.no_grad():
                    net(*x, subnet=subnet)
            return call

        rounds = ctx.rounds(4, 2) if batch_size == 32 else ctx.rounds(12, 6)
        for w in WIDTHS:
            for d in DEPTHS:
                flops_speedup = full_macs / subnet_macs(config, w, d, SEQ_LEN)["total"]
                variants = {"full": forward(model, 1.0, 1.0), "sliced": forward(model, w, d),
                            "exported": forward(exported[(w, d)])}
                if batch_size == 32:
                    def passes(t, fs=flops_speedup):
                        return all(median_ratio(t["full"], t[k]) >= TARGETS[k] * fs for k in TARGETS)
                else:
                    def passes(t):
                        return True
                times, retried = measure_with_retry(ctx, variants, rounds, passes, warmup=1)
                for kind in ("sliced", "exported"):
                    speedup = median_ratio(times["full"], times[kind])
                    detail = (f"speed-up {speedup:.2f}x of FLOPs {flops_speedup:.2f}x; full "
                              f"{1e3 * median(times['full']):.1f} ms, subnet {1e3 * median(times[kind]):.1f} ms, "
                              f"{len(times['full'])} rounds{', re-measured' if retried else ''}")
                    target = TARGETS[kind] if batch_size == 32 else None
                    name = f"static batch {batch_size} w{w:g} d{d:g} {kind}"
                    results.append(emit(Result(f"{name}: speed-up/FLOPs speed-up", speedup / flops_speedup, target,
                                               detail=detail, digits=2)))
                    if results[-1].verdict == "FAIL":
                        results.append(explain(name, variants["full"], variants[kind], flops_speedup))
    return results


if __name__ == "__main__":
    from common import run_standalone

    run_standalone(__doc__, run)
