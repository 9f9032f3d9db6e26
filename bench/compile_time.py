"""Compile time: prunec (trace / post-trace) vs Torch-Pruning (DependencyGraph build + step).

    python bench/compile_time.py                 # median of 3, writes docs/compile_time.md
    python bench/compile_time.py --runs 1 --no-doc

ResNet-50 (channels=0.5) and ViT-B/16 (channels=0.5, mlp=0.5), random weights, batch 1, CPU.
prunec post-trace = analyze + plan + rewrite (from report["time_s"]); sync, cost and verify are
listed separately. Torch-Pruning = MagnitudePruner(...) construction (which builds the
DependencyGraph, including its own traced forward) + pruner.step(). Runs are interleaved
(prunec, TP, prunec, TP, ...) on fresh deep copies of the same model.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

import prunec
import torch_pruning as tp

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "compile_time.md"
OUT = ROOT / "bench" / "results" / "compile_time.json"


def count_macs(model, x) -> int:
    macs, _ = tp.utils.count_ops_and_params(model, x)
    return int(macs)


def tp_ignored(name: str, model: nn.Module) -> list[nn.Module]:
    if name == "resnet50":
        return [model.fc]
    # ViT: prune only the MLP hidden units like prunec's mlp=0.5 (channels has no conv/linear
    # channel group to act on in a ViT; the residual stream / heads are left alone in both tools)
    ignored: list[nn.Module] = [model.heads, model.conv_proj]
    for layer in model.encoder.layers:
        ignored += [layer.self_attention, layer.mlp[3]]
    return ignored


def run_prunec(name: str, model: nn.Module, x: torch.Tensor, kw: dict) -> dict:
    t0 = time.perf_counter()
    r = prunec.compile(model, x, **kw)
    wall = time.perf_counter() - t0
    ts = dict(r.report["time_s"])
    ts["post_trace"] = ts["analyze"] + ts["plan"] + ts["rewrite"]
    ts["wall"] = wall
    ts["macs_ratio"] = r.report["macs_after"] / r.report["macs_before"]
    ts["verified"] = bool(r.report["verify"]["passed"])
    return ts


def run_tp(name: str, model: nn.Module, x: torch.Tensor, ratio: float) -> dict:
    t0 = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=1),
                                       pruning_ratio=ratio, ignored_layers=tp_ignored(name, model))
    t1 = time.perf_counter()
    pruner.step()
    t2 = time.perf_counter()
    out = {"build": t1 - t0, "step": t2 - t1, "total": t2 - t0}
    try:
        with torch.no_grad():
            model(x)
        out["forward_ok"] = True
    except Exception as err:  # noqa: BLE001
        out["forward_ok"] = False
        out["forward_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:150]}"
    return out


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--no-doc", action="store_true")
    args = ap.parse_args()
    cmd = "python " + " ".join([sys.argv[0]] + sys.argv[1:])
    torch.manual_seed(0)
    cases = [
        ("resnet50", torchvision.models.resnet50(weights=None), dict(channels=0.5), 0.5),
        ("vit_b_16", torchvision.models.vit_b_16(weights=None), dict(channels=0.5, mlp=0.5), 0.5),
    ]
    x = torch.randn(1, 3, 224, 224)
    results = {}
    for name, base, kw, ratio in cases:
        base.eval()
        # warm-up (imports, first-call dispatch caches) for both tools, not timed
        run_prunec(name, copy.deepcopy(base), x, kw)
        run_tp(name, copy.deepcopy(base), x, ratio)
        pr, tr = [], []
        for i in range(args.runs):
            pr.append(run_prunec(name, copy.deepcopy(base), x, kw))
            m = copy.deepcopy(base)
            tr.append(run_tp(name, m, x, ratio))
            if i == 0:
                tr[-1]["macs_ratio"] = count_macs(m, x) / count_macs(base, x)
            print(name, i, {k: round(v, 3) if isinstance(v, float) else v for k, v in pr[-1].items()},
                  {k: round(v, 3) if isinstance(v, float) else v for k, v in tr[-1].items()}, flush=True)
        res = {k: med(pr, k) for k in ("trace", "analyze", "plan", "rewrite", "post_trace", "sync",
                                       "verify", "cost", "total", "wall")}
        res.update({f"tp_{k}": med(tr, k) for k in ("build", "step", "total")})
        res["ratio_post_trace_vs_tp"] = res["post_trace"] / res["tp_total"]
        res["ratio_trace_plus_post_vs_tp"] = (res["trace"] + res["post_trace"]) / res["tp_total"]
        res["ratio_total_vs_tp"] = res["total"] / res["tp_total"]
        res["prunec_macs_ratio"] = pr[0]["macs_ratio"]
        res["prunec_verified"] = all(p["verified"] for p in pr)
        res["tp_macs_ratio"] = tr[0]["macs_ratio"]
        res["tp_forward_ok"] = all(t["forward_ok"] for t in tr)
        res["tp_forward_error"] = next((t.get("forward_error") for t in tr if not t["forward_ok"]), "")
        res["runs"] = {"prunec": pr, "tp": tr}
        results[name] = res
        print(f"{name}: prunec trace {res['trace']:.3f}s post-trace {res['post_trace']:.3f}s "
              f"(verify {res['verify']:.3f}s) | TP build+step {res['tp_total']:.3f}s | "
              f"post_trace/TP = {res['ratio_post_trace_vs_tp']:.2f}x, "
              f"(trace+post)/TP = {res['ratio_trace_plus_post_vs_tp']:.2f}x", flush=True)
    meta = {"command": cmd, "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
            "torch_pruning": tp.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "runs": args.runs}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str))
    if args.no_doc:
        return
    lines = ["# Compile time: prunec vs Torch-Pruning", "", f"Command: `{cmd}`", "",
             f"Run {meta['date']} on this 2-core CPU host (no GPU), torch {meta['torch']}, torch-pruning "
             f"{meta['torch_pruning']}, {meta['threads']} torch threads; median of {args.runs} interleaved runs "
             "after one untimed warm-up of each tool; random weights, batch 1, fresh deep copy per run.", "",
             "- prunec *post-trace* = analyze + plan + rewrite (report `time_s`). *trace* is torch.export. "
             "sync (build the user's module class + check it), cost (MAC counting) and verify are extra and "
             "listed separately.",
             "- Torch-Pruning = `MagnitudePruner(...)` construction (builds the DependencyGraph, which runs its "
             "own traced forward) + `pruner.step()`.",
             "- ResNet-50: `channels=0.5` vs TP `pruning_ratio=0.5` (fc ignored). ViT-B/16: `channels=0.5, "
             "mlp=0.5` vs TP `pruning_ratio=0.5` with heads/conv_proj/attention/fc2 ignored so it prunes the "
             "same MLP hidden units.", "",
             "| model | prunec trace s | analyze s | plan s | rewrite s | **post-trace s** | sync s | cost s | "
             "verify s | TP build s | TP step s | **TP total s** | **post-trace / TP** | (trace+post) / TP | "
             "MACs after/before prunec / TP | TP forward |",
             "|" + "---|" * 16]
    for name, r in results.items():
        lines.append(
            f"| {name} | {r['trace']:.3f} | {r['analyze']:.3f} | {r['plan']:.3f} | {r['rewrite']:.3f} | "
            f"**{r['post_trace']:.3f}** | {r['sync']:.3f} | {r['cost']:.3f} | {r['verify']:.3f} | "
            f"{r['tp_build']:.3f} | {r['tp_step']:.3f} | **{r['tp_total']:.3f}** | "
            f"**{r['ratio_post_trace_vs_tp']:.2f}×** | {r['ratio_trace_plus_post_vs_tp']:.2f}× | "
            f"{r['prunec_macs_ratio']:.2f} / {r['tp_macs_ratio']:.2f} | "
            f"{'ok' if r['tp_forward_ok'] else 'FAILS: ' + r['tp_forward_error']} |")
    worst = max(r["ratio_post_trace_vs_tp"] for r in results.values())
    lines += ["", f"Target: post-trace ≤ 0.5× Torch-Pruning. Result: worst ratio {worst:.2f}× → "
              f"{'**met**' if worst <= 0.5 else '**not met**'}.", "",
              "Raw per-run numbers: `bench/results/compile_time.json`.", ""]
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
