"""Shape-dynamic results: the pruned program accepts any batch (and any sequence length for text).

The plan is made and verified on the static trace of the example. Then the original model is traced
again with symbolic batch/sequence dims, the same plan is applied to that trace, and the result is
verified twice: equal to the static pruned program on the example, and equal to the zeroed
reference at a *different* batch size (so a rewrite that bakes a size in is caught). If any step
fails the result stays static and the report says why.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree
from torch.export import Dim

from prunec.analyze import build_coupling
from prunec.coupling import Coupling
from prunec.cut import Cut
from prunec.plan import Plan
from prunec.program_module import ProgramModule, copy_graph
from prunec.rewrite import rewrite_graph
from prunec.trace import trace
from prunec.verify import EXACT_TOL, compare, verify

Spec = tuple[Any, ...]
TOL = EXACT_TOL


@dataclass
class DynamicProgram:
    """A batch-dynamic pruned program, the spec it was traced with, and its example inputs."""

    program: ProgramModule
    coupling: Coupling
    spec: Spec
    inputs: tuple[Any, ...]
    kwargs: dict[str, Any]
    # the check at other batch sizes: {"batch_sizes", "rel_err", "against"} (for the report's verify entry)
    checked: dict[str, Any] = field(default_factory=dict)


def _tensor_dims(t: Any, text: bool) -> dict[int, Any] | None:
    """Batch for every tensor input; also the sequence axis of 2-D integer inputs (token ids, masks)."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return None
    dims = {0: Dim.AUTO}
    if text and t.dim() == 2 and not t.is_floating_point():
        dims[1] = Dim.AUTO
    return dims


