"""SmolLM2-135M 2:4 SparseGPT with vLLM's llmcompressor, for comparison with prunec's (docs/llm.md).

Runs in a separate venv (llmcompressor 0.14 pins torch ≤ 2.14.0 and transformers ≤ 5.17):
    /work/main/.venv/bin/python bench/smollm_llmcompressor.py --dump        # token windows → /tmp/smollm_ids.pt
    /tmp/llmc/bin/python bench/smollm_llmcompressor.py                       # → bench/results/smollm_llmcompressor.json
/tmp/llmc: python3 -m venv; a .pth file pointing at /work/main/.venv's site-packages (reuses torch 2.14.1),
then pip install --no-deps 'transformers<=5.17' compressed-tensors 'llmcompressor==0.14.*' loguru
'huggingface-hub>=1.5,<2', and httpx psutil datasets requests.
Same 40 eval / 32 calibration windows as bench/smollm_ppl.py (dumped by the main venv's tokenizer);
--model-dir, --ids, --out, --windows (eval windows, for --dump) override the defaults.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _arg(name: str, default: str) -> str:
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


DIR, IDS = _arg("--model-dir", "/tmp/smollm2_fp32"), _arg("--ids", "/tmp/smollm_ids.pt")
OUT = _arg("--out", str(Path(__file__).resolve().parent / "results/smollm_llmcompressor.json"))


def main() -> None:
    if "--dump" in sys.argv:   # --windows N: eval windows (default 40)
        from smollm_ppl import data, load_fp32
        _, tok = load_fp32(DIR)
        ev, cal, _ = data(tok, int(_arg("--windows", "40")), 32)
        torch.save({"eval": ev, "calib": cal}, IDS)
        return
    torch.set_num_threads(2)
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from smollm_ppl import perplexity
    ids = torch.load(IDS)
    model = transformers.AutoModelForCausalLM.from_pretrained(DIR, dtype=torch.float32,
                                                              attn_implementation="sdpa").eval()
    ds = Dataset.from_dict({"input_ids": ids["calib"].tolist(),
                            "attention_mask": torch.ones_like(ids["calib"]).tolist()})
    recipe = SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["lm_head"])
    load_before = Path("/proc/loadavg").read_text().split()[0]
    t = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=len(ids["calib"]),
            max_seq_length=128)
    secs = time.perf_counter() - t
    lin = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    zeros = sum(int((m.weight == 0).sum()) for m in lin) / sum(m.weight.numel() for m in lin)
    out = {"tool": "llmcompressor", "load_avg_before": load_before, "load_avg_after": Path("/proc/loadavg").read_text().split()[0],
           "eval_windows": len(ids["eval"]), "transformers": transformers.__version__, "torch": torch.__version__,
           "oneshot_s": round(secs, 1), "linear_sparsity": round(zeros, 4), "layers": len(lin),
           "ppl": round(perplexity(model.eval(), ids["eval"]), 3)}
    print(json.dumps(out))
    Path(OUT).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
