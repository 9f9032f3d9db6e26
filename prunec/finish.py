"""After selection: rewrite → sync → verify → refit check → cost (``finish_compile``), what compile returns
(``CompileResult``), the batch-dynamic swap (``make_dynamic``), and the unpruned/pruned pair as compile would
return them (``deployed``, for passes that time or measure candidates)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn

from prunec.calib import calls, shape_key, with_example_options
from prunec.cost import count_macs, count_params
from prunec.coupling import Coupling
from prunec.cut import Cut
from prunec.dynamic import DynamicProgram, describe_spec, export_program, export_synced, replay
from prunec.errors import InternalError, first_line
from prunec.module_sync import synced_copy
from prunec.plan import Plan
from prunec.program_module import ProgramModule, copy_graph
from prunec.rewrite import rewrite
from prunec.trace import Program, eval_mode
from prunec.verify import add_dynamic_check, check_refit, compare, verify

Progress = Callable[[str], None]
REFIT_CHECK_BATCHES = 8  # calibration batches the refit-vs-no-refit check runs


@dataclass
class CompileResult:
    """What compile returns: the pruned module, the rewritten program, the plan, the report."""

    model: nn.Module
    program: ProgramModule
    plan: Plan
    report: dict[str, Any]
    coupling: Coupling
    example_inputs: tuple[Any, ...] = ()
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    dynamic: DynamicProgram | None = None   # set when the program accepts any batch / sequence length
    prerefit: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # verified tensors a refit replaced

    def release_original(self, original: nn.Module) -> None:
        """Stop referencing ``original``'s tensors, so the caller can free it (and the file its weights are
        mapped from): tensors an ``inplace`` compile shared with it are copied, the traced programs are
        dropped (``coupling`` is None afterwards)."""
        theirs = {t.untyped_storage().data_ptr() for t in (*original.parameters(), *original.buffers())}
        owned: dict[tuple[Any, ...], torch.Tensor] = {}
        for root in {id(m): m for m in (self.model, self.program, getattr(self.dynamic, "program", None))
                     if m is not None}.values():
            for mod in root.modules():
                for table in (mod._parameters, mod._buffers):
                    for name, t in table.items():
                        if t is None or t.untyped_storage().data_ptr() not in theirs:
                            continue
                        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
                        if key not in owned:
                            owned[key] = t.detach().clone()
                        if isinstance(t, nn.Parameter):
                            t.data = owned[key]
                        else:
                            table[name] = owned[key]
        self.coupling = None  # type: ignore[assignment]
        if self.dynamic is not None:
            self.dynamic.coupling = None  # type: ignore[assignment]
        self.prerefit = {}

    def export(self, static: bool = False) -> torch.export.ExportedProgram:
        """Re-export the pruned program (a ``.pt2``-ready ExportedProgram), shape-dynamic when possible."""
        if self.dynamic is not None and not static:
            d = self.dynamic
            return export_program(self.program, d.inputs, d.kwargs, d.spec)
        return export_program(self.program, self.example_inputs, self.example_kwargs)


class Timer:
    """Seconds per compile stage (``with timer.stage(name)``), reported as ``report['time_s']``."""

    def __init__(self, progress: Progress | None) -> None:
        self.times: dict[str, float] = {}
        self.progress = progress

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        if self.progress:
            self.progress(name)
        start = time.perf_counter()
        yield
        self.times[name] = round(self.times.get(name, 0.0) + time.perf_counter() - start, 4)


def deployed(model: nn.Module, coupling: Coupling, plan: Plan, updates: dict[str, torch.Tensor] | None = None,
             sync: bool = True) -> tuple[nn.Module, nn.Module]:
    """(unpruned, pruned) as compile would return them: the user's class when it syncs, else programs; the pruned
    one with refit ``updates`` (pruned shapes, e.g. ``Refit.fitter``'s) written in, unchecked. ``sync=False``:
    the programs, never the user's class (the same function, without the copy and the check that syncing
    costs: for measuring outputs, not for timing)."""
    program = coupling.program
    cut = Cut.of(coupling, plan)
    pruned, state, _ = rewrite(cut)
    with torch.no_grad():
        for fqn, value in (updates or {}).items():
            state[fqn].copy_(value)
    if not sync:
        return original_program(coupling), pruned
    module, synced, _ = sync_module(model, state, pruned, program.example_inputs, program.example_kwargs, cut.blocks)
    return (model, module) if synced else (original_program(coupling), module)


def make_dynamic(result: CompileResult, model: nn.Module, spec: Any = None) -> None:
    """Swap in a batch-dynamic program (see prunec.dynamic); if it can't be made, say why in the report."""
    verified = result.report.get("verify") or {}
    inputs, kwargs = result.example_inputs, result.example_kwargs
    try:
        dyn = replay(model, result.plan, result.program, inputs, kwargs, spec,
                     exact=bool(verified.get("exact", True)), prerefit=result.prerefit)
    except Exception as err:  # noqa: BLE001 - any failure keeps the verified static program
        reason = first_line(err)
        try:  # the synced user class may still trace with a symbolic batch (e.g. its own num_heads)
            if not result.report.get("module_synced"):
                raise
            dyn = export_synced(result.model, result.program, inputs, kwargs, spec)
        except Exception as err2:  # noqa: BLE001
            if err2 is not err:
                reason = f"{reason}; the synced module: {first_line(err2)}"
            result.report["dynamic"] = {"dynamic": False, "reason": reason}
            result.report["notes"].append(f"the result is pinned to the example's shapes: {reason}")
            return
    if result.model is result.program:
        result.model = dyn.program
    result.program, result.dynamic = dyn.program, dyn
    result.report["dynamic"] = {"dynamic": True, "dims": describe_spec(dyn.spec, result.example_inputs,
                                                                       result.example_kwargs), **dyn.checked}
    if verified:
        add_dynamic_check(verified, dyn.checked)


