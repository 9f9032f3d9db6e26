"""ThiNet: choose channels from the next layer's statistics, then refit it by least squares."""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch
from torch import fx

from prunec.calib import collect
from prunec.coupling import Group
from prunec.cut import Cut
from prunec.distributed import all_gather_rows, all_reduce_sum
from prunec.passes.activation import Consumer, consumers
from prunec.passes.base import Pass, PassResult, State, register_pass
from prunec.passes.select import check_ratio, keep_count

RIDGE = 1e-6


class Reconstruction:
    """Sampled consumer inputs of one group: X (samples × input columns) per consumer, the
    per-unit output contributions Z_u = X[:, cols(u)] · W[:, cols(u)]ᵀ, and their Gram matrix
    G[u, v] = Σ_consumers ⟨Z_u, Z_v⟩ / ‖Y‖², Y = Σ_u Z_u the consumer's output (no bias)."""

    def __init__(self, group: Group, cons: list[Consumer], xs: list[torch.Tensor],
                 weights: list[torch.Tensor]) -> None:
        self.group, self.cons, self.xs = group, cons, xs
        self.w2d = [w.detach().double().reshape(w.shape[0], -1) for w in weights]
        self.shapes = [tuple(w.shape) for w in weights]
        n = group.size
        self.gram = np.zeros((n, n))
        self.cross = np.zeros(n)            # ⟨Z_u, Y⟩ / ‖Y‖²
        for c, x, w, shape in zip(cons, xs, self.w2d, self.shapes):
            # ⟨Z_u, Z_v⟩ = Σ_{i∈u, j∈v} (XᵀX)[i, j] · (WᵀW)[i, j]: never materialise Z (units × samples × out)
            cols = torch.stack(self.unit_cols(c, shape))
            m = cols.shape[1]
            xs_, ws_ = x[:, cols.reshape(-1)], w[:, cols.reshape(-1)]
            gram = ((xs_.T @ xs_) * (ws_.T @ ws_)).reshape(n, m, n, m).sum((1, 3))
            scale = float(gram.sum()) or 1.0   # ‖Y‖², Y = Σ_u Z_u
            self.gram += gram.numpy() / scale
            self.cross += gram.sum(1).numpy() / scale

    @staticmethod
    def unit_cols(c: Consumer, shape: tuple[int, ...]) -> list[torch.Tensor]:
        """Columns of the (im2col) input that belong to each unit (channel-major, like unfold)."""
        k = math.prod(shape[2:]) if c.conv else 1
        base = torch.arange(k)
        return [(torch.as_tensor(r)[:, None] * k + base).reshape(-1) for r in c.rows]

    def error(self, dropped: np.ndarray) -> float:
        """Relative reconstruction error, summed over consumers, of removing ``dropped``."""
        d = np.asarray(dropped, dtype=np.int64)
        return float(self.gram[np.ix_(d, d)].sum()) if d.size else 0.0

    def refit(self, kept: np.ndarray) -> list[tuple[torch.Tensor, float, float]]:
        """Per consumer: least-squares weight on the kept input columns (shape O × kept × …),
        the relative error with the original weights sliced, and after the refit."""
        out = []
        for c, x, w, shape in zip(self.cons, self.xs, self.w2d, self.shapes):
            cols = self.unit_cols(c, shape)
            keep_cols = torch.sort(torch.cat([cols[u] for u in kept])).values
            y, xk = x @ w.T, x[:, keep_cols]
            norm = float(y.pow(2).sum()) or 1.0
            before = float((y - xk @ w[:, keep_cols].T).pow(2).sum()) / norm
            a = xk.T @ xk
            a += RIDGE * (a.diagonal().mean() + 1e-12) * torch.eye(len(keep_cols), dtype=a.dtype)
            new = torch.linalg.solve(a, xk.T @ y).T
            after = float((y - xk @ new.T).pow(2).sum()) / norm
            if after > before:  # ill-conditioned samples: never make it worse
                new, after = w[:, keep_cols], before
            pruned = new.reshape(shape[0], -1, *shape[2:]) if c.conv else new
            out.append((pruned, before, after))
        return out


def sample_inputs(state: State, calib: list[tuple[Any, ...]], cons: list[Consumer],
                  samples: int, seed: int) -> dict[int, torch.Tensor]:
    """Random rows of each consumer's (im2col-ed) input, ``samples`` in all, by ``seed``. Under
    data-parallel calibration every rank draws its share and gets every rank's rows (the plan is the
    same on all ranks; the rows are other draws than one process's)."""
    per_batch = max(1, math.ceil(samples / all_reduce_sum(len(calib))))
    gen = torch.Generator().manual_seed(seed)
    by_node: dict[fx.Node, list[Consumer]] = {}
    for c in cons:
        by_node.setdefault(c.x, []).append(c)
    rows: dict[int, list[torch.Tensor]] = {id(c): [] for c in cons}

    def on_value(node: fx.Node, value: Any) -> None:
        for c in by_node.get(node, []):
            x = value.detach().double()
            if c.conv:
                kernel = tuple(c.op.args[1].meta["val"].shape[2:])
                if len(kernel) == 1:
                    x, kernel = x[..., None], kernel + (1,)
                    args = {k: v + ((0,) if k == "padding" else (1,)) for k, v in c.conv_args().items()}
                else:
                    args = c.conv_args()
                x = torch.nn.functional.unfold(x, kernel, **args).transpose(1, 2)
            x = x.reshape(-1, x.shape[-1])
            pick = torch.randperm(x.shape[0], generator=gen)[:per_batch]
            rows[id(c)].append(x[pick])

    collect(state.program, calib, lambda n, v: on_value(n, v) if n in by_node else None, watch=by_node)
    return {k: v[:samples] for k, v in all_gather_rows({k: torch.cat(v) for k, v in rows.items()}).items()}


