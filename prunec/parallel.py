"""Where recovery runs: the device, and DDP or FSDP under ``torchrun``/``accelerate launch``.

Nothing here starts processes: an engine (``torchrun``, ``accelerate``) does, and initialises the
``torch.distributed`` group; recovery only asks for its rank and size. DDP replicates the student
on every rank. FSDP (``fsdp=True``) trains a sharded copy (``torch.distributed.fsdp.fully_shard``,
one unit per block of every ``nn.ModuleList`` plus the root), built from a meta-device copy so no
rank holds two full replicas on the device; the trained weights are gathered back into the
student, which stays the user's plain module.
"""
from __future__ import annotations

import copy
import os
from itertools import chain
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from prunec.distributed import is_distributed


def pick_device(requested: str | torch.device | None, student: nn.Module) -> torch.device:
    """``requested``; under a process group with CUDA, ``cuda:$LOCAL_RANK``; else the student's device."""
    if requested is not None:
        return torch.device(requested)
    if is_distributed() and torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    first = next(chain(student.parameters(), student.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def to_device(tree: Any, device: torch.device) -> Any:
    """Every tensor of a batch (any nesting) on ``device``."""
    return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, tree)


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)


def fsdp_copy(student: nn.Module, device: torch.device) -> nn.Module:
    """A sharded training copy of ``student`` on ``device``, holding the student's current weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.fsdp import fully_shard
    sharded = _meta_copy(student)
    for blocks in [m for m in sharded.modules() if isinstance(m, nn.ModuleList)]:
        for block in blocks:
            if any(p.requires_grad for p in block.parameters()):
                fully_shard(block)
    fully_shard(sharded)
    sharded.to_empty(device=device)
    set_model_state_dict(sharded, student.state_dict(), options=StateDictOptions(full_state_dict=True))
    for name, buffer in student.named_buffers():  # non-persistent buffers are not in the state dict
        sharded.get_buffer(name).copy_(buffer)
    return sharded


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict of a plain or FSDP-sharded module (a collective call under FSDP)."""
    if not _is_fsdp(model):
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))


def load_full_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a whole state dict into a plain or FSDP-sharded module."""
    if not _is_fsdp(model):
        model.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def optimizer_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's whole state (gathered under FSDP, so one file resumes any world size)."""
    if not _is_fsdp(model):
        return opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    if not _is_fsdp(model):
        opt.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(model, opt, state, options=StateDictOptions(full_state_dict=True))


def _is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


def _meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters and buffers are on the meta device (ties kept)."""
    memo: dict[int, Any] = {}
    for t in chain(module.parameters(), module.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo)
