"""--target coreml: an .mlpackage (ML Program) via coremltools, fp16, iOS16+ by default.

Input: the pruned program re-exported and decomposed with the default table minus ``aten.linear``
(n:m sparsity only applies to linear/conv ops). ``--sparsity 2:4`` uses coremltools'
``OpMagnitudePrunerConfig(n_m_ratio=(2, 4))``. Prediction needs macOS: elsewhere the saved package
is reloaded without compiling it and its spec (inputs, outputs, weight ops) is checked instead.
"""
from __future__ import annotations

import platform
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from prunec.atomic import atomic_path
from prunec.backends import register_backend
from prunec.backends.sparsity import parse_pattern
from prunec.errors import BackendError, InternalError, MissingDependency, first_line

WEIGHT_OPS = ("const", "constexpr_sparse_to_dense", "constexpr_lut_to_dense", "constexpr_affine_dequantize",
              "constexpr_blockwise_shift_scale", "constexpr_sparse_blockwise_shift_scale")


@register_backend("coreml", ".mlpackage", directory=True)
def write_coreml(result: Any, out: str | Path, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``out`` (.mlpackage directory) and check its spec."""
    try:
        import coremltools as ct
    except ImportError as err:
        raise MissingDependency("coremltools", "coreml") from err
    options = options or {}
    out = Path(out)
    target_name = options.get("coreml_target") or "iOS16"
    target = getattr(ct.target, target_name, None)
    if target is None or not target_name.startswith(("iOS", "macOS", "watchOS", "tvOS")):
        raise BackendError(f"--coreml-target {target_name} is unknown", "use e.g. iOS16, iOS17, iOS18, macOS13")
    sparse = parse_pattern(options.get("sparsity")) is not None
    if sparse and (options.get("sparsity_method") or "magnitude") != "magnitude":
        raise BackendError("Core ML 2:4 sparsity is chosen by coremltools' magnitude pruner",
                           "use --sparsity-method magnitude with --target coreml")
    notes: list[str] = []
    try:
        mlmodel = _convert(ct, result.export(), target)
    except BackendError as err:
        if result.dynamic is None:
            raise
        mlmodel = _convert(ct, result.export(static=True), target)
        notes.append(f"Core ML package has the example's fixed shapes: with a flexible batch {err.message}")
    if sparse:
        from coremltools.optimize.coreml import OpMagnitudePrunerConfig, OptimizationConfig, prune_weights
        mlmodel = prune_weights(mlmodel, config=OptimizationConfig(
            global_config=OpMagnitudePrunerConfig(n_m_ratio=(2, 4))))
    with atomic_path(out) as tmp:
        mlmodel.save(str(tmp))
    report = {"target": "coreml", "artifact": str(out), "bytes": _dir_size(out),
              "minimum_deployment_target": target_name, "precision": "fp16",
              "sparsity": "2:4 (coremltools OpMagnitudePrunerConfig)" if sparse else None}
    report.update(_check_spec(ct, out, result))
    if notes:
        report["notes"] = notes
    return report


def _convert(ct: Any, ep: torch.export.ExportedProgram, target: Any) -> Any:
    """ExportedProgram → ML program (fp16); dynamic dims become flexible Core ML shapes."""
    tbl = torch.export.default_decompositions()
    del tbl[torch.ops.aten.linear.default]
    try:
        return ct.convert(ep.run_decompositions(tbl), minimum_deployment_target=target, convert_to="mlprogram",
                          compute_precision=ct.precision.FLOAT16)
    except Exception as err:  # noqa: BLE001 - the converter raises many types; report the first line
        raise BackendError(f"coremltools could not convert the model: {first_line(err, 300)}",
                           "try --target onnx or executorch") from err


def _check_spec(ct: Any, path: Path, result: Any) -> dict[str, Any]:
    """Reload the package without compiling; compare I/O names and shapes with torch, count ops."""
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    inputs = {i.name: list(i.type.multiArrayType.shape) for i in spec.description.input}
    flexible = {i.name: [[int(r.lowerBound), int(r.upperBound)] for r in i.type.multiArrayType.shapeRange.sizeRanges]
                for i in spec.description.input if i.type.multiArrayType.HasField("shapeRange")}
    outputs = [o.name for o in spec.description.output]
    example = [t for t in pytree.tree_leaves((result.example_inputs, result.example_kwargs))
               if isinstance(t, torch.Tensor)]
    with torch.no_grad():
        ref = [t for t in pytree.tree_leaves(result.model(*result.example_inputs, **result.example_kwargs))
               if isinstance(t, torch.Tensor)]
    fixed = lambda shapes: [[s for d, s in enumerate(shape) if d != 0] for shape in shapes]  # noqa: E731
    if fixed(t.shape for t in example) != fixed(inputs.values()) or len(outputs) != len(ref):
        raise InternalError(f"the Core ML package's inputs {inputs} / {len(outputs)} outputs do not match "
                           f"torch's {[list(t.shape) for t in example]} / {len(ref)}")
    ops: Counter[str] = Counter()
    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            ops.update(op.type for op in block.operations)
    report = {"inputs": inputs, "flexible_shapes": flexible, "outputs": outputs, "ops": sum(ops.values()),
              "weight_ops": {k: ops[k] for k in WEIGHT_OPS if ops[k]}}
    if platform.system() != "Darwin":
        report["prediction"] = ("skipped: Core ML prediction is only supported on macOS; checked the saved "
                                "spec instead (input/output names and shapes, op counts)")
        return report
    # macOS only (not exercised on the Linux CI): run the package and compare with torch
    from prunec.verify import compare
    pred = ct.models.MLModel(str(path)).predict({n: t.numpy() for n, t in zip(inputs, example)})
    report["max_abs_err"], report["rel_err"] = compare([torch.from_numpy(pred[n]) for n in outputs], ref)
    return report


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
