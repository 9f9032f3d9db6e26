"""Cut: a plan resolved once against a coupling — every index, branch and size a stage removes.

``Cut.of(coupling, plan)`` checks the plan and computes, once, the removed indices of every
(value, dim), the residual branches dropped, and the new sizes. The rewriter, the verifier,
module sync, the refit passes and cost all read this object instead of recomputing it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterable

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import fx

from prunec.coupling import Coupling, Key, shape_of
from prunec.errors import InputError
from prunec.layers import Branch, blocks, find_branches, resolve
from prunec.plan import Plan


@dataclass
class Sizes:
    """New size of every (value, dim) given what was dropped."""

    dropped: dict[Key, np.ndarray]

    def shape(self, node: fx.Node) -> list[int]:
        return [s - len(self.dropped.get((node, d), ())) for d, s in enumerate(shape_of(node) or ())]

    def changed(self, node: fx.Node) -> bool:
        return any((node, d) in self.dropped for d in range(len(shape_of(node) or ())))


@dataclass
class Cut:
    """What a plan removes from one traced program, resolved once."""

    coupling: Coupling
    plan: Plan
    dropped: dict[Key, np.ndarray]            # (value, dim) → sorted removed indices
    branches: list[Branch] = field(default_factory=list)   # residual branches replaced by their skip

    @classmethod
    def of(cls, coupling: Coupling, plan: Plan) -> "Cut":
        """Check ``plan`` against ``coupling`` and resolve it."""
        plan.check(coupling)
        dropped = coupling.dropped_by_key(plan.dropped_labels(coupling))
        return cls(coupling, plan, dropped, _branches(coupling, plan))

    # -- which groups -------------------------------------------------------
    @property
    def groups(self) -> list[str]:
        """Names of the groups that lose at least one unit."""
        return [n for n, kept in self.plan.kept.items() if len(kept) < self.coupling.group(n).size]

    @property
    def approximate(self) -> list[str]:
        """Cut groups whose removal is not exact (a norm, softmax or reduction reads them)."""
        return [n for n in self.groups if self.coupling.group(n).approximate]

    @property
    def exact(self) -> list[str]:
        return [n for n in self.groups if not self.coupling.group(n).approximate]

    def restrict(self, names: Iterable[str], branches: bool) -> "Cut":
        """The sub-cut of only the named groups (and the dropped branches if ``branches``)."""
        names = set(names)
        meta = dict(self.plan.meta)
        if not branches:
            meta.pop("dropped_layers", None)
        plan = Plan({n: k for n, k in self.plan.kept.items() if n in names},
                    {n: s for n, s in self.plan.sizes.items() if n in names}, meta)
        dropped = self.coupling.dropped_by_key(plan.dropped_labels(self.coupling))
        return Cut(self.coupling, plan, dropped, list(self.branches) if branches else [])

    # -- sizes and state ----------------------------------------------------
    @cached_property
    def sizes(self) -> Sizes:
        return Sizes(self.dropped)

    @cached_property
    def state_dropped(self) -> dict[tuple[str, int], np.ndarray]:
        """(fqn, dim) → removed indices, for every lifted parameter/buffer/constant."""
        fqns = self.coupling.program.placeholder_fqns()
        return {(fqns[node.name], dim): idx for (node, dim), idx in self.dropped.items()
                if node.op == "placeholder" and node.name in fqns}

    def kept(self, fqn: str, dim: int, size: int) -> np.ndarray:
        """Indices of ``fqn``'s dim ``dim`` (original size ``size``) that survive."""
        mask = np.ones(size, dtype=bool)
        mask[self.state_dropped.get((fqn, dim), np.zeros(0, np.int64))] = False
        return np.nonzero(mask)[0]

    def slice(self, fqn: str, tensor: torch.Tensor, skip: Iterable[int] = ()) -> torch.Tensor:
        """``tensor`` (in ``fqn``'s original shape, except dims in ``skip``) cut to its pruned shape."""
        skip = set(skip)
        for (f, dim), gone in sorted(self.state_dropped.items(), key=lambda kv: kv[0][1]):
            if f == fqn and dim not in skip and len(gone):
                keep = self.kept(fqn, dim, tensor.shape[dim])
                tensor = tensor.index_select(dim, torch.as_tensor(keep, dtype=torch.long))
        return tensor

    def renumber(self, fqn: str, dim: int, index: np.ndarray) -> np.ndarray:
        """Original indices along (fqn, dim) → their positions after this cut (none may be dropped)."""
        gone = self.state_dropped.get((fqn, dim))
        if gone is None or not len(gone):
            return np.asarray(index, dtype=np.int64)
        return np.asarray(index, dtype=np.int64) - np.searchsorted(gone, index)

    # -- a part's own inputs and outputs (prunec.ties: dims tied across parts) --
    @cached_property
    def io_dropped(self) -> tuple[dict[int, list[tuple[int, np.ndarray]]], dict[int, list[tuple[int, np.ndarray]]]]:
        """Removed indices of the user inputs and outputs, by pytree leaf: ({leaf: [(dim, idx)]}, same for
        outputs). Empty unless the coupling was built with open inputs/outputs."""
        def at(nodes: list[Any]) -> dict[int, list[tuple[int, np.ndarray]]]:
            out: dict[int, list[tuple[int, np.ndarray]]] = {}
            for i, node in enumerate(nodes):
                cuts = [(d, self.dropped[(node, d)]) for d in range(len(shape_of(node) or ()))
                        if len(self.dropped.get((node, d), ()))]
                if cuts:
                    out[i] = cuts
            return out
        program = self.coupling.program
        return at(program.user_inputs()), at(program.user_outputs())

    def shrink_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The example-shaped (args, kwargs) as the pruned program takes them: removed input units cut out."""
        return _edit_leaves((tuple(args), dict(kwargs)), self.io_dropped[0], _cut)

    def widen_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Pruned-shaped (args, kwargs) back in the original shape, zeros where units were removed (the
        reference zeroes their consumers, so any value would do)."""
        return _edit_leaves((tuple(args), dict(kwargs)), self.io_dropped[0], _uncut)

    def shrink_outputs(self, outputs: Any) -> Any:
        """The original program's outputs with the units the cut removes from them cut out."""
        return _edit_leaves(outputs, self.io_dropped[1], _cut)

    # -- layers -------------------------------------------------------------
    def blocks(self) -> list[str]:
        """Module paths of residual blocks whose every branch the cut drops."""
        if not self.branches:
            return []
        names = {b.name for b in self.branches}
        program = self.coupling.program
        by_block = blocks(find_branches(program.graph, set(program.placeholder_fqns())))
        partial = [b for b, bs in by_block.items() if 0 < sum(x.name in names for x in bs) < len(bs)]
        if partial:
            raise InputError(f"block {partial[0]} is only partly dropped: its module can't express that",
                             "drop every branch of a block, or use the returned program")
        return [b for b, bs in by_block.items() if all(x.name in names for x in bs)]


