"""Wanda-sp: Wanda's |W| · ‖X‖ summed over every weight of a structured unit (producers and consumers)."""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from prunec.passes.activation import consumers, input_stats
from prunec.passes.base import Pass, PassResult, State, register_pass, unit_scores


@register_pass("wanda_sp")
class WandaSP(Pass):
    """Score unit u by Σ_{w ∈ u} |w| · ‖X_in(w)‖₂ (Wanda, Sun et al. 2023, structured as the
    Wanda-sp baseline of An et al. 2024): the consumer columns |W[o, i]| · ‖X_i‖ (what ``wanda``
    scores) plus the producer rows |W[u, j]| · ‖X_j‖ of the layers that write the unit, e.g. for a
    Llama MLP channel the gate/up rows and the down_proj column. ‖X‖ over all calibration positions.
    Before: groups without scores.  After: state.scores[group] for groups with conv/linear users."""

    provides = ("scores",)

    def __init__(self, calib: Iterable[Any] | None = None) -> None:
        self.calib = calib

    def run(self, state: State) -> PassResult:
        calib = self.calibration(state)
        tensors = state.program.state()
        users = {g.name: (consumers(state, g, 1), consumers(state, g, 0)) for g in state.groups_to_score()}
        users = {k: v for k, v in users.items() if v[0] or v[1]}
        stats = input_stats(state, calib, [c for cons, prods in users.values() for c in cons + prods])
        for name, (cons, prods) in users.items():
            elems, rows = [], []
            for c in cons:   # columns: Σ_o |W[o, i, …]| · ‖X_i‖
                w = tensors[c.fqn].detach().double().abs()
                elems.append(w.movedim(1, 0).reshape(w.shape[1], -1).sum(1).numpy() * np.sqrt(stats[id(c)]["sum_sq"]))
                rows.append(c.rows)
            for p in prods:  # rows: Σ_j |W[u, j, …]| · ‖X_j‖
                w = tensors[p.fqn].detach().double().abs()
                norm = np.sqrt(stats[id(p)]["sum_sq"])
                per_in = w.reshape(w.shape[0], w.shape[1], -1).sum(2).numpy()
                elems.append(per_in @ norm)
                rows.append(p.rows)
            state.scores[name] = unit_scores(elems, rows)
        return PassResult(state, True)
