"""The exact part's verification error on real fp32 models: the data behind EXACT_TOL.

Usage: python bench/verify_tolerance.py [--out bench/results/verify_tolerance.json]
Compiles each model at a few plans and records the verifier's exact-part rel. err (and the
approximate part's, when the plan cuts approximate groups)."""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import prunec
from prunec.load import load_model

CASES = [
    ("torchvision:resnet50", {"channels": 0.5}),
    ("torchvision:resnet50", {"channels": 0.3, "layers": 0.2}),
    ("torchvision:mobilenet_v3_small", {"channels": 0.5}),
    ("torchvision:vit_b_16", {"heads": 0.5, "mlp": 0.5}),
    ("timm:vit_tiny_patch16_224", {"heads": 0.3, "hidden": 0.1}),
    ("timm:resnet18", {"channels": 0.5}),
    ("timm:efficientnet_b0", {"channels": 0.5}),
    ("timm:convnext_atto", {"channels": 0.5}),
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results/verify_tolerance.json")
    p.add_argument("--only", default="")
    args = p.parse_args()
    torch.manual_seed(0)
    rows = []
    for spec, flags in CASES:
        if args.only and args.only not in spec:
            continue
        start = time.perf_counter()
        try:
            loaded = load_model(spec)
            r = prunec.compile(loaded.model, loaded.example_inputs, example_kwargs=loaded.example_kwargs,
                               **flags)
            v = r.report["verify"]
            row = {"model": spec, "flags": flags, "rel_err": v["rel_err"], "max_abs_err": v["max_abs_err"],
                   "batch_sizes": v["batch_sizes"], "approximate": v["approximate"], "notes": v["notes"]}
        except Exception as err:  # record and go on: this is a measurement
            row = {"model": spec, "flags": flags, "error": f"{type(err).__name__}: {str(err)[:300]}"}
        row["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
    with open(args.out, "w") as f:
        json.dump({"load": os.getloadavg(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