def default_spec(inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> Spec:
    """dynamic_shapes for torch.export: positional inputs, then keyword inputs in order."""
    text = any(isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dim() == 2
               for t in pytree.tree_leaves((inputs, kwargs)))
    return (*(pytree.tree_map(lambda t: _tensor_dims(t, text), a) for a in inputs),
            *(pytree.tree_map(lambda t: _tensor_dims(t, text), v) for v in kwargs.values()))


def _resize(t: Any, dims: Any, grow: int) -> Any:
    """``t`` with every dynamic dim of size 1 doubled (export specialises 0/1), plus ``grow`` on each."""
    if not isinstance(t, torch.Tensor) or not isinstance(dims, dict):
        return t
    for d in sorted(dims):
        target = max(2, t.shape[d]) + grow
        if target != t.shape[d]:
            reps = -(-target // t.shape[d])
            t = t.repeat_interleave(reps, dim=d).narrow(d, 0, target) if t.shape[d] else t
    return t


def resized(inputs: tuple[Any, ...], kwargs: dict[str, Any], spec: Spec,
            grow: int = 0) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Example inputs resized along the spec's dynamic dims (see ``_resize``): with ``grow`` another batch
    size and, for token inputs, another sequence length, so a rewrite that bakes a size in is caught."""
    return _map_dims(inputs, kwargs, spec, lambda t, d: _resize(t, d, grow))


def _map_dims(inputs: tuple[Any, ...], kwargs: dict[str, Any], spec: Spec,
              fn: Callable[[Any, Any], Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """``fn(tensor, its dynamic dims)`` over every input leaf the spec names."""
    specs = list(spec)

    def each(value: Any, dims: Any) -> Any:
        return pytree.tree_map(fn, value, dims, is_leaf=lambda x: x is None) if dims is not None else value
    return (tuple(each(a, s) for a, s in zip(inputs, specs[:len(inputs)])),
            {k: each(v, s) for (k, v), s in zip(kwargs.items(), specs[len(inputs):])})


def _has_symbolic_input(coupling: Coupling) -> bool:
    for node in coupling.program.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in val.shape):
            return True
    return False


def _symbolic_trace(module: torch.nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any], spec: Spec | None,
                    who: str, gqa_query: bool = False) -> tuple[Spec, tuple[Any, ...], dict[str, Any], Any, Coupling]:
    """Trace ``module`` with ``spec``'s dims symbolic (on inputs resized so no dim is 0/1-specialised)."""
    spec = spec or default_spec(inputs, kwargs)
    wide_args, wide_kwargs = resized(inputs, kwargs, spec)
    program = trace(module, wide_args, wide_kwargs, dynamic_shapes=spec)
    coupling = build_coupling(program, gqa_query)
    if not _has_symbolic_input(coupling):
        raise ValueError(f"torch.export specialised every input dim of {who}")
    return spec, wide_args, wide_kwargs, program, coupling


def replay(model: torch.nn.Module, plan: Plan, static: torch.nn.Module, inputs: tuple[Any, ...],
           kwargs: dict[str, Any], spec: Spec | None = None, exact: bool = True,
           prerefit: dict[str, torch.Tensor] | None = None) -> DynamicProgram:
    """Trace ``model`` with symbolic dims, apply ``plan``, check it against ``static`` and the reference.

    The dynamic program runs on ``static``'s own tensors (no second copy of the weights); where a refit
    replaced a verified tensor, ``prerefit`` holds that tensor for the check against the reference.

    Raises ValueError (with the reason) when the dynamic program can't be made or doesn't check out.
    """
    spec, wide_args, wide_kwargs, program, coupling = _symbolic_trace(model, inputs, kwargs, spec, "the model",
                                                                      plan.meta.get("gqa") == "query")
    names = {g.name: g.size for g in coupling.groups}
    lost = [n for n, size in plan.sizes.items() if names.get(n) != size]
    if lost:
        raise ValueError(f"with a symbolic batch the trace does not couple group {lost[0]} the same way "
                         "(e.g. batch and heads merged in one reshape)")
    cut = Cut.of(coupling, plan)
    graph, _ = rewrite_graph(cut)
    graph.lint()
    state = {**{k: v.detach() for k, v in static.state_dict(keep_vars=True).items()}, **(prerefit or {})}
    fqns = program.placeholder_fqns()
    missing = sorted({fqns[n.name] for n in graph.nodes if n.op == "placeholder" and n.name in fqns} - set(state))
    if missing:
        raise ValueError(f"the dynamic program's state differs from the static one ({missing[:2]})")
    dynamic = ProgramModule(program, graph, state)
    other_args, other_kwargs = resized(inputs, kwargs, spec, grow=1)
    check = verify(cut, dynamic, other_args, other_kwargs)
    if not check.passed:  # the exact part (approximate groups are reported, not checked)
        raise ValueError(f"at another batch size the pruned program differs from the reference "
                         f"(rel. err {check.rel_err:.3g})")
    missing, unexpected = dynamic.load_state_dict(static.state_dict(), strict=False)
    if missing or unexpected:
        raise ValueError(f"the dynamic program's state differs from the static one ({(missing or unexpected)[:2]})")
    with torch.no_grad():
        _, rel = compare(dynamic(*inputs, **kwargs), static(*inputs, **kwargs))
    if not rel <= TOL:
        raise ValueError(f"on the example the dynamic program differs from the static one (rel. err {rel:.3g})")
    return DynamicProgram(dynamic, coupling, spec, wide_args, wide_kwargs,
                          {"batch_sizes": check.batch_sizes, "rel_err": check.rel_err,
                           "against": "the reference with the removed units zeroed"})


def _exportable(program: torch.nn.Module, n_args: int, names: list[str], consts: dict[str, Any]) -> torch.nn.Module:
    """A shallow copy of ``program`` whose forward has named tensor inputs and its constant keyword inputs
    (``use_cache=False``) bound: torch.export's guards can't name the entries of a ``**kwargs`` forward.
    Same class tree, same state paths, so the exported state dict keys are the model's own."""
    base = type(program)

    def forward(self: torch.nn.Module, *inputs: Any, **named: Any) -> Any:
        values = list(inputs) + [named[n] for n in names[len(inputs):]]
        kwargs = dict(zip(names[n_args:], values[n_args:]))
        return base.forward(self, *values[:n_args], **kwargs, **consts)

    forward.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ["self", *names]])
    module = copy.copy(program)
    module.__class__ = type(base.__name__, (base,), {"forward": forward})
    return module


