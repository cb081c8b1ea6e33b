"""Section 5: FLOPs accounting. The analytic executed-path count (transformers_ext.flops / DynamicOutput
MACs: linear layers + attention products, 2 FLOPs per MAC) against torch.utils.flop_counter.FlopCounterMode on
the eager model, for the full model, every static subnet (sliced and exported) and the dynamic modes on RTE
dev. Target: relative difference <= 1% for every run."""

from __future__ import annotations

import torch
from common import DEPTHS, GATE_SETTING, SEQ_LEN, WIDTHS, Context, Result, emit, header, make_gated
from torch.utils.flop_counter import FlopCounterMode

from transformers_ext import dynamic_forward, export_subnet, layers_kept, subnet_macs

TARGET = 1.0  # percent


def counted(fn) -> tuple[int, object]:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        out = fn()
    return counter.get_total_flops(), out


def rel_diff_percent(analytic: float, measured: float) -> float:
    return 100 * abs(analytic - measured) / measured


def run(ctx: Context) -> list[Result]:
    header("5. FLOPs accounting vs FlopCounterMode (eager attention)", ctx)
    results = []
    model = ctx.model("eager")
    x = ctx.batch(4)
    diffs = {"sliced": [], "exported": []}
    for w, d in [(1.0, 1.0)] + [(w, d) for w in WIDTHS for d in DEPTHS]:
        analytic = 2 * len(x[0]) * subnet_macs(model.config, w, d, SEQ_LEN)["total"]
        subnet = model.subnet(w, d)
        diffs["sliced"].append((rel_diff_percent(analytic, counted(lambda s=subnet: model(*x, subnet=s))[0]), w, d))
        small = export_subnet(model, w, d).eval()
        small.config._attn_implementation = "eager"
        diffs["exported"].append((rel_diff_percent(analytic, counted(lambda small=small: small(*x))[0]), w, d))
    for kind, values in diffs.items():
        worst, w, d = max(values)
        results.append(emit(Result(f"flops static {kind}: max relative difference", worst, TARGET,
                                   higher_is_better=False, unit="%", digits=4,
                                   detail=f"{len(values)} subnets incl. the full model, batch {len(x[0])}; worst "
                                          f"w{w:g} d{d:g}")))

    gated, threshold, off_ramps = make_gated(ctx, "eager")
    x = ctx.batch(32)
    runs = {
        "w_dynamic": dict(class_to_width=GATE_SETTING),
        "wd_dynamic+early_exit": dict(class_to_width=GATE_SETTING, early_exit=True, exit_threshold=threshold,
                                      off_ramps=off_ramps),
        "static via dynamic_forward (w0.5 d0.75)": dict(fixed_width=0.5, depth_mult=0.75),
        "d_dynamic (w0.75 + early exit)": dict(fixed_width=0.75, early_exit=True, exit_threshold=threshold,
                                              off_ramps=off_ramps),
    }
    for name, kwargs in runs.items():
        flops, out = counted(lambda kwargs=kwargs: dynamic_forward(gated, *x, **kwargs))
        analytic = 2 * int((out.linear_macs + out.attention_macs).sum())
        exits = (out.exit_layer < layers_kept(gated.config, kwargs.get("depth_mult", 1.0))).sum().item()
        widths = sorted(set(out.heads.flatten().tolist()) - {0})
        results.append(emit(Result(f"flops {name}: relative difference", rel_diff_percent(analytic, flops), TARGET,
                                   higher_is_better=False, unit="%", digits=4,
                                   detail=f"batch {len(x[0])}, {analytic / 1e9:.2f} vs {flops / 1e9:.2f} GFLOPs, "
                                          f"head counts run {widths}, {exits} early exits")))
    return results


if __name__ == "__main__":
    from common import run_standalone

    run_standalone(__doc__, run)
