"""Magnitude criteria: L1 / L2 norm of every weight slice a unit owns."""
from __future__ import annotations


from prunec.passes.base import Pass, PassResult, State, norm_along, param_members, register_pass, unit_scores


@register_pass("magnitude")
class Magnitude(Pass):
    """Score each unit by the norm of all parameter slices coupled to it (Li et al., 2017).
    Before: groups without scores.  After: state.scores[group] = importance per unit."""

    provides = ("scores",)

    def __init__(self, p: int = 1) -> None:
        if p not in (1, 2):
            raise ValueError("p must be 1 or 2")
        self.p = p

    def run(self, state: State) -> PassResult:
        tensors = state.program.state()
        for group in state.groups_to_score():
            members = param_members(state, group.name)
            if not members:
                continue
            elems = [norm_along(tensors[fqn], dim, self.p) for fqn, dim, _ in members]
            state.scores[group.name] = unit_scores(elems, [rows for *_, rows in members])
        return PassResult(state, True)


@register_pass("l1")
class L1(Magnitude):
    """L1 magnitude."""

    def __init__(self) -> None:
        super().__init__(1)


@register_pass("l2")
class L2(Magnitude):
    """L2 magnitude."""

    def __init__(self) -> None:
        super().__init__(2)
