"""Contractions with weights: conv, linear, matmul, embedding."""
from __future__ import annotations

import numpy as np
from torch import fx

from prunec.coupling import CouplingBuilder, shape_of
from prunec.rules import NewSizes, arg, aten, consume, coupling_rule, ndim, no_sizes, set_arg


def fix_conv_groups(old: fx.Node, new: fx.Node, sizes: NewSizes) -> None:
    """groups' = groups · W.shape[0]' / W.shape[0] (whole conv groups are the units; W's dim 0 is
    the output channels of a conv and the input channels of a transposed conv, both per group)."""
    index = 8 if old.target is aten.convolution.default else 6
    groups = arg(old, index, "groups", 1)
    if groups == 1:
        return
    rows_old = shape_of(arg(old, 1))[0]
    rows_new = sizes.shape(arg(old, 1))[0]
    set_arg(new, index, "groups", groups * rows_new // rows_old)


@coupling_rule(aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution.default,
               aten.conv_transpose1d.default, aten.conv_transpose2d.input, aten.conv_transpose3d.input,
               fix=fix_conv_groups)
def conv(node: fx.Node, g: CouplingBuilder) -> None:
    """y[n, o, …] = Σ_{i in group(o)} x[n, i, …] ⋆ W[o, i - group_start, …] + b[o];
    transposed, W is (in, out/groups, k…):
    y[n, o, …] = Σ_{i in group(o)} x[n, i, …] ⋆ᵀ W[i, o - group_start, …] + b[o]"""
    x, w, b = arg(node, 0), arg(node, 1), arg(node, 2)
    if node.target is aten.convolution.default:
        transposed, groups = bool(arg(node, 6, "transposed")), arg(node, 8, "groups", 1)
    else:
        transposed, groups = "transpose" in str(node.target), arg(node, 6, "groups", 1)
    for d in range(2, ndim(w)):
        g.freeze(w, d, "convolution kernel dim")
    batched = ndim(x) == ndim(w)
    c_dim = 1 if batched else 0
    if batched:
        g.tie((x, 0), (node, 0))
    for d in range(c_dim + 1, ndim(node)):
        g.freeze(node, d, "convolution output position (its size follows the input and kernel)")
    in_dim, out_dim = (0, 1) if transposed else (1, 0)  # the dims of W that index x's / y's channels
    g.tie((node, c_dim), (b, 0))
    c_in, c_out = shape_of(x)[c_dim], shape_of(node)[c_dim]
    if groups == 1:
        g.tie((node, c_dim), (w, out_dim))
        g.tie((x, c_dim), (w, in_dim))
        consume(g, w, in_dim)
        return
    in_per_group, out_per_group = c_in // groups, c_out // groups
    if transposed:  # W's dim 0 runs over every input channel, dim 1 over one group's outputs
        g.tie((x, c_dim), (w, 0))
        consume(g, w, 0)
        g.freeze(w, 1, "grouped transposed-conv weight's per-group output dim")
    else:
        g.tie((node, c_dim), (w, 0))
        g.freeze(w, 1, "grouped-conv weight's per-group input dim")
    # whole conv groups are units: input channels of group j ↔ output channels of group j
    i = np.arange(c_in)
    g.tie_map((x, c_dim), (node, c_dim), i, (i // in_per_group) * out_per_group)
    o = np.arange(c_out)
    g.tie_map((node, c_dim), (node, c_dim), o, (o // out_per_group) * out_per_group)


@coupling_rule(aten.linear.default, fix=no_sizes)
def linear(node: fx.Node, g: CouplingBuilder) -> None:
    """y[..., o] = Σ_i x[..., i] · W[o, i] + b[o]"""
    x, w, b = arg(node, 0), arg(node, 1), arg(node, 2)
    for d in range(ndim(x) - 1):
        g.tie((x, d), (node, d))
    g.tie((node, -1), (w, 0), (b, 0))
    g.tie((x, -1), (w, 1))
    consume(g, w, 1)


@coupling_rule(aten.matmul.default, aten.mm.default, aten.bmm.default, fix=no_sizes)
def matmul(node: fx.Node, g: CouplingBuilder) -> None:
    """y[..., n, m] = Σ_k a[..., n, k] · b[..., k, m]"""
    a, b = arg(node, 0), arg(node, 1)
    na, nb, no = ndim(a), ndim(b), ndim(node)
    if na < 2 or nb < 2:
        for v in (a, b, node):
            g.freeze_all(v, "matmul with a 1-D operand has no rule")
        return
    for d in range(no - 2):  # batch dims, broadcast from the right
        for v, nv in ((a, na), (b, nb)):
            dv = d - (no - nv)
            if dv >= 0 and shape_of(v)[dv] == shape_of(node)[d]:
                g.tie((v, dv), (node, d))
    g.tie((a, na - 2), (node, no - 2))
    g.tie((b, nb - 1), (node, no - 1))
    g.tie((a, na - 1), (b, nb - 2))
    if not consume(g, b, nb - 2) and not consume(g, a, na - 1):
        g.approx(a, na - 1, "matmul of two activations sums over this dim")


@coupling_rule(aten.addmm.default, fix=no_sizes)
def addmm(node: fx.Node, g: CouplingBuilder) -> None:
    """y[n, m] = β·c[n?, m] + α·Σ_k a[n, k] · b[k, m]  (GPT-2 Conv1D: b is a (in, out) weight)"""
    c, a, b = arg(node, 0), arg(node, 1), arg(node, 2)
    g.tie((a, 0), (node, 0))
    g.tie((b, 1), (node, 1))
    g.tie((a, 1), (b, 0))
    cs = shape_of(c) or ()
    if len(cs) >= 1 and cs[-1] > 1:
        g.tie((c, len(cs) - 1), (node, 1))
    if len(cs) == 2 and cs[0] > 1:
        g.tie((c, 0), (node, 0))
    if not consume(g, b, 0) and not consume(g, a, 1):
        g.approx(a, 1, "addmm of two activations sums over this dim")


@coupling_rule(aten.embedding.default, fix=no_sizes)
def embedding(node: fx.Node, g: CouplingBuilder) -> None:
    """y[..., d] = W[idx[...], d]"""
    w, idx = arg(node, 0), arg(node, 1)
    g.tie((node, -1), (w, 1))
    g.freeze(w, 0, "embedding rows are looked up by token id")
    for d in range(ndim(idx)):
        g.tie((idx, d), (node, d))
