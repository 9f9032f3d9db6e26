"""Transformer coverage: prunec vs Torch-Pruning on head / MLP / layer pruning.

    python bench/transformers_coverage.py            # -> bench/results/transformers.json, docs/coverage.md
    python bench/transformers_coverage.py --only llama,bert

Small random-init HF configs (4 layers, hidden 64, 4 heads), timm vit_small / deit_small /
swin_tiny and torchvision vit_b_16 at full size. Each (model, setting) runs prunec and
Torch-Pruning on a fresh copy in this process, one at a time. Random weights everywhere.
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "transformers.json"
DOC = ROOT / "docs" / "coverage.md"
BEGIN, END = "<!-- transformers:begin -->", "<!-- transformers:end -->"
SETTINGS = {"heads 0.3": dict(heads=0.3), "mlp 0.3": dict(mlp=0.3), "layers 0.25": dict(layers=0.25)}
SEQ = 16


def _hf(cls_name: str, cfg_name: str, **cfg: Any) -> Callable[[], tuple]:
    def build() -> tuple:
        import transformers as T
        common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=64)
        config = getattr(T, cfg_name)(**{**common, **cfg})
        config._attn_implementation = "sdpa"
        model = getattr(T, cls_name)(config).eval()
        if cfg_name == "ViTConfig":
            return model, (torch.randn(1, 3, 32, 32),), {}
        kwargs = {"input_ids": torch.randint(0, 128, (1, SEQ)),
                  "attention_mask": torch.ones(1, SEQ, dtype=torch.long)}
        if "CausalLM" in cls_name or "LMHead" in cls_name:
            kwargs["use_cache"] = False
        return model, (), kwargs
    return build


def _timm(name: str) -> Callable[[], tuple]:
    def build() -> tuple:
        import timm
        return timm.create_model(name, pretrained=False).eval(), (torch.randn(1, 3, 224, 224),), {}
    return build


def _tv_vit() -> tuple:
    import torchvision
    model = torchvision.models.vit_b_16(weights=None).eval()
    torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # zero-initialised by default
    return model, (torch.randn(1, 3, 224, 224),), {}


MODELS: dict[str, Callable[[], tuple]] = {
    "hf BERT": _hf("BertModel", "BertConfig"),
    "hf RoBERTa": _hf("RobertaModel", "RobertaConfig"),
    "hf DistilBERT": _hf("DistilBertModel", "DistilBertConfig", dim=64, n_layers=4, n_heads=4,
                         hidden_dim=128),
    "hf ViT": _hf("ViTModel", "ViTConfig", image_size=32, patch_size=8),
    "hf GPT-2": _hf("GPT2LMHeadModel", "GPT2Config", n_embd=64, n_layer=4, n_head=4, n_positions=64,
                    bos_token_id=0, eos_token_id=0),
    "hf Llama (GQA 4/2)": _hf("LlamaForCausalLM", "LlamaConfig", num_key_value_heads=2),
    "hf Qwen2 (GQA 4/2)": _hf("Qwen2ForCausalLM", "Qwen2Config", num_key_value_heads=2),
    "hf Mistral (GQA 4/1)": _hf("MistralForCausalLM", "MistralConfig", num_key_value_heads=1),
    "hf Phi": _hf("PhiForCausalLM", "PhiConfig"),
    "timm vit_small_patch16_224": _timm("vit_small_patch16_224"),
    "timm deit_small_patch16_224": _timm("deit_small_patch16_224"),
    "timm swin_tiny_patch4_window7_224": _timm("swin_tiny_patch4_window7_224"),
    "torchvision vit_b_16": _tv_vit,
}


def _out(o: Any) -> torch.Tensor:
    for attr in ("logits", "last_hidden_state"):
        if hasattr(o, attr):
            return getattr(o, attr)
    return o[0] if isinstance(o, (tuple, list)) else o


class _Limit:
    """SIGALRM-based wall-clock limit for one tool run (Torch-Pruning hangs on some graphs)."""

    def __init__(self, seconds: int) -> None:
        self.seconds = seconds

    def _raise(self, *_: Any) -> None:
        raise TimeoutError(f"no result within {self.seconds} s")

    def __enter__(self) -> None:
        signal.signal(signal.SIGALRM, self._raise)
        signal.alarm(self.seconds)

    def __exit__(self, *exc: Any) -> None:
        signal.alarm(0)


def _short(err: BaseException) -> str:
    return f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:110]}"


def _roundtrip(model: torch.nn.Module, args: tuple, kwargs: dict) -> str:
    """'ok' if type(model)(config) takes the state dict and gives the same output, else why not."""
    if not hasattr(model, "config") or not type(model).__module__.startswith("transformers"):
        return "n/a"
    try:
        fresh = type(model)(model.config).eval()
        fresh.load_state_dict(model.state_dict())
        with torch.no_grad():
            err = float((_out(fresh(*args, **kwargs)) - _out(model(*args, **kwargs))).abs().max())
        return "ok" if err <= 1e-5 else f"differs {err:.2g}"
    except Exception as e:  # noqa: BLE001 — any failure is a "no"
        return _short(e)


def run_prunec(build: Callable, ratios: dict) -> dict:
    import prunec
    model, args, kwargs = build()
    start = time.perf_counter()
    try:
        r = prunec.compile(model, args, example_kwargs=kwargs, round_to=1, **ratios)
    except Exception as e:  # noqa: BLE001
        return {"compiled": False, "error": _short(e)}
    rep = r.report
    row = {"compiled": True, "verified": bool(rep["verify"]["passed"] and rep["verify"]["exact"]),
           "rel_err": rep["verify"]["rel_err"], "synced": rep["module_synced"],
           "note": rep["module_note"], "macs": rep["macs_after"] / rep["macs_before"],
           "params": rep["params_after"] / rep["params_before"], "s": time.perf_counter() - start,
           "pruned": sum(g["kept"] < g["size"] for g in rep["groups"]) +
           len(rep["plan"].get("dropped_layers", [])) // 2}
    try:
        with torch.no_grad():
            row["forward"] = bool(torch.isfinite(_out(r.model(*args, **kwargs))).all())
    except Exception as e:  # noqa: BLE001
        row["forward"], row["error"] = False, _short(e)
    row["roundtrip"] = _roundtrip(r.model, args, kwargs) if r.report["module_synced"] else "n/a (ProgramModule)"
    return row


def _tp_heads(model: torch.nn.Module) -> dict:
    """qkv-like module → its head count, the way Torch-Pruning's HF/timm examples build it."""
    heads = {}
    cfg = getattr(model, "config", None)
    for name, m in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if cfg is not None and leaf in ("query", "key", "value", "q_proj", "k_proj", "v_proj",
                                        "q_lin", "k_lin", "v_lin", "c_attn"):
            kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
            heads[m] = kv if leaf in ("k_proj", "v_proj") else cfg.num_attention_heads
        elif leaf == "qkv" and hasattr(model, "blocks") or isinstance(m, torch.nn.MultiheadAttention):
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if leaf == "qkv" else m
            heads[m] = parent.num_heads
        elif leaf == "qkv":
            heads[m] = model.get_submodule(name.rsplit(".", 1)[0]).num_heads
    return heads


