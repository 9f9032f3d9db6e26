"""Verifier: pruned model == original model with the removed units zeroed at their consumers.

Layered, so a plan with approximate groups (a LayerNorm-read residual stream) still has its
exact part proven:

1. **Exact part.** Reference = the program with only the *approximate* groups rewritten out
   (same rewriter), the exact groups' consumed slices set to 0 and dropped branches × 0. The
   pruned program must match it within the tolerance, at the example batch and at one more
   batch size (a rewrite that bakes in a batch size fails here).
2. **Approximate part.** Pruned vs. the original with *every* cut unit zeroed: reported only.

The reference slices approximate dims with ``Cut.slice``, not the rewriter's ``slice_state``,
so a corrupted slicer is caught.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import fx

from prunec.calib import Call, output_error, run, shared_rows
from prunec.cut import Cut
from prunec.distributed import all_reduce_sum
from prunec.errors import InternalError, first_line
from prunec.layers import drop_branches
from prunec.program_module import ProgramModule
from prunec.rewrite import rewrite_graph

# Measured in fp32 (docs/architecture.md "Verify"; bench/verify_tolerance.py, bench/results/smollm.json):
# CNNs and ViTs pruned 30-50% reach rel. err ≤ 6.3e-7, but SmolLM2-135M (30 layers, heads+mlp
# 0.25) reaches 4.9e-5 from summation order alone. 1e-5 would fail that correct rewrite; 1e-4
# keeps 2× headroom there, and real bugs (a wrong slice) give errors ≥ 1e-2.
EXACT_TOL = 1e-4


@dataclass
class VerifyResult:
    max_abs_err: float           # the exact part (approximate groups rewritten in the reference)
    rel_err: float
    passed: bool                 # the exact part is within ``tolerance`` at every batch size tried
    exact: bool                  # no approximate group was cut: the whole model is proven
    tolerance: float
    approximate_groups: list[str]
    approximate: dict[str, Any] | None = None   # {rel_err, max_abs_err, groups} vs the fully zeroed original
    batch_sizes: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    refit: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# recurrent kernels whose hidden-state shape is not checked: a static program run at another batch crashes
UNCHECKED_STATE = {torch.ops.aten.lstm.input, torch.ops.aten.gru.input, torch.ops.aten.rnn_tanh.input,
                   torch.ops.aten.rnn_relu.input, torch.ops.aten.lstm.data, torch.ops.aten.gru.data,
                   torch.ops.aten.rnn_tanh.data, torch.ops.aten.rnn_relu.data}


Zero = tuple[str, int, torch.Tensor]   # (fqn, dim, indices) to set to 0 in the reference's state


def _reference_parts(cut: Cut, rewritten: Cut | None) -> tuple[fx.Graph, dict[str, torch.Tensor], list[Zero]]:
    """The reference's graph, its state (the program's own tensors except sliced approximate dims) and the
    slices to zero: ``rewritten`` cut out structurally, the rest of ``cut`` zeroed where it is consumed
    (input-channel weights of the next conv/linear), dropped branches × 0."""
    program, coupling = cut.coupling.program, cut.coupling
    rewritten = rewritten or cut.restrict((), branches=False)
    graph, node_map = rewrite_graph(rewritten)
    state = {fqn: rewritten.slice(fqn, program.tensor(fqn)) for fqn in program.placeholder_fqns().values()}
    zeros: list[Zero] = []
    for (fqn, dim), idx in cut.state_dropped.items():
        if (fqn, dim) not in coupling.consumed:
            continue
        zero = np.setdiff1d(idx, rewritten.state_dropped.get((fqn, dim), ()))
        if zero.size:
            zeros.append((fqn, dim, torch.as_tensor(rewritten.renumber(fqn, dim, zero), dtype=torch.long)))
    if cut.branches:
        drop_branches(graph, {old.name: new for old, new in node_map.items()}, cut.branches, zero_only=True)
    graph.lint()
    return graph, state, zeros


def reference_module(cut: Cut, rewritten: Cut | None = None) -> ProgramModule:
    """The reference (see ``_reference_parts``) as a module of its own: zeroed tensors are copies."""
    graph, state, zeros = _reference_parts(cut, rewritten)
    for fqn, dim, idx in zeros:
        if state[fqn] is cut.coupling.program.tensor(fqn):
            state[fqn] = state[fqn].detach().clone()
        state[fqn].detach().index_fill_(dim, idx, 0.0)
    return ProgramModule(cut.coupling.program, graph, state)


@contextmanager
def zeroed_reference(cut: Cut, rewritten: Cut | None = None) -> Iterator[ProgramModule]:
    """The reference without a copy of the weights: the program's own tensors are zeroed in place and
    restored exactly on exit (only the zeroed slices are saved). Nothing else may run on them meanwhile."""
    graph, state, zeros = _reference_parts(cut, rewritten)
    saved: list[tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for fqn, dim, idx in zeros:
                t = state[fqn].detach()
                if state[fqn] is cut.coupling.program.tensor(fqn):  # shared with the user's model: restore later
                    saved.append((t, dim, idx, t.index_select(dim, idx)))
                t.index_fill_(dim, idx, 0.0)
        yield ProgramModule(cut.coupling.program, graph, state)
    finally:
        with torch.no_grad():
            for t, dim, idx, values in reversed(saved):
                t.index_copy_(dim, idx, values)


def compare(a: Any, b: Any) -> tuple[float, float]:
    """Max abs error and error relative to the reference's largest magnitude, over all outputs."""
    la = [t for t in pytree.tree_leaves(a) if isinstance(t, torch.Tensor)]
    lb = [t for t in pytree.tree_leaves(b) if isinstance(t, torch.Tensor)]
    if len(la) != len(lb) or any(x.shape != y.shape for x, y in zip(la, lb)):
        raise InternalError("the pruned model's outputs have a different structure or shape than the "
                            f"reference's ({[tuple(x.shape) for x in la][:3]} vs {[tuple(y.shape) for y in lb][:3]})")
    abs_err = max((float((x.float() - y.float()).abs().max()) for x, y in zip(la, lb) if x.numel()),
                  default=0.0)
    scale = max((float(y.float().abs().max()) for y in lb if y.numel()), default=0.0)
    return abs_err, abs_err / max(scale, 1e-12)


