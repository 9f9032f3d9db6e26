"""2:4 semi-structured sparsity on the axis TensorRT's sparse kernels read, applied after pruning.

Lives in ``backends/`` (not ``passes/``): it is a weight transform applied to the already pruned
``CompileResult.model`` just before an artifact is written, it changes no shape and needs no
coupling ``State``. Weights are edited in place; ``r.model`` shares its tensors with ``r.program``.

Axis: Conv weight (O, I, kh, kw) → groups of 4 consecutive input channels (axis 1) at each
(o, kh, kw); Linear weight (out, in) → groups of 4 along ``in`` (axis 1, what a TensorRT Gemm with
transB reads). Layers whose input channels are not a multiple of 4, or fewer than 16, grouped convs,
``lm_head`` and Linears tied to an Embedding stay dense and are counted as skipped.

Methods (scores within each group of 4, the 2 lowest are zeroed):
  magnitude  |w|
  wanda      |w| · ‖x_i‖₂, x_i the i-th input channel on the calibration inputs (Sun et al., 2023)
  sparsegpt  column-wise OBS update with H = XᵀX (Frantar & Alistarh, 2023): the mask of each
             group of 4 columns is chosen by w²/[H⁻¹]²_ii, the error is pushed onto later columns.
             Sequential by default (``sequential=True``, as in the paper and llmcompressor): the
             layers of each block of the model's block list (an LLM's decoder layers) are calibrated
             on the outputs of the already sparsified blocks before it (``prunec.sequential``); the
             layers outside the blocks, and models without a block list, get one forward of the
             whole model after that. ``sequential=False``: one forward for every layer.
             (wanda is sequential the same way.)
"""
from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from prunec.errors import InputError
from prunec.sequential import forward_sums, run_sequential

METHODS = ("magnitude", "wanda", "sparsegpt")
MIN_IN = 16


def check_2_4(weight: torch.Tensor, axis: int = 1) -> bool:
    """True if every group of 4 consecutive entries along ``axis`` holds at least 2 zeros."""
    w = torch.as_tensor(weight)
    if w.shape[axis] % 4:
        return False
    groups = w.movedim(axis, -1).reshape(-1, 4)
    return bool(((groups == 0).sum(dim=1) >= 2).all())


def parse_pattern(text: str | None) -> tuple[int, int] | None:
    """'2:4' → (2, 4); None/'' → None. Only 2:4 is supported (what TensorRT and cuSPARSELt run)."""
    if not text:
        return None
    if text.replace(" ", "") != "2:4":
        raise InputError(f"--sparsity {text} is not supported", "use --sparsity 2:4")
    return (2, 4)


def eligible_layers(model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """(name → layer to sparsify, name → reason it stays dense)."""
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    keep: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        in_ch = mod.weight.shape[1]
        if name.split(".")[-1] == "lm_head" or id(mod.weight) in tied:
            skipped[name] = "lm_head / tied embedding stays dense"
        elif isinstance(mod, nn.Conv2d) and mod.groups != 1:
            skipped[name] = f"grouped conv (groups={mod.groups})"
        elif in_ch % 4 or in_ch < MIN_IN:
            skipped[name] = f"{in_ch} input channels (need a multiple of 4, ≥ {MIN_IN})"
        else:
            keep[name] = mod
    return keep, skipped


def sparsify_2_4(model: nn.Module, method: str = "magnitude", calib: Iterable[Any] | None = None,
                 percdamp: float = 0.01, sequential: bool = True) -> dict[str, Any]:
    """Zero 2 of every 4 weights along the input axis of eligible Conv2d/Linear layers, in place.
    ``calib``: batches ``(args, kwargs)`` for wanda/sparsegpt; ``sequential``: block by block (see
    the module doc). Returns stats for the report."""
    if method not in METHODS:
        raise InputError(f"--sparsity-method {method} is unknown", f"use one of {', '.join(METHODS)}")
    layers, skipped = eligible_layers(model)
    batches = list(calib or [])
    if method != "magnitude" and not batches:
        raise InputError(f"--sparsity-method {method} needs calibration inputs", "use magnitude")
    uncalibrated: list[str] = []
    blocks: list[str] = []
    if method != "magnitude" and sequential:
        def process(path: str, block: nn.Module, inputs: list[Any]) -> None:
            inside = {n: m for n, m in layers.items() if n.startswith(path + ".")}
            stats, missing = _capture(block, inside, inputs, method)
            uncalibrated.extend(missing)
            _apply(inside, stats, method, percdamp)
        blocks = run_sequential(model, batches, process)
    rest = {n: m for n, m in layers.items() if not any(n.startswith(b + ".") for b in blocks)}
    stats, missing = _capture(model, rest, batches, method) if method != "magnitude" and rest else ({}, [])
    _apply(rest, stats, method, percdamp)
    uncalibrated.extend(missing)
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    total = sum(m.weight.numel() for m in layers.values())
    return {"pattern": "2:4", "method": method, "layers_sparsified": len(layers),
            "layers_skipped": len(skipped), "skipped": skipped,
            "mean_sparsity": round(zeros / total, 4) if total else 0.0,
            "calibration_batches": len(batches) if method != "magnitude" else 0,
            "sequential_blocks": len(blocks),
            # layers whose forward never ran (e.g. nn.MultiheadAttention.out_proj, used via its
            # .weight): their masks fell back to magnitude
            "uncalibrated": uncalibrated}


def _apply(layers: dict[str, nn.Module], stats: dict[str, torch.Tensor], method: str, percdamp: float) -> None:
    """Write each layer's 2:4-sparse weight (masks by ``method``, from the captured ``stats``)."""
    with torch.no_grad():
        for name, mod in layers.items():
            w = _to_groups_layout(mod.weight)
            if method == "sparsegpt":
                new = _sparsegpt(w, stats[name], percdamp)
            else:
                score = w.abs() * (stats[name].sqrt() if method == "wanda" else 1.0)
                new = w * _mask_2_4(score)
            mod.weight.copy_(_from_groups_layout(new, mod.weight.shape).to(mod.weight.dtype))


def _to_groups_layout(w: torch.Tensor) -> torch.Tensor:
    """(out, cols) float32 with columns ordered (kh, kw, in): groups of 4 columns = 4 input channels."""
    w = w.detach().float()
    return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1) if w.dim() == 4 else w.clone()


