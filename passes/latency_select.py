"""Latency-aware selection: widths from a latency table measured on the deployment runtime.

With ``ratios`` each group's width is snapped to the widest latency step at or below the width the
ratio asks for (instead of a fixed ``round_to``); a step is a width faster than every wider one. With ``target`` (a fraction of the
dense latency, or ms) a greedy knapsack steps groups down their latency staircases, each time where
the predicted latency falls most per unit of importance lost (HALP / NetAdapt style); before it, each
group's predicted savings are calibrated on the whole model (``prunec.latency.calibrate``), once per
cached table, and each group's importance is weighed by the output error its cut causes (``sensitivity``).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_leaves

from prunec.errors import InputError, InternalError
from prunec.latency import LatencyTable, calibrate, measure, parse_target, probe_width, profile, save
from prunec.passes.base import Pass, PassResult, State, register_pass
from prunec.passes.select import check_ratio, keep_count
from prunec.plan import Plan


def snap(table: LatencyTable, group: str, budget: int) -> int:
    """The widest latency step at or below ``budget`` units (the narrowest step if none is), moved up
    to the widest step that costs no more (a plateau's free units are kept)."""
    steps = table.steps(group)
    if not steps:
        return budget
    fits = [w for w in steps if w <= budget]
    base = max(fits) if fits else min(steps)
    curve = table.group_curve(group)
    return max(w for w in steps if curve[w] <= curve[base])


def importance(scores: np.ndarray) -> np.ndarray:
    """Prefix sums of the group's scores (normalised by their mean), best first: [0, s1, s1+s2, …]."""
    s = np.asarray(scores, dtype=np.float64)
    s = s / s.mean() if s.mean() > 0 else s
    return np.concatenate([[0.0], np.cumsum(np.sort(s)[::-1])])


def allocate(table: LatencyTable, scores: dict[str, np.ndarray], target_ms: float,
             min_keep: dict[str, int], weights: dict[str, float] | None = None) -> tuple[dict[str, int], float]:
    """Greedy knapsack: from whole widths, repeatedly move the group whose next lower latency step
    removes the most predicted ms per unit of importance lost, until the prediction ≤ ``target_ms``.
    ``weights`` (group → cost of a unit of importance, from ``sensitivity``; 1 if absent) make the
    groups' importances comparable. Returns (group → width, predicted ms); an InputError names the
    best reachable if it can't."""
    weights = weights or {}
    steps = {g: [w for w in table.steps(g) if w >= min_keep.get(g, 1)] for g in scores}
    steps = {g: s for g, s in steps.items() if len(s) > 1 or (s and s[-1] < len(scores[g]))}
    gain = {g: importance(scores[g]) for g in steps}
    touching: dict[str, list] = {g: [op for op in table.ops if g in (op.in_group, op.out_group)] for g in steps}
    widths = {g: len(scores[g]) for g in steps}
    pred = table.predict(widths)

    def move(g: str) -> tuple[float, float, int] | None:
        """The lower step of ``g`` with the most predicted ms saved per importance lost."""
        best = None
        for w in (w for w in steps[g] if w < widths[g]):
            trial = {**widths, g: w}
            saved = sum(table.op_saved(op, trial) - table.op_saved(op, widths) for op in touching[g])
            lost = (gain[g][widths[g]] - gain[g][w]) * weights.get(g, 1.0)
            if saved > 0 and (best is None or saved / max(lost, 1e-12) > best[0]):
                best = (saved / max(lost, 1e-12), saved, w)
        return best

    moves = {g: move(g) for g in steps}
    while pred > target_ms:
        live = {g: m for g, m in moves.items() if m is not None and m[1] > 0}
        if not live:
            raise InputError(f"latency target {target_ms:.4g} ms is unreachable: the best reachable is "
                             f"{pred:.4g} ms ({pred / table.dense_ms:.2f} of the dense {table.dense_ms:.4g} ms) "
                             "with every prunable group at its narrowest allowed width",
                             f"ask for at least {math.ceil(pred * 100 / table.dense_ms) / 100:.2f} "
                             f"(or {math.ceil(pred * 10) / 10:g}ms)")
        g = max(live, key=lambda k: live[k][0])
        widths[g] = live[g][2]
        pred -= live[g][1]
        shared = {h for op in touching[g] for h in (op.in_group, op.out_group)}
        for h in shared & set(moves):
            moves[h] = move(h)
    return widths, table.predict(widths)


def next_aim(tries: list[dict[str, float]], target_ms: float, dense_ms: float) -> float:
    """The next predicted-ms aim after measured ``tries`` (each: aim_ms, measured_ratio, goal). Once an aim
    measured too fast and a larger one too slow, bisect between them (the allocation is a step function of
    the aim, so proportional steps can oscillate across the goal); before that a proportional step from the
    last try, at most ×/÷ 1.5. Kept within [target/3, min(2·target, 0.95·dense)]."""
    fast = [t["aim_ms"] for t in tries if t["measured_ratio"] < t["goal"]]
    slow = [t["aim_ms"] for t in tries if t["measured_ratio"] > t["goal"]]
    if fast and slow and max(fast) < min(slow):
        aim = (max(fast) + min(slow)) / 2
    else:
        last = tries[-1]
        aim = last["aim_ms"] * min(1.5, max(1 / 1.5, last["goal"] / last["measured_ratio"]))
    return min(max(aim, target_ms / 3), target_ms * 2, dense_ms * 0.95)


def output_error(dense: Any, pruned: Any, batches: list[tuple[Any, ...]]) -> float:
    """Relative L2 error of ``pruned``'s outputs (all float tensors, flattened) against ``dense``'s."""
    num = den = 0.0
    with torch.no_grad():
        for batch in batches:
            a, b = (torch.cat([t.detach().float().flatten() for t in tree_leaves(m(*batch))
                               if isinstance(t, torch.Tensor) and t.is_floating_point()]) for m in (dense, pruned))
            num, den = num + float((a - b).square().sum()), den + float(a.square().sum())
    return math.sqrt(num / den) if den > 0 else 0.0


def sensitivity(table: LatencyTable, scores: dict[str, np.ndarray], cut: Any, dense: Any,
                batches: list[tuple[Any, ...]], fraction: float = 0.25) -> tuple[dict[str, float], dict[str, float]]:
    """Each group alone cut to its latency step nearest ``fraction`` (``cut(group, width)`` builds the
    model): (group → output error, group → error per unit of normalised importance removed). The
    second is the allocator's weight: a first-order model of the output error that matches the
    measurement at the probe width, so importances of different groups become comparable."""
    errors, weights = {}, {}
    for g, s in scores.items():
        w = probe_width(table, g, len(s), fraction)
        if w is None:
            continue
        gain = importance(s)
        errors[g] = output_error(dense, cut(g, w), batches)
        weights[g] = errors[g] / max(gain[len(s)] - gain[w], 1e-12)
    return errors, weights


def _keep(plan: Plan, scores: dict[str, np.ndarray], widths: dict[str, int]) -> None:
    """Keep the ``widths[g]`` highest-scoring units of each group ``g`` in ``plan``."""
    for name, w in widths.items():
        if w < len(scores[name]):
            order = np.argsort(-scores[name], kind="stable")
            plan.kept[name] = np.sort(order[:w]).tolist()
            plan.sizes[name] = len(scores[name])


@register_pass("latency_select")
class LatencySelect(Pass):
    """Keep the highest-scoring units, with widths chosen from a latency table of ``runtime``.
    Before: state.scores per group.  After: state.plan.kept per group; results name the runtime,
    the dense and predicted latency, and the cache file of the table."""

    requires = ("scores",)
    provides = ("plan",)

    def __init__(self, runtime: str = "onnxruntime", target: float | str | None = None,
                 ratios: dict[str, float] | None = None, batch: int = 1, threads: int | None = None,
                 kinds: tuple[str, ...] = ("channel", "mlp"), max_ratio: float = 0.9, points: int = 16,
                 rounds: int = 5, table: LatencyTable | None = None, cache: Any = True,
                 refine: int = 3, measure: bool = True, calibrate: bool = True, sensitivity: bool = True) -> None:
        self.ratios = {k: check_ratio(k, float(v)) for k, v in (ratios or {}).items() if v}
        if target is None and not self.ratios:
            raise InputError("latency-aware selection needs a latency target or ratios",
                             "give --target-latency 0.5, or --channels R with --runtime")
        self.target = parse_target(target) if target is not None else None
        self.runtime, self.batch, self.threads = runtime, batch, threads
        self.kinds = tuple(self.ratios) if self.ratios and target is None else kinds
        self.max_ratio, self.points, self.rounds = max_ratio, points, rounds
        self.table, self.cache, self.refine, self.measure = table, cache, refine, measure
        self.calibrate, self.sensitivity = calibrate, sensitivity

    def _refine(self, state: State, table: LatencyTable, scores: dict[str, np.ndarray], floor: dict[str, int],
                target_ms: float, widths: dict[str, int], pred: float, info: dict[str, Any],
                weights: dict[str, float]) -> tuple[dict[str, int], float]:
        """Measure the allocation end to end (interleaved with the unpruned model, both as compile
        returns them) and re-aim the predicted target up to ``refine`` times (``next_aim``) while the
        measured ratio misses the goal by more than 5 %; keep the allocation measured closest."""
        goal = target_ms / table.dense_ms
        aim, tries, best = target_ms, [], None
        for _ in range(self.refine + 1):
            plan = Plan(meta={})
            _keep(plan, state.scores, widths)
            dense, pruned = state.services.deployed(plan)  # as compile returns them: exported alike
            ms = measure(self.runtime, {"dense": dense, "pruned": pruned}, state.program.example_inputs,
                         self.batch, table.meta["key_fields"]["threads"], self.rounds)
            ratio = ms["pruned"] / ms["dense"]
            if self.target[0] == "ms":  # an absolute target: aim at it under this run's load
                goal = target_ms / ms["dense"]
            tries.append({"predicted_ms": pred, "aim_ms": aim, "measured_ratio": ratio, "goal": goal})
            if best is None or abs(ratio - goal) < abs(best[2] - goal):
                best = (widths, pred, ratio)
            if abs(ratio / goal - 1) <= 0.05 or len(tries) > self.refine:
                break
            aim = next_aim(tries, target_ms, table.dense_ms)
            try:
                widths, pred = allocate(table, scores, aim, floor, weights)
            except InputError:
                break  # the re-aimed target is beyond reach: keep the closest allocation
        info["refine"] = tries
        return best[0], best[1]

    @staticmethod
    def _cutter(state: State, deploy: Any) -> tuple[Any, Any]:
        """(the unpruned model, ``cut(group, width)`` → the model with only that group cut), both as
        compile returns them."""
        def cut(group: str, width: int) -> Any:
            plan = Plan(meta={})
            _keep(plan, state.scores, {group: width})
            return deploy(plan)[1]
        return deploy(Plan(meta={}))[0], cut

    def _calibrate(self, state: State, table: LatencyTable, scores: dict[str, np.ndarray], deploy: Any) -> None:
        """Scale each group's predicted savings by the whole model's (see ``prunec.latency.calibrate``)."""
        dense, cut = self._cutter(state, deploy)
        calibrate(table, {g: len(s) for g, s in scores.items()}, cut, dense, state.program.example_inputs,
                  rounds=max(self.rounds, 7))
        save(table)

    def _weights(self, state: State, table: LatencyTable, scores: dict[str, np.ndarray], deploy: Any,
                 info: dict[str, Any]) -> dict[str, float]:
        """The allocator's per-group importance weights from ``sensitivity``, measured on up to 4
        calibration batches (the example inputs without calibration data)."""
        batches = list(state.calib)[:4] if state.calib is not None else []
        batches = [tuple(b) if isinstance(b, (tuple, list)) else (b,) for b in batches] or \
            [tuple(state.program.example_inputs)]
        dense, cut = self._cutter(state, deploy)
        errors, weights = sensitivity(table, scores, cut, dense, batches)
        info["sensitivity"] = _summary(errors)
        return weights

    def run(self, state: State) -> PassResult:
        table = self.table or profile(state.model, state.program, state.coupling, self.runtime, self.batch,
                                      self.threads, self.points, self.rounds, self.cache)
        timed = {g for op in table.ops for g in (op.in_group, op.out_group) if g}
        groups = [g for g in state.coupling.groups if g.kind in self.kinds and g.name in state.scores
                  and g.name not in state.plan.kept]
        info: dict[str, Any] = {"runtime": self.runtime, "batch": self.batch,
                                "threads": table.meta["key_fields"]["threads"], "dense_ms": table.dense_ms,
                                "table": table.meta.get("cache"), "ops_timed": len(table.ops),
                                "measure": self.measure}
        if self.target is not None:
            kind, value = self.target
            target_ms = value * table.dense_ms if kind == "fraction" else value
            scores = {g.name: state.scores[g.name] for g in groups if g.name in timed}
            floor = {g: max(1, math.ceil(len(s) * (1 - self.max_ratio))) for g, s in scores.items()}
            deploy = state.services.deployed if state.services is not None else None
            if self.calibrate and deploy is not None and not table.factors:
                self._calibrate(state, table, scores, deploy)
            info["factors"] = _summary(table.factors)
            weights = self._weights(state, table, scores, deploy, info) if self.sensitivity and deploy else {}
            widths, pred = allocate(table, scores, target_ms, floor, weights)
            info.update(mode="target", target_ms=target_ms)
            if self.refine and deploy is not None:
                widths, pred = self._refine(state, table, scores, floor, target_ms, widths, pred, info, weights)
        else:
            widths = {}
            for g in groups:
                budget = keep_count(g.size, self.ratios[g.kind])
                widths[g.name] = snap(table, g.name, budget) if g.name in timed else keep_count(
                    g.size, self.ratios[g.kind], 8)
            pred = table.predict(widths)
            info.update(mode="snap", ratios=self.ratios)
        _keep(state.plan, state.scores, widths)
        info.update(predicted_ms=pred, widths={k: v for k, v in widths.items() if k in state.plan.kept})
        state.results[self.name] = info
        state.plan.meta.update({"latency": {k: v for k, v in info.items() if k != "widths"}})
        return PassResult(state, True)

    def ensures(self, state: State) -> None:
        for name, kept in state.plan.kept.items():
            if not kept:
                raise InternalError(f"latency_select emptied group {name}")


def _summary(factors: dict[str, float]) -> dict[str, Any] | None:
    """Count, min, median and max of per-group values (None when there are none)."""
    if not factors:
        return None
    v = sorted(factors.values())
    return {"groups": len(v), "min": v[0], "median": v[len(v) // 2], "max": v[-1]}
