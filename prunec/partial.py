"""Prune what traces: when ``torch.export`` fails on the whole model (detectors: data-dependent
NMS / top-k), prune the largest submodules that export, and leave the rest as written.

1. Run the model once with hooks: every submodule's first call (args, kwargs).
2. Walk the module tree top-down: a submodule with parameters that exports is a **part**;
   one that doesn't is split into its children.
3. Find the tensors that cross between parts (``prunec.ties``): one part returns it, others read it.
   Their dims are tied across the parts (the FPN's output channels and every head's input channels
   drop the same units), or frozen when untraced code reads them too — the report says which and why.
4. Analyze each part with its tied inputs/outputs open, score (data-driven criteria on what the part reads
   from the calibration batches: ``part_calib``) and select; choose each tied group's
   units jointly; rewrite, sync and verify every part against its zeroed reference (tied inputs cut
   alike, tied outputs compared on the kept units).
5. Put each pruned part, when it is the user's class (synced), into a copy of the model; a part
   that can't be synced stays dense (a fixed-shape program would break other image sizes), and the
   tied groups it holds are kept whole in every part.
6. Verify end to end: the pruned model's outputs equal those of the original with every
   part's dropped units zeroed at their consumers (the parts' verify references) — where untraced
   top-k / NMS re-ranks near-tied scores (random weights), in float64, or failing that every pruned
   part equals its zeroed reference on the inputs it received in the pruned model's run, and every
   tied boundary drops the same units on both sides (all reported, not hidden).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch import nn

from prunec.cost import count_macs, count_params
from prunec.cut import Cut
from prunec.errors import InternalError, PruneError, TraceError
from prunec.ties import describe, find_boundaries, open_leaves, tie, tied_groups
from prunec.trace import eval_mode, keep_attributes
from prunec.verify import compare, reference_module

class PartStages(NamedTuple):
    """The compiler stages a part goes through, handed in by ``prunec.compile``."""

    trace: Callable[..., Any]      # (module, args, kwargs) → Program, or TraceError
    plan: Callable[..., Any]       # (module, program, open inputs, open outputs, **options) → passes' State
    finish: Callable[..., Any]     # (state, plan, check) → CompileResult


@dataclass
class PartsResult:
    """What compile returns when only parts of the model traced: the model (the user's class,
    with its pruned parts swapped in), each part's CompileResult, and the report."""

    model: nn.Module
    parts: dict[str, Any]
    report: dict[str, Any]
    example_inputs: tuple[Any, ...] = ()
    example_kwargs: dict[str, Any] = field(default_factory=dict)

    def export(self) -> torch.export.ExportedProgram:
        raise TraceError("the whole model does not export (only its parts were pruned)",
                         "save result.model with torch.save / its framework, or export result.parts[...]")


