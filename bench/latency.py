"""ONNX Runtime CPU latency of pruned ResNet-50: prunec vs Torch-Pruning at matched MACs.

    python bench/latency.py                  # writes docs/latency_round_to.md and .png
    python bench/latency.py --rounds 3 --no-doc   # quick

For each target (~50% and ~25% of the dense MACs remaining) the pruning ratio is found by
bisection, for prunec (round_to=8 = default, and round_to=1) and Torch-Pruning (default
round_to=None, and round_to=8). MACs are counted with one counter for every model
(torch_pruning.utils.count_ops_and_params) so "same MACs" means the same thing for both tools.
Every model is exported with torch.onnx.export(dynamo=False, opset 17, dynamic batch) and timed
with onnxruntime (CPUExecutionProvider, intra_op_num_threads=2) at batch 1 and 8; the timing
loop interleaves all models round by round and reports medians.
efficiency = speedup / MACs reduction = (t_dense / t_pruned) / (MACs_dense / MACs_pruned).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torchvision

import prunec
import torch_pruning as tp

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "latency_round_to.md"
PNG = ROOT / "docs" / "latency_round_to.png"
OUT = ROOT / "bench" / "results" / "latency.json"
X = torch.randn(1, 3, 224, 224)


def macs_of(model) -> int:
    with torch.no_grad():
        return int(tp.utils.count_ops_and_params(model, X)[0])


def prunec_at(base, ratio: float, round_to: int, check: bool = False):
    r = prunec.compile(copy.deepcopy(base), X, channels=ratio, round_to=round_to, check=check)
    return r


def tp_at(base, ratio: float, round_to):
    m = copy.deepcopy(base)
    pruner = tp.pruner.MagnitudePruner(m, X, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=[m.fc], round_to=round_to)
    pruner.step()
    return m.eval()


# Where the bisection starts (found by earlier runs of this script on this ResNet-50).
HINTS = {0.5: 0.30, 0.25: 0.505}


def search(make, dense_macs: int, target: float, iters: int = 3, get=lambda o: o):
    """Bisection on the pruning ratio so that MACs_after / MACs_dense ≈ target; returns the
    evaluated point closest to target as (ratio, model, macs_ratio). Bracket starts around
    1 - sqrt(target) (uniform channel pruning scales conv MACs ~ (1 - ratio)^2)."""
    c0 = HINTS.get(target, 1 - target ** 0.5)
    lo, hi, best = max(0.0, c0 - 0.03), min(0.95, c0 + 0.03), None
    for _ in range(iters):
        mid = c0 if best is None else (lo + hi) / 2
        model = make(mid)
        mr = macs_of(get(model)) / dense_macs
        if best is None or abs(mr - target) < abs(best[2] - target):
            best = (mid, model, mr)
        if mr > target:
            lo = mid
        else:
            hi = mid
        if abs(mr - target) < 0.004:
            break
    return best


def export_onnx(model, path: Path) -> str:
    model = model.eval()
    kw = dict(input_names=["x"], output_names=["y"], opset_version=17,
              dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    try:
        torch.onnx.export(model, (X,), str(path), dynamo=False, **kw)
        return "torchscript"
    except Exception as err:  # noqa: BLE001
        print(f"  dynamo=False export failed ({type(err).__name__}: {err}); trying dynamo=True", flush=True)
        torch.onnx.export(model, (X,), str(path), dynamo=True, opset_version=17,
                          dynamic_shapes={"x": {0: torch.export.Dim("b", min=1, max=64)}},
                          input_names=["x"], output_names=["y"])
        return "dynamo"


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--quick", action="store_true", help="smoke test: one target, one config per tool")
    args = ap.parse_args()
    cmd = "python " + " ".join([sys.argv[0]] + sys.argv[1:])
    torch.manual_seed(0)
    torch.set_num_threads(2)
    base = torchvision.models.resnet50(weights=None).eval()
    dense_macs = macs_of(base)
    models = {"dense": {"tool": "dense", "model": base, "macs_ratio": 1.0, "ratio": 0.0}}
    t0 = time.time()
    for target in ((0.5,) if args.quick else (0.5, 0.25)):
        for rt in ((8,) if args.quick else (8, 1)):
            # check=True: compile raises PruneError if the pruned program fails verification
            ratio, checked, mr = search(lambda c, rt=rt: prunec_at(base, c, rt, check=True), dense_macs, target,
                                        get=lambda r: r.model)
            assert checked.report["module_synced"], checked.report["module_note"]
            models[f"prunec rt={rt} @{target}"] = {
                "tool": "prunec", "round_to": rt, "target": target, "ratio": ratio, "model": checked.model,
                "macs_ratio": macs_of(checked.model) / dense_macs,
                "verify_rel_err": checked.report["verify"]["rel_err"]}
            print(f"prunec round_to={rt} target {target}: channels={ratio:.4f} macs {mr:.3f} "
                  f"({time.time() - t0:.0f}s)", flush=True)
        for rt in ((None,) if args.quick else (None, 8)):
            ratio, m, mr = search(lambda c, rt=rt: tp_at(base, c, rt), dense_macs, target)
            models[f"TP rt={rt} @{target}"] = {"tool": "TP", "round_to": rt, "target": target, "ratio": ratio,
                                              "model": m, "macs_ratio": mr}
            print(f"TP round_to={rt} target {target}: ratio={ratio:.4f} macs {mr:.3f} "
                  f"({time.time() - t0:.0f}s)", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="prunec_latency_"))
    sessions = {}
    for i, (key, info) in enumerate(models.items()):
        path = tmp / f"m{i}.onnx"
        info["export"] = export_onnx(info["model"], path)
        sessions[key] = session(path)
        with torch.no_grad():  # sanity: ONNX output matches torch
            want = info["model"](X).numpy()
        got = sessions[key].run(None, {"x": X.numpy()})[0]
        info["onnx_max_abs_err"] = float(np.abs(want - got).max())
        info["params"] = sum(p.numel() for p in info["model"].parameters())
    print(f"exported {len(models)} models ({time.time() - t0:.0f}s)", flush=True)

    times: dict[tuple[str, int], list[float]] = {(k, b): [] for k in models for b in (1, 8)}
    for bs, iters in ((1, 10), (8, 3)):
        feed = {"x": np.random.default_rng(0).standard_normal((bs, 3, 224, 224), dtype=np.float32)}
        for s in sessions.values():  # warm-up
            for _ in range(3):
                s.run(None, feed)
        for rnd in range(args.rounds):
            keys = list(sessions) if rnd % 2 == 0 else list(reversed(sessions))
            for key in keys:
                s = sessions[key]
                for _ in range(iters):
                    a = time.perf_counter()
                    s.run(None, feed)
                    times[(key, bs)].append(time.perf_counter() - a)
        print(f"timed batch {bs} ({time.time() - t0:.0f}s)", flush=True)

    rows = []
    for key, info in models.items():
        row = {k: v for k, v in info.items() if k != "model"}
        row["name"] = key
        row["macs_reduction"] = 1.0 / info["macs_ratio"]
        for bs in (1, 8):
            med = statistics.median(times[(key, bs)])
            dense = statistics.median(times[("dense", bs)])
            row[f"ms_b{bs}"] = med * 1e3
            row[f"speedup_b{bs}"] = dense / med
            row[f"eff_b{bs}"] = (dense / med) / row["macs_reduction"]
            row[f"n_b{bs}"] = len(times[(key, bs)])
        rows.append(row)

    head = (f"{'model':24s} {'ratio':>6s} {'MACs%':>6s} {'params':>6s} {'ms b1':>7s} {'spd b1':>6s} "
            f"{'eff b1':>6s} {'ms b8':>7s} {'spd b8':>6s} {'eff b8':>6s}")
    print(head)
    for r in rows:
        print(f"{r['name']:24s} {r['ratio']:6.3f} {100 * r['macs_ratio']:6.1f} {r['params'] / 1e6:6.2f} "
              f"{r['ms_b1']:7.2f} {r['speedup_b1']:6.2f} {r['eff_b1']:6.2f} {r['ms_b8']:7.2f} "
              f"{r['speedup_b8']:6.2f} {r['eff_b8']:6.2f}")
    meta = {"command": cmd, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "onnxruntime": ort.__version__,
            "torch": torch.__version__, "torch_pruning": tp.__version__, "rounds": args.rounds}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    if args.no_doc:
        return
    plot(rows)
    write_doc(rows, meta)


def plot(rows) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    styles = {("prunec", 8): ("o", "C0", "prunec round_to=8 (default)"), ("prunec", 1): ("s", "C2", "prunec round_to=1"),
              ("TP", None): ("^", "C3", "Torch-Pruning default"), ("TP", 8): ("v", "C1", "Torch-Pruning round_to=8")}
    for ax, bs in zip(axes, (1, 8)):
        mx = max(r["macs_reduction"] for r in rows) * 1.1
        ax.plot([1, mx], [1, mx], "k--", lw=1, label="ideal (speedup = MACs reduction)")
        for (tool, rt), (mk, col, lab) in styles.items():
            pts = sorted((r["macs_reduction"], r[f"speedup_b{bs}"]) for r in rows
                         if r["tool"] == tool and r.get("round_to") == rt)
            if pts:
                ax.plot([1] + [p[0] for p in pts], [1] + [p[1] for p in pts], marker=mk, color=col, label=lab)
        ax.set_title(f"ResNet-50, ONNX Runtime CPU, batch {bs}")
        ax.set_xlabel("MACs reduction (dense / pruned)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("latency speedup (dense / pruned)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(PNG, dpi=110)


def write_doc(rows, meta) -> None:
    lines = ["# Latency: pruned ResNet-50 on ONNX Runtime (CPU)", "", f"Command: `{meta['command']}`", "",
             f"Run {meta['date']}, onnxruntime {meta['onnxruntime']} CPUExecutionProvider, "
             "`intra_op_num_threads=2`, sequential, ORT_ENABLE_ALL; 2-core CPU host shared with other jobs "
             f"(timings are medians over {meta['rounds']} interleaved rounds of all models: batch 1 × 10 "
             "iterations, batch 8 × 3 iterations per round). torchvision ResNet-50, random weights, L1 "
             "magnitude for both tools (fc not pruned). Pruning ratio found by bisection so MACs hit the "
             "target; MACs counted with the same counter (`torch_pruning.utils.count_ops_and_params`) for all "
             "models. Export: `torch.onnx.export(model, x, dynamo=False, opset_version=17)` with a dynamic "
             "batch axis (prunec: `r.model`, the synced torchvision ResNet).", "",
             "efficiency = speedup ÷ MACs reduction (1.0 = latency falls exactly as MACs do). "
             "Target: ≥ 0.95 for prunec default (round_to=8).", "",
             "| model | pruning ratio | MACs remaining | params (M) | ms b1 | speedup b1 | **eff b1** | ms b8 | "
             "speedup b8 | **eff b8** |",
             "|" + "---|" * 10]
    for r in rows:
        lines.append(f"| {r['name']} | {r['ratio']:.3f} | {100 * r['macs_ratio']:.1f}% | {r['params'] / 1e6:.2f} | "
                     f"{r['ms_b1']:.2f} | {r['speedup_b1']:.2f}× | **{r['eff_b1']:.2f}** | {r['ms_b8']:.2f} | "
                     f"{r['speedup_b8']:.2f}× | **{r['eff_b8']:.2f}** |")
    pd = [r for r in rows if r["tool"] == "prunec" and r["round_to"] == 8]
    effs = [r[f"eff_b{b}"] for r in pd for b in (1, 8)]
    lines += ["", f"prunec default efficiency: min {min(effs):.2f}, mean {statistics.mean(effs):.2f} over "
              f"{len(effs)} (target, batch) points → target ≥ 0.95 "
              f"{'**met**' if min(effs) >= 0.95 else '**not met at every point**'}.", "",
              "![speedup vs MACs reduction](latency_round_to.png)", "",
              "Raw numbers: `bench/results/latency.json`.", ""]
    DOC.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
