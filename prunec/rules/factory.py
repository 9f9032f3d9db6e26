"""Factories: tensors made from sizes (zeros, ones, full, empty, new_*) and arange.

A constant-filled tensor couples nothing: its dims follow whatever its users tie them to, and
its fixer writes the new sizes (e.g. the zero initial state of an LSTM follows its hidden units).
arange's values are positions, so its dim is frozen.
"""
from __future__ import annotations

from torch import fx

from prunec.coupling import CouplingBuilder
from prunec.rules import NewSizes, aten, coupling_rule, no_sizes, set_arg

SIZE_FIRST = (aten.zeros.default, aten.ones.default, aten.empty.memory_format, aten.full.default)


def fix_factory_size(old: fx.Node, new: fx.Node, sizes: NewSizes) -> None:
    """size' = the new shape of the made tensor (argument 0, or 1 for new_*(self, size))."""
    index = 0 if old.target in SIZE_FIRST else 1
    set_arg(new, index, "size", sizes.shape(old))


@coupling_rule(aten.zeros.default, aten.ones.default, aten.empty.memory_format, aten.full.default,
               aten.new_zeros.default, aten.new_ones.default, aten.new_empty.default,
               aten.new_full.default, fix=fix_factory_size)
def constant_fill(node: fx.Node, g: CouplingBuilder) -> None:
    """y[…] = c for every index: no dim is tied by the factory itself."""
    return None


@coupling_rule(aten.arange.default, aten.arange.start, aten.arange.start_step, fix=no_sizes)
def arange(node: fx.Node, g: CouplingBuilder) -> None:
    """y[i] = start + i · step: dropping an entry would shift the values after it (frozen)."""
    g.freeze(node, 0, "arange values are positions")


@coupling_rule(aten.scalar_tensor.default, fix=no_sizes)
def scalar_tensor(node: fx.Node, g: CouplingBuilder) -> None:
    """A 0-d tensor: no dims."""
    return None


@coupling_rule(aten.meshgrid.default, aten.meshgrid.indexing, fix=no_sizes)
def meshgrid(node: fx.Node, g: CouplingBuilder) -> None:
    """grid_k[i_0, …, i_{n−1}] = x_k[i_k] ('ij'); 'xy' swaps the first two output dims."""
    inputs = list(node.args[0])
    xy = (node.args[1] if len(node.args) > 1 else node.kwargs.get("indexing", "ij")) == "xy"
    order = list(range(len(inputs)))
    if xy and len(order) >= 2:
        order[0], order[1] = 1, 0
    for out in node.users:
        if out.op != "call_function" or len(out.args) != 2:
            continue
        for d, k in enumerate(order):  # output dim d runs over input k
            g.tie((inputs[k], 0), (out, d))
