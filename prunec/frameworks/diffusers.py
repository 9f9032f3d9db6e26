"""diffusers: UNet2DModel / UNet2DConditionModel / AutoencoderKL stay the user's class when pruned.

Module attributes follow the sliced tensors (``Upsample2D``/``Downsample2D`` ``channels``,
``ResnetBlock2D`` widths, ``Attention`` ``heads``/``inner_dim``, ``Transformer2DModel``
``inner_dim``); GroupNorm groups follow through the core table. With the config-expressible plan
(``passes.NativeConfig``, compile's default for the classes in ``NATIVE``) the model's config
follows too (``sync_config``), so diffusers' own ``from_pretrained`` reloads ``save_pretrained``'s
folder; a freer plan reloads through ``from_pretrained`` here. ``check_config`` names the first
tensor or attribute the config can't express.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunec.errors import InputError
from prunec.module_sync import module_sync, sync_constraint


def _conv_of(m: nn.Module) -> nn.Module | None:
    conv = getattr(m, "conv", None) or getattr(m, "Conv2d_0", None)
    return conv if isinstance(conv, (nn.Conv1d, nn.Conv2d, nn.ConvTranspose1d, nn.ConvTranspose2d)) else None


def sync_sampler(m: nn.Module) -> None:
    """Up/Downsample2D assert ``x.shape[1] == channels``: take it from their conv."""
    conv = _conv_of(m)
    if conv is None:
        return  # no weights: the parent block sets channels (sync_block)
    transposed = isinstance(conv, (nn.ConvTranspose1d, nn.ConvTranspose2d))
    m.channels = conv.weight.shape[0] if transposed else conv.weight.shape[1] * conv.groups
    m.out_channels = conv.weight.shape[1] * conv.groups if transposed else conv.weight.shape[0]


def sync_resnet(m: nn.Module) -> None:
    """ResnetBlock2D: in/out widths of its convs."""
    m.in_channels = m.conv1.in_channels
    m.out_channels = m.conv2.out_channels


def sync_block(m: nn.Module) -> None:
    """A down/up/mid block: weightless samplers take the width of the block's last resnet."""
    resnets = getattr(m, "resnets", None)
    if not resnets:
        return
    width = resnets[-1].conv2.out_channels
    for name in ("downsamplers", "upsamplers"):
        for s in getattr(m, name, None) or []:
            if _conv_of(s) is None and hasattr(s, "channels"):
                s.channels = s.out_channels = width


def sync_attention(m: nn.Module) -> None:
    """Attention: heads of the original ``dim_head`` in to_q; processors read ``heads``."""
    dim_head = m.inner_dim // m.heads
    q = m.to_q.weight.shape[0]
    if q % dim_head:
        raise ValueError(f"Attention.heads: to_q keeps {q} features, not whole heads of {dim_head}")
    m.heads = q // dim_head
    m.inner_dim = q
    m.inner_kv_dim = m.to_k.weight.shape[0]
    m.query_dim = m.to_q.weight.shape[1]
    m.out_dim = m.to_out[0].weight.shape[0]


def attention_whole(m: nn.Module, path: str, by_member: dict, whole: set) -> dict[str, str]:
    """Processors view q, k and v with one ``head_dim`` (from k): v's width can only change by
    whole heads, together with q and k."""
    q_groups = set(by_member.get((f"{path}.to_q.weight", 0), []))
    return {g: "heads: processors view v with k's head_dim, so v keeps whole heads of q/k"
            for g in by_member.get((f"{path}.to_v.weight", 0), []) if g not in q_groups}


def sync_transformer(m: nn.Module) -> None:
    """Transformer2DModel: ``in_channels``/``inner_dim`` from proj_in, ``out_channels`` from proj_out."""
    m.in_channels = m.proj_in.weight.shape[1]
    m.inner_dim = m.proj_in.weight.shape[0]
    m.out_channels = m.proj_out.weight.shape[0]


