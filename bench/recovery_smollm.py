"""SmolLM2-135M: recovery by distillation after dropping 20 % of the layers (angular distance).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/recovery_smollm.py --steps 50 --seq 128
    # → bench/results/recovery_smollm.json (one subprocess per mode, so peak memory is per mode)

Model: bench/smollm.py (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to fp32). Data: the Wikipedia
summaries pool of bench/smollm_ppl.py — recovery batches are --batch × --seq token windows from
the calibration half, perplexity is measured on --windows 128-token windows of the disjoint
evaluation half. Layers: prunec.compile with LayerDrop(0.2, by="angular") (6 of 30 blocks).
Recovery: prunec.recover, logit KL at T=2 from the dense model, AdamW + warm-up/cosine over
--steps; perplexity is measured at every --eval-at step of that one run (so the 50-step point
of a 200-step run has seen a higher LR than a 50-step run would). Modes: full fine-tuning, and
LoRA r=--lora on every untied Linear (merged back at the end). Peak RSS = VmHWM reset just before
recovery starts (teacher + student + optimizer + activations).

Status: written for issue 10 but NOT yet run to completion — the shared 2-core machine was at load
12–16 that session and a 2-step smoke run did not finish loading in 8 minutes; see docs/recovery.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "recovery_smollm.json"


def child(args: argparse.Namespace) -> dict:
    import prunec
    from prunec.passes import L1, LayerDrop, Select
    from prunec.recover import Recovery
    from smollm import load_smollm
    from smollm_ppl import data, perplexity, reset_peak, rss_kb, windows, wiki_texts
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    teacher, tok = load_smollm()
    eval_ids, calib_ids, _ = data(tok, args.windows, args.calib)
    items = wiki_texts()
    train_ids = windows_of(tok, items[: len(items) // 2], args.steps * args.batch, args.seq)
    batches = [{"input_ids": b, "use_cache": False} for b in train_ids.split(args.batch)]
    example = {"input_ids": calib_ids[:8], "use_cache": False}
    if args.cut == "layers":
        zeros = {"channel": 0.0, "mlp": 0.0, "head": 0.0, "hidden": 0.0}
        result = prunec.compile(teacher, (), example_kwargs=example, method="l1",
                                passes=[L1(), Select(zeros), LayerDrop(args.layers, by="angular")])
    else:  # heads + MLP width, data-driven (wanda), calibrated on the calibration windows
        calib = [{"input_ids": b, "use_cache": False} for b in calib_ids.split(4)]
        result = prunec.compile(teacher, (), example_kwargs=example, heads=args.heads, mlp=args.mlp,
                                method=args.method, calib=calib, static=True)
    student = result.model
    row = {"mode": args.child, "cut": args.cut, "method": args.method if args.cut == "width" else "angular",
           "dropped": result.report["plan"].get("dropped_layers"),
           "module_synced": result.report["module_synced"],
           "params": sum(p.numel() for p in student.parameters()),
           "ppl_dense": perplexity(teacher, eval_ids), "ppl": {0: perplexity(student, eval_ids)}}
    print(f"{args.child}: dense ppl {row['ppl_dense']:.2f}, after drop {row['ppl'][0]:.2f}", flush=True)
    marks = set(args.eval_at)

    def progress(step: int, loss: float) -> None:
        if step in marks and step < args.steps:
            student.eval()
            row["ppl"][step] = perplexity(student, eval_ids)
            print(f"  step {step}: loss {loss:.4f} ppl {row['ppl'][step]:.2f}", flush=True)
            student.train()
    reset_peak()
    rss0 = rss_kb("VmRSS")
    t = time.perf_counter()
    lora = args.child == "lora"
    row["lr"] = args.lr_lora if lora else args.lr
    run = Recovery(lr=row["lr"], lora=args.lora if args.child == "lora" else None, progress=progress,
                   bn_batches=0).run(student, teacher, batches, args.steps)
    row["recover_wall_s"] = round(time.perf_counter() - t, 1)   # includes the intermediate ppl evals
    row["peak_rss_kb"], row["rss_before_kb"] = rss_kb("VmHWM"), rss0
    row["ppl"][args.steps] = perplexity(run.model, eval_ids)
    row["loss"] = run.report["loss"]
    row["loop_time_s"] = run.report["time_s"]
    print(f"  step {args.steps}: ppl {row['ppl'][args.steps]:.2f} ({row['recover_wall_s']}s, peak "
          f"{row['peak_rss_kb'] / 2**20:.2f} GiB)", flush=True)
    return row


def windows_of(tok, items: list, n: int, seq: int) -> torch.Tensor:
    ids: list[int] = []
    for _, text in items:
        ids += tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
        if len(ids) >= n * seq:
            break
    return torch.tensor(ids[: n * seq]).reshape(n, seq)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--eval-at", type=int, nargs="*", default=[25])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--windows", type=int, default=32, help="128-token evaluation windows")
    ap.add_argument("--cut", choices=["layers", "width"], default="layers",
                    help="layers: drop --layers (angular); width: --heads + --mlp with --method on --calib windows")
    ap.add_argument("--layers", type=float, default=0.2)
    ap.add_argument("--heads", type=float, default=0.25)
    ap.add_argument("--mlp", type=float, default=0.25)
    ap.add_argument("--method", default="wanda")
    ap.add_argument("--calib", type=int, default=8, help="128-token calibration windows (layer criterion / width)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lr-lora", type=float, default=1e-3)
    ap.add_argument("--lora", type=int, default=16)
    ap.add_argument("--modes", nargs="+", default=["full", "lora"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--child", default=None)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--add", type=Path, nargs="*", default=[],
                    help="logs of --child runs: merge their ROW lines into --out (keyed by cut and mode)")
    ap.add_argument("--plot", type=Path, default=None, help="draw --out's rows (ppl vs step, KD loss) to this PNG")
    args = ap.parse_args(argv)
    if args.add or args.plot:
        if args.add:
            merge_rows(args.out, args.add)
        if args.plot:
            plot(json.loads(args.out.read_text()), args.plot)
        return 0
    if args.child:
        print("ROW " + json.dumps(child(args)), flush=True)
        return 0
    rows = []
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--child", mode, *[a for a in (argv or sys.argv[1:])]]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sys.stderr.write(proc.stderr[-2000:] if proc.returncode else "")
        print(proc.stdout, flush=True)
        rows += [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    load = os.getloadavg()
    result = {"rows": rows, "args": {k: v for k, v in vars(args).items() if k not in ("child", "out")},
              "loadavg_after": load, "command": "python " + " ".join(sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str))
    return 0


def merge_rows(out: Path, logs: list[Path]) -> None:
    """Add the ROW line of each child log to ``out``'s rows, replacing a row of the same cut and mode."""
    result = json.loads(out.read_text()) if out.exists() else {"rows": []}
    for log in logs:
        rows = [json.loads(ln[4:]) for ln in log.read_text().splitlines() if ln.startswith("ROW ")]
        if not rows:
            raise SystemExit(f"{log}: no ROW line (the child did not finish)")
        for row in rows:
            row["log"] = str(log)
            result["rows"] = [r for r in result["rows"]
                              if (r.get("cut", "layers"), r["mode"]) != (row["cut"], row["mode"])] + [row]
    out.write_text(json.dumps(result, indent=1, default=str))


def plot(result: dict, path: Path) -> None:
    """Held-out perplexity (× dense) against recovery steps, and the KD loss per step, for every row."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for row in result["rows"]:
        label = f"{row.get('cut', 'layers')} cut, {row['mode']}"
        steps = sorted(row["ppl"], key=int)
        a.plot([int(s) for s in steps], [row["ppl"][s] / row["ppl_dense"] for s in steps], "o-", label=label)
        b.plot(row["loss"], lw=0.7, label=label)
    a.axhline(1.3, ls="--", c="gray", lw=0.8)
    a.set(xlabel="recovery step", ylabel="held-out perplexity / dense", yscale="log", title="SmolLM2-135M")
    b.set(xlabel="step", ylabel="KD loss (T=2)", yscale="log")
    for axis in (a.yaxis, b.yaxis):
        axis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    a.legend(), b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
