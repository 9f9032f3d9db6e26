"""--target tensorrt: a directory with model.onnx, model_fp16.onnx, build_engine.py and trtexec.txt.

FP16 engines are built strongly typed from model_fp16.onnx (weights FP16, inputs and outputs FP32; converted by
onnxconverter-common and run in onnxruntime here): TensorRT 11 has no FP16 builder flag, and a strongly typed
network builds the same on TensorRT 10. ``--int8`` keeps TensorRT 10's implicit INT8 (model.onnx, builder flags).
An engine (model.engine) is built only where ``import tensorrt`` works and a CUDA GPU is present;
otherwise the report says ``"engine": null`` and why. SPARSE_WEIGHTS is set when 2:4 was applied.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from prunec.atomic import atomic_path
from prunec.backends import register_backend
from prunec.backends.onnx_backend import BIG_ONNX, DEFAULT_OPSET, compare_with_torch, export_onnx, to_fp16
from prunec.backends.sparsity import apply_from_options
from prunec.errors import MissingDependency, first_line

MAX_BATCH = 32

BUILD_ENGINE = '''"""Build a TensorRT engine from the ONNX written by prunec. Usage:
    python build_engine.py [--fp16/--no-fp16] [--int8] [--sparse] [--max-batch N] [--onnx PATH]
FP16 (default): model_fp16.onnx, strongly typed (TensorRT 10 and 11); --no-fp16: model.onnx, FP32.
--int8: model.onnx with TensorRT 10's INT8 and FP16 builder flags (TensorRT 11 builds INT8 only from Q/DQ
nodes); no calibration data or ranges are passed: layers without scales may stay FP16; for timing only."""
import argparse
import json
from pathlib import Path

import tensorrt as trt

HERE = Path(__file__).resolve().parent
DEFAULTS = json.loads({defaults!r})


def build(onnx_path, engine_path, fp16, int8, sparse, max_batch):
    fp16_onnx = HERE / "model_fp16.onnx"
    # TensorRT 10's precision flags (weak typing) for INT8, or FP16 without model_fp16.onnx; else strongly typed:
    # the ONNX's own precision, the only mode in TensorRT 11
    weak = int8 or (fp16 and not fp16_onnx.exists())
    if weak and not hasattr(trt.BuilderFlag, "FP16"):
        raise SystemExit(f"TensorRT {{trt.__version__}} has no precision flags: " + (
            "INT8 needs Q/DQ nodes (explicit quantization, e.g. NVIDIA ModelOpt); drop --int8 for FP16" if int8
            else "FP16 needs model_fp16.onnx, which prunec did not write (see its report)"))
    onnx_path = onnx_path or (fp16_onnx if fp16 and not weak else HERE / "model.onnx")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0 if weak else 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise SystemExit("\\n".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    config = builder.create_builder_config()
    if weak and fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if int8:
        config.set_flag(trt.BuilderFlag.INT8)
    if sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        inp = network.get_input(i)
        opt = [d if d >= 0 else s for d, s in zip(inp.shape, DEFAULTS["shapes"][i])]
        lo = [1 if d < 0 and k == 0 else v for k, (d, v) in enumerate(zip(inp.shape, opt))]
        hi = [max_batch if d < 0 and k == 0 else v for k, (d, v) in enumerate(zip(inp.shape, opt))]
        profile.set_shape(inp.name, lo, opt, hi)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise SystemExit("TensorRT could not build the engine (see the log above)")
    Path(engine_path).write_bytes(engine)
    return Path(engine_path).stat().st_size


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx", default=None, help="default: model_fp16.onnx (FP16), else model.onnx")
    ap.add_argument("--engine", default=str(HERE / "model.engine"))
    ap.add_argument("--fp16", action=argparse.BooleanOptionalAction, default=DEFAULTS["fp16"])
    ap.add_argument("--int8", action=argparse.BooleanOptionalAction, default=DEFAULTS["int8"])
    ap.add_argument("--sparse", action=argparse.BooleanOptionalAction, default=DEFAULTS["sparse"])
    ap.add_argument("--max-batch", type=int, default=DEFAULTS["max_batch"])
    a = ap.parse_args()
    size = build(a.onnx, a.engine, a.fp16, a.int8, a.sparse, a.max_batch)
    print(json.dumps({{"engine": a.engine, "bytes": size}}))
'''


@register_backend("tensorrt", "_trt", directory=True)
def write_tensorrt(result: Any, out: str | Path, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the directory ``out``; build model.engine only with TensorRT and a CUDA GPU."""
    options = options or {}
    out = Path(out)
    sparsity = apply_from_options(result, options)
    int8 = bool(options.get("int8"))
    with atomic_path(out) as tmp:
        tmp.mkdir()
        onnx_report = export_onnx(result, tmp / "model.onnx", options.get("opset") or DEFAULT_OPSET)
        fp16_report = _fp16_onnx(result, tmp / "model.onnx", tmp / "model_fp16.onnx")
        shapes = [list(t.shape) for t in _inputs(result)]
        defaults = {"fp16": True, "int8": int8, "sparse": sparsity is not None,
                    "max_batch": MAX_BATCH, "shapes": shapes}
        (tmp / "build_engine.py").write_text(BUILD_ENGINE.format(defaults=json.dumps(defaults)))
        command = _trtexec(out, onnx_report["inputs"], shapes, int8, sparsity is not None, fp16_report["written"])
        (tmp / "trtexec.txt").write_text(command + "\n")
        engine, reason = _maybe_build(tmp)
    report = {"target": "tensorrt", "artifact": str(out), "onnx": onnx_report,
              "files": ["model.onnx"] + (["model_fp16.onnx"] if fp16_report["written"] else [])
              + ["build_engine.py", "trtexec.txt"] + (["model.engine"] if engine else []), "fp16_onnx": fp16_report,
              "trtexec": command, "precision": "int8" if int8 else "fp16", "sparsity": sparsity,
              "engine": str(out / "model.engine") if engine else None, "engine_bytes": engine}
    if reason:
        report["reason"] = reason
    if int8:
        report["int8_note"] = ("no calibration data or dynamic ranges are passed to TensorRT: layers without INT8 "
                              "scales may stay FP16; the engine is for timing, not accuracy; TensorRT 10 only "
                              "(TensorRT 11 builds INT8 only from Q/DQ nodes)")
    return report


