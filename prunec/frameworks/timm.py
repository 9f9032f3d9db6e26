"""timm: attention head counts, and the split sizes / widths that res2net (``Bottle2neck.width``),
CSPNet (``CrossStage.expand_chs``), MixNet (``MixedConv2d.splits``), SK (``SelectiveKernel.in_channels``) and TResNet
(``BlurPool2d.channels``) keep in attributes their forward reads."""
from __future__ import annotations

from torch import nn

from prunec.module_sync import module_sync


def sync_attention(m: nn.Module) -> None:
    """timm (Window)Attention: qkv = Linear(dim, 3 · num_heads · head_dim)."""
    head_dim = getattr(m, "head_dim", None)
    if head_dim is None:  # Swin: head_dim is implied by the relative-position table's heads
        m.num_heads = m.relative_position_bias_table.shape[1]
        return
    m.num_heads = m.qkv.weight.shape[0] // (3 * head_dim)
    if hasattr(m, "attn_dim"):
        m.attn_dim = m.num_heads * head_dim


def sync_bottle2neck(m: nn.Module) -> None:
    """res2net ``Bottle2neck``: ``torch.split(conv1(x), width)`` into ``scale`` equal pieces."""
    pieces = [c.in_channels for c in m.convs]
    if m.scale > 1:
        pieces.append(m.conv1.out_channels - sum(pieces))
    if len(set(pieces)) > 1:
        raise ValueError(f"Bottle2neck.width: split pieces kept {pieces} channels, "
                         "but its forward splits conv1's output into equal pieces of width")
    m.width = pieces[0]


def _first_conv_in(mod: nn.Module) -> int:
    return next(m.in_channels for m in mod.modules() if isinstance(m, nn.Conv2d))


def sync_cross_stage(m: nn.Module) -> None:
    """cspnet ``CrossStage(3)``: ``conv_exp(x).split(expand_chs // 2)`` into two equal halves."""
    total = next(c for c in m.conv_exp.modules() if isinstance(c, nn.Conv2d)).out_channels
    half = _first_conv_in(m.blocks)
    if 2 * half != total:
        raise ValueError(f"{type(m).__name__}.expand_chs: conv_exp's halves kept {total - half} and {half} "
                         "channels, but its forward splits them equally (split(expand_chs // 2))")
    m.expand_chs = total


def sync_selective_kernel(m: nn.Module) -> None:
    """``SelectiveKernel``: the input is split into ``num_paths`` equal pieces of in_channels."""
    pieces = [_first_conv_in(p) for p in m.paths]
    if m.split_input and len(set(pieces)) > 1:
        raise ValueError(f"SelectiveKernel.in_channels: path inputs kept {pieces} channels, "
                         "but its forward splits the input equally")
    m.in_channels = sum(pieces) if m.split_input else pieces[0]
    m.out_channels = next(c for c in m.paths[0].modules() if isinstance(c, nn.Conv2d)).out_channels


def sync_blur_pool(m: nn.Module) -> None:
    """``BlurPool2d`` (TResNet): a depthwise blur with one filter per channel in ``filt``."""
    if m.channels is not None:
        m.channels = m.filt.shape[0]


def sync_mixed_conv(m: nn.Module) -> None:
    """``MixedConv2d`` (MixNet): ``torch.split(x, splits)`` over one conv per kernel size."""
    convs = list(m.values())
    m.splits = [c.in_channels for c in convs]
    m.in_channels = sum(m.splits)
    m.out_channels = sum(c.out_channels for c in convs)


def register() -> None:
    """Add the timm classes of this install to the module_sync table."""
    from timm.layers.attention import Attention
    module_sync(Attention)(sync_attention)
    from timm.layers.blur_pool import BlurPool2d
    from timm.layers.mixed_conv2d import MixedConv2d
    from timm.layers.selective_kernel import SelectiveKernel
    from timm.models import cspnet, res2net
    module_sync(res2net.Bottle2neck)(sync_bottle2neck)
    module_sync(cspnet.CrossStage, cspnet.CrossStage3)(sync_cross_stage)
    module_sync(SelectiveKernel)(sync_selective_kernel)
    module_sync(BlurPool2d)(sync_blur_pool)
    module_sync(MixedConv2d)(sync_mixed_conv)
    try:
        from timm.models.swin_transformer import WindowAttention
        module_sync(WindowAttention)(sync_attention)
    except ImportError:
        pass
