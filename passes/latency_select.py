"""Latency-aware selection: widths from a latency table measured on the deployment runtime.

With ``ratios`` each group's width is snapped to the widest latency step at or below the width the
ratio asks for (instead of a fixed ``round_to``); a step is a width faster than every wider one. With ``target`` (a fraction of the
dense latency, or ms) a greedy knapsack steps groups down their latency staircases, each time where
the predicted latency falls most per unit of cost (HALP / NetAdapt style); before it, each group's
predicted savings are calibrated on the whole model (``prunec.latency.calibrate``), once per cached
table, and each group's cost curve is the output error its cut causes, measured at a few widths
(``sensitivity``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_leaves

from prunec.calib import Call, calls, first_samples, shared_rows, take_rows, with_example_options
from prunec.errors import InputError, InternalError
from prunec.latency import LatencyTable, calibrate, measure, parse_target, probe_width, profile, save
from prunec.passes.base import Pass, PassResult, State, register_pass
from prunec.passes.refit import Refit
from prunec.passes.select import check_ratio, keep_count
from prunec.passes.sensitivity import output_error
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


PROBES = (0.75, 0.5, 0.25)  # fractions of a group's units kept where ``sensitivity`` measures its cut
SAMPLES = 32  # calibration samples it measures on (three forwards over them per group)


def removed(scores: np.ndarray) -> np.ndarray:
    """Importance removed when keeping each width 0..size of the group, the best units kept (scores
    normalised by their mean): [Σs, Σs − s1, …, 0]."""
    s = np.asarray(scores, dtype=np.float64)
    s = s / s.mean() if s.mean() > 0 else s
    gain = np.concatenate([[0.0], np.cumsum(np.sort(s)[::-1])])
    return gain[-1] - gain


def error_curve(scores: np.ndarray, measured: dict[int, float]) -> np.ndarray:
    """The cost of each width 0..size of a group: its squared output error, measured with the group alone
    cut to each probe width (``measured``: width → relative error; 0 when whole), interpolated in the
    importance removed between probes and extrapolated past the narrowest one with the last slope; a
    narrower width never costs less. Squared: independent perturbations of the output add in energy."""
    x = removed(scores)
    pts = sorted({len(scores): 0.0, **measured}.items(), reverse=True)  # widest first: x ascending
    xs = np.array([x[w] for w, _ in pts])
    ys = np.maximum.accumulate(np.array([e for _, e in pts]) ** 2)
    curve = np.interp(x, xs, ys)
    if len(xs) > 1 and xs[-1] > xs[-2]:
        slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        curve = np.where(x > xs[-1], ys[-1] + slope * (x - xs[-1]), curve)
    return curve


def allocate(table: LatencyTable, scores: dict[str, np.ndarray], target_ms: float,
             min_keep: dict[str, int], costs: dict[str, np.ndarray] | None = None) -> tuple[dict[str, int], float]:
    """Greedy knapsack: from whole widths, repeatedly move the group whose next lower latency step
    removes the most predicted ms per unit of cost, until the prediction ≤ ``target_ms``. A group's cost
    at each width 0..size is ``costs[g]`` (measured output errors, ``error_curve``) or, without it, the
    normalised importance removed. Returns (group → width, predicted ms); an InputError names the
    best reachable if it can't."""
    costs = costs or {}
    steps = {g: [w for w in table.steps(g) if w >= min_keep.get(g, 1)] for g in scores}
    steps = {g: s for g, s in steps.items() if len(s) > 1 or (s and s[-1] < len(scores[g]))}
    cost = {g: costs[g] if g in costs else removed(scores[g]) for g in steps}
    touching: dict[str, list] = {g: [op for op in table.ops if g in (op.in_group, op.out_group)] for g in steps}
    widths = {g: len(scores[g]) for g in steps}
    raw = table.raw_saved(widths)
    pred = table.dense_ms - table.saving(raw)

    def move(g: str) -> tuple[float, float, int] | None:
        """The lower step of ``g`` with the most predicted ms saved per unit of cost."""
        best = None
        for w in (w for w in steps[g] if w < widths[g]):
            trial = {**widths, g: w}
            saved = sum(table.op_saved(op, trial) - table.op_saved(op, widths) for op in touching[g])
            lost = cost[g][w] - cost[g][widths[g]]
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
        raw += live[g][1]
        pred = table.dense_ms - table.saving(raw)
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


_MEASURED: dict[tuple[str, int], float] = {}  # (digest of model, batches, group and its scores; width) → error


def digest(*parts: Any) -> str:
    """SHA-1 of the tensors, arrays and other leaves in ``parts`` (a model's state, batches, scores)."""
    h = hashlib.sha1()
    for leaf in tree_leaves(parts):
        if isinstance(leaf, torch.Tensor):
            leaf = leaf.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        h.update(leaf.tobytes() if isinstance(leaf, np.ndarray) else repr(leaf).encode())
    return h.hexdigest()