def run_tp(build: Callable, ratios: dict) -> dict:
    import torch_pruning as tp
    if "layers" in ratios:
        return {"compiled": False, "error": "no layer dropping in Torch-Pruning"}
    model, args, kwargs = build()
    example = kwargs if kwargs else args[0]
    heads = _tp_heads(model)
    params_before = sum(p.numel() for p in model.parameters())
    mlp_leaf = re.compile(r"(intermediate\.dense|up_proj|gate_proj|fc1|lin1|c_fc|mlp\.0|mlp\.fc1|dense_h_to_4h)$")
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]
    try:
        if "heads" in ratios:
            ignored = [m for m in linears if m not in heads]
            pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                          pruning_ratio=0.0, num_heads=heads, prune_num_heads=True,
                                          prune_head_dims=False, head_pruning_ratio=ratios["heads"],
                                          ignored_layers=ignored)
        else:
            names = {m: n for n, m in model.named_modules()}
            ignored = [m for m in linears if not mlp_leaf.search(names[m])] + \
                      [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
            pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.MagnitudeImportance(p=1),
                                          pruning_ratio=ratios["mlp"], ignored_layers=ignored,
                                          num_heads=heads)
        pruner.step()
    except Exception as e:  # noqa: BLE001
        return {"compiled": False, "error": _short(e)}
    row = {"compiled": True, "params": sum(p.numel() for p in model.parameters()) / params_before}
    try:
        with torch.no_grad():
            row["forward"] = bool(torch.isfinite(_out(model(*args, **kwargs))).all())
    except Exception as e:  # noqa: BLE001
        row["forward"], row["error"] = False, _short(e)
    row["roundtrip"] = _roundtrip(model, args, kwargs)
    return row


