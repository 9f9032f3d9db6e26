"""Errors: PrunecError is something the user can fix; InternalError is our bug."""
from __future__ import annotations

import traceback


def first_line(err: BaseException, limit: int = 200) -> str:
    """'Type: first line of the message' (at most ``limit`` characters of it), or where it was raised when
    the message is empty."""
    lines = str(err).strip().splitlines()
    if lines:
        return f"{type(err).__name__}: {lines[0][:limit]}"
    tb = traceback.extract_tb(err.__traceback__)
    return f"{type(err).__name__} at {tb[-1].filename}:{tb[-1].lineno} ({tb[-1].line})" if tb else type(err).__name__


class PrunecError(Exception):
    """A problem the user can fix. ``hint`` says how."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message.rstrip(".")
        self.hint = hint

    def one_line(self) -> str:
        text = f"{self.message}."
        if self.hint:
            hint = self.hint.rstrip(".")
            text += f" {hint[:1].upper()}{hint[1:]}."
        return " ".join(text.split())


class InputError(PrunecError):
    """Bad file, bad argument, bad shape."""


class TraceError(PrunecError):
    """The model could not be traced."""


class PruneError(PrunecError):
    """The model cannot be pruned safely as asked."""


class RecoverError(PrunecError):
    """Recovery training could not go on (e.g. the loss became NaN)."""


class BackendError(PrunecError):
    """An artifact could not be written or checked."""


class MissingDependency(PrunecError):
    """An optional dependency is missing."""

    def __init__(self, package: str, extra: str) -> None:
        super().__init__(f"this needs the optional package '{package}'",
                         f"install it with: pip install 'prunec[{extra}]'")


class InternalError(Exception):
    """A broken invariant inside prunec (our bug, not the user's). ``context`` collects what a
    repro bundle needs (the plan JSON, …); the CLI writes it and exits 3."""

    def __init__(self, message: str, **context: object) -> None:
        super().__init__(message)
        self.message = message.rstrip(".")
        self.context: dict[str, object] = dict(context)

    def one_line(self) -> str:
        text = " ".join(f"{self.message}.".split())
        return f"internal error (a prunec bug, not your input): {text}"


def add_note(err: BaseException, note: str) -> None:
    """``err.add_note(note)`` (Python 3.11+), or the same ``__notes__`` list on 3.10."""
    if hasattr(err, "add_note"):
        err.add_note(note)
    else:  # Python 3.10: keep the notes where 3.11's traceback would print them
        notes = getattr(err, "__notes__", None)
        try:
            err.__notes__ = [*(notes or []), note]  # type: ignore[attr-defined]
        except AttributeError:
            pass
