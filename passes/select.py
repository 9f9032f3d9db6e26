"""Selection: scores → plan, by per-kind ratios (uniform per group or globally ranked)."""
from __future__ import annotations

import math

import numpy as np

from prunec.errors import InputError, InternalError
from prunec.passes.base import Pass, PassResult, State, register_pass

KINDS = ("channel", "mlp", "head", "hidden")


def keep_count(n: int, ratio: float, round_to: int = 1) -> int:
    """Units to keep when removing ``ratio`` of ``n``: rounded to a multiple of ``round_to``, ≥ 1."""
    keep = max(1, int(round(n * (1.0 - ratio))))
    if round_to > 1 and n >= round_to:
        keep = max(round_to, round_to * int(round(keep / round_to)))
    return min(keep, n)


def check_ratio(name: str, ratio: float) -> float:
    if not isinstance(ratio, (int, float)) or math.isnan(ratio) or not 0.0 <= ratio < 1.0:
        raise InputError(f"--{name} ratio {ratio} is outside [0, 1)",
                         f"give the fraction of {name} to remove, e.g. --{name} 0.3")
    return float(ratio)


@register_pass("select")
class Select(Pass):
    """Keep the highest-scoring units of each group.
    Before: state.scores per group.  After: state.plan.kept per group (never empty).
    ``ratios`` maps a group kind to the fraction removed; ``global_rank`` ranks units of all
    groups of a kind together (scores normalised per group) instead of per group."""

    requires = ("scores",)
    provides = ("plan",)

    def __init__(self, ratios: dict[str, float], round_to: int = 1, global_rank: bool = False,
                 max_ratio: float = 0.9) -> None:
        self.ratios = {k: check_ratio(k, float(v)) for k, v in ratios.items() if v}
        unknown = set(self.ratios) - set(KINDS)
        if unknown:
            raise InputError(f"unknown group kind(s) {sorted(unknown)}", f"use one of {KINDS}")
        if round_to < 1:
            raise InputError(f"--round-to {round_to} must be ≥ 1", "use 1 (off), 8, 16 or 32")
        self.round_to, self.global_rank, self.max_ratio = round_to, global_rank, max_ratio

    def _round(self, state: State, name: str) -> int:
        unit = next(iter(state.coupling.group(name).members.values())).shape[1]
        return self.round_to if unit == 1 else 1

    def run(self, state: State) -> PassResult:
        for kind, ratio in self.ratios.items():
            unscored = [g for g in state.coupling.groups if g.kind == kind and g.name not in state.scores
                        and g.name not in state.plan.kept]
            if unscored:
                state.notes.append(f"{len(unscored)} {kind} group(s) have no score from the criterion "
                                   "and were kept whole")
            groups = [g for g in state.coupling.groups if g.kind == kind and g.name in state.scores]
            counts = self._global_counts(state, groups, ratio) if self.global_rank else \
                {g.name: keep_count(g.size, ratio, self._round(state, g.name)) for g in groups}
            for g in groups:
                order = np.argsort(-state.scores[g.name], kind="stable")
                kept = np.sort(order[:counts[g.name]])
                if len(kept) < g.size:
                    state.plan.kept[g.name] = kept.tolist()
                    state.plan.sizes[g.name] = g.size
        state.plan.meta.update({"ratios": self.ratios, "round_to": self.round_to,
                                "global": self.global_rank})
        return PassResult(state, True)

    def _global_counts(self, state: State, groups: list, ratio: float) -> dict[str, int]:
        """Rank every unit of every group together; each group keeps ≥ (1 − max_ratio)."""
        names, scores = [], []
        for g in groups:
            s = state.scores[g.name]
            names += [g.name] * g.size
            scores.append(s / (s.mean() if s.mean() > 0 else 1.0))
        if not scores:
            return {}
        flat = np.concatenate(scores)
        n_drop = int(round(ratio * len(flat)))
        drop = np.argsort(flat, kind="stable")[:n_drop]
        dropped: dict[str, int] = {}
        for i in drop:
            dropped[names[i]] = dropped.get(names[i], 0) + 1
        out = {}
        for g in groups:
            r = min(dropped.get(g.name, 0) / g.size, self.max_ratio)
            out[g.name] = keep_count(g.size, r, self._round(state, g.name))
        return out

    def ensures(self, state: State) -> None:
        for name, kept in state.plan.kept.items():
            if not kept:
                raise InternalError(f"select emptied group {name}")
