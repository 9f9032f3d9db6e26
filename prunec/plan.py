"""Plan: group name → kept unit positions. Plain JSON in and out."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from prunec.coupling import Coupling
from prunec.errors import InputError

PLAN_VERSION = 1


@dataclass
class Plan:
    """Which units of which groups survive. Groups not named are kept whole."""

    kept: dict[str, list[int]] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def dropped_labels(self, coupling: Coupling) -> np.ndarray:
        """Component labels of every dropped unit (for the rewriter)."""
        parts = []
        for name, kept in self.kept.items():
            group = coupling.group(name)
            mask = np.ones(group.size, dtype=bool)
            mask[np.asarray(kept, dtype=np.int64)] = False
            parts.append(group.labels[mask])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def n_dropped(self) -> int:
        return sum(self.sizes[n] - len(k) for n, k in self.kept.items())

    def to_json(self) -> dict[str, Any]:
        return {"version": PLAN_VERSION, "meta": self.meta,
                "groups": {n: {"size": self.sizes[n], "kept": sorted(int(i) for i in k)}
                           for n, k in self.kept.items()}}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1))

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Plan":
        if not isinstance(data, dict) or data.get("version") != PLAN_VERSION or "groups" not in data:
            raise InputError("not a prunec plan (expected JSON with 'version': 1 and 'groups')",
                             "pass a plan written by prunec (--save-plan or Plan.save)")
        kept = {n: list(g["kept"]) for n, g in data["groups"].items()}
        sizes = {n: int(g["size"]) for n, g in data["groups"].items()}
        return cls(kept, sizes, dict(data.get("meta", {})))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise InputError(f"plan file {path} does not exist", "check the path") from None
        except json.JSONDecodeError as err:
            raise InputError(f"plan file {path} is not JSON ({err.msg})",
                             "pass a plan written by prunec") from None
        return cls.from_json(data)

    def check(self, coupling: Coupling) -> None:
        """Every named group exists with the same size and keeps ≥ 1 valid unit."""
        names = {g.name: g for g in coupling.groups}
        for name, kept in self.kept.items():
            if name not in names:
                raise InputError(f"plan names group '{name}' that this model does not have",
                                 "replay a plan on the model it was made for")
            size = names[name].size
            if self.sizes.get(name, size) != size:
                raise InputError(f"plan group '{name}' has {self.sizes[name]} units, the model {size}",
                                 "replay a plan on the model it was made for")
            if not kept or min(kept) < 0 or max(kept) >= size or len(set(kept)) != len(kept):
                raise InputError(f"plan group '{name}' keeps an invalid unit list",
                                 f"keep between 1 and {size} distinct units in 0..{size - 1}")
