"""Artifacts for a model pruned part by part (``prunec.partial.PartsResult``: the whole model does not export).

No exported program exists, so the artifacts are written from the pruned module itself, the user's class:

* ``torch``: ``out.pt``, the pickled module (``torch.load(out, weights_only=False)``: unpickling runs the
  model's classes' code, so load only files you trust), and ``out.safetensors``, its state dict, which
  ``prunec.load_pruned(dense_model, path)`` puts into the user's dense model without reading any pickle.
* ``onnx``: the TorchScript-based exporter (``torch.onnx.export(dynamo=False)``, the one torchvision
  documents for its detectors), image height and width dynamic unless ``--static``.

Each artifact is loaded back and run against the pruned module (onnxruntime for ONNX, on the example and
on another image size); a difference beyond the tolerance is an error, no file is left.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.utils._pytree as pytree

from prunec.atomic import atomic_path
from prunec.backends.torch_backend import _save_weights
from prunec.errors import BackendError, InternalError
from prunec.verify import compare

REL_TOL = 1e-3
MIN_OPSET = 11  # torchvision's detectors export from opset 11


def write_torch_parts(result: Any, out: Path, options: dict[str, Any]) -> dict[str, Any]:
    """``out`` (.pt, pickled module) and ``out`` with .safetensors; both read back and compared."""
    from prunec.module_sync import load_pruned
    weights = out.with_suffix(".safetensors")
    args, kwargs = tuple(result.example_inputs), dict(result.example_kwargs)
    dense = getattr(options.get("loaded"), "model", None)
    with atomic_path(out) as tmp, atomic_path(weights) as tmp_weights:
        torch.save(result.model, tmp)
        _save_weights(result.model, tmp_weights)
        with torch.no_grad():
            want = result.model(*args, **kwargs)
            _, rel_pickle = compare(torch.load(tmp, weights_only=False)(*args, **kwargs), want)
            rel_weights = compare(load_pruned(dense, tmp_weights)(*args, **kwargs), want)[1] \
                if dense is not None else None
        for name, rel in (("the pickled module", rel_pickle), ("load_pruned(dense, safetensors)", rel_weights)):
            if rel is not None and not rel <= REL_TOL:
                raise InternalError(f"{name} read back differs from the pruned model by rel. err {rel:.3g}")
    return {"target": "torch", "artifact": str(out), "format": "pickled module (torch.save)",
            "load": "torch.load(path, weights_only=False)", "bytes": out.stat().st_size,
            "reload_rel_err": rel_pickle, "weights": str(weights),
            "weights_load": "prunec.load_pruned(dense_model, path)", "weights_reload_rel_err": rel_weights}


def write_onnx_parts(result: Any, out: Path, options: dict[str, Any]) -> dict[str, Any]:
    """``out`` (.onnx) by the TorchScript exporter, checked with onnx.checker and onnxruntime."""
    from prunec.backends.onnx_backend import _io_shapes, _opset, _require, _size
    onnx = _require("onnx")
    _require("onnxruntime")
    opset = options.get("opset") or 18
    if opset < MIN_OPSET:
        raise BackendError(f"--opset {opset} is too old for the TorchScript exporter", f"use --opset {MIN_OPSET} or newer")
    args, kwargs = tuple(result.example_inputs), dict(result.example_kwargs)
    leaves = _leaves((args, kwargs))
    names = [f"input_{i}" for i in range(len(leaves))]
    dynamic = {} if options.get("static") else {n: _spatial(t) for n, t in zip(names, leaves) if _spatial(t)}
    with atomic_path(out) as tmp:
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(result.model.eval(), args if not kwargs else (*args, kwargs), str(tmp),
                                  dynamo=False, opset_version=opset, input_names=names,
                                  dynamic_axes={n: {d: f"{n}_dim{d}" for d in dims} for n, dims in dynamic.items()})
        except Exception as err:  # noqa: BLE001 - the exporter raises many types
            cause = err.__cause__ or err
            raise BackendError(f"ONNX export (TorchScript exporter) failed: {type(cause).__name__}: "
                               f"{str(cause).strip()[:300]}", "use --target torch") from None
        onnx.checker.check_model(str(tmp))
        checks = {"example": _ort_vs_torch(result.model, tmp, args, kwargs)}
        if dynamic:
            other = pytree.tree_map(_other_size, (args, kwargs))
            checks["other_size"] = _ort_vs_torch(result.model, tmp, *other)
        model = onnx.load(str(tmp), load_external_data=False)
        report = {"target": "onnx", "artifact": str(out), "exporter": "torchscript(model)", "opset": _opset(model),
                  "inputs": _io_shapes(model.graph.input), "outputs": _io_shapes(model.graph.output),
                  "nodes": len(model.graph.node), "bytes": _size(tmp), "runtime": "onnxruntime CPU",
                  "checks": checks, "max_abs_err": max(c["max_abs_err"] for c in checks.values()),
                  "rel_err": max(c["rel_err"] for c in checks.values())}
        if not report["rel_err"] <= REL_TOL:
            raise BackendError(f"onnxruntime output differs from torch by rel. err {report['rel_err']:.2e} "
                               f"(limit {REL_TOL:g}; {checks})", "use --target torch; please report the model")
    return report


PARTS_WRITERS: dict[str, Callable[[Any, Path, dict[str, Any]], dict[str, Any]]] = {
    "torch": write_torch_parts, "onnx": write_onnx_parts}
PARTS_SUFFIX = {"torch": ".pt", "onnx": ".onnx"}


def _leaves(tree: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _spatial(t: torch.Tensor) -> list[int]:
    """The last two dims of an image-like input (float, ≥ 3-D): dynamic in the ONNX graph."""
    return [t.dim() - 2, t.dim() - 1] if t.is_floating_point() and t.dim() >= 3 else []


def _other_size(t: Any) -> Any:
    """An image-like input 16 px taller and 16 px narrower, fresh values."""
    if not isinstance(t, torch.Tensor) or not _spatial(t) or t.shape[-1] <= 16:
        return t
    shape = (*t.shape[:-2], t.shape[-2] + 16, t.shape[-1] - 16)
    return torch.rand(shape, dtype=t.dtype) * (t.max() - t.min()) + t.min()


def _ort_vs_torch(model: torch.nn.Module, path: Path, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Run the ONNX file in onnxruntime and the module in torch on the same inputs; every output compared
    (a different number of detections is a difference, not an error of ours)."""
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    leaves = _leaves((args, kwargs))
    got = sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), leaves)})
    with torch.no_grad():
        want = _leaves(model(*args, **kwargs))
    shapes = [tuple(t.shape) for t in want]
    if len(got) != len(want) or any(g.shape != s for g, s in zip(got, shapes)):
        raise BackendError(f"onnxruntime's outputs {[g.shape for g in got][:6]} differ in shape from torch's "
                           f"{shapes[:6]}", "use --target torch; please report the model")
    abs_err, rel_err = compare([torch.from_numpy(g) for g in got], want)
    return {"input_shapes": [list(t.shape) for t in leaves], "output_shapes": [list(s) for s in shapes],
            "output_elements": sum(t.numel() for t in want), "max_abs_err": abs_err, "rel_err": rel_err}
