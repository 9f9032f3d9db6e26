"""Movement criterion (Sanh et al., 2020, "Movement Pruning: Adaptive Sparsity by Fine-Tuning").

S = −Σ_t W_t · ∂L/∂W_t, accumulated element-wise over ``steps`` SGD steps of a short
fine-tuning trace: weights moving away from zero score high, weights moving towards zero low.
The trace runs on a *copy* of the parameters through ``torch.func.functional_call``; the user's
module (its parameters, ``.grad`` fields and train/eval mode) is never modified. The module is
run in eval mode (BatchNorm uses its running statistics, dropout is off).

Loss: ``loss_fn(output, batch, label)`` when given; else cross-entropy against ``labels`` (one
tensor per calibration batch); else ½‖output‖² (the label-free proxy of ``prunec.calib``).
Per unit: S summed over each slice a unit owns; every member is divided by its mean |S| (scale
only, the sign is kept: S is signed, unlike the other criteria) and the members are summed.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
import torch

from prunec.calib import _loss, call_args
from prunec.passes.base import Pass, PassResult, State, param_members, register_pass
from prunec.passes.taylor import slice_sum


def signed_unit_scores(element_scores: list[np.ndarray], rows: list[np.ndarray]) -> np.ndarray:
    """Like ``unit_scores`` for signed statistics: normalise each member by its mean |·|."""
    total = None
    for scores, r in zip(element_scores, rows):
        scale = np.abs(scores).mean()
        part = (scores / scale if scale > 0 else scores)[r].mean(axis=1)
        total = part if total is None else total + part
    return total


@register_pass("movement")
class Movement(Pass):
    """Score units by accumulated movement −Σ_t W·g over a short SGD trace on a parameter copy.
    Before: groups without scores.  After: state.scores[group] (higher = moving away from 0)."""

    provides = ("scores",)

    def __init__(self, calib: Iterable[Any] | None = None, steps: int = 20, lr: float = 1e-2,
                 loss_fn: Callable[[Any, Any, torch.Tensor | None], torch.Tensor] | None = None,
                 labels: Iterable[torch.Tensor] | None = None) -> None:
        if steps < 1:
            raise ValueError("steps must be ≥ 1")
        self.calib, self.steps, self.lr, self.loss_fn, self.labels = calib, steps, lr, loss_fn, labels

    def run(self, state: State) -> PassResult:
        calib = self.calibration(state)
        labels = list(self.labels) if self.labels is not None else None
        model = state.model
        names = [n for n, p in model.named_parameters() if p.is_floating_point()]
        params = {n: p.detach().clone() for n, p in model.named_parameters() if n in names}
        movement = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
        was_training = model.training
        model.eval()
        try:
            for t in range(self.steps):
                i = t % len(calib)
                args, kwargs = call_args(calib[i])
                leaves = {n: p.requires_grad_(True) for n, p in params.items()}
                with torch.enable_grad():
                    output = torch.func.functional_call(model, leaves, args, kwargs)
                    label = None if labels is None else labels[i]
                    loss = _loss(output, label) if self.loss_fn is None else \
                        self.loss_fn(output, calib[i], label)
                    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
                with torch.no_grad():
                    new = {}
                    for (n, w), g in zip(leaves.items(), grads):
                        w = w.detach()
                        if g is not None:
                            movement[n] -= w.double() * g.double()
                            w = w - self.lr * g
                        new[n] = w
                    params = new
        finally:
            model.train(was_training)
        for group in state.coupling.groups:
            members = [(f, d, r) for f, d, r in param_members(state, group.name) if f in movement]
            if members:
                elems = [slice_sum(movement[f], d).numpy() for f, d, _ in members]
                state.scores[group.name] = signed_unit_scores(elems, [r for *_, r in members])
        return PassResult(state, True)
