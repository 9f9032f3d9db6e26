"""Shape ops: reshape family, permutes, expand, cat/stack, split family, slice/select.

Reshape factorisation: a dim of 768 viewed as 12 × 64 is tied to one *carrier* factor
(the 12 heads); the other factors are frozen. So a unit is a whole head (64 elements).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from torch import fx

from prunec.coupling import KV_KEPT, CouplingBuilder, shape_of
from prunec.rules import NewSizes, arg, aten, coupling_rule, keep_minus_one, ndim, no_sizes, set_arg

SELECTORS = (aten.select.int, aten.unbind.int)


def reshape_blocks(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of source dims with runs of destination dims of equal product (size-1 dims skipped)."""
    blocks, i, j = [], 0, 0
    while True:
        while i < len(src) and src[i] == 1:
            i += 1
        while j < len(dst) and dst[j] == 1:
            j += 1
        if i == len(src) or j == len(dst):
            return blocks if i == len(src) and j == len(dst) else None
        a, b, pa, pb = [i], [j], src[i], dst[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                if i == len(src):
                    return None
                a.append(i); pa *= src[i]; i += 1
            else:
                if j == len(dst):
                    return None
                b.append(j); pb *= dst[j]; j += 1
        blocks.append((a, b))


_SAME_DIMS = (aten.contiguous.default, aten.clone.default, aten.alias.default)


def _user_dim_map(node: fx.Node, user: fx.Node) -> dict[int, int] | None:
    """node dim → user dim for ops that only move or insert/remove size-1 dims (None: other ops)."""
    n = ndim(node)
    if user.target in _SAME_DIMS:
        return {d: d for d in range(n)}
    if user.target is aten.permute.default:
        return {p: j for j, p in enumerate(arg(user, 1))}
    if user.target in (aten.transpose.int, aten.swapaxes.default):
        d0, d1 = (d % n for d in (arg(user, 1), arg(user, 2)))
        return {d: {d0: d1, d1: d0}.get(d, d) for d in range(n)}
    if user.target is aten.unsqueeze.default:
        u = arg(user, 1) % (n + 1)
        return {d: d if d < u else d + 1 for d in range(n)}
    if user.target is aten.squeeze.dim:
        s = arg(user, 1) % n
        return {d: d if d < s else d - 1 for d in range(n) if d != s}
    return None


def _selected_dims(node: fx.Node, depth: int = 6) -> set[int]:
    """Dims of ``node`` that a later select/unbind indexes (seen through permutes, (un)squeezes)."""
    found: set[int] = set()
    for user in node.users:
        if user.target in SELECTORS:
            found.add(arg(user, 1, "dim", 0) % max(ndim(node), 1))
        elif depth:
            dim_map = _user_dim_map(node, user)
            if dim_map is not None:
                back = {j: d for d, j in dim_map.items()}
                found |= {back[j] for j in _selected_dims(user, depth - 1) if j in back}
    return found


SIZED = (aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default)


def fix_size(old: fx.Node, new: fx.Node, sizes: NewSizes) -> None:
    """view/reshape/expand ``size`` = the output's new shape; unflatten ``sizes`` = its new factors.
    flatten, squeeze, unsqueeze, *_as and repeat carry no sizes."""
    if old.target in SIZED:
        set_arg(new, 1, "size", keep_minus_one(list(arg(old, 1)), sizes.shape(old)))
    elif old.target is aten.unflatten.int:
        dim, parts = arg(old, 1), list(arg(old, 2))
        dim %= len(shape_of(arg(old, 0)))
        set_arg(new, 2, "sizes", keep_minus_one(parts, sizes.shape(old)[dim:dim + len(parts)]))


@coupling_rule(aten.view.default, aten.reshape.default, aten._unsafe_view.default,
               aten.flatten.using_ints, aten.unflatten.int, aten.squeeze.default,
               aten.squeeze.dim, aten.squeeze.dims, aten.unsqueeze.default, aten.view_as.default,
               aten.reshape_as.default, fix=fix_size)
def reshape(node: fx.Node, g: CouplingBuilder) -> None:
    """Row-major reshape: a split dim is tied to one carrier factor, a merged dim to its outer factor."""
    x = arg(node, 0)
    src, dst = shape_of(x), shape_of(node)
    blocks = reshape_blocks(src, dst)
    if blocks is None:
        g.freeze_all(x, "reshape with no dim correspondence")
        g.freeze_all(node, "reshape with no dim correspondence")
        return
    selected = _selected_dims(node)
    for a, b in blocks:
        a = [d for d in a if src[d] > 1]
        b = [d for d in b if dst[d] > 1]
        if len(a) == 1 and len(b) == 1:
            g.tie((x, a[0]), (node, b[0]))
        elif len(a) == 1:
            carrier = next((d for d in b if d not in selected), None)
            if carrier is None:
                for d in b:
                    g.freeze(node, d, "split factors are all indexed")
                g.freeze(x, a[0], "split factors are all indexed")
                continue
            inner = math.prod(dst[d] for d in b if d > carrier)
            i = np.arange(src[a[0]])
            g.tie_map((x, a[0]), (node, carrier), i, (i // inner) % dst[carrier])
            g.mark_head(node, carrier)
            for d in b:
                if d != carrier:
                    g.freeze(node, d, f"reshape factor {dst[d]} of a split dim")
        elif len(b) == 1 and g.gqa_query and _repeat_kv(x, a):
            # GQA repeat_kv (b, kv, r, s, d) → (b, kv·r, s, d): head i is slot i % r of the broadcast
            # dim; dropping a slot shrinks the broadcast, the kv heads are kept
            i = np.arange(dst[b[0]])
            g.tie_map((node, b[0]), (x, a[1]), i, i % src[a[1]])
            g.freeze(x, a[0], KV_KEPT)
        elif len(b) == 1:
            carrier = a[0]
            inner = math.prod(src[d] for d in a[1:])
            i = np.arange(dst[b[0]])
            g.tie_map((node, b[0]), (x, carrier), i, i // inner)
            for d in a[1:]:
                g.freeze(x, d, f"inner factor {src[d]} of a merged dim")
        else:
            for d in a:
                g.freeze(x, d, "reshape mixes several dims")
            for d in b:
                g.freeze(node, d, "reshape mixes several dims")


def _repeat_kv(x: Any, merged: list[int]) -> bool:
    """True if ``x`` is an expand that broadcasts the inner of the two ``merged`` dims (repeat_kv)."""
    if len(merged) != 2 or not isinstance(x, fx.Node) or x.target is not aten.expand.default:
        return False
    src = shape_of(arg(x, 0))
    lead = len(shape_of(x)) - len(src) if src is not None else 0
    return src is not None and merged[1] >= lead and src[merged[1] - lead] == 1


@coupling_rule(aten.permute.default, fix=no_sizes)
def permute(node: fx.Node, g: CouplingBuilder) -> None:
    """y.dims[j] = x.dims[perm[j]]"""
    x, perm = arg(node, 0), arg(node, 1)
    for j, d in enumerate(perm):
        g.tie((x, d), (node, j))


@coupling_rule(aten.transpose.int, aten.swapaxes.default, aten.t.default, aten.numpy_T.default,
               fix=no_sizes)
def transpose(node: fx.Node, g: CouplingBuilder) -> None:
    """y = x with two dims swapped"""
    x, n = arg(node, 0), ndim(arg(node, 0))
    if node.target in (aten.t.default, aten.numpy_T.default):
        d0, d1 = (0, 1) if n == 2 else (0, 0)
    else:
        d0, d1 = arg(node, 1) % n, arg(node, 2) % n
    for d in range(n):
        g.tie((x, {d0: d1, d1: d0}.get(d, d)), (node, d))


@coupling_rule(aten.expand.default, aten.expand_as.default, aten.repeat.default, fix=fix_size)
def expand(node: fx.Node, g: CouplingBuilder) -> None:
    """Dims kept by expand are tied; broadcast or repeated dims are not (their size is a constant)."""
    x = arg(node, 0)
    src, dst = shape_of(x), shape_of(node)
    lead = len(dst) - len(src)
    for d, size in enumerate(src):
        if size == dst[lead + d]:
            g.tie((x, d), (node, lead + d))
        elif size > 1:
            g.freeze(x, d, "repeat along a dim")
            g.freeze(node, lead + d, "repeat along a dim")


def fix_output_size(old: fx.Node, new: fx.Node, sizes: NewSizes) -> None:
    """repeat_interleave's optional ``output_size`` = the new size of the repeated dim."""
    if arg(old, 3, "output_size") is not None:
        set_arg(new, 3, "output_size", sizes.shape(old)[arg(old, 2) % len(shape_of(old))])


@coupling_rule(aten.repeat_interleave.self_int, fix=fix_output_size)
def repeat_interleave(node: fx.Node, g: CouplingBuilder) -> None:
    """y[..., i·r + k, ...] = x[..., i, ...]  (GQA: kv head i feeds query heads i·r … i·r+r−1)"""
    x, repeats, dim = arg(node, 0), arg(node, 1), arg(node, 2, "dim")
    if dim is None or not isinstance(repeats, int):
        g.freeze_all(x, "repeat_interleave without a dim")
        g.freeze_all(node, "repeat_interleave without a dim")
        return
    dim %= ndim(x)
    for d in range(ndim(x)):
        if d != dim:
            g.tie((x, d), (node, d))
    o = np.arange(shape_of(node)[dim])
    g.tie_map((node, dim), (x, dim), o, o // repeats)
    g.mark_head(node, dim)


@coupling_rule(aten.cat.default, aten.concat.default, aten.concatenate.default, fix=no_sizes)
def cat(node: fx.Node, g: CouplingBuilder) -> None:
    """y[..., off_k + i, ...] = x_k[..., i, ...]"""
    inputs, dim = arg(node, 0), arg(node, 1, "dim", 0)
    n = ndim(node)
    dim %= n
    offset = 0
    for x in inputs:
        shape = shape_of(x)
        if shape is None or len(shape) != n:
            continue  # legacy empty tensors
        for d in range(n):
            if d != dim:
                g.tie((x, d), (node, d))
        i = np.arange(shape[dim])
        g.tie_map((x, dim), (node, dim), i, offset + i)
        offset += shape[dim]


@coupling_rule(aten.stack.default, fix=no_sizes)
def stack(node: fx.Node, g: CouplingBuilder) -> None:
    """y[..., k, ...] = x_k — every input's dims tie to the output's, the new dim is frozen."""
    inputs, dim = arg(node, 0), arg(node, 1, "dim", 0)
    dim %= ndim(node)
    for x in inputs:
        for d in range(ndim(x)):
            g.tie((x, d), (node, d if d < dim else d + 1))
    g.freeze(node, dim, "stacked dim")


def _outputs(node: fx.Node) -> dict[int, fx.Node]:
    return {u.args[1]: u for u in node.users if u.op == "call_function" and len(u.args) == 2}


def fix_split(old: fx.Node, new: fx.Node, sizes: NewSizes) -> None:
    """Any split whose parts changed becomes split_with_sizes(new part sizes)."""
    x = arg(old, 0)
    dim = arg(old, 2, "dim", 0) % len(shape_of(x))
    dropped = sizes.dropped.get((x, dim), np.zeros(0, np.int64))
    parts, offset, new_parts = [t.shape[dim] for t in old.meta["val"]], 0, []
    for p in parts:
        new_parts.append(p - int(((dropped >= offset) & (dropped < offset + p)).sum()))
        offset += p
    if new_parts != parts:
        new.target = aten.split_with_sizes.default
        new.args, new.kwargs = (new.args[0], new_parts, dim), {}


@coupling_rule(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
               aten.tensor_split.sections, aten.tensor_split.indices, aten.split.sizes, fix=fix_split)
def split(node: fx.Node, g: CouplingBuilder) -> None:
    """y_k[..., i, ...] = x[..., off_k + i, ...]"""
    x = arg(node, 0)
    dim = arg(node, 2, "dim", 0) % ndim(x)
    sizes = [t.shape[dim] for t in node.meta["val"]]
    outs = _outputs(node)
    offset = 0
    for k, size in enumerate(sizes):
        out = outs.get(k)
        if out is not None:
            for d in range(ndim(x)):
                if d != dim:
                    g.tie((x, d), (out, d))
            i = np.arange(size)
            g.tie_map((x, dim), (out, dim), offset + i, i)
        offset += size


@coupling_rule(aten.unbind.int, fix=no_sizes)
def unbind(node: fx.Node, g: CouplingBuilder) -> None:
    """y_k = x.select(dim, k): the unbound dim is indexed, so frozen."""
    x = arg(node, 0)
    dim = arg(node, 1, "dim", 0) % ndim(x)
    g.freeze(x, dim, "unbind indexes this dim")
    for out in _outputs(node).values():
        for d in range(ndim(x)):
            if d != dim:
                g.tie((x, d), (out, d if d < dim else d - 1))


@coupling_rule(aten.select.int, fix=no_sizes)
def select(node: fx.Node, g: CouplingBuilder) -> None:
    """y = x[..., k, ...]: the indexed dim is frozen, the others tie."""
    x, dim = arg(node, 0), arg(node, 1) % ndim(arg(node, 0))
    g.freeze(x, dim, "select indexes this dim")
    for d in range(ndim(x)):
        if d != dim:
            g.tie((x, d), (node, d if d < dim else d - 1))


def fix_slice_end(old: fx.Node, new: fx.Node, sizes: NewSizes) -> None:
    """A full slice's ``end`` = the new size (partial slices are frozen by the rule)."""
    x = arg(old, 0)
    dim = arg(old, 1, "dim", 0) % len(shape_of(x))
    end = arg(old, 3, "end")
    if isinstance(end, int) and end == shape_of(x)[dim]:
        set_arg(new, 3, "end", sizes.shape(x)[dim])


@coupling_rule(aten.slice.Tensor, fix=fix_slice_end)
def slice_(node: fx.Node, g: CouplingBuilder) -> None:
    """y = x[..., start:end:step, ...]: a full slice is the identity, a partial one is frozen."""
    x = arg(node, 0)
    dim = arg(node, 1, "dim", 0) % ndim(x)
    for d in range(ndim(x)):
        if d != dim or shape_of(x)[d] == shape_of(node)[d]:
            g.tie((x, d), (node, d))
        else:
            g.freeze(x, d, "partial slice of this dim")
            g.freeze(node, d, "partial slice of this dim")


@coupling_rule(aten.index.Tensor, fix=no_sizes)
def index(node: fx.Node, g: CouplingBuilder) -> None:
    """y[i..., rest] = x[idx[i...], rest]: an indexed dim is frozen; the leading dims x keeps tie."""
    x, indices = arg(node, 0), arg(node, 1)
    n = ndim(x)
    used = [k for k, t in enumerate(indices) if t is not None]
    if not used or used != list(range(len(used))) or ndim(node) < 0:
        g.freeze_all(x, "advanced indexing with non-leading indices")
        g.freeze_all(node, "advanced indexing with non-leading indices")
        return
    idx_nd = ndim(node) - (n - len(used))
    for d in used:
        g.freeze(x, d, "index looks rows up by position")
    for t in indices:
        if t is not None:
            g.freeze_all(t, "index positions")
    for d in range(len(used), n):
        g.tie((x, d), (node, idx_nd + d - len(used)))


@coupling_rule(aten.pixel_shuffle.default, aten.pixel_unshuffle.default, fix=no_sizes)
def pixel_shuffle(node: fx.Node, g: CouplingBuilder) -> None:
    """shuffle: y[…, c, h·r + i, w·r + j] = x[…, c·r² + i·r + j, h, w] — channel c of y is the block
    of r² channels c·r² … c·r²+r²−1 of x; unshuffle is the inverse. Spatial dims are frozen."""
    x, r = arg(node, 0), arg(node, 1)
    n = ndim(x)
    for d in range(n - 3):
        g.tie((x, d), (node, d))
    shuffled = (x, n - 3) if node.target is aten.pixel_shuffle.default else (node, n - 3)
    merged = (node, n - 3) if node.target is aten.pixel_shuffle.default else (x, n - 3)
    i = np.arange(shape_of(shuffled[0])[n - 3])
    g.tie_map(shuffled, merged, i, i // (r * r))
    for d in (n - 2, n - 1):
        g.freeze(x, d, f"{node.target.__name__.split('.')[0]} moves pixels along this dim")
        g.freeze(node, d, f"{node.target.__name__.split('.')[0]} moves pixels along this dim")
