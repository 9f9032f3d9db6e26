"""BN-γ criterion (network slimming): |γ| of the batch norms coupled to a unit."""
from __future__ import annotations

import torch

from prunec.passes.base import Pass, PassResult, State, register_pass, unit_scores
from prunec.passes.magnitude import Magnitude


@register_pass("bn")
class BNScale(Pass):
    """Score units by |γ| of every BatchNorm in the group (Liu et al., 2017).
    Groups without a BatchNorm fall back to L1 magnitude (noted in the report)."""

    provides = ("scores",)

    def run(self, state: State) -> PassResult:
        tensors = state.program.state()
        bn_weights = {f"{name}.weight" for name, m in state.model.named_modules()
                      if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.affine}
        fallback = []
        for group in state.groups_to_score():
            members = [(fqn, rows) for (fqn, dim), rows in group.members.items() if fqn in bn_weights]
            if not members:
                fallback.append(group.name)
                continue
            elems = [tensors[fqn].detach().abs().double().numpy() for fqn, _ in members]
            state.scores[group.name] = unit_scores(elems, [rows for _, rows in members])
        if fallback:
            l1 = Magnitude(1).run(state).state.scores
            keep = {n: state.scores[n] for n in state.scores if n not in fallback}
            state.scores = {**l1, **keep}
            state.notes.append(f"bn: {len(fallback)} groups have no BatchNorm; scored by L1")
        return PassResult(state, True)