def record_calls(model: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, tuple]:
    """Module path → (args, kwargs, output) of its first call while ``model`` runs once."""
    calls: dict[str, tuple] = {}
    handles = []
    for path, mod in model.named_modules():
        def hook(m: nn.Module, args: tuple, kw: dict, out: Any, path: str = path) -> None:
            calls.setdefault(path, (args, kw, out))
        handles.append(mod.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad(), keep_attributes(model):
            model(*inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return calls


def part_calib(model: nn.Module, paths: list[str], calib: Any) -> dict[str, list[tuple[tuple, dict]]]:
    """What each part reads on the calibration batches: the whole model runs on every batch with
    pre-hooks on the parts, every call recorded as (args, kwargs), so a data-driven criterion scores a
    part on its real inputs (e.g. a head on the FPN features of the calibration images)."""
    from prunec.calib import call_args
    seen: dict[str, list[tuple[tuple, dict]]] = {p: [] for p in paths}
    handles = [model.get_submodule(p).register_forward_pre_hook(
        lambda m, args, kw, p=p: seen[p].append((tuple(args), dict(kw))), with_kwargs=True) for p in paths]
    try:
        with torch.no_grad(), keep_attributes(model):
            for batch in calib:
                args, kwargs = call_args(batch)
                model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return seen


def find_parts(model: nn.Module, calls: dict[str, tuple], trace_part: Callable[[nn.Module, str], Any]
               ) -> tuple[dict[str, Any], dict[str, str]]:
    """Trace the largest submodules (top-down) that trace on their recorded inputs. Returns
    path → Program, and, for each module with parameters left dense, why."""
    parts: dict[str, Any] = {}
    left: dict[str, str] = {}

    def walk(path: str, mod: nn.Module) -> None:
        if not any(True for _ in mod.parameters()):
            return
        if path not in calls:
            left[path or "<top>"] = "not called on the example"
            return
        if path:
            try:
                parts[path] = trace_part(mod, path)
                return
            except TraceError as err:
                why = err.message
        else:
            why = "the whole model does not export"
        direct = [n for n, _ in mod.named_parameters(recurse=False)]
        if direct:
            left[path or "<top>"] = f"owns parameters {direct[:3]} and does not trace: {why[:200]}"
        for name, child in mod.named_children():
            walk(f"{path}.{name}" if path else name, child)

    walk("", model)
    return parts, left


def compile_parts(model: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any], stages: PartStages,
                  whole_error: TraceError, check: bool = True, **options: Any) -> PartsResult:
    """Prune the parts of ``model`` that trace (see the module docstring). ``whole_error`` (why the
    whole model didn't trace) is raised again if the model doesn't even run on the inputs."""
    model = eval_mode(model)
    try:
        calls = record_calls(model, inputs, kwargs)
    except Exception:  # wrong inputs: the trace error already says so
        raise whole_error from None
    programs, left = find_parts(model, calls, lambda part, path: stages.trace(part, calls[path][0], calls[path][1]))
    if not programs:
        raise whole_error
    try:
        boundaries, untied = find_boundaries(model, list(programs), inputs, kwargs), ""
    except Exception as err:  # noqa: BLE001 - a model that can't run under the watch keeps every part's dims
        boundaries, untied = [], f"crossing dims not analyzed, all kept: {type(err).__name__}: {str(err)[:200]}"
    opened = open_leaves(boundaries)
    none = (frozenset(), frozenset())
    calib = options.pop("calib", None)
    batches = part_calib(model, list(programs), calib) if calib is not None else {}
    states = {p: stages.plan(model.get_submodule(p), prog, *opened.get(p, none), check=check,
                             calib=batches.get(p), **options)
              for p, prog in programs.items()}
    couplings = {p: s.coupling for p, s in states.items()}
    scores = {p: s.scores for p, s in states.items()}
    groups = tied_groups(couplings, boundaries, scores)
    ratios = {"channel": options.get("channels", 0.0), "mlp": options.get("mlp") or options.get("channels", 0.0)}
    results: dict[str, Any] = {}
    for _ in range(len(groups) + 1):  # each round that finds a stuck part keeps one more tied group whole
        plans = tie({p: s.plan for p, s in states.items()}, couplings, scores, groups, ratios,
                    options.get("round_to", 8))
        for p, s in states.items():
            if p not in results or results[p].plan.kept != plans[p].kept:
                results[p] = stages.finish(s, plans[p], check)
        stuck = [(tg, results[p]) for tg in groups if not tg.kept_whole
                 for p, _ in tg.members if not results[p].report["module_synced"]]
        if not stuck:
            break
        for tg, result in stuck:
            tg.kept_whole = f"a part can't follow: {result.report['module_note']}"
    parts = _assemble(model, inputs, kwargs, results, left, boundaries, groups, whole_error.message)
    parts.report["boundaries_note"] = untied
    return parts


def _assemble(model: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any], results: dict[str, Any],
              left: dict[str, str], boundaries: list, groups: list, why_whole: str) -> PartsResult:
    """Swap the synced parts into a copy of the model, check it end to end, and write the report."""
    pruned, reference = copy.deepcopy(model), copy.deepcopy(model)
    rows, cuts = [], {}
    for path, result in results.items():
        part = model.get_submodule(path)
        rows.append({"part": path, "class": type(part).__name__, "synced": result.report["module_synced"],
                     "macs_before": result.report["macs_before"], "macs_after": result.report["macs_after"],
                     "rel_err": (result.report["verify"] or {}).get("rel_err"),
                     "note": result.report["module_note"]})
        if not result.report["module_synced"]:
            continue  # a fixed-shape program would break other input sizes: keep the part dense
        cuts[path] = Cut.of(result.coupling, result.plan)
        _set_submodule(pruned, path, result.model)
        _load_matching(reference.get_submodule(path), reference_module(cuts[path]).state_dict())
    with torch.no_grad(), keep_attributes(pruned), keep_attributes(reference):
        want = reference(*inputs, **kwargs)
        abs_err, rel_err = compare(pruned(*inputs, **kwargs), want)
        macs = {"macs_before": count_macs(model, inputs, kwargs), "macs_after": count_macs(pruned, inputs, kwargs)}
    _check_ties(boundaries, cuts)  # the in-context check sees each part alone: ties are checked here
    in_context = _parts_in_context(pruned, reference, cuts, inputs, kwargs)
    rel64 = _float64_rel_err(pruned, reference, inputs, kwargs) if rel_err > 1e-4 else None
    if rel_err > 1e-4 and (rel64 is None or rel64 > 1e-4) and in_context > 1e-4:
        raise PruneError(f"end-to-end check failed: pruned parts differ from the zeroed reference by rel. "
                         f"err {rel_err:.3g} (parts on the inputs they receive: {in_context:.3g})",
                         "this is a prunec bug; report it with the model")
    crossing = describe(boundaries, groups)
    report = {
        **macs, "params_before": count_params(model), "params_after": count_params(pruned),
        "parts": rows, "left_dense": left, "boundaries": crossing,
        "frozen_boundaries": [f"{b['boundary']}: {b['why']}" for b in crossing if not b["tied"]],
        "tied_groups": [tg.to_json() for tg in groups],
        "whole_model_trace_error": why_whole,
        "macs_parts_before": sum(r["macs_before"] for r in rows),
        "macs_parts_after": sum(r["macs_after"] if r["synced"] else r["macs_before"] for r in rows),
        # outputs equal, or (when untraced top-k/NMS re-ranks near-tied scores) every pruned part equals
        # its zeroed reference on the very inputs it received in the pruned model's run
        # float64: both models cast, when float32 rounding re-ranked (None: not needed, or they don't run in it)
        "verify_end_to_end": {"max_abs_err": abs_err, "rel_err": rel_err, "parts_in_context_rel_err": in_context,
                              "outputs_equal": rel_err <= 1e-4, "float64_rel_err": rel64,
                              # 0: the example's outputs are empty (no detection above the score threshold):
                              # outputs_equal then compared nothing; the in-context check still did
                              "output_elements": sum(t.numel() for t in pytree.tree_leaves(want)
                                                     if isinstance(t, torch.Tensor)),
                              "outputs_equal_float64": rel64 is not None and rel64 <= 1e-4, "passed": True},
        "module_synced": all(r["synced"] for r in rows),
    }
    return PartsResult(pruned, results, report, inputs, kwargs)


