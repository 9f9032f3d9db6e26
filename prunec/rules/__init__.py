"""Coupling rules: one function per ATen op, kept in a table keyed by OpOverload.

A rule reads one fx node and calls ``CouplingBuilder.tie`` / ``freeze`` / ``approx``.
Ops with the ``pointwise`` tag share one rule. An op with no rule freezes every dim it
touches, with a reason naming the node and module (we never guess).
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
from torch import fx

from prunec.coupling import CouplingBuilder, shape_of

Rule = Callable[[fx.Node, CouplingBuilder], None]
RULES: dict[Any, Rule] = {}
aten = torch.ops.aten


def coupling_rule(*ops: Any) -> Callable[[Rule], Rule]:
    """Register a rule for ops (an OpOverloadPacket registers all its overloads)."""
    def wrap(fn: Rule) -> Rule:
        for op in ops:
            overloads = ([getattr(op, o) for o in op.overloads()]
                         if isinstance(op, torch._ops.OpOverloadPacket) else [op])
            for ov in overloads:
                if ov in RULES:
                    raise ValueError(f"duplicate coupling rule for {ov}")
                RULES[ov] = fn
        return fn
    return wrap


def arg(node: fx.Node, index: int, name: str | None = None, default: Any = None) -> Any:
    """Positional-or-keyword argument of a node, ``default`` if absent."""
    if index < len(node.args):
        return node.args[index]
    if name is not None and name in node.kwargs:
        return node.kwargs[name]
    return default


def ndim(value: Any) -> int:
    shape = shape_of(value)
    return len(shape) if shape is not None else -1


def rule_for(node: fx.Node) -> Rule | None:
    """The rule for a call_function node (pointwise tag shares one), or None."""
    target = node.target
    if target in RULES:
        return RULES[target]
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        return RULES[aten.add.Tensor]
    if target is operator.getitem:
        return RULES[operator.getitem]
    return None


def covered_ops() -> list[str]:
    """Names of every op with a rule (checked against tests/data/covered_ops.txt)."""
    return sorted({str(op) for op in RULES})


from prunec.rules import conv, norm, pointwise, pool, shape, attention  # noqa: E402,F401
