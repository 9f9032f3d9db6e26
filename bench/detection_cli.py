"""`prunec` CLI on a torchvision detector that doesn't export whole (prune what traces): the commands of
docs/detection.md, each run as a subprocess, with its summary, exit code, wall time and `uptime`.

    OMP_NUM_THREADS=1 python bench/detection_cli.py --out bench/results/detection_cli.json

Models (random weights, nothing downloaded): the zoo's `fasterrcnn_mobilenet_v3_large_320_fpn` (default
score threshold: no detection on a random image); the same with `box_score_thresh=0` (20 detections, but every
class score ≈ 1/91: near-tied); and *trained-like*: BatchNorm statistics from two random images, class and
objectness logits rescaled to std 2 and box deltas to std 0.2 (scores spread, boxes near their anchors); the same
for ssdlite320_mobilenet_v3_large. The CLI's example image is uniform in [0, 1] for torchvision's detectors.
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

import torch

sys.path.insert(0, str(Path(__file__).parent))
from detection import _bn_from_images  # noqa: E402

NAME = "fasterrcnn_mobilenet_v3_large_320_fpn"


def _std(ts: list[torch.Tensor]) -> float:
    return float(torch.cat([t.flatten() for t in ts]).std())


def build(folder: Path) -> dict[str, Path]:
    """The two pickled variants (thresh0, trained_like) in ``folder``."""
    import torchvision
    torch.manual_seed(0)
    make = lambda: torchvision.models.get_model(NAME, weights=None, weights_backbone=None, box_score_thresh=0.0,
                                                box_detections_per_img=20).eval()
    paths = {"thresh0": folder / "thresh0.pt", "trained_like": folder / "trained_like.pt"}
    torch.save(make(), paths["thresh0"])
    m = make()
    _bn_from_images(m, 320)
    out: dict[str, tuple] = {}
    hooks = [mod.register_forward_hook(lambda mod, i, o, n=n: out.setdefault(n, o))
             for n, mod in (("rpn", m.rpn.head), ("box", m.roi_heads.box_predictor))]
    with torch.no_grad():
        m(torch.randn(1, 3, 320, 320))
        for h in hooks:
            h.remove()
        rpn, box = m.rpn.head, m.roi_heads.box_predictor
        rpn.cls_logits.weight.mul_(2 / _std(out["rpn"][0]))
        rpn.bbox_pred.weight.mul_(0.2 / _std(out["rpn"][1]))
        box.cls_score.weight.mul_(2 / _std([out["box"][0]]))
        box.bbox_pred.weight.mul_(0.2 / _std([out["box"][1]]))
        for b in (rpn.cls_logits.bias, rpn.bbox_pred.bias, box.bbox_pred.bias):
            b.zero_()
    torch.save(m.eval(), paths["trained_like"])
    paths["ssd_trained_like"] = folder / "ssd_trained_like.pt"
    torch.save(_ssd_trained_like(), paths["ssd_trained_like"])
    return paths


def _ssd_trained_like() -> torch.nn.Module:
    """SSDlite320 (20 detections) with BatchNorm statistics from images, class logits of std 2, box deltas of std 0.2."""
    import torchvision
    m = torchvision.models.get_model("ssdlite320_mobilenet_v3_large", weights=None, weights_backbone=None,
                                     detections_per_img=20).eval()
    _bn_from_images(m, 320)
    out: dict[str, torch.Tensor] = {}
    heads = {"cls": m.head.classification_head, "reg": m.head.regression_head}
    hooks = [h.register_forward_hook(lambda mod, i, o, n=n: out.setdefault(n, o)) for n, h in heads.items()]
    with torch.no_grad():
        m([torch.rand(3, 320, 320)])
        for h in hooks:
            h.remove()
        for name, scale in (("cls", 2.0), ("reg", 0.2)):
            for block in heads[name].module_list:
                last = block[-1] if isinstance(block, torch.nn.Sequential) else block
                last.weight.mul_(scale / float(out[name].std()))
                if name == "reg":
                    last.bias.zero_()
    return m.eval()


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/detection_cli.json")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    rows = []
    with tempfile.TemporaryDirectory() as d:
        paths = build(Path(d))
        pickled = ["--trust-pickle", "--input-shape", "1,3,320,320", "--channels", "0.3"]
        runs = [("zoo", [f"torchvision:{NAME}", "--channels", "0.3"]),
                ("zoo onnx", [f"torchvision:{NAME}", "--channels", "0.3", "--target", "onnx"]),
                ("thresh0", [str(paths["thresh0"]), *pickled]),
                ("thresh0 onnx", [str(paths["thresh0"]), *pickled, "--target", "onnx"]),
                ("trained_like", [str(paths["trained_like"]), *pickled]),
                ("trained_like onnx", [str(paths["trained_like"]), *pickled, "--target", "onnx"]),
                ("ssd_trained_like", [str(paths["ssd_trained_like"]), *pickled]),
                ("ssd_trained_like onnx", [str(paths["ssd_trained_like"]), *pickled, "--target", "onnx"]),
                ("zoo executorch", [f"torchvision:{NAME}", "--channels", "0.3", "--target", "executorch"])]
        for label, argv in runs:
            report = Path(d) / "report.json"
            report.unlink(missing_ok=True)
            up = [_uptime()]
            t = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "prunec", *argv, "--report", str(report)], cwd=d,
                                  capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            row = {"run": label, "args": argv, "rc": proc.returncode, "wall_s": round(time.perf_counter() - t, 1),
                   "stdout": proc.stdout.splitlines(), "stderr_last": proc.stderr.strip().splitlines()[-1:],
                   "uptime": up + [_uptime()]}
            if report.exists():
                rep = json.loads(report.read_text())
                row.update(macs_ratio=round(rep["macs_after"] / rep["macs_before"], 3),
                           params_ratio=round(rep["params_after"] / rep["params_before"], 3),
                           compile_s=rep.get("time_s"), verify_end_to_end=rep["verify_end_to_end"],
                           artifact={k: v for k, v in rep["artifact"].items() if k != "outputs"})
            print(json.dumps(row, default=str), flush=True)
            rows.append(row)
            out.write_text(json.dumps(rows, indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
