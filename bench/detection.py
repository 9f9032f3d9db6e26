"""Framework-native models at 30 % channels: YOLO (ultralytics), torchvision detectors (prune
what traces), diffusers UNets. One JSON line per model to --out; --md writes the tables.

    python bench/detection.py --out bench/results/detection.jsonl --md docs/detection.md [names...]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("YOLO_OFFLINE", "1")
YOLO = ["yolov8n", "yolov8s", "yolo11n"]
DETECTORS = ["fasterrcnn_mobilenet_v3_large_fpn", "ssdlite320_mobilenet_v3_large", "retinanet_resnet50_fpn",
             "maskrcnn_resnet50_fpn"]
DIFFUSERS = ["unet2d", "unet2d_condition", "autoencoder_kl"]


def _ort_latency(path: str, x: np.ndarray, runs: int = 20) -> float:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    s = ort.InferenceSession(path, opts)
    feed = {s.get_inputs()[0].name: x}
    for _ in range(3):
        s.run(None, feed)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        s.run(None, feed)
        times.append(time.perf_counter() - t)
    return float(np.median(times)) * 1e3


def prunec_yolo(name: str, size: int = 320, channels: float = 0.3) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """The dense ``name`` built from its yaml (random weights) and prunec's result at ``channels``."""
    from ultralytics import YOLO as Yolo
    import prunec
    model = Yolo(f"{name}.yaml").model.eval()
    x = torch.randn(1, 3, size, size)
    t = time.perf_counter()
    r = prunec.compile(model, x, channels=channels)
    return model, r, {"model": name, "input": size, "compile_s": round(time.perf_counter() - t, 1), **_common(r)}


def yolo_onnx(model: torch.nn.Module, folder: str | Path, tag: str, size: int) -> str:
    """``model`` through ultralytics' own exporter: save_checkpoint → YOLO(path).export(format="onnx")."""
    from ultralytics import YOLO as Yolo
    from prunec.frameworks.ultralytics import save_checkpoint
    yolo = Yolo(str(save_checkpoint(model, Path(folder) / f"{tag}.pt")))
    return yolo.export(format="onnx", imgsz=size, simplify=False, verbose=False)


def bench_yolo(name: str, size: int = 320) -> dict[str, Any]:
    model, r, row = prunec_yolo(name, size)
    x = torch.randn(1, 3, size, size)
    with tempfile.TemporaryDirectory() as d:
        files = [yolo_onnx(m, d, tag, size) for m, tag in ((model, "dense"), (r.model, "pruned"))]
        lat = [_ort_latency(f, x.numpy()) for f in files]
        import onnxruntime as ort
        s = ort.InferenceSession(files[1])
        got = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            want = r.model(x)[0].numpy()
    row.update({"onnx_export": True, "onnx_rel_err": float(np.abs(got - want).max() / np.abs(want).max()),
                "ort_ms_dense": round(lat[0], 2), "ort_ms_pruned": round(lat[1], 2),
                "ort_speedup": round(lat[0] / lat[1], 2)})
    return row


def bench_detector(name: str) -> dict[str, Any]:
    import torchvision
    import prunec
    from prunec.verify import compare
    kw: dict[str, Any] = ({"box_score_thresh": 0.0, "box_detections_per_img": 20} if "rcnn" in name
                          else {"score_thresh": 0.0, "detections_per_img": 20})
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, **kw).eval()
    size = 320
    if name.startswith("ssdlite"):
        _bn_from_images(model, size)
    x = [torch.rand(3, size, size)]
    t = time.perf_counter()
    r = prunec.compile(model, (x,), channels=0.3)
    rep = r.report
    with torch.no_grad():
        pruned_out = r.model(x)
        _, dense_rel = compare(pruned_out, model(x))
        other = r.model([torch.rand(3, size + 64, size - 32)])
    return {"model": name, "input": size, "compile_s": round(time.perf_counter() - t, 1),
            "macs_before": rep["macs_before"], "macs_after": rep["macs_after"],
            "macs_ratio": round(rep["macs_after"] / rep["macs_before"], 3),
            "prunable_share": round(rep["macs_parts_before"] / rep["macs_before"], 3),
            "params_ratio": round(rep["params_after"] / rep["params_before"], 3),
            "parts": [f"{p['part']} ({p['macs_after'] / max(p['macs_before'], 1):.2f}{'' if p['synced'] else ', not synced'})"
                      for p in rep["parts"]],
            "left_dense": rep["left_dense"], "frozen_boundaries": rep["frozen_boundaries"],
            "tied_boundaries": [b["boundary"] for b in rep["boundaries"] if b["tied"]],
            "boundaries_tied": f"{sum(b['tied'] for b in rep['boundaries'])}/{len(rep['boundaries'])}",
            "tied_groups": [f"{t['size']}→{t['kept']}" for t in rep["tied_groups"] if not t["kept_whole"]],
            "end_to_end_rel_err": rep["verify_end_to_end"]["rel_err"],
            "outputs_equal": rep["verify_end_to_end"].get("outputs_equal"),
            "parts_in_context_rel_err": rep["verify_end_to_end"].get("parts_in_context_rel_err"),
            "end_to_end_float64_rel_err": rep["verify_end_to_end"].get("float64_rel_err"),
            "vs_dense_rel_err": dense_rel,
            "detections": len(pruned_out[0]["boxes"]), "other_size_runs": bool(len(other)),
            "synced": rep["module_synced"]}


