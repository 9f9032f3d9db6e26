"""Program + Plan → smaller Program: slice every coupled tensor, fix shape constants."""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from torch import fx

from prunec.coupling import Coupling, shape_of
from prunec.cut import Cut, Sizes
from prunec.layers import drop_branches
from prunec.plan import Plan
from prunec.program_module import ProgramModule, copy_graph
from prunec.rules import arg, aten

Fixer = Callable[[fx.Node, fx.Node, "Sizes"], None]
FIXERS: dict[Any, Fixer] = {}


def shape_fixer(*ops: Any) -> Callable[[Fixer], Fixer]:
    """Register how an op's constant arguments follow the new shapes."""
    def wrap(fn: Fixer) -> Fixer:
        for op in ops:
            FIXERS[op] = fn
        return fn
    return wrap


def _set_arg(new: fx.Node, index: int, name: str, value: Any) -> None:
    if index < len(new.args):
        args = list(new.args)
        args[index] = value
        new.args = tuple(args)
    else:
        new.kwargs = {**new.kwargs, name: value}


def _keep_minus_one(old: list[Any], new: list[int]) -> list[Any]:
    return [-1 if o == -1 else n for o, n in zip(old, new)]


@shape_fixer(aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default)
def _fix_size(old: fx.Node, new: fx.Node, sizes: Sizes) -> None:
    _set_arg(new, 1, "size", _keep_minus_one(list(arg(old, 1)), sizes.shape(old)))


@shape_fixer(aten.unflatten.int)
def _fix_unflatten(old: fx.Node, new: fx.Node, sizes: Sizes) -> None:
    dim, parts = arg(old, 1), list(arg(old, 2))
    dim %= len(shape_of(arg(old, 0)))
    _set_arg(new, 2, "sizes", _keep_minus_one(parts, sizes.shape(old)[dim:dim + len(parts)]))


@shape_fixer(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.split.sizes)
def _fix_split(old: fx.Node, new: fx.Node, sizes: Sizes) -> None:
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


@shape_fixer(aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
             aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding,
             aten.convolution.default)
def _fix_conv_groups(old: fx.Node, new: fx.Node, sizes: Sizes) -> None:
    index = 8 if old.target is aten.convolution.default else 6
    groups = arg(old, index, "groups", 1)
    if groups == 1:
        return
    c_out_old = shape_of(arg(old, 1))[0]
    c_out_new = sizes.shape(arg(old, 1))[0]
    _set_arg(new, index, "groups", groups * c_out_new // c_out_old)


@shape_fixer(aten.layer_norm.default, aten.rms_norm.default)
def _fix_normalized_shape(old: fx.Node, new: fx.Node, sizes: Sizes) -> None:
    n = len(arg(old, 1))
    _set_arg(new, 1, "normalized_shape", sizes.shape(arg(old, 0))[-n:])


@shape_fixer(aten.group_norm.default)
def _fix_group_norm(old: fx.Node, new: fx.Node, sizes: Sizes) -> None:
    x = arg(old, 0)
    c_old, c_new = shape_of(x)[1], sizes.shape(x)[1]
    _set_arg(new, 1, "num_groups", arg(old, 1) * c_new // c_old)


@shape_fixer(aten.slice.Tensor)
def _fix_slice(old: fx.Node, new: fx.Node, sizes: Sizes) -> None:
    x = arg(old, 0)
    dim = arg(old, 1, "dim", 0) % len(shape_of(x))
    end = arg(old, 3, "end")
    if isinstance(end, int) and end == shape_of(x)[dim]:
        _set_arg(new, 3, "end", sizes.shape(x)[dim])


@shape_fixer(aten.repeat_interleave.self_int)
def _fix_repeat_interleave(old: fx.Node, new: fx.Node, sizes: Sizes) -> None:
    if arg(old, 3, "output_size") is not None:
        _set_arg(new, 3, "output_size", sizes.shape(old)[arg(old, 2) % len(shape_of(old))])


def slice_state(cut: Cut) -> dict[str, torch.Tensor]:
    """New state tensors: each dropped dim removed with index_select (others cloned)."""
    out: dict[str, torch.Tensor] = {}
    cut_fqns = {fqn for fqn, _ in cut.state_dropped}
    for fqn in cut.coupling.program.placeholder_fqns().values():
        tensor = cut.coupling.program.tensor(fqn)
        out[fqn] = cut.slice(fqn, tensor).detach() if fqn in cut_fqns else tensor.detach().clone()
    return out


def rewrite_graph(cut: Cut) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    """A copy of the traced graph with shape constants fixed for ``cut`` and its branches
    dropped; also the old → new node map (dropped nodes map to erased nodes)."""
    sizes = cut.sizes
    graph, node_map = copy_graph(cut.coupling.program.graph)
    for old, new in node_map.items():
        if old.op != "call_function":
            continue
        fixer = FIXERS.get(old.target)
        if fixer is not None and (sizes.changed(old) or any(sizes.changed(a) for a in old.all_input_nodes)):
            fixer(old, new, sizes)
        if isinstance(new.meta.get("val"), torch.Tensor):
            new.meta.pop("val", None)  # shapes are stale now; re-export recomputes them
    if cut.branches:
        drop_branches(graph, {old.name: new for old, new in node_map.items()}, cut.branches)
        fqns = cut.coupling.program.placeholder_fqns()
        for node in list(graph.nodes):  # tensors only dropped branches read leave the program
            if node.op == "placeholder" and node.name in fqns and not node.users:
                graph.erase_node(node)
    return graph, node_map


def rewrite(cut: Cut | Coupling, plan: Plan | None = None
            ) -> tuple[ProgramModule, dict[str, torch.Tensor], Sizes]:
    """Apply a cut (or ``Cut.of(coupling, plan)``): the pruned ProgramModule, its new state,
    and the size map."""
    if not isinstance(cut, Cut):
        if plan is None:
            raise TypeError("rewrite(coupling, plan) needs a plan")
        cut = Cut.of(cut, plan)
    graph, _ = rewrite_graph(cut)
    state = slice_state(cut)
    graph.lint()
    return ProgramModule(cut.coupling.program, graph, state), state, cut.sizes
