"""Make `train_aug.tsv` for `run_glue.py --data_aug` with TinyBERT's augmenter (SPEC §1.5).

For every training row and every text column of the task, the row is written once with the original sentence
and once per distinct variant of that sentence; all other columns (label included) are copied. A variant
replaces each candidate word (alphabetic, not a stop word) with probability p by one of its M candidates:
the masked LM's top-M predictions for single-WordPiece words, else the M nearest neighbours by cosine
similarity (GloVe with --glove_embs, otherwise the model's own input word embeddings).

    python augment_data.py --task_name RTE --data_dir data/RTE --model_dir <BERT model dir>
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from cli import ArgumentParser
from transformers_ext.errors import error_detail
from utils_glue import (
    DataError,
    TaskSpec,
    custom_augmented_file,
    data_format,
    get_task,
    read_examples,
    read_table,
    read_tsv,
    resolve_columns,
)

log = logging.getLogger("augment_data")

# NLTK's English stop-word list (nltk.corpus.stopwords.words("english")), embedded to avoid the dependency.
STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he him his
himself she she's her hers herself it it's its itself they them their theirs themselves what which who whom
this that that'll these those am is are was were be been being have has had having do does did doing a an the
and but if or because as until while of at by for with about against between into through during before after
above below to from up down in out on off over under again further then once here there when where why how all
any both each few more most other some such no nor not only own same so than too very s t can will just don
don't should should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn doesn't hadn
hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn needn't shan shan't shouldn
shouldn't wasn wasn't weren weren't won won't wouldn wouldn't
""".split())

# Variants drawn per sentence (TinyBERT's per-task defaults).
DEFAULT_N = {"CoLA": 30, "MRPC": 30, "RTE": 30, "STS-B": 30, "SST-2": 20, "QNLI": 20, "MNLI": 10, "QQP": 10, "WNLI": 30}
GLOVE_WORDS = 100_000  # only the first (most frequent) GloVe words are searched
MLM_BATCH = 64  # masked copies of one sentence per forward pass

_ALPHA = re.compile(r"[A-Za-z]+")


def is_candidate(word: str) -> bool:
    """A word that may be replaced: purely alphabetic and not a stop word."""
    return _ALPHA.fullmatch(word) is not None and word.lower() not in STOP_WORDS


# ---- nearest neighbours ---------------------------------------------------------------------------------
class NeighbourIndex:
    """The M nearest neighbours by cosine similarity among a fixed word list, cached per word.

    `lowercase`: look words up lower-cased and title-case the neighbours of title-cased words (GloVe).
    `embed`: vector for a word outside the list (e.g. the mean of its WordPiece embeddings), or None.
    """

    def __init__(self, words: list[str], vectors: torch.Tensor, m: int, lowercase: bool = False,
                 embed: Callable[[str], torch.Tensor | None] | None = None):
        self.words = words
        self.index = {w: i for i, w in enumerate(words)}
        self.unit = F.normalize(vectors.float(), dim=1)
        self.m = min(m, len(words))
        self.lowercase = lowercase
        self.embed = embed
        self.cache: dict[str, list[str]] = {}

    def neighbours(self, words: list[str]) -> list[list[str]]:
        """Neighbours of each word (possibly empty); one matrix product for all words not yet cached."""
        todo = list(dict.fromkeys(w for w in words if w not in self.cache))
        queries, own, found = [], [], []
        for word in todo:
            key = word.lower() if self.lowercase else word
            i = self.index.get(key)
            vec = self.unit[i] if i is not None else (self.embed(key) if self.embed else None)
            if vec is None:
                self.cache[word] = []
                continue
            queries.append(vec.float())
            own.append(-1 if i is None else i)
            found.append(word)
        if found:
            sims = torch.stack(queries) @ self.unit.T
            rows = torch.arange(len(found))
            own_t = torch.tensor(own)
            sims[rows[own_t >= 0], own_t[own_t >= 0]] = -float("inf")  # a word is not its own neighbour
            top = sims.topk(self.m, dim=1).indices.tolist()
            for word, ids in zip(found, top):
                cands = [self.words[j] for j in ids]
                if self.lowercase and word.istitle():
                    cands = [c.title() for c in cands]
                self.cache[word] = cands
        return [self.cache[w] for w in words]


