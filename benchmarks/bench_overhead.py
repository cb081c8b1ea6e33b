"""Section 1: overhead of our model at width 1.0 / depth 1.0 against transformers.BertForSequenceClassification
with the same weights, batch 1 and 32, eager and sdpa attention (target: latency ratio <= 1.05)."""

from __future__ import annotations

import torch
from common import Context, Result, emit, header, measure_with_retry, median, median_ratio, run_standalone

TARGET = 1.05


def run(ctx: Context) -> list[Result]:
    header("1. overhead vs transformers.BertForSequenceClassification", ctx)
    results = []
    for attn in ("eager", "sdpa"):
        ours = ctx.model(attn)
        hf = ctx.hf_twin(ours)
        for batch_size in (1, 32):
            input_ids, attention_mask, token_type_ids = ctx.batch(batch_size)
            with torch.no_grad():
                a = ours(input_ids, attention_mask, token_type_ids).logits
                b = hf(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits
            max_diff = (a - b).abs().max().item()

            def run_ours(ours=ours, x=(input_ids, attention_mask, token_type_ids)):
                with torch.no_grad():
                    ours(*x)

            def run_hf(hf=hf, x=(input_ids, attention_mask, token_type_ids)):
                with torch.no_grad():
                    hf(input_ids=x[0], attention_mask=x[1], token_type_ids=x[2])

            rounds = ctx.rounds(40, 20) if batch_size == 1 else ctx.rounds(7, 4)
            times, retried = measure_with_retry(
                ctx, {"ours": run_ours, "hf": run_hf}, rounds,
                lambda t: median_ratio(t["ours"], t["hf"]) <= TARGET, warmup=3 if batch_size == 1 else 1)
            ratio = median_ratio(times["ours"], times["hf"])
            detail = (f"ours {1e3 * median(times['ours']):.1f} ms, HF {1e3 * median(times['hf']):.1f} ms, "
                      f"{len(times['ours'])} rounds{', re-measured' if retried else ''}, max |logit diff| "
                      f"{max_diff:.1e}")
            results.append(emit(Result(f"overhead {attn} batch {batch_size} latency ratio ours/HF", ratio, TARGET,
                                       higher_is_better=False, detail=detail)))
    return results


if __name__ == "__main__":
    run_standalone(__doc__, run)
