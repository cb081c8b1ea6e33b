"""Bit-identical equivalence with golden data recorded from known-good code.

tests/golden/make_golden.py defines the inputs (a tiny random BERT folder and an RTE folder, all seeded),
the steps and their flags, in two golden sets. "parity" follows the reference's computation order:
run_glue.py finetuning -> dynabertw --graft_during_training (and a --data_aug branch) -> dynabert ->
final_finetuning (one pass per subnet) -> train_gate.py traingate (the reference's gate loss), then
train_gate.py / train_gate_new.py inference in every mode at eval batch 1 and 32, and per-example dynamic
inference on the gated models. "defaults" runs what users run (prefix-shared depth and final stages, the
every-width gate loss, mean pooling from the folder's 1_Pooling, the distilled width stage, padding trimmed)
on short schedules, with a few inference runs. This module runs the same steps with the code of the
checkout (each set once, in a module fixture, in-process, --num_threads 1) and requires the recorded results:

  test_goldens_record_these_steps  the goldens were made with exactly this module's steps, flags and
                                   per-example settings (results.json's _meta; else regenerate)
  test_golden_mode             exact only where the recorded machine fingerprint is this machine's
  test_random_init_unchanged   the random starting BERT (informational: the pipeline starts from the
                               recorded one, so the steps do not depend on the model class's init order)
  test_training_weights        every tensor of each training step's model.safetensors
  test_training_results        config.json and eval_results.json / gate_results.json of each training step
                               (config.json plus make_golden.CONFIG_ADDITIONS, the keys added since)
  test_inference_results       inference_results.json (latency keys and model_dir dropped) and the
                               printed report of each inference run
  test_dev_features            the tokenised dev set the per-example outputs are computed on
  test_per_example_outputs     logits, heads, width_class, exit_layer, linear/attention MACs per example

Bit-identity needs a machine whose kernels round as the goldens' machine did. Another CPU (other SIMD width
or BLAS blocking) changes the last bits of the first forward and training amplifies them (measured for the
parity set between the machine of earlier goldens and an AMD EPYC one: finetuning weights within 1.3e-6,
later steps up to 2.2e-3 of a tensor's norm, losses within 1e-5 relative, every accuracy, head count, width
class, exit layer and MAC count identical). So the mode comes from the machine, not from the output under
test: make_golden.machine_fingerprint() (a fixed torch-only computation's hash, and the torch / transformers
versions) equal to the one recorded with the goldens -> exact (torch.equal / ==; any difference fails);
otherwise numerical: discrete values exact, floats within the NUMERIC_* tolerances (4-100x the worst
difference seen on the parity set, far below what a change of loss, schedule or routing produces). The mode
and why are printed in pytest's terminal summary ("golden comparison: ...").

Regenerate the goldens only from code known to be right, committed first (results.json records the commit):
.venv/bin/python tests/golden/make_golden.py
"""

from __future__ import annotations

import difflib
import json
import math
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

GOLDEN_DIR = Path(__file__).resolve().parent / "golden"
if str(GOLDEN_DIR) not in sys.path:
    sys.path.insert(0, str(GOLDEN_DIR))

import make_golden  # noqa: E402
from conftest import add_to_summary  # noqa: E402


def per_example_outputs(model, input_ids, attention_mask, token_type_ids, **setting) -> dict[str, torch.Tensor]:
    """ADAPTER -- the one place that calls the library's per-example inference API directly.

    `setting` holds keyword arguments of the ORIGINAL `transformers_ext.gates.dynamic_forward`
    (class_to_width, fixed_width, depth_mult, early_exit, exit_threshold, off_ramps; see
    GoldenSet.per_example_settings); `transformers_ext.inference.dynamic_forward` keeps that signature,
    building the routers (StaticRouter / GateRouter, EarlyExit) over the one encoder loop. It returns, per
    example, {logits [B, num_labels] float32, heads [B, L] int64 (heads run per layer, 0 = layer
    not run), width_class [B, L] int64 (gate class per layer, -1 = not run / no gate), exit_layer [B] int64
    (layers executed), linear_macs [B] int64, attention_macs [B] int64}.

    make_golden.py also calls this function (with the old code) to record the goldens.
    """
    from transformers_ext.inference import dynamic_forward

    out = dynamic_forward(model, input_ids, attention_mask, token_type_ids, **setting)
    return {name: getattr(out, name) for name in make_golden.PER_EXAMPLE_FIELDS}


