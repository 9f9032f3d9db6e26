"""Data-parallel calibration: under ``torchrun`` / ``accelerate launch`` (an initialised
``torch.distributed`` group) each rank calibrates on its own shard of the data and the calibration
runners (``prunec.calib.collect`` / ``grad_sums`` / ``output_error``, ``prunec.sequential.forward_sums``)
all-reduce the statistics they accumulated, once, when they finish. Statistics are kept as sums and
counts (means are formed after the reduction), so every rank arrives at the statistics, and the plan,
of one process on the union of the shards, whatever the shards' sizes.

* ``process_group``: the CLI's group under ``torchrun`` (gloo, from the launcher's environment).
* ``world``: (rank, world size); (0, 1) without a process group.
* ``shard``: this rank's share of a list of calibration batches (every world-th, from rank).
* ``all_reduce_sum``: every number in a nest of dicts/lists/tuples summed over the ranks, in one
  collective (tensors, numpy arrays, ints and floats keep their types and shapes).
* ``all_gather_rows``: tensors concatenated over the ranks along dim 0 (ThiNet's sampled rows).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator, TypeVar

import numpy as np
import torch

from prunec.errors import InputError

T = TypeVar("T")


def has_group() -> bool:
    """Whether a default process group is initialised (of any size, one rank included)."""
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when there is none."""
    import torch.distributed as dist
    if has_group():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def process_group() -> Iterator[None]:
    """Under ``torchrun`` (WORLD_SIZE > 1 in the environment) and without a group yet: a gloo group for
    the duration (calibration statistics are reduced on the CPU); otherwise nothing."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True under an initialised process group of more than one rank."""
    return world()[1] > 1


def shard(batches: list[T]) -> list[T]:
    """This rank's calibration batches: ``batches[rank::world]`` (all of them in one process)."""
    rank, size = world()
    if size == 1:
        return batches
    if len(batches) < size:
        raise InputError(f"{len(batches)} calibration batch(es) cannot be shared by {size} processes",
                         f"draw at least {size} (--calib-samples) or run fewer processes")
    return batches[rank::size]


def _number(leaf: Any) -> bool:
    return isinstance(leaf, (torch.Tensor, np.ndarray, int, float)) and not isinstance(leaf, bool)


def _device() -> torch.device:
    import torch.distributed as dist
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _flatten(tree: Any, leaves: list[Any], sig: list[Any]) -> None:
    """Numeric leaves of ``tree`` in a rank-independent order, and a signature of the nest: dicts keyed
    by str/tuple are walked in key order, others (keys like ``id(obj)``) in insertion order."""
    if isinstance(tree, dict):
        items = list(tree.items())
        if all(isinstance(k, (str, tuple)) for k in tree):
            items.sort(key=lambda kv: repr(kv[0]))
            sig.append(("dict", [repr(k) for k, _ in items]))
        else:
            sig.append(("dict", len(items)))
        for _, v in items:
            _flatten(v, leaves, sig)
    elif isinstance(tree, (list, tuple)):
        sig.append((type(tree).__name__, len(tree)))
        for v in tree:
            _flatten(v, leaves, sig)
    elif _number(tree):
        leaves.append(tree)
        sig.append(tuple(np.shape(tree)))
    else:
        sig.append(type(tree).__name__)


def _rebuild(tree: Any, values: Any) -> Any:
    """``tree`` with its numeric leaves taken, in ``_flatten``'s order, from the iterator ``values``."""
    if isinstance(tree, dict):
        order = sorted(tree, key=repr) if all(isinstance(k, (str, tuple)) for k in tree) else list(tree)
        done = {k: _rebuild(tree[k], values) for k in order}
        return {k: done[k] for k in tree}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_rebuild(v, values) for v in tree)
    return next(values) if _number(tree) else tree


def all_reduce_sum(tree: T) -> T:
    """``tree`` (dicts, lists, tuples) with every numeric leaf replaced by its sum over the ranks, in
    one collective. Float64 on the wire; tensors, arrays, ints and floats keep type and shape (ints
    exact below 2**53). Returns ``tree`` itself in one process. Ranks whose nests differ (e.g. a shard
    that never reached a layer) get an InputError on every rank, not a hang or a silent mix-up."""
    if not is_distributed():
        return tree
    import torch.distributed as dist
    leaves: list[Any] = []
    sig: list[Any] = []
    _flatten(tree, leaves, sig)
    signatures: list[Any] = [None] * world()[1]
    dist.all_gather_object(signatures, sig)
    if any(s != signatures[0] for s in signatures):
        raise InputError("the ranks gathered different calibration statistics (a shard reached other "
                         "layers or shapes)", "give every process batches of the same kind")
    flat = [torch.as_tensor(leaf).detach().reshape(-1).to("cpu", torch.float64) for leaf in leaves]
    buffer = torch.cat(flat) if flat else torch.zeros(0, dtype=torch.float64)
    buffer = buffer.to(_device())
    dist.all_reduce(buffer)
    buffer = buffer.cpu()
    out, offset = [], 0
    for leaf in leaves:
        size = int(np.prod(np.shape(leaf)))
        part, offset = buffer[offset:offset + size].reshape(np.shape(leaf)), offset + size
        if isinstance(leaf, torch.Tensor):
            out.append(part.to(leaf.device, leaf.dtype))
        elif isinstance(leaf, np.ndarray):
            out.append(part.numpy().astype(leaf.dtype))
        else:
            out.append(int(round(float(part))) if isinstance(leaf, int) else float(part))
    return _rebuild(tree, iter(out))


def all_reduce_sum_(sums: dict[Any, Any]) -> dict[Any, Any]:
    """``all_reduce_sum`` written back into the dict ``sums`` (the runners' callers hold it)."""
    if is_distributed():
        sums.update(all_reduce_sum(dict(sums)))
    return sums


def global_mean(values: list[float]) -> float:
    """Mean of ``values`` over every rank's list (sum and count reduced, not a mean of means)."""
    total, count = all_reduce_sum([float(np.sum(values)) if values else 0.0, len(values)])
    return total / count if count else 0.0


def all_gather_rows(tensors: dict[Any, torch.Tensor]) -> dict[Any, torch.Tensor]:
    """Each tensor concatenated over the ranks along dim 0, in rank order (sizes may differ)."""
    if not is_distributed():
        return tensors
    import torch.distributed as dist
    gathered: list[Any] = [None] * world()[1]
    dist.all_gather_object(gathered, [t.cpu() for t in tensors.values()])
    return {k: torch.cat([part[i] for part in gathered]).to(t.device)
            for i, (k, t) in enumerate(tensors.items())}
