"""Pooling, reductions, softmax, padding: per-channel ops whose other dims are spatial."""
from __future__ import annotations

from torch import fx

from prunec.coupling import CouplingBuilder
from prunec.rules import arg, aten, coupling_rule, ndim, no_sizes

POOL_SPATIAL = {
    aten.max_pool1d.default: 1, aten.avg_pool1d.default: 1, aten.adaptive_avg_pool1d.default: 1,
    aten.adaptive_max_pool1d.default: 1,
    aten.max_pool2d.default: 2, aten.avg_pool2d.default: 2, aten.adaptive_avg_pool2d.default: 2,
    aten.adaptive_max_pool2d.default: 2, aten.max_pool2d_with_indices.default: 2,
    aten.max_pool3d.default: 3, aten.avg_pool3d.default: 3, aten.adaptive_avg_pool3d.default: 3,
    aten._adaptive_avg_pool2d.default: 2, aten._adaptive_avg_pool3d.default: 3,
    aten.adaptive_max_pool3d.default: 3, aten.max_pool3d_with_indices.default: 3,
    aten.max_pool1d_with_indices.default: 1,
}
UPSAMPLE = {"upsample_nearest1d": 1, "upsample_linear1d": 1, "_upsample_nearest_exact1d": 1,
            "upsample_nearest2d": 2, "upsample_bilinear2d": 2, "upsample_bicubic2d": 2,
            "_upsample_nearest_exact2d": 2, "_upsample_bilinear2d_aa": 2, "_upsample_bicubic2d_aa": 2,
            "upsample_nearest3d": 3, "upsample_trilinear3d": 3, "_upsample_nearest_exact3d": 3}
for _name, _k in UPSAMPLE.items():  # interpolate(): .vec (scales) and .default (sizes) overloads
    POOL_SPATIAL[getattr(aten, _name).vec] = _k
    POOL_SPATIAL[getattr(aten, _name).default] = _k
WITH_INDICES = (aten.max_pool1d_with_indices.default, aten.adaptive_max_pool1d.default,
                aten.max_pool2d_with_indices.default, aten.max_pool3d_with_indices.default,
                aten.adaptive_max_pool2d.default, aten.adaptive_max_pool3d.default)


@coupling_rule(*POOL_SPATIAL, fix=no_sizes)
def pool(node: fx.Node, g: CouplingBuilder) -> None:
    """y[n, c, …] = pool(x[n, c, …]) (also interpolate): batch and channel dims tie; spatial dims
    are frozen (their sizes come from the window or the output_size/scale arguments)."""
    x = arg(node, 0)
    out = node
    if node.target in WITH_INDICES:
        out = next((u for u in node.users if u.args[1] == 0), None)
        idx = next((u for u in node.users if u.args[1] == 1), None)
        if idx is not None:
            g.freeze_all(idx, "pooling indices")
        if out is None:
            return
    spatial = ndim(x) - POOL_SPATIAL[node.target]
    for d in range(spatial):
        g.tie((x, d), (out, d))
    for d in range(spatial, ndim(x)):
        g.freeze(out, d, f"{node.target.__name__.split('.')[0]} output position")


DIM_ARG = {aten.linalg_vector_norm.default: 2}  # where `dim` sits when it is not argument 1


def _reduced_dims(node: fx.Node) -> list[int]:
    n = ndim(arg(node, 0))
    dims = arg(node, DIM_ARG.get(node.target, 1), "dim")
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        return list(range(n))
    dims = [dims] if isinstance(dims, int) else dims
    return sorted(d % n for d in dims)


@coupling_rule(aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default,
               aten.var.correction, aten.std.correction, aten.mean.default, aten.sum.default,
               aten.var.dim, aten.std.dim, aten.max.dim, aten.min.dim, aten.argmax.default,
               aten.logsumexp.default, aten.norm.ScalarOpt_dim, aten.linalg_vector_norm.default,
               fix=no_sizes)
def reduce(node: fx.Node, g: CouplingBuilder) -> None:
    """y = reduce over some dims: kept dims tie; a reduced dim reads every element (approximate)."""
    x = arg(node, 0)
    reduced = _reduced_dims(node)
    keepdim = bool(arg(node, DIM_ARG.get(node.target, 1) + 1, "keepdim", False)) if node.target not in (
        aten.mean.default, aten.sum.default) else False
    if node.target in (aten.var.correction, aten.std.correction):
        keepdim = bool(node.kwargs.get("keepdim", False))
    outs = [node]
    if node.target in (aten.max.dim, aten.min.dim):
        outs = [u for u in node.users]
    j = 0
    for d in range(ndim(x)):
        if d in reduced:
            g.approx(x, d, f"{node.target} reduces over this dim")
            if keepdim:
                j += 1
            continue
        for out in outs:
            g.tie((x, d), (out, j))
        j += 1


@coupling_rule(aten.softmax.int, aten._softmax.default, aten.log_softmax.int,
               aten._log_softmax.default, fix=no_sizes)
def softmax(node: fx.Node, g: CouplingBuilder) -> None:
    """y = softmax over one dim: all dims tie; the softmax dim is read whole (approximate)."""
    x, dim = arg(node, 0), arg(node, 1) % ndim(arg(node, 0))
    for d in range(ndim(x)):
        g.tie((x, d), (node, d))
    g.approx(x, dim, "softmax normalises over this dim")


@coupling_rule(aten.pad.default, aten.constant_pad_nd.default, aten.roll.default,
               aten.flip.default, fix=no_sizes)
def pad(node: fx.Node, g: CouplingBuilder) -> None:
    """Padding/rolling/flipping moves indices along some dims: those are frozen, others tie."""
    x = arg(node, 0)
    n = ndim(x)
    if node.target is aten.roll.default:
        dims = arg(node, 2, "dims", [])
        moved = {d % n for d in dims} if dims else set(range(n))
    elif node.target is aten.flip.default:
        moved = {d % n for d in arg(node, 1)}
    else:
        widths = arg(node, 1)
        moved = {n - 1 - k // 2 for k, w in enumerate(widths) if w}
    for d in range(n):
        if d in moved:
            g.freeze(x, d, f"{node.target} moves indices along this dim")
            g.freeze(node, d, f"{node.target} moves indices along this dim")
        else:
            g.tie((x, d), (node, d))
