"""The one atomic writer: every file this project writes goes to a temporary beside its final name and is
renamed into place, so a kill at any moment leaves the old file or the new one, never a torn one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import writing


def atomic_write(path: str | Path, write: Callable[[Path], None], tmp_name: str | None = None) -> None:
    """`write(tmp)` to a temporary file (or folder) beside `path`, then rename it into place: a kill at any
    moment leaves the old `path` or the new one, never a torn one. Files get the umask's permissions.
    `tmp_name` fixes the temporary name (it is a file when `write` is called). A failure raises WriteError
    and leaves no temporary behind."""
    path = Path(path)
    tmp = None
    try:
        with writing(path):
            if tmp_name is None:
                fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                os.close(fd)
                tmp = Path(name)
            else:
                tmp = path.parent / tmp_name
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.touch()
            write(tmp)
            if tmp.is_file():
                honour_umask(tmp)
            os.replace(tmp, path)
    finally:
        if tmp is not None and tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp is not None and tmp.exists():
            tmp.unlink()


def honour_umask(path: Path) -> None:
    """Give a file the permissions a plain open() would (0666 minus the umask): mkstemp, and the libraries
    that write through it (safetensors via save_pretrained), leave 0600, unreadable to the group."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, default=float) + "\n")


def torch_save(obj, path: str | Path) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))
