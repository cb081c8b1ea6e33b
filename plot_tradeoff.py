"""Collect the inference_results.json files of one task into a trade-off table (printed, tradeoff.csv)
and plot score against relative FLOPs (tradeoff.png), in the style of the paper's figures: one panel per set
of examples, so that every series on a panel is measured on the same ones (all of dev: the runs; and per
calibration folder, its reporting split and, apart and labelled in-sample, its calibration split)."""

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


# (relative FLOPs, score, note) of each point of a series
Series = list[tuple[float, float, str]]
STRATEGY_STYLE = {"gates": ("*", "tab:red"), "static": ("X", "k"), "cascade": ("P", "tab:green")}
DEPTH_MARKERS = {"1.0": "o", "0.75": "s", "0.5": "^"}


def load_calibrations(inference_dir: Path) -> dict[str, dict]:
    """{folder name: calibration_results.json with its Pareto front ("front": calibration_pareto.csv's rows)}
    of every `train_gate_new.py --calibrate` folder under `inference_dir`."""
    found = {}
    for path in sorted(inference_dir.glob("*/calibration_results.json")):
        with reading(path):
            results = json.loads(path.read_text(encoding="utf-8"))
        objectives = results.get("objectives") if isinstance(results, dict) else None
        if not isinstance(objectives, dict) or not all(
                isinstance(results.get(k), str) for k in ("reporting", "calibration_split")) or not all(
                isinstance(o.get(half), dict) and _is_number(o[half].get("score")) and
                _is_number(o[half].get("relative_flops")) for o in objectives.values()
                for half in ("calibration", "reporting")):
            raise CLIError(f"{path}: not a valid calibration_results.json (objectives with calibration and "
                           "reporting figures, the splits' names)")
        front = path.parent / "calibration_pareto.csv"
        try:
            with open(front, newline="", encoding="utf-8") as f:
                results["front"] = [{"relative_flops": float(r["relative_flops"]), "score": float(r["score"]),
                                     "strategy": r.get("strategy") or "gates"} for r in csv.DictReader(f)]
        except (FileNotFoundError, KeyError, TypeError, ValueError, UnicodeDecodeError) as err:
            raise CLIError(f"{front}: not a valid calibration_pareto.csv ({type(err).__name__}: {err})") from None
        found[path.parent.name] = results
    return found


def _statics_by_depth(figures: dict[str, dict], where: str) -> dict[str, Series]:
    """{series name: points} of static runs named static_w<W>_d<D> (their figures: score, relative_flops)."""
    series = {}
    for depth in DEPTH_MARKERS:
        points = sorted((f["relative_flops"], f["score"], "") for name, f in figures.items()
                        if name.endswith(f"_d{depth}"))
        if points:
            series[f"static subnets, depth {depth} ({where})"] = points
    return series


def _choices_by_strategy(results: dict, half: str, where: str) -> dict[str, Series]:
    """{series name: points} of the calibrated choices (one per objective) on `half` ("calibration" or
    "reporting"), one series per strategy that won somewhere."""
    series = {}
    for name, o in results["objectives"].items():
        strategy = o["setting"].get("strategy", "gates")
        figures = o[half]
        series.setdefault(f"calibrated: {strategy} ({where})", []).append(
            (figures["relative_flops"], figures["score"], name))
    return {k: sorted(v) for k, v in series.items()}


