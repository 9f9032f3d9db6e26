"""Latency model measured on a runtime: every conv/linear a prunable group's width touches, timed
standalone at candidate widths, cached on disk, turned into per-group staircases and predictions.

Model: an op's latency with ``c_in`` and ``c_out`` kept is ``T_in(c_in) · T_out(c_out) / T_full``
(each curve measured with the other side whole; depthwise convs get one curve for both). The
model's latency is the sum over ops, scaled so the unpruned sum equals the dense model measured
end to end on the same runtime (the ops not timed are assumed to shrink in proportion).

Standalone ops pay layout reorders and dispatch the fused model doesn't (and the model pays
norms, activations and pooling the ops don't), so ``calibrate`` times the whole model with one group
cut at a time and scales each group's predicted savings by what the model really saved, then with every
group cut together at two depths, through which the summed savings are mapped.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from prunec.coupling import Coupling, shape_of
from prunec.errors import InputError, InternalError
from prunec.runtimes import Runtime, get_runtime, time_interleaved
from prunec.trace import Program

MODEL_VERSION = 8   # bump when the measuring or the JSON layout changes: old caches stop matching
aten = torch.ops.aten
CONVS = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}
Progress = Callable[[str], None]


@dataclass
class Op:
    """One conv/linear: its shapes and which groups set its input and output widths."""

    name: str                     # the weight's FQN
    kind: str                     # conv1d | conv2d | conv3d | linear
    x_shape: tuple[int, ...]
    w_shape: tuple[int, ...]
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = False
    in_group: str | None = None
    out_group: str | None = None
    depthwise: bool = False       # groups == channels: one width sets in, out and groups
    in_per_unit: int = 1          # channels per group unit (a flattened C×H×W feeding a linear: H·W)

    def signature(self) -> str:
        return json.dumps([self.kind, self.x_shape, self.w_shape, self.stride, self.padding,
                           self.dilation, self.groups, self.bias, self.depthwise, self.in_per_unit])

    def module(self, c_in: int, c_out: int, batch: int) -> tuple[nn.Module, torch.Tensor]:
        """A standalone module with these widths and its input at ``batch``."""
        if self.kind == "linear":
            x = torch.randn(batch, *self.x_shape[1:-1], c_in)
            return nn.Linear(c_in, c_out, bias=self.bias), x
        dims = CONVS_BY_KIND[self.kind]
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        groups = c_out if self.depthwise else self.groups
        m = conv(c_in, c_out, self.w_shape[2:], stride=self.stride, padding=self.padding,
                 dilation=self.dilation, groups=groups, bias=self.bias)
        return m, torch.randn(batch, c_in, *self.x_shape[2:])


CONVS_BY_KIND = {"conv1d": 1, "conv2d": 2, "conv3d": 3}


def layer_ops(program: Program, coupling: Coupling) -> list[Op]:
    """The conv/linear ops of ``program`` whose widths belong to prunable single-unit groups."""
    fqns = program.placeholder_fqns()
    owner = {key: (g.name, rows.shape[1]) for g in coupling.groups
             if next(iter(g.members.values())).shape[1] == 1 for key, rows in g.members.items()}
    ops = []
    for node in program.graph.nodes:
        if node.op != "call_function" or (node.target not in CONVS and node.target != aten.linear.default):
            continue
        w = node.args[1]
        name = fqns.get(getattr(w, "name", ""))
        x_shape, w_shape = shape_of(node.args[0]), shape_of(w)
        if name is None or x_shape is None or w_shape is None:
            continue
        bias = len(node.args) > 2 and node.args[2] is not None
        if node.target == aten.linear.default:
            op = Op(name, "linear", x_shape, w_shape, bias=bias)
        else:
            n = CONVS[node.target]
            args = list(node.args) + [None] * 7
            stride, padding, dilation = (_tuple(args[3], 1, n), _tuple(args[4], 0, n), _tuple(args[5], 1, n))
            if isinstance(args[4], str):
                continue  # padding='same' | 'valid': not timed (its width stays whole in the model)
            groups = int(args[6] or 1)
            op = Op(name, f"conv{n}d", x_shape, w_shape, stride, padding, dilation, groups, bias,
                    depthwise=groups > 1 and groups == x_shape[1] and w_shape[1] == 1)
        out, inp = owner.get((name, 0), (None, 1)), owner.get((name, 1), (None, 1))
        op.out_group = out[0] if out[1] == 1 else None
        op.in_group, op.in_per_unit = (op.out_group, 1) if op.depthwise else inp
        if op.depthwise and op.groups != w_shape[0]:
            op.depthwise, op.in_group = False, None  # channel multiplier: only the out side is ours
        if op.in_group or op.out_group:
            ops.append(op)
    return ops


def _tuple(v: Any, default: int, n: int) -> tuple[int, ...]:
    if v is None:
        return (default,) * n
    if isinstance(v, int):
        return (v,) * n
    return tuple(int(i) for i in v) * (n if len(v) == 1 else 1)


def candidate_widths(size: int, points: int = 16, multiple: int = 8) -> list[int]:
    """Widths to time for a group of ``size``: about ``points`` of them, always including ``size``; for a
    group wider than ``multiple`` only multiples of it (a group no wider: every few widths). In the model, a
    width off the kernels' vector width leaves the blocked layout (onnxruntime's NCHWc: the consumers of a
    22-wide tensor run a plain conv between reorders, 1.5 ms where 24 wide took 1.1 ms), while the same op
    timed alone looks cheaper off the grid (it skips the reorders a blocked op pays at a model's edges)."""
    if size <= multiple:
        step = max(1, math.ceil(size / points))
    else:
        step = multiple * max(1, math.ceil(size / points / multiple))
    return sorted(set(range(step, size, step)) | {size})


@dataclass
class LatencyTable:
    """Measured op curves (ms) for one model, runtime, batch and thread count."""

    meta: dict[str, Any]
    dense_ms: float
    ops: list[Op]
    curves: dict[str, dict[str, dict[int, float]]]   # op name → {"in"|"out"|"both": {width: ms}}
    full: dict[str, float]                            # op name → ms with every width whole
    sizes: dict[str, int] = field(default_factory=dict)  # group → units
    factors: dict[str, float] = field(default_factory=dict)  # group → measured / predicted saving
    calibration: dict[str, Any] = field(default_factory=dict)  # how the factors were measured

    @property
    def scale(self) -> float:
        total = sum(self.full.values())
        return self.dense_ms / total if total > 0 else 0.0

    def _curve(self, op: str, side: str, w: int) -> float:
        c = self.curves[op][side]
        xs = sorted(c)
        if w <= xs[0]:
            return c[xs[0]] * w / xs[0]
        return float(np.interp(w, xs, [c[x] for x in xs]))

    def op_ms(self, op: Op, widths: dict[str, int]) -> float:
        """Predicted ms (standalone units) of ``op`` with these group widths (others whole)."""
        full = self.full[op.name]
        if op.depthwise:
            return self._curve(op.name, "both", widths[op.out_group]) if op.out_group in widths else full
        t = full
        if op.in_group in widths:
            t *= self._curve(op.name, "in", widths[op.in_group]) / full
        if op.out_group in widths:
            t *= self._curve(op.name, "out", widths[op.out_group]) / full
        return t

    def op_saved(self, op: Op, widths: dict[str, int]) -> float:
        """Predicted end-to-end ms saved by ``op`` at these widths: its standalone saving, scaled to
        the model and by the calibration factors of the groups that shrink it."""
        saved = self.scale * (self.full[op.name] - self.op_ms(op, widths))
        groups = {g for g in (op.in_group, op.out_group) if g in widths and widths[g] < self.sizes.get(g, math.inf)}
        if not saved or not self.factors or not groups:
            return saved
        return saved * sum(self.factors.get(g, 1.0) for g in groups) / len(groups)

    def raw_saved(self, widths: dict[str, int]) -> float:
        """The ops' predicted savings (ms) at these widths, summed as if they added up."""
        return sum(self.op_saved(op, widths) for op in self.ops)

    def saving(self, raw: float) -> float:
        """End-to-end ms saved when the ops' savings sum to ``raw`` ms: through the joint cuts ``calibrate``
        measured (every group cut together to ~50 % and ~25 %; single cuts' savings don't add up, and deep
        cuts save less than their sum on some runtimes), piecewise linear from 0 and monotone, each point
        kept within [0.25, 2]× its prediction; past the deepest cut its last slope, within [¼ of its mean,
        1] (each predicted ms past the measured cuts saves at most 1 ms). Joint cuts at one predicted saving
        (a coarse grid snaps both to the same widths) count once, at their mean. Without joint cuts: ``raw``."""
        pts: dict[float, list[float]] = {}
        for p in self.calibration.get("joint", []):
            if p["predicted_saved_ms"] > 1e-9:
                pts.setdefault(round(p["predicted_saved_ms"], 9), []).append(p["measured_saved_ms"])
        if not pts:
            return raw
        xs = np.array([0.0] + sorted(pts))
        measured = [0.0] + [float(np.mean(pts[x])) for x in sorted(pts)]
        ys = np.maximum.accumulate(np.clip(measured, 0.25 * xs, 2.0 * xs))
        if raw <= xs[-1]:
            return float(np.interp(raw, xs, ys))
        slope = min(max((ys[-1] - ys[-2]) / (xs[-1] - xs[-2]), 0.25 * ys[-1] / xs[-1]), 1.0)
        return float(ys[-1] + slope * (raw - xs[-1]))

    def predict(self, widths: dict[str, int]) -> float:
        """Predicted end-to-end ms of the model with these group widths."""
        return self.dense_ms - self.saving(self.raw_saved(widths))

    def group_curve(self, group: str) -> dict[int, float]:
        """Predicted model ms at each timed width of ``group`` (the others whole)."""
        widths = {w for op in self.ops for side, c in self.curves[op.name].items()
                  if (op.in_group if side == "in" else op.out_group) == group for w in c}
        return {w: self.predict({group: w}) for w in sorted(widths)}

    def group_ms(self, group: str) -> float:
        """Predicted ms of the ops ``group``'s width touches, all whole."""
        return self.scale * sum(self.full[op.name] for op in self.ops if group in (op.in_group, op.out_group))

    def steps(self, group: str, tol: float = 0.05) -> list[int]:
        """Widths on the latency frontier: no wider timed width is faster by more than ``tol`` of the
        group's own ops' latency (timing noise must not make a width look dominated)."""
        curve = self.group_curve(group)
        margin = tol * self.group_ms(group)
        out, best = [], math.inf
        for w in sorted(curve, reverse=True):
            if curve[w] <= best + margin:
                out.append(w)
            best = min(best, curve[w])
        return sorted(out)

    def staircase(self, group: str, rel: float = 0.02) -> list[int]:
        """Widths where the predicted latency steps up by more than ``rel`` of the group's span."""
        curve = self.group_curve(group)
        ws = sorted(curve)
        span = max(curve.values()) - min(curve.values()) if curve else 0.0
        return [b for a, b in zip(ws, ws[1:]) if span > 0 and curve[b] - curve[a] > rel * span]

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "dense_ms": self.dense_ms, "sizes": self.sizes, "factors": self.factors,
                "calibration": self.calibration, "ops": [op.__dict__ for op in self.ops], "full": self.full,
                "curves": {o: {s: {str(w): t for w, t in c.items()} for s, c in sides.items()}
                           for o, sides in self.curves.items()}}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> LatencyTable:
        ops = [Op(**{k: tuple(v) if isinstance(v, list) else v for k, v in o.items()}) for o in d["ops"]]
        curves = {o: {s: {int(w): float(t) for w, t in c.items()} for s, c in sides.items()}
                  for o, sides in d["curves"].items()}
        return cls(d["meta"], float(d["dense_ms"]), ops, curves, {k: float(v) for k, v in d["full"].items()},
                   {k: int(v) for k, v in d.get("sizes", {}).items()},
                   {k: float(v) for k, v in d.get("factors", {}).items()}, d.get("calibration", {}))


