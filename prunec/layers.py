"""Residual branches: ``y = x + f(x)`` adds whose branch ``f`` can be dropped (``y = x``).

A branch is an ``aten.add`` of two same-shaped tensors where one input (the *skip* ``x``) is
an ancestor of the other (the branch output ``f``) and ``f``'s subgraph reads a parameter.
Dropping it replaces the add by ``x`` — exactly the original with ``f``'s output times 0.
Branches are grouped into **blocks** by the innermost indexed module (``layers.3``,
``encoder_layer_3``): a transformer layer's attention and MLP branches form one block.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import fx

from prunec.coupling import shape_of
from prunec.errors import InputError
from prunec.rules import aten
from prunec.trace import module_path

ADDS = (aten.add.Tensor, aten.add_.Tensor)
_INDEXED = re.compile(r"(^|_)\d+$")


@dataclass(frozen=True)
class Branch:
    """One droppable residual branch: ``add = skip + out``."""

    name: str    # "<block>#<k>": k-th branch of the block, in graph order
    block: str   # module path of the block it belongs to
    add: str     # fx node names in the traced program
    skip: str
    out: str


def block_of(path: str) -> str:
    """Innermost module path whose last component is indexed (``layers.3``, ``encoder_layer_3``)."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        if _INDEXED.search(parts[end - 1]):
            return ".".join(parts[:end])
    return path


def _ancestors(node: fx.Node, stop: fx.Node) -> tuple[set[fx.Node], bool]:
    """Nodes ``node`` depends on (not crossing ``stop``) and whether ``stop`` is among them."""
    seen: set[fx.Node] = set()
    todo, reached = [node], False
    while todo:
        n = todo.pop()
        for a in n.all_input_nodes:
            if a is stop:
                reached = True
            elif a not in seen:
                seen.add(a)
                todo.append(a)
    return seen, reached


def find_branches(graph: fx.Graph, state_names: set[str]) -> list[Branch]:
    """Every residual branch in graph order (``state_names``: placeholder names of params)."""
    found: list[tuple[str, fx.Node, fx.Node, fx.Node]] = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in ADDS or len(node.args) < 2:
            continue
        a, b = node.args[0], node.args[1]
        if not isinstance(a, fx.Node) or not isinstance(b, fx.Node) or len(node.args) > 2 \
                or node.kwargs.get("alpha", 1) != 1:
            continue
        if not (shape_of(a) == shape_of(b) == shape_of(node)):
            continue
        for skip, out in ((a, b), (b, a)):
            inside, reached = _ancestors(out, skip)
            if reached and skip not in inside and any(
                    n.op == "placeholder" and n.name in state_names for n in inside):
                found.append((block_of(module_path(node)), node, skip, out))
                break
    counts: dict[str, int] = {}
    branches = []
    for block, add, skip, out in found:
        k = counts.get(block, 0)
        counts[block] = k + 1
        branches.append(Branch(f"{block}#{k}", block, add.name, skip.name, out.name))
    return branches


def blocks(branches: list[Branch]) -> dict[str, list[Branch]]:
    """Block name → its branches, in graph order."""
    out: dict[str, list[Branch]] = {}
    for b in branches:
        out.setdefault(b.block, []).append(b)
    return out


def resolve(branches: list[Branch], names: list[str]) -> list[Branch]:
    """The branches a plan names; an unknown name is an input error."""
    by_name = {b.name: b for b in branches}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise InputError(f"plan drops layer branch(es) {missing[:3]} that this model does not have",
                         "replay a plan on the model it was made for")
    return [by_name[n] for n in names]


def drop_branches(graph: fx.Graph, nodes: dict[str, fx.Node], branches: list[Branch],
                  zero_only: bool = False) -> None:
    """Rewrite each branch's add to its skip input (or, ``zero_only``, to ``skip + 0·out``).
    ``nodes`` maps the traced program's node names to this graph's nodes."""
    replaced: dict[fx.Node, fx.Node] = {}
    for b in branches:  # graph order: a later branch's skip may be an earlier dropped add
        add, skip, out = nodes[b.add], nodes[b.skip], nodes[b.out]
        while skip in replaced:
            skip = replaced[skip]
        if zero_only:
            with graph.inserting_before(add):
                zero = graph.call_function(aten.mul.Tensor, (out, 0.0))
            add.replace_input_with(out, zero)
        else:
            add.replace_all_uses_with(skip)
            graph.erase_node(add)
            replaced[add] = skip
    if not zero_only:
        graph.eliminate_dead_code(is_impure_node=_keeps_effect)


def _fresh(node: object) -> bool:
    """A tensor some graph op allocated (not an input, not a view of anything)."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    schema = getattr(node.target, "_schema", None)
    return schema is not None and not schema.is_mutable and bool(schema.returns) and all(
        r.alias_info is None for r in schema.returns)


def _keeps_effect(node: fx.Node) -> bool:
    """DCE keeps placeholders, outputs, mutating ops and checks on live values; inference-mode
    dropout (which fx counts as impure: it is random in training) goes with its branch."""
    if node.op in ("placeholder", "output"):
        return True
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return False
    if schema.is_mutable:  # removable only if it mutates a fresh tensor nothing else reads
        target = node.args[0] if node.args else None
        return not _fresh(target) or len(target.users) > 1
    if not schema.returns:  # a runtime check: keep it while what it checks is still used
        return any(len(a.users) > 1 for a in node.all_input_nodes)
    return False
