"""Collect the inference_results.json files of one task into a trade-off table (printed, tradeoff.csv)
and plot score against relative FLOPs (tradeoff.png), in the style of the paper's figures."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from transformers_ext.checkpoint_io import write_text
from transformers_ext.cli import ArgumentParser, CLIError, run_cli
from utils_glue import primary_metric

COLUMNS = ["run", "batch", "score", "metric", "rel_flops", "flops_ref", "ms_per_example", "examples_per_s",
           "mean_layers"]


def load_rows(inference_dir: Path) -> list[dict]:
    rows = []
    for path in sorted(inference_dir.glob("*/inference_results.json")):
        try:
            report = json.loads(path.read_text())
            results = report["results"]
            metric = primary_metric(report["task"])
            rows.append({
                "run": path.parent.name.rsplit("_b", 1)[0], "batch": report["batch_size"],
                "score": results[metric], "metric": metric, "rel_flops": results["relative_flops"],
                "flops_ref": results["flops"], "ms_per_example": results.get("latency_ms_per_example"),
                "examples_per_s": results.get("examples_per_second"),
                "mean_layers": results["mean_layers_executed"], "task": report["task"], "mode": report["mode"],
            })
        except (OSError, json.JSONDecodeError, KeyError) as err:
            raise CLIError(f"{path}: not a valid inference_results.json ({type(err).__name__}: {err})") from None
    if not rows:
        raise CLIError(f"no */inference_results.json under {inference_dir}")
    return rows


def format_table(rows: list[dict]) -> str:
    def cell(v):
        return f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))

    body = [[cell(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(COLUMNS)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(COLUMNS, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(v.ljust(w) for v, w in zip(b, widths, strict=True)) for b in body]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = min(r["batch"] for r in rows)  # scores and FLOPs do not depend on the batch size
    rows = [r for r in rows if r["batch"] == batch]
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    static = [r for r in rows if r["mode"] == "static"]
    for depth, marker in (("1.0", "o"), ("0.75", "s"), ("0.5", "^")):
        pts = sorted((r for r in static if r["run"].endswith(f"_d{depth}")), key=lambda r: r["rel_flops"])
        if pts:
            ax.plot([p["rel_flops"] for p in pts], [p["score"] for p in pts], marker=marker, ls="--", alpha=0.8,
                    label=f"static subnets, depth {depth}")
    wdyn = [r for r in rows if r["mode"] == "w_dynamic"]
    if wdyn:
        ax.scatter([r["rel_flops"] for r in wdyn], [r["score"] for r in wdyn], marker="*", s=180, c="tab:red",
                   zorder=5, label="width-dynamic (gates)")
    wd = sorted((r for r in rows if r["mode"] == "wd_dynamic"), key=lambda r: r["rel_flops"])
    if wd:
        ax.plot([r["rel_flops"] for r in wd], [r["score"] for r in wd], marker="D", c="tab:purple", zorder=5,
                label="width+depth-dynamic (early exit sweep)")
        for i, r in enumerate(wd):  # labels alternate below/above: neighbouring thresholds often nearly coincide
            ax.annotate(f"t={r['run'].split('_t')[-1]}", (r["rel_flops"], r["score"]), textcoords="offset points",
                        xytext=(4, -10 if i % 2 == 0 else 5), fontsize=7, color="tab:purple")
    full = [r for r in static if r["run"] == "static_w1.0_d1.0"]
    if full:
        ax.scatter([1.0], [full[0]["score"]], marker="o", s=220, facecolors="none", edgecolors="k", lw=1.5,
                   zorder=6, label="full model")
    ax.set_xlabel("FLOPs relative to the full model")
    ax.set_ylabel(f"dev {rows[0]['metric']}")
    ax.set_title(f"{rows[0]['task']}: accuracy vs. computation")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=130)
    tmp.replace(path)


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--inference_dir", required=True, help="Folder of <run>_b<batch>/inference_results.json.")
    parser.add_argument("--output_dir", required=True, help="Where tradeoff.csv and tradeoff.png are written.")
    args = parser.parse_args()
    inference_dir, output_dir = Path(args.inference_dir), Path(args.output_dir)
    if not inference_dir.is_dir():
        raise CLIError(f"--inference_dir {inference_dir} does not exist")
    rows = sorted(load_rows(inference_dir), key=lambda r: (r["batch"], r["mode"] != "static", -r["rel_flops"]))
    output_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(output_dir / "tradeoff.csv", buf.getvalue())
    plot(rows, output_dir / "tradeoff.png")
    print(format_table(rows))
    print(f"\ntable: {output_dir / 'tradeoff.csv'}\nplot:  {output_dir / 'tradeoff.png'}")


if __name__ == "__main__":
    run_cli(main)
