"""Peak memory of the CLI compile of an LLM (issue 14, item 1): the whole `prunec` process, measured with
`/usr/bin/time -f %M` (maximum resident set size), next to the floor of the same process kind (import torch +
transformers, `from_pretrained`, one forward) and the fp32 size of the weights.

    python bench/llm_memory.py                       # SmolLM2-135M (real) and a 1.2 GB random Llama
    python bench/llm_memory.py --python /other/venv/bin/python --label before   # another checkout, same run
    python bench/llm_memory.py --models smollm2 --label blockwise --extra=--blockwise   # block by block

Writes bench/results/llm_memory.json (rows appended per label).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "llm_memory.json"
CASE = ["--heads", "0.25", "--mlp", "0.25", "--seq-len", "64"]
FLOOR = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    m(torch.ones(1, 64, dtype=torch.long))
"""


def peak_rss(cmd: list[str], cwd: Path) -> tuple[int, float, int, str]:
    """(max RSS in bytes, wall seconds, exit code, last stderr line) of one process."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "MAXRSS %M", *cmd], cwd=cwd, capture_output=True, text=True)
    secs = time.perf_counter() - start
    lines = proc.stderr.strip().splitlines()
    kb = next(int(ln.split()[1]) for ln in reversed(lines) if ln.startswith("MAXRSS"))
    tail = next((ln for ln in reversed(lines) if not ln.startswith("MAXRSS") and ln.strip()), "")
    return kb * 1024, secs, proc.returncode, tail


def make_models(tmp: Path, which: list[str]) -> dict[str, Path]:
    """HF folders: SmolLM2-135M (bench/smollm.py) and/or a random-weight Llama of ~1.2 GB fp32."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    folders = {}
    if "smollm2" in which:
        sys.path.insert(0, str(ROOT / "bench"))
        from smollm import load_smollm
        model, tok = load_smollm()
        folders["smollm2"] = tmp / "smollm2"
        model.save_pretrained(folders["smollm2"])
        tok.save_pretrained(folders["smollm2"])
        del model
    if "llama1b" in which:
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=1536, intermediate_size=4096, num_hidden_layers=8, num_attention_heads=12,
                             num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)
        model = LlamaForCausalLM(config).eval()
        folders["llama1b"] = tmp / "llama1b"
        model.save_pretrained(folders["llama1b"], max_shard_size="500MB")
        del model
    return folders


def weights_bytes(folder: Path) -> int:
    from safetensors import safe_open
    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                sl = st.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n * 4  # fp32
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--python", default=sys.executable, help="interpreter whose prunec is measured")
    ap.add_argument("--label", default="after")
    ap.add_argument("--models", default="smollm2,llama1b")
    ap.add_argument("--extra", default="", help="more CLI flags, space-separated (e.g. --blockwise)")
    args = ap.parse_args()
    case = CASE + args.extra.split()
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for name, folder in make_models(tmp, args.models.split(",")).items():
            size = weights_bytes(folder)
            floor, floor_s, code, _ = peak_rss([args.python, "-c", FLOOR, str(folder)], tmp)
            assert code == 0, "floor run failed"
            peak, secs, code, tail = peak_rss([args.python, "-m", "prunec.cli", f"hf:{folder}", *case,
                                               "-o", str(tmp / f"{name}_out")], tmp)
            row = {"label": args.label, "model": name, "weights_mb": round(size / 1e6, 1),
                   "cli": " ".join(["prunec", f"hf:{name}", *case]), "exit": code, "last_line": tail,
                   "peak_rss_mb": round(peak / 1e6, 1), "peak_over_weights": round(peak / size, 2),
                   "floor_rss_mb": round(floor / 1e6, 1), "floor_over_weights": round(floor / size, 2),
                   "extra_over_floor_mb": round((peak - floor) / 1e6, 1),
                   "extra_over_floor_over_weights": round((peak - floor) / size, 2), "wall_s": round(secs, 1),
                   "load": Path("/proc/loadavg").read_text().split()[:3]}
            print(json.dumps(row))
            rows.append(row)
    old = json.loads(OUT.read_text()) if OUT.exists() else []
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps([r for r in old if r["label"] != args.label] + rows, indent=1))


if __name__ == "__main__":
    main()