def _from_groups_layout(w: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if len(shape) == 4:
        o, i, kh, kw = shape
        return w.reshape(o, kh, kw, i).permute(0, 3, 1, 2)
    return w


def _mask_2_4(score: torch.Tensor) -> torch.Tensor:
    """Keep the 2 highest scores in each group of 4 consecutive columns."""
    groups = score.reshape(-1, 4)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(2, dim=1).indices, True)
    return keep.reshape(score.shape)


def _columns(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as rows of the (kh, kw, in)-ordered columns its weight multiplies."""
    x = x.detach().float()
    if isinstance(mod, nn.Linear):
        return x.reshape(-1, x.shape[-1])
    cols = F.unfold(x, mod.kernel_size, mod.dilation, mod.padding, mod.stride)  # (N, I*kh*kw, L)
    i, (kh, kw) = x.shape[1], mod.kernel_size
    cols = cols.reshape(x.shape[0], i, kh * kw, -1).permute(0, 3, 2, 1)        # (N, L, kh*kw, I)
    return cols.reshape(-1, kh * kw * i)


def _capture(model: nn.Module, layers: dict[str, nn.Module], batches: list[Any],
             method: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Run the calibration batches once; per layer: Σx² per column (wanda) or H = XᵀX (sparsegpt)."""
    acc: dict[str, torch.Tensor] = {}

    def add(name: str, mod: nn.Module, x: torch.Tensor) -> None:
        cols = _columns(mod, x)
        add = (cols * cols).sum(0) if method == "wanda" else cols.T @ cols
        acc[name] = acc[name] + add if name in acc else add

    forward_sums(model, layers, batches, add, acc)   # summed over the ranks' shards (prunec.distributed)
    missing = [name for name in layers if name not in acc]
    for name in missing:   # the batches never reached it: ones / identity H = magnitude
        cols = _to_groups_layout(layers[name].weight).shape[1]
        acc[name] = torch.ones(cols) if method == "wanda" else torch.eye(cols)
    return acc, missing


def _sparsegpt(w: torch.Tensor, hessian: torch.Tensor, percdamp: float, block: int = 128) -> torch.Tensor:
    """SparseGPT (Frantar & Alistarh, 2023, Alg. 1) with a 2:4 mask per group of 4 columns."""
    w, h = w.clone(), hessian.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += percdamp * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    cols = w.shape[1]
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, hinv1 = w[:, i1:i2].clone(), hinv[i1:i2, i1:i2]
        q1, err1 = torch.zeros_like(w1), torch.zeros_like(w1)
        mask = torch.zeros_like(w1, dtype=torch.bool)   # True = pruned
        for i in range(i2 - i1):
            if i % 4 == 0:
                score = w1[:, i:i + 4] ** 2 / torch.diag(hinv1)[i:i + 4].reshape(1, -1) ** 2
                mask.scatter_(1, i + score.topk(2, dim=1, largest=False).indices, True)
            col, d = w1[:, i], hinv1[i, i]
            q = torch.where(mask[:, i], torch.zeros_like(col), col)
            q1[:, i] = q
            e = (col - q) / d
            w1[:, i:] -= e.unsqueeze(1) @ hinv1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i1:i2] = q1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w


def apply_from_options(result: Any, options: dict[str, Any]) -> dict[str, Any] | None:
    """Apply ``options['sparsity']`` (e.g. '2:4') to ``result.model`` with ``options['sparsity_method']``,
    calibrated on the example inputs; None when no sparsity was asked for."""
    if parse_pattern(options.get("sparsity")) is None:
        return None
    calib = options.get("calib") or [(tuple(result.example_inputs), dict(result.example_kwargs))]
    return sparsify_2_4(result.model, options.get("sparsity_method") or "magnitude", calib,
                        sequential=options.get("sequential", True))
