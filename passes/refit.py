"""Reconstruction after selection: refit the Linear layers that read pruned units, on calibration data."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from torch import fx

from prunec.calib import call_args, collect, with_example_options
from prunec.cut import Cut
from prunec.distributed import all_reduce_sum
from prunec.errors import InputError
from prunec.passes.activation import Consumer, consumers
from prunec.passes.base import Pass, PassResult, State, register_pass
from prunec.sequential import find_blocks, forward_sums, run_sequential

MODES = ("ls", "bias")
RIDGE = 1e-4   # × mean diag of the kept inputs' Gram matrix


@dataclass
class _Target:
    """One consumer Linear of a pruned group: its dropped input columns and bias FQN (or None)."""

    con: Consumer
    dropped: np.ndarray
    bias: str | None


@register_pass("refit")
class Refit(Pass):
    """Refit every Linear that consumes a pruned group (e.g. ``down_proj`` after MLP channels go,
    ``o_proj`` after heads go) on the calibration inputs, as ``state.updates`` that the compiler
    applies after the verified rewrite and keeps only if the output error vs the original drops.
    ``mode='ls'``: least squares, ThiNet's refit generalised to Linear layers:
    min ‖X_K W'ᵀ + b' − (X Wᵀ + b)‖² + λ‖W'‖² over the kept columns K (b' only if the layer has a
    bias), from the streamed Gram matrix XᵀX of all calibration positions (none stored).
    ``mode='bias'``: FLAP's bias compensation b' = b + W[:, D] · mean(X_D) for the dropped columns D;
    layers without a bias (Llama's projections) can't hold it and are left as they are (use 'ls').
    ``sequential`` (default; models with a block list, e.g. an LLM's decoder layers, whose pruned
    groups are all read by Linears inside the blocks — MLP channels, heads): the inputs of block i's
    layers come from blocks 0…i−1 as pruned and refit (the pruning emulated on a copy of each block by
    zeroing the dropped input columns of its consumers), as SparseGPT calibrates; otherwise one
    forward of the unpruned program.
    Before: state.plan.  After: state.updates[consumer weight (and bias)] in the pruned shape."""

    requires = ("plan",)
    provides = ("refits",)

    def __init__(self, mode: str = "ls", calib: Iterable[Any] | None = None, ridge: float = RIDGE,
                 sequential: bool = True) -> None:
        if mode not in MODES:
            raise InputError(f"refit mode '{mode}' is unknown", f"use one of {MODES}")
        self.mode, self.calib, self.ridge, self.sequential = mode, list(calib) if calib is not None else None, \
            ridge, sequential

    def run(self, state: State) -> PassResult:
        calib = self.calibration(state, f"refit '{self.mode}'")
        if state.calib is None:  # compile checks the refit on the data it was fit on
            state.calib = calib
        targets, skipped = self._targets(state)
        if skipped:
            state.notes.append(f"refit: {skipped} consumer(s) not refit (not a Linear read once, its input "
                               "shared with another pruned group, in a dropped block, or no bias for 'bias')")
        if not targets:
            return PassResult(state, False)
        errors = state.results.setdefault(self.name, {}).setdefault("errors", {})

        def solve(t: _Target, s: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
            w = state.program.tensor(t.con.fqn).detach().double()
            b = state.program.tensor(t.bias).detach().double() if t.bias else None
            kept = np.setdiff1d(np.arange(w.shape[1]), t.dropped)
            if self.mode == "bias":
                return w[:, kept], b + w[:, t.dropped] @ (s["sum"][t.dropped] / max(s["n"], 1))
            new_w, new_b, before, after = _least_squares(w, b, s, kept, self.ridge)
            errors[t.con.fqn] = (before, after)
            return (new_w, new_b) if after < before else None

        eager = _sequential_plan(state, targets) if self.sequential else None
        if eager is not None:
            solved = _sequential_solve(state, calib, targets, eager, solve, gram=self.mode == "ls")
        else:
            sums = _input_sums(state, calib, [t.con for t in targets], gram=self.mode == "ls")
            solved = {id(t): solve(t, sums[id(t.con)]) for t in targets}
        cut = Cut.of(state.coupling, state.plan)
        for t in targets:
            if solved[id(t)] is None:
                continue
            new_w, new_b = solved[id(t)]
            dtype = state.program.tensor(t.con.fqn).dtype
            state.updates[t.con.fqn] = cut.slice(t.con.fqn, new_w.to(dtype), skip=(1,))
            if new_b is not None:
                state.updates[t.bias] = cut.slice(t.bias, new_b.to(dtype))
        state.results[self.name]["sequential"] = eager is not None
        state.notes.append(f"refit '{self.mode}': {len(targets)} Linear layer(s) on {all_reduce_sum(len(calib))} calibration "
                           f"batch(es), " + ("block by block (each block on the pruned, refit blocks before it)"
                                             if eager is not None else "one forward of the unpruned model"))
        return PassResult(state, True)

    def _targets(self, state: State) -> tuple[list[_Target], int]:
        fqns = state.program.placeholder_fqns()
        dropped_blocks = tuple(f"{b}." for b in state.plan.meta.get("dropped_layers") or ())
        found: dict[str, list[_Target]] = {}
        skipped = 0
        for name, kept in state.plan.kept.items():
            group = state.coupling.group(name)
            gone = np.setdiff1d(np.arange(group.size), kept)
            for c in consumers(state, group):
                bias = fqns.get(c.op.args[2].name) if len(c.op.args) > 2 and isinstance(c.op.args[2], fx.Node) else None
                if c.conv or c.fqn.startswith(dropped_blocks) or (self.mode == "bias" and bias is None):
                    skipped += 1
                    continue
                found.setdefault(c.fqn, []).append(_Target(c, np.sort(c.rows[gone].reshape(-1)), bias))
        out = []
        for fqn, ts in found.items():   # one op reading the weight, one pruned group feeding it
            if len(ts) == 1:
                out.append(ts[0])
            else:
                skipped += len(ts)
        return out, skipped


def _sequential_plan(state: State, targets: list[_Target]) -> dict[str, np.ndarray] | None:
    """Module path → dropped input columns of every consumer of a pruned group, if each is a Linear of
    the model inside one of its blocks and no other pruning (hidden width, dropped layers) is planned."""
    blocks = tuple(f"{path}." for path, _ in find_blocks(state.model))
    if not blocks or state.plan.meta.get("dropped_layers"):
        return None
    zero: dict[str, np.ndarray] = {}
    for name, kept in state.plan.kept.items():
        group = state.coupling.group(name)
        cons = consumers(state, group)
        if group.kind not in ("mlp", "head") or not cons:
            return None
        gone = np.setdiff1d(np.arange(group.size), kept)
        for c in cons:
            path = c.fqn.rpartition(".")[0]
            try:
                mod = state.model.get_submodule(path)
            except AttributeError:
                return None
            if c.conv or not path.startswith(blocks) or not isinstance(mod, torch.nn.Linear) \
                    or mod.weight.shape != state.program.tensor(c.fqn).shape:
                return None
            zero[path] = np.union1d(zero.get(path, np.zeros(0, dtype=np.int64)), c.rows[gone].reshape(-1))
    return zero


def _sequential_solve(state: State, calib: list[Any], targets: list[_Target], zero: dict[str, np.ndarray],
                      solve: Any, gram: bool) -> dict[int, Any]:
    """Solve each block's targets on inputs from the pruned, refit blocks before it (see ``Refit``)."""
    by_path = {t.con.fqn.rpartition(".")[0]: t for t in targets}
    solved: dict[int, Any] = {}

    def process(path: str, block: torch.nn.Module, inputs: list[Any]) -> torch.nn.Module:
        work = copy.deepcopy(block)
        prefix = path + "."
        mods = {p: work.get_submodule(p[len(prefix):]) for p in zero if p.startswith(prefix)}
        with torch.no_grad():
            for p, mod in mods.items():
                mod.weight[:, torch.as_tensor(zero[p])] = 0
        sums: dict[str, dict[str, Any]] = {}
        forward_sums(work, {p: m for p, m in mods.items() if p in by_path}, inputs,
                     lambda p, _m, x: _add(sums.setdefault(p, {"sum": 0, "n": 0, "gram": 0}), x, gram), sums)
        with torch.no_grad():
            for p, s in sums.items():
                t = by_path[p]
                solved[id(t)] = res = solve(t, s)
                if res is not None:
                    kept = torch.as_tensor(np.setdiff1d(np.arange(mods[p].weight.shape[1]), t.dropped))
                    mods[p].weight[:, kept] = res[0].to(mods[p].weight.dtype)
                    if res[1] is not None:
                        mods[p].bias.copy_(res[1])
        return work

    batches = [with_example_options(state.program, call_args(b)) for b in calib]
    run_sequential(state.model, batches, process)
    return {id(t): solved.get(id(t)) for t in targets}


def _add(s: dict[str, Any], value: torch.Tensor, gram: bool) -> None:
    """Add one batch of a Linear's input to running Σx, n and (``gram``) XᵀX."""
    x = value.detach().reshape(-1, value.shape[-1])
    s["sum"] = s["sum"] + x.double().sum(0)
    s["n"] += x.shape[0]
    if gram:   # float32 products, float64 running sum
        s["gram"] = s["gram"] + (x.float().T @ x.float()).double()


def _input_sums(state: State, calib: list[Any], cons: list[Consumer], gram: bool) -> dict[int, dict[str, Any]]:
    """id(consumer) → Σx, n and (``gram``) XᵀX of its input over every calibration position."""
    by_node: dict[fx.Node, list[Consumer]] = {}
    for c in cons:
        by_node.setdefault(c.x, []).append(c)
    sums: dict[int, dict[str, Any]] = {}

    def on_value(node: fx.Node, value: Any) -> None:
        for c in by_node[node]:
            _add(sums.setdefault(id(c), {"sum": 0, "n": 0, "gram": 0}), value, gram)

    collect(state.program, calib, lambda n, v: on_value(n, v) if n in by_node else None, watch=by_node, sums=sums)
    return sums


def _least_squares(w: torch.Tensor, b: torch.Tensor | None, s: dict[str, Any], kept: np.ndarray,
                   ridge: float) -> tuple[torch.Tensor, torch.Tensor | None, float, float]:
    """(W', b', rel. error of plain slicing, rel. error of the refit) on the calibration inputs."""
    d, k = w.shape[1], torch.as_tensor(kept)
    g = torch.zeros(d + 1, d + 1, dtype=torch.float64)      # Gram of [X, 1]
    g[:d, :d], g[:d, d], g[d, :d], g[d, d] = s["gram"], s["sum"], s["sum"], float(s["n"])
    full = torch.cat([w.T, (b if b is not None else torch.zeros(w.shape[0], dtype=w.dtype))[None]])  # (d+1, out)
    cols = torch.cat([k, torch.tensor([d])]) if b is not None else k
    a = g[cols][:, cols].clone()
    lam = ridge * float(a[:len(k), :len(k)].diagonal().mean()) + 1e-12
    a[range(len(k)), range(len(k))] += lam
    coef = torch.linalg.solve(a, g[cols] @ full)            # (|cols|, out)

    def err(c: torch.Tensor) -> float:
        delta = full.clone()
        delta[cols] -= c
        return float(torch.einsum("io,ij,jo->", delta, g, delta) / torch.einsum("io,ij,jo->", full, g, full))

    before, after = err(full[cols]), err(coef)
    new_w = coef[:len(k)].T.contiguous()
    new_b = coef[len(k)] if b is not None else None
    return new_w, new_b, before, after
