"""Runtimes to time modules on: a small table of timers (onnxruntime, executorch, torch, tensorrt).

``RUNTIMES[name].prepare(module, x, threads)`` turns an ``nn.Module`` and its input into a
zero-argument callable that runs it once on that runtime; ``time_interleaved`` times several such
callables round by round (warm-up, order reversed every other round, medians).
"""
from __future__ import annotations

import bisect
import importlib
import importlib.util
import io
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from prunec.errors import InputError, InternalError

Run = Callable[[], Any]


@dataclass(frozen=True)
class Runtime:
    """A runtime to time on: the package it needs, the pip extra that installs it, a preparer."""

    name: str
    package: str
    extra: str
    prepare: Callable[[torch.nn.Module, tuple[torch.Tensor, ...], int], Run]
    note: str = ""
    multiple: int = 8   # the width grid the latency table times: the kernels' vector width in floats
    # a preparer whose run also reports the op's own kernel seconds (``OrtKernelRun``, ``EtKernelRun``), without
    # what a standalone model pays at its edges and the model around it does not (layout changes); None: wall time
    prepare_op: Callable[[torch.nn.Module, tuple[torch.Tensor, ...], int], Run] | None = None
    needs_cuda: bool = False   # runs on a CUDA GPU: refused without one; the GPU's name keys its latency tables

    def device(self) -> str:
        """What the runtime runs on beyond the host's CPU (the GPU's name), "" for CPU runtimes."""
        return _cuda_device() if self.needs_cuda else ""

    def version(self) -> str:
        mod = importlib.import_module(self.package)
        return str(getattr(mod, "__version__", "") or _dist_version(self.package))


def _dist_version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _onnx_bytes(module: torch.nn.Module, x: tuple[torch.Tensor, ...]) -> bytes:
    """The module as ONNX (TorchScript exporter, then dynamo), static shapes; input i is named ``input_i`` (an
    input the exporter drops leaves the others' names: ``_feed`` binds by name)."""
    buf = io.BytesIO()
    names = [f"input_{i}" for i in range(len(x))]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module.eval(), x, buf, dynamo=False, opset_version=17, input_names=names)
        except Exception:  # noqa: BLE001 - the dynamo exporter handles what TorchScript can't
            buf = io.BytesIO()
            torch.onnx.export(module.eval(), x, buf, dynamo=True, opset_version=18, verbose=False,
                              input_names=names)
    return buf.getvalue()