def load_glove(path: str | Path, m: int, max_words: int = GLOVE_WORDS) -> NeighbourIndex:
    """Index over the first `max_words` lines of a GloVe text file (`word v1 v2 ...`)."""
    words, vectors = [], []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            parts = line.rstrip().split(" ")
            if line_no == 1 and len(parts) == 2 and parts[0].isdigit():
                continue  # word2vec-style header "count dim"
            try:
                vec = [float(x) for x in parts[1:]]
            except ValueError:
                raise DataError(f"{path}:{line_no}: not a GloVe line (word followed by numbers)") from None
            if not vec or (vectors and len(vec) != len(vectors[0])):
                raise DataError(f"{path}:{line_no}: expected {len(vectors[0]) if vectors else 'some'} numbers")
            words.append(parts[0])
            vectors.append(vec)
            if len(words) >= max_words:
                break
    if not words:
        raise DataError(f"{path}: no word vectors in file")
    return NeighbourIndex(words, torch.tensor(vectors), m, lowercase=True)


def bert_neighbour_index(model, tokenizer, m: int) -> NeighbourIndex:
    """Index over the model's input word embeddings of whole-word alphabetic vocabulary entries.
    A word outside that set is represented by the mean embedding of its WordPieces."""
    emb = model.get_input_embeddings().weight.detach().cpu()  # the index lives on the CPU
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    entries = [(tok, i) for tok, i in vocab if _ALPHA.fullmatch(tok) and i < emb.shape[0]]
    words = [tok for tok, _ in entries]

    def embed(word: str) -> torch.Tensor | None:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        return emb[ids].mean(0) if ids else None

    return NeighbourIndex(words, emb[[i for _, i in entries]], m, embed=embed)


# ---- drawing variants -------------------------------------------------------------------------------------
def sample_variant(tokens: list[str], candidates: dict[int, list[str]], p: float, rng: random.Random) -> list[str]:
    """Each candidate position replaced, with probability p, by a uniformly chosen candidate."""
    new = list(tokens)
    for i, words in candidates.items():
        if rng.random() < p:
            new[i] = rng.choice(words)
    return new


def draw_variants(sentence: str, tokens: list[str], candidates: dict[int, list[str]], n: int, p: float,
                  rng: random.Random) -> list[str]:
    """Up to n distinct variants from n draws; a draw equal to the sentence (raw or tokenized) is dropped."""
    if not candidates:
        return []
    seen = {sentence, " ".join(tokens)}
    variants = []
    for _ in range(n):
        text = " ".join(sample_variant(tokens, candidates, p, rng))
        if text not in seen:
            seen.add(text)
            variants.append(text)
    return variants


