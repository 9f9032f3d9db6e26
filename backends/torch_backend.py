"""--target torch: a .pt2 ExportedProgram plus safetensors weights, or, for hf: inputs, a Hugging Face folder."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from prunec.atomic import atomic_path
from prunec.backends import register_backend
from prunec.backends.sparsity import apply_from_options
from prunec.verify import compare

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model",
                   "chat_template.jinja", "chat_template.json", "preprocessor_config.json")
SPARSE_NOTE = ("2:4 weights written; PyTorch runs them dense unless converted on a CUDA GPU with "
               "torch.sparse.to_sparse_semi_structured")


@register_backend("torch")
def write_torch(result: Any, out: str | Path, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``out`` (.pt2) and ``out`` with .safetensors (or an HF folder); reload and compare outputs."""
    options = options or {}
    out = Path(out)
    sparsity = apply_from_options(result, options)
    if sparsity is not None:
        sparsity["note"] = SPARSE_NOTE
    if options.get("hf_folder"):
        return {**_write_hf_folder(result, out, options), "sparsity": sparsity}
    info = {"target": "torch", "artifact": str(out), **_write_pt2(result, out)}
    weights = out.with_suffix(".safetensors")
    with atomic_path(weights) as tmp:
        _save_weights(result.model, tmp)
    info.update(weights=str(weights), sparsity=sparsity)
    return info


def _write_pt2(result: Any, path: Path) -> dict[str, Any]:
    """Export, save atomically, reload, and compare the reloaded program with the pruned model."""
    ep = result.export()
    with atomic_path(path) as tmp:
        torch.export.save(ep, tmp)
        loaded = torch.export.load(tmp)
        kwargs = {k: v for k, v in result.example_kwargs.items() if isinstance(v, torch.Tensor)}
        with torch.no_grad():
            _, rel = compare(loaded.module()(*result.example_inputs, **kwargs),
                             result.model(*result.example_inputs, **result.example_kwargs))
    return {"bytes": path.stat().st_size, "reload_rel_err": rel, "dynamic": result.dynamic is not None}


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(_untie(tensors), str(path))


def _write_hf_folder(result: Any, out: Path, options: dict[str, Any]) -> dict[str, Any]:
    """A folder ``from_pretrained`` loads: config.json, safetensors, generation config, the input's tokenizer
    files, plus ``model.pt2``. When the config can't express the pruned model, the folder holds the
    ``.pt2`` and the safetensors only, and the note says why."""
    from prunec.hf import check_config
    model = result.model
    why = "" if result.report.get("module_synced") and hasattr(model, "save_pretrained") \
        else "the pruned model is not the Hugging Face class (see the module note)"
    why = why or check_config(model)
    source = Path((options.get("loaded").extra or {}).get("hf_dir", "")) if options.get("loaded") else None
    info: dict[str, Any] = {"target": "torch", "artifact": str(out), "hf_dir": None if why else str(out)}
    with atomic_path(out) as tmp:
        tmp.mkdir()
        if why:
            _save_weights(model, tmp / "model.safetensors")
            info["hf_note"] = f"config cannot express the pruned model ({why}): the folder holds model.pt2"
        else:
            model.save_pretrained(tmp)
            if source is not None:
                for name in TOKENIZER_FILES:
                    if (source / name).is_file():
                        shutil.copy2(source / name, tmp / name)
            info["reload_from_pretrained_rel_err"] = _reload_hf(type(model), tmp, result)
        info.update(_write_pt2(result, tmp / "model.pt2"))
    return info


def _reload_hf(cls: type, folder: Path, result: Any) -> float:
    """from_pretrained the written folder and compare its output with the pruned model's."""
    fresh = cls.from_pretrained(folder, attn_implementation="sdpa").eval()
    with torch.no_grad():
        _, rel = compare(fresh(*result.example_inputs, **result.example_kwargs),
                         result.model(*result.example_inputs, **result.example_kwargs))
    return rel


def _untie(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: clone the second name of a tied tensor."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else id(v)
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out