def _float64_rel_err(pruned: nn.Module, reference: nn.Module, inputs: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> float | None:
    """The end-to-end rel. error with both models and the inputs cast to float64 (rounding ~1e-16, so top-k/NMS
    see the same near-tied scores), or None when the models don't run in float64."""
    def cast(t: Any) -> Any:
        return t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
    args, kw = pytree.tree_map(cast, (tuple(inputs), dict(kwargs)))
    try:
        a, b = copy.deepcopy(pruned).double(), copy.deepcopy(reference).double()
        with torch.no_grad(), keep_attributes(a), keep_attributes(b):
            got, want = a(*args, **kw), b(*args, **kw)
    except Exception:  # noqa: BLE001 - a model that refuses float64 keeps the float32 checks
        return None
    try:
        return compare(got, want)[1]
    except InternalError:  # e.g. a different number of detections: not equal
        return float("inf")


def _check_ties(boundaries: list, cuts: dict[str, Cut]) -> None:
    """Every tied boundary: the producer drops from its output exactly the units each consumer drops from
    its input (a part left dense drops none)."""
    def dropped(path: str, side: int, leaf: int) -> dict[int, list[int]]:
        cut = cuts.get(path)
        return {} if cut is None else {d: sorted(map(int, idx)) for d, idx in cut.io_dropped[side].get(leaf, [])}
    for b in boundaries:
        made = dropped(b.producer, 1, b.out_leaf)
        for r in b.consumers:
            back = {d: dropped(r.part, 0, r.leaf).get(cd) for d, cd in r.dims.items()}
            if {d: idx for d, idx in back.items() if idx} != made:
                raise InternalError(f"tied dims disagree across {b.name}: {b.producer} drops {made} from its "
                                    f"output, {r.part} drops {dropped(r.part, 0, r.leaf)} from its input")


def _parts_in_context(pruned: nn.Module, reference: nn.Module, cuts: dict[str, Cut], inputs: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> float:
    """Largest rel. error of a pruned part vs its zeroed reference, both fed what the part received
    while the pruned model ran (the reference's tied inputs widened with zeros where units were cut:
    it zeroes their consumers), so the untraced glue between parts is exercised as is."""
    calls = record_calls(pruned, inputs, kwargs)
    worst = 0.0
    with torch.no_grad():
        for path, cut in cuts.items():
            args, kw, out = calls[path]
            wide_args, wide_kw = cut.widen_inputs(args, kw)
            want = cut.shrink_outputs(reference.get_submodule(path)(*wide_args, **wide_kw))
            worst = max(worst, compare(out, want)[1])
    return worst


def _set_submodule(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def _load_matching(mod: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy the reference's (zeroed) tensors into the original part, by FQN."""
    own = dict(mod.named_parameters())
    own.update(dict(mod.named_buffers()))
    with torch.no_grad():
        for fqn, t in state.items():
            if fqn in own and own[fqn].shape == t.shape:
                own[fqn].copy_(t)
