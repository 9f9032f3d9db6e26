"""ultralytics YOLO (v8, 11): the pruned ``DetectionModel``/``SegmentationModel`` stays the user's class.

Blocks that split ``cv1``'s output in two equal halves (``C2f``, ``C3k2``, ``C2PSA``, ``PSA``,
``RepNCSPELAN4``…) keep their width in ``self.c``; PSA ``Attention`` keeps ``head_dim``/``key_dim``;
``Segment`` keeps the proto width ``npr``. ``save_checkpoint`` writes a ``.pt`` that ``YOLO(path)``
loads, and ``trainer`` gives a trainer class that trains the pruned module instead of rebuilding
the dense one from ``model.yaml`` (which can't express per-layer pruned widths).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from prunec.module_sync import module_sync, sync_constraint


def _first_conv_in(mod: nn.Module) -> int | None:
    """Input channels of the first ungrouped conv inside ``mod`` (the second half's consumer)."""
    for m in mod.modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1:
            return m.in_channels
    return None


def sync_split_block(m: nn.Module) -> None:
    """``y = cv1(x).chunk(2, 1)`` / ``.split((c, c), 1)``: both halves must keep ``c`` channels."""
    total = m.cv1.conv.out_channels
    consumer = getattr(m, "m", None)
    if consumer is None:
        consumer = getattr(m, "attn", None)
    second = _first_conv_in(consumer) if consumer is not None else None
    second = total // 2 if second is None else second
    if total - second != second:
        raise ValueError(f"{type(m).__name__}.c: cv1's halves kept {total - second} and {second} channels, "
                         "but its forward splits cv1 into two equal halves (chunk(2) / split((c, c)))")
    m.c = second


def sync_attention(m: nn.Module) -> None:
    """PSA attention: qkv = num_heads · (2 · key_dim + head_dim) channels, pe/proj = num_heads · head_dim."""
    heads = m.num_heads
    dim = m.pe.conv.out_channels
    per_head, rem = divmod(m.qkv.conv.out_channels, heads)
    if dim % heads or rem or (per_head - dim // heads) % 2:
        raise ValueError(f"Attention.num_heads={heads} does not divide qkv ({m.qkv.conv.out_channels}) "
                         f"and pe ({dim}) channels into whole heads")
    m.head_dim = dim // heads
    m.key_dim = (per_head - m.head_dim) // 2  # scale stays: the program keeps the original constant


def sync_segment(m: nn.Module) -> None:
    """``Segment.npr``: the prototype branch's hidden width."""
    m.npr = m.proto.cv1.conv.out_channels


def attention_whole(m: nn.Module, path: str, by_member: dict, whole: set) -> dict[str, str]:
    """``forward`` views v (num_heads · head_dim channels) to the input's channel count C."""
    groups = by_member.get((f"{path}.qkv.conv.weight", 1), [])
    return {g: "forward reshapes v to x.shape[1]: input channels must stay num_heads * head_dim"
            for g in groups}


def split_block_whole(m: nn.Module, path: str, by_member: dict, whole: set) -> dict[str, str]:
    """Both halves of ``cv1`` keep the same width: if one can't be pruned, neither is."""
    halves = by_member.get((f"{path}.cv1.conv.weight", 0), [])
    if any(g in whole for g in halves):
        return {g: "c: one half of cv1 is kept whole, so both halves are (split((c, c)))" for g in halves}
    return {}


def register() -> None:
    """Add the ultralytics classes of this install to the module_sync table."""
    from ultralytics.nn.modules import block, head
    splits = [getattr(block, n) for n in ("C2f", "C3k2", "C2fAttn", "C2fCIB", "C2fPSA", "C2PSA", "PSA",
                                           "RepNCSPELAN4", "ELAN1", "A2C2f") if hasattr(block, n)]
    module_sync(*splits)(sync_split_block)
    module_sync(block.Attention)(sync_attention)
    sync_constraint(*splits)(split_block_whole)
    sync_constraint(block.Attention)(attention_whole)
    module_sync(*[getattr(head, n) for n in ("Segment", "YOLOESegment") if hasattr(head, n)])(sync_segment)


def save_checkpoint(model: nn.Module, path: str | Path, **train_args: Any) -> Path:
    """Write ``model`` as an ultralytics checkpoint (``YOLO(path)`` loads the pruned module as is)."""
    from prunec.atomic import atomic_path
    path = Path(path)
    ckpt = {"model": model, "ema": None, "train_args": dict(getattr(model, "args", None) or {}, **train_args),
            "epoch": -1, "optimizer": None}
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return path


def trainer(model: nn.Module) -> type:
    """A trainer class for ``YOLO.train(trainer=...)`` that trains ``model`` (the pruned module)
    instead of a dense one rebuilt from ``model.yaml``."""
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.models.yolo.segment import SegmentationTrainer
    base = SegmentationTrainer if type(model).__name__ == "SegmentationModel" else DetectionTrainer

    class PrunedTrainer(base):  # type: ignore[misc, valid-type]
        def get_model(self, cfg: Any = None, weights: Any = None, verbose: bool = True) -> nn.Module:
            for p in model.parameters():
                p.requires_grad_(True)
            return model

    return PrunedTrainer