def table(results: list[dict]) -> str:
    mark = lambda v: "✅" if v is True else "❌" if v is False else "–"
    rt = lambda v: "✅" if v == "ok" else "–" if str(v).startswith("n/a") else "❌"
    lines = ["| model | setting | compiled | verified | rel_err | fwd | synced | HF round-trip | MACs after/before "
             "| params after/before | TP pruned | TP params after/before | TP fwd | TP HF round-trip | note |",
             "|" + "---|" * 15]
    for r in results:
        p, t = r["prunec"], r["tp"]
        note = p.get("error") or p.get("note") or ""
        if str(p.get("roundtrip", "")).startswith(("RuntimeError", "ValueError", "differs")):
            note = (note + "; " if note else "") + "round-trip: " + p["roundtrip"]
        if t.get("error"):
            note += ("; " if note else "") + "TP: " + t["error"]
        lines.append(
            f"| {r['model']} | {r['setting']} | {mark(p['compiled'])} | {mark(p.get('verified'))} | "
            f"{p['rel_err']:.1e} | " if p["compiled"] else
            f"| {r['model']} | {r['setting']} | ❌ | – | – | ")
        if p["compiled"]:
            lines[-1] += (f"{mark(p.get('forward'))} | {mark(p['synced'])} | {rt(p['roundtrip'])} | "
                          f"{p['macs']:.2f} | {p['params']:.2f} | ")
        else:
            lines[-1] += "– | – | – | – | – | "
        tp_params = f"{t['params']:.2f}" if "params" in t else "–"
        lines[-1] += f"{mark(_tp_pruned(t))} | {tp_params} | {mark(t.get('forward'))} | " \
                     f"{rt(t.get('roundtrip'))} | {note.replace('|', '/')[:160]} |"
    return "\n".join(lines)


def _tp_pruned(t: dict) -> bool:
    """Torch-Pruning ran *and* removed parameters (its step can succeed and change nothing)."""
    return bool(t.get("compiled")) and t.get("params", 1.0) < 0.999


def summary(results: list[dict]) -> str:
    n = len(results)
    count = lambda side, key: sum(1 for r in results if r[side].get(key) is True)
    tp_n = sum(1 for r in results if not r["setting"].startswith("layers"))
    rt_p = sum(1 for r in results if r["prunec"].get("roundtrip") == "ok")
    rt_t = sum(1 for r in results if r["tp"].get("roundtrip") == "ok" and _tp_pruned(r["tp"]))
    tp_ran = count("tp", "compiled")
    tp_pruned = sum(1 for r in results if _tp_pruned(r["tp"]))
    hf_n = sum(1 for r in results if r["model"].startswith("hf"))
    return (f"- prunec: compiled {count('prunec', 'compiled')}/{n}, **verified exact "
            f"{count('prunec', 'verified')}/{n}**, forward OK {count('prunec', 'forward')}/{n}, "
            f"user module synced {count('prunec', 'synced')}/{n}, HF config round-trip {rt_p}/{hf_n} HF cases\n"
            f"- Torch-Pruning 1.6.1: ran without error on {tp_ran}/{tp_n} head/MLP cases (no layer dropping), "
            f"**removed parameters in {tp_pruned}/{tp_n}** (its head setting removed none here: see note), "
            f"forward OK {count('tp', 'forward')}/{tp_n}, HF config round-trip of a pruned model {rt_t}/{hf_n} HF cases")


