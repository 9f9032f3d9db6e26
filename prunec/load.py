"""Load a model from a CLI spec: a .pt2, a pickled module (--trust-pickle), or a zoo name."""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from prunec.errors import InputError, TraceError
from prunec.loaded import Loaded, parse_shape

ZOO_PREFIXES = ("torchvision:", "timm:", "zoo:")


def load_weights(model: torch.nn.Module, path: str) -> None:
    """Load a state dict (safetensors or torch.load(weights_only=True)) into ``model``."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"weights file {path} does not exist", "check the --weights path")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(p))
    else:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as err:
            raise InputError(f"weights file {path} is not a safe state dict ({type(err).__name__})",
                             "save it with torch.save(model.state_dict()) or safetensors") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError) as err:
        first = str(err).strip().splitlines()[0][:200]
        raise InputError(f"weights file {path} does not fit the model: {first}",
                         "pass weights saved from the same architecture") from None


def _zoo(spec: str, shape: tuple[int, ...] | None) -> Loaded:
    source, _, name = spec.partition(":")
    if source == "torchvision":
        import torchvision
        try:
            model = torchvision.models.get_model(name, weights=None)
        except ValueError:
            raise InputError(f"torchvision has no model '{name}'",
                             "see torchvision.models.list_models() for names") from None
        default = (1, 3, 299, 299) if name == "inception_v3" else (1, 3, 224, 224)
    elif source == "timm":
        try:
            import timm
        except ModuleNotFoundError:
            raise InputError("timm is not installed", "install it with: pip install 'prunec[timm]'") from None
        try:
            model = timm.create_model(name, pretrained=False)
        except RuntimeError:
            raise InputError(f"timm has no model '{name}'", "see timm.list_models() for names") from None
        default = (1, *model.pretrained_cfg.get("input_size", (3, 224, 224)))
    else:
        from prunec import models_zoo
        model, default_inputs = models_zoo.build(name)
        if shape is None:
            return Loaded(model.eval(), default_inputs, name)
        default = shape
    shape = shape or default
    return Loaded(model.eval(), (torch.randn(*shape),), name)


def _pt2(path: Path, shape: tuple[int, ...] | None) -> Loaded:
    try:
        ep = torch.export.load(path)
    except Exception as err:
        raise InputError(f"{path} is not a readable .pt2 ExportedProgram ({type(err).__name__})",
                         "write it with torch.export.save") from None
    if shape is None:
        from torch.export.graph_signature import InputKind
        names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
        nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
        inputs = tuple(torch.randn(*[int(s) for s in nodes[n].meta["val"].shape]) for n in names)
    else:
        inputs = (torch.randn(*shape),)
    return Loaded(ep.module(), inputs, path.stem)


def _pickle(path: Path, shape: tuple[int, ...] | None, trust_pickle: bool) -> Loaded:
    with open(path, "rb") as f:
        head = f.read(2)
    if not zipfile.is_zipfile(path) and head[:1] != b"\x80":
        raise InputError(f"{path} is not a PyTorch file",
                         "pass a .pt2, a pickled nn.Module (with --trust-pickle) or a zoo name")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise InputError(f"{path} is a pickled module; loading it runs code from the file",
                             "pass --trust-pickle if you trust it, or export a .pt2 with torch.export.save") from None
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise InputError(f"{path} is not a PyTorch file ({type(err).__name__})",
                         "pass a .pt2, a pickled nn.Module (with --trust-pickle) or a zoo name") from None
    if not isinstance(obj, torch.nn.Module):
        kind = "a state dict" if isinstance(obj, dict) else type(obj).__name__
        raise InputError(f"{path} holds {kind}, not a model",
                         "give the architecture as MODEL (e.g. torchvision:resnet50) and the file as --weights")
    if shape is None:
        raise InputError(f"{path} does not record its input shape", "pass --input-shape, e.g. 1,3,224,224")
    return Loaded(obj.eval(), (torch.randn(*shape),), path.stem)


def load_model(spec: str, input_shape: str | None = None, weights: str | None = None,
               trust_pickle: bool = False, seq_len: int | None = None) -> Loaded:
    """Resolve a MODEL argument into a module and example inputs."""
    shape = parse_shape(input_shape) if input_shape else None
    if spec.startswith(ZOO_PREFIXES):
        loaded = _zoo(spec, shape)
    elif spec.startswith("hf:"):
        from prunec.hf import load_hf  # transformers models (optional extra)
        return load_hf(spec[3:], input_shape, seq_len)
    else:
        path = Path(spec)
        if not path.exists():
            raise InputError(f"model file {spec} does not exist",
                             "check the path, or name a zoo model such as torchvision:resnet50")
        if path.is_dir():
            raise InputError(f"{spec} is a directory", "for a Hugging Face model directory write hf:PATH")
        loaded = _pt2(path, shape) if path.suffix == ".pt2" else _pickle(path, shape, trust_pickle)
    if weights:
        load_weights(loaded.model, weights)
    return loaded


__all__ = ["load_model", "parse_shape", "Loaded", "TraceError"]
