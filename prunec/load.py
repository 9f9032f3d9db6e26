"""Load a model from a CLI spec, by content: a torch.export archive (any suffix), TorchScript, a pickled
module (--trust-pickle), or a zoo/hf name. State dicts, safetensors and ONNX get a one-line reason."""
from __future__ import annotations

import inspect

import logging
import pickle
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from prunec.errors import InputError, TraceError, first_line
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
        raise InputError(f"weights file {path} does not fit the model: {first_line(err)}",
                         "pass weights saved from the same architecture") from None


def _zoo(spec: str, shape: tuple[int, ...] | None) -> Loaded:
    source, _, name = spec.partition(":")
    if source == "torchvision":
        import torchvision
        try:
            builder = torchvision.models.get_model_builder(name)
            # detection/segmentation builders default to downloading ImageNet backbone weights
            backbone = {"weights_backbone": None} if "weights_backbone" in inspect.signature(builder).parameters else {}
            model = builder(weights=None, **backbone)
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
    return Loaded(model.eval(), (example_image(model, shape),), name)


def example_image(model: torch.nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """A random example input: uniform in [0, 1] for torchvision's detectors (they normalise images in that
    range themselves; N(0, 1) pixels saturate their scores into ties), N(0, 1) for everything else."""
    detector = type(model).__module__.startswith("torchvision.models.detection")
    return torch.rand(*shape) if detector else torch.randn(*shape)


def sniff(path: Path) -> str:
    """What a model file holds, by content: export | torchscript | torch_save | pickle | safetensors | onnx | unknown."""
    with open(path, "rb") as f:
        head = f.read(16)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as z:
                parts = {n.split("/", 2)[1] for n in z.namelist() if n.count("/") >= 1}
        except (zipfile.BadZipFile, OSError):
            return "unknown"
        if "archive_format" in parts:
            return "export"
        if "constants.pkl" in parts and "code" in parts:
            return "torchscript"
        return "torch_save" if "data.pkl" in parts else "unknown"
    if head[:1] == b"\x80":
        return "pickle"
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"
    if path.suffix.lower() == ".onnx" or (head[:1] == b"\x08" and b"onnx" in path.read_bytes()[:4096].lower()):
        return "onnx"
    return "unknown"


@contextmanager
def _quiet() -> Iterator[None]:
    """torch prints warnings (archive suffix, TorchScript deprecation) on load: keep them off the CLI."""
    loggers = [logging.getLogger(n) for n in ("torch.export", "torch._export", "torch.export.pt2_archive")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _user_input_shapes(ep: torch.export.ExportedProgram) -> list[tuple[Any, ...]]:
    from torch.export.graph_signature import InputKind
    names = [s.arg.name for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    return [tuple(nodes[n].meta["val"].shape) for n in names]


def _bound(value: Any) -> int | None:
    """A finite integer bound of a sympy range, or None for ±infinity."""
    try:
        v = int(value)
    except (TypeError, ValueError, AttributeError, OverflowError):
        return None
    return v if abs(v) < 2 ** 62 else None


def recorded_dynamic_shapes(ep: torch.export.ExportedProgram) -> tuple[dict[int, Any], ...] | None:
    """The user's dynamic dims (with their ranges) of a loaded ExportedProgram, as a dynamic_shapes spec."""
    spec, any_dynamic = [], False
    for shape in _user_input_shapes(ep):
        dims = {}
        for d, s in enumerate(shape):
            if isinstance(s, torch.SymInt):
                vr = ep.range_constraints.get(s.node.expr)
                lo = _bound(vr.lower) if vr is not None else None
                hi = _bound(vr.upper) if vr is not None else None
                name = f"dim_{len(spec)}_{d}"
                dims[d] = torch.export.Dim(name, min=max(lo or 0, 0), max=hi) if hi else \
                    torch.export.Dim(name, min=max(lo or 0, 0))
                any_dynamic = True
        spec.append(dims)
    return tuple(spec) if any_dynamic else None


def _example(shape: tuple[Any, ...]) -> torch.Tensor:
    """A random example for a recorded shape (symbolic dims take their hint, at least 2)."""
    sizes = [max(2, int(s.node.hint)) if isinstance(s, torch.SymInt) and s.node.hint is not None
             else (2 if isinstance(s, torch.SymInt) else int(s)) for s in shape]
    return torch.randn(*sizes)


def _export_archive(path: Path, shape: tuple[int, ...] | None) -> Loaded:
    try:
        with _quiet():
            ep = torch.export.load(path)
    except Exception as err:
        raise InputError(f"{path} is not a readable torch.export archive ({type(err).__name__})",
                         "write it again with torch.export.save") from None
    if shape is None:
        inputs = tuple(_example(s) for s in _user_input_shapes(ep))
    else:
        inputs = (torch.randn(*shape),)
    extra = {"dynamic_shapes": recorded_dynamic_shapes(ep)} if shape is None else {}
    return Loaded(ep.module(), inputs, path.stem, extra={k: v for k, v in extra.items() if v})


def _torchscript(path: Path, shape: tuple[int, ...] | None) -> Loaded:
    """A TorchScript archive → ExportedProgram with torch's converter (TorchScript is not arbitrary pickle)."""
    with zipfile.ZipFile(path) as z:
        traced = any(n.endswith("/traced_inputs.pkl") for n in z.namelist())
    try:
        with _quiet():
            scripted = torch.jit.load(str(path), map_location="cpu", _restore_shapes=traced)
    except Exception as err:
        raise InputError(f"{path} is a TorchScript archive that torch.jit.load cannot read ({type(err).__name__})",
                         "save it again with torch.jit.save, or export a .pt2 with torch.export.save") from None
    if shape is None:
        recorded: list[tuple[int, ...] | None] = [] if traced else [None]
        for value in list(scripted.forward.graph.inputs())[1:]:
            sizes = value.type().sizes() if hasattr(value.type(), "sizes") else None
            recorded.append(tuple(sizes) if sizes and all(isinstance(s, int) for s in sizes) else None)
        if not recorded or any(r is None for r in recorded):
            raise InputError(f"{path} is a scripted TorchScript model that does not record its input shape",
                             "pass --input-shape, e.g. 1,3,224,224")
        inputs = tuple(torch.randn(*r) for r in recorded)
    else:
        inputs = (torch.randn(*shape),)
    try:
        from torch._export.converter import TS2EPConverter
        # the converter marks every dim Dim.AUTO: a batch of 2 keeps the batch symbolic (1 would specialise)
        wide = tuple(torch.cat([t, t]) if t.dim() and t.shape[0] == 1 else t for t in inputs)
        with _quiet(), torch.no_grad():
            try:
                ep = TS2EPConverter(scripted, wide).convert()
            except Exception:  # noqa: BLE001 - some scripts only accept the recorded batch
                ep = TS2EPConverter(scripted, inputs).convert()
    except Exception as err:  # the converter raises many types
        raise InputError(f"{path} is TorchScript that torch's converter cannot turn into an ExportedProgram: "
                         f"{first_line(err)}",
                         "export the model from its PyTorch code with torch.export.save and pass the .pt2") from None
    module = ep.module()
    for fqn, _ in scripted.named_parameters():  # the converter lifts parameters as buffers: restore them
        *parents, leaf = fqn.split(".")
        owner = module.get_submodule(".".join(parents)) if parents else module
        tensor = owner._buffers.pop(leaf, None) if leaf in owner._buffers else None
        if tensor is not None:
            owner.register_parameter(leaf, torch.nn.Parameter(tensor, requires_grad=tensor.is_floating_point()))
    recorded = recorded_dynamic_shapes(ep) or ()  # the converter marks every dim AUTO: keep the batch only
    batch_only = tuple({0: dims[0]} if 0 in dims else {} for dims in recorded)
    extra = {"source": "torchscript", "dynamic_shapes": batch_only if any(batch_only) else None}
    return Loaded(module, inputs, path.stem, extra={k: v for k, v in extra.items() if v})


def _pickle(path: Path, shape: tuple[int, ...] | None, trust_pickle: bool) -> Loaded:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise InputError(f"{path} is a pickled module; loading it runs code from the file",
                             "pass --trust-pickle if you trust it, or export a .pt2 with torch.export.save") from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # unpickling user code can raise anything
            raise InputError(f"{path} could not be unpickled ({type(err).__name__}: {str(err)[:150]})",
                             "unpickle it where its classes are importable, or export a .pt2") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as err:
        raise InputError(f"{path} is a truncated or damaged PyTorch file ({type(err).__name__})",
                         "save it again") from None
    if not isinstance(obj, torch.nn.Module):
        kind = "a state dict" if isinstance(obj, dict) else type(obj).__name__
        raise InputError(f"{path} holds {kind}, not a model",
                         "give the architecture as MODEL (e.g. torchvision:resnet50) and the file as --weights")
    extra = {}
    if shape is None:
        shape, source = declared_input_shape(obj)
        if shape is None:
            raise InputError(f"{path} does not record its input shape", "pass --input-shape, e.g. 1,3,224,224")
        extra["note"] = (f"input shape {','.join(map(str, shape))} from the model's {source} "
                         "(--input-shape sets another)")
    return Loaded(obj.eval(), (example_image(model=obj, shape=shape),), path.stem, extra=extra)


def declared_input_shape(model: torch.nn.Module) -> tuple[tuple[int, ...] | None, str]:
    """A batch-1 image shape the model declares, and where: timm's ``pretrained_cfg["input_size"]``, or a
    Hugging Face vision config's ``num_channels`` and ``image_size``; (None, "") when it declares none."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and len(cfg.get("input_size") or ()) == 3:
        shape = (1, *(int(d) for d in cfg["input_size"]))
        built = getattr(getattr(model, "patch_embed", None), "img_size", None)   # a ViT built at another size
        if isinstance(built, (list, tuple)) and len(built) == 2 and tuple(built) != shape[2:]:
            return (*shape[:2], int(built[0]), int(built[1])), "timm patch_embed.img_size"
        return shape, "timm pretrained_cfg"
    config = getattr(model, "config", None)
    size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if isinstance(channels, int) and isinstance(size, int):
        size = (size, size)
    if isinstance(channels, int) and isinstance(size, (list, tuple)) and len(size) == 2:
        return (1, channels, int(size[0]), int(size[1])), "config (num_channels, image_size)"
    return None, ""


def _model_file(path: Path, shape: tuple[int, ...] | None, trust_pickle: bool) -> Loaded:
    """Load a model file by what it holds, whatever its suffix."""
    kind = sniff(path)
    if kind == "export":
        return _export_archive(path, shape)
    if kind == "torchscript":
        return _torchscript(path, shape)
    if kind in ("torch_save", "pickle"):
        return _pickle(path, shape, trust_pickle)
    if kind == "safetensors":
        try:
            from safetensors import safe_open
            with safe_open(str(path), "pt") as f:
                f.keys()
        except Exception:  # noqa: BLE001 - any failure means a damaged file
            raise InputError(f"{path} is a truncated or damaged safetensors file", "write it again") from None
        raise InputError(f"{path} holds weights (safetensors), not a model",
                         "give the architecture as MODEL (e.g. torchvision:resnet50) and the file as --weights")
    if kind == "onnx":
        raise InputError(f"{path} is an ONNX model; prunec prunes PyTorch programs and cannot read ONNX yet",
                         "export the model from PyTorch with torch.export.save and pass the .pt2")
    size = path.stat().st_size
    raise InputError(f"{path} is not a PyTorch file" + (" (it is empty)" if size == 0 else " (or it is truncated)"),
                     "pass a torch.export archive, a TorchScript file, a pickled nn.Module (with --trust-pickle) "
                     "or a zoo name")


def load_model(spec: str, input_shape: str | None = None, weights: str | None = None,
               trust_pickle: bool = False, seq_len: int | None = None, trust_remote_code: bool = False) -> Loaded:
    """Resolve a MODEL argument into a module and example inputs."""
    shape = parse_shape(input_shape) if input_shape else None
    if spec.startswith(ZOO_PREFIXES):
        loaded = _zoo(spec, shape)
    elif spec.startswith("hf:"):
        from prunec.hf import load_hf  # transformers models (optional extra)
        return load_hf(spec[3:], input_shape, seq_len, trust_remote_code)
    else:
        path = Path(spec)
        if not path.exists():
            raise InputError(f"model file {spec} does not exist",
                             "check the path, or name a zoo model such as torchvision:resnet50")
        if path.is_dir():
            raise InputError(f"{spec} is a directory", "for a Hugging Face model directory write hf:PATH")
        loaded = _model_file(path, shape, trust_pickle)
    if weights:
        load_weights(loaded.model, weights)
    return loaded


__all__ = ["load_model", "parse_shape", "Loaded", "TraceError"]