def cache_dir() -> Path:
    """``$PRUNEC_CACHE_DIR/latency`` or ``~/.cache/prunec/latency``."""
    root = os.environ.get("PRUNEC_CACHE_DIR") or Path.home() / ".cache" / "prunec"
    return Path(root) / "latency"


def key_fields(program: Program, ops: list[Op], runtime: Runtime, batch: int, threads: int,
               points: int, op_timing: str = "kernel") -> dict[str, Any]:
    """Everything a table depends on: the graph's ops and shapes, the runtime and its version, the
    host, batch, threads, the widths grid. Any change gives another cache key."""
    graph = [f"{n.op}:{n.target}:{shape_of(n)}" for n in program.graph.nodes]
    return {"model": hashlib.sha256("\n".join(graph).encode()).hexdigest()[:16],
            "ops": hashlib.sha256("\n".join(o.signature() + str((o.in_group, o.out_group))
                                            for o in ops).encode()).hexdigest()[:16],
            "runtime": runtime.name, "runtime_version": runtime.version(), "torch": torch.__version__,
            "machine": f"{platform.machine()} {platform.processor() or ''} cpus={os.cpu_count()} "
                       f"{runtime.device()}".strip(),
            "batch": batch, "threads": 1 if runtime.needs_cuda else threads, "points": points,
            "multiple": runtime.multiple,
            "op_timing": _op_timing(runtime, op_timing), "version": MODEL_VERSION}


