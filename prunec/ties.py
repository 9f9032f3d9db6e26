"""Dims that cross between traced parts (prune what traces): tied across the parts, or frozen with a reason.

A tensor that one part returns and other parts read, untouched in between, is a **boundary** (the FPN's
outputs, read by every head). Its dims stay open in the producer's and the consumers' couplings
(``build_coupling(open_inputs=…, open_outputs=…)``), so each part's groups reach it. A **tied group** is the
union of the part groups that meet on a boundary dim, unit by unit: the FPN level's output channels and the
shared RPN head's input channels of every level. It is scored as one (the sum of its members' scores), keeps
one set of units, and every part drops exactly those: the producer's outputs and the consumers' inputs shrink
alike. A boundary stays frozen (its dims keep their width in every part) when an op outside the parts reads
it (untraced glue: RoIAlign, NMS), the model returns it, or a part runs more than once; a tied group is kept
whole when one of its members can't follow (a dim frozen inside a part, units that don't line up one to one,
an approximate or head group, no score).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import networkx as nx
import numpy as np
import torch
import torch.utils._pytree as pytree
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from prunec.coupling import Coupling, shape_of
from prunec.passes.select import keep_count
from prunec.plan import Plan
from prunec.trace import keep_attributes

Member = tuple[str, str]   # (part path, group name)
TIEABLE = ("channel", "mlp")


@dataclass
class Reader:
    """A part that reads a boundary tensor at input leaf ``leaf``: boundary dim → its input's dim, directly
    or through channel-wise glue ``via`` (RoIAlign)."""

    part: str
    leaf: int
    dims: dict[int, int]
    via: str = ""

    def __str__(self) -> str:
        return f"{self.part}[in {self.leaf}]" + (f" (via {self.via})" if self.via else "")


@dataclass
class Boundary:
    """One tensor part ``producer`` returns (output leaf ``out_leaf``, ``ndim`` dims) that other parts read."""

    producer: str
    out_leaf: int
    ndim: int
    consumers: list[Reader] = field(default_factory=list)
    frozen: str = ""           # why its dims keep their width ("" when they may be tied)

    @property
    def name(self) -> str:
        return f"{self.producer}[out {self.out_leaf}] → {', '.join(map(str, self.consumers))}"


def _roi_align(args: tuple, kwargs: dict, out: Any) -> list[tuple[Any, dict[int, int], Any]]:
    """out[k, c] pools input[b_k, c]: the channel dim passes through."""
    return [(args[0], {1: 1}, out)]


def _index_put(args: tuple, kwargs: dict, out: Any) -> list[tuple[Any, dict[int, int], Any]]:
    """self[idx] = values with one 1-D index on dim 0: values broadcast right-aligned onto self's other dims."""
    self, indices, values = args[0], args[1], args[2]
    off = self.dim() - values.dim()
    if (len(indices) != 1 or indices[0] is None or indices[0].dim() != 1 or off < 0
            or any(values.shape[j] != self.shape[j + off] for j in range(values.dim()) if j + off >= 1)):
        return []
    return [(values, {j: j + off for j in range(values.dim()) if j + off >= 1}, out),
            (self, {d: d for d in range(self.dim())}, out)]


def _drop_leading_ones(args: tuple, kwargs: dict, out: Any) -> list[tuple[Any, dict[int, int], Any]]:
    """A view that only strips leading size-1 dims (what ``t[idx] = v`` does to ``v``)."""
    x = args[0]
    off = x.dim() - out.dim()
    if off < 0 or any(s != 1 for s in x.shape[:off]) or tuple(x.shape[off:]) != tuple(out.shape):
        return []
    return [(x, {d: d - off for d in range(off, x.dim())}, out)]


def _same(args: tuple, kwargs: dict, out: Any) -> list[tuple[Any, dict[int, int], Any]]:
    return [(args[0], {d: d for d in range(args[0].dim())}, out)]


