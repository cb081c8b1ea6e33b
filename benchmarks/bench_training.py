"""Section 4: training steps, timed as run_glue.py runs them (teacher forward without gradients, then for every
subnet `subnet_loss` + backward; the optimizer update is not part of it). A dynabertw step (teacher + 4 widths)
and a dynabert step (teacher + 3 depths x 4 widths) against the sum of the same parts, each timed on its own
from a clean state (gradients None). Target: step <= 1.1 x sum of parts. The peak RSS of one dynabert step at
batch 32 is measured in a fresh process (ru_maxrss) and reported.

Prefix sharing: one whole update (teacher, forwards, backwards, AdamW step) of `dynabert` and of
`final_finetuning` at batch 32, seq 128, with one forward per width for all depths (the default) against one
forward per subnet (--separate_subnet_passes), interleaved rounds; target shared >= 1.8x faster (the FLOPs
ratio is 2.17 for depths 1/0.75/0.5), with the time split into teacher / student forwards / backward /
optimizer.

Evaluation and gate inputs/targets: full-width forwards over RTE dev in length order against file order
(padding trimmed per batch either way); target >= 1.3x."""

from __future__ import annotations

import copy
import json
import resource
import subprocess
import sys
import time
from functools import partial

import torch
from common import (
    GATE_SETTING,
    SEQ_LEN,
    Context,
    Result,
    emit,
    header,
    interleaved,
    median,
    median_ratio,
    parse_args,
)
from torch.utils.data import TensorDataset

import run_glue
from transformers_ext.batching import length_sorted_batches, trim_padding
from utils_glue import epoch_batches

TARGET = 1.1
TIMING_BATCH = 8
RSS_BATCH = 32
GROUPED_TARGET = 1.3  # epoch-time speed-up of --group_by_length with --trim_padding on RTE
EPOCH_BATCH = 32
SAMPLE_EVERY = 8  # time every 8th batch of an epoch's order (both orders: the same number of batches)


def phase_setup(ctx: Context, phase: str):
    """(student in train mode, frozen teacher, run_glue args, subnets as (width, depth), descending)."""
    args = run_glue.parse_args(["--task_name", "RTE", "--training_phase", phase, "--model_dir", ctx.model_dir,
                                "--data_dir", ctx.args.data_dir, "--depth_mult_list", "0.5,0.75,1.0"])
    model = ctx.model("sdpa").train()
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    widths, depths = run_glue.phase_subnets(args)
    assert widths == sorted(GATE_SETTING, reverse=True)
    return model, teacher, args, [(w, d) for d in depths for w in widths]


def training_batch(ctx: Context, size: int) -> list[torch.Tensor]:
    return [t[:size] for t in ctx.features("train", max_examples=size)]


def teacher_forward(teacher, batch):
    with torch.no_grad():
        return teacher(*batch[:3])


def subnet_part(args, model, batch, teacher_out, width, depth) -> float:
    loss = run_glue.subnet_loss(args, model, batch, teacher_out, width, depth)
    run_glue.check_finite(loss, 0, f"w{width}_d{depth}")
    loss.backward()
    return loss.item()


def full_step(args, model, teacher, batch, subnets) -> None:
    """The body of run_glue.train's loop for one batch (no gradient accumulation, no autocast)."""
    teacher_out = teacher_forward(teacher, batch)
    for width, depth in subnets:
        subnet_part(args, model, batch, teacher_out, width, depth)


def time_phase(ctx: Context, phase: str, rounds: int) -> tuple[list[float], list[float], dict[str, float]]:
    model, teacher, args, subnets = phase_setup(ctx, phase)
    batch = training_batch(ctx, TIMING_BATCH)
    steps, sums, part_times = [], [], {}
    for r in range(rounds + 1):  # round 0: warm-up
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        full_step(args, model, teacher, batch, subnets)
        step = time.perf_counter() - start
        parts = {}
        start = time.perf_counter()
        teacher_out = teacher_forward(teacher, batch)
        parts["teacher"] = time.perf_counter() - start
        for width, depth in subnets:
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            subnet_part(args, model, batch, teacher_out, width, depth)
            parts[f"w{width:g}_d{depth:g}"] = time.perf_counter() - start
        if r:
            steps.append(step)
            sums.append(sum(parts.values()))
            for k, v in parts.items():
                part_times.setdefault(k, []).append(v)
    model.zero_grad(set_to_none=True)
    return steps, sums, {k: median(v) for k, v in part_times.items()}


def train_on(model, batches: list[list[torch.Tensor]]) -> None:
    for batch in batches:
        input_ids, attention_mask, token_type_ids, labels = trim_padding(batch)
        model(input_ids, attention_mask, token_type_ids, labels=labels).loss.backward()
        model.zero_grad(set_to_none=True)


