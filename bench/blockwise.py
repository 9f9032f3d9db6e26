"""Block-by-block compile of a random-weight Llama larger than the memory it may use.

    OMP_NUM_THREADS=2 .venv/bin/python bench/blockwise.py                 # 10 layers, 2.15 GB fp32
    OMP_NUM_THREADS=2 .venv/bin/python bench/blockwise.py --layers 24     # 5.3 GB fp32

Model: LlamaConfig(hidden 2048, MLP 5632, GQA 16/4 heads, vocab 32000, --layers), N(0, 0.02) weights
(norms 1), written tensor by tensor as ~500 MB safetensors shards + index json (the save_pretrained
layout; never materialised whole) in a temp dir that is deleted at the end.
Compile: the CLI, ``prunec hf:DIR --heads H --mlp M -o OUT --blockwise --report R`` under
``/usr/bin/time -v`` (peak RSS = its "Maximum resident set size"; wall = "Elapsed").
Import baseline: ``/usr/bin/time -v python -c 'import prunec.cli, prunec.blockwise; from transformers import
LlamaForCausalLM'`` (what the CLI process holds before touching a weight).
Reload check (own process, not part of the compile's memory): ``AutoModelForCausalLM.from_pretrained(OUT)``
(no missing/unexpected keys), ``generate`` 8 tokens, and its logits on 2×32 random tokens vs the original
model loaded whole with every removed unit zeroed at its consumer (o_proj / down_proj input columns).
Results → bench/results/blockwise.json (appended per run, with ``uptime``).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
SHARD_BYTES = 500 * 10**6


def make_model(folder: Path, layers: int, seed: int = 0) -> int:
    """Write the random Llama's config and shards; returns the bytes of weights written."""
    import torch
    import transformers
    from prunec.shards import ShardWriter
    cfg = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=layers,
                                   num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                                   max_position_embeddings=2048, tie_word_embeddings=False,
                                   architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(cfg)
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    shards, size = [[]], 0
    for key, shape in shapes.items():
        n = 4 * int(torch.Size(shape).numel())
        if shards[-1] and size + n > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    gen = torch.Generator().manual_seed(seed)
    writer = ShardWriter(folder, len(shards))
    for keys in shards:
        writer.write({k: (torch.ones(shapes[k]) if k.endswith("norm.weight")
                          else torch.randn(shapes[k], generator=gen) * 0.02) for k in keys})
    writer.finish()
    cfg.save_pretrained(folder)
    return writer.nbytes


def timed(cmd: list[str]) -> dict:
    """Run ``cmd`` under /usr/bin/time -v: rc, peak RSS (MB), wall (s), stdout, stderr tail."""
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, cwd=ROOT)
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 1024
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    wall = int(m.group(1) or 0) * 3600 + int(m.group(2)) * 60 + float(m.group(3))
    err = "\n".join(ln for ln in proc.stderr.splitlines() if "Enum subclass" not in ln)
    return {"rc": proc.returncode, "peak_rss_mb": round(rss, 1), "wall_s": round(wall, 2),
            "stdout": proc.stdout, "stderr_tail": err[-1500:] if proc.returncode else ""}


