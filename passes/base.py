"""Pass infrastructure: a registry of classes, one small interface, a manager."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch

from prunec.coupling import Coupling
from prunec.errors import add_note
from prunec.plan import Plan
from prunec.trace import Program

PASSES: dict[str, type["Pass"]] = {}


@dataclass
class State:
    """What passes read and write: the traced program, its groups, scores and the plan."""

    model: torch.nn.Module
    program: Program
    coupling: Coupling
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    plan: Plan = field(default_factory=Plan)
    calib: Iterable[Any] | None = None
    notes: list[str] = field(default_factory=list)
    # new values (in the *pruned* shape) for state tensors, e.g. a least-squares refit of the
    # layer that consumes pruned channels; applied after the structural rewrite is verified
    updates: dict[str, torch.Tensor] = field(default_factory=dict)
    # group kinds the selection will prune (None: all); criteria skip the others
    kinds: set[str] | None = None

    def groups_to_score(self) -> list:
        """The coupling groups a criterion needs to score."""
        return [g for g in self.coupling.groups if self.kinds is None or g.kind in self.kinds]


@dataclass
class PassResult:
    state: State
    modified: bool


class Pass:
    """One compiler pass. Subclasses implement ``run``; ``ensures`` checks a post-condition."""

    name = "pass"

    def run(self, state: State) -> PassResult:
        raise NotImplementedError

    def ensures(self, state: State) -> None:
        return None

    def __call__(self, state: State) -> PassResult:
        result = self.run(state)
        self.ensures(result.state)
        return result


def register_pass(name: str) -> Callable[[type[Pass]], type[Pass]]:
    def wrap(cls: type[Pass]) -> type[Pass]:
        if name in PASSES:
            raise ValueError(f"duplicate pass name {name}")
        cls.name = name
        PASSES[name] = cls
        return cls
    return wrap


def run_passes(passes: Iterable[Pass], state: State) -> State:
    """Run passes in order; an error keeps its type and gains a note naming the pass."""
    for p in passes:
        try:
            state = p(state).state
        except Exception as err:
            add_note(err, f"in prunec pass '{p.name}'")
            raise
    return state


def param_members(state: State, group_name: str) -> list[tuple[str, int, np.ndarray]]:
    """(fqn, dim, unit→element index matrix) for every parameter (not buffer) in a group."""
    params = state.program.param_fqns()
    group = state.coupling.group(group_name)
    return [(fqn, dim, rows) for (fqn, dim), rows in group.members.items() if fqn in params]


def norm_along(tensor: torch.Tensor, dim: int, p: int) -> np.ndarray:
    """The L``p`` norm of every slice ``tensor.select(dim, i)`` (one pass, no copies)."""
    others = [d for d in range(tensor.dim()) if d != dim]
    t = tensor.detach()
    norms = torch.linalg.vector_norm(t, ord=p, dim=others) if others else t.abs()
    return norms.double().cpu().numpy()


def unit_scores(element_scores: list[np.ndarray], rows: list[np.ndarray]) -> np.ndarray:
    """Aggregate member scores into unit scores: each member normalised by its mean, then summed."""
    total = None
    for scores, r in zip(element_scores, rows):
        mean = scores.mean()
        part = (scores / mean if mean > 0 else scores)[r].mean(axis=1)
        total = part if total is None else total + part
    return total
