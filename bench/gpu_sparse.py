"""2:4 semi-structured speed on a CUDA GPU: the Linear layers of a pruned ViT-B/16, fp16, 1024 tokens.

    python bench/gpu_sparse.py [--channels 0.3] [--tokens 1024] [--json out.json]

Part 1: per Linear, ``F.linear(x, W)`` dense vs ``torch.sparse.to_sparse_semi_structured(W)`` (2:4
magnitude mask on the input axis), CUDA-event medians; layers the sparse kernels refuse are listed.
Part 2 (only if ``import tensorrt`` works): the prunec TensorRT folder for the 2:4 model, engines
built with and without SPARSE_WEIGHTS, and their median latency at batch 1.
Without a CUDA GPU it prints "no CUDA GPU: skipped" and exits 0.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F


def cuda_ms(fn: Callable[[], Any], reps: int = 50) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def linear_speed(model: torch.nn.Module, tokens: int) -> dict[str, Any]:
    from torch.sparse import to_sparse_semi_structured

    from prunec.backends.sparsity import _mask_2_4, check_2_4
    rows, refused, dense_total, sparse_total = [], {}, 0.0, 0.0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        w = mod.weight.detach().half().cuda()
        w = w * _mask_2_4(w.abs().float()).to(w.dtype)
        assert check_2_4(w.cpu(), 1)
        x = torch.randn(tokens, w.shape[1], device="cuda", dtype=torch.half)
        try:
            ws = to_sparse_semi_structured(w)
            err = float((F.linear(x, ws) - F.linear(x, w)).abs().max())
        except Exception as e:  # noqa: BLE001 - shape/dtype limits of the kernels: record and go on
            refused[name] = f"{list(w.shape)}: {type(e).__name__}: {str(e)[:120]}"
            continue
        d, s = cuda_ms(lambda: F.linear(x, w)), cuda_ms(lambda: F.linear(x, ws))
        dense_total, sparse_total = dense_total + d, sparse_total + s
        rows.append({"layer": name, "shape": list(w.shape), "dense_ms": round(d, 4), "sparse_ms": round(s, 4),
                     "speedup": round(d / s, 2), "max_abs_err": err})
    return {"tokens": tokens, "layers": rows, "refused": refused,
            "sum_dense_ms": round(dense_total, 3), "sum_sparse_ms": round(sparse_total, 3),
            "speedup_sum": round(dense_total / sparse_total, 2) if sparse_total else None}


def trt_latency(engine_path: Path, shape: list[int]) -> float:
    import tensorrt as trt
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    context = engine.create_execution_context()
    buffers = {}
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            context.set_input_shape(name, shape)
            buffers[name] = torch.randn(shape, device="cuda")
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if name not in buffers:
            buffers[name] = torch.empty(tuple(context.get_tensor_shape(name)), device="cuda")
        context.set_tensor_address(name, buffers[name].data_ptr())
    stream = torch.cuda.current_stream().cuda_stream
    return cuda_ms(lambda: context.execute_async_v3(stream))


def tensorrt_part(result: Any) -> dict[str, Any]:
    try:
        import tensorrt
    except ImportError:
        return {"skipped": "import tensorrt failed"}
    from prunec.backends import BACKENDS
    out: dict[str, Any] = {"tensorrt": tensorrt.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "trt"
        start = time.perf_counter()
        rep = BACKENDS["tensorrt"](result, folder, {"sparsity": "2:4"})  # builds the sparse engine here
        out["sparse_build_s"] = round(time.perf_counter() - start, 1)
        out["report"] = {k: rep[k] for k in ("engine", "engine_bytes", "trtexec") if k in rep}
        out["reason"] = rep.get("reason")
        dense_engine = folder / "dense.engine"
        start = time.perf_counter()
        run = subprocess.run([sys.executable, str(folder / "build_engine.py"), "--no-sparse",
                              "--engine", str(dense_engine)], capture_output=True, text=True)
        out["dense_build_s"] = round(time.perf_counter() - start, 1)
        if run.returncode:
            out["dense_build_error"] = run.stderr[-500:]
        shape = [1, 3, 224, 224]
        for label, path in (("sparse", folder / "model.engine"), ("dense", dense_engine)):
            if path.exists():
                out[f"{label}_engine_bytes"] = path.stat().st_size
                out[f"{label}_ms"] = round(trt_latency(path, shape), 4)
    if "sparse_ms" in out and "dense_ms" in out:
        out["speedup"] = round(out["dense_ms"] / out["sparse_ms"], 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", type=float, default=0.3)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA GPU: skipped")
        return 0
    import torchvision

    import prunec
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16().eval()
    result = prunec.compile(model, (torch.randn(1, 3, 224, 224),), channels=args.channels)
    report = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "channels": args.channels,
              "params": [result.report["params_before"], result.report["params_after"]],
              "linear_2_4": linear_speed(result.model, args.tokens), "tensorrt": tensorrt_part(result)}
    text = json.dumps(report, indent=1, default=str)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