OP_TIMINGS = ("kernel", "wall")


def _op_timing(runtime: Runtime, op_timing: str) -> str:
    """How ``runtime``'s ops get timed when ``op_timing`` is asked for: "kernel" (their own kernels' time, where
    the runtime reports it: ``Runtime.prepare_op``) or "wall" (each standalone op end to end)."""
    if op_timing not in OP_TIMINGS:
        raise InputError(f"op timing '{op_timing}' is unknown", f"use one of {', '.join(OP_TIMINGS)}")
    return "kernel" if op_timing == "kernel" and runtime.prepare_op else "wall"


def cache_key(fields: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:20]


def load_cached(path: Path, fields: dict[str, Any]) -> LatencyTable | None:
    """The table at ``path`` if it was measured for exactly ``fields``; a stale or foreign file under
    this key is refused (InputError), never used."""
    if not path.is_file():
        return None
    try:
        table = LatencyTable.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"latency cache {path} is unreadable ({type(err).__name__})",
                         "delete it, or profile again with --reprofile") from None
    if table.meta.get("key_fields") != fields:
        diff = sorted(k for k in fields if table.meta.get("key_fields", {}).get(k) != fields[k])
        raise InputError(f"latency cache {path} was measured for a different {', '.join(diff) or 'setup'}",
                         "delete it, or profile again with --reprofile")
    return table


