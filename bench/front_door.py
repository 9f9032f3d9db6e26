"""The front door, end to end through the CLI (issue 15's checks), printed as a table of facts.

    .venv/bin/python bench/front_door.py [--out bench/results/front_door] [--skip-llm]

1. timm deit_tiny_patch16_224 saved three ways as ``model.pt`` (torch.export archive, traced TorchScript,
   pickled module): ``prunec model.pt --target tensorrt --heads 0.3`` on each; the ONNX in the output
   folder runs in onnxruntime at batch 1 and 3; attention projections are genuinely smaller.
2. ``prunec torchvision:resnet50 --channels 0.5 -o r50.pt2``: the loaded .pt2 runs at batch 1, 2 and 5.
3. SmolLM2-135M (bench/smollm.py, real weights) saved as an HF folder: ``--heads 0.25 -o out`` →
   ``from_pretrained(out)`` + ``generate`` with two prompt lengths; then ``--layers 0.1 --method angular
   --calib wiki.txt -o out`` and held-out Wikipedia perplexity (disjoint articles) vs dense.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def prunec(*args: str, cwd: Path) -> tuple[int, str, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "prunec", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    out = proc.stdout + ("\n" + proc.stderr.strip().splitlines()[-1] if proc.returncode and proc.stderr else "")
    return proc.returncode, out, time.perf_counter() - start


def deit_files(out: Path) -> dict[str, tuple[Path, list[str]]]:
    import timm
    torch.manual_seed(0)
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    files = {}
    for kind in ("export", "export_dynamic_batch", "torchscript", "pickle"):
        folder = out / kind
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "model.pt"
        if kind == "export":
            torch.export.save(torch.export.export(model, (x,)), path)
        elif kind == "export_dynamic_batch":
            batch = torch.export.Dim("batch", min=1, max=256)
            torch.export.save(torch.export.export(model, (torch.randn(2, 3, 224, 224),),
                                                  dynamic_shapes=({0: batch},)), path)
        elif kind == "torchscript":
            torch.jit.save(torch.jit.trace(model, x), str(path))
        else:
            torch.save(model, path)
        extra = ["--trust-pickle", "--input-shape", "1,3,224,224"] if kind == "pickle" else []
        files[kind] = (path, extra)
    return files


def check_onnx(path: Path) -> dict[str, object]:
    import onnx
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    shapes: dict[int, object] = {}
    for b in (1, 3):
        try:
            shapes[b] = list(sess.run(None, {name: torch.randn(b, 3, 224, 224).numpy()})[0].shape)
        except Exception as err:  # noqa: BLE001 - a static ONNX refuses other batch sizes: record it
            shapes[b] = f"refused: {str(err).splitlines()[0][:120]}"
    model = onnx.load(str(path))
    qkv = [list(i.dims) for i in model.graph.initializer if "qkv.weight" in i.name or "qkv_weight" in i.name]
    return {"outputs_by_batch": shapes, "qkv_weight_shapes": qkv[:1]}


def deit_rows(out: Path) -> list[dict[str, object]]:
    rows = []
    for kind, (path, extra) in deit_files(out).items():
        code, text, secs = prunec(str(path), "--target", "tensorrt", "--heads", "0.3", *extra,
                                  "-o", "trt", "--report", "report.json", cwd=path.parent)
        row: dict[str, object] = {"case": f"deit_tiny model.pt ({kind})", "exit": code, "seconds": round(secs, 1)}
        if code == 0:
            report = json.loads((path.parent / "report.json").read_text())
            row.update(verify=report["verify"]["passed"], rel_err=report["verify"]["rel_err"],
                       macs=round(report["macs_after"] / report["macs_before"], 3),
                       dynamic=report["dynamic"]["dynamic"], dynamic_reason=report["dynamic"].get("reason"),
                       **check_onnx(path.parent / "trt" / "model.onnx"))
        else:
            row["error"] = text.strip().splitlines()[-1]
        rows.append(row)
    return rows


def resnet_row(out: Path) -> dict[str, object]:
    code, text, secs = prunec("torchvision:resnet50", "--channels", "0.5", "-o", "r50.pt2", cwd=out)
    row: dict[str, object] = {"case": "resnet50 --channels 0.5 -o r50.pt2", "exit": code, "seconds": round(secs, 1)}
    if code == 0:
        program = torch.export.load(out / "r50.pt2").module()
        row["outputs_by_batch"] = {b: list(program(torch.randn(b, 3, 224, 224)).shape) for b in (1, 2, 5)}
    return row


def perplexity(model: torch.nn.Module, windows: torch.Tensor) -> float:
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), 4):
            batch = windows[i:i + 4]
            logits = model(input_ids=batch).logits[:, :-1].float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                                     reduction="sum")
            nll, count = nll + float(loss), count + batch[:, 1:].numel()
    return float(torch.exp(torch.tensor(nll / count)))


def smollm_rows(out: Path, windows: int) -> list[dict[str, object]]:
    import transformers
    from smollm import load_smollm
    from smollm_ppl import wiki_texts
    model, tok = load_smollm()
    folder = out / "smollm2"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    texts = wiki_texts()
    half = len(texts) // 2
    (out / "wiki_calib.txt").write_text("\n".join(t for _, t in texts[:half][:400]))
    ids = tok("\n\n".join(t for _, t in texts[half:][:200]), return_tensors="pt")["input_ids"][0]
    eval_windows = torch.stack([ids[i * 128:(i + 1) * 128] for i in range(windows)])
    dense_ppl = perplexity(model, eval_windows)
    rows = []
    code, text, secs = prunec(f"hf:{folder}", "--heads", "0.25", "-o", "heads_out", "--report", "heads.json",
                              cwd=out)
    row: dict[str, object] = {"case": "SmolLM2 --heads 0.25 -o heads_out", "exit": code, "seconds": round(secs, 1)}
    if code == 0:
        pruned = transformers.AutoModelForCausalLM.from_pretrained(out / "heads_out").eval()
        ptok = transformers.AutoTokenizer.from_pretrained(out / "heads_out")
        lengths = []
        for prompt in ("Paris is", "The history of the Roman Empire spans many centuries and"):
            enc = ptok(prompt, return_tensors="pt")
            gen = pruned.generate(**enc, max_new_tokens=8, do_sample=False)
            lengths.append([enc["input_ids"].shape[1], gen.shape[1]])
        row.update(heads=pruned.config.num_attention_heads, kv_heads=pruned.config.num_key_value_heads,
                   generate_prompt_and_total_lengths=lengths)
    else:
        row["error"] = text.strip().splitlines()[-1]
    rows.append(row)
    code, text, secs = prunec(f"hf:{folder}", "--layers", "0.1", "--method", "angular", "--calib", "wiki_calib.txt",
                              "--calib-samples", "32", "--seq-len", "128", "-o", "layers_out",
                              "--report", "layers.json", cwd=out)
    row = {"case": "SmolLM2 --layers 0.1 --method angular --calib wiki_calib.txt", "exit": code,
           "seconds": round(secs, 1), "dense_ppl": round(dense_ppl, 2)}
    if code == 0:
        pruned = transformers.AutoModelForCausalLM.from_pretrained(out / "layers_out").eval()
        row.update(layers=pruned.config.num_hidden_layers, pruned_ppl=round(perplexity(pruned, eval_windows), 2),
                   eval=f"{windows} windows × 128 tokens, held-out Wikipedia articles")
    else:
        row["error"] = text.strip().splitlines()[-1]
    rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "front_door"))
    p.add_argument("--skip-llm", action="store_true")
    p.add_argument("--windows", type=int, default=32)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = deit_rows(out) + [resnet_row(out)]
    if not args.skip_llm:
        rows += smollm_rows(out, args.windows)
    for row in rows:
        print(json.dumps(row))
    (out / "results.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
