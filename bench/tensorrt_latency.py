"""--runtime tensorrt on a CUDA GPU (issue 12): the timer runs the right engine, a latency table, a target.

    python bench/tensorrt_latency.py [--model mobilenet_v3_large] [--batch 8] [--points 4] [--target 0.5]
                                     [--json out.json]

1. The TensorRT timer's output against the FP16 torch model on the same input (binding order, precision).
2. A latency table profiled on TensorRT (engines per op and width; seconds and the dense time printed).
3. ``--target-latency``: predicted and measured ratio, verifier, and uniform ``--channels`` at the same MACs
   timed in the same run (speedup ÷ MACs cut for both).
4. The ``--target tensorrt`` folder of that result: its engine built here by build_engine.py (strongly typed
   from model_fp16.onnx), or the reason it was not.
Without ``import tensorrt`` or a CUDA GPU it prints why and exits 0. Random weights: latency only.
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
import latency as old  # noqa: E402  (bench/latency.py: the MACs counter)

import prunec  # noqa: E402
from prunec.backends import BACKENDS  # noqa: E402
from prunec.compiler import criterion  # noqa: E402
from prunec.errors import InputError  # noqa: E402
from prunec.latency import measure, profile  # noqa: E402
from prunec.passes import LatencySelect  # noqa: E402
from prunec.runtimes import get_runtime  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="mobilenet_v3_large")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--points", type=int, default=4, help="widths per group in the table")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--target", type=float, default=0.5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    try:
        rt = get_runtime("tensorrt")
    except InputError as err:
        print(f"skipped: {err.one_line()}")
        return
    out: dict = {"device": rt.device(), "tensorrt": rt.version(), "model": args.model, "batch": args.batch}
    torch.manual_seed(0)
    model = getattr(torchvision.models, args.model)(num_classes=1000).eval()
    x = torch.randn(1, 3, 224, 224)
    xb = x.expand(args.batch, -1, -1, -1).contiguous()

    with torch.no_grad():
        ref = copy.deepcopy(model).cuda().half()(xb.cuda().half()).float().cpu()
    _, tensors = rt.prepare(model, (xb,), 1)()
    got = tensors[-1].float().cpu()
    out["timer_rel_err"] = float((got - ref).norm() / ref.norm())
    print(f"{rt.device()}, TensorRT {rt.version()}: engine vs torch FP16 relative error {out['timer_rel_err']:.2e}")

    coupling = prunec.analyze(model, (x,))
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.time()
        table = profile(model, coupling.program, coupling, "tensorrt", args.batch, 1, args.points, args.rounds,
                        cache=Path(cache))
        out["table"] = {"ops": len(table.ops), "dense_ms": table.dense_ms, "seconds": round(time.time() - t0, 1)}
        print(f"table: {len(table.ops)} ops, dense {table.dense_ms:.3f} ms, {out['table']['seconds']} s")

        t0 = time.time()
        res = prunec.compile(copy.deepcopy(model), (x,), passes=[criterion("l1"), LatencySelect(
            "tensorrt", target=args.target, table=table, batch=args.batch, threads=1, rounds=args.rounds)])
        info = res.report["passes"]["latency_select"]
        dense_macs = old.macs_of(model)
        macs = old.macs_of(res.model) / dense_macs
        uni = prunec.compile(copy.deepcopy(model), (x,), channels=1 - macs ** 0.5)
        uni_macs = old.macs_of(uni.model) / dense_macs
        ms = measure("tensorrt", {"dense": model, "target": res.model, "uniform": uni.model}, (x,), args.batch,
                     1, args.rounds)
        out["target"] = {"goal": args.target, "predicted_ratio": info["predicted_ms"] / table.dense_ms,
                         "in_pass_measured": [t["measured_ratio"] for t in info.get("refine") or []],
                         "verify_passed": res.report["verify"]["passed"],
                         "compile_s": round(time.time() - t0, 1), "macs": macs,
                         "ratio_rerun": ms["target"] / ms["dense"],
                         "efficiency": macs * ms["dense"] / ms["target"],
                         "uniform": {"macs": uni_macs, "ratio": ms["uniform"] / ms["dense"],
                                     "efficiency": uni_macs * ms["dense"] / ms["uniform"]}}
        folder = Path(cache) / "trt"
        artifact = BACKENDS["tensorrt"](res, folder, {})
        out["folder"] = {k: artifact.get(k) for k in ("engine_bytes", "reason", "fp16_onnx", "trtexec")}
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