class Positional(nn.Module):
    """``model`` with every tensor input positional (the example's positional inputs, then its tensor keyword inputs
    in the example's order) and its other keyword options (``use_cache=False``) fixed: the runtimes feed
    positional tensors only."""

    def __init__(self, model: nn.Module, kwargs: dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        self.options = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}

    def forward(self, *xs: Any) -> Any:
        n = len(xs) - len(self.names)
        return self.model(*xs[:n], **self.options, **dict(zip(self.names, xs[n:])))


def positional(inputs: tuple[Any, ...], kwargs: dict[str, Any] | None
               ) -> tuple[Callable[[nn.Module], nn.Module], tuple[Any, ...]]:
    """(wrap, all inputs): ``wrap(model)`` runs ``model`` on the positional inputs followed by the tensor keyword
    inputs (``Positional``); without keyword inputs the model as it is."""
    if not kwargs:
        return (lambda m: m), tuple(inputs)
    return (lambda m: Positional(m, kwargs)), tuple(inputs) + tuple(v for v in kwargs.values()
                                                                      if isinstance(v, torch.Tensor))


def batched(inputs: tuple[Any, ...], batch: int) -> tuple[Any, ...]:
    """The example inputs with batch ``batch`` (row 0 repeated; other rows random)."""
    out = []
    for t in inputs:
        if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] != batch:
            t = t[:1].expand(batch, *t.shape[1:]).clone()
            if t.is_floating_point() and batch > 1:
                t[1:] = torch.randn_like(t[1:])
        out.append(t)
    return tuple(out)


