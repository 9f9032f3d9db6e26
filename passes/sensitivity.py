"""Sensitivity analysis: prune one group (or kind) alone at several ratios, measure the damage."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from prunec.atomic import atomic_path
from prunec.calib import Call, calls, flat_output, run
from prunec.distributed import global_mean
from prunec.errors import InputError
from prunec.passes.base import PASSES, Pass, PassResult, State, run_passes
from prunec.passes.select import keep_count
from prunec.plan import Plan

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
Metric = Callable[[nn.Module], float]


def output_error(reference: nn.Module, batches: list[Call]) -> Metric:
    """Metric: mean over batches of ‖f(x) − f_ref(x)‖ / ‖f_ref(x)‖ (lower is better)."""
    wanted = [flat_output(run(reference, b)) for b in batches]

    def metric(model: nn.Module) -> float:
        errs = [float((flat_output(run(model, b)) - w).norm() / (w.norm() + 1e-12))
                for b, w in zip(batches, wanted)]
        return global_mean(errs)   # every rank's batches (prunec.distributed)
    return metric


def scored_state(state: State, method: str | Pass) -> State:
    """``state`` with scores from a criterion (a pass or a registered name), plan emptied."""
    crit = PASSES[method]() if isinstance(method, str) else method
    fresh = State(state.model, state.program, state.coupling, calib=state.calib, services=state.services)
    return run_passes([crit], fresh)


def group_plan(state: State, names: list[str], ratio: float, round_to: int) -> Plan:
    """Drop the lowest-scoring ``ratio`` of each named group, nothing else."""
    plan = Plan()
    for name in names:
        g = state.coupling.group(name)
        unit = next(iter(g.members.values())).shape[1]
        n_keep = keep_count(g.size, ratio, round_to if unit == 1 else 1)
        if n_keep < g.size:
            order = np.argsort(-state.scores[name], kind="stable")
            plan.kept[name] = np.sort(order[:n_keep]).tolist()
            plan.sizes[name] = g.size
    return plan


def prune_with(state: State, plan: Plan) -> nn.Module:
    """The state's program rewritten with ``plan`` (no re-trace, no verify: trials only)."""
    return state.need_services("trying a plan").prune(plan).eval()


def analyse(state: State, ratios: Iterable[float] = RATIOS, metric: Metric | None = None,
            by: str = "group", method: str | Pass = "l1", round_to: int = 1) -> dict[str, Any]:
    """Per group (``by="group"``) or kind (``by="kind"``): metric drop at each ratio.
    Drop = metric(original) − metric(pruned) for a user metric (higher is better), or the
    relative output error on the calibration inputs (example inputs without calib)."""
    if by not in ("group", "kind"):
        raise InputError(f"sensitivity by '{by}' is unknown", "use by='group' or by='kind'")
    ratios = [float(r) for r in ratios]
    scored = scored_state(state, method)
    program = state.program
    batches = calls(state.calib) if state.calib is not None else [(program.example_inputs, program.example_kwargs)]
    if metric is None:
        measure, baseline, name = output_error(state.model, batches), 0.0, "relative output error"
        drop = measure
    else:
        baseline, name = float(metric(state.model)), getattr(metric, "__name__", "metric")
        drop = lambda m: baseline - float(metric(m))  # noqa: E731
    units: dict[str, list[str]] = {}
    for g in scored.coupling.groups:
        if g.name in scored.scores:
            units.setdefault(g.name if by == "group" else g.kind, []).append(g.name)
    result: dict[str, Any] = {"metric": name, "baseline": baseline, "by": by, "ratios": ratios,
                              "units": {}}
    for unit, names in units.items():
        drops = [float(drop(prune_with(scored, group_plan(scored, names, r, round_to))))
                 for r in ratios]
        kinds = sorted({scored.coupling.group(n).kind for n in names})
        result["units"][unit] = {"kind": kinds[0] if len(kinds) == 1 else kinds,
                                 "groups": names, "drop": drops}
    return result


def save(result: dict[str, Any], json_path: str | Path, png_path: str | Path | None = None) -> None:
    """Write the analysis as JSON and (with matplotlib installed) a drop-vs-ratio plot."""
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    if png_path is None:
        return
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise InputError("the sensitivity plot needs matplotlib", "pip install 'prunec[bench]'") from err
    fig, ax = plt.subplots(figsize=(6, 4))
    for unit, row in result["units"].items():
        ax.plot(result["ratios"], row["drop"], marker="o", label=unit)
    ax.set_xlabel("fraction of units removed (this group only)")
    ax.set_ylabel(f"drop ({result['metric']})")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


class Sensitivity(Pass):
    """Prune each group alone at ``ratios`` and record the metric drop (Li et al., 2017, §4).
    Before: any state.  After: ``state.results["sensitivity"]`` and a note; the JSON
    (and PNG) written when ``out`` is given. Analysis only: the plan is not touched."""

    provides = ("analysis",)

    name = "sensitivity"

    def __init__(self, ratios: Iterable[float] = RATIOS, metric: Metric | None = None,
                 out: str | Path | None = None, plot: str | Path | None = None, by: str = "group",
                 method: str | Pass = "l1", round_to: int = 1) -> None:
        self.ratios, self.metric, self.out, self.plot = list(ratios), metric, out, plot
        self.by, self.method, self.round_to = by, method, round_to

    def run(self, state: State) -> PassResult:
        result = analyse(state, self.ratios, self.metric, self.by, self.method, self.round_to)
        state.results[self.name] = result
        if self.out is not None:
            save(result, self.out, self.plot)
        worst = max(result["units"].items(), key=lambda kv: kv[1]["drop"][-1], default=None)
        if worst:
            state.notes.append(f"sensitivity: most sensitive {self.by} is {worst[0]} "
                               f"(drop {worst[1]['drop'][-1]:.3g} at ratio {self.ratios[-1]})")
        return PassResult(state, False)
