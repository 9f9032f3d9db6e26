"""Keep the user's nn.Module in sync with the pruned program: new tensors + module attributes."""
from __future__ import annotations

import copy
import sys
from typing import Callable

import torch
from torch import nn

from prunec import hf
from prunec.registry import Registry

Sync = Callable[[nn.Module], None]
SYNC: Registry = Registry("module-sync updater")  # module type → updater


def module_sync(*types: type) -> Callable[[Sync], Sync]:
    """Register how a module type's attributes follow its (already sliced) tensors."""
    return SYNC.register(*types)


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


def _timm_attention(m: nn.Module) -> None:
    """timm (Window)Attention: qkv = Linear(dim, 3 · num_heads · head_dim)."""
    head_dim = getattr(m, "head_dim", None)
    if head_dim is None:  # Swin: head_dim is implied by the relative-position table's heads
        head_dim = m.qkv.weight.shape[0] // (3 * m.num_heads)
        m.num_heads = m.relative_position_bias_table.shape[1]
        return
    m.num_heads = m.qkv.weight.shape[0] // (3 * head_dim)
    if hasattr(m, "attn_dim"):
        m.attn_dim = m.num_heads * head_dim


def _register_optional() -> None:
    """Table entries for libraries the model came from (only those already imported)."""
    if "timm" in sys.modules:
        from timm.layers.attention import Attention
        SYNC.setdefault(Attention, _timm_attention)
        try:
            from timm.models.swin_transformer import WindowAttention
            SYNC.setdefault(WindowAttention, _timm_attention)
        except ImportError:
            pass
    if "transformers" in sys.modules and not _REGISTERED:
        for cls, fn in hf.updaters().items():
            SYNC.setdefault(cls, fn)
        _REGISTERED.append(True)


_REGISTERED: list[bool] = []


def _drop_blocks(model: nn.Module, blocks: list[str]) -> list[int] | None:
    """Remove whole blocks from their ModuleList/Sequential; renumber ``layer_idx`` after them.
    Returns the kept positions in the (last) container touched, or None if nothing was removed."""
    by_parent: dict[str, set[str]] = {}
    for path in blocks:
        parent, _, child = path.rpartition(".")
        by_parent.setdefault(parent, set()).add(child)
    kept_positions = None
    for parent_path, children in by_parent.items():
        parent = model.get_submodule(parent_path)
        if not isinstance(parent, (nn.ModuleList, nn.Sequential)):
            raise ValueError(f"dropped block's parent {parent_path or '<top>'} is a "
                             f"{type(parent).__name__}, not a ModuleList/Sequential")
        names = list(parent._modules)
        kept_positions = [i for i, n in enumerate(names) if n not in children]
        kept = [(n, parent._modules[n]) for n in names if n not in children]
        parent._modules.clear()
        renumber = isinstance(parent, nn.ModuleList) or all(n.isdigit() for n, _ in kept)
        for i, (n, mod) in enumerate(kept):
            parent._modules[str(i) if renumber else n] = mod
            for sub in mod.modules():
                if isinstance(getattr(sub, "layer_idx", None), int):
                    sub.layer_idx = i
    return kept_positions


def synced_copy(model: nn.Module, state: dict[str, torch.Tensor],
                dropped_blocks: list[str] | None = None) -> nn.Module:
    """A copy of ``model`` holding the pruned tensors, with module attributes updated, and the
    ``dropped_blocks`` (module paths of fully dropped residual blocks) removed from their lists.
    Raises ValueError naming the module when a module type can't express the new shapes."""
    _register_optional()
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
    for owner in list(changed_owners):  # parents too: attention modules own no weight of their own
        while owner:
            owner = owner.rpartition(".")[0]
            changed_owners.add(owner)
    for owner in sorted(changed_owners, key=lambda o: (-o.count("."), o)):
        mod = new.get_submodule(owner)
        sync = next((SYNC[t] for t in type(mod).__mro__ if t in SYNC), None)
        if sync is not None:
            try:
                sync(mod)
            except ValueError as err:
                raise ValueError(f"{owner or '<top>'} ({type(mod).__name__}): {err}") from None
    kept_layers = _drop_blocks(new, dropped_blocks) if dropped_blocks else None
    if hasattr(new, "config") and type(new).__module__.startswith("transformers"):
        hf.sync_config(new, kept_layers)
    return new
