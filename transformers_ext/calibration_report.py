"""What a calibration writes and prints (`train_gate_new.py --calibrate`): the chosen setting as a
best_tradeoff_inference_config.json-style entry with a record of what it was chosen for and on, the Pareto
front as CSV, one inference report's summary, and the results table."""

from __future__ import annotations

import contextlib
import csv
import io
import json
from collections.abc import Callable
from pathlib import Path

from .errors import InputError, reading
from .files import write_json, write_text

__all__ = ["CALIBRATION_KEY", "PARETO_COLUMNS", "choice_record", "config_entry", "format_results", "logged",
           "objective_results", "report_summary", "search_record", "write_config", "write_pareto"]

CALIBRATION_KEY = "calibration"  # top-level key of the written config files: task -> what the choice was made on
PARETO_COLUMNS = ["relative_flops", "score", "metric", "mode", "width_mult_list", "exit_threshold", "flops",
                  "relative_linear_flops", "mean_layers_executed", "strategy", "name"]


def config_entry(chosen: dict) -> dict:
    """The task's entry of a best_tradeoff_inference_config.json-style file: what --config applies (another
    strategy's candidate carries its own: `calibration_candidates.candidate_entry`)."""
    if "entry" in chosen:
        return dict(chosen["entry"])
    entry = {"width_mult_list": chosen["width_mult_list"], "mode": chosen["mode"]}
    if chosen["early_exit"]:
        entry["exit_threshold"] = chosen["exit_threshold"]
    return entry


def choice_record(objective, chosen: dict, metric: str, reference: float, examples: int, split: str,
                  off_ramps: list[int]) -> dict:
    """What the choice was made for and on, kept beside the entry (under the top-level key "calibration")."""
    return {objective.kind: objective.value, "metric": metric, "score": chosen["score"],
            "relative_flops": chosen["relative_flops"], "flops": chosen["flops"], "full_model_score": reference,
            "examples": examples, "split": split, "off_ramps": off_ramps}


def objective_results(objective, chosen: dict, config_path: Path, reporting: dict, all_dev: dict | None,
                      statics: dict[str, dict]) -> dict:
    """One objective's entry of calibration_results.json: the setting chosen, its figures on the calibration
    split, its reports (`report_summary`) and the best static subnet at or above its reporting FLOPs."""
    above = [(name, s) for name, s in statics.items() if s["relative_flops"] >= reporting["relative_flops"] - 1e-9]
    best_static = max(above, key=lambda item: item[1]["score"], default=None)
    return {
        "objective": {objective.kind: objective.value}, "config": str(config_path),
        "setting": {"strategy": chosen["strategy"], **({"name": chosen["name"]} if "name" in chosen else {}),
                    **config_entry(chosen), **{k: chosen[k] for k in ("early_exit", "exit_threshold")}},
        "feasible_on_calibration": chosen["feasible"],
        "calibration": {k: chosen[k] for k in ("score", "relative_flops", "relative_linear_flops", "flops",
                                               "mean_layers_executed")},
        "reporting": reporting, "all_dev": all_dev,
        "best_static_at_or_above_reporting_flops": None if best_static is None else
        {"run": best_static[0], **best_static[1]},
    }


def search_record(search: dict) -> dict:
    """The figures of a `Calibrator.search` that calibration_results.json keeps, under its names."""
    names = {"search": "search", "maps_in_grid": "maps_in_grid", "maps_evaluated": "maps_evaluated",
             "candidates_evaluated": "candidates_evaluated", "seconds": "search_seconds",
             "forward_seconds": "forward_seconds", "examples_forwarded": "examples_forwarded",
             "other_candidates": "other_candidates"}
    return {name: search[key] for key, name in names.items()}