# glue ops that carry dims of a tensor they read into their output, element for element, at any size
# (the untraced code between the FPN and the RoI heads: MultiScaleRoIAlign)
PASS_THROUGH: dict[str, Callable[[tuple, dict, Any], list[tuple[Any, dict[int, int], Any]]]] = {
    "torchvision.roi_align.default": _roi_align,
    "aten.index_put_.default": _index_put, "aten.index_put.default": _index_put,
    "aten._to_copy.default": _same,
    "aten.view.default": _drop_leading_ones, "aten._unsafe_view.default": _drop_leading_ones,
}


class _Watch(TorchDispatchMode):
    """While the model runs: where each boundary tensor's dims went through pass-through glue, and the
    first other op outside the parts that reads it (or what came from it)."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0                    # > 0 while a part's forward runs
        self.origin: dict[int, list[tuple[int, dict[int, int], str]]] = {}   # id → [(boundary id, dims, via)]
        self.reads: dict[int, str] = {}   # boundary id → the op that read it (or a tensor made from it)
        self.keep: list[Any] = []         # tensors stay alive, so their ids stay unique

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.depth:
            return out
        read = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor) and id(t) in self.origin]
        if not read:
            return out
        passing = PASS_THROUGH.get(str(func))
        carried = passing(args, kwargs or {}, out) if passing else []
        for t in read:
            if id(t) not in {id(c[0]) for c in carried}:
                for o, _, _ in self.origin[id(t)]:
                    self.reads.setdefault(o, str(func))
        for t_in, dims, t_out in carried:
            if id(t_in) not in self.origin or t_out is t_in:
                continue
            name = str(func).split(".")[1]
            self.origin.setdefault(id(t_out), []).extend(
                (o, {bd: dims[d] for bd, d in od.items() if d in dims}, f"{via} → {name}" if via else name)
                for o, od, via in list(self.origin[id(t_in)]))
            self.keep.append(t_out)
        return out


def find_boundaries(model: nn.Module, parts: list[str], inputs: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> list[Boundary]:
    """Run ``model`` once with hooks on the parts: every tensor a part returns that another part reads
    (directly or through pass-through glue), frozen (with why) when other glue outside the parts reads it,
    the model returns it, or a part runs twice."""
    watch = _Watch()
    made: dict[int, tuple[str, int, int]] = {}
    read: dict[int, list[Reader]] = {}
    calls = dict.fromkeys(parts, 0)
    handles = []
    for path in parts:
        def pre(m: nn.Module, args: tuple, kw: dict, path: str = path) -> None:
            calls[path] += 1
            for i, t in enumerate(pytree.tree_leaves((args, kw))):
                if isinstance(t, torch.Tensor):
                    for o, dims, via in watch.origin.get(id(t), ()):
                        read.setdefault(o, []).append(Reader(path, i, dims, via))
            watch.depth += 1

        def post(m: nn.Module, args: tuple, kw: dict, out: Any, path: str = path) -> None:
            watch.depth -= 1
            watch.keep.append(out)
            for i, t in enumerate(pytree.tree_leaves(out)):
                if isinstance(t, torch.Tensor) and id(t) not in made:
                    made[id(t)] = (path, i, t.dim())
                    watch.origin.setdefault(id(t), []).append((id(t), {d: d for d in range(t.dim())}, ""))
        mod = model.get_submodule(path)
        handles += [mod.register_forward_pre_hook(pre, with_kwargs=True),
                    mod.register_forward_hook(post, with_kwargs=True)]
    try:
        with torch.no_grad(), keep_attributes(model), watch:
            out = model(*inputs, **kwargs)
    finally:
        for h in handles:
            h.remove()
    returned = {o for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)
                for o, _, _ in watch.origin.get(id(t), ())}
    found = []
    for tid, consumers in read.items():
        producer, leaf, ndim = made[tid]
        b = Boundary(producer, leaf, ndim, [c for c in consumers if c.part != producer])
        if not b.consumers:
            continue
        twice = [p for p in (producer, *(c.part for c in b.consumers)) if calls[p] > 1]
        b.frozen = (f"read outside the traced parts by {watch.reads[tid]}" if tid in watch.reads else
                    "returned by the model" if tid in returned else
                    f"{twice[0]} runs {calls[twice[0]]} times (tied dims follow one call)" if twice else "")
        found.append(b)
    return found


def open_leaves(boundaries: list[Boundary]) -> dict[str, tuple[frozenset[tuple[int, int]], frozenset[tuple[int, int]]]]:
    """Part → ((input leaf, dim), …), ((output leaf, dim), …) that stay open in its coupling."""
    ins: dict[str, set[tuple[int, int]]] = {}
    outs: dict[str, set[tuple[int, int]]] = {}
    for b in boundaries:
        if b.frozen:
            continue
        outs.setdefault(b.producer, set()).update((b.out_leaf, d) for d in range(b.ndim))
        for r in b.consumers:
            ins.setdefault(r.part, set()).update((r.leaf, d) for d in r.dims.values())
    return {p: (frozenset(ins.get(p, ())), frozenset(outs.get(p, ()))) for p in {*ins, *outs}}


@dataclass
class TiedGroup:
    """Part groups that drop the same units: ``units[j, m]`` is joint unit j's position in ``members[m]``."""

    members: list[Member]
    units: np.ndarray | None
    kept_whole: str = ""       # why it is not pruned ("" when it is)
    kept: int = 0              # units kept (after ``tie``)
    boundaries: list[str] = field(default_factory=list)   # names of the boundaries it spans

    def to_json(self) -> dict[str, Any]:
        size = None if self.units is None else len(self.units)
        return {"members": [f"{p}:{g}" for p, g in self.members], "size": size, "boundaries": self.boundaries,
                "kept": self.kept if not self.kept_whole else size, "kept_whole": self.kept_whole}