def sensitivity(table: LatencyTable, scores: dict[str, np.ndarray], cut: Any, dense: Any,
                batches: list[Call], fractions: tuple[float, ...] = PROBES, key: str | None = None
                ) -> tuple[dict[str, dict[int, float]], dict[str, np.ndarray]]:
    """Each group alone cut to its latency steps nearest ``fractions`` of its units (``cut({group: width})``
    builds the model), the relative output error measured on ``batches``: (group → {width: error},
    group → the allocator's cost of every width, ``error_curve``). Measured curves make the groups'
    costs comparable, which normalised criterion scores are not. With ``key`` (a digest of the model's
    state and the batches) errors measured before in this process are reused, e.g. across the compiles
    of a search."""
    errors, costs, error_of = {}, {}, None
    store = _MEASURED if key else {}
    for g, s in scores.items():
        widths = {w for f in fractions if (w := probe_width(table, g, len(s), f)) is not None}
        if not widths:
            continue
        memo = digest(key, g, s) if key else g
        for w in sorted(widths):
            if (memo, w) not in store:
                error_of = error_of or output_error(dense, batches)   # the dense outputs, once, if needed
                store[memo, w] = error_of(cut({g: w}))
        errors[g] = {w: store[memo, w] for w in sorted(widths)}
        costs[g] = error_curve(s, errors[g])
    return errors, costs


