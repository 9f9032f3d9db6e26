"""Artifact size, runtime error and CPU latency per backend, dense vs pruned (torchvision, random weights).

    python bench/backends.py --models resnet50 mobilenet_v3_large vit_b_16 --channels 0.3 \
        --jsonl /tmp/backends.jsonl

One JSON line per model: for dense and pruned, each target's artifact bytes and max abs error vs
torch (the backend's own check), then onnxruntime CPU and ExecuTorch latency at batch 1 (medians of
interleaved dense/pruned runs, so load on the machine hits both alike).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision

import prunec
from prunec.backends import BACKENDS

TARGETS = ("torch", "onnx", "coreml", "executorch")


@dataclass
class Dense:
    """The unpruned model behind the CompileResult interface the backends read."""

    model: torch.nn.Module
    example_inputs: tuple[Any, ...]
    example_kwargs: dict[str, Any] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def program(self) -> torch.nn.Module:
        return self.model

    def export(self) -> torch.export.ExportedProgram:
        with torch.no_grad():
            return torch.export.export(self.model, self.example_inputs, strict=False)


def write_all(result: Any, folder: Path, targets: tuple[str, ...]) -> dict[str, Any]:
    """Run each backend; keep bytes, error, time, or the error message."""
    out: dict[str, Any] = {}
    for target in targets:
        path = folder / {"torch": "m.pt2", "onnx": "m.onnx", "coreml": "m.mlpackage",
                         "executorch": "m.pte"}[target]
        start = time.perf_counter()
        try:
            rep = BACKENDS[target](result, path, {})
            out[target] = {"bytes": rep.get("bytes"), "max_abs_err": rep.get("max_abs_err",
                           rep.get("reload_rel_err")), "rel_err": rep.get("rel_err"),
                           "write_s": round(time.perf_counter() - start, 1), "path": str(path),
                           **({"undelegated_ops": rep["undelegated_ops"]} if "undelegated_ops" in rep else {})}
        except Exception as err:  # noqa: BLE001 - a benchmark records failures and goes on
            out[target] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
    return out


def ort_latency(dense: Path, pruned: Path, x: torch.Tensor, rounds: int) -> dict[str, float]:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sessions = [ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"]) for p in (dense, pruned)]
    feed = {sessions[0].get_inputs()[0].name: x.numpy()}
    return _interleaved([lambda s=s: s.run(None, feed) for s in sessions], rounds)


def et_latency(dense: Path, pruned: Path, x: torch.Tensor, rounds: int) -> dict[str, float]:
    from executorch.runtime import Runtime
    methods = [Runtime.get().load_program(str(p)).load_method("forward") for p in (dense, pruned)]
    return _interleaved([lambda m=m: m.execute([x]) for m in methods], rounds)


def _interleaved(fns: list[Any], rounds: int) -> dict[str, float]:
    for fn in fns:
        fn()   # warm-up
    times: list[list[float]] = [[], []]
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - start)
    dense_ms, pruned_ms = (statistics.median(t) * 1e3 for t in times)
    return {"dense_ms": round(dense_ms, 2), "pruned_ms": round(pruned_ms, 2),
            "speedup": round(dense_ms / pruned_ms, 2), "rounds": rounds}


def bench(name: str, channels: float, rounds: int, targets: tuple[str, ...]) -> dict[str, Any]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name).eval()
    for mod in model.modules():   # torchvision zero-inits the ViT head: outputs would be all 0
        if isinstance(mod, torch.nn.Linear) and not mod.weight.any():
            torch.nn.init.normal_(mod.weight, std=0.02)
    x = torch.randn(1, 3, 224, 224)
    start = time.perf_counter()
    pruned = prunec.compile(model, (x,), channels=channels)
    row: dict[str, Any] = {"model": name, "channels": channels, "compile_s": round(time.perf_counter() - start, 1),
                           "params": [pruned.report["params_before"], pruned.report["params_after"]],
                           "macs": [pruned.report["macs_before"], pruned.report["macs_after"]]}
    with tempfile.TemporaryDirectory() as tmp:
        for label, result in (("dense", Dense(model, (x,))), ("pruned", pruned)):
            (Path(tmp) / label).mkdir()
            row[label] = write_all(result, Path(tmp) / label, targets)
        paths = {t: [Path(row[k][t].get("path", "")) for k in ("dense", "pruned")] for t in targets}
        if all("error" not in row[k].get("onnx", {"error": 1}) for k in ("dense", "pruned")):
            row["onnxruntime_latency"] = ort_latency(*paths["onnx"], x, rounds)
        if all("error" not in row[k].get("executorch", {"error": 1}) for k in ("dense", "pruned")):
            row["executorch_latency"] = et_latency(*paths["executorch"], x, max(5, rounds // 2))
    return row


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """Tables for docs/backends.md from the JSON lines."""
    mb = lambda r, t: f"{r[t]['bytes'] / 1e6:.1f}" if "bytes" in r.get(t, {}) else "fail"  # noqa: E731
    err = lambda r, t: f"{r[t]['max_abs_err']:.1e} ({r[t]['rel_err']:.0e} rel)" \
        if r.get(t, {}).get("rel_err") is not None else "fail" if "error" in r.get(t, {}) else "n/a"  # noqa: E731
    lines = ["| model | params dense → pruned | " + " | ".join(f"{t} MB dense → pruned" for t in TARGETS) + " |",
             "|---|---|" + "---|" * len(TARGETS)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'][0] / 1e6:.1f}M → {r['params'][1] / 1e6:.1f}M | " +
                     " | ".join(f"{mb(r['dense'], t)} → {mb(r['pruned'], t)}" for t in TARGETS) + " |")
    lines += ["", "| model | onnxruntime max abs err dense / pruned | ExecuTorch max abs err dense / pruned |",
              "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {err(r['dense'], 'onnx')} / {err(r['pruned'], 'onnx')} | "
                     f"{err(r['dense'], 'executorch')} / {err(r['pruned'], 'executorch')} |")
    lines += ["", "| model | MACs dense → pruned | onnxruntime CPU ms dense → pruned (speedup) | "
              "ExecuTorch XNNPACK ms dense → pruned (speedup) |", "|---|---|---|---|"]
    for r in rows:
        lat = lambda k: (f"{r[k]['dense_ms']} → {r[k]['pruned_ms']} ({r[k]['speedup']}×, n={r[k]['rounds']})"  # noqa: E731
                         if k in r else "n/a")
        lines.append(f"| {r['model']} | {r['macs'][0] / 1e9:.2f}G → {r['macs'][1] / 1e9:.2f}G | "
                     f"{lat('onnxruntime_latency')} | {lat('executorch_latency')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["resnet50", "mobilenet_v3_large", "vit_b_16"])
    ap.add_argument("--channels", type=float, default=0.3)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--targets", nargs="+", default=list(TARGETS))
    ap.add_argument("--jsonl", help="append one JSON line per model here")
    ap.add_argument("--render", help="print markdown tables from this JSONL file and exit")
    args = ap.parse_args()
    if args.render:
        print(to_markdown([json.loads(line) for line in Path(args.render).read_text().splitlines() if line]))
        return
    for name in args.models:
        row = bench(name, args.channels, args.rounds, tuple(args.targets))
        line = json.dumps(row, default=str)
        print(line, flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
