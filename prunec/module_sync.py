"""Keep the user's nn.Module in sync with the pruned program: new tensors + module attributes."""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

Sync = Callable[[nn.Module], None]
SYNC: dict[type, Sync] = {}


def module_sync(*types: type) -> Callable[[Sync], Sync]:
    """Register how a module type's attributes follow its (already sliced) tensors."""
    def wrap(fn: Sync) -> Sync:
        for t in types:
            SYNC[t] = fn
        return fn
    return wrap


@module_sync(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(m: nn.Conv2d) -> None:
    old_out = m.out_channels
    m.out_channels = m.weight.shape[0]
    m.groups = m.groups * m.out_channels // old_out if m.groups > 1 else 1
    m.in_channels = m.weight.shape[1] * m.groups


@module_sync(nn.Linear)
def _linear(m: nn.Linear) -> None:
    m.out_features, m.in_features = m.weight.shape


@module_sync(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d)
def _batch_norm(m: nn.BatchNorm2d) -> None:
    ref = m.weight if m.weight is not None else m.running_mean
    if ref is not None:
        m.num_features = ref.shape[0]


@module_sync(nn.LayerNorm)
def _layer_norm(m: nn.LayerNorm) -> None:
    if m.weight is not None:
        m.normalized_shape = tuple(m.weight.shape)


@module_sync(nn.GroupNorm)
def _group_norm(m: nn.GroupNorm) -> None:
    old = m.num_channels
    m.num_channels = m.weight.shape[0]
    m.num_groups = m.num_groups * m.num_channels // old


@module_sync(nn.Embedding)
def _embedding(m: nn.Embedding) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


@module_sync(nn.MultiheadAttention)
def _mha(m: nn.MultiheadAttention) -> None:
    raise ValueError("nn.MultiheadAttention cannot express a pruned head or embedding dim")


def synced_copy(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` holding the pruned tensors, with module attributes updated.
    Raises ValueError naming the module when a module type can't express the new shapes."""
    memo: dict[int, object] = {}
    changed_owners: set[str] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if name in state:
            memo[id(p)] = nn.Parameter(state[name], requires_grad=p.requires_grad)
            if state[name].shape != p.shape:
                changed_owners.add(name.rpartition(".")[0])
    for name, b in model.named_buffers(remove_duplicate=False):
        if name in state:
            memo[id(b)] = state[name]
            if state[name].shape != b.shape:
                changed_owners.add(name.rpartition(".")[0])
    new = copy.deepcopy(model, memo)
    for owner in sorted(changed_owners):
        mod = new.get_submodule(owner)
        sync = next((fn for t, fn in SYNC.items() if type(mod) is t), None)
        if sync is not None:
            try:
                sync(mod)
            except ValueError as err:
                raise ValueError(f"{owner or '<top>'} ({type(mod).__name__}): {err}") from None
    return new
