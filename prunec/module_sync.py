"""Keep the user's nn.Module in sync with the pruned program: new tensors + module attributes."""
from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from prunec import hf
from prunec.errors import InputError

Sync = Callable[[nn.Module], None]
SYNC: dict[type, Sync] = {}
# A class whose forward can't follow some pruned dims names the groups to keep whole:
# (module, its path, groups by member (fqn, dim), groups already kept whole) → {group: reason}
Constraint = Callable[[nn.Module, str, dict, set], dict[str, str]]
CONSTRAINTS: dict[type, Constraint] = {}


def module_sync(*types: type) -> Callable[[Sync], Sync]:
    """Register how a module type's attributes follow its (already sliced) tensors."""
    def wrap(fn: Sync) -> Sync:
        for t in types:
            SYNC[t] = fn
        return fn
    return wrap


def _weight_shape(m: nn.Module) -> torch.Size:
    """The weight's shape, also under the hook-based weight_norm/spectral_norm, whose ``weight``
    attribute is only recomputed on the next forward (the parametrized ``weight`` is live)."""
    if isinstance(getattr(m, "weight_g", None), torch.Tensor):  # weight_norm: weight_v is the weight
        return m.weight_v.shape
    if isinstance(getattr(m, "weight_orig", None), torch.Tensor):  # spectral_norm
        return m.weight_orig.shape
    return m.weight.shape


def sync_constraint(*types: type) -> Callable[[Constraint], Constraint]:
    """Register which groups a module type needs kept whole for its attributes to follow."""
    def wrap(fn: Constraint) -> Constraint:
        for t in types:
            CONSTRAINTS[t] = fn
        return fn
    return wrap


def keep_whole(model: nn.Module, coupling: Any) -> dict[str, str]:
    """Take out of ``coupling.groups`` (into ``coupling.frozen``) the groups the model's classes
    can't express pruned, so the pruned model stays the user's class. Returns group → reason."""
    _register_optional()
    by_member: dict[tuple[str, int], list[str]] = {}
    for g in coupling.groups:
        for member in g.members:
            by_member.setdefault(member, []).append(g.name)
    whole: dict[str, str] = {}
    for _ in range(4):  # a kept-whole group can force its neighbours (both halves of a split)
        before = len(whole)
        for path, mod in model.named_modules():
            rule = next((CONSTRAINTS[t] for t in type(mod).__mro__ if t in CONSTRAINTS), None)
            if rule is not None:
                for name, reason in rule(mod, path, by_member, set(whole)).items():
                    whole.setdefault(name, f"{path} ({type(mod).__name__}): {reason}")
        if len(whole) == before:
            break
    for g in coupling.groups:
        if g.name in whole:
            coupling.frozen.update({f"{fqn}@{dim}": whole[g.name] for fqn, dim in g.members})
    coupling.groups = [g for g in coupling.groups if g.name not in whole]
    return whole


def _sync_grouped(m: nn.Module, lead: str, follow: str) -> None:
    """``lead``: the channels on the weight's dim 0; whole groups go, so ``groups`` follows them."""
    shape = _weight_shape(m)
    old = getattr(m, lead)
    setattr(m, lead, shape[0])
    m.groups = m.groups * shape[0] // old if m.groups > 1 else 1
    setattr(m, follow, shape[1] * m.groups)


@module_sync(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(m: nn.Conv2d) -> None:
    """Weight (out, in/groups, k…)."""
    _sync_grouped(m, "out_channels", "in_channels")


@module_sync(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _conv_transpose(m: nn.ConvTranspose2d) -> None:
    """Weight (in, out/groups, k…)."""
    _sync_grouped(m, "in_channels", "out_channels")


@module_sync(nn.PReLU)
def _prelu(m: nn.PReLU) -> None:
    m.num_parameters = m.weight.numel()


@module_sync(nn.RNNCellBase)
def _recurrent_cell(m: nn.RNNCellBase) -> None:
    m.hidden_size = m.weight_hh.shape[1]
    m.input_size = m.weight_ih.shape[1]


@module_sync(nn.RNNBase)
def _recurrent(m: nn.RNNBase) -> None:
    """LSTM/GRU/RNN: sizes from layer 0's weights; the flat weight list is rebuilt."""
    m.hidden_size = m.weight_hh_l0.shape[1]
    m.input_size = m.weight_ih_l0.shape[1]
    m._init_flat_weights()


@module_sync(nn.Linear)
def _linear(m: nn.Linear) -> None:
    m.out_features, m.in_features = _weight_shape(m)


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


FRAMEWORKS = {  # imported package → module whose register() adds its classes to the table
    "timm": "prunec.frameworks.timm",
    "ultralytics": "prunec.frameworks.ultralytics",
    "diffusers": "prunec.frameworks.diffusers",
}
_REGISTERED: set[str] = set()


def _register_optional() -> None:
    """Table entries for libraries the model came from (only those already imported)."""
    import importlib
    for package, module in FRAMEWORKS.items():
        if package in sys.modules and package not in _REGISTERED:
            _REGISTERED.add(package)
            try:
                importlib.import_module(module).register()
            except (ImportError, AttributeError):  # another version of the framework: generic path only
                pass
    if "transformers" in sys.modules and "transformers" not in _REGISTERED:
        _REGISTERED.add("transformers")
        for cls, fn in hf.updaters().items():  # hf imports no module_sync: no import cycle
            SYNC.setdefault(cls, fn)


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
    for mod in model.modules():  # hook-based weight_norm/spectral_norm keep a non-leaf `weight`
        for value in vars(mod).values():  # that deepcopy refuses; the next forward recomputes it
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                memo[id(value)] = value.detach()
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


def load_pruned(model: nn.Module, weights: str | Path | dict[str, torch.Tensor]) -> nn.Module:
    """A copy of the dense ``model`` (same class and config as the one pruned) holding the pruned
    ``weights`` (a safetensors file or a state dict): each module gets the saved tensors' shapes through
    the same attribute table as compile, then the weights are loaded strictly. No pickle is read."""
    if not isinstance(weights, dict):
        from safetensors.torch import load_file
        weights = load_file(str(weights))
    try:
        new = synced_copy(model, weights)
        new.load_state_dict(weights, strict=True)
    except (ValueError, RuntimeError) as err:
        raise InputError(f"the pruned weights do not fit {type(model).__name__}: {str(err).strip()[:200]}",
                         "pass the dense model the weights were pruned from (same class and config)") from None
    return new.eval()
