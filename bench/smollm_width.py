"""SmolLM2-135M MLP width 0.25, one-shot from the CLI: criteria × (no refit / least-squares refit).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/smollm_width.py --model-dir /tmp/q14/smollm2_fp32 --windows 16

Every row is one ``prunec hf:DIR --mlp 0.25 --method M [--refit ls] --calib calib.txt --calib-samples 32
--seq-len 128 --static -o OUT`` process (timed with /usr/bin/time -v); the output folder is reloaded with
``from_pretrained`` and its perplexity measured on the eval windows of bench/smollm_ppl.py (held-out
Wikipedia summaries, non-overlapping 128-token windows, exp(mean next-token NLL)). Calibration text:
the first ``--articles`` (400) articles of the calibration pool (disjoint from the eval articles), one per line.
Results → bench/results/smollm_width.json (rows are merged, so rows can be run one at a time).
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
from smollm_ppl import load_fp32, perplexity, wiki_texts, windows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ROWS = [f"{m}{r}" for m in ("l1", "activation", "wanda", "wanda_sp", "flap") for r in ("", "+ls")]


def load_avg() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def row(name: str, args: argparse.Namespace, calib_txt: Path, eval_ids: torch.Tensor) -> dict:
    method, _, refit = name.partition("+")
    out = Path(args.work) / f"out_{name.replace('+', '_')}"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    exe = str(Path(sys.executable).parent / "prunec")
    cmd = [exe, f"hf:{args.model_dir}", "--mlp", "0.25", "--method", method, "--refit", refit or "none",
           "--calib", str(calib_txt), "--calib-samples", str(args.calib), "--seq-len", "128", "--static", "-o", str(out),
           "--report", str(out) + ".json"]
    res: dict = {"name": name, "command": " ".join(cmd[1:]), "calib_articles": args.articles,
                 "load_before": load_avg()}
    t = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    res["cli_wall_s"], res["rc"], res["load_after"] = round(time.perf_counter() - t, 1), proc.returncode, load_avg()
    if proc.returncode:
        res["stderr_tail"] = [ln for ln in proc.stderr.splitlines() if ln.strip() and "Warn" not in ln][-8:]
        return res
    peak = [ln for ln in proc.stderr.splitlines() if "Maximum resident set size" in ln]
    res["cli_maxrss_kb"] = int(peak[0].split()[-1]) if peak else None
    rep = json.loads(Path(str(out) + ".json").read_text())
    res["verify"] = {k: (rep.get("verify") or {}).get(k) for k in ("passed", "rel_err", "exact", "refit")}
    res["notes"] = [n for n in rep.get("notes", []) if "refit" in n]
    res["params_after"], res["time_s"] = rep.get("params_after"), rep.get("time_s")
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    res["intermediate_size"] = model.config.intermediate_size
    res["ppl"] = round(perplexity(model, eval_ids), 3)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", default="/tmp/smollm2_fp32")
    ap.add_argument("--work", default="/tmp/q14")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--articles", type=int, default=400, help="calibration-half articles in the calibration text")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--out", default=str(ROOT / "bench/results/smollm_width.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, tok = load_fp32(args.model_dir)
    items = wiki_texts()
    half = len(items) // 2
    calib_txt = Path(args.work) / "wiki_calib.txt"
    calib_txt.write_text("\n".join(text.replace("\n", " ") for _, text in items[:half][:args.articles]) + "\n")
    eval_ids = windows(tok, items[half:], args.windows)
    old = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    result = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)",
              "protocol": f"{args.windows} non-overlapping 128-token windows of held-out Wikipedia summaries "
                          f"(second half of the seeded shuffle), exp(mean next-token NLL); calibration "
                          f"{args.calib} windows × 128 tokens from the first {args.articles} articles of the first half",
              "rows": old.get("rows", {})}
    if "dense" not in result["rows"] or result["rows"]["dense"].get("windows") != args.windows:
        result["rows"]["dense"] = {"ppl": round(perplexity(model, eval_ids), 3), "windows": args.windows}
        print("dense", result["rows"]["dense"], flush=True)
    del model
    for name in args.rows.split(","):
        res = row(name, args, calib_txt, eval_ids)
        res["ppl_vs_dense"] = round(res["ppl"] / result["rows"]["dense"]["ppl"], 3) if "ppl" in res else None
        result["rows"][name] = res
        print(name, {k: res.get(k) for k in ("ppl", "ppl_vs_dense", "cli_wall_s", "rc", "notes")}, flush=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
