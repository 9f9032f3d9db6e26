"""Normalisation layers."""
from __future__ import annotations

import numpy as np
from torch import fx

from prunec.coupling import CouplingBuilder, shape_of
from prunec.rules import NewSizes, arg, aten, coupling_rule, ndim, no_sizes, set_arg


def _tie_same(a: object, b: fx.Node, g: CouplingBuilder) -> None:
    for d in range(ndim(b)):
        g.tie((a, d), (b, d))


@coupling_rule(aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
               aten.instance_norm.default, fix=no_sizes)
def batch_norm(node: fx.Node, g: CouplingBuilder) -> None:
    """y[n, c, …] = (x[n, c, …] − μ[c]) / σ[c] · γ[c] + β[c]  (per channel: exact)"""
    x = arg(node, 0)
    out = node
    if node.target is aten._native_batch_norm_legit_no_training.default:
        out = next((u for u in node.users if u.args[1] == 0), None)
        if out is None:
            return
    _tie_same(x, out, g)
    if ndim(x) < 2:
        return
    params = [arg(node, i) for i in (1, 2, 3, 4)]
    g.tie((x, 1), *((p, 0) for p in params))
    batch_stats = node.target is aten.instance_norm.default or (
        node.target is aten.batch_norm.default and (arg(node, 5, "training") or params[2] is None))
    if batch_stats:  # statistics computed in forward read every dim but the channel dim
        first = 2 if node.target is aten.instance_norm.default else 0
        for d in range(first, ndim(x)):
            if d != 1:
                g.approx(x, d, "batch statistics computed in forward read this dim")


def fix_normalized_shape(old: fx.Node, new: fx.Node, sizes: NewSizes) -> None:
    """normalized_shape' = the new sizes of x's last len(normalized_shape) dims."""
    n = len(arg(old, 1))
    set_arg(new, 1, "normalized_shape", sizes.shape(arg(old, 0))[-n:])


@coupling_rule(aten.layer_norm.default, aten.rms_norm.default, fix=fix_normalized_shape)
def layer_norm(node: fx.Node, g: CouplingBuilder) -> None:
    """y = (x − mean(x[..., D])) / std(x[..., D]) · γ[D] + β[D]; rms_norm: y = x / rms(x[..., D]) · γ[D]
    (the statistics read every d ∈ D: approximate)"""
    x, normalized, w = arg(node, 0), arg(node, 1), arg(node, 2, "weight")
    b = arg(node, 3, "bias") if node.target is aten.layer_norm.default else None
    _tie_same(x, node, g)
    n = ndim(x)
    for j in range(len(normalized)):
        d = n - len(normalized) + j
        g.tie((x, d), (w, j), (b, j))
        g.approx(x, d, f"{node.target.__name__.split('.')[0]} statistics read this dim")


def fix_num_groups(old: fx.Node, new: fx.Node, sizes: NewSizes) -> None:
    """num_groups' = num_groups · C' / C (whole groups are the units)."""
    x = arg(old, 0)
    c_old, c_new = shape_of(x)[1], sizes.shape(x)[1]
    set_arg(new, 1, "num_groups", arg(old, 1) * c_new // c_old)


@coupling_rule(aten.group_norm.default, fix=fix_num_groups)
def group_norm(node: fx.Node, g: CouplingBuilder) -> None:
    """Statistics per group of C/G channels: dropping whole groups is exact."""
    x, groups = arg(node, 0), arg(node, 1)
    w, b = arg(node, 2, "weight"), arg(node, 3, "bias")
    _tie_same(x, node, g)
    g.tie((x, 1), (w, 0), (b, 0))
    c = shape_of(x)[1]
    per = c // groups
    idx = np.arange(c)
    g.tie_map((x, 1), (x, 1), idx, (idx // per) * per)


@coupling_rule(aten._weight_norm.default, fix=no_sizes)
def weight_norm(node: fx.Node, g: CouplingBuilder) -> None:
    """w = g · v / ‖v‖, the norm over every dim of v but ``dim`` (−1: over all of v). The norm reads
    those dims of the state v, so they are consumed: v with dropped entries zeroed has exactly the
    norm of the pruned v."""
    v, gain, dim = arg(node, 0), arg(node, 1), arg(node, 2, "dim", 0)
    n = ndim(v)
    _tie_same(v, node, g)
    if dim is not None and dim != -1:
        dim %= n
        g.tie((v, dim), (gain, dim))
    for d in range(n):
        if d != dim:
            g.consume(v, d)