def write_doc(results: list[dict], command: str, started: str) -> None:
    body = (f"{BEGIN}\n## Transformers: heads, MLP, layers (prunec vs Torch-Pruning)\n\n"
            f"Command: `{command}` (run {started}, 2-core CPU host, random weights).  \n"
            "prunec: `prunec.compile(model, inputs, heads=0.3 | mlp=0.3 | layers=0.25, round_to=1)`, L1 "
            "magnitude; layers scored by angular distance 1 − cos(block input, block output) on the example "
            "input, the last block kept. *verified* = exact equivalence with the original whose dropped "
            "units / branch outputs are zeroed (rel. err ≤ 1e-4). *synced* = the user's class with updated "
            "attributes matches the program (else the ProgramModule is returned). *HF round-trip* = a model "
            "built from the pruned `config` loads the pruned state dict and gives the same output "
            "(what `save_pretrained`/`from_pretrained` needs). Torch-Pruning: `MetaPruner(num_heads=…, "
            "prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=0.3)` with every non-attention "
            "linear ignored, or `pruning_ratio=0.3` with every linear but the MLP up/gate projections ignored. "
            "HF models: 4 layers, hidden 64, 4 heads; `(GQA 4/2)`: 4 query heads on 2 kv heads. "
            "*TP pruned* = Torch-Pruning's step ran **and** removed parameters; with `pruning_ratio=0.0` and "
            "`head_pruning_ratio=0.3` its step ran but removed nothing in every head case here (our setting may be "
            "at fault; its Llama/Qwen2/Phi head runs did not finish in 90 s). Host under heavy load from other "
            "jobs during the run (load average 11–17).\n\n"
            f"{summary(results)}\n\n{table(results)}\n{END}")
    text = DOC.read_text() if DOC.exists() else "# Coverage\n"
    if BEGIN in text and END in text:
        text = text[:text.index(BEGIN)] + body + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    DOC.write_text(text)


def _guarded(run: Any, build: Any, ratios: dict, limit: int, show_traceback: bool = False) -> dict:
    """One tool on one case, seeded, under a time limit; an error becomes the result."""
    torch.manual_seed(0)
    try:
        with _Limit(limit):
            return run(build, ratios)
    except Exception as e:  # noqa: BLE001
        if show_traceback:
            traceback.print_exc()
        return {"compiled": False, "error": _short(e)}


def main() -> int:
    warnings.filterwarnings("ignore")
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", help="comma-separated substrings of model names")
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--doc-only", action="store_true", help="rewrite the doc from the saved JSON")
    args = ap.parse_args()
    started = time.strftime("%Y-%m-%d %H:%M")
    if args.doc_only:
        write_doc(json.loads(RESULTS.read_text()), "python bench/transformers_coverage.py", "2026-11-26 11:33")
        return 0
    torch.set_num_threads(2)
    results = []
    for name, build in MODELS.items():
        if args.only and not any(s.lower() in name.lower() for s in args.only.split(",")):
            continue
        for setting, ratios in SETTINGS.items():
            p = _guarded(run_prunec, build, ratios, limit=300, show_traceback=True)
            t = _guarded(run_tp, build, ratios, limit=90)
            results.append({"model": name, "setting": setting, "prunec": p, "tp": t})
            print(f"{name:34s} {setting:12s} prunec {p.get('verified')} {p.get('synced')} "
                  f"{p.get('roundtrip')} {p.get('error', '')} | TP {t.get('compiled')} {t.get('forward')} "
                  f"{t.get('error', '')}", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1, default=str))
    if not args.no_doc:
        write_doc(results, "python bench/transformers_coverage.py" +
                  (f" --only {args.only}" if args.only else ""), started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
