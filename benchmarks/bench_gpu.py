"""GPU latency of the full model, every static subnet and the dynamic modes, timed with CUDA events, at
batch 1 and 32 in fp32, TF32, bf16 and fp16 autocast, against the FLOPs reduction (bench_dynamic.py's
comparison, on the GPU). On the embedded MiniLM (or --model_dir) with the RTE dev features padded to 128
tokens; dynamic modes use bench_dynamic's synthetic gates (common.make_gated: routing cost does not depend on
the gates being trained).

    .venv/bin/python benchmarks/bench_gpu.py [--quick] [--batches 1,32] [--precisions fp32,tf32,bf16,fp16]

One line per (precision, batch, setting): median ms per batch over the rounds, speed-up over the full model,
FLOPs reduction, and their ratio (1.0: the time falls as the FLOPs do). On a host without CUDA it exits with
one line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import DEPTHS, GATE_SETTING, SEQ_LEN, WIDTHS, Context, add_common_args, make_gated  # noqa: E402

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--batches", default="1,32", help="Batch sizes (comma list; default 1,32).")
    parser.add_argument("--precisions", default=",".join(PRECISIONS),
                        help="Any of fp32, tf32 (fp32 with TF32 matmuls), bf16, fp16 (autocast); default all.")
    parser.add_argument("--warmup", type=int, default=10, help="Untimed forwards before each setting (default 10).")
    args = parser.parse_args(argv)
    unknown = set(args.precisions.split(",")) - set(PRECISIONS)
    if unknown:
        parser.error(f"unknown precision(s) {sorted(unknown)}; choose from {', '.join(PRECISIONS)}")
    return args


def cuda_ms(forward, rounds: int, warmup: int) -> float:
    """Median milliseconds of `forward()` between CUDA events over `rounds` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        forward()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        forward()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def settings(model, gated, threshold: float, off_ramps: list[int]) -> dict[str, tuple]:
    """name -> (model, dynamic_forward keyword arguments)."""
    out = {"full": (model, dict(fixed_width=1.0))}
    for depth in DEPTHS:
        for width in (*WIDTHS, 1.0):
            if (width, depth) != (1.0, 1.0):
                out[f"static_w{width:g}_d{depth:g}"] = (model, dict(fixed_width=width, depth_mult=depth))
    out["w_dynamic"] = (gated, dict(class_to_width=GATE_SETTING))
    out["wd_dynamic_early_exit"] = (gated, dict(class_to_width=GATE_SETTING, early_exit=True,
                                                exit_threshold=threshold, off_ramps=off_ramps))
    out["d_dynamic_early_exit"] = (gated, dict(fixed_width=1.0, early_exit=True, exit_threshold=threshold,
                                               off_ramps=off_ramps))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("error: bench_gpu.py needs a CUDA device (torch.cuda.is_available() is False on this host)",
              file=sys.stderr)
        return 2
    from transformers_ext import dynamic_forward
    from transformers_ext.environment import autocast

    ctx = Context(args)
    gated, threshold, off_ramps = make_gated(ctx)  # calibrated on the CPU, then moved
    gated = gated.cuda()
    model = ctx.model().cuda()
    rounds = ctx.rounds(30, 10)
    print(f"bench_gpu: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, {Path(ctx.model_dir).name}, "
          f"seq {SEQ_LEN}, {rounds} rounds (median), CUDA events")
    dev = [t.cuda() for t in ctx.dev[:3]]
    for precision in args.precisions.split(","):
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            print(f"SKIP {precision}: not supported by this GPU")
            continue
        torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
        amp = precision if precision in ("bf16", "fp16") else "fp32"
        for batch in (int(b) for b in args.batches.split(",")):
            inputs = [t[:batch] for t in dev]
            full_ms = full_macs = None
            for name, (net, kwargs) in settings(model, gated, threshold, off_ramps).items():
                def forward(net=net, kwargs=kwargs, inputs=inputs, amp=amp):
                    with torch.no_grad(), autocast(amp, "cuda"):
                        return dynamic_forward(net, *inputs, **kwargs)

                ms = cuda_ms(forward, rounds, args.warmup)
                out = forward()
                macs = float((out.linear_macs + out.attention_macs).sum())
                if name == "full":
                    full_ms, full_macs = ms, macs
                speedup, flops_reduction = full_ms / ms, full_macs / macs
                print(f"{precision:>4} b{batch:<3} {name:<24} {ms:8.3f} ms  speed-up {speedup:5.2f}x  "
                      f"FLOPs reduction {flops_reduction:5.2f}x  ratio {speedup / flops_reduction:4.2f}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    return 0


if __name__ == "__main__":
    sys.exit(main())
