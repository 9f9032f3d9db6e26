"""One registry helper: a named table whose keys can be registered only once."""
from __future__ import annotations

from typing import Any, Callable, Generic, Iterator, TypeVar

V = TypeVar("V")


class Registry(Generic[V]):
    """A dict with a name and a duplicate check (torch._decomp's lesson: a second entry is a bug).

    >>> PASSES = Registry("pass")
    >>> @PASSES.register("magnitude")
    ... class Magnitude: ...
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._items: dict[Any, V] = {}

    def add(self, key: Any, value: V) -> V:
        """Store ``value`` under ``key``; raises ValueError if ``key`` is already taken."""
        if key in self._items:
            raise ValueError(f"duplicate {self.name} for {key}")
        self._items[key] = value
        return value

    def register(self, *keys: Any) -> Callable[[V], V]:
        """Decorator: register the decorated object under every key."""
        def wrap(value: V) -> V:
            for key in keys:
                self.add(key, value)
            return value
        return wrap

    __setitem__ = add

    def setdefault(self, key: Any, default: V) -> V:
        """``add`` unless ``key`` is taken; returns the stored value (optional library entries)."""
        return self._items[key] if key in self._items else self.add(key, default)

    def get(self, key: Any, default: V | None = None) -> V | None:
        return self._items.get(key, default)

    def __getitem__(self, key: Any) -> V:
        return self._items[key]

    def __contains__(self, key: Any) -> bool:
        return key in self._items

    def __iter__(self) -> Iterator[Any]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def items(self) -> list[tuple[Any, V]]:
        return list(self._items.items())

    def keys(self) -> list[Any]:
        return list(self._items)

    def values(self) -> list[V]:
        return list(self._items.values())
