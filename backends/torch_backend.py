"""--target torch: a .pt2 ExportedProgram plus safetensors weights of the pruned model."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from prunec.atomic import atomic_path
from prunec.backends import register_backend
from prunec.verify import compare


@register_backend("torch")
def write_torch(result: Any, out: str | Path, options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``out`` (.pt2) and ``out`` with .safetensors; reload the .pt2 and compare outputs."""
    out = Path(out)
    ep = result.export()
    with atomic_path(out) as tmp:
        torch.export.save(ep, tmp)
        loaded = torch.export.load(tmp)
        with torch.no_grad():
            _, rel = compare(loaded.module()(*result.example_inputs, **result.example_kwargs),
                             result.model(*result.example_inputs, **result.example_kwargs))
    weights = out.with_suffix(".safetensors")
    tensors = {k: v.detach().contiguous() for k, v in result.model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(_untie(tensors), str(tmp))
    info = {"target": "torch", "artifact": str(out), "weights": str(weights),
            "bytes": out.stat().st_size, "reload_rel_err": rel}
    if result.report.get("module_synced") and hasattr(result.model, "save_pretrained"):
        info.update(_save_pretrained(result.model, out.with_suffix(".hf")))
    return info


def _save_pretrained(model: Any, directory: Path) -> dict[str, Any]:
    """A synced Hugging Face model also goes out as save_pretrained (if its config fits)."""
    from prunec.hf import check_config
    why = check_config(model)
    if why:
        return {"hf_dir": None, "hf_note": why + "; use the .pt2"}
    tmp = directory.with_name(directory.name + ".tmp")
    model.save_pretrained(tmp)
    if directory.exists():
        import shutil
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return {"hf_dir": str(directory)}


def _untie(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses shared storage: clone the second name of a tied tensor."""
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else id(v)
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out
