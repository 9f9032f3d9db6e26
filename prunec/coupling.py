"""The coupling graph: which tensor elements must be removed together.

Every dimension of every value in the traced graph gets one id per index. Op rules
(``prunec.rules``) *tie* ids that must go together and *freeze* dims that no rewrite can
shrink. Connected components of ties are the prunable **units** (a channel, a head, a
block of a flattened feature map); units touching the same parameter dims form a **group**.
This module knows no op: it only stores ties.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import networkx as nx
import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.csgraph import connected_components
from torch import fx

from prunec.trace import Program, module_path

Key = tuple[fx.Node, int]  # (value, dim)
KV_KEPT = "kv heads are kept while query heads are pruned inside their groups (gqa='query')"


def shape_of(node: Any) -> tuple[int, ...] | None:
    """Static shape of an fx value, or None for non-tensors."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        try:
            return tuple(int(s) for s in val.shape)
        except (TypeError, ValueError):  # symbolic size
            return tuple(int(getattr(s, "node").hint) if hasattr(s, "node") else int(s) for s in val.shape)
    return None


class CouplingBuilder:
    """Collects ties and freezes from op rules, element by element."""

    def __init__(self, state: set[fx.Node] | None = None, gqa_query: bool = False) -> None:
        self.state = state or set()
        # GQA attention: units are query-head slots (the same in-group position in every kv group),
        # kv heads kept; else (default) a unit is a whole kv group with its query heads
        self.gqa_query = gqa_query
        self.offset: dict[Key, int] = {}
        self.size: dict[Key, int] = {}
        self.count = 0
        self._a: list[np.ndarray] = []
        self._b: list[np.ndarray] = []
        self.frozen: list[tuple[Key, np.ndarray | None, str]] = []
        self.approximate: list[tuple[Key, str]] = []
        self.consumed: set[Key] = set()
        self.head_dims: set[Key] = set()

    def is_state(self, node: Any) -> bool:
        """True for a parameter/buffer/constant placeholder."""
        return node in self.state

    # -- ids ---------------------------------------------------------------
    def key(self, node: Any, dim: int) -> Key | None:
        shape = shape_of(node)
        if shape is None or not shape:
            return None
        dim = dim % len(shape)
        k = (node, dim)
        if k not in self.offset:
            self.offset[k] = self.count
            self.size[k] = shape[dim]
            self.count += shape[dim]
        return k

    def ids(self, k: Key) -> np.ndarray:
        return np.arange(self.offset[k], self.offset[k] + self.size[k])

    # -- what rules call ---------------------------------------------------
    def tie(self, *pairs: tuple[Any, int]) -> None:
        """Tie dims index-by-index (same size). Pairs whose value is not a tensor are skipped."""
        keys = [k for k in (self.key(n, d) for n, d in pairs) if k is not None]
        for other in keys[1:]:
            if self.size[other] != self.size[keys[0]]:
                for k in keys:
                    self.freeze_key(k, "tied dims of different sizes")
                return
            self._a.append(self.ids(keys[0]))
            self._b.append(self.ids(other))

    def tie_map(self, a: tuple[Any, int], b: tuple[Any, int], a_index: np.ndarray,
                b_index: np.ndarray) -> None:
        """Tie a[a_index[i]] with b[b_index[i]] for every i (offsets, blocks, repeats)."""
        ka, kb = self.key(*a), self.key(*b)
        if ka is None or kb is None:
            return
        self._a.append(self.offset[ka] + np.asarray(a_index, dtype=np.int64))
        self._b.append(self.offset[kb] + np.asarray(b_index, dtype=np.int64))

    def freeze(self, node: Any, dim: int, reason: str) -> None:
        k = self.key(node, dim)
        if k is not None:
            self.freeze_key(k, reason)

    def freeze_key(self, k: Key, reason: str) -> None:
        self.frozen.append((k, None, reason))

    def freeze_all(self, node: Any, reason: str) -> None:
        for d in range(len(shape_of(node) or ())):
            self.freeze(node, d, reason)

    def approx(self, node: Any, dim: int, reason: str) -> None:
        """Pruning this dim is possible but not exact (a norm or reduction reads it)."""
        k = self.key(node, dim)
        if k is not None:
            self.approximate.append((k, reason))

    def consume(self, node: Any, dim: int) -> None:
        """Mark a state dim that a contraction sums over: the verifier zeroes it there."""
        k = self.key(node, dim)
        if k is not None:
            self.consumed.add(k)

    def mark_head(self, node: Any, dim: int) -> None:
        k = self.key(node, dim)
        if k is not None:
            self.head_dims.add(k)


@dataclass
class Group:
    """Units (components) that touch the same state dims: pruned with one ratio."""

    name: str
    kind: str                                  # channel | mlp | hidden | head
    labels: np.ndarray                         # component label of each unit
    members: dict[tuple[str, int], np.ndarray]  # (fqn, dim) → (units, k) element indices
    approximate: str = ""                      # why pruning it is not exact ("" if exact)

    @property
    def size(self) -> int:
        return len(self.labels)

    def describe(self) -> str:
        lead = next(iter(self.members.values()))
        unit = lead.shape[1]
        return f"{self.name} [{self.kind}] {self.size} units × {unit}"


