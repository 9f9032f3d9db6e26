"""Sharded safetensors checkpoints, one tensor group at a time: read lazily, write shard by shard.

``Checkpoint`` reads a ``save_pretrained`` folder (``model.safetensors`` or the sharded
``model.safetensors.index.json`` form) tensor by tensor, so only what a caller asks for is ever in
memory. ``ShardWriter`` writes one shard per call and the index json ``from_pretrained`` reads.

Both move bytes with plain file reads/writes straight into/out of the tensors' storage (the
safetensors layout: u64 header length, JSON header, raw little-endian data): ``safe_open`` maps
the file, so the pages it touches count in the process's RSS on top of the copy it returns, and
``safetensors.torch.save_file`` first copies every tensor to ``bytes`` — each doubles a block's
footprint. The files are read back with ``safe_open`` by transformers and by the tests.
"""
from __future__ import annotations

import json
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from prunec.errors import InputError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
NAMES = {v: k for k, v in DTYPES.items()}


def _bytes(t: torch.Tensor) -> memoryview:
    """A contiguous tensor's storage as writable bytes (no copy)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def read_header(path: Path) -> tuple[dict, int]:
    """A safetensors file's header (name → dtype/shape/data_offsets) and where its data starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def read_tensors(path: Path, keys: Iterable[str]) -> dict[str, torch.Tensor]:
    """The named tensors of one safetensors file, each read straight into its own storage."""
    header, start = read_header(path)
    out = {}
    with open(path, "rb") as f:
        for key in keys:
            info = header[key]
            t = torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
            begin, end = info["data_offsets"]
            if t.numel():
                f.seek(start + begin)
                if f.readinto(_bytes(t)) != end - begin:
                    raise InputError(f"{path.name} is truncated at {key}", "copy the checkpoint again")
            out[key] = t
    return out


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file without copying the tensors (little-endian hosts)."""
    if sys.byteorder != "little":
        raise NotImplementedError("safetensors data is little-endian")
    header: dict = {"__metadata__": metadata}
    offset = 0
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        header[key] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for t in tensors.values():
            if t.numel():
                f.write(_bytes(t.detach().contiguous()))


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
            header, _ = read_header(folder / SINGLE)
            return cls(folder, {k: SINGLE for k in header if k != "__metadata__"})
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
            for key, t in read_tensors(self.folder / name, names).items():
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
        write_tensors(path, tensors, {"format": "pt"})
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