def profile(model: nn.Module, program: Program, coupling: Coupling, runtime: str = "onnxruntime",
            batch: int = 1, threads: int | None = None, points: int = 16, rounds: int = 5,
            cache: Path | None | bool = True, progress: Progress | None = None,
            reprofile: bool = False, op_timing: str = "kernel") -> LatencyTable:
    """Time every op a prunable group's width touches at candidate widths on ``runtime``; cached
    under ``cache_dir()/<key>.json`` (``cache=False``: neither read nor write; a Path: that folder).
    ``op_timing``: "kernel" (the ops' own kernel time where the runtime reports it, else as "wall") or "wall"
    (each standalone op timed end to end, layout changes at its edges included)."""
    rt = get_runtime(runtime)
    if batch < 1:
        raise InputError(f"--batch {batch} must be ≥ 1", "e.g. --batch 1 or --batch 8")
    threads = threads or os.cpu_count() or 1
    ops = layer_ops(program, coupling)
    fields = key_fields(program, ops, rt, batch, threads, points, op_timing)
    folder = None if cache is False else (cache_dir() if cache is True or cache is None else Path(cache))
    path = folder / f"{cache_key(fields)}.json" if folder else None
    table = load_cached(path, fields) if path and not reprofile else None
    if table is not None:
        table.meta["cache"] = str(path)
        return table
    sizes = {g.name: g.size for g in coupling.groups}
    curves, full = _measure_ops(ops, sizes, rt, batch, threads, points, rounds, progress,
                                fields["op_timing"] == "kernel")
    if progress:
        progress("timing the dense model end to end")
    dense = measure(rt, {"dense": model}, program.example_inputs, batch, threads, rounds,
                    program.example_kwargs)["dense"]
    table = LatencyTable({"key_fields": fields, "key": cache_key(fields), "runtime_note": rt.note},
                         dense, ops, curves, full, sizes)
    if path:
        table.meta["cache"] = str(path)
        save(table)
    return table


def save(table: LatencyTable) -> None:
    """Write ``table`` back to its cache file (``meta["cache"]``), atomically; no file, no write."""
    if not table.meta.get("cache"):
        return
    from prunec.atomic import atomic_path
    path = Path(table.meta["cache"])
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(table.to_json()))


def probe_width(table: LatencyTable, group: str, size: int, fraction: float = 0.25) -> int | None:
    """The latency step of ``group`` nearest ``fraction`` of its ``size`` units (any timed width if it has
    no step below ``size``); None when no narrower width was timed."""
    steps = [w for w in table.steps(group) if w < size] or [w for w in table.group_curve(group) if w < size]
    return min(steps, key=lambda w: abs(w - fraction * size)) if steps else None


NOISE = 0.01  # the least timing noise assumed for one end-to-end measurement: a fraction of the dense ms


def shrunk_factor(measured: float, predicted: float, noise: float) -> float:
    """``measured ÷ predicted`` ms saved, shrunk toward 1 as the predicted saving falls toward the timing
    ``noise`` (ms): the posterior mean of f for measured = f·predicted + N(0, noise²), f ~ N(1, 1); clipped to
    [0, 3]. A group that saves less than the noise can't show its factor, and a knapsack would favour exactly
    the groups whose savings were measured too high."""
    den = noise ** 2 + predicted ** 2
    return min(3.0, max(0.0, (noise ** 2 + measured * predicted) / den)) if den > 1e-18 else 1.0


