"""The latency allocator against uniform widths at the same *predicted* latency, on a real CNN (issue 12).

EfficientNet-Lite0 with its ImageNet weights (bench/real_images.py), the onnxruntime table of
bench/latency_aware.py (batch 1, 1 thread, 8 points, 5 rounds; cached, profiled if missing), ``--method``
scores and ``--refit``: ``--target-latency G`` at each goal with the in-pass measurement off (``refine=0``:
its predicted latency is the allocation's), and plain ``--channels R`` (round_to 8) at each ratio, its
latency predicted by the same calibrated table. No row is timed, so the comparison is not blurred by this
host's timing noise or by a same-latency bisection landing a few % off (bench/latency_aware.py times them).

Each row: the predicted latency ratio, MACs, and against the dense model the relative logit error, the KL
divergence of the softmax and the top-1 agreement, both on the 32 calibration photos (the even-numbered
pictures, what the refit and the allocator's probes see) and on the 130 held-out photos of the other 13
pictures (agreement steps of about 1/13 when a whole picture flips).

    python bench/latency_accuracy.py [--goals 0.9,0.85,0.8,0.75,0.7] [--ratios 0.05,0.094,0.13,0.163]
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
from prunec.compiler import criterion, refit_mode  # noqa: E402
from prunec.latency import profile  # noqa: E402
from prunec.passes import LatencySelect, Refit, Select  # noqa: E402
from real_images import efficientnet_lite0  # noqa: E402
from refit_cnn import split  # noqa: E402  (the same 32 calibration / 130 held-out photos)

OUT = Path(__file__).resolve().parent / "results" / "latency_accuracy_effnet.json"


def fidelity(dense: torch.Tensor, out: torch.Tensor, batch: int = 8) -> dict[str, float]:
    """Relative logit error (mean over batches of ``batch``, as the allocator's probes measure it), KL(dense ‖
    pruned) of the softmax per image, and top-1 agreement."""
    rel = [float((o - d).norm() / d.norm()) for o, d in zip(out.split(batch), dense.split(batch))]
    kl = torch.nn.functional.kl_div(out.log_softmax(1), dense.log_softmax(1), log_target=True, reduction="batchmean")
    return {"rel": sum(rel) / len(rel), "kl": float(kl), "agree": float((out.argmax(1) == dense.argmax(1)).float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--goals", default="0.9,0.85,0.8,0.75,0.7")
    ap.add_argument("--ratios", default="0.05,0.094,0.13,0.163")
    ap.add_argument("--method", default="flap")
    ap.add_argument("--refit", default="ls")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    torch.manual_seed(0)
    base = efficientnet_lite0()
    calib, test = split()
    calib_imgs = torch.cat([b for b, in calib])
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    coupling = prunec.analyze(base, (x,))
    table = profile(base, coupling.program, coupling, "onnxruntime", 1, 1, 8, 5, op_timing="kernel")
    refit = refit_mode(args.refit, args.method)
    after = [Refit(refit)] if refit != "none" else []
    with torch.no_grad():
        dense_calib, dense_test = base(calib_imgs), base(test)

    rows = []
    plans = [("--target-latency", g, [LatencySelect("onnxruntime", target=g, table=table, batch=1, threads=1,
                                                    measure=False, refine=0, refit=refit)])
             for g in map(float, args.goals.split(","))]
    plans += [("--channels", r, [Select({"channel": r}, round_to=8)]) for r in map(float, args.ratios.split(","))]
    for kind, knob, select in plans:
        t0 = time.time()
        r = prunec.compile(copy.deepcopy(base), x, calib=calib, passes=[criterion(args.method), *select, *after])
        with torch.no_grad():
            on_calib, on_test = fidelity(dense_calib, r.model(calib_imgs)), fidelity(dense_test, r.model(test))
        row = {"selection": kind, "knob": knob, "verified": r.report["verify"]["passed"],
               "predicted_ratio": table.predict({g: len(k) for g, k in r.plan.kept.items()}) / table.dense_ms,
               "macs": r.report["macs_after"] / r.report["macs_before"], "calib": on_calib, "held_out": on_test,
               "sensitivity": r.report["passes"].get("latency_select", {}).get("sensitivity"),
               "compile_s": round(time.time() - t0, 1)}
        rows.append(row)
        print(f"{kind:16s} {knob:<6} predicted {row['predicted_ratio']:.3f} MACs {row['macs']:.3f} | calib rel "
              f"{on_calib['rel']:.3f} KL {on_calib['kl']:.3f} agree {on_calib['agree']:.2f} | held-out rel "
              f"{on_test['rel']:.3f} KL {on_test['kl']:.3f} agree {on_test['agree']:.3f} ({row['compile_s']} s)",
              flush=True)
    args.out.write_text(json.dumps({"meta": {k: str(v) for k, v in vars(args).items()} | {
        "torch": torch.__version__, "table": table.meta.get("cache"), "dense_ms": table.dense_ms}, "rows": rows},
        indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
