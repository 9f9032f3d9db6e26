"""Ratio search: the uniform pruning ratio that meets a MACs/params budget or an accuracy floor."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

from prunec.errors import InputError
from prunec.passes.base import Pass, PassResult, State, register_pass
from prunec.passes.select import Select
from prunec.passes.sensitivity import prune_with, scored_state
from prunec.plan import Plan

Metric = Callable[[nn.Module], float]


def plan_at(scored: State, ratio: float, kinds: tuple[str, ...], round_to: int) -> Plan:
    """The plan Select makes from the scores at one uniform ratio."""
    trial = State(scored.model, scored.program, scored.coupling, scores=dict(scored.scores))
    return Select({k: ratio for k in kinds}, round_to=round_to).run(trial).state.plan


def bisect(ok: Callable[[float], bool], hi: float, steps: int) -> float:
    """Largest ratio in [0, hi] with ok(ratio) (ok assumed monotone: true, then false)."""
    lo = 0.0
    if ok(hi):
        return hi
    for _ in range(steps):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


@register_pass("target_search")
class TargetSearch(Pass):
    """Bisect a uniform ratio so the pruned model keeps ``target_macs`` (or ``target_params``)
    of the original's MACs (params), or the largest ratio whose metric drop ≤ ``max_drop``.
    MACs come from ``prunec.cost.count_macs`` on the compiled candidate.
    Before: groups without a plan.  After: state.plan at the ratio found (meta records it)."""

    provides = ("scores", "plan")

    def __init__(self, target_macs: float | None = 0.5, target_params: float | None = None,
                 max_drop: float | None = None, metric: Metric | None = None,
                 method: str | Pass = "l1", round_to: int = 8,
                 kinds: tuple[str, ...] = ("channel", "mlp"), max_ratio: float = 0.95,
                 steps: int = 12) -> None:
        if max_drop is not None:
            if metric is None:
                raise InputError("max_drop needs a metric", "pass metric=lambda model: accuracy")
            target_macs = None
        for name, v in (("target_macs", target_macs), ("target_params", target_params)):
            if v is not None and not 0.0 < v <= 1.0:
                raise InputError(f"{name} {v} is outside (0, 1]", "give the fraction to keep, e.g. 0.5")
        self.target_macs, self.target_params = target_macs, target_params
        self.max_drop, self.metric, self.method = max_drop, metric, method
        self.round_to, self.kinds, self.max_ratio, self.steps = round_to, kinds, max_ratio, steps

    def run(self, state: State) -> PassResult:
        services = state.need_services("target search")
        scored = scored_state(state, self.method)
        trials: list[dict[str, Any]] = []
        cost_key = "macs" if self.target_macs is not None else "params"
        target = self.target_macs if self.target_macs is not None else self.target_params
        baseline = float(self.metric(state.model)) if self.max_drop is not None else 0.0

        cost = services.macs if cost_key == "macs" else services.params
        before = cost(services.original())

        def ok(ratio: float) -> bool:
            pruned = prune_with(scored, plan_at(scored, ratio, self.kinds, self.round_to))
            trial: dict[str, Any] = {"ratio": ratio}
            if self.max_drop is not None:
                trial["drop"] = baseline - float(self.metric(pruned))
                good = trial["drop"] <= self.max_drop
            else:
                trial["kept"] = cost(pruned) / before
                good = trial["kept"] >= target  # keep removing while above the budget
            trials.append(trial)
            return good

        if self.max_drop is None and target is None:
            raise InputError("target search needs target_macs, target_params or max_drop",
                             "e.g. TargetSearch(target_macs=0.5)")
        ratio = self._closest(trials, bisect(ok, self.max_ratio, self.steps)) if self.max_drop is None \
            else bisect(ok, self.max_ratio, self.steps)
        state.scores.update(scored.scores)
        state.plan = plan_at(scored, ratio, self.kinds, self.round_to)
        state.plan.meta["search"] = {"ratio": ratio, "trials": trials,
                                     **({"target_" + cost_key: target} if self.max_drop is None
                                        else {"max_drop": self.max_drop})}
        return PassResult(state, True)

    def _closest(self, trials: list[dict[str, Any]], feasible: float) -> float:
        """Of the trials, the ratio whose kept fraction is nearest the target."""
        target = self.target_macs if self.target_macs is not None else self.target_params
        best = min(trials, key=lambda t: abs(t["kept"] - target))
        return best["ratio"] if abs(best["kept"] - target) < 0.05 * target else feasible