def calibrate(table: LatencyTable, groups: dict[str, int], deploy: Callable[[dict[str, int]], nn.Module],
              dense: nn.Module, inputs: tuple[Any, ...], rounds: int = 7, chunk: int = 8,
              progress: Progress | None = None, fraction: float = 0.25, joint: tuple[float, ...] = (0.5, 0.25),
              kwargs: dict[str, Any] | None = None) -> None:
    """Time the whole model with one group at a time cut to about ``fraction`` of its width
    (``deploy({group: width})`` builds it as compile would return it), interleaved with the dense model
    in chunks of ``chunk``, and set ``table.factors[g]`` = measured ms saved ÷ predicted ms saved,
    shrunk toward 1 by the timing noise (``shrunk_factor``; the noise is the spread of the dense model's
    timings across chunks, at least ``NOISE`` of them). ``groups``: group → units. Savings of
    single cuts don't add up to a joint cut's, so last every group is cut together to about each of
    ``joint`` of its width and what these cuts saved is recorded (``calibration["joint"]``): the table
    maps its summed predictions through them (``LatencyTable.saving``). ``kwargs``: the example's keyword inputs."""
    rt = get_runtime(table.meta["key_fields"]["runtime"])
    batch, threads = table.meta["key_fields"]["batch"], table.meta["key_fields"]["threads"]
    wrap, inputs = positional(inputs, kwargs)
    x = batched(inputs, batch)
    dense = wrap(dense)

    def cut(widths: dict[str, int]) -> nn.Module:
        return wrap(deploy(widths))
    todo = [(g, w) for g, size in groups.items() if (w := probe_width(table, g, size, fraction)) is not None]
    table.factors, table.calibration, record = {}, {}, {}
    for i in range(0, len(todo), chunk):
        part = todo[i:i + chunk]
        if progress:
            progress(f"calibrating groups {i + 1}–{i + len(part)} of {len(todo)} end to end")
        runs = [rt.prepare(dense, x, threads)] + [rt.prepare(cut({g: w}), x, threads) for g, w in part]
        secs = time_interleaved(runs, rounds, stat="min")
        for (g, w), sec in zip(part, secs[1:]):
            record[g] = {"width": w, "size": groups[g], "dense_ms": secs[0] * 1e3, "cut_ms": sec * 1e3,
                         "predicted_saved_ms": table.dense_ms - table.predict({g: w})}
    dense_ms = sorted({r["dense_ms"] for r in record.values()})
    noise = max(float(np.std(dense_ms)), NOISE * dense_ms[0]) if dense_ms else 0.0
    for r in record.values():
        r["factor"] = shrunk_factor(r["dense_ms"] - r["cut_ms"], r["predicted_saved_ms"], noise)
    table.factors = {g: r["factor"] for g, r in record.items()}
    table.calibration = {"groups": record, "fraction": fraction, "rounds": rounds, "noise_ms": noise}
    cuts = [(f, {g: w for g, size in groups.items() if (w := probe_width(table, g, size, f)) is not None})
            for f in joint]
    cuts = [(f, widths) for f, widths in cuts if widths]
    if not cuts:
        return
    if progress:
        progress(f"calibrating all groups cut together end to end ({', '.join(f'{f:.0%}' for f, _ in cuts)})")
    secs = time_interleaved([rt.prepare(dense, x, threads)] + [rt.prepare(cut(w), x, threads) for _, w in cuts],
                            rounds, stat="min")
    table.calibration["joint"] = [{"fraction": f, "dense_ms": secs[0] * 1e3, "cut_ms": sec * 1e3,
                                   "predicted_saved_ms": table.raw_saved(widths),
                                   "measured_saved_ms": (secs[0] - sec) * 1e3}
                                  for (f, widths), sec in zip(cuts, secs[1:])]


