"""Sharded safetensors checkpoints, one tensor group at a time: read lazily, write shard by shard.

``Checkpoint`` reads a ``save_pretrained`` folder (``model.safetensors`` or the sharded
``model.safetensors.index.json`` form) tensor by tensor through ``safe_open``, so only what a
caller asks for is ever in memory. ``ShardWriter`` writes one shard per call and the index json
``from_pretrained`` reads at the end.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prunec.errors import InputError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@dataclass
class Checkpoint:
    """A folder's tensor names → the shard holding each; tensors are read only on request."""

    folder: Path
    weight_map: dict[str, str]

    @classmethod
    def open(cls, folder: str | Path) -> "Checkpoint":
        """Index a save_pretrained folder (reads only the safetensors headers)."""
        folder = Path(folder)
        if (folder / INDEX).is_file():
            try:
                weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise InputError(f"{folder / INDEX} is not a safetensors index ({err})",
                                 "write the folder with save_pretrained") from None
            missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
            if missing:
                raise InputError(f"{folder} lacks shard {missing[0]} named in its index", "copy the whole folder")
            return cls(folder, dict(weight_map))
        if (folder / SINGLE).is_file():
            with safe_open(folder / SINGLE, framework="pt") as f:
                return cls(folder, {k: SINGLE for k in f.keys()})
        raise InputError(f"{folder} has no safetensors weights ({SINGLE} or {INDEX})",
                         "save the model with save_pretrained(safe_serialization=True)")

    @property
    def nbytes(self) -> int:
        """Size of the weight files on disk."""
        return sum((self.folder / f).stat().st_size for f in set(self.weight_map.values()))

    def read(self, keys: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The named tensors (cast to ``dtype`` when given), each shard opened once and closed after."""
        by_file: dict[str, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.weight_map[key], []).append(key)
        out: dict[str, torch.Tensor] = {}
        for name, names in by_file.items():
            with safe_open(self.folder / name, framework="pt") as f:
                for key in names:
                    t = f.get_tensor(key)
                    out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out

    def rows(self, key: str, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of a 2-D tensor (an embedding lookup) without reading the whole tensor."""
        with safe_open(self.folder / self.weight_map[key], framework="pt") as f:
            part = f.get_slice(key)
            return torch.stack([part[int(i):int(i) + 1][0] for i in index.flatten()]).reshape(*index.shape, -1)


@dataclass
class ShardWriter:
    """Writes ``total`` numbered shards into ``folder``, then the index json."""

    folder: Path
    total: int
    weight_map: dict[str, str] = field(default_factory=dict)
    nbytes: int = 0
    written: int = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> Path:
        """Save ``tensors`` as the next shard; returns its path."""
        if self.written >= self.total:
            raise ValueError(f"all {self.total} shards are written")
        self.written += 1
        name = f"model-{self.written:05d}-of-{self.total:05d}.safetensors"
        path = self.folder / name
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
        for key, t in tensors.items():
            self.weight_map[key] = name
            self.nbytes += t.numel() * t.element_size()
        return path

    def finish(self) -> Path:
        """Write the index (every shard must be written)."""
        if self.written != self.total:
            raise ValueError(f"{self.written} of {self.total} shards written")
        path = self.folder / INDEX
        path.write_text(json.dumps({"metadata": {"total_size": self.nbytes},
                                    "weight_map": dict(sorted(self.weight_map.items()))}, indent=2))
        return path
