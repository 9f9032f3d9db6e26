"""--target onnx: the pruned model as ONNX, checked with onnx.checker and onnxruntime.

Exporter: ``torch.onnx.export(dynamo=True)`` on ``result.model`` (then ``result.program``), falling
back to the TorchScript exporter. Batch is dynamic; so is the sequence axis of 2-D integer inputs.
onnx-graphsurgeon (if installed) folds constants and drops dead nodes.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from prunec.atomic import atomic_path
from prunec.backends import register_backend
from prunec.backends.sparsity import apply_from_options
from prunec.errors import BackendError, InternalError, MissingDependency

DEFAULT_OPSET = 18
REL_TOL = 1e-3
BIG_ONNX = 1_900_000_000   # bytes: past this, weights go to external data (protobuf's limit is 2 GB)


@register_backend("onnx", ".onnx")
def write_onnx(result: Any, out: str | Path, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``out`` (.onnx); apply 2:4 first if asked; refuse if onnxruntime disagrees with torch."""
    options = options or {}
    sparsity = apply_from_options(result, options)
    with atomic_path(Path(out)) as tmp:
        report = export_onnx(result, tmp, options.get("opset") or DEFAULT_OPSET)
    report.update(artifact=str(out), sparsity=sparsity)
    return report


def export_onnx(result: Any, path: Path, opset: int = DEFAULT_OPSET) -> dict[str, Any]:
    """Export, clean up, check and run ``result`` as ONNX at ``path``; return the report."""
    onnx = _require("onnx")
    _require("onnxruntime")
    if opset < 17:
        raise BackendError(f"--opset {opset} is too old", "use --opset 17 or newer (default 18)")
    args, kwargs = tuple(result.example_inputs), dict(result.example_kwargs)
    notes: list[str] = []
    dynamic = getattr(result, "dynamic", None) is not None
    if not dynamic:
        notes.append("static input shapes: the pruned program is pinned to the example's shapes")
    exporter = _export(result, args, kwargs, path, opset, notes, dynamic)
    nodes_before = len(onnx.load(str(path), load_external_data=False).graph.node)
    notes.append(_cleanup(path))
    onnx.checker.check_model(str(path))
    model = onnx.load(str(path), load_external_data=False)
    abs_err, rel_err = compare_with_torch(result, path, args, kwargs)
    if dynamic:  # the flexible axes must really work: run another batch size in onnxruntime too
        args3, kwargs3 = pytree.tree_map(_other_batch, (args, kwargs))
        abs3, rel3 = compare_with_torch(result, path, args3, kwargs3)
        abs_err, rel_err = max(abs_err, abs3), max(rel_err, rel3)
    report = {"target": "onnx", "exporter": exporter, "opset": _opset(model),
              "inputs": _io_shapes(model.graph.input), "outputs": _io_shapes(model.graph.output),
              "nodes": len(model.graph.node), "nodes_before_cleanup": nodes_before,
              "bytes": _size(path), "runtime": "onnxruntime CPU", "max_abs_err": abs_err,
              "rel_err": rel_err, "notes": [n for n in notes if n]}
    if not rel_err <= REL_TOL:
        raise BackendError(f"onnxruntime output differs from torch by rel. err {rel_err:.2e} "
                           f"(max abs {abs_err:.2e}, limit {REL_TOL:g})",
                           "try another --opset, or --target torch; please report the model")
    return report


def _require(package: str) -> Any:
    try:
        return __import__(package)
    except ImportError as err:
        raise MissingDependency(package, "onnx") from err


def _export(result: Any, args: tuple, kwargs: dict, path: Path, opset: int, notes: list[str],
            dynamic: bool = True) -> str:
    """Try dynamo on model, dynamo on program, then TorchScript on model; return what worked."""
    errors = []
    for name, module, dynamo in (("dynamo(model)", result.model, True),
                                 ("dynamo(program)", result.program, True),
                                 ("torchscript(model)", result.model, False)):
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                _export_one(module.eval(), args, kwargs, path, opset, dynamo, dynamic)
            if errors:
                notes.append("fell back to " + name + " after: " + "; ".join(errors))
            return name
        except Exception as err:  # noqa: BLE001 - every exporter failure is reported below
            cause = err.__cause__ or err
            errors.append(f"{name}: {type(cause).__name__}: {str(cause).strip()[:300]}")
    raise BackendError("ONNX export failed: " + " | ".join(errors), "try --target torch or executorch")