# Per class, the config entries that set inner widths, as axes the plan may move independently:
# ("groups", keys): entries that scale with the kept fraction of GroupNorm groups (``norm_num_groups``
# is one count for every GroupNorm and a GroupNorm'd dim loses whole groups, so all such dims keep
# the same fraction): block widths and, where an entry counts heads (not their width), heads.
# ("width", key, default, tensor): one width of its own, dim 0 of ``tensor``, e.g. the time-embedding
# MLP (default 4 × block 0).
Axis = tuple
NATIVE: dict[str, tuple[Axis, ...]] = {
    "UNet2DModel": (("groups", ("block_out_channels", "norm_num_groups")),  # attention_head_dim: a width
                    ("width", "time_embedding_dim", lambda c: 4 * c["block_out_channels"][0],
                     "time_embedding.linear_1.weight")),
    "UNet2DConditionModel": (("groups", ("block_out_channels", "norm_num_groups", "attention_head_dim",
                                         "num_attention_heads")),  # attention_head_dim: a head count
                             ("width", "time_embedding_dim", lambda c: 4 * c["block_out_channels"][0],
                              "time_embedding.linear_1.weight")),
    "AutoencoderKL": (("groups", ("block_out_channels", "norm_num_groups")),),
}


def native_axes(model: nn.Module, fraction: float, tries: int = 12) -> list[list[tuple[float, dict[str, Any]]]]:
    """Per axis of ``NATIVE``, up to ``tries`` (kept fraction, config overrides) the config expresses,
    nearest ``fraction`` first (ties keep more); [] for a class without rules."""
    config = dict(getattr(model, "config", {}) or {})
    out = []
    for axis in NATIVE.get(type(model).__name__, ()):
        if axis[0] == "groups":
            options = _group_options(config, axis[1])
        else:
            width = config.get(axis[1]) or axis[2](config)
            options = [(k / width, {axis[1]: k}) for k in range(1, width)]
        out.append(sorted(options, key=lambda o: (abs(o[0] - fraction), -o[0]))[:tries])
    return out


def _group_options(config: dict[str, Any], keys: tuple[str, ...]) -> list[tuple[float, dict[str, Any]]]:
    groups = config.get("norm_num_groups")
    if not isinstance(groups, int):
        return []
    out = []
    for kept in range(groups - 1, 0, -1):
        overrides: dict[str, Any] = {}
        for key in keys:
            if config.get(key) is None:
                continue  # e.g. num_attention_heads unset: attention_head_dim counts the heads
            scaled = _scaled(config[key], kept, groups)
            if scaled is None:
                break
            overrides[key] = scaled
        else:
            out.append((kept / groups, overrides))
    return out


def _scaled(value: Any, kept: int, of: int) -> Any:
    """``value`` (an int or a tuple/list of ints) × kept/of, or None if not whole."""
    if isinstance(value, int):
        return value * kept // of if value * kept % of == 0 else None
    items = [_scaled(v, kept, of) for v in value]
    return None if any(v is None for v in items) else type(value)(items)


def built(model: nn.Module, overrides: dict[str, Any]) -> nn.Module:
    """The model ``type(model).from_config`` builds with ``overrides``, on the meta device (no memory)."""
    config = {**_explicit(model.config, overrides), **overrides}
    with torch.device("meta"):
        return type(model).from_config(config)


