"""Reconstruction after selection: refit the Linear and conv layers that read pruned units, on calibration data."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import fx

from prunec.calib import call_args, collect, with_example_options
from prunec.cut import Cut
from prunec.distributed import all_reduce_sum
from prunec.errors import InputError
from prunec.passes.activation import Consumer, consumers
from prunec.passes.base import Pass, PassResult, State, register_pass
from prunec.plan import Plan
from prunec.sequential import find_blocks, forward_sums, run_sequential

MODES = ("ls", "bias")
RIDGE = 1e-4   # × mean diag of the kept inputs' Gram matrix
# least squares needs this many calibration positions per kept input column, else the layer gets the bias compensation.
# A classifier fit on 32 images' 1280 features interpolates them: EfficientNet-Lite0, --method flap --channels 0.05,
# top-1 agreement on held-out photos 0.35 with every layer solved; 0.61 / 0.65 / 0.62 / 0.62 / 0.65 / 0.59 with
# 1 / 2 / 3 / 4 / 8 / 16 positions per column (docs/data_driven.md). 2 leaves SmolLM2's down_proj refit on 32 × 128
# tokens (3.6 per column, docs/llm.md) as it was.
MIN_ROWS_PER_COLUMN = 2
aten = torch.ops.aten
BATCH_NORMS = {aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default}


@dataclass
class _Target:
    """One consumer (a Linear or dense conv) of a pruned group: its dropped input columns, the tensor that holds
    its output shift (``bias``: its own bias, or for a conv without one the running mean of the BatchNorm it
    feeds; the shift is ``sign`` × that tensor), and whether its weights are solved by least squares
    (``ls``: Linears and unpadded 1×1 convs in mode 'ls'; else only the shift is compensated)."""

    con: Consumer
    dropped: np.ndarray
    bias: str | None
    sign: float
    ls: bool


@register_pass("refit")
class Refit(Pass):
    """Refit every Linear and dense conv that consumes a pruned group (e.g. ``down_proj`` after MLP channels go,
    ``o_proj`` after heads go, a MobileNet block's projection conv after its expanded channels go) on the
    calibration inputs, as ``state.updates`` that the compiler applies after the verified rewrite and keeps only
    if the output error vs the original drops.
    ``mode='ls'``: least squares, ThiNet's refit generalised to Linear layers and 1×1 convs:
    min ‖X_K W'ᵀ + b' − (X Wᵀ + b)‖² + λ‖W'‖² over the kept columns K (b' only if the layer has a
    shift, below), from the streamed Gram matrix XᵀX of all calibration positions (none stored); k×k convs get
    the bias compensation of 'bias' (their im2col Gram matrix is c_in·k² wide).
    ``mode='bias'``: FLAP's bias compensation b' = b + W[:, D] · mean(X_D) for the dropped columns D (a conv's
    weights summed over its taps: exact for 1×1 convs, away from the padded border for k×k). A conv without a
    bias that feeds a BatchNorm takes the shift in that norm's running mean (−b'); layers with neither (Llama's
    projections) can't hold it and are left as they are (use 'ls').
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
            state.notes.append(f"refit: {skipped} consumer(s) not refit (a grouped conv, read more than once, its "
                               "input shared with another pruned group, in a dropped block, or no bias or "
                               "BatchNorm to hold the shift)")
        if not targets:
            return PassResult(state, False)
        errors = state.results.setdefault(self.name, {}).setdefault("errors", {})
        few: list[str] = []

        def solve(t: _Target, s: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
            return self._solve(state.program, t, s, errors, few)

        eager = _sequential_plan(state, targets) if self.sequential else None
        if eager is not None:
            solved = _sequential_solve(state, calib, targets, eager, solve, gram=self.mode == "ls")
        else:
            sums = _input_sums(state, calib, targets)
            solved = {id(t): solve(t, sums[id(t.con)]) for t in targets}
        state.updates.update(_updates(state, targets, solved))
        state.results[self.name]["sequential"] = eager is not None
        solved_by = "least squares" if self.mode == "ls" else "bias compensation"
        shifted = sum(not t.ls for t in targets) if self.mode == "ls" else 0
        state.results[self.name]["too_few_samples"] = few
        state.notes.append(f"refit '{self.mode}': {len(targets)} layer(s) by {solved_by}"
                           + (f" ({shifted} k×k conv(s) by bias compensation)" if shifted else "")
                           + (f" ({len(few)} with fewer than {MIN_ROWS_PER_COLUMN} calibration positions per input "
                              "column: bias compensation, or left as they are without a bias)" if few else "")
                           + f" on {all_reduce_sum(len(calib))} calibration batch(es), "
                           + ("block by block (each block on the pruned, refit blocks before it)"
                              if eager is not None else "one forward of the unpruned model"))
        return PassResult(state, True)

    def _solve(self, program: Any, t: _Target, s: dict[str, Any], errors: dict[str, Any], few: list[str]
               ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(new weight over the kept columns, new shift tensor or None) of one target from its input sums; None:
        leave it as it is. Least-squares errors go to ``errors``, targets with too few positions to ``few``."""
        w = program.tensor(t.con.fqn).detach().double()
        b = t.sign * program.tensor(t.bias).detach().double() if t.bias else None
        kept = np.setdiff1d(np.arange(w.shape[1]), t.dropped)
        if t.ls and s["n"] < MIN_ROWS_PER_COLUMN * len(kept):   # too few positions to solve it
            few.append(t.con.fqn)
            if t.bias is None:
                return None
        if not t.ls or t.con.fqn in few:   # the dropped columns' mean contribution, summed over a conv's taps
            taps = w.reshape(*w.shape[:2], -1).sum(-1)
            return w[:, kept], t.sign * (b + taps[:, t.dropped] @ (s["sum"][t.dropped] / max(s["n"], 1)))
        new_w, new_b, before, after = _least_squares(w.reshape(*w.shape[:2]), b, s, kept, self.ridge)
        errors[t.con.fqn] = (before, after)
        new_w = new_w.reshape(new_w.shape[0], -1, *w.shape[2:])
        return (new_w, None if new_b is None else t.sign * new_b) if after < before else None

    def fitter(self, state: State, groups: Iterable[str]) -> Callable[[Plan], dict[str, torch.Tensor]]:
        """``updates(plan)``: this refit's ``state.updates`` for any plan that cuts only ``groups``, solved as
        ``run`` solves them with one forward of the unpruned program (never block by block), from one pass over
        the calibration data for all plans. A latency allocation's probes use it to measure each cut as the
        compile will return it, refit."""
        calib = self.calibration(state, f"refit '{self.mode}'")
        every: dict[tuple[str, str], _Target] = {}
        for g in groups:   # each group cut alone: its consumers (a consumer of two cut groups is not refit)
            trial = dataclasses.replace(state, plan=Plan(kept={g: [0]}, sizes={g: state.coupling.group(g).size}))
            every.update({(t.con.fqn, t.con.x.name): t for t in self._targets(trial)[0]})
        sums = _input_sums(state, calib, list(every.values()))
        by_key = {key: sums[id(t.con)] for key, t in every.items()}

        def updates(plan: Plan) -> dict[str, torch.Tensor]:
            trial = dataclasses.replace(state, plan=plan)
            targets = [t for t in self._targets(trial)[0] if (t.con.fqn, t.con.x.name) in by_key]
            return _updates(trial, targets, {id(t): self._solve(state.program, t, by_key[t.con.fqn, t.con.x.name],
                                                                {}, []) for t in targets})
        return updates

    def _targets(self, state: State) -> tuple[list[_Target], int]:
        fqns = state.program.placeholder_fqns()
        dropped_blocks = tuple(f"{b}." for b in state.plan.meta.get("dropped_layers") or ())
        found: dict[str, list[_Target]] = {}
        skipped = 0
        for name, kept in state.plan.kept.items():
            group = state.coupling.group(name)
            gone = np.setdiff1d(np.arange(group.size), kept)
            for c in consumers(state, group):
                bias, sign = _shift(c, fqns)
                ls = self.mode == "ls" and (not c.conv or _pointwise(c, state.program.tensor(c.fqn)))
                if c.fqn.startswith(dropped_blocks) or (not ls and bias is None):
                    skipped += 1
                    continue
                found.setdefault(c.fqn, []).append(_Target(c, np.sort(c.rows[gone].reshape(-1)), bias, sign, ls))
        out = []
        for fqn, ts in found.items():   # one op reading the weight, one pruned group feeding it
            if len(ts) == 1:
                out.append(ts[0])
            else:
                skipped += len(ts)
        return out, skipped


def _updates(state: State, targets: list[_Target], solved: dict[int, Any]) -> dict[str, torch.Tensor]:
    """The solved targets' new tensors, sliced to ``state.plan``'s pruned shapes (the output dims it cuts)."""
    cut = Cut.of(state.coupling, state.plan)
    out = {}
    for t in targets:
        if solved[id(t)] is None:
            continue
        new_w, new_b = solved[id(t)]
        dtype = state.program.tensor(t.con.fqn).dtype
        out[t.con.fqn] = cut.slice(t.con.fqn, new_w.to(dtype), skip=(1,))
        if new_b is not None:
            out[t.bias] = cut.slice(t.bias, new_b.to(dtype))
    return out


def _shift(c: Consumer, fqns: dict[str, str]) -> tuple[str | None, float]:
    """(FQN, sign) of the tensor holding ``c``'s output shift: its bias (+1), or for a conv without one whose
    only reader is a BatchNorm (inference statistics), that norm's running mean (−1); (None, 1) if neither."""
    bias = c.op.args[2] if len(c.op.args) > 2 else None
    if isinstance(bias, fx.Node):
        return fqns.get(bias.name), 1.0
    if c.conv and len(c.op.users) == 1:
        bn = next(iter(c.op.users))
        mean = bn.args[3] if bn.target in BATCH_NORMS and len(bn.args) > 3 and bn.args[0] is c.op else None
        if bn.target is aten.batch_norm.default and len(bn.args) > 5 and bn.args[5]:
            mean = None   # training mode: the batch's statistics, not the running mean, are used
        if isinstance(mean, fx.Node) and len(mean.users) == 1 and mean.name in fqns:
            return fqns[mean.name], -1.0
    return None, 1.0


def _pointwise(c: Consumer, weight: torch.Tensor) -> bool:
    """A 1×1 conv without padding: a Linear over channels at each (strided) position."""
    return all(k == 1 for k in weight.shape[2:]) and not any(c.conv_args()["padding"])


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
                     lambda p, _m, x: _add(sums.setdefault(p, {"sum": 0, "n": 0, "gram": 0}),
                                           x.reshape(-1, x.shape[-1]), gram), sums)
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


def _add(s: dict[str, Any], x: torch.Tensor, gram: bool) -> None:
    """Add one batch of a layer's input columns (positions × columns) to running Σx, n and (``gram``) XᵀX."""
    x = x.detach()
    s["sum"] = s["sum"] + x.double().sum(0)
    s["n"] += x.shape[0]
    if gram:   # float32 products, float64 running sum
        s["gram"] = s["gram"] + (x.float().T @ x.float()).double()


def _columns(c: Consumer, value: torch.Tensor, ls: bool) -> torch.Tensor:
    """``c``'s input as positions × input columns: a conv's channels at every position (a 1×1 conv solved by
    least squares: at the positions its stride reads)."""
    if not c.conv:
        return value.reshape(-1, value.shape[-1])
    if ls:
        value = value[(slice(None), slice(None), *(slice(None, None, s) for s in c.conv_args()["stride"]))]
    return value.movedim(1, -1).reshape(-1, value.shape[1])


def _input_sums(state: State, calib: list[Any], targets: list[_Target]) -> dict[int, dict[str, Any]]:
    """id(consumer) → Σx, n and (least-squares targets) XᵀX of its input over every calibration position."""
    by_node: dict[fx.Node, list[_Target]] = {}
    for t in targets:
        by_node.setdefault(t.con.x, []).append(t)
    sums: dict[int, dict[str, Any]] = {}

    def on_value(node: fx.Node, value: Any) -> None:
        for t in by_node[node]:
            _add(sums.setdefault(id(t.con), {"sum": 0, "n": 0, "gram": 0}), _columns(t.con, value, t.ls), t.ls)

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