# ---- the goldens, the pipelines and the comparison mode ----------------------------------------------------
SETS = make_golden.GOLDEN_SETS


@pytest.fixture(scope="module")
def golden() -> dict:
    if not make_golden.GOLDEN_RESULTS.is_file():
        pytest.fail(f"no golden data at {make_golden.GOLDEN_DIR}; run tests/golden/make_golden.py")
    records = json.loads(make_golden.GOLDEN_RESULTS.read_text())
    return {"meta": records.pop(make_golden.META_KEY, {}), "records": records,
            "per_example": {name: load_file(str(s.per_example_file)) for name, s in SETS.items()},
            "initial": load_file(str(make_golden.GOLDEN_INITIAL))}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, golden) -> Callable[[str], make_golden.PipelineOutput]:
    """pipeline(set name): that golden set's pipeline, run once, at its first use in this module."""
    runs: dict[str, make_golden.PipelineOutput | BaseException] = {}

    def run(name: str) -> make_golden.PipelineOutput:
        if name not in runs:
            try:
                runs[name] = make_golden.run_pipeline(tmp_path_factory.mktemp(name), SETS[name], per_example_outputs,
                                                      initial_weights=golden["initial"])
            except Exception as error:
                runs[name] = error
                raise
        if isinstance(runs[name], BaseException):
            pytest.fail(f"the {name} pipeline failed: {runs[name]!r}")
        return runs[name]

    return run


def golden_mode(recorded: dict, current: dict) -> tuple[bool, str]:
    """(exact?, why): exact when the machine fingerprint recorded with the goldens equals this machine's in
    every key of make_golden.EXACT_FINGERPRINT_KEYS."""
    differ = [key for key in make_golden.EXACT_FINGERPRINT_KEYS if recorded.get(key) != current.get(key)]
    same = ", ".join(f"{key} {current[key]}" for key in make_golden.EXACT_FINGERPRINT_KEYS)
    if not differ:
        return True, f"exact (bit for bit): this machine's {same} equal the goldens' fingerprint"
    diffs = "; ".join(f"{key} {current.get(key)} != goldens' {recorded.get(key)}" for key in differ)
    return False, (f"tolerant (discrete values exact, floats within the NUMERIC_* tolerances): {diffs}; goldens "
                   f"made on {recorded.get('cpu')} ({recorded.get('cpu_capability')}), this machine is "
                   f"{current.get('cpu')} ({current.get('cpu_capability')})")


@pytest.fixture(scope="module")
def exact(golden, request) -> bool:
    """Does this machine round as the goldens' machine did? Decided from the machine fingerprint, never from
    the outputs under test, and reported in pytest's terminal summary."""
    meta = golden["meta"]
    is_exact, why = golden_mode(meta.get("fingerprint", {}), make_golden.machine_fingerprint())
    origin = f"commit {str(meta.get('commit'))[:12]}{' + uncommitted changes' if meta.get('dirty') else ''}"
    add_to_summary(request.config, f"golden comparison: {why} (goldens from {origin})")
    return is_exact


# ---- comparison helpers ------------------------------------------------------------------------------------
NUMERIC_WEIGHT_REL = 1e-2  # |a - e| / |e| per weight tensor (Frobenius norms)
NUMERIC_INERT_ABS = 2e-3  # attention key biases: no effect on any output (softmax is shift-invariant), so their
#                           gradient is rounding noise that Adam scales up to lr-sized steps; max |a - e|
NUMERIC_FLOAT_REL = 1e-3  # JSON floats (losses, scores: 1e-5 seen) and floating tensors: relative ...
NUMERIC_JSON_ABS = 1e-6  # ... or, for JSON values near 0, absolute
NUMERIC_FLOAT_ABS = 2e-3  # logits: absolute (4.6e-4 seen, after the depth stage's amplification)


def _float_close(a: float, e: float) -> bool:
    return math.isclose(a, e, rel_tol=NUMERIC_FLOAT_REL, abs_tol=NUMERIC_JSON_ABS)