class Augmenter:
    """Candidate words of a sentence (SPEC §1.5) and its variants."""

    def __init__(self, tokenizer, mlm, neighbours: NeighbourIndex, m: int, p: float, n: int, seed: int):
        self.tokenizer = tokenizer
        self.mlm = mlm  # BertForMaskedLM with a trained head, or None: neighbours for every word
        self.neighbours = neighbours
        self.m, self.p, self.n = m, p, n
        self.rng = random.Random(seed)
        backend = tokenizer.backend_tokenizer
        self._normalize = backend.normalizer.normalize_str if backend.normalizer else (lambda s: s)
        self._pre_tokenize = backend.pre_tokenizer.pre_tokenize_str
        special = set(tokenizer.all_special_ids)
        self._drop = {i for tok, i in tokenizer.get_vocab().items()
                      if i in special or tok.startswith("##") or tok.startswith("[unused")}
        if mlm is not None:
            self._max_len = mlm.config.max_position_embeddings

    def words(self, sentence: str) -> tuple[list[str], list[list[int]]]:
        """BERT basic-tokenizer words (lower-cased for uncased models) and the WordPiece ids of each."""
        words = [w for w, _ in self._pre_tokenize(self._normalize(sentence))]
        enc = self.tokenizer(sentence, add_special_tokens=False)
        pieces: list[list[int]] = [[] for _ in words]
        for piece, w in zip(enc["input_ids"], enc.word_ids()):
            if w is not None and w < len(words):
                pieces[w].append(piece)
        return words, pieces

    def candidates(self, sentence: str) -> tuple[list[str], dict[int, list[str]]]:
        """Tokens of the sentence and, per candidate position, the words that may replace it."""
        words, pieces = self.words(sentence)
        positions = [i for i, w in enumerate(words) if is_candidate(w)]
        cands: dict[int, list[str]] = {}
        if self.mlm is not None:
            single = [i for i in positions if len(pieces[i]) == 1]
            cands.update(self._mlm_candidates(pieces, single))
        rest = [i for i in positions if i not in cands]
        for i, found in zip(rest, self.neighbours.neighbours([words[i] for i in rest])):
            cands[i] = found
        return words, {i: cands[i] or [words[i]] for i in positions}

    @torch.inference_mode()
    def _mlm_candidates(self, pieces: list[list[int]], positions: list[int]) -> dict[int, list[str]]:
        """Top-M predictions for each single-piece word masked in `[CLS] masked [SEP] sentence [SEP]`.
        Words past the (truncated) first segment are left out and fall back to neighbours."""
        flat = [p for ps in pieces for p in ps]
        start = [0] * len(pieces)
        for i in range(1, len(pieces)):
            start[i] = start[i - 1] + len(pieces[i - 1])
        a = flat[: self._max_len - 3]
        b = flat[: self._max_len - 3 - len(a)]
        tok = self.tokenizer
        ids = torch.tensor([tok.cls_token_id, *a, tok.sep_token_id, *b, tok.sep_token_id])
        types = torch.tensor([0] * (len(a) + 2) + [1] * (len(b) + 1))
        positions = [i for i in positions if start[i] < len(a)]
        out: dict[int, list[str]] = {}
        for chunk in range(0, len(positions), MLM_BATCH):
            words = positions[chunk: chunk + MLM_BATCH]
            device = self.mlm.device
            where = torch.tensor([1 + start[i] for i in words], device=device)
            rows = torch.arange(len(words), device=device)
            batch = ids.to(device).repeat(len(words), 1)
            batch[rows, where] = tok.mask_token_id
            hidden = self.mlm.bert(input_ids=batch, token_type_ids=types.to(device).repeat(len(words), 1)
                                   ).last_hidden_state
            top = self.mlm.cls(hidden[rows, where]).topk(self.m, dim=-1).indices.tolist()
            for i, pred in zip(words, top):
                tokens = tok.convert_ids_to_tokens([j for j in pred if j not in self._drop])
                out[i] = [t for t in tokens if t is not None]  # None: id outside the tokenizer's vocab
        return out

    def augment(self, sentence: str) -> list[str]:
        """Distinct variants of the sentence (at most N)."""
        tokens, cands = self.candidates(sentence)
        return draw_variants(sentence, tokens, cands, self.n, self.p, self.rng)


def augment_rows(columns: TaskSpec | Sequence[int | str], rows: Sequence[list[str] | dict],
                 augmenter: Augmenter) -> Iterator[list[str] | dict]:
    """Per row and text column: the original row, then one row per variant of that column (SPEC §1.5).
    `columns`: the text columns (positions in a list row, names in a dict row), or a GLUE TaskSpec's."""
    if isinstance(columns, TaskSpec):
        columns = [columns.text_a] + ([columns.text_b] if columns.text_b is not None else [])
    for fields in rows:
        for col in columns:
            yield fields
            for variant in augmenter.augment(str(fields[col])):
                new = dict(fields) if isinstance(fields, dict) else list(fields)
                new[col] = variant
                yield new


