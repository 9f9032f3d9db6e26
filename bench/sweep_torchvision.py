"""Coverage sweep: prunec (and Torch-Pruning) on every torchvision classifier and a timm sample.

    python bench/sweep_torchvision.py            # full sweep -> bench/results/sweep.json, docs/coverage.md
    python bench/sweep_torchvision.py --quick    # ~8 models, smoke test
    python bench/sweep_torchvision.py --resume   # skip models already in sweep.json

Each model runs in its own subprocess (``--worker LIB NAME``) with a wall-clock limit; inside it,
prunec and Torch-Pruning each get an alarm-based time limit. Random weights everywhere.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import json
import math
import os
import re
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.common import TIMM_CNNS, time_limit  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "sweep.json"
DOC = ROOT / "docs" / "coverage.md"
BEGIN, END = "<!-- sweep:begin -->", "<!-- sweep:end -->"
CHANNELS = 0.3
TOOL_LIMIT_S = 120          # per tool (prunec / torch-pruning) inside a worker
WORKER_LIMIT_S = 420        # whole subprocess (model build + both tools)

TIMM_MODELS = TIMM_CNNS

# Run last (they are the slowest on a shared 2-core host): small torchvision, then timm, then these.
BIG = set("""
vit_h_14 vit_l_16 vit_l_32 regnet_y_128gf regnet_y_32gf regnet_x_32gf regnet_y_16gf regnet_x_16gf
efficientnet_b5 efficientnet_b6 efficientnet_b7 efficientnet_v2_l efficientnet_v2_m swin_b swin_v2_b
swin_s swin_v2_s resnext101_64x4d resnext101_32x8d wide_resnet101_2 wide_resnet50_2 resnet152
vgg19_bn vgg19 vgg16_bn vgg16 regnet_y_8gf regnet_x_8gf maxvit_t
""".split())

QUICK = [("torchvision", n) for n in ("resnet18", "mobilenet_v3_small", "densenet121",
                                      "shufflenet_v2_x0_5", "squeezenet1_1", "vit_b_32")] + \
        [("timm", n) for n in ("ghostnet_100", "regnetx_002")]


# ----------------------------------------------------------------------------- worker


def first_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}"
    line = next((ln for ln in text.splitlines() if ln.strip()), text)
    return line.strip()[:300]


def where(err: BaseException) -> str:
    """Innermost frame of the traceback inside the repo or a library (for triage)."""
    frames = traceback.extract_tb(err.__traceback__)
    for fr in reversed(frames):
        if "/prunec/" in fr.filename or "/passes/" in fr.filename:
            return f"{Path(fr.filename).parent.name}/{Path(fr.filename).name}:{fr.lineno}"
    if frames:
        fr = frames[-1]
        return f"{Path(fr.filename).name}:{fr.lineno}"
    return ""


def build(lib: str, name: str):
    import torch
    if lib == "torchvision":
        import torchvision
        model = torchvision.models.get_model(name, weights=None)
        size = 299 if name == "inception_v3" else 224
    else:
        import timm
        model = timm.create_model(name, pretrained=False)
        cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", {}) or {}
        h = (cfg.get("input_size") or (3, 224, 224))[-1]
        size = h if h <= 256 else 224
    model.eval()
    perturb_constants(model)
    return model, torch.randn(1, 3, size, size), size


def perturb_constants(model, seed: int = 0) -> int:
    """Add N(0, 0.1) noise to every constant float parameter/buffer (zero-init heads and biases,
    BN running stats, LayerNorm/BN affine ones, layer-scale 1e-6, zero-init last BN gamma) so the
    equivalence check cannot pass vacuously (e.g. torchvision ViT's zero-init head gives all-zero
    logits). Returns how many tensors were changed."""
    import torch
    g = torch.Generator().manual_seed(seed)
    n = 0
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point() and t.numel() > 0 and bool((t == t.flatten()[0]).all()):
                t.add_(0.1 * torch.randn(t.shape, generator=g, dtype=t.dtype))
                n += 1
    return n


def classifier_layers(model, num_out: int):
    from torch import nn
    out = []
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.out_features == num_out:
            out.append(m)
        elif isinstance(m, nn.Conv2d) and m.out_channels == num_out:
            out.append(m)
    return out


def run_prunec(model, x, res: dict) -> None:
    import torch
    import prunec
    from prunec.verify import verify
    stages: list[str] = []
    res.update(traced=False, compiled=False, verified=False)
    t0 = time.perf_counter()
    try:
        with time_limit(TOOL_LIMIT_S):
            r = prunec.compile(model, x, channels=CHANNELS, check=False, progress=stages.append)
            res["traced"], res["compiled"] = True, True
            rep = r.report
            res["time_s"] = rep["time_s"]
            t1 = time.perf_counter()
            v = verify(r.coupling, r.plan, r.program, r.example_inputs, r.example_kwargs)
            res["time_s"]["verify"] = round(time.perf_counter() - t1, 4)
            res["verify"] = v.to_json()
            res["rel_err"] = v.rel_err
            res["verified"] = bool(v.passed and v.rel_err <= 1e-4)
            res["macs_ratio"] = rep["macs_after"] / rep["macs_before"]
            res["params_ratio"] = rep["params_after"] / rep["params_before"]
            res["macs_before"], res["params_before"] = rep["macs_before"], rep["params_before"]
            res["module_synced"] = rep["module_synced"]
            res["module_note"] = rep.get("module_note", "")
            res["n_groups"] = len(rep["groups"])
            res["n_pruned_groups"] = sum(1 for g in rep["groups"] if g["kept"] < g["size"])
            res["frozen"] = len(rep["frozen"]) if hasattr(rep["frozen"], "__len__") else rep["frozen"]
            res["unknown_ops"] = {str(k): (v if isinstance(v, (int, float, str)) else str(v))
                                  for k, v in (rep.get("unknown_ops") or {}).items()}
            # independent check on a fresh input (not the one the program was traced with)
            try:
                x2 = torch.randn_like(x)
                v2 = verify(r.coupling, r.plan, r.program, (x2,), {})
                res["rel_err_fresh"] = v2.rel_err
            except Exception as err:  # noqa: BLE001
                res["rel_err_fresh_error"] = first_line(err)
            if res["verified"] is False:
                res["error"] = f"verification failed: rel_err {v.rel_err:.3g} (exact={v.exact})"
    except BaseException as err:  # noqa: BLE001
        if isinstance(err, KeyboardInterrupt):
            raise
        res["traced"] = res["traced"] or any(s != "trace" for s in stages)
        res["error"] = first_line(err)
        res["error_stage"] = stages[-1] if stages else "?"
        res["error_where"] = where(err)
    res["compile_s"] = round(time.perf_counter() - t0, 3)


def run_tp(model, x, res: dict, num_out: int) -> None:
    import torch
    import torch_pruning as tp
    res.update(tp_pruned=False, tp_forward=False)
    t0 = time.perf_counter()
    try:
        with time_limit(TOOL_LIMIT_S):
            macs0, params0 = tp.utils.count_ops_and_params(model, x)
            pruner = tp.pruner.MagnitudePruner(
                model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=CHANNELS,
                ignored_layers=classifier_layers(model, num_out))
            pruner.step()
            res["tp_pruned"] = True
            with torch.no_grad():
                out = model(x)
            leaves = [t for t in (out if isinstance(out, (tuple, list)) else [out])
                      if isinstance(t, torch.Tensor)]
            ok = bool(leaves) and tuple(leaves[0].shape) == (1, num_out) and \
                bool(torch.isfinite(leaves[0]).all())
            res["tp_forward"] = ok
            if not ok:
                res["tp_error"] = f"bad output shape/values {[tuple(t.shape) for t in leaves]}"
            macs1, params1 = tp.utils.count_ops_and_params(model, x)
            res["tp_macs_ratio"] = macs1 / macs0
            res["tp_params_ratio"] = params1 / params0
    except BaseException as err:  # noqa: BLE001
        if isinstance(err, KeyboardInterrupt):
            raise
        res["tp_error"] = first_line(err)
    res["tp_s"] = round(time.perf_counter() - t0, 3)


def worker(lib: str, name: str, tp_too: bool) -> dict:
    import torch
    torch.manual_seed(0)
    res: dict = {"lib": lib, "name": name}
    t0 = time.perf_counter()
    try:
        model, x, size = build(lib, name)
    except Exception as err:  # noqa: BLE001
        res["error"] = "model build failed: " + first_line(err)
        return res
    res["input"] = size
    res["build_s"] = round(time.perf_counter() - t0, 2)
    with torch.no_grad():
        num_out = model(x).shape[-1] if lib == "timm" else 1000
    tp_model = copy.deepcopy(model) if tp_too else None
    run_prunec(model, x, res)
    if tp_too:
        del model
        run_tp(tp_model, x, res, num_out)
    return res


# ----------------------------------------------------------------------------- driver
def run_in_subprocess(lib: str, name: str, tp_too: bool, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "--worker", lib, name, "--threads", str(threads)]
    if not tp_too:
        cmd.append("--no-tp")
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_LIMIT_S, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"lib": lib, "name": name, "error": f"worker killed after {WORKER_LIMIT_S}s",
                "wall_s": round(time.perf_counter() - t0, 1)}
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT "):
            res = json.loads(line[len("RESULT "):])
            res["wall_s"] = round(time.perf_counter() - t0, 1)
            return res
    tail = [ln for ln in p.stderr.splitlines() if ln.strip()]
    return {"lib": lib, "name": name, "error": f"worker crashed (rc {p.returncode}): "
            + (tail[-1][:300] if tail else "no output"), "wall_s": round(time.perf_counter() - t0, 1)}


def load_results() -> dict:
    if RESULTS.exists():
        return json.loads(RESULTS.read_text())
    return {"results": []}


def save_results(data: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(data, indent=1, sort_keys=False, default=str))


def fmt_ratio(v) -> str:
    return "" if v is None else f"{v:.2f}"


def yes(v) -> str:
    return "✅" if v else "❌"


def rates(rows: list[dict]) -> dict:
    n = len(rows)
    cnt = lambda k: sum(1 for r in rows if r.get(k))  # noqa: E731
    tp_rows = [r for r in rows if "tp_forward" in r or "tp_error" in r]
    timeout = lambda r, k: "timed out" in (r.get(k) or "") or "killed after" in (r.get(k) or "")  # noqa: E731
    return {"n": n, "traced": cnt("traced"), "compiled": cnt("compiled"), "verified": cnt("verified"),
            "synced": cnt("module_synced"), "tp_n": len(tp_rows), "tp_forward": cnt("tp_forward"),
            "timeouts": sum(1 for r in rows if timeout(r, "error")),
            "tp_timeouts": sum(1 for r in tp_rows if timeout(r, "tp_error"))}


def table(rows: list[dict], with_tp: bool) -> list[str]:
    head = ["model", "input", "traced", "compiled", "verified", "rel_err", "MACs after/before",
            "params after/before", "synced", "compile s"]
    if with_tp:
        head += ["TP fwd", "TP MACs ratio"]
    head += ["first error"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ts = r.get("time_s") or {}
        cs = (ts.get("total", 0) + ts.get("verify", 0)) if ts else r.get("compile_s")
        err = r.get("error", "")
        if r.get("error_where"):
            err += f" [{r.get('error_stage')} @ {r['error_where']}]"
        cells = [f"`{r['name']}`", str(r.get("input", "")), yes(r.get("traced")), yes(r.get("compiled")),
                 yes(r.get("verified")), f"{r['rel_err']:.1e}" if r.get("rel_err") is not None else "",
                 fmt_ratio(r.get("macs_ratio")), fmt_ratio(r.get("params_ratio")),
                 yes(r.get("module_synced")) if r.get("compiled") else "",
                 f"{cs:.1f}" if cs is not None else ""]
        if with_tp:
            tperr = r.get("tp_error", "")
            cells += [yes(r.get("tp_forward")) + (f" ({tperr[:80]})" if tperr else ""),
                      fmt_ratio(r.get("tp_macs_ratio"))]
        cells.append(err.replace("|", "\\|")[:220])
        out.append("| " + " | ".join(cells) + " |")
    return out


def planned() -> list[tuple[str, str]]:
    import torchvision
    todo = [("torchvision", n) for n in torchvision.models.list_models(module=torchvision.models)]
    return todo + [("timm", n) for n in TIMM_MODELS]


def write_doc(data: dict, argv: str, missing: list[tuple[str, str]] | None = None) -> None:
    rows = data["results"]
    missing = missing or []
    lines = [BEGIN, "## Coverage sweep (prunec vs Torch-Pruning)", "",
             f"Command: `{argv}`  ",
             *([f"Note: {data['note']}  "] if data.get("note") else []),
             f"Run: {data.get('started', '')} → {data.get('finished', '')}, host with 2 CPU cores, "
             f"{data.get('workers', 1)} model(s) in parallel × {data.get('threads', 1)} thread(s) each "
             "(compile times are therefore under contention; see docs/compile_time.md for clean timings).  ",
             f"Setting: `prunec.compile(model, x, channels={CHANNELS}, method='l1', round_to=8)`, random "
             "weights with every constant tensor (zero-init heads/biases, BN stats, norm affine, layer scale) "
             "perturbed by N(0, 0.1) noise so the check is not vacuous, batch 1. *verified* = prunec's verifier passed **and** rel_err ≤ 1e-4 (pruned program vs "
             "original with the removed units zeroed). *compile s* = trace+analyze+plan+rewrite+sync+cost+verify. "
             "Torch-Pruning (`torch_pruning.__version__` = 1.6.0): `MagnitudePruner(pruning_ratio=0.3, importance=L1)`, classifier ignored, "
             "otherwise default settings (no `num_heads` for attention); *TP fwd* = the pruned model's forward "
             "runs and returns a finite (1, num_classes) output — TP has no equivalence check.", ""]
    for lib, with_tp in (("torchvision", True), ("timm", False)):
        sub = [r for r in rows if r["lib"] == lib]
        if not sub:
            continue
        rt = rates(sub)
        lines += [f"### {lib} ({rt['n']} models)", "",
                  f"- prunec traced: {rt['traced']}/{rt['n']}, compiled: {rt['compiled']}/{rt['n']}, "
                  f"**verified: {rt['verified']}/{rt['n']} ({100 * rt['verified'] / max(rt['n'], 1):.0f}%)**, "
                  f"user module synced: {rt['synced']}/{rt['n']}"
                  + (f"; {rt['timeouts']} of the failures are time-outs on the loaded host, not errors"
                     if rt["timeouts"] else "")]
        if rt["tp_n"]:
            lines.append(f"- Torch-Pruning pruned-model forward OK: **{rt['tp_forward']}/{rt['tp_n']} "
                         f"({100 * rt['tp_forward'] / max(rt['tp_n'], 1):.0f}%)**"
                         + (f"; {rt['tp_timeouts']} TP runs hit the {TOOL_LIMIT_S}s limit on the loaded host "
                            f"(forward OK excluding them: {rt['tp_forward']}/{rt['tp_n'] - rt['tp_timeouts']})"
                            if rt["tp_timeouts"] else ""))
        macs = [r["macs_ratio"] for r in sub if r.get("verified")]
        if macs:
            macs.sort()
            lines.append(f"- MACs after/before over verified models: median {macs[len(macs) // 2]:.2f}, "
                         f"min {macs[0]:.2f}, max {macs[-1]:.2f}")
        lines += [""] + table(sub, with_tp) + [""]
        notrun = [n for lb, n in missing if lb == lib]
        if notrun:
            lines += [f"Not run ({len(notrun)}; the sweep was stopped at the session deadline — the host was "
                      "shared and ~6× slower than idle): " + ", ".join(f"`{n}`" for n in notrun), ""]
    lines.append(END)
    block = "\n".join(lines)
    text = DOC.read_text() if DOC.exists() else "# Coverage\n\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--worker", nargs=2, metavar=("LIB", "NAME"))
    ap.add_argument("--no-tp", action="store_true")
    ap.add_argument("--only", default="", help="regex on model names")
    ap.add_argument("--doc-only", action="store_true", help="rewrite docs/coverage.md from sweep.json")
    args = ap.parse_args()

    if args.worker:
        import torch
        torch.set_num_threads(args.threads)
        res = worker(args.worker[0], args.worker[1], not args.no_tp)
        print("RESULT " + json.dumps(res, default=str), flush=True)
        return

    argv = "python " + " ".join([str(Path(sys.argv[0]))] + sys.argv[1:])
    if args.doc_only:
        data = load_results()
        done = {(r["lib"], r["name"]) for r in data["results"]}
        write_doc(data, data.get("command", argv), [t for t in planned() if t not in done])
        return
    import torchvision
    if args.quick:
        todo = QUICK
    else:
        todo = [("torchvision", n) for n in torchvision.models.list_models(module=torchvision.models)]
        todo += [("timm", n) for n in TIMM_MODELS]
        todo.sort(key=lambda t: (t[0] == "torchvision" and t[1] in BIG, t[0] == "timm"))
    if args.only:
        todo = [t for t in todo if re.search(args.only, t[1])]
    order = {t: i for i, t in enumerate(todo)}
    data = load_results() if args.resume else {"results": []}
    done = {(r["lib"], r["name"]) for r in data["results"]}
    todo = [t for t in todo if t not in done]
    data.update(command=argv, started=data.get("started") or time.strftime("%Y-%m-%d %H:%M:%S"),
                workers=args.workers, threads=args.threads, channels=CHANNELS)
    print(f"{len(todo)} models to run", flush=True)
    with cf.ThreadPoolExecutor(args.workers) as ex:
        futs = {ex.submit(run_in_subprocess, lib, name, lib == "torchvision", args.threads): (lib, name)
                for lib, name in todo}
        for fut in cf.as_completed(futs):
            res = fut.result()
            data["results"].append(res)
            data["results"].sort(key=lambda r: (r["lib"] != "torchvision", order.get((r["lib"], r["name"]), -1),
                                                r["name"]))
            data["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
            save_results(data)
            write_doc(data, argv)
            print(f"{res['lib']:11s} {res['name']:28s} verified={res.get('verified')} "
                  f"macs={fmt_ratio(res.get('macs_ratio'))} tp_fwd={res.get('tp_forward')} "
                  f"wall={res.get('wall_s')} {res.get('error', '')[:100]}", flush=True)
    rows = data["results"]
    for lib in ("torchvision", "timm"):
        rt = rates([r for r in rows if r["lib"] == lib])
        print(lib, rt)


if __name__ == "__main__":
    main()
