"""Head importance (Michel et al., 2019, "Are Sixteen Heads Really Better than One?").

The importance of head h is I_h = E_x |∂L(x)/∂ξ_h|, where ξ_h is a gate (= 1) multiplying the
head's output. prunec does not edit the model to add gates: the head's output slice a_h enters
the output projection W_o through the input columns that the coupling marks as *consumed*
(``state.coupling.consumed``), and since y = W_o (ξ ⊙ a) + b,

    ∂L/∂ξ_h = Σ_tokens Σ_{j ∈ h} a_j Σ_i W_o[i, j] ∂L/∂y_i = Σ_{i, j ∈ h} W_o[i, j] · ∂L/∂W_o[i, j],

i.e. a Taylor term restricted to the consumer's columns, summed over the head *before* the
absolute value. It is exact, not an approximation. Per example (``per_example=True``, the paper's
expectation over x) or per calibration batch, |·| is taken and averaged; each layer's scores
(one head group) are then divided by their L2 norm across heads, as in the paper.

Loss: ``loss_fn(output, batch, label)`` when given; else cross-entropy against ``labels``; else
½‖output‖² (``prunec.calib``'s label-free proxy). For a sentence-embedding encoder the tempting
"negative cosine to the dense model's embedding" has zero gradient at the dense model itself
(the cosine is at its maximum), so every ∂L/∂ξ_h would be 0: it is not offered as a default.
Groups of other kinds (channel, mlp, hidden) are left unscored.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import numpy as np
import torch

from prunec.calib import call_args, grad_sums
from prunec.passes.base import PassResult, State, register_pass
from prunec.passes.taylor import GradientCriterion, slice_sum


def split_examples(batch: Any) -> list[Any]:
    """One calibration batch → single-example batches (every tensor sliced along dim 0; tensors
    whose dim 0 differs from the batch size, and non-tensors, are passed unchanged)."""
    args, kwargs = call_args(batch)
    tensors = [v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor) and v.dim()]
    if not tensors:
        return [batch]
    n = tensors[0].shape[0]

    def cut(v: Any, i: int) -> Any:
        return v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == n else v

    if kwargs:
        return [({k: cut(v, i) for k, v in kwargs.items()},) for i in range(n)]
    return [tuple(cut(v, i) for v in args) for i in range(n)]


@register_pass("head_importance")
class HeadImportance(GradientCriterion):
    """Score every ``head`` group by Michel et al.'s E|∂L/∂ξ_h| (see the module docstring).
    Before: head groups without scores.  After: state.scores[head group] (L2-normalised per layer)."""

    def __init__(self, calib: Iterable[Any] | None = None,
                 labels: Iterable[torch.Tensor] | None = None,
                 loss_fn: Callable[[Any, Any, torch.Tensor | None], torch.Tensor] | None = None,
                 per_example: bool = True, normalize: bool = True, seed: int = 0) -> None:
        super().__init__(calib, labels, seed)
        self.loss_fn, self.per_example, self.normalize = loss_fn, per_example, normalize

    def gates(self, state: State) -> dict[str, list[tuple[str, int, np.ndarray]]]:
        """Head group → [(fqn, dim, head → column indices)] of the parameters consuming it."""
        params = state.program.param_fqns()
        out = {}
        for group in state.coupling.groups:
            if group.kind != "head":
                continue
            cons = [(f, d, rows) for (f, d), rows in group.members.items()
                    if f in params and (f, d) in state.coupling.consumed]
            if cons:
                out[group.name] = cons
            else:
                state.notes.append(f"head_importance: {group.name} has no consuming projection; "
                                   "left unscored")
        return out

    def run(self, state: State) -> PassResult:
        calib = self.calibration(state)
        labels = list(self.labels) if self.labels is not None else None
        if self.per_example:
            pieces = [split_examples(b) for b in calib]
            if labels is not None:
                labels = [lab[i:i + 1] for lab, p in zip(labels, pieces) for i in range(len(p))]
            calib = [e for p in pieces for e in p]
        gates = self.gates(state)
        sums: dict[str, Any] = {"count": 0, "totals": {name: 0.0 for name in gates}}
        totals = sums["totals"]

        def accumulate(weights: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
            sums["count"] += 1
            for name, cons in gates.items():
                signed = 0.0  # ∂L/∂ξ_h: summed over the head (and consumers) before |·|
                for fqn, dim, rows in cons:
                    per_index = slice_sum(weights[fqn].double() * grads[fqn].double(), dim)
                    signed = signed + per_index.numpy()[rows].sum(axis=1)
                totals[name] = totals[name] + np.abs(signed)

        grad_sums(state.model, calib, accumulate, labels, 0, self.seed, loss_fn=self.loss_fn, sums=sums)
        for name, total in sums["totals"].items():
            score = np.asarray(total, dtype=np.float64) / max(sums["count"], 1)
            norm = np.linalg.norm(score)
            state.scores[name] = score / norm if self.normalize and norm > 0 else score
        return PassResult(state, True)
