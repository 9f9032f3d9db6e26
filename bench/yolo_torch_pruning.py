"""Torch-Pruning's documented YOLOv8 recipe next to prunec, one-shot (no training), same models, same run.

Torch-Pruning's ``examples/yolov8/yolov8_pruning.py``: replace every ultralytics ``C2f`` by a ``C2f_v2`` (the
``cv1`` conv split into two convs, weights copied, so no ``chunk``), then a ``GroupNormPruner`` with
``GroupMagnitudeImportance``, the ``Detect`` head in ``ignored_layers``, ``iterative_steps`` pruners of
ratio ``1 - (1 - target)^(1/steps)`` each (its fine-tuning between steps is left out: we compare the
structure). Written here for the installed ultralytics, not copied. Variant ``tp_final_convs``: only the
Detect head's last convs (and DFL) ignored, the head's hidden widths pruned as prunec prunes them.

    OMP_NUM_THREADS=1 python bench/yolo_torch_pruning.py --out bench/results/yolo_torch_pruning.json

For each of dense / prunec / TP: MACs and params (prunec's counter, the same for all), the class, whether
ultralytics' own ``export(format="onnx")`` accepts it, ONNX-vs-PyTorch max abs diff, and onnxruntime
latency (1 intra-op thread, all models interleaved round by round, medians), with ``uptime`` before/after.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("YOLO_OFFLINE", "1")
from detection import prunec_yolo, yolo_onnx  # noqa: E402


class C2fV2(nn.Module):
    """C2f with ``cv1`` split into ``cv0``/``cv1`` (Torch-Pruning's C2f_v2): concat instead of chunk."""

    def __init__(self, c2f: nn.Module) -> None:
        from ultralytics.nn.modules import Conv
        super().__init__()
        w = c2f.cv1.conv.weight
        self.c = c2f.c
        self.cv0, self.cv1 = Conv(w.shape[1], self.c, 1, 1), Conv(w.shape[1], self.c, 1, 1)
        self.cv2, self.m = c2f.cv2, c2f.m
        for attr in ("i", "f", "type", "np"):  # ultralytics' layer bookkeeping (DetectionModel._predict_once)
            if hasattr(c2f, attr):
                setattr(self, attr, getattr(c2f, attr))
        old = c2f.cv1.state_dict()
        for half, conv in ((slice(0, self.c), self.cv0), (slice(self.c, 2 * self.c), self.cv1)):
            conv.load_state_dict({k: v[half] if v.dim() else v for k, v in old.items()})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv0(x), self.cv1(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def replace_c2f(module: nn.Module) -> int:
    from ultralytics.nn.modules import C2f
    n = 0
    for name, child in module.named_children():
        if type(child) is C2f:
            setattr(module, name, C2fV2(child))
            n += 1
        else:
            n += replace_c2f(child)
    return n


def tp_prune(model: nn.Module, x: torch.Tensor, target: float, steps: int, head: str) -> tuple[nn.Module, dict]:
    """Torch-Pruning's recipe on a copy of ``model``; ``head``: 'detect' (the recipe: whole Detect ignored)
    or 'final' (only the Detect's output convs and DFL ignored)."""
    import torch_pruning as tp
    from ultralytics.nn.modules import Detect
    model = copy.deepcopy(model)
    t = time.perf_counter()
    replaced = replace_c2f(model)
    ratio = 1 - math.pow(1 - target, 1 / steps)
    for _ in range(steps):
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        ignored: list[nn.Module] = []
        for m in model.modules():
            if isinstance(m, Detect):
                ignored += [m] if head == "detect" else [*(s[-1] for s in (*m.cv2, *m.cv3)), m.dfl]
        pruner = tp.pruner.GroupNormPruner(model, x, importance=tp.importance.GroupMagnitudeImportance(),
                                           iterative_steps=1, pruning_ratio=ratio, ignored_layers=ignored)
        pruner.step()
        del pruner
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, {"c2f_replaced": replaced, "ratio_per_step": round(ratio, 4), "steps": steps,
                   "prune_s": round(time.perf_counter() - t, 1)}


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _fresh_load(path: Path) -> str:
    """'ok', or the last error line, when a new Python process loads the checkpoint with ``YOLO(path)``."""
    code = f"from ultralytics import YOLO; YOLO({str(path)!r})"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "YOLO_OFFLINE": "1"})
    return "ok" if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["failed"])[-1][:200]


def _interleaved_ms(files: dict[str, str], x: np.ndarray, rounds: int) -> dict[str, float]:
    """Median onnxruntime latency per file, 1 intra-op thread, one run of each model per round."""
    import onnxruntime as ort
    sessions = {}
    for tag, f in files.items():
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = 1, 1
        sessions[tag] = ort.InferenceSession(f, opts, providers=["CPUExecutionProvider"])
    feed = {tag: {s.get_inputs()[0].name: x} for tag, s in sessions.items()}
    for tag, s in sessions.items():
        for _ in range(3):
            s.run(None, feed[tag])
    times: dict[str, list[float]] = {tag: [] for tag in sessions}
    for _ in range(rounds):
        for tag, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feed[tag])
            times[tag].append(time.perf_counter() - t)
    return {tag: round(float(np.median(v)) * 1e3, 2) for tag, v in times.items()}


