"""Gradual (iterative) pruning: prune a little, recover, prune more — every step a verified compile.

    result = prunec.compile(model, x, schedule=Gradual(final=0.5, steps=4, every=100),
                            recover={"data": batches, "lr": 1e-3})

The fraction removed after step t of n follows Zhu & Gupta's (2017) cubic curve
s_t = s_f · (1 − (1 − t/n)³) (or a straight line), always counted against the *original* width of
each group, so the last step lands on the same size as a one-shot compile at ``final``. Between
steps the model is distilled from the original for ``every`` steps (``prunec.recover``). With
``rewind_at=k`` each recovery starts from the weights the previous recovery had after k steps,
sliced to the new plan (lottery-ticket rewinding, Frankle et al., 2020).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from torch import nn

from prunec.errors import InputError
from prunec.passes import LeastSquaresSelection, Pass, PassResult, State
from prunec.passes.select import check_ratio, keep_count
from prunec.recover import Recovery

KIND_ARGS = {"channels": ("channel", "mlp"), "mlp": ("mlp",), "heads": ("head",), "hidden": ("hidden",)}


@dataclass(frozen=True)
class Gradual:
    """``steps`` prune steps up to ``final`` removed, ``every`` recovery steps after each."""

    final: float
    steps: int = 4
    every: int = 100
    curve: str = "cubic"
    rewind_at: int | None = None
    kind: str = "channels"          # which groups: channels (incl. MLP), mlp, heads or hidden

    def fractions(self) -> list[float]:
        """Fraction of each group removed after every prune step (the last is ``final``)."""
        check_ratio("final", self.final)
        if self.steps < 1 or self.every < 0:
            raise InputError(f"schedule steps={self.steps}, every={self.every}", "use steps ≥ 1 and every ≥ 0")
        if self.kind not in KIND_ARGS:
            raise InputError(f"unknown schedule kind '{self.kind}'", f"use one of {sorted(KIND_ARGS)}")
        if self.curve not in ("cubic", "linear"):
            raise InputError(f"unknown schedule curve '{self.curve}'", "use 'cubic' or 'linear'")
        t = np.arange(1, self.steps + 1) / self.steps
        shape = 1 - (1 - t) ** 3 if self.curve == "cubic" else t
        return [round(float(self.final * s), 6) for s in shape]


class KeepFraction(Pass):
    """Keep the best-scored units so that each group ends at ``1 − fraction`` of its *original* size.
    Before: state.scores.  After: state.plan.kept (never grows a group)."""

    name = "keep_fraction"
    requires = ("scores",)
    provides = ("plan",)

    def __init__(self, kinds: tuple[str, ...], fraction: float, original: dict[str, int], round_to: int) -> None:
        self.kinds, self.fraction, self.original, self.round_to = kinds, fraction, original, round_to

    def run(self, state: State) -> PassResult:
        for g in state.coupling.groups:
            if g.kind not in self.kinds or g.name not in state.scores:
                continue
            unit = next(iter(g.members.values())).shape[1]
            keep = keep_count(self.original.get(g.name, g.size), self.fraction, self.round_to if unit == 1 else 1)
            keep = min(keep, g.size)
            if keep < g.size:
                order = np.argsort(-state.scores[g.name], kind="stable")
                state.plan.kept[g.name] = np.sort(order[:keep]).tolist()
                state.plan.sizes[g.name] = g.size
        state.plan.meta.update({"fraction": self.fraction, "kinds": list(self.kinds)})
        return PassResult(state, True)


def compile_gradual(model: nn.Module, example_inputs: Any, schedule: Gradual, recover: dict[str, Any] | None,
                    *, compile_once: Callable[..., Any], criterion: Callable[..., Pass],
                    analyze: Callable[..., Any], method: str = "l1", round_to: int = 8,
                    **compile_kwargs: Any) -> Any:
    """Run ``schedule`` on ``model``; returns the last step's CompileResult with a ``schedule``
    report (fraction, plan, params, verify and recovery of every step). The compiler hands in its
    ``compile``, ``criterion`` and ``analyze`` (a later stage is a service, never an import)."""
    fractions = schedule.fractions()
    kinds = KIND_ARGS[schedule.kind]
    options = dict(recover or {})
    data = options.pop("data", None)
    teacher = options.pop("teacher", model)
    if schedule.every and data is None:
        raise InputError("a gradual schedule recovers between steps and needs data",
                         "pass recover={'data': batches, ...}, or every=0")
    scorer = criterion(method, 0.0, round_to)
    if isinstance(scorer, LeastSquaresSelection):
        raise InputError(f"'{method}' selects its own ratio and can't follow a schedule",
                         "use a scoring criterion (l1, l2, bn, taylor, …) for gradual pruning")
    original = {g.name: g.size for g in analyze(model, example_inputs, compile_kwargs.get("example_kwargs")).groups}
    current, rewind, steps, result = model, None, [], None
    first = None
    for i, fraction in enumerate(fractions):
        passes = [criterion(method, 0.0, round_to), KeepFraction(kinds, fraction, original, round_to)]
        result = compile_once(current, example_inputs, passes=passes, round_to=round_to, **compile_kwargs)
        student = result.model
        if rewind is not None:  # the kept units restart from their early weights
            early = copy.deepcopy(current)
            early.load_state_dict(rewind)
            student = compile_once(early, example_inputs, plan=result.plan, **compile_kwargs).model
        record = {"step": i + 1, "fraction": fraction, "plan": result.plan.to_json(),
                  "params": result.report["params_after"], "verify": result.report["verify"],
                  "module_synced": result.report["module_synced"]}
        if schedule.every:
            run = Recovery(**{**options, "rewind_at": schedule.rewind_at}).run(student, teacher, data, schedule.every)
            student, rewind = run.model, run.rewind
            record["recover"] = {k: run.report[k] for k in ("loss", "time_s", "before", "after")}
        result.model = current = student
        first = first or result.report
        steps.append(record)
    result.report["params_before"], result.report["macs_before"] = first["params_before"], first["macs_before"]
    result.report["schedule"] = {"final": schedule.final, "steps": schedule.steps, "every": schedule.every,
                                 "curve": schedule.curve, "rewind_at": schedule.rewind_at, "per_step": steps}
    return result
