"""Op rules: one entry per ATen op, kept in a table keyed by OpOverload.

Each entry pairs a coupling rule (reads one fx node and calls ``CouplingBuilder.tie`` /
``freeze`` / ``approx``) with the op's shape fixer (rewrites the op's size arguments after a
cut). Registering a rule without a fixer is impossible: ``fix`` is a required argument, and
ops whose arguments carry no sizes say so with ``fix=no_sizes``.
Ops with the ``pointwise`` tag share one rule. An op with no rule freezes every dim it
touches, with a reason naming the node and module (we never guess).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol

import numpy as np
import torch
from torch import fx

from prunec.coupling import CouplingBuilder, Key, shape_of
from prunec.registry import Registry

aten = torch.ops.aten


class NewSizes(Protocol):
    """What a fixer reads: the indices dropped per (value, dim) and the resulting shapes."""

    dropped: Mapping[Key, np.ndarray]

    def shape(self, node: fx.Node) -> list[int]: ...


Couple = Callable[[fx.Node, CouplingBuilder], None]
Fixer = Callable[[fx.Node, fx.Node, NewSizes], None]  # (old node, new node, sizes)


def no_sizes(old: fx.Node, new: fx.Node, sizes: NewSizes) -> None:
    """Fixer for ops whose arguments carry no sizes (or only sizes of dims the rule freezes)."""


@dataclass(frozen=True)
class OpRule:
    """One op's entry: how it couples dims and how its size arguments follow a cut."""

    couple: Couple
    fix: Fixer

    def __call__(self, node: fx.Node, g: CouplingBuilder) -> None:
        self.couple(node, g)


RULES: Registry[OpRule] = Registry("coupling rule")


def coupling_rule(*ops: Any, fix: Fixer) -> Callable[[Couple], Couple]:
    """Register a rule and its shape fixer for ops (an OpOverloadPacket registers all overloads)."""
    def wrap(fn: Couple) -> Couple:
        entry = OpRule(fn, fix)
        for op in ops:
            overloads = ([getattr(op, o) for o in op.overloads()]
                         if isinstance(op, torch._ops.OpOverloadPacket) else [op])
            for ov in overloads:
                RULES.add(ov, entry)
        return fn
    return wrap


def arg(node: fx.Node, index: int, name: str | None = None, default: Any = None) -> Any:
    """Positional-or-keyword argument of a node, ``default`` if absent."""
    if index < len(node.args):
        return node.args[index]
    if name is not None and name in node.kwargs:
        return node.kwargs[name]
    return default


def set_arg(new: fx.Node, index: int, name: str, value: Any) -> None:
    """Set a positional-or-keyword argument of a node (for fixers)."""
    if index < len(new.args):
        args = list(new.args)
        args[index] = value
        new.args = tuple(args)
    else:
        new.kwargs = {**new.kwargs, name: value}


def keep_minus_one(old: list[Any], new: list[int]) -> list[Any]:
    """New sizes, keeping the ``-1`` the user wrote where it was."""
    return [-1 if o == -1 else n for o, n in zip(old, new)]


def ndim(value: Any) -> int:
    shape = shape_of(value)
    return len(shape) if shape is not None else -1


# ops through which a weight keeps its values up to a scalar factor (parametrizations: clone,
# flatten, W / σ): zeroing the state's slice zeroes the same slice of the result
_SAME_VALUES = (aten.clone.default, aten.alias.default, aten.detach.default, aten.contiguous.default,
                aten._to_copy.default, aten.lift_fresh_copy.default, aten.to.dtype, aten.flatten.using_ints,
                aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_SCALED = (aten.div.Tensor, aten.mul.Tensor)


def state_root(g: CouplingBuilder, value: Any) -> fx.Node | None:
    """The state placeholder ``value`` is (up to a scalar factor and same-shape copies), or None."""
    for _ in range(8):
        if not isinstance(value, fx.Node) or g.is_state(value):
            break
        if value.op != "call_function":
            return None
        first = arg(value, 0)
        if value.target in _SAME_VALUES and shape_of(first) == shape_of(value):
            value = first
        elif value.target in _SCALED and len(shape_of(arg(value, 1)) or ()) == 0 and shape_of(first) == shape_of(value):
            value = first
        elif value.target is aten.expand.default and len(shape_of(first) or ()) == len(shape_of(value) or ()):
            value = first  # broadcasting a weight over the batch keeps its other dims in place
        elif value.target is aten.mul.Tensor and len(shape_of(first) or ()) == 0:
            value = arg(value, 1)
        else:
            return None
    return value if isinstance(value, fx.Node) and g.is_state(value) else None


def consume(g: CouplingBuilder, value: Any, dim: int) -> bool:
    """Mark a summed dim consumed on the state ``value`` comes from; False if it is an activation."""
    root = state_root(g, value)
    if root is not None:
        g.consume(root, dim)
    return root is not None


def rule_for(node: fx.Node) -> OpRule | None:
    """The rule for a call_function node (pointwise tag shares one), or None."""
    target = node.target
    if target in RULES:
        return RULES[target]
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        return RULES[aten.add.Tensor]
    if target is operator.getitem:
        return RULES[operator.getitem]
    return None


def fixer_for(node: fx.Node) -> Fixer | None:
    """The shape fixer of a node's op (None: the op has no rule, so its dims are frozen)."""
    rule = rule_for(node)
    return rule.fix if rule is not None else None


def covered_ops() -> list[str]:
    """Names of every op with a rule (checked against tests/data/covered_ops.txt)."""
    return sorted({str(op) for op in RULES})


from prunec.rules import (  # noqa: E402,F401
    attention, contraction, conv, factory, lookup, norm, pointwise, pool, recurrent, shape)