def _branches(coupling: Coupling, plan: Plan) -> list[Branch]:
    """The residual branches ``plan.meta["dropped_layers"]`` names (see prunec.layers)."""
    names = plan.meta.get("dropped_layers") or []
    if not names:
        return []
    program = coupling.program
    return resolve(find_branches(program.graph, set(program.placeholder_fqns())), list(names))


def _edit_leaves(tree: Any, where: dict[int, list[tuple[int, np.ndarray]]],
                 edit: Any) -> Any:
    """``tree`` with ``edit(tensor, dim, removed)`` applied to the leaves (by pytree position) in ``where``."""
    if not where:
        return tree
    leaves, spec = pytree.tree_flatten(tree)
    for i, cuts in where.items():
        for dim, removed in sorted(cuts, key=lambda c: c[0]):
            leaves[i] = edit(leaves[i], dim, removed)
    return pytree.tree_unflatten(leaves, spec)


def _cut(t: torch.Tensor, dim: int, removed: np.ndarray) -> torch.Tensor:
    keep = np.setdiff1d(np.arange(t.shape[dim]), removed)
    return t.index_select(dim, torch.as_tensor(keep, dtype=torch.long))


def _uncut(t: torch.Tensor, dim: int, removed: np.ndarray) -> torch.Tensor:
    size = t.shape[dim] + len(removed)
    keep = np.setdiff1d(np.arange(size), removed)
    shape = list(t.shape)
    shape[dim] = size
    return t.new_zeros(shape).index_copy_(dim, torch.as_tensor(keep, dtype=torch.long), t)
