"""Taylor criterion: first-order loss change of removing a unit, |w · ∂L/∂w| on calibration data."""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch

from prunec.calib import grad_sums
from prunec.passes.base import Pass, PassResult, State, param_members, register_pass, unit_scores


class GradientCriterion(Pass):
    """Shared machinery: accumulate a per-element (or per-slice) statistic of weights and
    gradients over calibration batches, then aggregate per unit like ``unit_scores``."""

    provides = ("scores",)

    hessian_probes = 0

    def __init__(self, calib: Iterable[Any] | None = None,
                 labels: Iterable[torch.Tensor] | None = None, seed: int = 0) -> None:
        self.calib, self.labels, self.seed = calib, labels, seed

    def batch_stat(self, w: torch.Tensor, g: torch.Tensor, dim: int) -> torch.Tensor:
        """Per-index statistic along ``dim`` for one batch (summed over batches)."""
        raise NotImplementedError

    def run(self, state: State) -> PassResult:
        calib = self.calibration(state)
        wanted = {(fqn, dim) for g in state.coupling.groups for fqn, dim, _ in param_members(state, g.name)}
        sums: dict[tuple[str, int], torch.Tensor] = {}

        def accumulate(weights: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
            for fqn, dim in wanted:
                if fqn in weights:
                    stat = self.batch_stat(weights[fqn].double(), grads[fqn].double(), dim)
                    sums[(fqn, dim)] = sums.get((fqn, dim), 0) + stat

        grad_sums(state.model, calib, accumulate, self.labels, self.hessian_probes, self.seed, sums=sums)
        for group in state.groups_to_score():
            members = [(f, d, r) for f, d, r in param_members(state, group.name) if (f, d) in sums]
            if members:
                elems = [sums[(f, d)].numpy().astype(np.float64) for f, d, _ in members]
                state.scores[group.name] = unit_scores(elems, [r for *_, r in members])
        return PassResult(state, True)


def slice_sum(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over every dim but ``dim``."""
    return t.movedim(dim, 0).reshape(t.shape[dim], -1).sum(1)


@register_pass("taylor")
class Taylor(GradientCriterion):
    """Score units by Σ_batches Σ_elements |w · ∂L/∂w| (Molchanov et al., 2017/2019).
    Loss: cross-entropy vs. ``labels`` when given, else ½‖output‖².
    Before: groups without scores.  After: state.scores[group] from calibration gradients."""

    def batch_stat(self, w: torch.Tensor, g: torch.Tensor, dim: int) -> torch.Tensor:
        return slice_sum((w * g).abs(), dim)