def _bn_from_images(model: torch.nn.Module, size: int) -> None:
    """Backbone BatchNorm statistics from two random images: with torchvision's SSDlite init (conv weights
    N(0, 0.03), unit running variance) the features shrink to ~1e-13..1e-25, every output is the head's bias,
    and pruning could not change the detections (an end-to-end check that compares nothing)."""
    for m in model.backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: the statistics of exactly these images
    model.backbone.train()
    with torch.no_grad():
        model.backbone(model.transform([torch.rand(3, size, size) for _ in range(2)])[0].tensors)
    model.eval()


def bench_diffusers(name: str) -> dict[str, Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests import test_frameworks as tf
    import prunec
    from prunec.frameworks.diffusers import check_config, from_pretrained
    model, inputs = {"unet2d": tf._unet, "unet2d_condition": tf._unet_cond, "autoencoder_kl": tf._vae}[name]()
    t = time.perf_counter()
    r = prunec.compile(model, inputs, channels=0.3, heads=0.3)
    row = {"model": name, "compile_s": round(time.perf_counter() - t, 1), **_common(r)}
    with tempfile.TemporaryDirectory() as d:
        r.model.save_pretrained(d)
        back = from_pretrained(type(model), d)
        with torch.no_grad():
            same = float((tf._first(back(*inputs)) - tf._first(r.model(*inputs))).abs().max())
    lat = []
    for m in (model, r.model):
        with torch.no_grad():
            for _ in range(3):
                m(*inputs)
            t = time.perf_counter()
            for _ in range(20):
                m(*inputs)
            lat.append((time.perf_counter() - t) / 20 * 1e3)
    row.update({"reload_max_abs_diff": same, "plain_from_pretrained": check_config(r.model) or "ok",
                "eager_ms_dense": round(lat[0], 2), "eager_ms_pruned": round(lat[1], 2),
                "speedup": round(lat[0] / lat[1], 2)})
    return row


def _common(r: Any) -> dict[str, Any]:
    rep = r.report
    return {"macs_ratio": round(rep["macs_after"] / rep["macs_before"], 3),
            "params_ratio": round(rep["params_after"] / rep["params_before"], 3),
            "verify_rel_err": rep["verify"]["rel_err"], "verified": rep["verify"]["passed"],
            "synced": rep["module_synced"], "note": rep["module_note"], "class": type(r.model).__name__}


def run_one(name: str) -> dict[str, Any]:
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    if name in YOLO:
        return bench_yolo(name)
    if name in DIFFUSERS:
        return bench_diffusers(name)
    return bench_detector(name)


def _fmt(x: Any) -> str:
    if isinstance(x, bool):
        return "✅" if x else "❌"
    if isinstance(x, float):
        return f"{x:.2g}" if abs(x) < 0.01 and x else f"{x:.3g}"
    return str(x)


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """Three tables (YOLO, diffusers, detectors) from the JSON rows; the latest row per model wins."""
    latest = {r["model"]: r for r in rows}
    out = []
    tables = [
        ("YOLO (ultralytics, 320×320)", YOLO, ["macs_ratio", "params_ratio", "verify_rel_err", "synced", "class",
                                               "onnx_export", "onnx_rel_err", "ort_ms_dense", "ort_ms_pruned",
                                               "ort_speedup", "compile_s"]),
        ("diffusers (small configs)", DIFFUSERS, ["macs_ratio", "params_ratio", "verify_rel_err", "synced", "class",
                                                  "reload_max_abs_diff", "eager_ms_dense", "eager_ms_pruned",
                                                  "speedup", "plain_from_pretrained", "compile_s"]),
        ("torchvision detectors (prune what traces, 320×320)", DETECTORS,
         ["prunable_share", "macs_ratio", "params_ratio", "parts", "boundaries_tied", "tied_groups",
          "frozen_boundaries", "end_to_end_rel_err",
          "outputs_equal", "end_to_end_float64_rel_err", "parts_in_context_rel_err", "vs_dense_rel_err", "detections", "other_size_runs", "synced", "compile_s"]),
    ]
    for title, names, cols in tables:
        out += [f"### {title}", "", "| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for n in names:
            r = latest.get(n)
            if r is None:
                out.append(f"| `{n}` | " + " | ".join(["not run"] + [""] * (len(cols) - 1)) + " |")
            elif "error" in r:
                out.append(f"| `{n}` | " + " | ".join([f"error: {r['error']}"] + [""] * (len(cols) - 1)) + " |")
            else:
                cells = [", ".join(map(str, r.get(c) or [])) if isinstance(r.get(c), list) else _fmt(r.get(c, ""))
                         for c in cols]
                out.append(f"| `{n}` | " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("names", nargs="*", default=YOLO + DIFFUSERS + DETECTORS)
    ap.add_argument("--out", default="bench/results/detection.jsonl")
    ap.add_argument("--one", action="store_true", help="run one model in this process (internal)")
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument("--md", help="print the tables for the rows in --out and exit")
    args = ap.parse_args()
    if args.md:
        rows = [json.loads(ln) for ln in Path(args.out).read_text().splitlines() if ln.strip()]
        Path(args.md).write_text(to_markdown(rows) + "\n")
        return
    if args.one:
        print("RESULT " + json.dumps(run_one(args.names[0]), default=str), flush=True)
        return
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for name in args.names:  # one process per model: memory and import state don't leak
        t = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True,
                                  timeout=args.timeout)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            row = json.loads(lines[-1][7:]) if lines else {"model": name, "error": proc.stderr.strip().splitlines()[-1:]}
        except subprocess.TimeoutExpired:
            row = {"model": name, "error": f"timed out after {args.timeout}s"}
        row["wall_s"] = round(time.perf_counter() - t, 1)
        print(json.dumps(row, default=str), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")


if __name__ == "__main__":
    main()