def describe(boundaries: list[Boundary], groups: list[TiedGroup]) -> list[dict[str, Any]]:
    """Per boundary: tied (a tied group across it is pruned) or frozen, and why."""
    rows = []
    for b in boundaries:
        across = [tg for tg in groups if b.name in tg.boundaries]
        pruned = [tg for tg in across if not tg.kept_whole and tg.kept < len(tg.units)]
        why = b.frozen or next((tg.kept_whole for tg in across if tg.kept_whole), "") or (
            "" if across else "no dim of it reaches a prunable group in its parts (tied there to a frozen dim, "
                              "or no weight reads it)")
        rows.append({"boundary": b.name, "tied": bool(pruned), "why": "" if pruned else why or "nothing dropped"})
    return rows


def tied_groups(couplings: dict[str, Coupling], boundaries: list[Boundary],
                scores: dict[str, dict[str, np.ndarray]]) -> list[TiedGroup]:
    """Join the part groups that meet on open boundary dims, unit by unit (see the module docstring)."""
    where = {p: (_unit_of(c), {k: int(s) for k, s in zip(c.keys, c.starts)}) for p, c in couplings.items()}
    graph, bad, seen_on = nx.Graph(), {}, {}
    for b in boundaries:
        if b.frozen:
            continue
        made = couplings[b.producer].program.user_outputs()[b.out_leaf]
        readers = [(r.part, couplings[r.part].program.user_inputs()[r.leaf], r.dims) for r in b.consumers]
        for d in range(len(shape_of(made) or ())):
            units = [(b.producer, _units_along(couplings[b.producer], *where[b.producer], made, d))]
            n = len(units[0][1])
            units += [(p, _units_along(couplings[p], *where[p], node, dims[d])
                       if d in dims and (shape_of(node) or ())[dims[d]] == n else [None] * n)
                      for p, node, dims in readers]
            for i in range(len(units[0][1])):
                at = [(p, u[i]) for p, u in units]
                hit = [(p, *u) for p, u in at if u is not None]
                for node in hit:
                    graph.add_node(node)
                    seen_on.setdefault(node[:2], set()).add(b.name)
                for x, y in zip(hit, hit[1:]):
                    graph.add_edge(x, y)
                if hit and len(hit) < len(at):
                    lost = next(p for p, u in at if u is None)
                    for p, g, _ in hit:
                        bad.setdefault((p, g), f"dim {d} of {b.name} is frozen in {lost}")
    by_member: dict[Member, list[tuple[str, str, int]]] = {}
    for node in graph.nodes:
        by_member.setdefault(node[:2], []).append(node)
    linked = nx.Graph()
    linked.add_nodes_from(by_member)
    for comp in nx.connected_components(graph):
        ms = sorted({n[:2] for n in comp})
        linked.add_edges_from(zip(ms, ms[1:]))
    out = []
    for members in nx.connected_components(linked):
        members = sorted(members)
        why = next((bad[m] for m in members if m in bad), "") or _cannot_tie(members, couplings, scores)
        units = None if why else _unit_table(members, graph, couplings)
        if units is None and not why:
            why = "its units do not line up one to one across the parts"
        out.append(TiedGroup(members, units, why, boundaries=sorted(set().union(*(seen_on[m] for m in members)))))
    return out


