"""Program + Plan → smaller Program: slice every coupled tensor, fix shape constants."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import fx

from prunec.coupling import Coupling
from prunec.cut import Cut, Sizes
from prunec.layers import drop_branches
from prunec.plan import Plan
from prunec.program_module import ProgramModule, copy_graph
from prunec.rules import fixer_for


def slice_state(cut: Cut, share: bool = False, private: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """New state tensors: each dropped dim removed with index_select; the others cloned, or with ``share``
    the original tensors themselves (no copy of the unpruned weights), except the ``private`` ones."""
    out: dict[str, torch.Tensor] = {}
    cut_fqns = {fqn for (fqn, _), gone in cut.state_dropped.items() if len(gone)}
    private = set(private)
    for fqn in cut.coupling.program.placeholder_fqns().values():
        tensor = cut.coupling.program.tensor(fqn).detach()
        if fqn in cut_fqns:
            out[fqn] = cut.slice(fqn, tensor)
        else:
            out[fqn] = tensor if share and fqn not in private else tensor.clone()
    return out


def rewrite_graph(cut: Cut) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    """A copy of the traced graph with shape constants fixed for ``cut`` and its branches
    dropped; also the old → new node map (dropped nodes map to erased nodes)."""
    sizes = cut.sizes
    graph, node_map = copy_graph(cut.coupling.program.graph)
    for old, new in node_map.items():
        if old.op != "call_function":
            continue
        fixer = fixer_for(old)  # the op's rule and fixer live in one table (prunec.rules)
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


def rewrite(cut: Cut | Coupling, plan: Plan | None = None, *, share: bool = False, private: Iterable[str] = ()
            ) -> tuple[ProgramModule, dict[str, torch.Tensor], Sizes]:
    """Apply a cut (or ``Cut.of(coupling, plan)``): the pruned ProgramModule, its new state,
    and the size map. ``share``: unpruned tensors are the original's (see ``slice_state``)."""
    if not isinstance(cut, Cut):
        if plan is None:
            raise TypeError("rewrite(coupling, plan) needs a plan")
        cut = Cut.of(cut, plan)
    graph, _ = rewrite_graph(cut)
    state = slice_state(cut, share, private)
    graph.lint()
    return ProgramModule(cut.coupling.program, graph, state), state, cut.sizes
