"""Verifier: pruned model == original model with the removed units zeroed at their consumers."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree

from prunec.coupling import Coupling
from prunec.errors import PruneError
from prunec.layers import drop_branches
from prunec.plan import Plan
from prunec.program_module import ProgramModule, copy_graph
from prunec.rewrite import dropped_branches

EXACT_TOL = 1e-4


@dataclass
class VerifyResult:
    max_abs_err: float
    rel_err: float
    passed: bool
    exact: bool          # every pruned group is separable (no norm/softmax reads it)
    tolerance: float
    approximate_groups: list[str]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def reference_module(coupling: Coupling, plan: Plan) -> ProgramModule:
    """The original program with every consumed (contracted) slice of a dropped unit set to 0."""
    dropped_labels = plan.dropped_labels(coupling)
    dropped = coupling.dropped_by_key(dropped_labels)
    fqns = coupling.program.placeholder_fqns()
    state = coupling.program.state()
    for (node, dim), idx in dropped.items():
        fqn = fqns.get(node.name) if node.op == "placeholder" else None
        if fqn is not None and (fqn, dim) in coupling.consumed:
            t = state[fqn].detach().clone()
            t.index_fill_(dim, torch.as_tensor(idx, dtype=torch.long), 0.0)
            state[fqn] = t
    graph, node_map = copy_graph(coupling.program.graph)
    branches = dropped_branches(coupling, plan)
    if branches:  # a dropped layer's reference: its branch output times 0
        drop_branches(graph, {old.name: new for old, new in node_map.items()}, branches, zero_only=True)
    return ProgramModule(coupling.program, graph, state)


def compare(a: Any, b: Any) -> tuple[float, float]:
    """Max abs error and error relative to the reference's largest magnitude, over all outputs."""
    la = [t for t in pytree.tree_leaves(a) if isinstance(t, torch.Tensor)]
    lb = [t for t in pytree.tree_leaves(b) if isinstance(t, torch.Tensor)]
    if len(la) != len(lb) or any(x.shape != y.shape for x, y in zip(la, lb)):
        raise PruneError("pruned model's outputs have a different structure or shape than the original's",
                         "this is a prunec bug; please report it with the model")
    abs_err = max((float((x.float() - y.float()).abs().max()) for x, y in zip(la, lb) if x.numel()),
                  default=0.0)
    scale = max((float(y.float().abs().max()) for y in lb if y.numel()), default=0.0)
    return abs_err, abs_err / max(scale, 1e-12)


def verify(coupling: Coupling, plan: Plan, pruned: torch.nn.Module, inputs: tuple[Any, ...],
           kwargs: dict[str, Any] | None = None, tolerance: float = EXACT_TOL) -> VerifyResult:
    """Run pruned and reference on the same inputs; exact groups must agree within ``tolerance``."""
    kwargs = kwargs or {}
    reference = reference_module(coupling, plan)
    with torch.no_grad():
        want = reference(*inputs, **kwargs)
        got = pruned(*inputs, **kwargs)
    abs_err, rel_err = compare(got, want)
    approx = [n for n in plan.kept if coupling.group(n).approximate]
    exact = not approx
    passed = bool(np.isfinite(rel_err)) and (rel_err <= tolerance or not exact)
    return VerifyResult(abs_err, rel_err, passed, exact, tolerance, approx)
