"""One-shot fidelity of conv refits on a real CNN: EfficientNet-Lite0 with its ImageNet weights, pruned with
``--channels R``, by criterion × ``--refit none|bias|ls``, top-1 agreement with the dense model and relative
logit error on held-out photos (widths rounded to 8, as the CLI does).

Calibration: 32 photos of the even-numbered pictures (4 batches of 8); evaluation: the 130 photos of the
odd-numbered pictures, which calibration never sees (bench/real_images.py; 13 pictures × 10 crops, so the
agreements move in steps of about 1/13 when a whole picture flips). ``--scope expanded`` prunes only the
expanded channels of the inverted-residual blocks (the groups of ``conv_pw``, read by the 1×1 projection
convs), keeping the residual streams, stem and head whole, to separate what compensation restores there
from what cutting the residual streams loses.

    python bench/refit_cnn.py [--ratios 0.05,0.1,0.3] [--methods l1,flap,thinet] [--scope all,expanded]

(``thinet``/``lasso`` select and refit by themselves: one row per ratio, refit "own", all groups.)
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import prunec  # noqa: E402
from prunec.compiler import criterion  # noqa: E402
from prunec.passes import Refit, Select  # noqa: E402
from prunec.passes.base import Pass, PassResult, State  # noqa: E402
from real_images import efficientnet_lite0, photos  # noqa: E402

OUT = Path(__file__).resolve().parent / "results" / "refit_cnn_effnet.json"


class ExpandedOnly(Pass):
    """Keep every group but the inverted-residual blocks' expanded channels whole (timm naming: ``conv_pw``)."""

    requires = ("plan",)
    provides = ("plan",)

    def run(self, state: State) -> PassResult:
        for name in [g for g in state.plan.kept if ".conv_pw." not in g]:
            del state.plan.kept[name]
        return PassResult(state, True)


def split() -> tuple[list[tuple[torch.Tensor]], torch.Tensor]:
    per = photos().view(26, 10, 3, 224, 224)
    calib = per[0::2].flatten(0, 1)[::4][:32]
    return [(b,) for b in calib.split(8)], per[1::2].flatten(0, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.05,0.1,0.3")
    ap.add_argument("--methods", default="l1,flap")
    ap.add_argument("--refits", default="none,bias,ls")
    ap.add_argument("--scope", default="all,expanded")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.manual_seed(0)
    base = efficientnet_lite0()
    calib, test = split()
    with torch.no_grad():
        dense = base(test)
    macs0 = None
    rows = []
    for scope in args.scope.split(","):
        for ratio in map(float, args.ratios.split(",")):
            for method in args.methods.split(","):
                selecting = method in ("thinet", "lasso")   # they select and refit themselves: all groups, once
                if selecting and scope != "all":
                    continue
                for refit in ["own"] if selecting else args.refits.split(","):
                    if selecting:
                        passes = [criterion(method, ratio, 8)]
                    else:
                        passes = [criterion(method), Select({"channel": ratio}, round_to=8)]   # the CLI's default
                        passes += [ExpandedOnly()] if scope == "expanded" else []
                        passes += [Refit(refit)] if refit != "none" else []
                    t0 = time.time()
                    r = prunec.compile(copy.deepcopy(base), test[:1], calib=calib, passes=passes)
                    secs = time.time() - t0
                    with torch.no_grad():
                        out = r.model(test)
                    macs0 = macs0 or r.report["macs_before"]
                    v = r.report["verify"]
                    row = {"scope": scope, "ratio": ratio, "method": method, "refit": refit,
                           "macs": r.report["macs_after"] / macs0, "verified": v["passed"],
                           "agreement": float((out.argmax(1) == dense.argmax(1)).float().mean()),
                           "logit_error": float((out - dense).norm() / dense.norm()),
                           "calib_error": v.get("refit"), "compile_s": round(secs, 1)}
                    rows.append(row)
                    print(f"{scope:8s} {ratio:<5} {method:5s} {refit:5s} MACs {row['macs']:.3f} agree "
                          f"{row['agreement']:.3f} logit err {row['logit_error']:.3f} ({secs:.0f}s)", flush=True)
    args.out.write_text(json.dumps({"meta": {k: str(v) for k, v in vars(args).items()}
                                    | {"torch": torch.__version__, "dense_classes": int(dense.argmax(1).unique().numel())},
                                    "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