def reconstructions(state: State, calib: list[tuple[Any, ...]], groups: list[Group],
                    samples: int, seed: int) -> dict[str, Reconstruction]:
    """A Reconstruction for every group whose consumers are all dense convs/linears."""
    tensors = state.program.state()
    found = {}
    for g in groups:
        cons = consumers(state, g)
        n_consumed = sum(1 for key in g.members if key in state.coupling.consumed)
        whole = all(c.rows.size == tensors[c.fqn].shape[1] for c in cons)  # no other group feeds them
        if cons and whole and len({c.fqn for c in cons}) == n_consumed == len(cons):  # each called once
            found[g.name] = cons
    all_cons = [c for cs in found.values() for c in cs]
    xs = sample_inputs(state, calib, all_cons, samples, seed) if all_cons else {}
    return {name: Reconstruction(state.coupling.group(name), cons, [xs[id(c)] for c in cons],
                                 [tensors[c.fqn] for c in cons]) for name, cons in found.items()}


def greedy_drop(rec: Reconstruction, n_drop: int) -> np.ndarray:
    """ThiNet's greedy: grow the removed set T by the unit that keeps ‖Σ_{u∈T} Z_u‖² smallest."""
    g = rec.gram
    n = g.shape[0]
    dropped: list[int] = []
    acc = np.zeros(n)                       # Σ_{t∈T} G[:, t]
    free = np.ones(n, dtype=bool)
    for _ in range(n_drop):
        cost = np.where(free, 2 * acc + np.diag(g), np.inf)
        u = int(np.argmin(cost))
        dropped.append(u)
        free[u] = False
        acc += g[:, u]
    return np.sort(np.asarray(dropped, dtype=np.int64))


class LeastSquaresSelection(Pass):
    """Shared driver: pick kept units per group (``choose``), plan them, refit consumers."""

    provides = ("plan", "refits")

    def __init__(self, ratio: float = 0.5, calib: Iterable[Any] | None = None, samples: int = 2048,
                 round_to: int = 8, kinds: tuple[str, ...] = ("channel", "mlp"), seed: int = 0,
                 refit: bool = True) -> None:
        self.ratio = check_ratio("channels", ratio)
        self.calib, self.samples, self.round_to = calib, samples, round_to
        self.kinds, self.seed, self.do_refit = kinds, seed, refit

    def choose(self, rec: Reconstruction, n_keep: int) -> np.ndarray:
        raise NotImplementedError

    def run(self, state: State) -> PassResult:
        calib = self.calibration(state, f"'{self.name}'")
        if state.calib is None:  # compile checks the refit on the data it was fit on
            state.calib = calib
        groups = [g for g in state.coupling.groups if g.kind in self.kinds]
        recs = reconstructions(state, calib, groups, self.samples, self.seed)
        for name, rec in recs.items():
            g = rec.group
            unit = next(iter(g.members.values())).shape[1]
            n_keep = keep_count(g.size, self.ratio, self.round_to if unit == 1 else 1)
            if n_keep < g.size:
                state.plan.kept[name] = np.sort(self.choose(rec, n_keep)).tolist()
                state.plan.sizes[name] = g.size
        if self.do_refit and any(name in state.plan.kept for name in recs):
            cut = Cut.of(state.coupling, state.plan)   # the rewriter's slicing, for the other dims
            for name, rec in recs.items():
                if name in state.plan.kept:
                    self._refit(state, cut, rec, np.asarray(state.plan.kept[name]))
        state.plan.meta.update({"ratios": {k: self.ratio for k in self.kinds}, "round_to": self.round_to,
                                "selection": self.name})
        skipped = len(groups) - len(recs)
        if skipped:
            state.notes.append(f"{self.name}: {skipped} groups without dense conv/linear consumers kept")
        return PassResult(state, True)

    def _refit(self, state: State, cut: Cut, rec: Reconstruction, kept: np.ndarray) -> None:
        for c, (weight, before, after) in zip(rec.cons, rec.refit(kept)):
            weight = weight.to(state.program.tensor(c.fqn).dtype)
            state.updates[c.fqn] = cut.slice(c.fqn, weight, skip=(1,))  # dim 1 is already refit
            # consumer fqn → (before, after refit): relative reconstruction error on the samples
            state.results.setdefault(self.name, {}).setdefault("errors", {})[c.fqn] = (before, after)
            state.notes.append(f"{self.name}: refit {c.fqn}: rel. reconstruction error "
                               f"{before:.4g} → {after:.4g}")


@register_pass("thinet")
class ThiNet(LeastSquaresSelection):
    """Keep the channels that best rebuild the next layer's output (Luo et al., 2017).
    Samples im2col rows of each consumer's input, greedily removes the channels whose summed
    contribution to the consumer outputs is smallest (errors summed over residual-coupled
    consumers, each relative to its output energy), then refits the consumers by least squares.
    Before: conv1(64) → relu → conv2(in=64)
    After:  plan keeps 32 of conv1's channels; state.updates[conv2.weight] (in=32), refit."""

    def choose(self, rec: Reconstruction, n_keep: int) -> np.ndarray:
        dropped = greedy_drop(rec, rec.group.size - n_keep)
        return np.setdiff1d(np.arange(rec.group.size), dropped)
