"""Optimal Brain Damage: second-order saliency ½ · h · w² with a Hutchinson Hessian diagonal."""
from __future__ import annotations

from typing import Any, Iterable

import torch

from prunec.passes.base import register_pass
from prunec.passes.taylor import GradientCriterion, slice_sum


@register_pass("obd")
class OBD(GradientCriterion):
    """Score units by Σ ½ · |h| · w² over their elements (LeCun et al., 1990), h the Hessian
    diagonal estimated by Hutchinson's method E[v ⊙ Hv] (Rademacher v, ``probes`` per batch).
    |h| guards against the estimator's negative noise.
    Before: groups without scores.  After: state.scores[group] from calibration curvature."""

    def __init__(self, calib: Iterable[Any] | None = None,
                 labels: Iterable[torch.Tensor] | None = None, seed: int = 0, probes: int = 4) -> None:
        super().__init__(calib, labels, seed)
        self.hessian_probes = probes

    def batch_stat(self, w: torch.Tensor, h: torch.Tensor, dim: int) -> torch.Tensor:
        return slice_sum(0.5 * h.abs() * w.pow(2), dim)