def finish_compile(model: nn.Module, program: Program, coupling: Coupling, plan: Plan,
                   timer: Timer, notes: list[str], check: bool,
                   updates: dict[str, torch.Tensor] | None = None,
                   calib: Iterable[Any] | None = None, share: bool = False) -> CompileResult:
    """Rewrite, sync, verify, refit check and cost; an InternalError carries the plan. ``share``: the
    unpruned tensors stay the original's (see ``rewrite``)."""
    try:
        return _finish_checked(model, program, coupling, plan, timer, notes, check, updates or {}, calib, share)
    except InternalError as err:
        err.context.setdefault("plan", plan.to_json())
        raise


def _finish_checked(model: nn.Module, program: Program, coupling: Coupling, plan: Plan, timer: Timer,
            notes: list[str], check: bool, updates: dict[str, torch.Tensor],
            calib: Iterable[Any] | None, share: bool) -> CompileResult:
    inputs, kwargs = program.example_inputs, program.example_kwargs
    with timer.stage("rewrite"):
        cut = Cut.of(coupling, plan)
        pruned_program, state, _ = rewrite(cut, share=share, private=updates)
    cut_inputs, cut_kwargs = cut.shrink_inputs(inputs, kwargs)  # a part's inputs tied to another's (prunec.ties)
    with timer.stage("sync"):
        pruned, synced, sync_note = sync_module(model, state, pruned_program, cut_inputs, cut_kwargs, cut.blocks)
    verify_result = None
    if check:
        with timer.stage("verify"):
            verify_result = verify(cut, pruned_program, inputs, kwargs)
        if not verify_result.passed:
            raise InternalError(
                f"verification failed: the pruned program differs from the reference with its exact "
                f"units zeroed by rel. err {verify_result.rel_err:.3g} (max abs "
                f"{verify_result.max_abs_err:.3g}, tolerance {verify_result.tolerance:g})")
    prerefit: dict[str, torch.Tensor] = {}
    if updates:
        with timer.stage("refit check"):
            batches = [with_example_options(program, c) for c in calls(calib or [])[:REFIT_CHECK_BATCHES]]
            if synced:   # the eager modules run any shape; the static program only the example's
                refit, prerefit = check_refit(pruned, model, state, updates, batches or [(inputs, kwargs)])
            else:
                like = shape_key((inputs, kwargs))
                batches = [c for c in batches if shape_key(c) == like] or [(inputs, kwargs)]
                refit, prerefit = check_refit(pruned_program, original_program(coupling), state, updates, batches)
        notes = [*notes, (f"refit {refit['tensors']} tensors after the verified rewrite: output error vs the "
                          f"original on {refit['batches']} of the calibration batch(es) it was fitted to "
                          f"{refit['rel_err_before']:.4g} → {refit['rel_err_after']:.4g}") if refit["applied"] else
                 (f"refit not applied: it made the output error vs the original worse on the calibration "
                  f"data ({refit['rel_err_before']:.4g} → {refit['rel_err_after']:.4g})")]
        if verify_result is not None:
            verify_result.refit = refit
    with timer.stage("cost"):
        report = {
            "params_before": count_params(model), "params_after": count_params(pruned),
            "macs_before": count_macs(original_program(coupling), inputs, kwargs),
            "macs_after": count_macs(pruned_program, cut_inputs, cut_kwargs),
        }
    report.update({
        "verify": verify_result.to_json() if verify_result else None,
        "module_synced": synced, "module_note": sync_note,
        "groups": [{"name": g.name, "kind": g.kind, "size": g.size,
                    "kept": len(plan.kept.get(g.name, range(g.size))),
                    **({"approximate": g.approximate} if g.approximate else {})}
                   for g in coupling.groups],
        "frozen": coupling.frozen, "unknown_ops": coupling.unknown_ops,
        "notes": notes, "plan": plan.meta,
    })
    report["time_s"] = {**timer.times, "total": round(sum(timer.times.values()), 4)}
    return CompileResult(pruned, pruned_program, plan, report, coupling, inputs, kwargs, prerefit=prerefit)


def original_program(coupling: Coupling) -> ProgramModule:
    """The unpruned program as a module (MACs are counted on the same ops before and after)."""
    program = coupling.program
    return ProgramModule(program, copy_graph(program.graph)[0], program.state())


def sync_module(model: nn.Module, state: dict[str, torch.Tensor], program: ProgramModule,
          inputs: tuple[Any, ...], kwargs: dict[str, Any],
          dropped: Callable[[], list[str]] = list) -> tuple[nn.Module, bool, str]:
    """The user's module class with pruned tensors, if it runs and agrees with the program."""
    try:
        module = eval_mode(synced_copy(model, state, dropped()))
        with torch.no_grad():
            _, rel = compare(module(*inputs, **kwargs), program(*inputs, **kwargs))
    except Exception as err:  # any failure means the eager module can't follow: use the program
        return program, False, f"user module not synced: {first_line(err)}"
    if rel > 1e-5:
        return program, False, f"user module not synced: its output differs from the program (rel {rel:.2g})"
    return module, True, ""