@dataclass
class Coupling:
    """Result of analysis: groups, frozen groups with reasons, and element bookkeeping."""

    program: Program
    keys: list[Key]
    starts: np.ndarray
    labels: np.ndarray
    groups: list[Group]
    frozen: dict[str, str]                     # state dim "fqn@dim" → why it is frozen
    consumed: set[tuple[str, int]]
    state_keys: dict[tuple[str, int], Key]
    ties: tuple[list[np.ndarray], list[np.ndarray]] = field(default_factory=lambda: ([], []))
    unknown_ops: dict[str, str] = field(default_factory=dict)

    def group(self, name: str) -> Group:
        for g in self.groups:
            if g.name == name:
                return g
        raise KeyError(name)

    def key_of(self, ids: np.ndarray) -> np.ndarray:
        """Index into ``keys`` of each element id."""
        return np.searchsorted(self.starts, ids, side="right") - 1

    def dropped_by_key(self, dropped_labels: np.ndarray) -> dict[Key, np.ndarray]:
        """For every (value, dim): the indices removed when these components go."""
        ids = np.nonzero(np.isin(self.labels, dropped_labels))[0]
        if ids.size == 0:
            return {}
        which = self.key_of(ids)
        out: dict[Key, np.ndarray] = {}
        order = np.argsort(which, kind="stable")
        which, ids = which[order], ids[order]
        cuts = np.nonzero(np.diff(which))[0] + 1
        for part_k, part_ids in zip(np.split(which, cuts), np.split(ids, cuts)):
            k = self.keys[part_k[0]]
            out[k] = np.sort(part_ids - self.starts[part_k[0]])
        return out

    def to_networkx(self) -> nx.Graph:
        """Dim-level coupling graph: nodes are 'value@dim', edges are ties."""
        graph = nx.Graph()
        for (node, dim) in self.keys:
            graph.add_node(f"{node.name}@{dim}", module=module_path(node))
        for (a, da), (b, db) in _dim_edges(self.ties, self.keys, self.starts):
            graph.add_edge(f"{a.name}@{da}", f"{b.name}@{db}")
        for group in self.groups:
            for fqn, dim in group.members:
                key = self.state_keys[(fqn, dim)]
                graph.nodes[f"{key[0].name}@{key[1]}"]["group"] = group.name
        return graph