def _export_one(module: torch.nn.Module, args: tuple, kwargs: dict, path: Path, opset: int,
                dynamo: bool, dynamic: bool = True) -> None:
    names = [f"input_{i}" for i in range(len(_tensor_leaves((args, kwargs))))]
    axes = {n: _dynamic_dims(t) if dynamic else [] for n, t in zip(names, _tensor_leaves((args, kwargs)))}
    if dynamo and not dynamic:
        onnx_program = torch.onnx.export(module, args, kwargs=kwargs or None, dynamo=True,
                                         opset_version=opset, verbose=False, optimize=True)
        onnx_program.save(str(path))
    elif dynamo:
        # torch.export specialises size-1 dims: export a batch of 2 so the batch axis stays dynamic
        args2, kwargs2 = pytree.tree_map(_double_batch, (args, kwargs))
        dims = pytree.tree_map(lambda t: {d: torch.export.Dim.AUTO for d in _dynamic_dims(t)}
                               if isinstance(t, torch.Tensor) else None, (args2, kwargs2))
        shapes = (*dims[0], *dims[1].values())   # positional args, then kwargs in order
        onnx_program = torch.onnx.export(module, args2, kwargs=kwargs2 or None, dynamo=True,
                                         opset_version=opset, dynamic_shapes=shapes, verbose=False,
                                         optimize=True)
        onnx_program.save(str(path))
    else:
        torch.onnx.export(module, args if not kwargs else (*args, kwargs), str(path), dynamo=False,
                          opset_version=opset, input_names=names,
                          dynamic_axes={n: {d: f"{n}_dim{d}" for d in dims} for n, dims in axes.items()})


def _tensor_leaves(tree: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _dynamic_dims(t: torch.Tensor) -> list[int]:
    """Batch for every input; also the sequence axis of a 2-D integer input (token ids, masks)."""
    if t.dim() == 0:
        return []
    return [0, 1] if t.dim() == 2 and not t.is_floating_point() else [0]


def _other_batch(t: Any) -> Any:
    """The example at batch + 1 (and, for token inputs, one token shorter) with fresh values."""
    if not isinstance(t, torch.Tensor) or not t.dim():
        return t
    t = torch.cat([t, t[:1]])
    if t.dim() == 2 and not t.is_floating_point() and t.shape[1] > 2:
        t = t[:, :-1]
    return t + 0.1 * torch.randn_like(t) if t.is_floating_point() else t


def _double_batch(t: Any) -> Any:
    return torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 1 else t


def _cleanup(path: Path) -> str:
    """fold_constants().cleanup().toposort() with onnx-graphsurgeon, or say why it was skipped."""
    try:
        import onnx
        import onnx_graphsurgeon as gs
    except ImportError:
        return "onnx-graphsurgeon not installed: graph cleanup skipped (pip install onnx-graphsurgeon)"
    graph = gs.import_onnx(onnx.load(str(path)))
    graph.fold_constants().cleanup().toposort()
    model = gs.export_onnx(graph)
    big = model.ByteSize() > BIG_ONNX
    onnx.save(model, str(path), save_as_external_data=big)
    return ""


def to_fp16(model: Any) -> Any:
    """``model`` (an ONNX ModelProto) with FP16 weights and activations and FP32 inputs and outputs, what a strongly
    typed TensorRT FP16 engine is built from (onnxconverter-common; FP16's full range, not its 1e4 default; no
    shape inference past protobuf's 2 GB, which it would serialise the model for)."""
    try:
        from onnxconverter_common import float16
    except ImportError as err:
        raise MissingDependency("onnxconverter_common", "onnx") from err
    return float16.convert_float_to_float16(model, keep_io_types=True, max_finite_val=65504.0,
                                            disable_shape_infer=model.ByteSize() > BIG_ONNX)


def compare_with_torch(result: Any, path: Path, args: tuple, kwargs: dict) -> tuple[float, float]:
    import onnxruntime as ort

    from prunec.verify import compare

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    leaves = _tensor_leaves((args, kwargs))
    names = [i.name for i in sess.get_inputs()]
    if len(names) != len(leaves):
        raise InternalError(f"the ONNX model takes {len(names)} inputs but the example has {len(leaves)}")
    outs = sess.run(None, {n: t.detach().cpu().numpy() for n, t in zip(names, leaves)})
    with torch.no_grad():
        ref = _tensor_leaves(result.model(*args, **kwargs))
    if len(ref) != len(outs):
        raise InternalError(f"the ONNX model has {len(outs)} outputs, torch {len(ref)}")
    return compare([torch.from_numpy(o) for o in outs], ref)


def _io_shapes(values: Any) -> dict[str, list[int | str]]:
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}


def _opset(model: Any) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _size(path: Path) -> int:
    """Bytes of the model file plus its external-data files (named after it) if any."""
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())
