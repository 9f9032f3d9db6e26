"""Errors: PrunecError is something the user can fix; InternalError is our bug."""
from __future__ import annotations


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
    """A broken invariant inside prunec: please report it."""
