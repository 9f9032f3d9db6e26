"""Registry: a dict that refuses a second entry for the same key (passes, backends, updaters)."""
from __future__ import annotations

from typing import Any, Callable, Hashable, TypeVar

T = TypeVar("T")


class Registry(dict):
    """``Registry("pass")``; ``@reg.register(key)`` adds an entry, a duplicate key raises."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def __setitem__(self, key: Hashable, value: Any) -> None:
        if key in self:
            raise ValueError(f"duplicate {self.name} {key!r}: already registered as {self[key]!r}")
        super().__setitem__(key, value)

    def setdefault(self, key: Hashable, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def register(self, *keys: Hashable) -> Callable[[T], T]:
        """Decorator: register the decorated object under every key."""
        def wrap(obj: T) -> T:
            for key in keys:
                self[key] = obj
            return obj
        return wrap
