"""Cost model: parameters and MACs (torch.utils.flop_counter)."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_macs(module: torch.nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> int:
    """Multiply-accumulates of one forward (FLOPs / 2 as torch counts them)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs, **(kwargs or {}))
    return counter.get_total_flops() // 2