def _explicit(config: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the overridden keys out of ``_use_default_values`` (which from_config rebuilds
    from their defaults, ignoring the stored value)."""
    out = dict(config)
    if "_use_default_values" in out:
        out["_use_default_values"] = [k for k in out["_use_default_values"] if k not in overrides]
    return out


def sync_config(m: nn.Module) -> None:
    """A diffusers model: ``register_to_config`` the widths of ``NATIVE`` its pruned tensors match
    (only the config-expressible plan does); otherwise the config stays (see ``from_pretrained``)."""
    state = m.state_dict()
    config = dict(m.config)
    norms = {g.num_groups for g in m.modules() if isinstance(g, nn.GroupNorm)}
    choices: list[list[dict[str, Any]]] = []
    for axis in NATIVE.get(type(m).__name__, ()):
        if axis[0] == "groups":  # the pruned GroupNorms hold norm_num_groups' groups
            choices.append([o for f, o in _group_options(config, axis[1]) if o["norm_num_groups"] in norms])
        elif axis[3] in state and state[axis[3]].shape[0] != (config.get(axis[1]) or axis[2](config)):
            choices.append([{axis[1]: state[axis[3]].shape[0]}])
    for combo in itertools.product(*[c + [{}] for c in choices]):
        overrides = {k: v for o in combo for k, v in o.items()}
        if overrides and not _mismatches(built(m, overrides).state_dict(), state):
            defaults = _explicit(m.config, overrides).get("_use_default_values")
            m.register_to_config(**overrides, **({"_use_default_values": defaults} if defaults is not None else {}))
            return


def _mismatches(fresh: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> int:
    """State tensors whose shape ``fresh`` (a built model's state dict) doesn't hold."""
    return sum(1 for n, t in state.items() if n not in fresh or fresh[n].shape != t.shape)


def register() -> None:
    """Add the diffusers classes of this install to the module_sync table."""
    from diffusers.models import downsampling, resnet, upsampling
    from diffusers.models.attention_processor import Attention
    module_sync(*[getattr(upsampling, n) for n in ("Upsample1D", "Upsample2D") if hasattr(upsampling, n)],
                *[getattr(downsampling, n) for n in ("Downsample1D", "Downsample2D")
                  if hasattr(downsampling, n)])(sync_sampler)
    module_sync(resnet.ResnetBlock2D)(sync_resnet)
    module_sync(Attention)(sync_attention)
    sync_constraint(Attention)(attention_whole)
    try:
        from diffusers.models.transformers.transformer_2d import Transformer2DModel
        module_sync(Transformer2DModel)(sync_transformer)
    except ImportError:
        pass
    from diffusers.models.unets import unet_2d_blocks
    from diffusers.models.autoencoders import vae
    blocks = [c for module in (unet_2d_blocks, vae) for c in vars(module).values()
              if isinstance(c, type) and issubclass(c, nn.Module) and c.__module__ == module.__name__
              and c.__name__.endswith("Block2D")]
    module_sync(*blocks)(sync_block)
    from diffusers.models.modeling_utils import ModelMixin
    module_sync(ModelMixin)(sync_config)


def from_pretrained(cls: type, path: str | Path, **kwargs: Any) -> nn.Module:
    """Reload a pruned model written by diffusers' ``save_pretrained``: build the dense model
    from the saved (original) config, give it the saved tensors' shapes through the same
    attribute table as compile, then load the weights (strict).

    ``cls.from_pretrained`` itself can't: ``block_out_channels`` is one width per level, while a
    pruned UNet keeps different widths inside a level (resnet hidden convs, GroupNorm-tied skips)."""
    from safetensors.torch import load_file
    from prunec.module_sync import synced_copy
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not (path / "config.json").is_file() or not files:
        raise InputError(f"{path} is not a diffusers model folder (config.json + *.safetensors)",
                         "pass the folder written by save_pretrained(..., safe_serialization=True)")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    dense = cls.from_config(cls.load_config(path), **kwargs)
    model = synced_copy(dense, state)
    model.load_state_dict(state, strict=True)
    return model.eval()


_ATTRS = ("num_groups", "heads", "scale", "inner_dim")  # what forward reads besides the tensors


def check_config(model: nn.Module) -> str:
    """'' if ``type(model).from_config(model.config)`` holds the pruned state dict and builds the same
    GroupNorm groups and attention heads, else the first tensor or attribute the config can't express."""
    try:
        fresh = type(model).from_config(model.config)
    except (ValueError, TypeError, RuntimeError, AssertionError) as err:
        return f"config cannot build the model: {type(err).__name__}: {str(err)[:200]}"
    theirs = fresh.state_dict()
    for name, t in model.state_dict().items():
        if name not in theirs:
            return f"config cannot express the pruned model: no {name} in a model built from it"
        if theirs[name].shape != t.shape:
            return (f"config cannot express {name}: pruned {tuple(t.shape)}, "
                    f"config builds {tuple(theirs[name].shape)}")
    built_modules = dict(fresh.named_modules())
    for path, mod in model.named_modules():
        other = built_modules.get(path)
        for attr in _ATTRS:
            if other is not None and hasattr(mod, attr) and getattr(mod, attr) != getattr(other, attr, None):
                return (f"config cannot express {path}.{attr}: pruned {getattr(mod, attr)}, "
                        f"config builds {getattr(other, attr, None)}")
    return ""