def group_by_length_epoch(ctx: Context, rounds: int) -> Result:
    """Full-width forward + backward over RTE training batches of 32, padding trimmed per batch: the plain
    shuffle against --group_by_length's order of the same epoch, every SAMPLE_EVERY-th batch of each timed."""
    train = TensorDataset(*ctx.features("train"))
    orders = {"shuffled": list(epoch_batches(train, EPOCH_BATCH, ctx.args.seed, 0)),
              "grouped": list(epoch_batches(train, EPOCH_BATCH, ctx.args.seed, 0, lengths=train.tensors[1].sum(1)))}
    tokens = {name: sum(int(b[1].sum(1).max()) * len(b[3]) for b in batches) for name, batches in orders.items()}
    model = ctx.model("sdpa").train()
    times = interleaved({name: partial(train_on, model, batches[::SAMPLE_EVERY])
                         for name, batches in orders.items()}, rounds)
    detail = (f"padded tokens per epoch {tokens['shuffled']:,} -> {tokens['grouped']:,} "
              f"({tokens['shuffled'] / tokens['grouped']:.2f}x); {len(orders['grouped'][::SAMPLE_EVERY])} of "
              f"{len(orders['grouped'])} batches timed, {rounds} rounds")
    return emit(Result(f"--group_by_length epoch speed-up (RTE, batch {EPOCH_BATCH}, trimmed)",
                       median_ratio(times["shuffled"], times["grouped"]), GROUPED_TARGET, detail=detail))


SORTED_EVAL_TARGET = 1.3  # evaluation / gate-input passes in length order over file order, RTE dev


def forward_on(model, batches: list[list[torch.Tensor]]) -> None:
    with torch.no_grad():
        for batch in batches:
            model(*batch[:3])


def length_sorted_evaluation(ctx: Context, rounds: int) -> Result:
    """Full-width forwards over RTE dev in batches of 32, padding trimmed per batch either way: file order (as
    evaluation ran before) against length_sorted_batches (evaluation, gate inputs and targets now)."""
    dev = TensorDataset(*ctx.features("dev"))
    orders = {"file": [trim_padding(b) for b in epoch_batches(dev, EPOCH_BATCH, 0, 0, shuffle=False)],
              "sorted": [b for _, b in length_sorted_batches(dev, EPOCH_BATCH)]}
    tokens = {name: sum(b[1].numel() for b in batches) for name, batches in orders.items()}
    model = ctx.model("sdpa").eval()
    times = interleaved({name: partial(forward_on, model, batches) for name, batches in orders.items()}, rounds)
    detail = (f"padded tokens {tokens['file']:,} -> {tokens['sorted']:,} ({tokens['file'] / tokens['sorted']:.2f}x); "
              f"{len(dev)} examples, {rounds} rounds; file {median(times['file']):.2f} s, "
              f"sorted {median(times['sorted']):.2f} s")
    return emit(Result(f"evaluation in length order, speed-up over file order (RTE dev, batch {EPOCH_BATCH})",
                       median_ratio(times["file"], times["sorted"]), SORTED_EVAL_TARGET, detail=detail))


SHARED_TARGET = 1.8
SHARED_BATCH = 32


def update_parts(args, model, teacher, optimizer, batch, widths, depths, shared: bool) -> dict[str, float]:
    """One optimizer update as run_glue.py makes it, timed by part (seconds)."""
    parts = dict.fromkeys(("teacher", "forward", "backward", "optimizer"), 0.0)
    start = time.perf_counter()
    teacher_out = teacher_forward(teacher, batch) if teacher is not None else None
    parts["teacher"] = time.perf_counter() - start
    if shared:
        losses = [lambda w=w: run_glue.prefix_shared_loss(args, model, batch, teacher_out, w, depths) for w in widths]
    else:
        losses = [lambda w=w, d=d: run_glue.subnet_loss(args, model, batch, teacher_out, w, d)
                  for d in depths for w in widths]
    for loss_fn in losses:
        start = time.perf_counter()
        loss = loss_fn()
        parts["forward"] += time.perf_counter() - start
        start = time.perf_counter()
        loss.backward()
        parts["backward"] += time.perf_counter() - start
    start = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    model.zero_grad(set_to_none=True)
    parts["optimizer"] = time.perf_counter() - start
    return parts


