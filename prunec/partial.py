"""Prune what traces: when ``torch.export`` fails on the whole model (detectors: data-dependent
NMS / top-k), prune the largest submodules that export, and leave the rest as written.

1. Run the model once with hooks: every submodule's first call (args, kwargs), and which tensors
   each part reads and returns.
2. Walk the module tree top-down: a submodule with parameters that exports is a **part**;
   one that doesn't is split into its children.
3. Compile each part on its recorded inputs. Its inputs and outputs are frozen dims of its own
   program, so every dim that crosses a part boundary (the FPN's output channels feed the RPN
   head and the RoI heads) keeps its size: each part can be verified alone.
4. Put each pruned part, when it is the user's class (synced), into a copy of the model; a part
   that can't be synced stays dense (a fixed-shape program would break other image sizes).
5. Verify end to end: the pruned model's outputs equal those of the original with every
   part's dropped units zeroed at their consumers (the parts' verify references) — or, where
   untraced top-k / NMS re-ranks near-tied scores (random weights), every pruned part equals its
   zeroed reference on the inputs it received in the pruned model's run (reported, not hidden).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch import nn

from prunec.cost import count_macs, count_params
from prunec.cut import Cut
from prunec.errors import PruneError, TraceError
from prunec.trace import eval_mode, keep_attributes
from prunec.verify import compare, reference_module

Compile = Callable[..., Any]


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


def find_parts(model: nn.Module, calls: dict[str, tuple], compile_part: Callable[[nn.Module, str], Any]
               ) -> tuple[dict[str, Any], dict[str, str]]:
    """Compile the largest submodules (top-down) that trace on their recorded inputs. Returns
    path → CompileResult, and, for each module with parameters left dense, why."""
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
                parts[path] = compile_part(mod, path)
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


def _tensor_ids(tree: Any) -> set[int]:
    return {id(t) for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)}


def boundaries(parts: list[str], calls: dict[str, tuple]) -> list[str]:
    """'A → B' for every tensor part A returns that part B reads (their dims stay frozen)."""
    outs = {p: _tensor_ids(calls[p][2]) for p in parts}
    ins = {p: _tensor_ids((calls[p][0], calls[p][1])) for p in parts}
    return [f"{a} → {b}" for a in parts for b in parts if a != b and outs[a] & ins[b]]


def compile_parts(model: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any],
                  compile_fn: Compile, whole_error: TraceError, **options: Any) -> PartsResult:
    """Prune the parts of ``model`` that trace (see the module docstring). ``whole_error`` (why the
    whole model didn't trace) is raised again if the model doesn't even run on the inputs."""
    model = eval_mode(model)
    why_whole = whole_error.message
    try:
        calls = record_calls(model, inputs, kwargs)
    except Exception:  # wrong inputs: the trace error already says so
        raise whole_error from None

    def compile_part(part: nn.Module, path: str) -> Any:
        args, kw, _ = calls[path]
        return compile_fn(part, args, example_kwargs=kw, parts=False, static=True, **options)

    results, left = find_parts(model, calls, compile_part)
    parts = list(results)
    if not parts:
        raise whole_error
    pruned, reference = copy.deepcopy(model), copy.deepcopy(model)
    rows = []
    for path, result in results.items():
        part = model.get_submodule(path)
        rows.append({"part": path, "class": type(part).__name__, "synced": result.report["module_synced"],
                     "macs_before": result.report["macs_before"], "macs_after": result.report["macs_after"],
                     "rel_err": (result.report["verify"] or {}).get("rel_err"),
                     "note": result.report["module_note"]})
        if not result.report["module_synced"]:
            continue  # a fixed-shape program would break other input sizes: keep the part dense
        _set_submodule(pruned, path, result.model)
        ref_state = reference_module(Cut.of(result.coupling, result.plan)).state_dict()
        _load_matching(reference.get_submodule(path), ref_state)
    with torch.no_grad(), keep_attributes(pruned), keep_attributes(reference):
        abs_err, rel_err = compare(pruned(*inputs, **kwargs), reference(*inputs, **kwargs))
        macs = {"macs_before": count_macs(model, inputs, kwargs), "macs_after": count_macs(pruned, inputs, kwargs)}
    in_context = _parts_in_context(pruned, reference, [r["part"] for r in rows if r["synced"]], inputs, kwargs)
    if rel_err > 1e-4 and in_context > 1e-4:
        raise PruneError(f"end-to-end check failed: pruned parts differ from the zeroed reference by rel. "
                         f"err {rel_err:.3g} (parts on the inputs they receive: {in_context:.3g})",
                         "this is a prunec bug; report it with the model")
    report = {
        **macs, "params_before": count_params(model), "params_after": count_params(pruned),
        "parts": rows, "left_dense": left, "frozen_boundaries": boundaries(parts, calls),
        "whole_model_trace_error": why_whole,
        "macs_parts_before": sum(r["macs_before"] for r in rows),
        "macs_parts_after": sum(r["macs_after"] if r["synced"] else r["macs_before"] for r in rows),
        # outputs equal, or (when untraced top-k/NMS re-ranks near-tied scores) every pruned part equals
        # its zeroed reference on the very inputs it received in the pruned model's run
        "verify_end_to_end": {"max_abs_err": abs_err, "rel_err": rel_err, "parts_in_context_rel_err": in_context,
                              "outputs_equal": rel_err <= 1e-4, "passed": True},
        "module_synced": all(r["synced"] for r in rows),
    }
    return PartsResult(pruned, results, report, inputs, kwargs)


def _parts_in_context(pruned: nn.Module, reference: nn.Module, parts: list[str], inputs: tuple[Any, ...],
                      kwargs: dict[str, Any]) -> float:
    """Largest rel. error of a pruned part vs its zeroed reference, both fed what the part received
    while the pruned model ran (so the untraced glue between parts is exercised as is)."""
    calls = record_calls(pruned, inputs, kwargs)
    worst = 0.0
    with torch.no_grad():
        for path in parts:
            args, kw, out = calls[path]
            worst = max(worst, compare(out, reference.get_submodule(path)(*args, **kw))[1])
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
