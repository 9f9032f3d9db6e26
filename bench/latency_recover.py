"""EfficientNet-Lite0 (ImageNet weights) at --target-latency 0.85 (``--target``) on onnxruntime: the allocator (error curves
measured on 32 photos of the even-numbered pictures) vs plain --channels bisected to the same measured
latency; top-1 agreement with the dense model on the 130 photos of the odd-numbered pictures, one-shot,
after BatchNorm re-estimation alone, and after 120 distillation steps (prunec.recover, lr 1e-3, batches of
8 drawn from the 130 photos of the even-numbered pictures; then with BatchNorm frozen, at lr 1e-3 and 1e-4). Writes bench/results/latency_recover_effnet_b1.json.
``--method``/``--refit`` set the criterion and refit of both selections (the allocator's probes are refit too).

    python bench/latency_recover.py [--method flap --refit ls --out bench/results/latency_recover_flap_ls.json]
"""
import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import latency_aware as la  # noqa: E402

from prunec.compiler import refit_mode  # noqa: E402
from prunec.latency import profile  # noqa: E402
from prunec.passes import LatencySelect  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--target", type=float, default=0.85, help="the --target-latency goal")
ap.add_argument("--method", default="l1")
ap.add_argument("--refit", default=None, choices=["none", "bias", "ls"])
ap.add_argument("--out", default=str(la.ROOT / "bench" / "results" / "latency_recover_effnet_b1.json"))
args = ap.parse_args()
torch.set_num_threads(2)
base, held_out, _, calib = la.build("efficientnet_lite0", True)
la.METHOD, la.REFIT, la.CALIB = args.method, args.refit, calib   # both selections: this criterion, refit, data
photos = la.build("efficientnet_lite0", False)[1]
train = photos.view(26, 10, 3, 224, 224)[0::2].flatten(0, 1)           # 130 photos of the even pictures
g = torch.Generator().manual_seed(0)
batches = [train[torch.randperm(130, generator=g)[:8]] for _ in range(40)]
coupling = la.prunec.analyze(base, (la.X,))
table = profile(base, coupling.program, coupling, "onnxruntime", 1, 1, 8, 5)
alloc = la.prunec.compile(copy.deepcopy(base), la.X, calib=calib, passes=[la.score(), LatencySelect(
    "onnxruntime", target=args.target, table=table, threads=1, rounds=5, measure=False,
    refit=refit_mode(args.refit, args.method)), *la.refit()])
got = min(alloc.report["passes"]["latency_select"]["refine"], key=lambda t: abs(t["measured_ratio"] - args.target))
ratio, uniform, measured = la.same_latency(base, got["measured_ratio"], 1, 1, 5, 4)
print("allocator measured", got["measured_ratio"], "uniform ratio", ratio, "measured", measured, flush=True)
out = {"meta": {"allocator_measured": got["measured_ratio"], "uniform_ratio": ratio, "uniform_measured": measured,
                "target": args.target, "method": args.method, "refit": refit_mode(args.refit, args.method)}}
for name, model in (("allocator", alloc.model), ("uniform", uniform.model)):
    row = {"macs": la.old.macs_of(model) / la.old.macs_of(base), "one-shot": la.agreement(base, model, held_out)}
    bn = la.prunec.recover(copy.deepcopy(model), base, batches, steps=1, lr=1e-12, bn_batches=16)
    row["bn only"] = la.agreement(base, bn, held_out)
    t = time.time()
    kd = la.prunec.recover(copy.deepcopy(model), base, batches, steps=120, lr=1e-3, bn_batches=16)
    row["kd 120"], row["kd_s"] = la.agreement(base, kd, held_out), round(time.time() - t)
    for lr in (1e-3, 1e-4):   # BatchNorm keeps the model's statistics (train mode on 8 photos replaces them)
        kd = la.prunec.recover(copy.deepcopy(model), base, batches, steps=120, lr=lr, batchnorm="frozen")
        row[f"kd 120 frozen BN lr {lr:g}"] = la.agreement(base, kd, held_out)
    out[name] = row
    print(name, json.dumps(row), flush=True)
Path(args.out).write_text(json.dumps(out, indent=1))