def _unit_of(coupling: Coupling) -> dict[int, tuple[str, int]]:
    """Component label → (group name, unit position) for every unit of every group."""
    return {int(lab): (g.name, pos) for g in coupling.groups for pos, lab in enumerate(g.labels)}


def _units_along(coupling: Coupling, unit_of: dict[int, tuple[str, int]], starts: dict[Any, int], node: Any,
                 dim: int) -> list[tuple[str, int] | None]:
    """(group, unit) of each index along (node, dim), None where it is in no group."""
    start = starts.get((node, dim))
    size = (shape_of(node) or ())[dim]
    if start is None:
        return [None] * size
    return [unit_of.get(int(lab)) for lab in coupling.labels[start:start + size]]


def _cannot_tie(members: list[Member], couplings: dict[str, Coupling],
                scores: dict[str, dict[str, np.ndarray]]) -> str:
    for p, g in members:
        group = couplings[p].group(g)
        if group.kind not in TIEABLE or group.approximate:
            return f"{p}:{g} is a {group.kind} group{' (approximate)' if group.approximate else ''}"
        if g not in scores.get(p, {}):
            return f"the criterion gave {p}:{g} no score"
    return ""


def _unit_table(members: list[Member], graph: nx.Graph, couplings: dict[str, Coupling]) -> np.ndarray | None:
    """Joint unit → position in each member, or None unless every joint unit holds one unit of each member
    and every member unit is in one joint unit."""
    col = {m: i for i, m in enumerate(members)}
    sizes = {couplings[p].group(g).size for p, g in members}
    rows = []
    for comp in nx.connected_components(graph.subgraph([n for n in graph.nodes if n[:2] in col])):
        row = np.full(len(members), -1)
        for p, g, pos in comp:
            if row[col[(p, g)]] != -1:
                return None
            row[col[(p, g)]] = pos
        if (row < 0).any():
            return None
        rows.append(row)
    if len(sizes) != 1 or len(rows) != sizes.pop():
        return None
    table = np.array(rows)
    return table[np.argsort(table[:, 0])]


def tie(plans: dict[str, Plan], couplings: dict[str, Coupling], scores: dict[str, dict[str, np.ndarray]],
        groups: list[TiedGroup], ratios: dict[str, float], round_to: int) -> dict[str, Plan]:
    """Each part's plan with the tied groups' units chosen jointly (and kept-whole ones left out)."""
    new = {p: Plan(dict(pl.kept), dict(pl.sizes), dict(pl.meta)) for p, pl in plans.items()}
    for tg in groups:
        if tg.kept_whole or tg.units is None:
            for p, g in tg.members:
                new[p].kept.pop(g, None)
                new[p].sizes.pop(g, None)
            continue
        kinds = {couplings[p].group(g).kind for p, g in tg.members}
        ratio = ratios.get("channel" if "channel" in kinds else "mlp") or 0.0
        # round the channel count when some member counts channels (not flattened blocks of them)
        unit1 = any(next(iter(couplings[p].group(g).members.values())).shape[1] == 1 for p, g in tg.members)
        n = len(tg.units)
        total = sum(scores[p][g][tg.units[:, m]] for m, (p, g) in enumerate(tg.members))
        keep = keep_count(n, ratio, round_to if unit1 else 1) if ratio else n
        kept = np.sort(np.argsort(-total, kind="stable")[:keep])
        tg.kept = len(kept)
        for m, (p, g) in enumerate(tg.members):
            new[p].kept.pop(g, None)
            new[p].sizes.pop(g, None)
            if len(kept) < n:
                new[p].kept[g] = sorted(int(i) for i in tg.units[kept, m])
                new[p].sizes[g] = n
    return new
