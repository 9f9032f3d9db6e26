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


def build_coupling(program: Program, open_inputs: frozenset[int] = frozenset(),
                   open_outputs: frozenset[int] = frozenset()) -> Coupling:
    """Apply one rule per node; model inputs and outputs are never pruned, except the user-input and
    user-output leaves (pytree positions) named open: another traced part produces or reads them
    (prunec.ties), and their dims join groups like any activation's."""
    fqns = program.placeholder_fqns()
    state = {n for n in program.graph.nodes if n.op == "placeholder" and n.name in fqns}
    open_nodes = {n for i, n in enumerate(program.user_inputs()) if i in open_inputs}
    outs = program.user_outputs()
    closed_outs = {o for i, o in enumerate(outs) if i not in open_outputs and isinstance(o, fx.Node)}
    g = CouplingBuilder(state)
    unknown: dict[str, str] = {}
    for node in program.graph.nodes:
        if node.op == "placeholder":
            if node not in state and node not in open_nodes:
                g.freeze_all(node, "model input")
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
                if isinstance(out, fx.Node) and (out in closed_outs or out not in outs):
                    g.freeze_all(out, "model output")
    coupling = finish(g, program)
    coupling.unknown_ops.update(unknown)
    return coupling
