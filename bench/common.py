"""Helpers the bench scripts share: a per-model time limit and rewriting a marked section of a doc."""
from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


class Timeout(Exception):
    pass


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise Timeout in the main thread after ``seconds`` (SIGALRM)."""
    def handler(signum: int, frame: Any) -> None:
        raise Timeout(f"timed out after {seconds}s")
    old = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def write_section(doc: Path, begin: str, end: str, lines: list[str]) -> None:
    """Replace the text between ``begin`` and ``end`` in ``doc`` (``lines`` include both markers), or append it."""
    text = doc.read_text() if doc.exists() else "# Coverage\n"
    section = "\n".join(lines)
    if begin in text:
        text = text[:text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    doc.write_text(text)
