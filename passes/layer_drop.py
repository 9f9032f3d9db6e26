"""Layer dropping: remove whole residual blocks ``y = x + f(x)`` → ``y = x``."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import fx

from prunec.calib import calls
from prunec.errors import InputError
from prunec.layers import Branch, blocks, find_branches
from prunec.passes.base import Pass, PassResult, State, register_pass
from prunec.program_module import ProgramModule, copy_graph

CRITERIA = ("angular", "position")


class _Recorder(fx.Interpreter):
    """Runs the traced graph and keeps the values of the named nodes."""

    def __init__(self, gm: fx.GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names, self.values = names, {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = out.detach().float()
        return out


def _cosine_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Angular distance per token, averaged: 1 − cos(x[..., :], y[..., :])."""
    cos = torch.nn.functional.cosine_similarity(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]), dim=-1)
    return float((1.0 - cos).mean())


@register_pass("layer_drop")
class LayerDrop(Pass):
    """Drop the ``ratio`` least influential residual blocks (Men et al., 2024, ShortGPT's Block
    Influence; Gromov et al., 2024, angular distance), or the last ones (``by="position"``).
    Before: y = x + attn(x); z = y + mlp(y)      After: z = x   (block dropped)
    Writes plan.meta["dropped_layers"]: branch names, replayed by the rewriter."""

    provides = ("plan",)

    def __init__(self, ratio: float, by: str = "angular", keep_last: bool = True) -> None:
        if by not in CRITERIA:
            raise InputError(f"unknown layer criterion '{by}'", f"use one of {CRITERIA}")
        self.ratio, self.by, self.keep_last = ratio, by, keep_last

    def run(self, state: State) -> PassResult:
        program = state.program
        params = set(program.placeholder_fqns())
        by_block = blocks(find_branches(program.graph, params))
        names = list(by_block)
        n_drop = min(int(round(self.ratio * len(names))), max(len(names) - 1, 0))
        if n_drop == 0:
            state.notes.append(f"layers: {len(names)} residual blocks found, none dropped")
            return PassResult(state, False)
        scores = self.scores(state, by_block) if self.by == "angular" else \
            np.arange(len(names), dtype=np.float64)[::-1].copy()
        candidates = np.arange(len(names) - 1 if self.keep_last and len(names) > 1 else len(names))
        order = candidates[np.argsort(scores[candidates], kind="stable")]
        dropped = sorted(order[:n_drop].tolist())
        state.plan.meta["dropped_layers"] = [b.name for i in dropped for b in by_block[names[i]]]
        state.plan.meta["layer_scores"] = {names[i]: round(float(scores[i]), 6) for i in range(len(names))}
        state.scores["layers"] = scores
        return PassResult(state, True)

    def scores(self, state: State, by_block: dict[str, list[Branch]]) -> np.ndarray:
        """1 − cos(block input, block output) on the example (and calibration) inputs."""
        program = state.program
        module = ProgramModule(program, copy_graph(program.graph)[0], program.state())
        wanted = {n for bs in by_block.values() for n in (bs[0].skip, bs[-1].add)}
        total = np.zeros(len(by_block))
        batches = [(program.example_inputs, program.example_kwargs), *calls(state.calib or ())]
        for batch in batches:
            leaves = iter(pytree.tree_leaves(batch))
            flat = [next(leaves) if kind == "user" else getattr_path(module, fqn)
                    for kind, fqn in module._inputs]
            rec = _Recorder(module.graph_module, wanted)
            with torch.no_grad():
                rec.run(*flat)
            total += [_cosine_distance(rec.values[bs[0].skip], rec.values[bs[-1].add])
                      for bs in by_block.values()]
        return total / len(batches)


def getattr_path(root: torch.nn.Module, fqn: str) -> torch.Tensor:
    for part in fqn.split("."):
        root = getattr(root, part)
    return root
