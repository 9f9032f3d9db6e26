"""Pass infrastructure: a registry of classes, one small interface, a manager."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch

from prunec.calib import require_calib
from prunec.coupling import Coupling
from prunec.errors import InputError, InternalError, add_note
from prunec.plan import Plan
from prunec.registry import Registry
from prunec.trace import Program

PASSES: Registry = Registry("pass")  # name → Pass class


@dataclass(frozen=True)
class Services:
    """Later stages a pass may call to *try* a plan, handed in by the compiler, so that no pass
    imports the rewriter or the compiler (sensitivity, target search)."""

    prune: Callable[[Plan], torch.nn.Module]     # the program rewritten with a plan (not verified)
    original: Callable[[], torch.nn.Module]      # the unpruned program as a module
    macs: Callable[[torch.nn.Module], int]       # MACs of a module on the example inputs
    params: Callable[[torch.nn.Module], int]
    # the model as it will be deployed with a plan: the user's module class synced with the pruned
    # tensors when it follows, else the pruned program; and the unpruned model alike (latency runs); with
    # refit updates (pruned shapes) written into the pruned one when given
    deployed: Callable[..., tuple[torch.nn.Module, torch.nn.Module]] | None = None


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
    services: Services | None = None
    # what each pass of this run found (pass name → JSON-able dict); passes keep no state
    results: dict[str, Any] = field(default_factory=dict)

    def need_services(self, who: str) -> Services:
        if self.services is None:
            raise InputError(f"{who} needs to try plans, but this state has no services",
                             "run it through prunec.compile(passes=[...]), which provides them")
        return self.services

    def groups_to_score(self) -> list:
        """The coupling groups a criterion needs to score."""
        return [g for g in self.coupling.groups if self.kinds is None or g.kind in self.kinds]


@dataclass
class PassResult:
    state: State
    modified: bool


class Pass:
    """One compiler pass. Subclasses implement ``run``; ``ensures`` checks a post-condition.
    ``requires``/``provides`` name what it reads and writes — ``scores``, ``plan``, ``refits``,
    ``analysis`` — so the manager can check a pipeline's order before running it. A pass keeps
    no state between runs: what it finds goes to ``state`` (``results[name]``, ``plan.meta``)."""

    name = "pass"
    requires: tuple[str, ...] = ()
    provides: tuple[str, ...] = ()

    def run(self, state: State) -> PassResult:
        raise NotImplementedError

    def calibration(self, state: State, who: str | None = None) -> list:
        """This pass's own calibration batches (``self.calib``), else the compile's (``state.calib``);
        a one-line error naming ``who`` (default: the criterion) when there are none."""
        own = getattr(self, "calib", None)
        return require_calib(own if own is not None else state.calib, who or f"the '{self.name}' criterion")

    def ensures(self, state: State) -> None:
        return None

    def __call__(self, state: State) -> PassResult:
        result = self.run(state)
        self.ensures(result.state)
        return result


def register_pass(name: str) -> Callable[[type[Pass]], type[Pass]]:
    def wrap(cls: type[Pass]) -> type[Pass]:
        cls.name = name
        return PASSES.register(name)(cls)
    return wrap


def pipeline(passes: Iterable[Pass | str]) -> list[Pass]:
    """Pass instances from names (a fresh instance of the registered class) or instances."""
    out = []
    for p in passes:
        if isinstance(p, str):
            if p not in PASSES:
                raise InputError(f"unknown pass '{p}'", f"use one of {sorted(PASSES)}")
            p = PASSES[p]()
        out.append(p)
    return out


def check_order(passes: list[Pass], state: State) -> None:
    """Every pass's ``requires`` is provided by an earlier pass or already in ``state``."""
    have = {"scores"} if state.scores else set()
    have |= {"plan"} if state.plan.kept or state.plan.meta.get("dropped_layers") else set()
    for p in passes:
        missing = [r for r in p.requires if r not in have]
        if missing:
            makers = sorted((n for n, c in PASSES.items() if missing[0] in c.provides), key=lambda n: (n != "l1", n))[:6]
            raise InputError(f"pass '{p.name}' needs {missing[0]}, which no earlier pass provides",
                             f"put one of {makers} before it")
        have |= set(p.provides)


def run_passes(passes: Iterable[Pass | str], state: State) -> State:
    """Check the order, then run passes; after each, the plan must still fit the coupling.
    An error keeps its type and gains a note naming the pass."""
    passes = pipeline(passes)
    check_order(passes, state)
    for p in passes:
        try:
            state = p(state).state
        except Exception as err:
            add_note(err, f"in prunec pass '{p.name}'")
            raise
        try:
            state.plan.check(state.coupling)
        except InputError as err:
            raise InternalError(f"pass '{p.name}' left an invalid plan: {err.message}") from err
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