def _feed(name: str, x: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The input ``_onnx_bytes`` named ``name``."""
    if not name.startswith("input_") or not name[6:].isdigit() or int(name[6:]) >= len(x):
        raise InternalError(f"an ONNX input named '{name}' is not one of the {len(x)} inputs exported")
    return x[int(name[6:])]


def _ort_session(module: torch.nn.Module, x: tuple[torch.Tensor, ...], threads: int,
                 profile_prefix: str | None = None) -> tuple[Any, dict[str, Any]]:
    """An onnxruntime CPU session of the module (profiling into ``profile_prefix`` when given) and its feed."""
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    if profile_prefix:
        so.enable_profiling, so.profile_file_prefix = True, profile_prefix
    sess = ort.InferenceSession(_onnx_bytes(module, x), so, providers=["CPUExecutionProvider"])
    return sess, {i.name: _feed(i.name, x).detach().numpy() for i in sess.get_inputs()}


def _prepare_ort(module: torch.nn.Module, x: tuple[torch.Tensor, ...], threads: int) -> Run:
    sess, feed = _ort_session(module, x, threads)
    return lambda: sess.run(None, feed)


class OrtKernelRun:
    """An onnxruntime session run with its profiler on: ``kernel_s()`` is the fastest run's summed kernel
    time of every node but the layout reorders (``ReorderInput``/``ReorderOutput``, which a standalone
    conv pays at its edges: on MobileNetV3 at batch 8 they doubled the early layers' times, where the
    convs of the model run in its blocked layout back to back)."""

    SKIP = ("ReorderInput", "ReorderOutput")

    def __init__(self, module: torch.nn.Module, x: tuple[torch.Tensor, ...], threads: int) -> None:
        self._dir = tempfile.mkdtemp(prefix="prunec-ort-")
        # the profile folder goes with the run, read or not (a later variant's build may fail before kernel_s)
        self._remove_dir = weakref.finalize(self, shutil.rmtree, self._dir, ignore_errors=True)
        self._sess, self._feed = _ort_session(module, x, threads, os.path.join(self._dir, "op"))

    def __call__(self) -> Any:
        return self._sess.run(None, self._feed)

    def kernel_s(self) -> float:
        """Ends profiling (call once, after the runs)."""
        path = self._sess.end_profiling()
        try:
            events = json.loads(Path(path).read_text())
        finally:
            self._remove_dir()
        starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
        per_run = [0.0] * len(starts)
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") \
                    and e.get("args", {}).get("op_name") not in self.SKIP:
                i = bisect.bisect_right(starts, e["ts"]) - 1
                if i >= 0:
                    per_run[i] += e["dur"]
        if not per_run:
            raise InternalError("onnxruntime's profile recorded no run")
        return min(per_run) / 1e6


def _prepare_torch(module: torch.nn.Module, x: tuple[torch.Tensor, ...], threads: int) -> Run:
    module = module.eval()

    def run() -> Any:
        with torch.no_grad(), _threads(threads):
            return module(*x)
    return run


def _et_method(module: torch.nn.Module, x: tuple[torch.Tensor, ...], **load: Any) -> tuple[bytes, Any, Any]:
    """(program buffer, loaded program, forward method) of the module lowered to XNNPACK. The method points
    into the loaded program and its buffer: keep all three alive (without them the first execute after a
    garbage collection segfaults)."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime as EtRuntime
    with torch.no_grad():
        ep = torch.export.export(module.eval(), x)
    buffer = to_edge_transform_and_lower(ep, partitioner=[XnnpackPartitioner()]).to_executorch().buffer
    loaded = EtRuntime.get().load_program(buffer, **load)
    return buffer, loaded, loaded.load_method("forward")


def _prepare_executorch(module: torch.nn.Module, x: tuple[torch.Tensor, ...], threads: int) -> Run:
    buffer, loaded, method = _et_method(module, x)
    inputs = list(x)
    return lambda: (buffer, loaded) and method.execute(inputs)   # the closure keeps buffer and program alive


class EtKernelRun:
    """An ExecuTorch XNNPACK program run with ETDump on: ``kernel_s()`` is the fastest run's summed time of
    the delegate's ops but its layout transposes (NCHW↔NHWC, which a standalone op pays at its edges and a
    lowered model pays once: for a depthwise conv at 112², 0.40 ms of transposes around a 0.16 ms conv)."""

    def __init__(self, module: torch.nn.Module, x: tuple[torch.Tensor, ...], threads: int) -> None:
        self._buffer, self._loaded, self._method = _et_method(module, x, enable_etdump=True, debug_buffer_size=0)
        self._inputs = list(x)

    def __call__(self) -> Any:
        return self._method.execute(self._inputs)

    def kernel_s(self) -> float:
        """Call once, after the runs."""
        try:
            from executorch.devtools.etdump.serialize import deserialize_from_etdump_flatcc
        except ImportError as err:  # executorch.devtools imports pandas, which executorch's wheel does not declare
            raise InputError(f"ExecuTorch's ETDump reader could not be imported ({err})",
                             "install it with: pip install 'prunec[executorch]'") from err
        tmp = tempfile.mkdtemp(prefix="prunec-et-")
        try:
            path = os.path.join(tmp, "run.etdp")
            self._loaded.write_etdump_result_to_file(path, os.path.join(tmp, "debug.bin"))
            etdump = deserialize_from_etdump_flatcc(Path(path).read_bytes())
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        per_run = [sum(e.profile_event.end_time - e.profile_event.start_time for e in run.events
                       if e.profile_event and e.profile_event.name is None   # the delegate's own op events
                       and not (e.profile_event.delegate_debug_id_str or "").startswith("Transpose"))
                   for run in etdump.run_data if run.name == "Execute"]
        if not per_run:
            raise InternalError("ExecuTorch's ETDump recorded no run")
        return min(per_run) / 1e9


_TRT_TIMING_CACHE: list[Any] = []   # one TensorRT timing cache per process: tactics timed once per layer shape


def _trt_engine(module: torch.nn.Module, x: tuple[torch.Tensor, ...]) -> Any:
    """A TensorRT FP16 engine of the module's ONNX (static shapes) converted as ``--target tensorrt`` converts its
    model_fp16.onnx (FP32 inputs and outputs), strongly typed: TensorRT 11 has no FP16 builder flag, and a
    strongly typed network builds the same on 10 and 11."""
    import onnx
    import tensorrt as trt

    from prunec.backends.onnx_backend import to_fp16
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(to_fp16(onnx.load_from_string(_onnx_bytes(module, x))).SerializeToString()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InputError(f"TensorRT's ONNX parser refused the model ({errors})",
                         "this model does not run on TensorRT as exported: time it on --runtime onnxruntime")
    config = builder.create_builder_config()
    if not _TRT_TIMING_CACHE:
        _TRT_TIMING_CACHE.append(config.create_timing_cache(b""))
    config.set_timing_cache(_TRT_TIMING_CACHE[0], False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise InternalError("TensorRT built no engine for a model its parser accepted")
    return trt.Runtime(logger).deserialize_cuda_engine(plan)


def _prepare_tensorrt(module: torch.nn.Module, x: tuple[torch.Tensor, ...], threads: int) -> Run:
    """One synchronous run of the module's FP16 TensorRT engine (``_trt_engine``) on the first CUDA GPU, buffers
    kept on the GPU; ``threads`` does not apply."""
    import tensorrt as trt
    dtypes = {getattr(trt, name): getattr(torch, name) for name in
              ("float32", "float16", "bfloat16", "int32", "int64", "int8", "uint8", "bool") if hasattr(trt, name)}
    engine = _trt_engine(module, x)
    xs = tuple(t.detach().to("cuda") for t in x)
    context = engine.create_execution_context()
    tensors = []   # the buffers the context points at: kept alive by the closure
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dtype = dtypes[engine.get_tensor_dtype(name)]
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            t = _feed(name, xs).to(dtype).contiguous()
        else:
            t = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
        context.set_tensor_address(name, t.data_ptr())
        tensors.append(t)
    stream = torch.cuda.Stream()

    def run() -> Any:
        if not context.execute_async_v3(stream.cuda_stream):
            raise InternalError("TensorRT's execute_async_v3 failed")
        stream.synchronize()
        return engine, tensors
    return run


def _cuda_device() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA GPU"


@contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    if old == n:  # set_num_threads rebuilds the thread pool: only when it changes
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


RUNTIMES: dict[str, Runtime] = {
    "onnxruntime": Runtime("onnxruntime", "onnxruntime", "onnx", _prepare_ort,
                           "CPUExecutionProvider, ORT_ENABLE_ALL, sequential", prepare_op=OrtKernelRun),
    # XNNPACK's x86 f32 GEMM and depthwise kernels are 16 floats wide (8 on Arm): on an AVX2 host,
    # MobileNetV3 --channels 0.293 ran at 0.589 of dense with widths rounded to 16 (57.5 % MACs) and
    # 0.681 rounded to 8 (51.8 % MACs); docs/latency.md
    "executorch": Runtime("executorch", "executorch", "executorch", _prepare_executorch,
                          "XNNPACK delegate (its own thread pool: --threads is not applied)",
                          16 if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86") else 8,
                          prepare_op=EtKernelRun),
    "torch": Runtime("torch", "torch", "", _prepare_torch, "eager PyTorch CPU, torch.no_grad"),
    # FP16 engines, as --target tensorrt builds by default; widths in multiples of 8 (FP16 tensor-core tiles)
    "tensorrt": Runtime("tensorrt", "tensorrt", "tensorrt", _prepare_tensorrt,
                        "FP16 engine of the ONNX export, first CUDA GPU, synchronous runs", needs_cuda=True),
}


def get_runtime(name: str) -> Runtime:
    """The runtime called ``name``; an InputError if unknown or not installed."""
    if name not in RUNTIMES:
        raise InputError(f"unknown runtime '{name}'", f"use one of {sorted(RUNTIMES)}")
    rt = RUNTIMES[name]
    if importlib.util.find_spec(rt.package) is None:
        raise InputError(f"runtime '{name}' is not installed (no package '{rt.package}')",
                         f"install it with: pip install 'prunec[{rt.extra}]'"
                         + (" on a host with an NVIDIA GPU, or time on --runtime onnxruntime" if rt.needs_cuda else ""))
    if rt.needs_cuda and not torch.cuda.is_available():
        raise InputError(f"runtime '{name}' needs a CUDA GPU and torch sees none",
                         "run on a host with an NVIDIA GPU and CUDA-enabled torch, or time on --runtime onnxruntime")
    return rt


def time_interleaved(runs: list[Run], rounds: int = 5, warmup: int = 2,
                     min_sample_s: float = 0.002, stat: str = "median") -> list[float]:
    """Seconds per call of each run (the median, or with ``stat="min"`` the fastest sample): warm-up,
    then ``rounds`` rounds over all runs (order reversed every other round); a fast run is repeated
    within a sample to ≥ ``min_sample_s``. Short kernels on a shared host: preemption only adds time,
    so their minimum is the steadier estimate."""
    inner = []
    for run in runs:
        start = time.perf_counter()
        for _ in range(warmup):
            run()
        once = max((time.perf_counter() - start) / max(warmup, 1), 1e-7)
        inner.append(max(1, min(100, int(min_sample_s / once))))
    samples: list[list[float]] = [[] for _ in runs]
    order = list(range(len(runs)))
    for rnd in range(rounds):
        for i in (order if rnd % 2 == 0 else order[::-1]):
            start = time.perf_counter()
            for _ in range(inner[i]):
                runs[i]()
            samples[i].append((time.perf_counter() - start) / inner[i])
    pick = min if stat == "min" else statistics.median
    return [pick(s) for s in samples]
