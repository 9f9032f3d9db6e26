"""Program + Plan → smaller Program: slice every coupled tensor, fix shape constants."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import fx

from prunec.coupling import Coupling, Key, shape_of
from prunec.layers import Branch, drop_branches, find_branches, resolve
from prunec.plan import Plan
from prunec.program_module import ProgramModule, copy_graph
from prunec.rules import fixer_for


@dataclass
class Sizes:
    """New size of every (value, dim) given what was dropped."""

    dropped: dict[Key, np.ndarray]

    def shape(self, node: fx.Node) -> list[int]:
        return [s - len(self.dropped.get((node, d), ())) for d, s in enumerate(shape_of(node) or ())]

    def changed(self, node: fx.Node) -> bool:
        return any((node, d) in self.dropped for d in range(len(shape_of(node) or ())))


def slice_state(coupling: Coupling, dropped: dict[Key, np.ndarray]) -> dict[str, torch.Tensor]:
    """New state tensors: each dropped dim removed with index_select (others cloned)."""
    fqns = coupling.program.placeholder_fqns()
    out: dict[str, torch.Tensor] = {}
    by_node: dict[fx.Node, list[tuple[int, np.ndarray]]] = {}
    for (node, dim), idx in dropped.items():
        if node.op == "placeholder" and node.name in fqns:
            by_node.setdefault(node, []).append((dim, idx))
    for node in coupling.program.graph.nodes:
        if node.op != "placeholder" or node.name not in fqns:
            continue
        tensor = coupling.program.tensor(fqns[node.name])
        for dim, idx in by_node.get(node, []):
            mask = np.ones(tensor.shape[dim], dtype=bool)
            mask[idx] = False
            keep = np.nonzero(mask)[0]
            tensor = tensor.index_select(dim, torch.as_tensor(keep, dtype=torch.long))
        out[fqns[node.name]] = tensor.detach().clone() if node not in by_node else tensor.detach()
    return out


def dropped_branches(coupling: Coupling, plan: Plan) -> list[Branch]:
    """The residual branches ``plan.meta["dropped_layers"]`` names (see prunec.layers)."""
    names = plan.meta.get("dropped_layers") or []
    if not names:
        return []
    program = coupling.program
    return resolve(find_branches(program.graph, set(program.placeholder_fqns())), list(names))


def rewrite(coupling: Coupling, plan: Plan) -> tuple[ProgramModule, dict[str, torch.Tensor], Sizes]:
    """Apply ``plan``: returns the pruned ProgramModule, its new state, and the size map."""
    plan.check(coupling)
    dropped = coupling.dropped_by_key(plan.dropped_labels(coupling))
    sizes = Sizes(dropped)
    graph, node_map = copy_graph(coupling.program.graph)
    for old, new in node_map.items():
        if old.op != "call_function":
            continue
        fixer = fixer_for(old)  # the op's rule and fixer live in one table (prunec.rules)
        if fixer is not None and (sizes.changed(old) or any(sizes.changed(a) for a in old.all_input_nodes)):
            fixer(old, new, sizes)
        if isinstance(new.meta.get("val"), torch.Tensor):
            new.meta.pop("val", None)  # shapes are stale now; re-export recomputes them
    branches = dropped_branches(coupling, plan)
    if branches:
        drop_branches(graph, {old.name: new for old, new in node_map.items()}, branches)
        fqns = coupling.program.placeholder_fqns()
        for node in list(graph.nodes):  # tensors only dropped branches read leave the program
            if node.op == "placeholder" and node.name in fqns and not node.users:
                graph.erase_node(node)
    state = slice_state(coupling, dropped)
    graph.lint()
    return ProgramModule(coupling.program, graph, state), state, sizes