def folds(calib: list[Call], n: int) -> list[tuple[list[Call], list[Call]]]:
    """Two (fit on, measure on) splits of the calibration calls, so that a refit probe is measured on samples its
    refit never saw: the first ``n`` samples are halved (alternate calls, or the rows of a single call), and each
    half is measured with a refit fitted on the other half and every call after those ``n`` samples. [] when the
    first ``n`` samples can't be halved (one sample)."""
    measured = first_samples(calib, n)
    rest = calib[len(measured):]
    if len(measured) >= 2:
        halves = [measured[0::2], measured[1::2]]
    else:
        rows = shared_rows(measured[0]) if measured else None
        if not rows or rows < 2:
            return []
        halves = [[take_rows(measured[0], 0, rows // 2)], [take_rows(measured[0], rows // 2, rows)]]
    return [(halves[1] + rest, halves[0]), (halves[0] + rest, halves[1])]


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
                 refine: int = 3, measure: bool = True, calibrate: bool = True, sensitivity: bool = True,
                 op_timing: str = "kernel", refit: str | None = None) -> None:
        self.ratios = {k: check_ratio(k, float(v)) for k, v in (ratios or {}).items() if v}
        if target is None and not self.ratios:
            raise InputError("latency-aware selection needs a latency target or ratios",
                             "give --target-latency 0.5, or --channels R with --runtime")
        self.target = parse_target(target) if target is not None else None
        self.runtime, self.batch, self.threads = runtime, batch, threads
        self.kinds = tuple(self.ratios) if self.ratios and target is None else kinds
        self.max_ratio, self.points, self.rounds = max_ratio, points, rounds
        self.table, self.cache, self.refine, self.measure = table, cache, refine, measure
        self.calibrate, self.sensitivity, self.op_timing = calibrate, sensitivity, op_timing
        self.refit = None if refit in (None, "none") else refit

    def _refine(self, state: State, table: LatencyTable, scores: dict[str, np.ndarray], floor: dict[str, int],
                target_ms: float, widths: dict[str, int], pred: float, info: dict[str, Any],
                costs: dict[str, np.ndarray]) -> tuple[dict[str, int], float]:
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
                         self.batch, table.meta["key_fields"]["threads"], self.rounds, state.program.example_kwargs)
            ratio = ms["pruned"] / ms["dense"]
            if self.target[0] == "ms":  # an absolute target: aim at it under this run's load
                goal = target_ms / ms["dense"]
            tries.append({"predicted_ms": pred, "aim_ms": aim, "measured_ratio": ratio, "goal": goal})
            if best is None or abs(ratio - goal) < abs(best[2] - best[3]):
                best = (widths, pred, ratio, goal)
            if abs(ratio / goal - 1) <= 0.05 or len(tries) > self.refine:
                break
            aim = next_aim(tries, target_ms, table.dense_ms)
            try:
                widths, pred = allocate(table, scores, aim, floor, costs)
            except InputError:
                break  # the re-aimed target is beyond reach: keep the closest allocation
        info["refine"] = tries
        if abs(best[2] / best[3] - 1) > 0.10:   # the issue's ±10 %: say so, the result is still the closest one
            state.notes.append(f"latency_select: target missed: measured {best[2]:.2f} of dense for a goal of "
                               f"{best[3]:.2f} after {len(tries)} allocation(s); the closest is kept (timing "
                               f"noise, or a table that predicts this model poorly: the report's "
                               f"latency_select.refine lists each try)")
        return best[0], best[1]

    @staticmethod
    def _cutter(state: State, deploy: Any, fit: Any = None, sync: bool = True) -> Any:
        """``cut(widths)`` → the model with those groups cut to those widths, as compile returns it (``sync=False``:
        its program, the same function); with ``fit`` (``Refit.fitter``) refit as well."""
        def cut(widths: dict[str, int]) -> Any:
            plan = Plan(meta={})
            _keep(plan, state.scores, widths)
            return deploy(plan, fit(plan) if fit else None, sync=sync)[1]
        return cut

    def _calibrate(self, state: State, table: LatencyTable, scores: dict[str, np.ndarray], dense: Any,
                   cut: Any) -> None:
        """Scale each group's predicted savings by the whole model's (see ``prunec.latency.calibrate``)."""
        calibrate(table, {g: len(s) for g, s in scores.items()}, cut, dense, state.program.example_inputs,
                  rounds=max(self.rounds, 7), kwargs=state.program.example_kwargs)
        save(table)

    def _costs(self, state: State, table: LatencyTable, scores: dict[str, np.ndarray], info: dict[str, Any]
               ) -> dict[str, np.ndarray]:
        """The allocator's per-group costs from ``sensitivity``, measured on the first ``SAMPLES``
        calibration samples (the example inputs without calibration data); the report summarises each
        group's error at its narrowest probe. With a refit, each probe is refit as the result will be, on one
        half of those samples, and measured on the other (``folds``): measured on the samples it was fit to, a
        least-squares refit looks nearly free (EfficientNet-Lite0 cut to 0.9 of its latency, flap + ls: relative logit
        error 0.06 on its calibration photos, 0.51 on other photos), and the allocator spent the cut where the
        refit overfits."""
        program, deploy = state.program, state.services.deployed
        dense = deploy(Plan(meta={}), sync=False)[0]   # programs: outputs only, nothing timed
        key = digest(state.model.state_dict(), table.meta["key_fields"], self.refit,
                     state.calib if self.refit else None)

        def prepared(cs: list[Call]) -> list[Call]:
            return [with_example_options(program, c) for c in cs]

        split = folds(calls(state.calib or []), SAMPLES) if self.refit else []
        if split:
            runs = [(self._cutter(state, deploy, Refit(self.refit).fitter(dataclasses.replace(state, calib=fit_on),
                                                                           scores), sync=False),
                     prepared(measure_on)) for fit_on, measure_on in split]
        else:   # no refit (or a single sample): each probe on the first SAMPLES samples, as is
            fit = Refit(self.refit).fitter(state, scores) if self.refit else None
            batches = prepared(first_samples(calls(state.calib or []), SAMPLES)) or \
                [(tuple(program.example_inputs), dict(program.example_kwargs))]
            runs = [(self._cutter(state, deploy, fit, sync=False), batches)]
        measured = [sensitivity(table, scores, c, dense, b, key=digest(key, b))[0] for c, b in runs]
        weights = [sum(shared_rows(c) or 1 for c in b) for _, b in runs]   # samples measured
        errors = {g: {w: sum(n * m[g][w] for n, m in zip(weights, measured)) / sum(weights) for w in measured[0][g]}
                  for g in measured[0]}
        summary = _summary({g: e[min(e)] for g, e in errors.items()})
        info["sensitivity"] = summary and {**summary, "out_of_sample": bool(split)}
        return {g: error_curve(scores[g], e) for g, e in errors.items()}

    def run(self, state: State) -> PassResult:
        table = self.table or profile(state.model, state.program, state.coupling, self.runtime, self.batch,
                                      self.threads, self.points, self.rounds, self.cache, op_timing=self.op_timing)
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
            if deploy and self.calibrate and not table.factors:   # the unpruned model as compile returns it, the cut
                self._calibrate(state, table, scores, deploy(Plan(meta={}))[0], self._cutter(state, deploy))
            info["factors"] = _summary(table.factors)
            costs = self._costs(state, table, scores, info) if self.sensitivity and deploy else {}
            widths, pred = allocate(table, scores, target_ms, floor, costs)
            info.update(mode="target", target_ms=target_ms)
            if self.refine and deploy is not None:
                widths, pred = self._refine(state, table, scores, floor, target_ms, widths, pred, info, costs)
        else:
            widths = {}
            for g in groups:
                budget = keep_count(g.size, self.ratios[g.kind])
                widths[g.name] = snap(table, g.name, budget) if g.name in timed else keep_count(
                    g.size, self.ratios[g.kind], table.meta["key_fields"].get("multiple", 8))
            pred = table.predict(widths)
            info.update(mode="snap", ratios=self.ratios)
        _keep(state.plan, state.scores, widths)
        info.update(predicted_ms=pred, widths={k: v for k, v in widths.items() if k in state.plan.kept},
                    calibrated=bool(table.factors))   # else predicted by standalone ops alone
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
