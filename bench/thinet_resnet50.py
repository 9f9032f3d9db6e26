"""Time and peak memory of ThiNet and LASSO on ResNet-50 with N calibration images.

    python bench/thinet_resnet50.py --method thinet --images 256    # one method per process (peak RSS)
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import torchvision

import prunec
from prunec.passes import Lasso, ThiNet


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=["thinet", "lasso"], default="thinet")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--ratio", type=float, default=0.5)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 224, 224)
    calib = [(torch.randn(args.batch, 3, 224, 224),) for _ in range(args.images // args.batch)]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cls = ThiNet if args.method == "thinet" else Lasso
    start = time.perf_counter()
    result = prunec.compile(model, x, passes=[cls(ratio=args.ratio, calib=calib)])
    wall = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rep = result.report
    print(json.dumps({"method": args.method, "images": args.images, "wall_s": round(wall, 1),
                      "time_s": rep["time_s"], "peak_rss_mib": round(peak), "rss_before_mib": round(before),
                      "macs_ratio": round(rep["macs_after"] / rep["macs_before"], 3),
                      "verify_passed": rep["verify"]["passed"]}))


if __name__ == "__main__":
    main()
