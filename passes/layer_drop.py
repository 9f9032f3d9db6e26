"""Layer dropping: remove whole residual blocks ``y = x + f(x)`` → ``y = x``."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import fx

from prunec.calib import calls, collect
from prunec.distributed import world
from prunec.errors import InputError
from prunec.layers import Branch, blocks, find_branches
from prunec.passes.base import Pass, PassResult, State, register_pass

CRITERIA = ("angular", "position")
# common names for the same scores: ShortGPT's Block Influence is 1 − cos(in, out), what "angular" computes
ALIASES = {"block-influence": "angular", "block_influence": "angular", "bi": "angular", "shortgpt": "angular",
           "cosine": "angular", "last": "position"}


def layer_criterion(name: str) -> str | None:
    """The layer criterion a --method name means, or None if it is not one."""
    name = name.lower()
    return name if name in CRITERIA else ALIASES.get(name)


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
        if layer_criterion(by) is None:
            raise InputError(f"unknown layer criterion '{by}'", f"use one of {CRITERIA + tuple(ALIASES)}")
        self.ratio, self.by, self.keep_last = ratio, layer_criterion(by), keep_last

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
        """1 − cos(block input, block output) on the example (and calibration) inputs, averaged over
        batches (every rank's calibration shard; the example counted once, on rank 0)."""
        program = state.program
        skip_of = [bs[0].skip for bs in by_block.values()]
        ends: dict[str, list[int]] = {}
        for i, bs in enumerate(by_block.values()):
            ends.setdefault(bs[-1].add, []).append(i)
        example = [(program.example_inputs, program.example_kwargs)] if world()[0] == 0 else []
        batches = [*example, *calls(state.calib or ())]
        sums = {"total": np.zeros(len(by_block)), "n": len(batches)}
        values: dict[str, torch.Tensor] = {}   # this batch's block inputs

        def on_value(node: fx.Node, value: Any) -> None:
            if node.name in ends:
                for i in ends[node.name]:
                    sums["total"][i] += _cosine_distance(values[skip_of[i]], value.detach().float())
            if node.name in skip_of:
                values[node.name] = value.detach().float()

        collect(program, batches, on_value, sums=sums)
        return sums["total"] / sums["n"]
