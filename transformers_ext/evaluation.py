"""The one evaluation path of routed inference (SPEC §6): a `RoutingSetting` run over a task's splits, batch by
batch, into an `Evaluation` (each split's logits; for the reported splits the metrics, the FLOPs of the path
each example took, width/exit histograms and latency), summarised by `routed_report`.

`evaluate_routed` runs one setting through `dynamic_forward` (a cascade's through `cascade.cascade_forward`:
its FLOPs are every stage an example ran, its report adds the histogram of the stage that answered). Settings
that share work run together, each evaluation equal to its own `evaluate_routed` except the latency:
`evaluate_static_depths` (the static subnets of one width at several depths from one encoder pass per batch:
depth subnets are prefixes of each other) and `evaluate_exit_rules` (gated settings of one width map under
several exit rules, the layers before the first off-ramp run once). `evaluate_subnets` scores every static
(depth, width) subnet during training through the same loop. Inference batches are in file order, padded to
the maximum sequence length (the FLOPs unit), as the reference; training-time evaluation, which reports no
FLOPs, sorts them by length and trims their padding (`EvaluationOptions.sort_by_length`). No command-line
objects: the scripts build the setting and options.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .batching import file_order_batches, in_dataset_order, length_sorted_batches
from .cascade import cascade_forward
from .distributed import map_shared_objects
from .environment import autocast, tf32_enabled
from .flops import flops_summary, path_macs
from .inference import RoutedOutput, StaticRouter, dynamic_forward, shared_prefix_forwards, static_output
from .modeling_flexbert import heads_kept
from .progress import progress_bar
from .routing import RoutingSetting

# (split, index of the batch's first example, logits, labels, routed output) -> JSON-able rows per example
ExampleRecords = Callable[[str, int, torch.Tensor, torch.Tensor, RoutedOutput], list[dict]]


@dataclass(frozen=True)
class Timing:
    """How latency is taken: `record` (the report gets latency keys), with CUDA events (`cuda_events`) or
    wall-clock, the first `warmup` batches excluded."""

    record: bool = False
    cuda_events: bool = False
    warmup: int = 1

    @classmethod
    def on(cls, device: torch.device, gpu_time: bool, cpu_time: bool, warmup: int | None) -> Timing:
        """CUDA events for GPU time on a GPU, else wall-clock; a GPU needs several batches to reach its steady
        clock and caches (default warm-up 10 batches), a CPU one."""
        return cls(gpu_time or cpu_time, gpu_time and device.type == "cuda",
                   warmup if warmup is not None else 10 if device.type == "cuda" else 1)


class Stopwatch:
    """Latency of a forward: CUDA events with `cuda_events` on a GPU, else wall-clock (synchronised on a GPU).
    `start()`, then `mark()` at points of interest; `seconds(mark)` is the time from start to the mark."""

    def __init__(self, device: torch.device, cuda_events: bool):
        self.device, self.cuda_events = device, cuda_events

    def start(self) -> None:
        if self.cuda_events:
            self.begin = torch.cuda.Event(enable_timing=True)
            self.begin.record()
        elif self.device.type == "cuda":
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def mark(self):
        if self.cuda_events:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - self.t0

    def seconds(self, mark) -> float:
        if self.cuda_events:
            torch.cuda.synchronize()
            return self.begin.elapsed_time(mark) / 1000
        return mark


@dataclass(frozen=True)
class EvaluationOptions:
    """How settings are evaluated: the batch size, autocast `precision`, `timing`, the splits `scored` (metrics
    and loss) and `reported` (paths, FLOPs, latency), the task's `compute_metrics(logits, labels)` and the
    per-example `example_records` (each optional), and the progress bar's `desc`. Under torchrun (`world` > 1)
    the process of `rank` runs every `world`-th batch and all processes gather every batch's results, so each
    holds the evaluation one process makes (bit for bit, but the latency: each batch timed where it ran).

    `sort_by_length`: batches longest first with their padding trimmed (results put back in dataset order;
    each example's logits do not depend on its batch) and a scored split's loss the size-weighted mean of its
    batches' losses, as training-time evaluation has always computed it; FLOPs and example indices assume
    file order, so such options report no split and record no examples."""

    batch_size: int
    precision: str = "fp32"
    timing: Timing = Timing()
    scored: Sequence[str] = ()
    reported: Sequence[str] = ()
    compute_metrics: Callable[[np.ndarray, np.ndarray], dict] | None = None
    example_records: ExampleRecords | None = None
    desc: str = ""
    rank: int = 0
    world: int = 1
    sort_by_length: bool = False

    def __post_init__(self):
        if self.sort_by_length and (self.reported or self.example_records is not None):
            raise ValueError("length-sorted batches report no FLOPs and record no examples (file order does)")


@dataclass(frozen=True)
class BatchResult:
    """What an evaluation keeps of one routed batch, on the host (so that torchrun's processes can exchange
    it): the examples' dataset positions, logits and labels, the batch's summed loss (length-sorted scored
    splits), the per-example records, and for a reported split the path, MACs and time."""

    indices: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    loss_sum: float
    records: list[dict] | None
    reported: bool
    linear_macs: float = 0.0
    attention_macs: float = 0.0
    heads: torch.Tensor | None = None
    exits: torch.Tensor | None = None
    stages: torch.Tensor | None = None
    elapsed: float = 0.0


class Evaluation:
    """One setting's results gathered batch by batch (`add`), split by split (`end_split`). Every split keeps
    its logits (`logits[split]`); the scored splits (dev; MNLI's dev_mm adds `acc_mm`) their metrics and loss;
    the reported ones the FLOPs, paths and latency that `results` summarises."""

    def __init__(self, model, setting: RoutingSetting, options: EvaluationOptions):
        self.model, self.setting, self.options = model, setting, options
        self.timing, self.reported = options.timing, set(options.reported)
        self.example_records = options.example_records
        self.scores, self.logits, self.records = {}, {}, {}
        self.heads, self.exits, self.stages = [], [], []
        self.macs_sum = {"linear": 0.0, "attention": 0.0, "total": 0.0}
        self.batch_times, self.n_examples_timed, self.n_total = [], 0, 0

    def begin_split(self, split: str) -> None:
        self.split, self.split_logits, self.split_labels, self.split_indices = split, [], [], []
        self.split_loss_sum = 0.0  # sort_by_length: the batches' losses times their sizes

    def batch_result(self, indices: torch.Tensor, labels: torch.Tensor, out: RoutedOutput, elapsed: float
                     ) -> BatchResult:
        """What `add` takes of one batch (examples `indices`) of the current split, computed by the process
        that ran the batch."""
        logits, labels = out.logits.float().cpu(), labels.cpu()
        loss_sum = (self.model.compute_loss(out.logits.float(), labels.to(out.logits.device)).item() * len(labels)
                    if self.options.sort_by_length and self.split in self.options.scored else 0.0)
        records = None if self.example_records is None else self.example_records(
            self.split, int(indices[0]), logits, labels, out)
        if self.split not in self.reported:
            return BatchResult(indices, logits, labels, loss_sum, records, reported=False)
        return BatchResult(indices, logits, labels, loss_sum, records, True, float(out.linear_macs.sum()),
                           float(out.attention_macs.sum()), out.heads.cpu(), out.exit_layer.cpu(),
                           out.stage.cpu() if setting_is_cascade(self.setting) else None, elapsed)

    def add(self, b: int, num_batches: int, result: BatchResult) -> None:
        self.split_logits.append(result.logits)
        self.split_labels.append(result.labels)
        self.split_indices.append(result.indices)
        self.split_loss_sum += result.loss_sum
        if result.records is not None:
            self.records.setdefault(self.split, []).extend(result.records)
        if not result.reported:
            return
        if b >= self.timing.warmup or num_batches <= self.timing.warmup:
            self.batch_times.append(result.elapsed)
            self.n_examples_timed += len(result.labels)
        self.macs_sum["linear"] += result.linear_macs
        self.macs_sum["attention"] += result.attention_macs
        self.macs_sum["total"] = self.macs_sum["linear"] + self.macs_sum["attention"]
        self.heads.append(result.heads)
        self.exits.append(result.exits)
        if result.stages is not None:
            self.stages.append(result.stages)
        self.n_total += len(result.labels)

    def end_split(self) -> None:
        """The split's logits; a scored split's metrics (the first scored split's, then `acc_mm`) and loss."""
        logits, labels = (in_dataset_order(chunks, self.split_indices) for chunks in (self.split_logits,
                                                                                       self.split_labels))
        self.logits[self.split] = logits
        if self.split not in self.options.scored:
            return
        metrics = self.options.compute_metrics(logits.numpy(), labels.numpy())
        if self.options.sort_by_length:
            loss = self.split_loss_sum / len(labels)
        else:
            loss = self.model.compute_loss(logits, labels).item()
        if not self.scores:
            self.scores.update(metrics)
            self.scores["eval_loss"] = loss
        else:
            self.scores["acc_mm"] = metrics["acc"]

    def results(self, max_seq_length: int) -> dict:
        """The scores, then the FLOPs of the paths taken relative to the full model's, the mean layers run, the
        exit and per-layer width histograms, and (when timed) the latency."""
        config, setting, results = self.model.config, self.setting, dict(self.scores)
        full = path_macs(config, max_seq_length, [config.num_attention_heads] * config.num_hidden_layers)
        results.update(flops_summary({k: v / self.n_total for k, v in self.macs_sum.items()}, full))
        heads, exits = torch.cat(self.heads), torch.cat(self.exits)
        results["mean_layers_executed"] = float(exits.float().mean())
        results["exit_layer_histogram"] = {int(k): int(v) for k, v in sorted(Counter(exits.tolist()).items())}
        width_of_heads = {0: "skipped"}
        fixed = setting.fixed_width
        for w in sorted(set(setting.class_to_width) | ({fixed} if fixed else set())):
            width_of_heads.setdefault(heads_kept(config, w), f"{w:g}")
        results["width_histogram_per_layer"] = [
            {width_of_heads.get(int(k), str(int(k))): int(v) for k, v in sorted(Counter(heads[:, i].tolist()).items())}
            for i in range(config.num_hidden_layers)
        ]
        if setting_is_cascade(setting):  # the stage that answered (an example ran it and every stage before)
            names, counts = setting.cascade.stage_names, Counter(torch.cat(self.stages).tolist())
            results["cascade_stage_histogram"] = {names[i]: int(counts.get(i, 0)) for i in range(len(names))}
        if self.batch_times and self.timing.record:
            total_time = sum(self.batch_times)
            results["latency_ms_per_batch"] = 1000 * total_time / len(self.batch_times)
            results["latency_ms_per_example"] = 1000 * total_time / self.n_examples_timed
            results["examples_per_second"] = self.n_examples_timed / total_time
            if self.timing.cuda_events:
                results["gpu_latency"] = results["latency_ms_per_batch"]  # reference: ms per batch
            else:
                results["cpu_latency"] = total_time / len(self.batch_times)  # reference: seconds per batch
        return results


def setting_is_cascade(setting: RoutingSetting) -> bool:
    return setting.cascade is not None


def routed_report(evaluation: Evaluation, task: str, batch_size: int, max_seq_length: int, device: torch.device,
                  precision: str, model_dir: str) -> dict:
    """inference_results.json: the setting, how it ran, and `Evaluation.results`."""
    setting, timing = evaluation.setting, evaluation.timing
    cascade = setting.cascade.entry() if setting_is_cascade(setting) else {}
    return {
        "task": task, "mode": setting.mode, "width_mult_list": list(setting.class_to_width),
        "depth_mult": None if cascade else setting.depth_mult, "early_exit": setting.early_exit,
        "exit_threshold": setting.exit_threshold if setting.early_exit else None,
        "off_ramps": setting.off_ramps if setting.early_exit else None, "fixed_width": setting.fixed_width,
        **{key: value for key, value in cascade.items() if key != "mode"},
        "batch_size": batch_size, "max_seq_length": max_seq_length, "device": str(device),
        "timing": ("cuda_events" if timing.cuda_events else "wall_clock") if timing.record else None,
        "precision": precision, "tf32": tf32_enabled(device), "model_dir": model_dir,
        "num_examples": evaluation.n_total, "results": evaluation.results(max_seq_length),
    }


def _evaluate(model, datasets: dict[str, TensorDataset], settings: dict, device: torch.device,
              options: EvaluationOptions, desc: str, forward: Callable) -> dict:
    """The one batch loop: `forward(input_ids, attention_mask, token_type_ids, stopwatch)` gives each
    setting's (routed output, latency) of a batch. Under torchrun each process runs its share of the batches
    (`map_shared_objects`) and every process adds all of them in order."""
    model.to(device).eval()
    evaluations = {key: Evaluation(model, setting, options) for key, setting in settings.items()}
    stopwatch = Stopwatch(device, options.timing.cuda_events)

    def run_batch(item) -> dict:
        _, (indices, batch) = item
        input_ids, attention_mask, token_type_ids, labels = (t.to(device) for t in batch)
        outputs = forward(input_ids, attention_mask, token_type_ids, stopwatch)
        return {key: evaluations[key].batch_result(indices, labels, out, elapsed)
                for key, (out, elapsed) in outputs.items()}

    for split, dataset in datasets.items():
        for evaluation in evaluations.values():
            evaluation.begin_split(split)
        batches = list((length_sorted_batches if options.sort_by_length else file_order_batches)(
            dataset, options.batch_size))
        bar = progress_bar(batches, desc=f"{desc} {options.desc}{split}", leave=False)
        for (b, _), results in map_shared_objects(enumerate(bar), run_batch, options.rank, options.world):
            for key, result in results.items():
                evaluations[key].add(b, len(batches), result)
        for evaluation in evaluations.values():
            evaluation.end_split()
    return evaluations


def evaluate_routed(model, datasets: dict[str, TensorDataset], setting: RoutingSetting, device: torch.device,
                    options: EvaluationOptions) -> Evaluation:
    """`setting` on every split of `datasets` (in order), one `dynamic_forward` per batch: the timed region is
    the routed forward under autocast; MAC counting and copies are outside it."""
    def forward(input_ids, attention_mask, token_type_ids, stopwatch):
        stopwatch.start()
        with autocast(options.precision, device.type):
            if setting_is_cascade(setting):  # every stage's sub-batch is timed; its MACs are host integers
                out = cascade_forward(model, input_ids, attention_mask, token_type_ids, setting.cascade)
            else:
                out = dynamic_forward(model, input_ids, attention_mask, token_type_ids, **setting.forward_kwargs())
        return {None: (out, stopwatch.seconds(stopwatch.mark()))}

    return _evaluate(model, datasets, {None: setting}, device, options, setting.mode, forward)[None]


class _LayerClock:
    """A static router that marks the stopwatch after every layer (the latency of each depth's prefix)."""

    def __init__(self, subnet, stopwatch: Stopwatch):
        self.inner, self.stopwatch, self.marks = StaticRouter(subnet), stopwatch, []
        self.num_layers = subnet.num_layers

    def heads(self, layer_index: int, hidden: torch.Tensor, mask: torch.Tensor) -> int:
        return self.inner.heads(layer_index, hidden, mask)

    def after_layer(self, layer_index: int, hidden: torch.Tensor, mask: torch.Tensor) -> None:
        self.marks.append(self.stopwatch.mark())


@torch.no_grad()
def evaluate_static_depths(model, datasets: dict[str, TensorDataset], settings: dict[float, RoutingSetting],
                           device: torch.device, options: EvaluationOptions) -> dict[float, Evaluation]:
    """Static settings of one width at several depths ({depth: setting}) from one encoder pass per batch
    (`static_output`): each depth's evaluation equals its own `evaluate_routed`, except the latency, which is
    the pass up to that depth's last layer plus its head."""
    if any(s.mode != "static" for s in settings.values()) or len({s.fixed_width for s in settings.values()}) != 1:
        raise ValueError("evaluate_static_depths takes static settings of one width")
    subnets = {d: model.subnet(s.fixed_width, d) for d, s in settings.items()}
    deepest = max(subnets.values(), key=lambda s: s.num_layers)

    def forward(input_ids, attention_mask, token_type_ids, stopwatch):
        stopwatch.start()
        router = _LayerClock(deepest, stopwatch)
        with autocast(options.precision, device.type):
            states = model.encode(input_ids, attention_mask, token_type_ids, router)
        outputs = {}
        for d, subnet in subnets.items():
            head_start = stopwatch.mark()
            with autocast(options.precision, device.type):
                out = static_output(model, input_ids, attention_mask, states, subnet)
            head = stopwatch.seconds(stopwatch.mark()) - stopwatch.seconds(head_start)
            outputs[d] = (out, stopwatch.seconds(router.marks[subnet.num_layers - 1]) + head)
        return outputs

    return _evaluate(model, datasets, settings, device, options, "static", forward)


def evaluate_exit_rules(model, datasets: dict[str, TensorDataset], settings: dict, device: torch.device,
                        options: EvaluationOptions) -> dict:
    """Gated settings of one class -> width map and depth that differ in the exit rule ({key: setting}), the
    layers before the first off-ramp run once per batch (`shared_prefix_forwards`): each evaluation equals its
    own `evaluate_routed`, except the latency, which is the shared layers' plus the setting's own remainder."""
    keys = list(settings)

    def forward(input_ids, attention_mask, token_type_ids, stopwatch):
        marks = []
        stopwatch.start()
        with autocast(options.precision, device.type):
            outs = shared_prefix_forwards(model, input_ids, attention_mask, token_type_ids,
                                          [settings[k].forward_kwargs() for k in keys],
                                          lambda: marks.append(stopwatch.mark()),
                                          lambda: marks.append(stopwatch.mark()))
        seconds = [stopwatch.seconds(m) for m in marks]  # the shared layers, then each setting's end
        return {k: (out, seconds[0] + seconds[i + 1] - seconds[i])
                for i, (k, out) in enumerate(zip(keys, outs, strict=True))}

    return _evaluate(model, datasets, settings, device, options, "dynamic", forward)


# ---- training-time subnet scores ---------------------------------------------------------------------------
def subnet_key(width: float, depth: float) -> str:
    return f"d{depth:g}_w{width:g}"


def evaluate_subnets(model, compute_metrics: Callable[[np.ndarray, np.ndarray], dict[str, float]],
                     dev_sets: dict[str, TensorDataset], width_mult_list: Sequence[float],
                     depth_mult_list: Sequence[float], batch_size: int, device: torch.device, precision: str = "fp32",
                     rank: int = 0, world: int = 1) -> dict[str, dict[str, float]]:
    """Scores of every static (depth, width) subnet, keyed `d{depth}_w{width}`, depth descending then width
    descending: the task's metrics on dev (`compute_metrics(logits, labels)`; MNLI's dev_mm adds `acc_mm`),
    then `eval_loss`. One `evaluate_static_depths` per width (one encoder pass per batch serves every depth)
    on length-sorted batches, under autocast for `precision`; the model's train/eval mode is kept. Under
    torchrun every process gets the scores, each having run its share of the batches."""
    was_training = model.training
    depths, widths = sorted(depth_mult_list, reverse=True), sorted(width_mult_list, reverse=True)
    options = EvaluationOptions(batch_size, precision, scored=list(dev_sets), compute_metrics=compute_metrics,
                                desc="subnets ", rank=rank, world=world, sort_by_length=True)
    scores = {}
    for w in widths:
        settings = {d: RoutingSetting([w], w, d) for d in depths}
        for d, evaluation in evaluate_static_depths(model, dev_sets, settings, device, options).items():
            metrics = dict(evaluation.scores)
            metrics["eval_loss"] = metrics.pop("eval_loss")  # after acc_mm, as the result files list it
            scores[subnet_key(w, d)] = metrics
    model.train(was_training)
    return {subnet_key(w, d): scores[subnet_key(w, d)] for d in depths for w in widths}


def format_subnet_table(results: dict[str, dict[str, float]], metric: str) -> str:
    """Depth rows x width columns of one metric."""
    cells = {}
    for key, metrics in results.items():
        d, w = key[1:].split("_w")
        cells[(float(d), float(w))] = metrics[metric]
    depths = sorted({d for d, _ in cells}, reverse=True)
    widths = sorted({w for _, w in cells}, reverse=True)
    lines = [f"{metric:>10} | " + " ".join(f"w={w:<6g}" for w in widths)]
    lines.append("-" * len(lines[0]))
    for d in depths:
        lines.append(f"{'d=' + format(d, 'g'):>10} | " + " ".join(
            f"{cells[(d, w)]:<8.4f}" if (d, w) in cells else " " * 8 for w in widths))
    return "\n".join(lines)


def print_report(report: dict) -> None:
    """The printed form of an inference report (routed_report)."""
    mode_line = {
        "static": "static subnet inference.", "w_dynamic": "width-dynamic inference.",
        "d_dynamic": "depth-dynamic inference.", "wd_dynamic": "width- and depth-dynamic inference.",
        "cascade": "confidence cascade of static subnets.",
    }[report["mode"]]
    print(f"***** Eval results: {report['task']} *****")
    print(mode_line)
    if report["mode"] == "cascade":
        stages = [f"w{w:g}_d{d:g}" for w, d in report["cascade_stages"]]
        print(f" stages: {' > '.join(stages)}; thresholds ({report['cascade_rule']}): {report['cascade_thresholds']}")
    elif report["early_exit"]:
        print(f" early exit threshold: {report['exit_threshold']}")
    else:
        print(f" depth ratio: [{report['depth_mult']}]")
    print(f" width ratios: {report['width_mult_list']}")
    for key in sorted(report["results"]):
        value = report["results"][key]
        if isinstance(value, float):
            print(f"  {key} = {value:.6g}")
        elif key != "width_histogram_per_layer":
            print(f"  {key} = {value}")
    for i, hist in enumerate(report["results"]["width_histogram_per_layer"]):
        print(f"  layer {i} widths: {hist}")