def other_batch(inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Call, int, int] | None:
    """The example inputs grown by one along dim 0 (new rows differ from the old), with the
    old and new batch size; None when the tensor inputs share no leading batch dim."""
    b = shared_rows((inputs, kwargs))
    if b is None:
        return None

    def grow(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        extra = t[:1].flip(-1) if t.is_floating_point() and t.dim() > 1 else t[:1]
        return torch.cat([t, extra])
    args, kw = pytree.tree_map(grow, (tuple(inputs), dict(kwargs)))
    return (tuple(args), kw), b, b + 1


def _outputs(module: torch.nn.Module, batch: Call, who: str) -> Any:
    try:
        return run(module, batch)
    except Exception as err:  # the rewritten program must run wherever its reference runs
        raise InternalError(f"the {who} fails to run: {first_line(err)}") from err


def verify(cut: Cut, pruned: torch.nn.Module, inputs: tuple[Any, ...],
           kwargs: dict[str, Any] | None = None, tolerance: float = EXACT_TOL) -> VerifyResult:
    """Check ``pruned`` against the references (see the module docstring)."""
    kwargs = dict(kwargs or {})
    approx = cut.approximate
    batch = (tuple(inputs), kwargs)
    # a part whose inputs/outputs are tied to other parts (prunec.ties) takes its cut inputs, and gives
    # its cut outputs: the reference's are cut alike before comparing
    got = _outputs(pruned, cut.shrink_inputs(*batch), "pruned program")
    with zeroed_reference(cut, cut.restrict(approx, branches=False)) as reference:
        abs_err, rel_err = compare(got, cut.shrink_outputs(_outputs(reference, batch, "exact-part reference")))
        sizes, notes = _other_batch_check(cut, pruned, reference, batch)
    abs_err, rel_err = max(abs_err, sizes.pop("abs", 0.0)), max(rel_err, sizes.pop("rel", 0.0))
    approximate = None
    if approx:
        with zeroed_reference(cut) as reference:
            a_abs, a_rel = compare(got, cut.shrink_outputs(run(reference, batch)))
        approximate = {"rel_err": a_rel, "max_abs_err": a_abs, "groups": approx}
    passed = bool(np.isfinite(rel_err)) and rel_err <= tolerance
    return VerifyResult(abs_err, rel_err, passed, not approx, tolerance, approx, approximate,
                        sizes["checked"], notes)


def _other_batch_check(cut: Cut, pruned: torch.nn.Module, reference: torch.nn.Module, batch: Call
                       ) -> tuple[dict[str, Any], list[str]]:
    """Run pruned and reference at the example batch + 1: the batch sizes checked, the errors there, notes."""
    leaves = [t for t in pytree.tree_leaves(batch) if isinstance(t, torch.Tensor) and t.dim()]
    out: dict[str, Any] = {"checked": [int(leaves[0].shape[0])] if leaves else []}
    notes: list[str] = []
    grown = other_batch(*batch)
    unchecked = sorted({str(n.target) for n in cut.coupling.program.graph.nodes if n.target in UNCHECKED_STATE})
    if grown is not None and unchecked:  # their C++ kernels crash (not raise) on a hidden state of another batch
        notes.append(f"batch {grown[2]} not checked: {unchecked[0]} does not validate its state's batch size")
        grown = None
    if grown is not None:
        more, b, b2 = grown
        try:
            want2 = cut.shrink_outputs(run(reference, more))
        except Exception as err:  # the traced program itself is pinned to the example's batch size
            notes.append(f"batch {b2} not checked: the traced program only runs at batch {b} "
                         f"({type(err).__name__})")
        else:
            out["abs"], out["rel"] = compare(_outputs(pruned, cut.shrink_inputs(*more), f"pruned program at batch {b2}"),
                                             want2)
            out["checked"].append(b2)
    return out, notes


def add_dynamic_check(verified: dict[str, Any], checked: dict[str, Any]) -> None:
    """Count the batch-dynamic program's check at other batch sizes (``DynamicProgram.checked``) in the report's
    verify entry: its sizes join ``batch_sizes``, its error the maximum, and where the static trace could not run a
    size ("batch N not checked"), a note says what it was checked against instead."""
    new = [b for b in checked.get("batch_sizes", []) if b not in verified.get("batch_sizes", [])]
    if not new:
        return
    verified["batch_sizes"] = sorted({*verified.get("batch_sizes", []), *new})
    verified["rel_err"] = max(verified.get("rel_err", 0.0), checked["rel_err"])
    notes = verified.get("notes", [])
    kept = [n for n in notes if not any(n.startswith(f"batch {b} not checked") for b in new)]
    if len(kept) < len(notes):
        kept.append(f"batch {'/'.join(map(str, new))} checked on the batch-dynamic program against "
                    f"{checked['against']}: rel err {checked['rel_err']:.3g}")
    verified["notes"] = kept


def check_refit(pruned: torch.nn.Module, original: torch.nn.Module, state: dict[str, torch.Tensor],
                updates: dict[str, torch.Tensor], batches: list[Call]
                ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Write refit ``updates`` into ``state`` (shared with ``pruned``) only if they bring the
    pruned outputs closer to ``original``'s on ``batches``; returns both errors, and the verified
    tensors the refit replaced (empty when it was not applied)."""
    for fqn, value in updates.items():
        if fqn not in state or state[fqn].shape != value.shape:
            raise InternalError(f"a pass refit '{fqn}' with shape {tuple(value.shape)}, but the pruned "
                                f"tensor is {tuple(state[fqn].shape) if fqn in state else 'missing'}")
    before = output_error(pruned, original, batches)
    saved = {fqn: state[fqn].detach().clone() for fqn in updates}
    with torch.no_grad():
        for fqn, value in updates.items():
            state[fqn].copy_(value)
    after = output_error(pruned, original, batches)
    applied = bool(np.isfinite(after)) and after <= before
    if not applied:
        with torch.no_grad():
            for fqn, value in saved.items():
                state[fqn].copy_(value)
    return ({"rel_err_before": before, "rel_err_after": after, "applied": applied,
             "tensors": len(updates), "batches": all_reduce_sum(len(batches))}, saved if applied else {})
