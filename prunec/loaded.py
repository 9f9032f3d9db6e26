"""What loading a MODEL spec gives: the module, its example inputs and a name."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from prunec.errors import InputError


@dataclass
class Loaded:
    model: torch.nn.Module
    example_inputs: tuple[Any, ...]
    name: str
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def parse_shape(text: str) -> tuple[int, ...]:
    """'1,3,224,224' → (1, 3, 224, 224)."""
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p.strip())
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise InputError(f"--input-shape '{text}' is not a list of positive integers",
                         "write it like --input-shape 1,3,224,224")
    return shape