def write_config(path: Path, task: str, entry: dict, record: dict, merge: bool = False) -> None:
    """{task: entry, "calibration": {task: record}}; with `merge`, into the file's other tasks' entries."""
    entries = {}
    if merge and path.is_file():
        with reading(path):
            text = path.read_text(encoding="utf-8")
        try:  # the reference's file has a trailing comma; tolerate it
            entries = json.loads(text.replace(",\n}", "\n}").replace(",}", "}"))
        except json.JSONDecodeError as err:
            raise InputError(f"--calibration_config {path}: cannot read JSON ({err})") from None
        if not isinstance(entries, dict):
            raise InputError(f"--calibration_config {path}: not a JSON object")
    entries[task] = entry
    records = entries.get(CALIBRATION_KEY)
    entries[CALIBRATION_KEY] = {**(records if isinstance(records, dict) else {}), task: record}
    write_json(path, entries)


def write_pareto(path: Path, front: list[dict], metric: str) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=PARETO_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for point in front:
        writer.writerow({**point, "metric": metric,
                         "width_mult_list": ",".join(f"{w:g}" for w in point["width_mult_list"]),
                         "exit_threshold": "" if point["exit_threshold"] is None else repr(point["exit_threshold"])})
    write_text(path, buf.getvalue())


def logged(run: Callable[[], dict], out_dir: Path, metric: str, label: str) -> dict:
    """The summary (`report_summary`) of `run()`, an inference that prints and writes its report; the printout
    goes to out_dir/inference.log."""
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        result = run()
    write_text(out_dir / "inference.log", log.getvalue())
    return report_summary(result, metric, out_dir, label)


def report_summary(report: dict, metric: str, folder: Path, label: str) -> dict:
    """The figures of one inference report (train_gate.py's inference_results.json in `folder`) a calibration
    keeps, with what it was run on (`label`)."""
    r = report["results"]
    return {"data": label, "metric": metric, "score": r[metric], "relative_flops": r["relative_flops"],
            "flops": r["flops"], "mean_layers_executed": r["mean_layers_executed"],
            "latency_ms_per_example": r.get("latency_ms_per_example"), "num_examples": report["num_examples"],
            "inference_results": str(folder / "inference_results.json")}


def format_results(results: dict) -> str:
    """The printed summary of calibration_results.json: the search, then one row per objective."""
    def f(v, digits=4):
        return "-" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))

    lines = [f"***** Calibration: {results['task']} ({results['metric']}) *****",
             f" calibration: {results['calibration_split']}; full model {f(results['full_model_calibration_score'])}",
             f" reporting: {results['reporting']}",
             f" search: {results['search']}, {results['maps_evaluated']} of {results['maps_in_grid']} maps evaluated "
             f"(grid {','.join(f'{w:g}' for w in results['grid'])}), {results['candidates_evaluated']} (map, "
             f"threshold) candidates, {results['search_seconds']:.1f} s; {results['examples_forwarded']} of "
             f"{results['maps_evaluated'] * results['calibration_examples']} example forwards run (the rest reused)",
             f" other strategies: {others}" if (others := ", ".join(
                 f"{n} {s} candidates" for s, n in results.get("other_candidates", {}).items())) else
             " other strategies: none",
             "objective | setting | threshold | cal score | cal FLOPs | rep score | rep FLOPs | rep ms/ex | "
             "best static >= rep FLOPs (rep) | all-dev score | all-dev FLOPs"]
    for name, o in results["objectives"].items():
        s, c, r, a, b = o["setting"], o["calibration"], o["reporting"], o["all_dev"], \
            o["best_static_at_or_above_reporting_flops"]
        static = "-" if b is None else f"{b['run']} {b['score']:.4f} @ {b['relative_flops']:.3f}"
        lines.append(" | ".join([
            name, s.get("name") or ",".join(f"{w:g}" for w in s["width_mult_list"]),
            f(s.get("exit_threshold")) if s["mode"] == "wd_dynamic" else "no exit",
            f(c["score"]), f(c["relative_flops"], 3), f(r["score"]), f(r["relative_flops"], 3),
            f(r["latency_ms_per_example"], 2), static, f(a and a["score"]), f(a and a["relative_flops"], 3)]))
    return "\n".join(lines)
