"""Sequential (block-by-block) calibration: each block of a model's block list is calibrated on the
outputs of the blocks before it *as already processed* (pruned, sparsified, refit), which is how
SparseGPT and llmcompressor calibrate LLMs one-shot. Works on the eager module with hooks:

* ``find_blocks``: the longest ``nn.ModuleList`` of same-type modules (an LLM's decoder layers).
* ``block_inputs``: the first block's positional and keyword inputs on every batch, captured by a
  forward pre-hook that stops the forward there (position embeddings, masks come along).
* ``run_sequential``: hands each block its inputs, lets the caller process it (in place), then runs
  the processed block to make the next block's inputs.
* ``forward_sums``: runs batches through a module with forward hooks on some of its layers that add
  each layer's input into running sums, all-reduced across ranks at the end (``prunec.distributed``).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from prunec.distributed import all_reduce_sum_

Call = tuple[tuple[Any, ...], dict[str, Any]]


class _Stop(Exception):
    """Raised by the capture hook to end a forward at the first block."""


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, block) of the longest ModuleList whose members share one type; [] if none has ≥ 2."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 1 and len({type(m) for m in mod}) == 1:
            if best is None or len(mod) > len(best[1]):
                best = (name, mod)
    return [(f"{best[0]}.{i}" if best[0] else str(i), m) for i, m in enumerate(best[1])] if best else []


def block_inputs(model: nn.Module, first: nn.Module, batches: Iterable[Call]) -> list[Call]:
    """The inputs ``first`` receives on each batch (the forward stops there)."""
    captured: list[Call] = []

    def grab(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((tuple(args), dict(kwargs)))
        raise _Stop

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for args, kwargs in batches:
                try:
                    model(*args, **kwargs)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return captured


def _next_inputs(call: Call, output: Any) -> Call:
    """The same call with the block's hidden-state input replaced by its output."""
    hidden = output[0] if isinstance(output, (tuple, list)) else output
    args, kwargs = call
    if args:
        return (hidden, *args[1:]), kwargs
    key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
    return args, {**kwargs, key: hidden}


def run_sequential(model: nn.Module, batches: Iterable[Call],
                   process: Callable[[str, nn.Module, list[Call]], nn.Module | None]) -> list[str]:
    """Call ``process(path, block, inputs)`` for each block in order, ``inputs`` computed by the
    processed blocks before it: the block as ``process`` left it, or the module it returns (a
    processed copy). Returns the block paths (empty: no block list, nothing done)."""
    blocks = find_blocks(model)
    if not blocks:
        return []
    inputs = block_inputs(model, blocks[0][1], batches)
    for path, block in blocks:
        done = process(path, block, inputs) or block
        with torch.no_grad():
            inputs = [_next_inputs(call, done(*call[0], **call[1])) for call in inputs]
    return [path for path, _ in blocks]


def forward_sums(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[Call],
                 add: Callable[[str, nn.Module, torch.Tensor], None], sums: dict[str, Any]) -> dict[str, Any]:
    """Run ``batches`` through ``model`` (no autograd); each time a module of ``layers`` runs,
    ``add(name, module, its first input)`` updates ``sums``, which is then all-reduced across ranks."""
    def hook(name: str) -> Callable[..., None]:
        def fn(mod: nn.Module, args: tuple[Any, ...], _out: Any) -> None:
            add(name, mod, args[0])
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            for args, kwargs in batches:
                model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return all_reduce_sum_(sums)
