"""Latency-aware widths vs fixed round_to vs Torch-Pruning on ONNX Runtime CPU or ExecuTorch XNNPACK (issue 12).

    python bench/latency_aware.py --models mobilenet_v3_large,resnet50 --batches 1,8 --rounds 5
    python bench/latency_aware.py --models mobilenet_v3_large --batches 1 --targets 0.5 --rounds 3  # reduced

Per model and batch: a latency table is profiled once on onnxruntime (prunec.latency.profile,
--points widths per group, --threads threads, cached). Rows, all at matched MACs by bisection on the
pruning ratio (MACs counted with torch_pruning.utils.count_ops_and_params for every model):
prunec default (--channels, round_to=8), prunec latency-aware (--channels snapped on the table),
prunec allocator (--target-latency with its measured re-aim, the goal bisected to the MACs),
Torch-Pruning default (MagnitudePruner L1, round_to=None; prunec rows use --method, L1 by default). Then --target-latency 0.5 (the knapsack
allocator, measured end to end) three ways: on the standalone-op table alone, calibrated on the whole
model, and calibrated with the groups' measured output errors weighing their importance (the default), and
plain --channels bisected to the same measured latency, with top-1 agreement vs dense on a fixed image
set (efficientnet_lite0: ImageNet weights and 260 real photos, bench/real_images.py; torchvision models:
random weights, synthetic images). All rows of one batch are timed interleaved in one
loop (order reversed every other round; medians); `uptime` load is recorded before and after.
efficiency = speedup / MACs reduction.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
import latency as old  # noqa: E402  (bench/latency.py: MACs counter, ONNX export, ORT session)

import prunec  # noqa: E402
import torch_pruning as tp  # noqa: E402
from prunec.latency import measure, profile  # noqa: E402
from prunec.compiler import criterion, refit_mode  # noqa: E402
from prunec.passes import LatencySelect, Refit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "latency_aware.json"
X = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
METHOD: str = "l1"  # --method: the criterion of every prunec row
CALIB: list | None = None  # calibration batches of every prunec row (--calib-photos), else None
REFIT: str | None = None  # --refit of every prunec row (None: the compile's default for --method)


def score():
    """The --method criterion pass."""
    return criterion(METHOD)


def refit() -> list:
    """The --refit pass after a selection (none without one: as compile(method=METHOD, refit=REFIT))."""
    mode = refit_mode(REFIT, METHOD)
    return [] if mode == "none" else [Refit(mode)]


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def images(n: int = 64) -> torch.Tensor:
    """A fixed synthetic image set: smooth random fields (seeded), ImageNet-normalised scale."""
    g = torch.Generator().manual_seed(123)
    low = torch.randn(n, 3, 14, 14, generator=g)
    return torch.nn.functional.interpolate(low, size=224, mode="bilinear", align_corners=False)


def agreement(dense, pruned, imgs: torch.Tensor) -> dict:
    with torch.no_grad():
        a, b = dense(imgs), pruned(imgs)
    return {"top1_agree": float((a.argmax(1) == b.argmax(1)).float().mean()),
            "rel_err": float((a - b).norm() / a.norm()), "dense_classes": int(a.argmax(1).unique().numel())}


def tp_default(base, ratio: float):
    m = copy.deepcopy(base)
    last = [mod for mod in m.modules() if isinstance(mod, torch.nn.Linear)][-1]
    tp.pruner.MagnitudePruner(m, X, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
                              ignored_layers=[last], round_to=None).step()
    return m.eval()


def latency_aware(base, ratio: float, table):
    return prunec.compile(copy.deepcopy(base), X, calib=CALIB, passes=[score(), LatencySelect(
        table.meta["key_fields"]["runtime"], ratios={"channel": ratio, "mlp": ratio}, table=table, measure=False),
        *refit()])


def allocator(base, goal: float, table, batch: int):
    """``--target-latency goal`` as the CLI runs it (the knapsack on the calibrated table, measured and
    re-aimed), so the bisection on the goal matches MACs with measured, not predicted, latency."""
    return prunec.compile(copy.deepcopy(base), X, calib=CALIB, passes=[score(), LatencySelect(
        table.meta["key_fields"]["runtime"], target=goal, table=table, batch=batch, measure=False,
        refit=refit_mode(REFIT, METHOD)), *refit()])


def secant_next(tried: list[tuple[float, float]], want: float, ends: tuple[tuple[float, float], tuple[float, float]]
                ) -> float | None:
    """The next knob value for a monotone knob → value curve: the secant between the nearest tried points on
    either side of ``want`` (``ends``: the knob's two limits with the values assumed there, standing in for a
    missing side), kept inside the bracket; None when it repeats a tried knob. Bisection alone landed 4–7 %
    off in 3 steps on these staircase curves."""
    (k0, v0), (k1, v1) = ends
    rising = v1 > v0
    below = [t for t in tried if (t[1] <= want) == rising]   # on the k0 side of the goal
    above = [t for t in tried if (t[1] <= want) != rising]
    a = max(below, key=lambda t: t[0] if k1 > k0 else -t[0], default=(k0, v0))
    b = min(above, key=lambda t: t[0] if k1 > k0 else -t[0], default=(k1, v1))
    if (b[0] - a[0]) * (k1 - k0) <= 0:   # timing noise: not monotone here; bisect the nearest two
        if len(tried) < 2:   # the goal lies past the knob's end
            return None
        a, b = sorted(sorted(tried, key=lambda t: abs(t[1] - want))[:2], key=lambda t: t[0] * (1 if k1 > k0 else -1))
    nxt = a[0] + (b[0] - a[0]) * (want - a[1]) / (b[1] - a[1] if abs(b[1] - a[1]) > 1e-9 else 1e-9)
    lo, hi = sorted((a[0] + 0.1 * (b[0] - a[0]), b[0] - 0.1 * (b[0] - a[0])))
    nxt = min(max(nxt, lo), hi)
    return None if any(abs(nxt - t[0]) < 1e-3 for t in tried) else nxt


def search(make, dense_macs: int, target: float, iters: int, knob: str = "ratio"):
    """Secant search for MACs ≈ target (closest point evaluated) on the pruning ratio (``knob="ratio"``:
    higher cuts more) or the latency goal (``"goal"``: lower cuts more)."""
    ends = ((0.0, 1.0), (0.9, 0.0)) if knob == "ratio" else ((0.05, 0.0), (1.0, 1.0))
    mid = 1 - target ** 0.5 if knob == "ratio" else target
    tried: list[tuple[float, float]] = []
    best = None
    for _ in range(iters):
        try:
            model = make(mid)
        except prunec.InputError:   # a latency goal below the best reachable: aim higher
            if knob != "goal":
                raise
            ends = ((mid, 0.0), ends[1])
            mid = secant_next(tried, target, ends) if tried else (mid + ends[1][0]) / 2
            if mid is None:
                break
            continue
        m = model.model if hasattr(model, "model") else model
        mr = old.macs_of(m) / dense_macs
        tried.append((mid, mr))
        if best is None or abs(mr - target) < abs(best[2] - target):
            best = (mid, model, mr)
        if abs(mr - target) < 0.01:
            break
        mid = secant_next(tried, target, ends)
        if mid is None:
            break
    return best


def same_latency(base, want_ratio: float, batch: int, threads: int, rounds: int, iters: int,
                 runtime: str = "onnxruntime"):
    """Plain --channels (round_to=8) searched (``secant_next``) so its measured latency ratio ≈ ``want_ratio``."""
    tried: list[tuple[float, object, float]] = []   # (ratio, result, measured latency ratio)
    mid = min(0.9, max(0.0, 1 - want_ratio ** 0.5))
    for _ in range(iters):
        r = prunec.compile(copy.deepcopy(base), X, channels=mid, method=METHOD, calib=CALIB, refit=REFIT)
        ms = measure(runtime, {"dense": base, "p": r.model}, (X,), batch, threads, rounds)
        tried.append((mid, r, ms["p"] / ms["dense"]))
        if abs(tried[-1][2] / want_ratio - 1) < 0.01:
            break
        mid = secant_next([(t[0], t[2]) for t in tried], want_ratio, ((0.0, 1.0), (0.9, 0.0)))
        if mid is None:
            break
    return min(tried, key=lambda t: abs(t[2] - want_ratio))


def session(path: Path, threads: int):
    """An ORT CPU session as in bench/latency.py, with ``threads`` intra-op threads."""
    so = old.ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.execution_mode = old.ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = old.ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return old.ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def time_rows(rows: dict, batch: int, rounds: int, threads: int, tmp: Path, runtime: str = "onnxruntime") -> dict:
    """Median ms of every row's model at ``batch``, interleaved: on onnxruntime ONNX (dynamo=False) in ORT
    sessions as bench/latency.py; on another runtime as prunec.latency.measure deploys it (ExecuTorch: XNNPACK)."""
    if runtime != "onnxruntime":
        return measure(runtime, {k: row["model"] for k, row in rows.items()}, (X,), batch, threads, rounds)
    sessions = {}
    for i, (key, row) in enumerate(rows.items()):
        path = tmp / f"{abs(hash(key))}_{i}.onnx"
        old.export_onnx(row["model"], path)
        sessions[key] = session(path, threads)
    feed = {"x": np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)}
    iters = 5 if batch == 1 else 2
    for s in sessions.values():
        for _ in range(2):
            s.run(None, feed)
    times = {k: [] for k in sessions}
    for rnd in range(rounds):
        for key in (list(sessions) if rnd % 2 == 0 else list(sessions)[::-1]):
            for _ in range(iters):
                a = time.perf_counter()
                sessions[key].run(None, feed)
                times[key].append(time.perf_counter() - a)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def build(name: str, calib_photos: bool = False) -> tuple[torch.nn.Module, torch.Tensor, str, list | None]:
    """(model, agreement image set, what the weights are, calibration batches or None): efficientnet_lite0
    with ImageNet weights on real photos (bench/real_images.py), torchvision models with random weights on
    synthetic images. ``calib_photos`` splits the photos by picture: 32 images of the even-numbered
    pictures (4 batches of 8) calibrate, the 130 images of the odd-numbered pictures measure agreement."""
    torch.manual_seed(0)
    if name == "efficientnet_lite0":
        from real_images import efficientnet_lite0, photos
        imgs = photos()
        if not calib_photos:
            return efficientnet_lite0(), imgs, "ImageNet weights, 260 real photos", None
        per = imgs.view(26, 10, *imgs.shape[1:])
        calib = per[0::2].flatten(0, 1)[::4][:32]
        return (efficientnet_lite0(), per[1::2].flatten(0, 1),
                "ImageNet weights, 130 real photos (odd pictures); calibration: 32 from the even pictures",
                [(b,) for b in calib.split(8)])
    if calib_photos:
        raise SystemExit("--calib-photos needs real weights: --models efficientnet_lite0")
    return (getattr(torchvision.models, name)(weights=None).eval(), images(), "random weights, synthetic images",
            None)


def run_model(name: str, args, log) -> list[dict]:
    global METHOD, CALIB, REFIT
    base, imgs, weights, CALIB = build(name, args.calib_photos)
    METHOD, REFIT = args.method, args.refit
    dense_macs = old.macs_of(base)
    coupling = prunec.analyze(base, (X,))
    out = []
    tmp = Path(tempfile.mkdtemp(prefix="prunec_lat_"))
    common = {}
    for target in ([] if args.skip_macs else args.targets):
        for rt in args.round_to:
            tool = "prunec default" if rt == 8 else f"prunec round_to {rt}"
            r, m, mr = search(lambda c: prunec.compile(copy.deepcopy(base), X, channels=c, method=METHOD, round_to=rt,
                                                       calib=CALIB, refit=REFIT), dense_macs, target, args.iters)
            common[f"{tool} @{target}"] = {"tool": tool, "target": target, "ratio": r, "model": m.model,
                                           "macs_ratio": mr}
            log(f"{name} {tool} @{target}: ratio {r:.3f} macs {mr:.3f}")
        if not args.no_tp:
            r, m, mr = search(lambda c: tp_default(base, c), dense_macs, target, args.iters)
            common[f"TP default @{target}"] = {"tool": "TP default", "target": target, "ratio": r, "model": m,
                                               "macs_ratio": mr}
            log(f"{name} TP @{target}: ratio {r:.3f} macs {mr:.3f}")
    for batch in args.batches:
        rows = {"dense": {"tool": "dense", "model": base, "macs_ratio": 1.0, "ratio": 0.0}, **common}
        for timing in args.op_timing:
            table_rows(name, base, coupling, batch, timing, imgs, dense_macs, rows, args, log)
        before = load()
        ms = time_rows(rows, batch, args.rounds, args.threads, tmp, args.runtime)
        after = load()
        for key, row in rows.items():
            rec = {k: v for k, v in row.items() if k != "model"}
            rec.update(model=name, weights=weights, runtime=args.runtime, name=key, batch=batch, ms=ms[key], speedup=ms["dense"] / ms[key],
                       measured_ratio=ms[key] / ms["dense"], load_before=before, load_after=after,
                       params=sum(p.numel() for p in row["model"].parameters()))
            rec["efficiency"] = rec["speedup"] * row["macs_ratio"]
            out.append(rec)
            log(f"  {name} b{batch} {key:40s} MACs {row['macs_ratio']:.3f} {ms[key]:8.2f} ms "
                f"speedup {rec['speedup']:.2f} eff {rec['efficiency']:.2f}")
        OUT.write_text(json.dumps({"meta": vars(args) | {"partial": True}, "rows": out}, indent=1, default=str))
    shutil.rmtree(tmp, ignore_errors=True)   # the exported models of every row
    return out


def table_rows(name: str, base, coupling, batch: int, timing: str, imgs, dense_macs: int, rows: dict, args, log
               ) -> None:
    """The latency-table rows (latency-aware snap, allocator, --target-latency, plain --channels at the same
    latency) into ``rows``, on a table whose ops are timed by ``timing``: "kernel" (the runtime's own op
    time where it reports one, the default) or "wall" (each standalone op timed end to end, as before
    2026-12-06; rows suffixed "(wall-timed ops)")."""
    t0 = time.time()
    table = profile(base, coupling.program, coupling, args.runtime, batch, args.threads, args.points, args.rounds,
                    op_timing=timing)
    sfx = " (wall-timed ops)" if timing == "wall" else ""
    log(f"{name} b{batch}{sfx}: table {len(table.ops)} ops, dense {table.dense_ms:.1f} ms ({time.time() - t0:.0f}s)")
    for target in ([] if args.skip_macs else args.targets):
        r, m, mr = search(lambda c: latency_aware(base, c, table), dense_macs, target, args.iters)
        rows[f"prunec latency-aware @{target}{sfx}"] = {"tool": "prunec latency-aware" + sfx, "target": target, "ratio": r,
                                                   "model": m.model, "macs_ratio": mr,
                                                   "predicted_ratio": m.report["passes"]["latency_select"][
                                                       "predicted_ms"] / table.dense_ms}
        log(f"{name} b{batch}{sfx} latency-aware @{target}: ratio {r:.3f} macs {mr:.3f}")
        g, m, mr = search(lambda goal: allocator(base, goal, table, batch), dense_macs, target, args.iters + 2, "goal")
        info = m.report["passes"]["latency_select"]
        rows[f"prunec allocator @{target}{sfx}"] = {"tool": "prunec allocator" + sfx, "target": target, "goal": g,
                                               "model": m.model, "macs_ratio": mr, "factors": info.get("factors"),
                                               "predicted_ratio": info["predicted_ms"] / table.dense_ms}
        log(f"{name} b{batch}{sfx} allocator @{target}: goal {g:.3f} macs {mr:.3f} factors {info.get('factors')}")
    for goal in args.latency_targets:
        # the standalone-op table alone; calibrated on the model; calibrated + sensitivity weights (default)
        variants = (("target-latency standalone", False, False), ("target-latency calibrated", True, False),
                    ("target-latency", True, True))
        for tool, calibrated, sens in (v for v in variants if v[0] in args.target_variants):
            t0 = time.time()
            tbl = table if calibrated else dataclasses.replace(table, factors={}, calibration={})
            res = prunec.compile(copy.deepcopy(base), X, calib=CALIB, passes=[score(), LatencySelect(
                args.runtime, target=goal, table=tbl, batch=batch, threads=args.threads, rounds=args.rounds, measure=False,
                calibrate=calibrated, sensitivity=sens, refit=refit_mode(REFIT, METHOD)), *refit()])
            info = res.report["passes"]["latency_select"]
            key = f"--target-latency {goal}" + {"target-latency": "", "target-latency standalone": " (standalone table)",
                                                "target-latency calibrated": " (calibrated, no sensitivity)"}[tool] + sfx
            rows[key] = {
                "tool": tool + sfx, "target_latency": goal, "sensitivity": info.get("sensitivity"),
                "model": res.model, "macs_ratio": old.macs_of(res.model) / dense_macs,
                "predicted_ratio": info["predicted_ms"] / table.dense_ms, "factors": info.get("factors"),
                "compile_s": round(time.time() - t0, 1), "refine": info.get("refine"),
                "verify_passed": res.report["verify"]["passed"], **agreement(base, res.model, imgs)}
            log(f"{name} b{batch} {key}: factors {info.get('factors')}, {rows[key]['compile_s']} s, "
                f"in-pass {[round(t['measured_ratio'], 3) for t in info.get('refine') or []]}")
        tries = info.get("refine") or [{"measured_ratio": goal}]
        got = min(tries, key=lambda t: abs(t["measured_ratio"] - goal))["measured_ratio"]  # the one kept
        log(f"{name} b{batch}{sfx} target {goal}: in-pass measured {[round(t['measured_ratio'], 3) for t in tries]}, "
            f"kept {got:.3f}")
        if sfx:
            continue
        r, m, ratio = same_latency(base, got, batch, args.threads, args.rounds, args.iters, args.runtime)
        rows[f"--channels @ same latency as {goal}"] = {
            "tool": "channels same latency", "ratio": r, "model": m.model, "measured_in_search": ratio,
            "macs_ratio": old.macs_of(m.model) / dense_macs, **agreement(base, m.model, imgs)}
        log(f"{name} b{batch} channels {r:.3f} at same latency: {ratio:.3f}")


def plot(rows: list[dict], png: Path) -> None:
    """Measured latency ratio vs MACs ratio per (model, batch), one marker per selection."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = sorted({(r["model"], r["batch"], r.get("runtime", "onnxruntime")) for r in rows})
    cols = min(3, len(panels))
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 4.2 * rows_n), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    styles = {"prunec default": ("o", "C0"), "prunec latency-aware": ("s", "C2"), "TP default": ("^", "C3"),
              "prunec allocator": ("X", "C6"), "prunec round_to 16": ("v", "C8"),
              "target-latency": ("*", "C1"), "target-latency standalone": ("P", "C5"),
              "target-latency calibrated": ("p", "C7"),
              "channels same latency": ("D", "C4"), "prunec allocator (wall-timed ops)": ("x", "C9"),
              "target-latency (wall-timed ops)": ("+", "C9")}
    for ax, (model, batch, runtime) in zip(axes.flat, panels):
        ax.plot([0, 1], [0, 1], "k--", lw=1, label="latency ∝ MACs")
        for tool, (mk, col) in styles.items():
            pts = sorted((r["macs_ratio"], r["measured_ratio"]) for r in rows
                         if r["model"] == model and r["batch"] == batch and r["tool"] == tool
                         and r.get("runtime", "onnxruntime") == runtime)
            if pts:
                ax.plot(*zip(*pts), marker=mk, color=col, ls="-" if len(pts) > 1 else "", ms=9, label=tool)
        ax.set_title(f"{model}, {runtime} CPU, batch {batch}")
        ax.set_xlabel("MACs (fraction of dense)")
        ax.set_ylabel("measured latency (fraction of dense)")
        ax.grid(alpha=0.3)
    labels = {}  # one legend for every panel's markers (a panel may lack some rows)
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            labels.setdefault(lab, h)
    axes[0][0].legend(labels.values(), labels.keys(), fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    global OUT
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mobilenet_v3_large,resnet50")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--targets", default="0.5,0.25", help="MACs fractions to match")
    ap.add_argument("--latency-targets", default="0.5")
    ap.add_argument("--runtime", default="onnxruntime", help="onnxruntime | executorch (XNNPACK) | torch")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--points", type=int, default=16)
    ap.add_argument("--iters", type=int, default=4, help="bisection steps per search")
    ap.add_argument("--no-tp", action="store_true")
    ap.add_argument("--round-to", default="8", help="round_to of the uniform prunec rows (8 = 'prunec default')")
    ap.add_argument("--target-variants", default="standalone,calibrated,default",
                    help="--target-latency rows: standalone table, calibrated, default (calibrated + error curves)")
    ap.add_argument("--op-timing", default="kernel",
                    help="kernel,wall: the latency-table rows also on a table of wall-timed standalone ops")
    ap.add_argument("--method", default="l1", help="criterion of every prunec row (Torch-Pruning stays L1)")
    ap.add_argument("--refit", default=None, choices=["none", "bias", "ls"],
                    help="refit of every prunec row (default: the compile's, bias for --method flap, else none); "
                         "latency targets' error probes are refit the same way")
    ap.add_argument("--calib-photos", action="store_true",
                    help="efficientnet_lite0: sensitivity weights measured on 32 photos of pictures the agreement "
                         "set does not contain (the agreement set is then the other 130)")
    ap.add_argument("--skip-macs", action="store_true", help="only dense, --target-latency and same-latency rows")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "latency_aware.json"))
    ap.add_argument("--plot-only", action="store_true", help="redraw docs/latency.png from the JSON")
    args = ap.parse_args()
    if args.plot_only:  # --out may name several result files, comma-separated
        rows = [r for f in args.out.split(",") for r in json.loads(Path(f).read_text())["rows"]]
        plot(rows, ROOT / "docs" / "latency.png")
        return
    OUT = Path(args.out)
    args.models = args.models.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.targets = [float(t) for t in args.targets.split(",")]
    args.latency_targets = [float(t) for t in args.latency_targets.split(",") if t]
    args.round_to = [int(r) for r in args.round_to.split(",")]
    args.op_timing = args.op_timing.split(",")
    args.target_variants = {"target-latency " + v if v != "default" else "target-latency"
                            for v in args.target_variants.split(",")}
    torch.set_num_threads(args.threads)
    start = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - start:6.0f}s load {load()}] {msg}", flush=True)
    rows = []
    for name in args.models:
        rows += run_model(name, args, log)
    meta = vars(args) | {"command": "python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                         "torch": torch.__version__, "torch_pruning": tp.__version__,
                         "onnxruntime": old.ort.__version__, "seconds": round(time.time() - start)}
    OUT.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    log(f"wrote {OUT}")


if __name__ == "__main__":
    main()
