"""Pointwise ops: out[i] = f(a[i], b[i], …) with broadcasting from the right."""
from __future__ import annotations

import operator

from torch import fx

from prunec.coupling import CouplingBuilder, shape_of
from prunec.rules import NewSizes, arg, aten, coupling_rule, no_sizes, set_arg


def tie_broadcast(node: fx.Node, g: CouplingBuilder) -> None:
    """Tie each input dim to the output dim it lines up with (equal sizes only)."""
    out = shape_of(node)
    if out is None:
        return
    for inp in node.all_input_nodes:
        shape = shape_of(inp)
        if shape is None:
            continue
        lead = len(out) - len(shape)
        for d, size in enumerate(shape):
            if lead + d >= 0 and size == out[lead + d] and size > 1:
                g.tie((inp, d), (node, lead + d))


@coupling_rule(aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.mul.Tensor,
               aten.div.Tensor, aten.where.self, aten.masked_fill.Scalar, aten.masked_fill.Tensor,
               aten.hardswish.default, aten.hardswish_.default, aten.hardsigmoid.default,
               aten.hardsigmoid_.default, aten.dropout.default, aten.dropout_.default,
               aten.alpha_dropout.default, aten.feature_dropout.default,
               aten.alias.default, aten.contiguous.default, aten.clone.default,
               aten.detach.default, aten.detach_.default, aten.lift_fresh_copy.default, aten.fill_.Tensor,
               aten.fill_.Scalar, aten.type_as.default, aten.to.dtype, aten.to.dtype_layout,
               aten._to_copy.default, aten.mish.default, aten.mish_.default, aten.silu_.default,
               aten.gelu_.default, aten.relu6.default, aten.copy.default,
               aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default,
               aten.full_like.default, aten.to.device, aten.to.other, aten.to.prim_dtype,
               aten.__and__.Tensor, aten.__or__.Tensor, aten.__and__.Scalar, aten.__or__.Scalar,
               aten.copy_.default, aten.zero_.default,
               fix=no_sizes)
def pointwise(node: fx.Node, g: CouplingBuilder) -> None:
    """out[..., i] = f(x[..., i], y[..., i]) — broadcasting dims of size 1 are not tied."""
    tie_broadcast(node, g)


@coupling_rule(operator.getitem, fix=no_sizes)
def getitem(node: fx.Node, g: CouplingBuilder) -> None:
    """Outputs of multi-output ops are tied by the producer's rule (split, unbind)."""
    return None


def fix_checked_size(old: fx.Node, new: fx.Node, sizes: NewSizes) -> None:
    """A checked size follows the checked tensor (the rule freezes it, so this is a no-op today)."""
    if arg(old, 1, "size") is not None:
        set_arg(new, 1, "size", sizes.shape(arg(old, 0)))


@coupling_rule(aten._assert_tensor_metadata.default, fix=fix_checked_size)
def assert_tensor_metadata(node: fx.Node, g: CouplingBuilder) -> None:
    """A runtime check of dtype/device/layout: it couples nothing; a checked size is frozen."""
    x = node.args[0] if node.args else None
    if node.kwargs.get("size") is not None or len(node.args) > 1 and node.args[1] is not None:
        g.freeze_all(x, "_assert_tensor_metadata checks this size")


@coupling_rule(aten.prelu.default, aten._prelu_kernel.default, fix=no_sizes)
def prelu(node: fx.Node, g: CouplingBuilder) -> None:
    """y[n, c, …] = max(0, x) + a[c] · min(0, x); a single weight (numel 1) is shared by all c."""
    x, a = arg(node, 0), arg(node, 1)
    if node.target is aten._prelu_kernel.default:  # weight already shaped to broadcast
        tie_broadcast(node, g)
        return
    shape = shape_of(x) or ()
    for d in range(len(shape)):
        g.tie((x, d), (node, d))
    a_shape = shape_of(a) or ()
    if a_shape and a_shape[0] > 1:
        g.tie((x, 1 if len(shape) >= 2 else 0), (a, 0))
