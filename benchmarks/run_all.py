"""Run every benchmark section in one process and print the PASS/FAIL lines (exit code 1 if a target is
missed): 1 overhead vs transformers BERT, 2 static subnets, 3 dynamic inference, 4 training steps, 5 FLOPs
accounting, 6 calibration. `--quick` halves the repeats; `--sections 1,3` runs a subset."""

from __future__ import annotations

import argparse
import sys
import time

import bench_calibration
import bench_dynamic
import bench_flops
import bench_overhead
import bench_static
import bench_training
from common import Context, add_common_args, cpu_info

SECTIONS = {"1": bench_overhead, "2": bench_static, "3": bench_dynamic, "4": bench_training, "5": bench_flops,
            "6": bench_calibration}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_common_args(parser)
    parser.add_argument("--sections", default=",".join(SECTIONS), help="Comma list of sections (default all).")
    args = parser.parse_args()
    ctx = Context(args)
    print(f"FlexBERT benchmarks on {cpu_info()}; model {ctx.model_dir}", flush=True)
    start = time.perf_counter()
    results = []
    for key in args.sections.split(","):
        section_start = time.perf_counter()
        results += SECTIONS[key.strip()].run(ctx)
        print(f"   (section {key}: {time.perf_counter() - section_start:.0f} s)", flush=True)
    print("\n== summary: targets ==")
    for r in results:
        if r.verdict != "INFO":
            print(r.line())
    passed = sum(r.verdict == "PASS" for r in results)
    failed = sum(r.verdict == "FAIL" for r in results)
    print(f"\n{passed} PASS, {failed} FAIL, {sum(r.verdict == 'INFO' for r in results)} reported; "
          f"{time.perf_counter() - start:.0f} s in all", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
