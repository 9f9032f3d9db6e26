"""SmolLM2-135M (9 query / 3 kv heads): --heads on GQA by whole kv groups vs query heads inside the groups.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/gqa_query.py --model-dir DIR   # → bench/results/gqa_query.json

Model and data as bench/smollm_ppl.py (fp32 SmolLM2 folder; Wikipedia summaries, disjoint calibration
and evaluation articles; perplexity over --windows non-overlapping 128-token windows). Each row prunes
1/3 of the heads one-shot, no refit, no fine-tuning: ``gqa='groups'`` → 6 q / 2 kv heads per layer,
``gqa='query'`` → 6 q / 3 kv. The rows run in this one process, interleaved per criterion.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm_ppl import count, data, load_fp32, perplexity  # noqa: E402

import prunec  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--windows", type=int, default=24)
    ap.add_argument("--calib", type=int, default=16)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gqa_query.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    model, tok = load_fp32(args.model_dir)
    eval_ids, calib_ids, pools = data(tok, args.windows, args.calib)
    calib = [{"input_ids": calib_ids[i:i + 4], "attention_mask": torch.ones_like(calib_ids[i:i + 4])}
             for i in range(0, len(calib_ids), 4)]
    example = {"input_ids": calib_ids[:1, :32], "attention_mask": torch.ones(1, 32, dtype=torch.long),
               "use_cache": False}
    rows = [{"name": "dense", "ppl": perplexity(model, eval_ids), "params": count(model)}]
    print(rows[-1], flush=True)
    for method in ("l1", "wanda"):
        for gqa in ("groups", "query"):
            fresh, _ = load_fp32(args.model_dir)
            start = time.perf_counter()
            result = prunec.compile(fresh, (), example_kwargs=example, heads=1 / 3, method=method, gqa=gqa,
                                    calib=calib if method != "l1" else None, static=True, inplace=True)
            seconds = time.perf_counter() - start
            cfg = result.model.config
            rows.append({"name": f"heads 1/3 {method} gqa={gqa}", "method": method, "gqa": gqa,
                         "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
                         "verified": bool(result.report["verify"]["passed"]),
                         "exact": bool(result.report["verify"]["exact"]),
                         "synced": bool(result.report["module_synced"]),
                         "ppl": perplexity(result.model, eval_ids), "params": count(result.model),
                         "compile_s": round(seconds, 1)})
            print(rows[-1], flush=True)
    load = os.getloadavg()
    out = {"model": "SmolLM2-135M fp32 (9 q / 3 kv heads, 30 layers)", "eval_windows": args.windows,
           "seq": 128, "calib_windows": args.calib, "data": pools, "load_average": [round(x, 2) for x in load],
           "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