def _foreign(model: nn.Module) -> list[str]:
    """Module classes that are neither torch's nor ultralytics'."""
    return sorted({type(m).__name__ for m in model.modules()
                   if not type(m).__module__.startswith(("torch.", "ultralytics."))})


def _kept(dense: nn.Module, pruned: nn.Module) -> dict[str, float]:
    """Kept fraction of out_channels over the Conv2d layers at the same place in both models (same name,
    every enclosing module of the same class: a C2f's ``cv1`` is not a C2f_v2's ``cv1``)."""
    mods = dict(pruned.named_modules())

    def same_place(name: str) -> bool:
        parts = name.split(".")
        return name in mods and all(
            type(dense.get_submodule(".".join(parts[:i]))) is type(mods[".".join(parts[:i])])
            for i in range(1, len(parts) + 1))
    kept = [mods[n].out_channels / c.out_channels for n, c in dense.named_modules()
            if isinstance(c, nn.Conv2d) and same_place(n)]
    return {"min": round(min(kept), 3), "median": round(float(np.median(kept)), 3), "convs": len(kept)}


def bench(name: str, size: int, target: float, steps: int, rounds: int) -> dict[str, Any]:
    from prunec.cost import count_macs, count_params
    torch.manual_seed(0)
    dense, result, prunec_row = prunec_yolo(name, size, target)
    x = torch.randn(1, 3, size, size)
    models: dict[str, nn.Module] = {"dense": dense, "prunec": result.model}
    rows: dict[str, dict[str, Any]] = {"prunec": {"compile_s": prunec_row["compile_s"],
                                                  "verify_rel_err": prunec_row["verify_rel_err"]}}
    for tag, head, n in (("tp_recipe", "detect", steps), ("tp_final_convs", "final", steps),
                         ("tp_recipe_1step", "detect", 1)):
        try:
            models[tag], rows[tag] = tp_prune(dense, x, target, n, head)
        except Exception as err:  # noqa: BLE001 - a failing recipe is a result: record where
            rows[tag] = {"error": f"{type(err).__name__}: {str(err)[:300]}",
                         "where": traceback.format_exc().strip().splitlines()[-3:]}
    macs0, params0 = count_macs(dense, (x,), {}), count_params(dense)
    files: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as d:
        for tag, m in models.items():
            row = rows.setdefault(tag, {})
            row.update(macs_ratio=round(count_macs(m, (x,), {}) / macs0, 3),
                       params_ratio=round(count_params(m) / params0, 3), cls=type(m).__name__,
                       foreign_modules=_foreign(m), conv_out_kept=_kept(dense, m))
            with torch.no_grad():
                want = m.eval()(x)[0].numpy()
            try:
                files[tag] = yolo_onnx(m, d, tag, size)
            except Exception as err:  # noqa: BLE001
                row.update(onnx_export=False, onnx_error=f"{type(err).__name__}: {str(err)[:300]}")
                continue
            row["fresh_process_load"] = _fresh_load(Path(d) / f"{tag}.pt")
            import onnxruntime as ort
            s = ort.InferenceSession(files[tag], providers=["CPUExecutionProvider"])
            got = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
            row.update(onnx_export=True, onnx_max_abs_diff=float(np.abs(got - want).max()),
                       onnx_out_max_abs=float(np.abs(want).max()))
        up = [_uptime()]
        ms = _interleaved_ms(files, x.numpy(), rounds)
        up.append(_uptime())
    for tag, v in ms.items():
        rows[tag].update(ort_ms=v, ort_speedup=round(ms["dense"] / v, 3))
    return {"model": name, "input": size, "channels": target, "rounds": rounds, "uptime": up,
            "results": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*", default=["yolov8n", "yolov8s"])
    ap.add_argument("--out", default="bench/results/yolo_torch_pruning.json")
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--channels", type=float, default=0.3)
    ap.add_argument("--steps", type=int, default=16, help="the recipe's iterative steps (its default 16)")
    ap.add_argument("--rounds", type=int, default=30)
    args = ap.parse_args()
    import torch_pruning
    import ultralytics
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out = {"versions": {"torch": torch.__version__, "torch_pruning": torch_pruning.__version__,
                        "ultralytics": ultralytics.__version__}, "rows": []}
    for name in args.names:
        t = time.perf_counter()
        row = bench(name, args.size, args.channels, args.steps, args.rounds)
        row["wall_s"] = round(time.perf_counter() - t, 1)
        print(json.dumps(row, default=str), flush=True)
        out["rows"].append(row)
        Path(args.out).write_text(json.dumps(out, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
