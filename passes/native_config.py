"""Widths the model's own config can express, so the framework's loader rebuilds the pruned model."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
import torch

from prunec.errors import InternalError
from prunec.passes.base import Pass, PassResult, State, register_pass
from prunec.passes.magnitude import L1

Member = tuple[str, int]


def native_rules(model: torch.nn.Module) -> tuple[Callable[[float], list[list[tuple[float, dict[str, Any]]]]],
                                                  Callable[[dict[str, Any]], torch.nn.Module]] | None:
    """(axes, build) from the model's framework: ``axes(fraction)`` lists per config axis the (kept
    fraction, config overrides) it expresses, nearest first; ``build(overrides)`` the model the config
    builds. None for a model without rules."""
    if not any(c.__module__.startswith("diffusers.") for c in type(model).__mro__):
        return None  # not a diffusers class: don't import diffusers (seconds, and torchao's warnings)
    from diffusers.models.modeling_utils import ModelMixin
    if not isinstance(model, ModelMixin):
        return None
    from prunec.frameworks.diffusers import NATIVE, built, native_axes
    if type(model).__name__ not in NATIVE:
        return None
    return (lambda fraction: native_axes(model, fraction)), (lambda overrides: built(model, overrides))


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {n: tuple(t.shape) for n, t in model.state_dict().items()}


def removed_units(state: State, target: dict[str, tuple[int, ...]]) -> tuple[dict[str, int], str]:
    """Units each group must lose so every state tensor gets the ``target`` shape: (group → count, '')
    or ({}, why not) naming the first tensor dim whole units can't reach."""
    shapes = {n: tuple(t.shape) for n, t in state.program.state().items()}
    touching: dict[Member, list[Any]] = {}
    for g in state.coupling.groups:
        for member in g.members:
            touching.setdefault(member, []).append(g)
    need = {}
    for name, shape in shapes.items():
        if name not in target:
            continue  # a constant the trace lifted, not the model's state
        if len(target[name]) != len(shape):
            return {}, f"{name}: the config builds {target.get(name)}, the model holds {shape}"
        need.update({(name, d): shape[d] - target[name][d] for d in range(len(shape))})
    for member, n in need.items():
        if n and member not in touching:
            why = state.coupling.frozen.get(f"{member[0]}@{member[1]}", "no group prunes it")
            return {}, f"{member[0]} dim {member[1]}: the config needs {n} fewer ({why})"
    return _solve(state.coupling.groups, {m: touching.get(m, []) for m in need}, need)


def _solve(groups: list[Any], touching: dict[Member, list[Any]], need: dict[Member, int]) -> tuple[dict[str, int], str]:
    """Units r_g each group loses with Σ_g r_g·width_g(dim) = need(dim) for every dim (an integer
    program: a GroupNorm over a concatenation ties groups of different widths), fewest units removed."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    index = {g.name: i for i, g in enumerate(groups)}
    rows = [m for m, gs in touching.items() if gs]
    a = np.zeros((len(rows), len(groups)))
    for r, member in enumerate(rows):
        for g in touching[member]:
            a[r, index[g.name]] += g.members[member].shape[1]
    b = np.array([need[m] for m in rows], dtype=float)
    upper = np.array([g.size - 1 for g in groups], dtype=float)
    res = milp(np.ones(len(groups)), constraints=LinearConstraint(a, b, b), integrality=np.ones(len(groups)),
               bounds=Bounds(np.zeros(len(groups)), upper))
    if res.status != 0 or res.x is None:
        worst = max(rows, key=lambda m: need[m], default=None)
        return {}, (f"no whole units of the groups give every width (e.g. {worst[0]} dim {worst[1]}: "
                    f"{need[worst]} fewer)" if worst else "no solution")
    return {g.name: int(round(x)) for g, x in zip(groups, res.x) if round(x)}, ""


@register_pass("native_config")
class NativeConfig(Pass):
    """Keep widths the model's own config can express (diffusers: ``block_out_channels`` per level,
    one ``norm_num_groups``, head counts), so its framework's loader rebuilds the pruned model.
    Before: a plan with free per-group widths. After: the config-expressible plan whose kept fraction is
    nearest the plan's per config axis (ties keep more), best-scored units first, an axis no width fits
    kept whole; ``plan.meta['native_config']`` holds the config overrides; a note names each axis kept
    whole and why. ``strict``: always that plan; else only when every axis fits, the free plan otherwise
    (it reloads through ``prunec.frameworks.diffusers.from_pretrained``)."""

    requires = ("plan",)
    provides = ("plan",)

    def __init__(self, strict: bool = False) -> None:
        self.strict = strict

    def run(self, state: State) -> PassResult:
        rules = native_rules(state.model)
        if rules is None or not state.plan.kept:
            return PassResult(state, False)
        axes, build = rules
        fraction = float(np.mean([len(k) / state.plan.sizes[n] for n, k in state.plan.kept.items()]))
        chosen: dict[str, Any] = {}
        removed: dict[str, int] = {}
        refused: list[str] = []
        for options in axes(fraction):  # each axis: the nearest width that fits, the others as chosen
            why = "its config expresses no smaller width" if not options else ""
            for _, option in options:
                fits, why_not = removed_units(state, _shapes(build({**chosen, **option})))
                if not why_not and not fits:
                    raise InternalError(f"native_config: config overrides {option} build no smaller tensor")
                if not why_not:
                    chosen.update(option)
                    removed = fits
                    break
                why = why or f"nearest {option}: {why_not}"
            else:
                refused.append(why)
        state.results["native_config"] = {"config": chosen, "refused": refused}
        name = type(state.model).__name__
        kept_whole = f"; kept whole: {'; '.join(refused)}" if refused else ""
        if chosen and (self.strict or not refused):
            self._apply(state, removed)
            state.plan.meta["native_config"] = chosen
            state.notes.append(f"native_config: {name} pruned to widths its config expresses ({chosen}), "
                               f"so its own from_pretrained reloads it{kept_whole}")
            return PassResult(state, True)
        if not self.strict:
            state.notes.append(f"native_config: {name}'s config can't express the plan's widths{kept_whole}; "
                               "the free plan is kept: diffusers' from_pretrained can't rebuild it, "
                               "prunec.frameworks.diffusers.from_pretrained can (compile(native_config=True): "
                               f"only widths the config expresses{f', {chosen}' if chosen else ', none'})")
            return PassResult(state, False)
        state.plan.kept.clear()
        state.plan.sizes.clear()
        state.notes.append(f"native_config: nothing pruned: {name}'s config expresses no pruned width"
                           f"{kept_whole}; compile(native_config=None) keeps the free plan")
        return PassResult(state, True)

    @staticmethod
    def _apply(state: State, removed: dict[str, int]) -> None:
        """Keep ``size − removed`` best-scored units of each group (L1 for groups no criterion scored)."""
        scores = dict(state.scores)
        if any(g not in scores for g in removed):
            extra = dataclasses.replace(state, kinds=None, scores={}, notes=[])
            scores = {**L1().run(extra).state.scores, **scores}
        state.plan.kept.clear()
        state.plan.sizes.clear()
        for name, r in removed.items():
            size = state.coupling.group(name).size
            unscored = np.zeros(size) if name not in scores else None  # no parameter to score: the first units
            order = np.argsort(-np.asarray(scores[name] if unscored is None else unscored), kind="stable")
            state.plan.kept[name] = sorted(int(i) for i in order[:size - r])
            state.plan.sizes[name] = size