def _tensor_mismatches(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], exact: bool = True,
                       weights: bool = False) -> list[str]:
    problems = [f"missing {k}" for k in sorted(expected.keys() - actual.keys())]
    problems += [f"unexpected {k}" for k in sorted(actual.keys() - expected.keys())]
    for key in sorted(expected.keys() & actual.keys()):
        a, e = actual[key], expected[key]
        if a.dtype != e.dtype or a.shape != e.shape:
            problems.append(f"{key}: {a.dtype}{list(a.shape)} != golden {e.dtype}{list(e.shape)}")
        elif not torch.equal(a, e):
            diff = (a.double() - e.double()).abs()
            if not exact and a.is_floating_point():
                if weights and key.endswith("attention.self.key.bias"):
                    close = bool(diff.max() <= NUMERIC_INERT_ABS)
                elif weights:
                    close = bool(diff.norm() <= NUMERIC_WEIGHT_REL * e.double().norm())
                else:
                    close = bool((diff <= NUMERIC_FLOAT_ABS + NUMERIC_FLOAT_REL * e.double().abs()).all())
                if close:
                    continue
            problems.append(f"{key}: {int((diff > 0).sum())}/{a.numel()} elements differ, max |diff| {diff.max():.3g}")
    return problems


def _json_mismatches(actual, expected, path: str = "", exact: bool = True) -> list[str]:
    """Leaf paths where two JSON values differ (types must agree; floats compared with ==, or within the
    NUMERIC_FLOAT tolerances when not `exact`)."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        problems = [f"{path}/{k}: missing" for k in expected if k not in actual]
        problems += [f"{path}/{k}: unexpected" for k in actual if k not in expected]
        for k in expected:
            if k in actual:
                problems += _json_mismatches(actual[k], expected[k], f"{path}/{k}", exact)
        return problems
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        return [p for i, (a, e) in enumerate(zip(actual, expected))
                for p in _json_mismatches(a, e, f"{path}[{i}]", exact)]
    same_nan = isinstance(actual, float) and isinstance(expected, float) and math.isnan(actual) and math.isnan(expected)
    close = not exact and isinstance(actual, float) and isinstance(expected, float) and _float_close(actual, expected)
    if type(actual) is not type(expected) or (actual != expected and not same_nan and not close):
        return [f"{path}: {actual!r} != golden {expected!r}"]
    return []


def _text_mismatch(actual: str, expected: str, exact: bool) -> bool:
    """A printed report differs: exactly, or (not `exact`) in a word or beyond the tolerance in a number."""
    if actual == expected or exact:
        return actual != expected
    a_words, e_words = actual.split(), expected.split()
    if len(a_words) != len(e_words):
        return True
    for a, e in zip(a_words, e_words, strict=True):
        if a != e:
            try:
                if not _float_close(float(a.strip(",%()[]")), float(e.strip(",%()[]"))):
                    return True
            except ValueError:
                return True
    return False


def _fail_on(problems: list[str], what: str) -> None:
    if problems:
        shown = "\n  ".join(problems[:40])
        more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
        pytest.fail(f"{what}: {len(problems)} difference(s) from the golden data:\n  {shown}{more}")


# ---- tests -------------------------------------------------------------------------------------------------
TRAIN_CASES = [(name, step) for name, s in SETS.items() for step in s.train_step_names]
INFERENCE_CASES = [(name, step) for name, s in SETS.items() for step in s.inference_step_names]
PER_EXAMPLE_CASES = [(name, setting) for name, s in SETS.items() for setting in s.per_example_settings]


@pytest.mark.parametrize("golden_set", sorted(SETS))
def test_goldens_record_these_steps(golden, golden_set):
    """The goldens were made with exactly the steps, argv and per-example settings this module runs (a
    flag changed in make_golden.py without regenerating, or goldens regenerated otherwise, fails here)."""
    recorded = golden["meta"].get("steps", {}).get(golden_set)
    current = json.loads(json.dumps(make_golden.recorded_steps(SETS[golden_set])))
    assert recorded is not None, f"results.json records no steps of the {golden_set} set: regenerate the goldens"
    problems = _json_mismatches(current["per_example_settings"], recorded["per_example_settings"], "/settings")
    for step in sorted(current["argv"].keys() | recorded["argv"].keys()):
        now, then = (shlex.split(argv.get(step, "")) for argv in (current["argv"], recorded["argv"]))
        if now != then:  # the tokens added (+) and dropped (-) since the goldens
            problems.append(f"{step}: " + " ".join(t for t in difflib.ndiff(then, now) if t[0] in "+-"))
    _fail_on(problems, f"{golden_set} steps differ from the goldens' (after checking that the code is right: "
                       "tests/golden/make_golden.py)")
    assert sorted(golden["records"][golden_set]) == sorted(SETS[golden_set].train_step_names
                                                          + SETS[golden_set].inference_step_names)
    settings = {key.split("/")[0] for key in golden["per_example"][golden_set]} - {"inputs"}
    assert settings == set(SETS[golden_set].per_example_settings)


def test_golden_mode():
    """Exact only on an equal fingerprint; any other machine or library version is named in the reason."""
    here = make_golden.machine_fingerprint()
    assert here == make_golden.machine_fingerprint(), "the kernel fingerprint is not reproducible"
    is_exact, why = golden_mode(dict(here), here)
    assert is_exact and why.startswith("exact"), why
    for key, other in (("kernels", "0123456789abcdef"), ("torch", "9.9.9"), ("transformers", "0.0.1")):
        is_exact, why = golden_mode({**here, key: other, "cpu": "Other CPU"}, here)
        assert not is_exact and why.startswith("tolerant"), why
        assert f"{key} {here[key]} != goldens' {other}" in why and "Other CPU" in why, why


@pytest.mark.parametrize(("golden_set", "step"), TRAIN_CASES)
def test_training_weights(pipeline, exact, golden_set, step):
    expected = load_file(str(SETS[golden_set].folder / f"{step}.safetensors"))
    _fail_on(_tensor_mismatches(pipeline(golden_set).weights[step], expected, exact, weights=True),
             f"{golden_set} {step} model.safetensors")


@pytest.mark.parametrize(("golden_set", "step"), TRAIN_CASES)
def test_training_results(pipeline, golden, exact, golden_set, step):
    expected = make_golden.expected_training_record(golden["records"][golden_set][step], step)
    _fail_on(_json_mismatches(pipeline(golden_set).records[step], expected, exact=exact),
             f"{golden_set} {step} result files")


@pytest.mark.parametrize(("golden_set", "step"), INFERENCE_CASES)
def test_inference_results(pipeline, golden, exact, golden_set, step):
    actual, expected = pipeline(golden_set).records[step], golden["records"][golden_set][step]
    _fail_on(_json_mismatches(actual["report"], expected["report"], exact=exact),
             f"{golden_set} {step} inference_results.json")
    assert not _text_mismatch(actual["stdout"], expected["stdout"], exact), f"{step}: printed report differs"


def test_random_init_unchanged(golden, tmp_path):
    """The model class still draws the same random starting BERT (conftest.save_model_folder, seed 0). Not
    visible to any CLI step (the pipeline starts from the recorded weights): if only this fails, the refactor
    changed the init order, which matters only to tests that build random models."""
    folder = make_golden.write_initial_model(tmp_path / "bert")
    _fail_on(_tensor_mismatches(load_file(str(folder / "model.safetensors")), golden["initial"]), "initial BERT")


@pytest.mark.parametrize("golden_set", sorted(SETS))
def test_dev_features(pipeline, golden, golden_set):
    inputs = {k: v for k, v in golden["per_example"][golden_set].items() if k.startswith("inputs/")}
    _fail_on(_tensor_mismatches({k: pipeline(golden_set).per_example[k] for k in inputs}, inputs), "dev features")


@pytest.mark.parametrize(("golden_set", "setting"), PER_EXAMPLE_CASES)
def test_per_example_outputs(pipeline, golden, exact, golden_set, setting):
    keys = [f"{setting}/{name}" for name in make_golden.PER_EXAMPLE_FIELDS]
    _fail_on(_tensor_mismatches({k: pipeline(golden_set).per_example[k] for k in keys},
                                {k: golden["per_example"][golden_set][k] for k in keys}, exact),
             f"{golden_set} per-example outputs, {setting}")
