"""The library's exceptions, and the two context managers that turn whatever a lower library raises while
reading or writing a file into one of them, with the file's name in the message.

`InputError`: the input is wrong (a file that is not what it should be, a setting out of range); the
scripts answer it with one `error:` line and exit 2. `WriteError`: an output could not be written (full
disk, quota, I/O error); an environment fault, exit 1. Both are `FlexBertError`s."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


class FlexBertError(Exception):
    """Every error this library raises on purpose."""


class InputError(FlexBertError):
    """Bad input: a model folder, checkpoint, data or setting that cannot be used (exit 2 in the scripts)."""


class WriteError(FlexBertError, OSError):
    """Writing an output file failed (full disk, quota, I/O error): exit 1 in the scripts. Raised by the
    writers whatever the library underneath raised, with the file's name in the message."""


def one_line(err: BaseException, limit: int = 300) -> str:
    """A library error's message on one line (its lines joined), shortened to `limit` characters."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_detail(err: BaseException) -> str:
    """What went wrong, on one line: an OSError's strerror and file, else its message; a bare or generic
    wrapper (HF's offline OSError around the hub's LocalEntryNotFoundError, ...) adds its causes' messages,
    so that the cause is never hidden behind `(OSError)`."""
    if isinstance(err, OSError) and err.strerror:
        text = err.strerror + (f": {err.filename}" if err.filename else "")
    else:
        text = one_line(err)
    cause, seen = err.__cause__ or err.__context__, 0
    while cause is not None and seen < 3:  # a cycle-safe walk down the first few causes
        more = one_line(cause)
        if more and more != type(cause).__name__ and more not in text:
            text = more if text == type(err).__name__ else f"{text}: {more}"
        cause, seen = cause.__cause__ or cause.__context__, seen + 1
    return one_line(Exception(text))


@contextlib.contextmanager
def reading(what: str | Path) -> Iterator[None]:
    """Any library error inside (safetensors, tokenizers, torch.load, json, ...) becomes one InputError
    naming `what`, the file or folder being read."""
    try:
        yield
    except (FlexBertError, PermissionError):  # no permission: an environment fault (exit 1), reported as such
        raise
    except Exception as err:
        raise InputError(f"{what}: cannot read it ({type(err).__name__}: {error_detail(err)})") from None


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Any error while writing `path` (full disk, quota, I/O error, whatever the writing library raises:
    safetensors and torch.save do not raise OSError) becomes one WriteError naming it."""
    try:
        yield
    except WriteError:
        raise
    except Exception as err:
        detail = err.strerror if isinstance(err, OSError) and err.strerror else one_line(err)
        raise WriteError(f"cannot write {path}: {detail}") from err
