"""Collect the inference_results.json files of one task into a trade-off table (printed, tradeoff.csv)
and plot score against relative FLOPs (tradeoff.png), in the style of the paper's figures."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from cli import ArgumentParser, CLIError, run_cli
from run_folder import check_writable
from transformers_ext.errors import reading
from transformers_ext.files import atomic_write, write_text
from utils_glue import DataError, primary_metric

COLUMNS = ["run", "batch", "score", "metric", "rel_flops", "flops_ref", "ms_per_example", "examples_per_s",
           "mean_layers"]


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _row(path: Path, report, metric: str | None = None) -> dict:
    """One table row from one report, whose shape is checked: a wrong one is one error line naming the file.
    `metric`: the score's results key (default: the report's GLUE task's metric)."""
    def bad(why: str) -> CLIError:
        return CLIError(f"{path}: not a valid inference_results.json ({why})")

    if not isinstance(report, dict):
        raise bad(f"a JSON {type(report).__name__}, not an object")
    if not isinstance(report.get("task"), str):
        raise bad("no task name")
    try:
        metric = metric or primary_metric(report["task"])
    except (DataError, KeyError) as err:
        raise bad(str(err).strip("'\"")) from None
    results = report.get("results")
    if not isinstance(results, dict):
        raise bad("no 'results' object")
    for key in (metric, "relative_flops", "flops", "mean_layers_executed"):
        if not _is_number(results.get(key)):
            raise bad(f"results.{key} is not a number")
    for key in ("latency_ms_per_example", "examples_per_second"):
        if results.get(key) is not None and not _is_number(results[key]):
            raise bad(f"results.{key} is not a number")
    batch = report.get("batch_size")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise bad("batch_size is not a positive integer")
    if not isinstance(report.get("mode"), str):
        raise bad("no mode")
    return {
        "run": path.parent.name.rsplit("_b", 1)[0], "batch": batch,
        "score": results[metric], "metric": metric, "rel_flops": results["relative_flops"],
        "flops_ref": results["flops"], "ms_per_example": results.get("latency_ms_per_example"),
        "examples_per_s": results.get("examples_per_second"),
        "mean_layers": results["mean_layers_executed"], "task": report["task"], "mode": report["mode"],
    }


def load_rows(inference_dir: Path, metric: str | None = None) -> list[dict]:
    rows = []
    for path in sorted(inference_dir.glob("*/inference_results.json")):
        with reading(path):
            report = json.loads(path.read_text(encoding="utf-8"))
        rows.append(_row(path, report, metric))
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


def load_pareto(inference_dir: Path) -> list[dict]:
    """The calibration Pareto front(s) (`train_gate_new.py --calibrate`'s */calibration_pareto.csv), merged:
    the points no other beats in both score and relative FLOPs (on the calibration split)."""
    from transformers_ext.calibration import pareto_front

    points = []
    for path in sorted(inference_dir.glob("*/calibration_pareto.csv")):
        try:
            with open(path, newline="", encoding="utf-8") as f:
                points += [{"relative_flops": float(r["relative_flops"]), "score": float(r["score"])}
                           for r in csv.DictReader(f)]
        except (KeyError, TypeError, ValueError, UnicodeDecodeError) as err:
            raise CLIError(f"{path}: not a valid calibration_pareto.csv ({type(err).__name__}: {err})") from None
    return pareto_front(points)


def plot(rows: list[dict], path: Path, pareto: list[dict] | None = None) -> None:
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
    if pareto:
        ax.plot([p["relative_flops"] for p in pareto], [p["score"] for p in pareto], ds="steps-post", lw=1.2,
                c="tab:gray", alpha=0.9, label="calibration Pareto front (calibration split)")
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
    cascades = [r for r in rows if r["mode"] == "cascade"]
    if cascades:
        ax.scatter([r["rel_flops"] for r in cascades], [r["score"] for r in cascades], marker="P", s=110,
                   c="tab:green", zorder=5, label="confidence cascade of static subnets")
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
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=130, format="png"))


def plot_series(series: list[dict], path: Path, title: str, ylabel: str,
                references: dict[str, float] | None = None) -> None:
    """Score against relative FLOPs of named series with error bars (reproduce.py's summaries over seeds), in
    the style of `plot`. Each series: {"label", "x", "y"} and optionally "xerr", "yerr" (lists like x and y),
    "marker", "ls" (a line style joins the points in FLOPs order; default none). `references`: labelled
    horizontal lines (e.g. the plain baselines' scores)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.0, 5.0))
    ax.set_prop_cycle(color=plt.cm.tab20.colors if len(series) > 10 else plt.cm.tab10.colors)
    for s in series:
        order = sorted(range(len(s["x"])), key=s["x"].__getitem__)
        in_order = {k: [s[k][i] for i in order] if s.get(k) else None for k in ("x", "y", "xerr", "yerr")}
        ax.errorbar(**in_order, marker=s.get("marker", "o"), ls=s.get("ls", "none"), ms=5, capsize=3, alpha=0.85,
                    label=s["label"])
    for label, y in (references or {}).items():
        ax.axhline(y, ls="--", lw=0.8, color="grey")
        ax.text(0.02, y, label, fontsize=7, va="bottom", transform=ax.get_yaxis_transform())
    ax.set_xlabel("FLOPs relative to the full model")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: many series, no point hidden
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=130, format="png"))
    plt.close(fig)


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--inference_dir", required=True, help="Folder of <run>_b<batch>/inference_results.json.")
    parser.add_argument("--output_dir", required=True, help="Where tradeoff.csv and tradeoff.png are written.")
    parser.add_argument("--metric", default=None,
                        help="The score: a key of the reports' results (default: the GLUE task's metric). Needed "
                             "for a task of your own files, whose name this script does not know: acc, or pearson "
                             "for regression (gate_inference.sh passes it).")
    args = parser.parse_args()
    inference_dir, output_dir = Path(args.inference_dir), Path(args.output_dir)
    if not inference_dir.is_dir():
        raise CLIError(f"--inference_dir {inference_dir} does not exist")
    check_writable(output_dir)  # before the work, not after it
    rows = sorted(load_rows(inference_dir, args.metric),
                  key=lambda r: (r["batch"], r["mode"] != "static", -r["rel_flops"]))
    output_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(output_dir / "tradeoff.csv", buf.getvalue())
    plot(rows, output_dir / "tradeoff.png", load_pareto(inference_dir))
    print(format_table(rows))
    print(f"\ntable: {output_dir / 'tradeoff.csv'}\nplot:  {output_dir / 'tradeoff.png'}")


if __name__ == "__main__":
    run_cli(main)