def export_program(program: torch.nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any],
                   spec: Spec | None = None) -> torch.export.ExportedProgram:
    """torch.export the pruned program: positional inputs stay positional, tensor keyword inputs keep
    their names, other keyword inputs are bound; ``spec`` (from ``default_spec``) makes dims dynamic."""
    tensor_kw = {k: v for k, v in kwargs.items() if not isinstance(v, (bool, int, float, str, type(None)))}
    consts = {k: v for k, v in kwargs.items() if k not in tensor_kw}
    names = [f"input_{i}" for i in range(len(inputs))] + list(tensor_kw)
    module = _exportable(program, len(inputs), names, consts)
    shapes = None
    if spec is not None:
        by_name = dict(zip([f"input_{i}" for i in range(len(inputs))] + list(kwargs), spec))
        shapes = {n: by_name.get(n) for n in names}
    with torch.no_grad():
        return torch.export.export(module.eval(), tuple(inputs), tensor_kw or None, dynamic_shapes=shapes,
                                   strict=False)


def describe_spec(spec: Spec, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, list[int]]:
    """Input name → dims that were asked to be dynamic (for the report)."""
    names = [f"input_{i}" for i in range(len(inputs))] + list(kwargs)
    return {n: sorted(s) for n, s in zip(names, spec) if isinstance(s, dict) and s}


def _twice(static: torch.nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any], spec: Spec
           ) -> tuple[Any, Any, int | None]:
    """Inputs at twice the example batch, the static program's output on them, half by half, and that batch
    (None when no input has a dynamic batch)."""
    doubled: list[int] = []

    def double(t: Any, dims: Any) -> Any:
        if not (isinstance(t, torch.Tensor) and isinstance(dims, dict) and 0 in dims):
            return t
        doubled.append(2 * t.shape[0])
        return torch.cat([t, t.flip(0) + 0.5 * torch.randn_like(t) if t.is_floating_point() else t.flip(0)])
    args2, kwargs2 = _map_dims(inputs, kwargs, spec, double)
    halves = []
    for part in (0, 1):
        n = lambda t: t.chunk(2)[part] if isinstance(t, torch.Tensor) and t.dim() else t  # noqa: E731
        a, k = pytree.tree_map(n, (args2, kwargs2))
        with torch.no_grad():
            halves.append(static(*a, **k))
    flat0, tree = pytree.tree_flatten(halves[0])
    flat1, _ = pytree.tree_flatten(halves[1])
    joined = [torch.cat([x, y]) if isinstance(x, torch.Tensor) and x.dim() else x for x, y in zip(flat0, flat1)]
    return (args2, kwargs2), pytree.tree_unflatten(joined, tree), (doubled[0] if doubled else None)


def export_synced(module: torch.nn.Module, static: torch.nn.Module, inputs: tuple[Any, ...],
                  kwargs: dict[str, Any], spec: Spec | None = None) -> DynamicProgram:
    """Trace the synced (pruned) user module with symbolic dims; check it against the static program
    on the example and, at twice the batch, against the static program run half by half."""
    spec, wide_args, wide_kwargs, program, coupling = _symbolic_trace(module, inputs, kwargs, spec,
                                                                      "the pruned module")
    dynamic = ProgramModule(program, copy_graph(program.graph)[0], program.state())
    (args2, kwargs2), want, batch2 = _twice(static, inputs, kwargs, spec)
    with torch.no_grad():
        _, rel_example = compare(dynamic(*inputs, **kwargs), static(*inputs, **kwargs))
        _, rel_double = compare(dynamic(*args2, **kwargs2), want)
    if not (rel_example <= TOL and rel_double <= TOL):
        raise ValueError(f"the pruned module traced with a symbolic batch differs from the verified program "
                         f"(rel. err {max(rel_example, rel_double):.3g})")
    checked = {} if batch2 is None else {"batch_sizes": [batch2], "rel_err": rel_double,
                                         "against": "the verified static program, run half by half"}
    return DynamicProgram(dynamic, coupling, spec, wide_args, wide_kwargs, checked)
