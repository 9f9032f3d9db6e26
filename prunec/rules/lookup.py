"""Lookups along one dim: index_select, gather. The looked-up dim is frozen, the others tie."""
from __future__ import annotations

from torch import fx

from prunec.coupling import CouplingBuilder, shape_of
from prunec.rules import arg, aten, coupling_rule, ndim, no_sizes


@coupling_rule(aten.index_select.default, fix=no_sizes)
def index_select(node: fx.Node, g: CouplingBuilder) -> None:
    """y[…, k, …] = x[…, idx[k], …]: x's dim is read by position (frozen); y's dim follows idx."""
    x, dim, idx = arg(node, 0), arg(node, 1), arg(node, 2)
    n = ndim(x)
    dim %= max(n, 1)
    g.freeze(x, dim, "index_select looks entries up by position")
    g.tie((idx, 0), (node, dim))
    for d in range(n):
        if d != dim:
            g.tie((x, d), (node, d))


@coupling_rule(aten.gather.default, fix=no_sizes)
def gather(node: fx.Node, g: CouplingBuilder) -> None:
    """y[i][j][k] = x[idx[i][j][k]][j][k] (dim 0): y and idx share every dim; x's other dims tie
    where idx spans them whole, and x's gathered dim is read by position (frozen)."""
    x, dim, idx = arg(node, 0), arg(node, 1), arg(node, 2)
    n = ndim(x)
    dim %= max(n, 1)
    g.freeze(x, dim, "gather looks entries up by position")
    for d in range(n):
        g.tie((idx, d), (node, d))
        if d == dim:
            continue
        if shape_of(idx)[d] == shape_of(x)[d]:
            g.tie((x, d), (node, d))
        else:
            g.freeze(x, d, "gather reads part of this dim")
            g.freeze(node, d, "gather reads part of this dim")


@coupling_rule(aten.sort.default, aten.sort.stable, aten.argsort.default, aten.argsort.stable,
               aten.topk.default, fix=no_sizes)
def sort(node: fx.Node, g: CouplingBuilder) -> None:
    """Values/indices reordered along one dim (frozen: positions move); the other dims tie."""
    x = arg(node, 0)
    n = ndim(x)
    if node.target is aten.topk.default:
        dim = arg(node, 2, "dim", -1)
    elif node.target in (aten.sort.stable, aten.argsort.stable):
        dim = node.kwargs.get("dim", -1)  # keyword-only after `stable`
    else:
        dim = arg(node, 1, "dim", -1)
    dim %= max(n, 1)
    outs = [node] if shape_of(node) is not None else list(node.users)
    g.freeze(x, dim, f"{node.target.__name__.split('.')[0]} reorders this dim")
    for out in outs:
        g.freeze(out, dim, f"{node.target.__name__.split('.')[0]} reorders this dim")
        for d in range(n):
            if d != dim:
                g.tie((x, d), (out, d))


@coupling_rule(aten.item.default, aten._local_scalar_dense.default, fix=no_sizes)
def item(node: fx.Node, g: CouplingBuilder) -> None:
    """A Python number read out of a (one-element) tensor: its dims are read by position."""
    g.freeze_all(arg(node, 0), "item reads one element")
