"""Walk a traced Program through the rule table and build its Coupling."""
from __future__ import annotations

import torch
from torch import fx

from prunec.coupling import Coupling, CouplingBuilder, finish, shape_of
from prunec.rules import rule_for
from prunec.trace import Program, module_path


def _freeze_unknown(node: fx.Node, g: CouplingBuilder) -> None:
    reason = f"no coupling rule for {node.target}"
    for inp in node.all_input_nodes:
        g.freeze_all(inp, reason)
    g.freeze_all(node, reason)
    if shape_of(node) is None:  # multi-output op: freeze what getitem takes out
        for user in node.users:
            g.freeze_all(user, reason)


def build_coupling(program: Program, gqa_query: bool = False, open_inputs: frozenset[tuple[int, int]] = frozenset(),
                   open_outputs: frozenset[tuple[int, int]] = frozenset()) -> Coupling:
    """Apply one rule per node; model inputs and outputs are never pruned, except the (leaf, dim) pairs
    of user inputs and outputs (pytree positions) named open: another traced part produces or reads them
    (prunec.ties), and those dims join groups like any activation's. ``gqa_query``: GQA attention
    prunes query heads inside their kv groups (see ``CouplingBuilder``)."""
    fqns = program.placeholder_fqns()
    state = {n for n in program.graph.nodes if n.op == "placeholder" and n.name in fqns}
    open_dims = {(n, d) for i, n in enumerate(program.user_inputs()) for leaf, d in open_inputs if leaf == i}
    outs = program.user_outputs()
    g = CouplingBuilder(state, gqa_query)
    unknown: dict[str, str] = {}
    for node in program.graph.nodes:
        if node.op == "placeholder":
            if node not in state:
                for d in range(len(shape_of(node) or ())):
                    if (node, d) not in open_dims:
                        g.freeze(node, d, "model input")
            else:
                for d in range(len(shape_of(node) or ())):
                    g.key(node, d)
        elif node.op == "call_function":
            rule = rule_for(node)
            if rule is None:
                if any(shape_of(a) is not None for a in node.all_input_nodes) or shape_of(node):
                    unknown.setdefault(str(node.target), module_path(node))
                _freeze_unknown(node, g)
            else:
                rule(node, g)
        elif node.op == "output":
            for out in torch.utils._pytree.tree_leaves(node.args):
                if isinstance(out, fx.Node) and out not in outs:  # (a buffer mutation)
                    g.freeze_all(out, "model output")
            for i, out in enumerate(outs):
                for d in range(len(shape_of(out) or ())):
                    if (i, d) not in open_outputs:
                        g.freeze(out, d, "model output")
    coupling = finish(g, program)
    coupling.unknown_ops.update(unknown)
    return coupling
