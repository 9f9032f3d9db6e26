"""FLAP's fluctuation metric: how much removing an input channel of the consumer moves its output."""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from prunec.passes.activation import consumer_input_stats
from prunec.passes.base import Pass, PassResult, State, register_pass, unit_scores


@register_pass("flap")
class Flap(Pass):
    """Score input channel i of each consumer by Var(X_i) · ‖W[:, i, …]‖² (An et al., 2024, FLAP):
    the output energy a channel adds beyond its mean, which bias compensation (``refit='bias'``,
    the compile default for this method) restores: b += W[:, dropped] · mean(X[dropped]).
    Var over all calibration samples and positions; summed (normalised) over the group's consumers.
    Before: groups without scores.  After: state.scores[group] for groups with conv/linear consumers."""

    provides = ("scores",)

    def __init__(self, calib: Iterable[Any] | None = None) -> None:
        self.calib = calib

    def run(self, state: State) -> PassResult:
        calib = self.calibration(state)
        tensors = state.program.state()
        for name, (stats, cons) in consumer_input_stats(state, calib, state.groups_to_score()).items():
            elems = []
            for s, c in zip(stats, cons):
                w = tensors[c.fqn].detach().double()
                col = w.pow(2).movedim(1, 0).reshape(w.shape[1], -1).sum(1).numpy()
                elems.append(np.maximum(s["mean_sq"] - s["mean"] ** 2, 0.0) * col)
            state.scores[name] = unit_scores(elems, [c.rows for c in cons])
        return PassResult(state, True)
