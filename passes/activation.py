"""Activation criteria: mean |a| and variance of each unit's activation, on calibration data."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from torch import fx

from prunec.calib import collect
from prunec.coupling import Group
from prunec.passes.base import Pass, PassResult, State, register_pass, unit_scores

aten = torch.ops.aten
CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default}
LINEAR = aten.linear.default


@dataclass
class Consumer:
    """A conv/linear that contracts a group's units: ``weight[:, rows[u]]`` reads unit u."""

    fqn: str              # the consumer's weight
    op: fx.Node           # the conv/linear node
    x: fx.Node            # its input activation
    rows: np.ndarray      # (units, k): indices along the weight's input dim (1); output dim for producers
    conv: bool

    @property
    def channel_dim(self) -> int:
        return 1 if self.conv else -1

    def conv_args(self) -> dict[str, Any]:
        """stride / padding / dilation of a conv consumer, as ``F.unfold`` wants them."""
        args = list(self.op.args) + [None] * 7
        nd = len(self.op.meta["val"].shape) - 2
        def norm(v: Any, default: int) -> tuple[int, ...]:
            v = default if v is None else v
            return tuple(v) if isinstance(v, (list, tuple)) else (v,) * nd
        return {"stride": norm(args[3], 1), "padding": norm(args[4], 0), "dilation": norm(args[5], 1)}


def consumers(state: State, group: Group, dim: int = 1) -> list[Consumer]:
    """The group's consumer convs/linears (dense, groups == 1) with their input nodes; with ``dim=0``
    its producers instead (``rows`` then index the weight's output dim)."""
    by_name = {v: k for k, v in state.program.placeholder_fqns().items()}
    nodes = {n.name: n for n in state.program.graph.nodes}
    out = []
    for (fqn, d), rows in group.members.items():
        if d != dim or (dim == 1 and (fqn, d) not in state.coupling.consumed) or fqn not in by_name:
            continue
        ph = nodes[by_name[fqn]]
        for op in ph.users:
            if op.op != "call_function" or len(op.args) < 2 or op.args[1] is not ph:
                continue
            conv = op.target in CONVS
            if conv and (op.args[6] if len(op.args) > 6 else 1) != 1:
                continue
            if conv or op.target is LINEAR:
                out.append(Consumer(fqn, op, op.args[0], rows, conv))
    return out


def consumer_input_stats(state: State, calib: Iterable[Any], groups: list[Group]
                         ) -> dict[str, tuple[dict[str, np.ndarray], list[Consumer]]]:
    """Per group: running mean |a|, mean a, mean a², Σa² of every consumer input, per element
    of its channel dim (streamed with ``prunec.calib.collect``)."""
    per_group = {g.name: cons for g in groups if (cons := consumers(state, g))}
    stats = input_stats(state, calib, [c for cons in per_group.values() for c in cons])
    return {name: ([stats[id(c)] for c in cons], cons) for name, cons in per_group.items()}


def input_stats(state: State, calib: Iterable[Any], cons: list[Consumer]) -> dict[int, dict[str, np.ndarray]]:
    """id(consumer) → mean |a|, mean a, mean a², Σa² of its input per channel, in one pass over ``calib``."""
    wanted: dict[fx.Node, list[Consumer]] = {}
    for c in cons:
        wanted.setdefault(c.x, []).append(c)
    sums: dict[int, dict[str, Any]] = {}

    def on_value(node: fx.Node, value: Any) -> None:
        for c in wanted.get(node, []):
            a = value.detach().double().movedim(c.channel_dim, 0).reshape(value.shape[c.channel_dim], -1)
            s = sums.setdefault(id(c), {"abs": 0, "sum": 0, "sq": 0, "n": 0})
            s["abs"] = s["abs"] + a.abs().sum(1)
            s["sum"] = s["sum"] + a.sum(1)
            s["sq"] = s["sq"] + a.pow(2).sum(1)
            s["n"] += a.shape[1]

    watched = set(wanted)
    collect(state.program, calib, lambda n, v: on_value(n, v) if n in watched else None, watch=watched, sums=sums)
    out = {}
    for c in cons:
        s = sums[id(c)]
        n = max(s["n"], 1)
        out[id(c)] = {"mean_abs": (s["abs"] / n).numpy(), "mean": (s["sum"] / n).numpy(),
                      "mean_sq": (s["sq"] / n).numpy(), "sum_sq": s["sq"].numpy()}
    return out


@register_pass("activation")
class Activation(Pass):
    """Score units by their mean |activation| where their consumers read it (Hu et al., 2016,
    APoZ family). Activations are streamed over ``calib`` by an fx Interpreter.
    Before: groups without scores.  After: state.scores[group] for groups with conv/linear
    consumers; groups without one (e.g. a model's output) stay unscored and are kept."""

    provides = ("scores",)

    statistic = "mean_abs"

    def __init__(self, calib: Iterable[Any] | None = None) -> None:
        self.calib = calib

    def unit_stat(self, stats: dict[str, np.ndarray]) -> np.ndarray:
        return stats["mean_abs"]

    def run(self, state: State) -> PassResult:
        calib = self.calibration(state)
        found = consumer_input_stats(state, calib, state.coupling.groups)
        for name, (stats, cons) in found.items():
            state.scores[name] = unit_scores([self.unit_stat(s) for s in stats], [c.rows for c in cons])
        skipped = len(state.coupling.groups) - len(found)
        if skipped:
            state.notes.append(f"{self.name}: {skipped} groups have no conv/linear consumer; kept")
        return PassResult(state, True)


@register_pass("activation_var")
class ActivationVariance(Activation):
    """Score units by the variance of their activation over calibration samples and positions
    (a unit that is nearly constant can be folded away; Polyak & Wolf, 2015)."""

    def unit_stat(self, stats: dict[str, np.ndarray]) -> np.ndarray:
        return np.maximum(stats["mean_sq"] - stats["mean"] ** 2, 0.0)