def finish(builder: CouplingBuilder, program: Program) -> Coupling:
    """Components → units → groups."""
    keys = sorted(builder.offset, key=builder.offset.__getitem__)
    starts = np.array([builder.offset[k] for k in keys], dtype=np.int64)
    n = builder.count
    a = np.concatenate(builder._a) if builder._a else np.zeros(0, np.int64)
    b = np.concatenate(builder._b) if builder._b else np.zeros(0, np.int64)
    adj = sp.coo_matrix((np.ones(len(a), np.int8), (a, b)), shape=(n, n))
    _, labels = connected_components(adj, directed=False)

    # labels that are frozen / approximate, with the first reason seen
    frozen_reason: dict[int, str] = {}
    for k, _, reason in builder.frozen:
        where = f"{reason} (at {k[0].name}, dim {k[1]}, module {module_path(k[0])})"
        for lab in np.unique(labels[builder.ids(k)]):
            frozen_reason.setdefault(int(lab), where)
    approx_reason: dict[int, str] = {}
    for k, reason in builder.approximate:
        where = f"{reason} (at {k[0].name}, module {module_path(k[0])})"
        for lab in np.unique(labels[builder.ids(k)]):
            approx_reason.setdefault(int(lab), where)
    head_labels = set()
    for k in builder.head_dims:
        head_labels.update(np.unique(labels[builder.ids(k)]).tolist())

    fqns = program.placeholder_fqns()
    activation_ids = [builder.ids(k) for k in keys if k[0] not in builder.state]
    state_keys = {(fqns[node.name], dim): (node, dim) for (node, dim) in keys
                  if node.op == "placeholder" and node.name in fqns}
    # unit label → signature (the state dims it touches), vectorised over all state dims
    state_items = sorted(state_keys.items(), key=lambda kv: builder.offset[kv[1]])
    lab_of = {sk: labels[builder.ids(key)] for sk, key in state_items}
    uniq = [np.unique(lab_of[sk]) for sk, _ in state_items]
    pair_lab = np.concatenate(uniq) if uniq else np.zeros(0, np.int64)
    pair_key = np.concatenate([np.full(len(u), i) for i, u in enumerate(uniq)]) if uniq else pair_lab
    order = np.lexsort((pair_key, pair_lab))
    pair_lab, pair_key = pair_lab[order], pair_key[order]
    n_labels = int(labels.max()) + 1 if len(labels) else 0
    # a unit's signature, hashed: the sum of one random 62-bit code per state dim it touches
    codes = np.random.default_rng(0).integers(1, 2**62, size=max(len(state_items), 1), dtype=np.int64)
    sig_hash = np.zeros(n_labels, np.int64)
    np.add.at(sig_hash, pair_lab, codes[pair_key])
    has_state = np.zeros(n_labels, bool)
    has_state[pair_lab] = True
    bad = np.ones(n_labels, bool)
    if activation_ids:
        bad[labels[np.concatenate(activation_ids)]] = False
    no_activation = bad.copy()
    bad[list(frozen_reason)] = True
    frozen_state: dict[str, str] = {}
    for i, (sk, _) in enumerate(state_items):
        hit = uniq[i][bad[uniq[i]]]
        if len(hit):
            u = int(hit[0])
            frozen_state[f"{sk[0]}@{sk[1]}"] = frozen_reason.get(u) or (
                "state dim that no activation reads" if no_activation[u] else "frozen")
    good = np.nonzero(has_state & ~bad)[0]
    by_hash = np.argsort(sig_hash[good], kind="stable")
    good = good[by_hash]
    cuts = np.nonzero(np.diff(sig_hash[good]))[0] + 1
    by_signature: dict[tuple[int, ...], np.ndarray] = {}
    for units in np.split(good, cuts) if len(good) else []:
        lo, hi = np.searchsorted(pair_lab, [units[0], units[0] + 1])
        by_signature[tuple(pair_key[lo:hi].tolist())] = units

    groups: list[Group] = []
    for sig_idx, units in by_signature.items():
        sig = [state_items[ki][0] for ki in sig_idx]
        unit_labels = _units_in_order(lab_of[sig[0]], units)
        members = {sk: _rows(lab_of[sk], unit_labels) for sk in sig}
        if any(rows is None for rows in members.values()) or len(unit_labels) < 2:
            reason = "only one unit" if len(unit_labels) < 2 else "units of unequal size"
            for fqn, dim in sig:
                frozen_state.setdefault(f"{fqn}@{dim}", reason)
            continue
        approx = next((approx_reason[u] for u in unit_labels.tolist() if u in approx_reason), "")
        head = any(u in head_labels for u in unit_labels.tolist())
        kind = "hidden" if approx else "head" if head else _channel_kind(program, members)
        name = f"{sig[0][0]}@{sig[0][1]}"
        taken = sum(1 for g in groups if g.name.split("#")[0] == name)
        name = f"{name}#{taken}" if taken else name  # a dim split between groups (cat/split)
        groups.append(Group(name, kind, unit_labels, members, approx))

    consumed = {(fqns[node.name], dim) for node, dim in builder.consumed
                if node.op == "placeholder" and node.name in fqns}
    return Coupling(program, keys, starts, labels, groups, frozen_state, consumed,
                    state_keys, (builder._a, builder._b))


def _units_in_order(lab: np.ndarray, units: np.ndarray) -> np.ndarray:
    """Unit labels sorted by where each first appears along a (lead) state dim."""
    uniq, first = np.unique(lab, return_index=True)
    pos = first[np.searchsorted(uniq, units)]
    return units[np.argsort(pos, kind="stable")]


def _rows(lab: np.ndarray, unit_labels: np.ndarray) -> np.ndarray | None:
    """(units, k) matrix: the indices of ``lab`` in each unit, or None if units differ in size."""
    order = np.argsort(lab, kind="stable")
    sorted_lab = lab[order]
    lo = np.searchsorted(sorted_lab, unit_labels, side="left")
    hi = np.searchsorted(sorted_lab, unit_labels, side="right")
    counts = hi - lo
    if counts.min() != counts.max():
        return None
    k = int(counts[0])
    return order[lo[:, None] + np.arange(k)[None, :]]


def _channel_kind(program: Program, members: dict[tuple[str, int], np.ndarray]) -> str:
    """'mlp' when every weight of the group is 2-D (linear layers), else 'channel'."""
    state = program.ep.state_dict
    dims = [state[fqn].dim() for fqn, _ in members if fqn in state and fqn.endswith("weight")]
    return "mlp" if dims and all(d == 2 for d in dims) and max(
        (state[f].dim() for f, _ in members if f in state), default=0) == 2 else "channel"


def _dim_edges(ties: tuple[list[np.ndarray], list[np.ndarray]], keys: list[Key],
               starts: np.ndarray) -> list[tuple[Key, Key]]:
    """Dim-level edges for the networkx view (one per tied pair of dims)."""
    seen: set[tuple[int, int]] = set()
    for a, b in zip(*ties):
        if len(a) == 0:
            continue
        ka = int(np.searchsorted(starts, a[0], side="right") - 1)
        kb = int(np.searchsorted(starts, b[0], side="right") - 1)
        if ka != kb:
            seen.add((min(ka, kb), max(ka, kb)))
    return [(keys[x], keys[y]) for x, y in sorted(seen)]


def iter_tensor_args(node: fx.Node) -> Iterable[fx.Node]:
    for a in node.all_input_nodes:
        if shape_of(a) is not None:
            yield a
