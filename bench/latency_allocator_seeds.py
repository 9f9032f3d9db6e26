"""The allocator's efficiency at a MACs target across random-weight draws, with and without its error curves.

    python bench/latency_allocator_seeds.py [--model mobilenet_v3_large] [--batch 8] [--target 0.25]
                                            [--seeds 0,1,2] [--out bench/results/latency_allocator_seeds.json]

Per seed: the model's random weights drawn after ``torch.manual_seed(seed)`` (seed 0 = bench/latency_aware.py's
weights), the latency goal searched so the allocator's result has ``--target`` of the MACs (as
bench/latency_aware.py does), once with the measured error curves as costs (the default) and once with the
importance scores alone (``sensitivity=False``); every result timed interleaved with the dense model on
onnxruntime (1 thread). efficiency = speedup × MACs fraction.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
import latency_aware as la  # noqa: E402  (X, score(), search(), time_rows(), the MACs counter)

import prunec  # noqa: E402
from prunec.latency import profile  # noqa: E402
from prunec.passes import LatencySelect  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mobilenet_v3_large")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--target", type=float, default=0.25)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default=str(la.ROOT / "bench" / "results" / "latency_allocator_seeds.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        torch.manual_seed(seed)
        base = getattr(torchvision.models, args.model)(weights=None).eval()
        coupling = prunec.analyze(base, (la.X,))
        table = profile(base, coupling.program, coupling, "onnxruntime", args.batch, 1, 8, 5)
        dense_macs = la.old.macs_of(base)
        timed = {"dense": {"model": base, "macs_ratio": 1.0}}
        for sens in (True, False):
            def alloc(goal: float, sens: bool = sens) -> prunec.CompileResult:
                return prunec.compile(copy.deepcopy(base), la.X, passes=[la.score(), LatencySelect(
                    "onnxruntime", target=goal, table=table, batch=args.batch, measure=False, sensitivity=sens)])
            goal, result, macs = la.search(alloc, dense_macs, args.target, args.iters, "goal")
            timed[f"error curves {sens}"] = {"model": result.model, "macs_ratio": macs, "goal": goal}
        ms = la.time_rows(timed, args.batch, 5, 1, Path(tempfile.mkdtemp()))
        for key, row in timed.items():
            if key == "dense":
                continue
            ratio = ms[key] / ms["dense"]
            rows.append({"seed": seed, "error_curves": key.endswith("True"), "goal": row["goal"],
                         "macs_ratio": row["macs_ratio"], "latency_ratio": ratio,
                         "efficiency": row["macs_ratio"] / ratio, "dense_ms": ms["dense"]})
            print(f"seed {seed} error curves {key.endswith('True')!s:5}: goal {row['goal']:.3f} MACs "
                  f"{row['macs_ratio']:.3f} latency {ratio:.3f} efficiency {rows[-1]['efficiency']:.2f}", flush=True)
    meta = {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "torch": torch.__version__, "model": args.model, "batch": args.batch, "target": args.target}
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