def prefix_sharing(ctx: Context, phase: str, rounds: int) -> list[Result]:
    model, teacher, args, _ = phase_setup(ctx, phase)
    if run_glue.PHASES[phase].teacher == "never":
        teacher = None
    widths, depths = run_glue.phase_subnets(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-12)  # the weights barely move between rounds
    batch = training_batch(ctx, SHARED_BATCH)
    parts: dict[str, list[dict[str, float]]] = {"shared": [], "separate": []}
    for r in range(rounds + 1):  # round 0: warm-up; the order alternates each round
        for name in (("shared", "separate") if r % 2 else ("separate", "shared")):
            timing = update_parts(args, model, teacher, optimizer, batch, widths, depths, name == "shared")
            if r:
                parts[name].append(timing)
    totals = {k: [sum(p.values()) for p in v] for k, v in parts.items()}
    split = "; ".join(f"{k}: " + ", ".join(f"{part} {1e3 * median([p[part] for p in v]):.0f}" for part in v[0])
                      + " ms" for k, v in parts.items())
    detail = (f"update {1e3 * median(totals['separate']):.0f} -> {1e3 * median(totals['shared']):.0f} ms, "
              f"{len(depths)} depths x {len(widths)} widths, {rounds} rounds; {split}")
    return [emit(Result(f"training {phase} update, prefix-shared speed-up over separate passes (batch "
                        f"{SHARED_BATCH}, seq {SEQ_LEN})", median_ratio(totals["separate"], totals["shared"]),
                        SHARED_TARGET, detail=detail, digits=2))]


def rss_child(ctx: Context) -> None:
    """Run in a fresh process: one dynabert step at batch RSS_BATCH; print RSS figures as JSON."""
    def max_rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux

    model, teacher, args, subnets = phase_setup(ctx, "dynabert")
    batch = training_batch(ctx, RSS_BATCH)
    before = max_rss_mb()
    start = time.perf_counter()
    full_step(args, model, teacher, batch, subnets)
    seconds = time.perf_counter() - start
    print(json.dumps({"before_mb": before, "peak_mb": max_rss_mb(), "seconds": seconds}))


def run(ctx: Context) -> list[Result]:
    header(f"4. training steps (sdpa, train mode, batch {TIMING_BATCH} for timing)", ctx)
    results = []
    for phase, rounds in (("dynabertw", ctx.rounds(5, 3)), ("dynabert", ctx.rounds(3, 2))):
        steps, sums, parts = time_phase(ctx, phase, rounds)
        ratio = median([s / p for s, p in zip(steps, sums, strict=True)])
        retried = False
        if ratio > TARGET and not ctx.args.no_retry:
            more_steps, more_sums, _ = time_phase(ctx, phase, rounds)
            steps, sums, retried = steps + more_steps, sums + more_sums, True
            ratio = median([s / p for s, p in zip(steps, sums, strict=True)])
        biggest = ", ".join(f"{k} {1e3 * v:.0f}" for k, v in list(parts.items())[:3])
        detail = (f"step {1e3 * median(steps):.0f} ms, parts {1e3 * median(sums):.0f} ms ({len(parts) - 1} subnets;"
                  f" {biggest} ms, ...), {len(steps)} rounds{', re-measured' if retried else ''}")
        results.append(emit(Result(f"training {phase} step / sum of parts (batch {TIMING_BATCH})", ratio, TARGET,
                                   higher_is_better=False, detail=detail)))
    results.append(group_by_length_epoch(ctx, ctx.rounds(3, 1)))
    results.append(length_sorted_evaluation(ctx, ctx.rounds(3, 2)))
    for phase in ("dynabert", "final_finetuning"):
        results += prefix_sharing(ctx, phase, ctx.rounds(3, 2))
    cmd = [sys.executable, __file__, "--rss_child", "--threads", str(ctx.args.threads), "--data_dir",
           ctx.args.data_dir, "--seed", str(ctx.args.seed)] + (["--model_dir", ctx.args.model_dir]
                                                              if ctx.args.model_dir else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    try:
        rss = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        print(proc.stdout + proc.stderr, file=sys.stderr)
        raise RuntimeError("the peak-RSS child process failed") from None
    grew = rss["peak_mb"] - rss["before_mb"]
    detail = (f"high-water mark {rss['before_mb']:.0f} MiB before the step (Python, torch, student, teacher), "
              f"+{grew:.0f} MiB during it; step {rss['seconds']:.1f} s, fresh process")
    results.append(emit(Result(f"training dynabert step peak RSS (batch {RSS_BATCH})", rss["peak_mb"], unit=" MiB",
                               detail=detail, digits=0)))
    return results


if __name__ == "__main__":
    if "--rss_child" in sys.argv:
        sys.argv.remove("--rss_child")
        rss_child(Context(parse_args(__doc__)))
    else:
        from common import run_standalone

        run_standalone(__doc__, run)