# ---- model, files, command line ---------------------------------------------------------------------------
def load_model(model_dir: str | Path):
    """(tokenizer, BertForMaskedLM, has_mlm_head). The head is missing for encoder-only checkpoints."""
    import transformers
    from transformers import AutoTokenizer, BertForMaskedLM

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = Path(model_dir)
    if not path.is_dir():
        raise DataError(f"model dir {path} does not exist")
    if not (path / "config.json").is_file():
        raise DataError(f"model dir {path} has no config.json (expected a Hugging Face BERT model)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model, info = BertForMaskedLM.from_pretrained(path, output_loading_info=True)
    except Exception as err:  # whatever the loaders raise (a truncated model.safetensors: SafetensorError)
        raise DataError(f"cannot load a BERT model from {path}: {error_detail(err)}") from None
    if getattr(tokenizer, "backend_tokenizer", None) is None or tokenizer.mask_token_id is None:
        raise DataError(f"{path}: expected a (fast) WordPiece tokenizer with a [MASK] token")
    has_mlm = not any(k.startswith("cls.predictions.transform") for k in info["missing_keys"])
    return tokenizer, model.eval(), has_mlm


def training_rows(spec: TaskSpec, data_dir: Path) -> tuple[list[str] | None, list[list[str]]]:
    """(header or None, rows) of train.tsv, validated by the GLUE reader first."""
    if not data_dir.is_dir():
        raise DataError(f"data dir {data_dir} does not exist")
    path = data_dir / "train.tsv"
    read_examples(spec, path, spec.train_header)  # raises DataError naming the bad line
    rows = [fields for _, fields in read_tsv(path)]
    header = rows.pop(0) if spec.train_header else None
    return header, [r for r in rows if len(r) >= spec.min_columns]


def custom_training_rows(train_file: Path, text_column: str | None, text_pair_column: str | None
                         ) -> tuple[list[str], list[dict], list[str]]:
    """(columns, rows as dicts, text columns to augment) of your own training file (csv, tsv, json lines)."""
    columns, rows = read_table(train_file)
    text, pair, _ = resolve_columns(train_file, columns, text_column, text_pair_column, None, need_label=False)
    return columns, [row for _, row in rows], [text] + ([pair] if pair else [])


def custom_row_writer(train_file: Path, output: Path, columns: list[str]) -> Callable[[Iterator[dict]], int]:
    """A function writing dict rows atomically to `output` in the training file's format (csv quoted as the
    csv module writes it, tsv TAB-joined with tabs/newlines in the text turned to spaces, json lines)."""
    fmt = data_format(train_file)

    def write(rows: Iterator[dict]) -> int:
        def lines() -> Iterator[str]:
            if fmt == "json":
                for row in rows:
                    yield json.dumps(row, ensure_ascii=False) + "\n"
                return
            if fmt == "tsv":
                yield "\t".join(columns) + "\n"
                for row in rows:
                    yield "\t".join(" ".join(str(row[c]).split()) if "\t" in str(row[c]) or "\n" in str(row[c])
                                    else str(row[c]) for c in columns) + "\n"
                return
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(columns)
            yield buf.getvalue()
            for row in rows:
                buf.seek(0)
                buf.truncate()
                writer.writerow([row[c] for c in columns])
                yield buf.getvalue()

        return write_lines_atomic(output, lines(), header=fmt != "json")

    return write


def write_lines_atomic(path: Path, records: Iterator[str], header: bool) -> int:
    """Stream records (one row's text each, the first the header when `header`) to a temporary file next to
    `path`, then rename; returns the number of example rows written."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in records:
                f.write(record)
                count += 1
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return count - int(header)


def write_rows_atomic(path: Path, header: list[str] | None, rows: Iterator[list[str]]) -> int:
    """Stream rows to a temporary file next to `path`, then rename: never a partial output file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            if header is not None:
                f.write("\t".join(header) + "\n")
            for fields in rows:
                f.write("\t".join(fields) + "\n")
                count += 1
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return count


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--task_name", default=None,
                        help="GLUE task (any case): " + ", ".join(DEFAULT_N) + " (required without --train_file)")
    parser.add_argument("--data_dir", default=None,
                        help="task folder holding train.tsv; train_aug.tsv goes here (required without --train_file)")
    parser.add_argument("--train_file", default=None,
                        help="your own training file (.csv, .tsv, .json/.jsonl with a header / keys) instead of a GLUE "
                             "folder: its text columns are augmented, every other column copied; written in the same "
                             "format to <stem>_aug<suffix> beside it, where run_glue.py --train_file ... --data_aug "
                             "reads it")
    parser.add_argument("--text_column", default=None,
                        help="with --train_file: the text column (default: sentence1, else sentence or text)")
    parser.add_argument("--text_pair_column", default=None,
                        help="with --train_file: the second text column (default: sentence2 if the file has it)")
    parser.add_argument("--model_dir", required=True,
                        help="BERT model folder (config.json, weights, vocab.txt); its masked-LM head gives "
                             "candidates, a model without one falls back to embedding neighbours for all words")
    parser.add_argument("--glove_embs", default=None,
                        help="GloVe text file; its first 100,000 words give the neighbours of words the masked LM "
                             "does not handle (default: the model's own input word embeddings)")
    parser.add_argument("--N", type=int, default=None,
                        help="draws (so at most this many variants) per sentence; default per task: "
                             + ", ".join(f"{k} {v}" for k, v in DEFAULT_N.items()))
    parser.add_argument("--p", type=float, default=0.4,
                        help="probability of replacing each candidate word (default 0.4)")
    parser.add_argument("--M", type=int, default=15,
                        help="candidates per word: masked-LM top-M or M nearest neighbours (default 15)")
    parser.add_argument("--max_examples", type=int, default=None,
                        help="augment only the first K training rows (default: all)")
    parser.add_argument("--seed", type=int, default=42,
                        help="random seed of the draws: same seed, same file (default 42)")
    parser.add_argument("--output", default=None, help="output file (default: DATA_DIR/train_aug.tsv)")
    parser.add_argument("--no_cuda", "--cpu", dest="cpu", action="store_true",
                        help="run the masked LM on the CPU even if CUDA is available (on a GPU, near-tied "
                             "candidates may rank differently, so the file can differ from the CPU's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0.0 <= args.p <= 1.0:
        parser.error("--p must be between 0 and 1")
    if args.M < 1 or (args.N is not None and args.N < 0) or (args.max_examples is not None and args.max_examples < 1):
        parser.error("--M and --max_examples must be >= 1, --N >= 0")
    if args.train_file is None and (args.task_name is None or args.data_dir is None):
        parser.error("give --task_name and --data_dir (a GLUE folder), or --train_file (your own data)")
    if args.train_file is None and (args.text_column or args.text_pair_column):
        parser.error("--text_column / --text_pair_column apply to --train_file only")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        if args.train_file is not None:
            train_file = Path(args.train_file)
            output = Path(args.output) if args.output else custom_augmented_file(train_file)
            header, rows, columns = custom_training_rows(train_file, args.text_column, args.text_pair_column)
            write_rows = custom_row_writer(train_file, output, header)
            name, n_default = train_file.stem, 20
        else:
            spec = get_task(args.task_name)
            data_dir = Path(args.data_dir)
            train_file = data_dir / "train.tsv"
            output = Path(args.output) if args.output else data_dir / "train_aug.tsv"
            header, rows = training_rows(spec, data_dir)
            columns = [spec.text_a] + ([spec.text_b] if spec.text_b is not None else [])
            name, n_default = spec.name, DEFAULT_N[spec.name]

            def write_rows(rows):
                return write_rows_atomic(output, header, rows)
        if not output.parent.is_dir():
            raise DataError(f"output folder {output.parent} does not exist")
        if output.resolve() == train_file.resolve():
            raise DataError("--output must not overwrite the training file")
        if args.glove_embs is not None and not Path(args.glove_embs).is_file():
            raise DataError(f"--glove_embs: {args.glove_embs}: file not found")
        rows = rows[: args.max_examples]
        n = args.N if args.N is not None else n_default

        tokenizer, model, has_mlm = load_model(args.model_dir)
        if not has_mlm:
            log.info("%s has no masked-LM head: using nearest neighbours for every word", args.model_dir)
        if args.glove_embs is not None:
            neighbours = load_glove(args.glove_embs, args.M)
        else:
            neighbours = bert_neighbour_index(model, tokenizer, args.M)
        model.to("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
        augmenter = Augmenter(tokenizer, model if has_mlm else None, neighbours, args.M, args.p, n, args.seed)

        from tqdm import tqdm

        start = time.time()
        progress = tqdm(rows, desc=f"augment {name}", unit="ex", file=sys.stderr)
        count = write_rows(augment_rows(columns, progress, augmenter))
        secs = time.time() - start
        log.info("wrote %d rows for %d examples to %s in %.1fs (%.1f examples/s)",
                 count, len(rows), output, secs, len(rows) / max(secs, 1e-9))
        other = output.parent / f"train_{name}_aug_with_logits.tsv"
        if args.train_file is None and other.is_file():
            log.info("note: %s exists and is read by --data_aug instead of %s", other, output.name)
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
