"""Empirical Fisher criterion: squared first-order loss change of masking a whole unit."""
from __future__ import annotations

import torch

from prunec.passes.base import register_pass
from prunec.passes.taylor import GradientCriterion, slice_sum


@register_pass("fisher")
class Fisher(GradientCriterion):
    """Score units by the empirical diagonal Fisher of a unit mask m (Theis et al., 2018;
    Liu et al., 2021 group Fisher): Σ_batches (∂L/∂m)² with ∂L/∂m = Σ_{elements} w · g.
    Unlike Taylor, signs inside a unit cancel before squaring.
    Before: groups without scores.  After: state.scores[group] from calibration gradients."""

    def batch_stat(self, w: torch.Tensor, g: torch.Tensor, dim: int) -> torch.Tensor:
        return slice_sum(w * g, dim).pow(2)
