"""The allocator's efficiency at a MACs target across random-weight draws: its costs, and how far any allocation goes.

    python bench/latency_allocator_seeds.py [--model mobilenet_v3_large] [--batch 8] [--target 0.25]
                                            [--seeds 0,1,2] [--runtime onnxruntime|executorch] [--points 8]
                                            [--costs curves,importance,macs,curves+macs --macs-weight 10]
                                            [--out bench/results/latency_allocator_seeds.json]

Per seed: the model's random weights drawn after ``torch.manual_seed(seed)`` (seed 0 = bench/latency_aware.py's
weights), the latency goal searched so the allocator's result has ``--target`` of the MACs (as
bench/latency_aware.py does), with each of the allocator's costs:

* ``curves``: the measured error curves (the default of ``--target-latency``);
* ``importance``: the importance scores alone (``sensitivity=False``);
* ``macs``: the MACs a cut removes (each op's MACs, counted on its standalone module, times the fraction of the
  group cut). Accuracy is ignored: the knapsack removes the most predicted latency per MAC, so this row is the
  most efficient allocation the table finds, the reference the others are held to;
* ``curves+macs``: the error curves plus ``--macs-weight`` × the fraction of the model's MACs the cut removes (the
  squared relative errors of the curves are 0–1): how much output error each step toward that reference costs.

Each result's relative logit error and top-1 agreement against the dense model are measured on
bench/latency_aware.py's 64 fixed synthetic images (its ``agreement``). Every result is timed interleaved with the
dense model on ``--runtime`` (1 thread; onnxruntime as bench/latency_aware.py's rows, ExecuTorch as
prunec.latency.measure deploys it). efficiency = speedup × MACs fraction.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
import latency_aware as la  # noqa: E402  (X, images(), agreement(), score(), search(), time_rows(), the MACs counter)

import prunec  # noqa: E402
from prunec.cost import count_macs  # noqa: E402
from prunec.latency import LatencyTable, profile  # noqa: E402
from prunec.passes import LatencySelect  # noqa: E402


class MacsCost(LatencySelect):
    """The allocator with the fraction of the model's MACs a cut removes as its cost (accuracy ignored), or with
    ``weight`` × that added to the measured error curves."""

    weight: float | None = None

    def _costs(self, state, table: LatencyTable, scores, info) -> dict[str, np.ndarray]:
        macs = {op.name: op_macs(op) for op in table.ops}
        total = sum(macs.values())
        curves = super()._costs(state, table, scores, info) if self.weight is not None else {}
        return {g: curves.get(g, 0.0) + (self.weight or 1.0) / total
                * sum(macs[op.name] for op in table.ops if g in (op.in_group, op.out_group))
                * (1 - np.arange(len(s) + 1) / len(s)) for g, s in scores.items()}


def op_macs(op) -> int:
    """MACs of one op at full width, batch 1, counted on its standalone module."""
    c_out = op.w_shape[0]
    c_in = op.w_shape[-1] if op.kind == "linear" else op.w_shape[1] * op.groups
    module, x = op.module(c_in, c_out, 1)
    return count_macs(module, (x,))


COSTS = {"curves": (LatencySelect, True), "importance": (LatencySelect, False), "macs": (MacsCost, True),
         "curves+macs": (MacsCost, True)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mobilenet_v3_large")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--target", type=float, default=0.25)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--runtime", default="onnxruntime", choices=("onnxruntime", "executorch"))
    ap.add_argument("--points", type=int, default=8)
    ap.add_argument("--costs", default="curves,importance,macs")
    ap.add_argument("--macs-weight", type=float, default=10.0, help="curves+macs: the weight of the MACs term")
    ap.add_argument("--out", default=str(la.ROOT / "bench" / "results" / "latency_allocator_seeds.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        torch.manual_seed(seed)
        base = getattr(torchvision.models, args.model)(weights=None).eval()
        coupling = prunec.analyze(base, (la.X,))
        table = profile(base, coupling.program, coupling, args.runtime, args.batch, 1, args.points, 5)
        dense_macs = la.old.macs_of(base)
        imgs = la.images(64)
        timed = {"dense": {"model": base, "macs_ratio": 1.0}}
        for cost in args.costs.split(","):
            select, sens = COSTS[cost]
            if cost == "curves+macs":
                select = type("CurvesPlusMacs", (MacsCost,), {"weight": args.macs_weight})

            def alloc(goal: float, select=select, sens: bool = sens) -> prunec.CompileResult:
                return prunec.compile(copy.deepcopy(base), la.X, passes=[la.score(), select(
                    args.runtime, target=goal, table=table, batch=args.batch, measure=False, sensitivity=sens)])
            goal, result, macs = la.search(alloc, dense_macs, args.target, args.iters, "goal")
            agree = la.agreement(base, result.model, imgs)
            timed[cost] = {"model": result.model, "macs_ratio": macs, "goal": goal,
                           "output_error": agree["rel_err"], "top1_agree": agree["top1_agree"]}
        ms = la.time_rows(timed, args.batch, 5, 1, Path(tempfile.mkdtemp()), args.runtime)
        for key, row in timed.items():
            if key == "dense":
                continue
            ratio = ms[key] / ms["dense"]
            rows.append({"seed": seed, "cost": key, "goal": row["goal"], "macs_ratio": row["macs_ratio"],
                         "latency_ratio": ratio, "efficiency": row["macs_ratio"] / ratio, "dense_ms": ms["dense"],
                         "output_error": row["output_error"], "top1_agree": row["top1_agree"]})
            print(f"seed {seed} cost {key:10}: goal {row['goal']:.3f} MACs {row['macs_ratio']:.3f} latency "
                  f"{ratio:.3f} efficiency {rows[-1]['efficiency']:.2f} output error {row['output_error']:.3f} "
                  f"top-1 agreement {row['top1_agree']:.2f}", flush=True)
    meta = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "torch": torch.__version__, "model": args.model, "batch": args.batch, "target": args.target,
            "runtime": args.runtime, "load": la.load()}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