def panels(rows: list[dict], calibrations: dict[str, dict]) -> dict[str, dict[str, Series]]:
    """{panel title: {series name: points}}: every series of a panel is measured on the same examples. All of
    dev: the sweep's runs (static subnets by depth, gates, early exit, cascades). Per calibration: its
    reporting split (the static subnets and the calibrated choices, by strategy, there) and, apart, its
    calibration split (in-sample: the Pareto front of every candidate, the static subnets and the choices)."""
    batch = min(r["batch"] for r in rows)  # scores and FLOPs do not depend on the batch size
    rows = [r for r in rows if r["batch"] == batch]
    dev = _statics_by_depth({r["run"]: {"relative_flops": r["rel_flops"], "score": r["score"]} for r in rows
                             if r["mode"] == "static"}, "all of dev")
    for mode, name in (("w_dynamic", "width-dynamic (gates)"), ("wd_dynamic", "width+depth-dynamic (early exit)"),
                       ("cascade", "confidence cascade of static subnets")):
        points = sorted((r["rel_flops"], r["score"], r["run"].split("_t")[-1] if mode == "wd_dynamic" else "")
                        for r in rows if r["mode"] == mode)
        if points:
            dev[name] = points
    out = {"all of dev": dev}
    for folder, results in calibrations.items():
        reporting = results["reporting"].split(" (")[0]
        out[f"{folder}: {results['reporting']}"] = {
            **_statics_by_depth(results.get("static_reporting") or {}, reporting),
            **_choices_by_strategy(results, "reporting", reporting)}
        in_sample = "calibration split, in-sample"
        calibration = {f"Pareto front of every candidate ({in_sample})": [
            (p["relative_flops"], p["score"], p["strategy"]) for p in results["front"]]} if results["front"] else {}
        calibration |= _statics_by_depth(results.get("static_calibration") or {}, in_sample)
        out[f"{folder}: {results['calibration_split']}, in-sample"] = calibration | _choices_by_strategy(
            results, "calibration", in_sample)
    return {title: series for title, series in out.items() if series}


def _draw(ax, name: str, points: Series) -> None:
    x, y = [p[0] for p in points], [p[1] for p in points]
    if name.startswith("static subnets"):
        ax.plot(x, y, marker=DEPTH_MARKERS[name.split("depth ")[1].split(" ")[0]], ls="--", alpha=0.8, label=name)
    elif name.startswith("Pareto front"):
        ax.plot(x, y, ds="steps-post", lw=1.2, c="tab:gray", alpha=0.9, label=name)
    elif name.startswith("calibrated: "):
        marker, colour = STRATEGY_STYLE.get(name.split(": ")[1].split(" ")[0], ("o", "tab:blue"))
        ax.scatter(x, y, marker=marker, s=160, c=colour, edgecolors="w", zorder=6, label=name)
        for fx, fy, note in points:
            ax.annotate(note, (fx, fy), textcoords="offset points", xytext=(5, 4), fontsize=7, color=colour)
    elif name.startswith("width+depth"):
        ax.plot(x, y, marker="D", c="tab:purple", zorder=5, label=name)
        for i, (fx, fy, note) in enumerate(points):  # alternate below/above: neighbouring thresholds nearly coincide
            ax.annotate(f"t={note}", (fx, fy), textcoords="offset points", xytext=(4, -10 if i % 2 == 0 else 5),
                        fontsize=7, color="tab:purple")
    else:
        marker, colour = ("P", "tab:green") if "cascade" in name else ("*", "tab:red")
        ax.scatter(x, y, marker=marker, s=150, c=colour, zorder=5, label=name)


def plot(rows: list[dict], path: Path, calibrations: dict[str, dict] | None = None) -> None:
    """tradeoff.png: one panel per set of examples (`panels`), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = panels(rows, calibrations or {})
    fig, axes = plt.subplots(1, len(drawn), figsize=(6.4 * len(drawn), 4.8), squeeze=False)
    for ax, (title, series) in zip(axes[0], drawn.items(), strict=True):
        for name, points in series.items():
            _draw(ax, name, points)
        ax.set_xlabel("FLOPs relative to the full model")
        ax.set_ylabel(rows[0]["metric"])
        ax.set_title(f"{rows[0]['task']}: {title}", fontsize=9, wrap=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


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
    calibrations = load_calibrations(inference_dir)  # checked before anything is written
    output_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text(output_dir / "tradeoff.csv", buf.getvalue())
    plot(rows, output_dir / "tradeoff.png", calibrations)
    print(format_table(rows))
    print(f"\ntable: {output_dir / 'tradeoff.csv'}\nplot:  {output_dir / 'tradeoff.png'}")


if __name__ == "__main__":
    run_cli(main)
