"""Conv refits across torchvision CNNs (random weights, random calibration images): every compile verified, the
refit applied only where it lowers the output error vs the original. A robustness sweep, not a fidelity
measurement (bench/refit_cnn.py measures fidelity on real weights).

    python bench/refit_sweep.py [--models resnet18,mobilenet_v2,...] [--channels 0.3]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torchvision

import prunec

MODELS = ("resnet18,mobilenet_v2,mobilenet_v3_small,efficientnet_b0,regnet_y_400mf,densenet121,googlenet,"
          "shufflenet_v2_x0_5,squeezenet1_0,convnext_tiny,mnasnet0_5,resnext50_32x4d")
OUT = Path(__file__).resolve().parent / "results" / "refit_sweep.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--channels", type=float, default=0.3)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for name in args.models.split(","):
        for refit in ("bias", "ls"):
            torch.manual_seed(0)
            model = torchvision.models.get_model(name, weights=None).eval()
            x, calib = torch.randn(1, 3, 96, 96), [(torch.randn(4, 3, 96, 96),) for _ in range(2)]
            t0 = time.time()
            row = {"model": name, "refit": refit}
            try:
                r = prunec.compile(model, x, channels=args.channels, method="flap", calib=calib, refit=refit)
                row.update(verified=r.report["verify"]["passed"], refit_check=r.report["verify"].get("refit"),
                           notes=[n for n in r.report["notes"] if n.startswith("refit")])
            except Exception as err:  # noqa: BLE001 - the sweep records every failure
                row.update(error=f"{type(err).__name__}: {str(err)[:300]}")
            row["seconds"] = round(time.time() - t0, 1)
            rows.append(row)
            check = row.get("refit_check") or {}
            print(f"{name:20s} {refit:4s} verified {row.get('verified')} error vs original "
                  f"{check.get('rel_err_before', float('nan')):.3f} -> {check.get('rel_err_after', float('nan')):.3f} "
                  f"applied {check.get('applied')} {row.get('error', '')}", flush=True)
    args.out.write_text(json.dumps({"meta": {"channels": args.channels, "torch": torch.__version__}, "rows": rows},
                                   indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