def _fp16_onnx(result: Any, fp32: Path, out: Path) -> dict[str, Any]:
    """model_fp16.onnx (FP16 weights and activations, FP32 inputs and outputs) for a strongly typed engine, and
    its error against torch in onnxruntime; ``written: false`` with the reason where the conversion fails (the
    FP16 engine then needs TensorRT 10's flag), ``checked: false`` where onnxruntime lacks an FP16 kernel."""
    import onnx
    try:
        half = to_fp16(onnx.load(str(fp32)))
        onnx.save(half, str(out), save_as_external_data=half.ByteSize() > BIG_ONNX)
    except MissingDependency:
        raise
    except Exception as err:  # noqa: BLE001 - the FP32 folder stays usable on TensorRT 10
        out.unlink(missing_ok=True)
        return {"written": False, "reason": first_line(err)}
    args, kwargs = tuple(result.example_inputs), dict(result.example_kwargs)
    try:
        abs_err, rel_err = compare_with_torch(result, out, args, kwargs)
    except Exception as err:  # noqa: BLE001 - onnxruntime CPU has no FP16 kernel for some ops; TensorRT does
        return {"written": True, "checked": False,
                "reason": f"onnxruntime could not run it: {first_line(err)}"}
    return {"written": True, "checked": True, "runtime": "onnxruntime CPU", "max_abs_err": abs_err,
            "rel_err": rel_err}


def _inputs(result: Any) -> list[Any]:
    import torch
    import torch.utils._pytree as pytree
    return [t for t in pytree.tree_leaves((result.example_inputs, result.example_kwargs))
            if isinstance(t, torch.Tensor)]


def _trtexec(out: Path, inputs: dict[str, list[Any]], shapes: list[list[int]], int8: bool, sparse: bool,
             fp16_onnx: bool) -> str:
    """The trtexec line equivalent to build_engine.py (shape ranges for each dynamic input): FP16 strongly typed
    from model_fp16.onnx (TensorRT 10 and 11), else TensorRT 10's precision flags on model.onnx."""
    strong = fp16_onnx and not int8
    precision = "--stronglyTyped" if strong else "--fp16" + (" --int8" if int8 else "")
    parts = [f"trtexec --onnx={out / ('model_fp16.onnx' if strong else 'model.onnx')} "
             f"--saveEngine={out / 'model.engine'} {precision}"]
    dynamic = [(n, s) for (n, dims), s in zip(inputs.items(), shapes) if any(isinstance(d, str) for d in dims)]
    if dynamic:
        fmt = lambda batch: ",".join(f"{n}:{'x'.join(map(str, [batch, *s[1:]]))}" for n, s in dynamic)  # noqa: E731
        parts.append(f"--minShapes={fmt(1)} --optShapes={fmt(dynamic[0][1][0])} --maxShapes={fmt(MAX_BATCH)}")
    if sparse:
        parts.append("--sparsity=enable")
    return " ".join(parts)


def _maybe_build(folder: Path) -> tuple[int | None, str | None]:
    """(engine bytes, None) when built here, else (None, why not). Never claims an engine it lacks."""
    try:
        import tensorrt  # noqa: F401
        has_trt = True
    except ImportError:
        has_trt = False
    import torch
    has_gpu = torch.cuda.is_available()
    if not (has_trt and has_gpu):
        missing = " / ".join(m for m, ok in (("tensorrt package not installed", has_trt),
                                             ("no CUDA GPU", has_gpu)) if not ok)
        return None, f"{missing}: wrote ONNX + build_engine.py + trtexec command"
    run = subprocess.run([sys.executable, str(folder / "build_engine.py")], capture_output=True, text=True)
    engine = folder / "model.engine"
    if run.returncode or not engine.exists():
        tail = (run.stderr or run.stdout).strip().splitlines()[-3:]
        return None, "TensorRT engine build failed: " + " | ".join(tail)
    return engine.stat().st_size, None
