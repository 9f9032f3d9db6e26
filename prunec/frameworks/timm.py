"""timm: attention head counts, and the split sizes that res2net / CSP / SK / TResNet blocks keep."""
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


def register() -> None:
    """Add the timm classes of this install to the module_sync table."""
    from timm.layers.attention import Attention
    module_sync(Attention)(sync_attention)
    try:
        from timm.models.swin_transformer import WindowAttention
        module_sync(WindowAttention)(sync_attention)
    except ImportError:
        pass