def _measure_ops(ops: list[Op], sizes: dict[str, int], rt: Runtime, batch: int, threads: int,
                 points: int, rounds: int, progress: Progress | None, kernel: bool
                 ) -> tuple[dict[str, dict[str, dict[int, float]]], dict[str, float]]:
    """Time each distinct (op signature, side, width) once, interleaved per op; ms (``kernel``: the op's own
    kernel time, ``Runtime.prepare_op``; else end to end)."""
    done: dict[tuple[str, str, int], float] = {}
    curves: dict[str, dict[str, dict[int, float]]] = {}
    full: dict[str, float] = {}
    for i, op in enumerate(ops):
        if progress:
            progress(f"profiling op {i + 1}/{len(ops)} ({op.name})")
        c_in = op.x_shape[-1] if op.kind == "linear" else op.x_shape[1]
        c_out = op.w_shape[0]
        k = op.in_per_unit
        sides = {"both": (op.out_group, c_out)} if op.depthwise else \
            {s: (g, n) for s, g, n in (("in", op.in_group, c_in // k), ("out", op.out_group, c_out)) if g}
        grid = {side: [w for w in candidate_widths(n, points, rt.multiple) if w != n] for side, (g, n) in sides.items()}
        jobs = [("full", c_out)] + [(side, w) for side, ws in grid.items() for w in ws]
        todo = [j for j in jobs if (op.signature(), *j) not in done]
        runs, prepare = [], rt.prepare_op if kernel else rt.prepare
        for side, w in todo:
            ci = w * (k if side == "in" else 1) if side in ("in", "both") else c_in
            co = w if side in ("out", "both") else c_out
            try:
                module, x = op.module(ci, co, batch)
                runs.append(prepare(module, (x,), threads))
            except Exception as err:  # noqa: BLE001 - a variant we built wrongly is our bug
                raise InternalError(f"could not build {op.name} at {side} width {w} on {rt.name}: "
                                    f"{type(err).__name__}: {str(err).strip()[:200]}", op=op.__dict__) from err
        secs = time_interleaved(runs, rounds, stat="min")
        if kernel:
            secs = [run.kernel_s() for run in runs]
        for job, sec in zip(todo, secs):
            done[(op.signature(), *job)] = sec * 1e3
        full[op.name] = done[(op.signature(), "full", c_out)]
        curves[op.name] = {side: {**{w: done[(op.signature(), side, w)] for w in grid[side]}, n: full[op.name]}
                           for side, (g, n) in sides.items()}
    return curves, full


def measure(rt: Runtime | str, models: dict[str, nn.Module], inputs: tuple[Any, ...], batch: int = 1,
            threads: int | None = None, rounds: int = 5, kwargs: dict[str, Any] | None = None) -> dict[str, float]:
    """Median end-to-end ms of each model on the runtime, timed interleaved (``kwargs``: the example's keyword
    inputs, see ``positional``)."""
    rt = get_runtime(rt) if isinstance(rt, str) else rt
    wrap, inputs = positional(inputs, kwargs)
    x = batched(inputs, batch)
    runs = [rt.prepare(wrap(m), x, threads or os.cpu_count() or 1) for m in models.values()]
    return {name: sec * 1e3 for name, sec in zip(models, time_interleaved(runs, rounds))}


def parse_target(value: float | str) -> tuple[str, float]:
    """``0.5`` → ("fraction", 0.5); ``"12ms"`` / ``"0.012s"`` → ("ms", 12.0)."""
    text = str(value).strip().lower()
    try:
        if text.endswith("ms"):
            kind, v = "ms", float(text[:-2])
        elif text.endswith("s"):
            kind, v = "ms", float(text[:-1]) * 1e3
        else:
            kind, v = "fraction", float(text)
    except ValueError:
        raise InputError(f"--target-latency {value} is not a fraction or a time",
                         "write e.g. --target-latency 0.5 (of the dense latency) or 12ms") from None
    if not math.isfinite(v) or v <= 0 or (kind == "fraction" and v > 1):
        raise InputError(f"--target-latency {value} is outside (0, 1] (fraction) or not a positive time",
                         "write e.g. --target-latency 0.5 or 12ms")
    return kind, v


def describe_staircase(table: LatencyTable, limit: int = 12) -> list[str]:
    """One line per group: dense width, its latency span, the widths where latency steps."""
    groups = sorted({g for op in table.ops for g in (op.in_group, op.out_group) if g})
    lines = []
    for g in groups:
        curve = table.group_curve(g)
        if not curve:
            continue
        lo, hi = min(curve.values()), max(curve.values())
        steps = table.staircase(g)
        shown = ", ".join(map(str, steps[:limit])) + (" …" if len(steps) > limit else "")
        lines.append(f"{g}: {table.sizes.get(g, max(curve))} units, model {lo:.3g}–{hi:.3g} ms over "
                     f"{len(curve)} widths; steps at {shown or 'none'}")
    return lines


def measured_report(info: dict[str, Any], dense: nn.Module, pruned: nn.Module, inputs: tuple[Any, ...],
                    rounds: int = 5, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The compile report's latency entry: what the selection predicted and what the runtime
    measured for the dense and the pruned model, timed interleaved in this run."""
    out = {k: info.get(k) for k in ("runtime", "batch", "threads", "mode", "target_ms", "table", "calibrated")}
    out["predicted_ms"] = info["predicted_ms"]
    out["predicted_ratio"] = info["predicted_ms"] / info["dense_ms"] if info["dense_ms"] else None
    try:
        ms = measure(info["runtime"], {"dense": dense, "pruned": pruned}, inputs, info["batch"],
                     info["threads"], rounds, kwargs)
    except Exception as err:  # noqa: BLE001 - the pruned model is verified; only the timing failed
        out.update(measured_ms=None, reason=f"{type(err).__name__}: {str(err).strip()[:200]}")
        return out
    out.update(dense_ms=ms["dense"], measured_ms=ms["pruned"], measured_ratio=ms["pruned"] / ms["dense"],
               rounds=rounds, load=_load())
    return out


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None