RELOAD = r'''
import json, sys, torch, transformers
src, out, report = sys.argv[1], sys.argv[2], json.load(open(sys.argv[3]))
torch.manual_seed(1)
ids = torch.randint(0, 32000, (2, 32))
model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
model.eval()
with torch.no_grad():
    got = model(input_ids=ids).logits
    gen = model.generate(ids[:1, :8], max_new_tokens=8, do_sample=False)
del model
ref = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
cfg = ref.config
hd = cfg.hidden_size // cfg.num_attention_heads
qper = cfg.num_attention_heads // cfg.num_key_value_heads
with torch.no_grad():
    for b in report["blocks"]:
        layer = ref.model.layers[b["block"]]
        for name, kept in b["plan"].items():
            if name.startswith("self_attn"):
                gone = sorted(set(range(cfg.num_key_value_heads)) - set(kept))
                cols = [c for g in gone for c in range(g * qper * hd, (g + 1) * qper * hd)]
                layer.self_attn.o_proj.weight[:, cols] = 0
            else:
                gone = sorted(set(range(cfg.intermediate_size)) - set(kept))
                layer.mlp.down_proj.weight[:, gone] = 0
    want = ref(input_ids=ids).logits
err = float((got - want).abs().max() / want.abs().max())
print(json.dumps({"missing_keys": sorted(info["missing_keys"]), "unexpected_keys": sorted(info["unexpected_keys"]),
                  "mismatched_keys": sorted(str(m) for m in info.get("mismatched_keys", [])),
                  "generated_tokens": gen.shape[1] - 8, "logits_finite": bool(torch.isfinite(got).all()),
                  "logits_rel_err_vs_zeroed_original": err}))
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--heads", type=float, default=0.25)
    ap.add_argument("--mlp", type=float, default=0.25)
    ap.add_argument("--no-reload", action="store_true", help="skip the whole-model reload check")
    ap.add_argument("--out", default=str(ROOT / "bench/results/blockwise.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="prunec_blockwise_") as tmp:
        src, out, rep = Path(tmp) / "llama", Path(tmp) / "pruned", Path(tmp) / "report.json"
        src.mkdir()
        t0 = time.perf_counter()
        nbytes = make_model(src, args.layers)
        made = time.perf_counter() - t0
        load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        base = timed([PY, "-c", "import prunec.cli, prunec.blockwise; from transformers import LlamaForCausalLM"])
        run = timed([PY, "-m", "prunec", f"hf:{src}", "--heads", str(args.heads), "--mlp", str(args.mlp),
                     "-o", str(out), "--blockwise", "--report", str(rep)])
        print(run["stdout"], run["stderr_tail"])
        report = json.loads(rep.read_text()) if run["rc"] == 0 else {}
        reload = None
        if run["rc"] == 0 and not args.no_reload:
            r = subprocess.run(["/usr/bin/time", "-v", PY, "-c", RELOAD, str(src), str(out), str(rep)],
                               capture_output=True, text=True, cwd=ROOT)
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            reload = json.loads(lines[-1]) if lines else {"error": r.stderr.split("Command being timed")[0][-800:]}
            reload["peak_rss_mb"] = round(int(re.search(r"Maximum resident set size \(kbytes\): (\d+)",
                                                        r.stderr).group(1)) / 1024, 1)
        row = {
            "model": {"hidden": 2048, "mlp": 5632, "heads": "16/4", "vocab": 32000, "layers": args.layers,
                      "fp32_bytes": nbytes, "shard_bytes": SHARD_BYTES, "make_s": round(made, 1)},
            "command": f"prunec hf:DIR --heads {args.heads} --mlp {args.mlp} -o OUT --blockwise",
            "uptime": load, "rc": run["rc"], "stderr": run["stderr_tail"],
            "peak_rss_mb": run["peak_rss_mb"], "wall_s": run["wall_s"],
            "peak_rss_over_model": round(run["peak_rss_mb"] * 2**20 / nbytes, 3),
            "import_baseline_rss_mb": base["peak_rss_mb"],
            "peak_rss_above_imports_over_model": round((run["peak_rss_mb"] - base["peak_rss_mb"]) * 2**20 / nbytes, 3),
            "config_after": report.get("config"), "notes": report.get("notes"),
            "params_before": report.get("params_before"), "params_after": report.get("params_after"),
            "blocks_verified": sum(1 for b in report.get("blocks", []) if (b["verify"] or {}).get("passed")),
            "max_block_rel_err": max((b["verify"]["rel_err"] for b in report.get("blocks", []) if b["verify"]),
                                     default=None),
            "max_block_reload_rel_err": max((b["reload_rel_err"] for b in report.get("blocks", [])), default=None),
            "output_bytes": report.get("output_bytes"), "reload_check": reload,
        }
    print(json.dumps(row, indent=1))
    path = Path(args.out)
    rows = json.loads(path.read_text()) if path.is_file() else []
    path.write_text(json.dumps(rows + [row], indent=1))


if __name__ == "__main__":
    main()
