"""Wanda, structured: weight magnitude times input-activation norm on the consumer's input dim."""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch

from prunec.passes.activation import consumer_input_stats
from prunec.passes.base import Pass, PassResult, State, register_pass, unit_scores


@register_pass("wanda")
class Wanda(Pass):
    """Score input unit i of each consumer by Σ_o |W[o, i, …]| · ‖X_i‖₂ (Sun et al., 2023,
    structured per input channel as in their channel variant); ‖X_i‖₂ over all calibration
    samples and positions. Summed (normalised) over the group's consumers.
    Before: groups without scores.  After: state.scores[group] for groups with consumers."""

    provides = ("scores",)

    def __init__(self, calib: Iterable[Any] | None = None) -> None:
        self.calib = calib

    def run(self, state: State) -> PassResult:
        calib = self.calibration(state)
        tensors = state.program.state()
        for name, (stats, cons) in consumer_input_stats(state, calib, state.coupling.groups).items():
            elems = []
            for s, c in zip(stats, cons):
                w = tensors[c.fqn].detach().double()
                col = w.abs().movedim(1, 0).reshape(w.shape[1], -1).sum(1).numpy()
                elems.append(col * np.sqrt(s["sum_sq"]))
            state.scores[name] = unit_scores(elems, [c.rows for c in cons])
        return PassResult(state, True)
