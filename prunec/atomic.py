"""Atomic output: write to a temp file in the target dir, then os.replace."""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from prunec.errors import InputError


def check_writable(path: str | Path, directory: bool = False) -> Path:
    """Fail early, with a one-line fix, if ``path``'s directory can't take a new file
    (or, for a ``directory`` artifact, a new folder that replaces any old one)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"output directory {parent} does not exist", "create it or choose another -o path")
    if not os.access(parent, os.W_OK):
        raise InputError(f"output directory {parent} is not writable", "choose another -o path")
    if path.is_dir() and not directory:
        raise InputError(f"output path {path} is a directory", "give a file name, e.g. -o pruned.pt2")
    return path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path next to ``path``; move it into place only if the block succeeds."""
    path = check_writable(path, directory=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    target = tmp / path.name
    try:
        yield target
        if path.is_dir():  # move the old folder aside first: os.replace can't overwrite a non-empty dir
            os.replace(path, tmp / "old")
        os.replace(target, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
