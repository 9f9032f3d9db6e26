"""--target executorch: a .pte lowered to XNNPACK, run in executorch.runtime and compared with torch.

Tested pairing: executorch 1.5.1 with torch 2.14.1 (installed with ``pip install executorch==1.5.1
--no-deps`` plus ruamel.yaml, tabulate and torchao 0.18.0 --no-deps, so pip cannot move torch).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from prunec.atomic import atomic_path
from prunec.backends import register_backend
from prunec.errors import BackendError, MissingDependency, first_line

REL_TOL = 1e-3
PAIRING = "executorch 1.5.1 with torch 2.14.1"


@register_backend("executorch", ".pte")
def write_executorch(result: Any, out: str | Path, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``out`` (.pte); refuse if the ExecuTorch runtime disagrees with torch."""
    try:
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
        from executorch.runtime import Runtime
    except ImportError as err:
        raise MissingDependency("executorch", "executorch") from err
    out = Path(out)
    if (options or {}).get("sparsity"):
        raise BackendError("--sparsity 2:4 has no ExecuTorch (XNNPACK) kernel: the .pte would run dense",
                           "drop --sparsity, or use --target tensorrt / coreml")
    try:
        edge = to_edge_transform_and_lower(result.export(static=True), partitioner=[XnnpackPartitioner()])
        delegated, other = _count_delegation(edge.exported_program().graph)
        program = edge.to_executorch()
    except Exception as err:  # noqa: BLE001 - exir raises many types; name the pairing that works
        raise BackendError(f"ExecuTorch lowering failed: {first_line(err, 300)}",
                           f"tested pairing is {PAIRING}; try --target onnx") from err
    with atomic_path(out) as tmp:
        tmp.write_bytes(program.buffer)
        abs_err, rel_err = _run(Runtime, tmp, result)
    report = {"target": "executorch", "artifact": str(out), "bytes": out.stat().st_size,
              "delegate": "XNNPACK", "delegated_calls": delegated, "undelegated_ops": other,
              "runtime": "executorch.runtime (CPU)", "max_abs_err": abs_err, "rel_err": rel_err,
              "notes": ["static shapes: the .pte takes the example's input shapes only (the .pt2 and ONNX "
                        "targets take any batch)"]}
    if not rel_err <= REL_TOL:
        raise BackendError(f"ExecuTorch output differs from torch by rel. err {rel_err:.2e}",
                           "try --target onnx; please report the model")
    return report


def _count_delegation(graph: torch.fx.Graph) -> tuple[int, dict[str, int]]:
    """(XNNPACK delegate calls, op name → count of ops left to the portable kernels)."""
    delegated, other = 0, {}
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if "call_delegate" in name:
            delegated += 1
        elif name != "getitem":
            other[name] = other.get(name, 0) + 1
    return delegated, other


def _run(runtime_cls: Any, path: Path, result: Any) -> tuple[float, float]:
    from prunec.verify import compare
    inputs = [t for t in pytree.tree_leaves((result.example_inputs, result.example_kwargs))
              if isinstance(t, torch.Tensor)]
    method = runtime_cls.get().load_program(str(path)).load_method("forward")
    outs = method.execute(inputs)
    with torch.no_grad():
        ref = [t for t in pytree.tree_leaves(result.model(*result.example_inputs, **result.example_kwargs))
               if isinstance(t, torch.Tensor)]
    return compare([o for o in outs if isinstance(o, torch.Tensor)], ref)
