"""Hugging Face transformers: load ``hf:DIR`` models and keep a pruned model's config in sync.

Module attributes (``num_heads``, ``split_size``, ``nf``…) follow the sliced tensors through
the ``module_sync`` table (entries below, keyed by class). ``sync_config`` then rewrites the
shared ``config`` so ``save_pretrained`` → ``from_pretrained`` rebuilds the same shapes where the
config can say it (per-layer-uniform plans; ``head_dim`` kept explicit). ``check_config`` tells
whether it can (a model built from the config accepts the pruned state dict).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from prunec.errors import InputError
from prunec.loaded import Loaded, parse_shape

Q_NAMES = ("q_proj", "query", "q_lin")
K_NAMES = ("k_proj", "key", "k_lin")
UP_NAMES = ("up_proj", "fc1", "intermediate.dense", "lin1", "c_fc", "mlp.fc1")
ATTN_CLASSES = ("BertSelfAttention", "RobertaSelfAttention", "ViTSelfAttention", "GPT2Attention",
                "LlamaAttention", "Qwen2Attention", "MistralAttention", "PhiAttention",
                "DistilBertSelfAttention", "MultiHeadSelfAttention")


def _out_features(mod: nn.Module) -> int:
    """Output width of a Linear or a GPT-2 Conv1D (weight stored (in, out))."""
    w = mod.weight
    return w.shape[1] if type(mod).__name__ == "Conv1D" else w.shape[0]


def _child(mod: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    for n in names:
        try:
            return mod.get_submodule(n)
        except AttributeError:
            continue
    return None


def _head_dim(mod: nn.Module) -> int | None:
    for attr in ("head_dim", "attention_head_size", "dim_per_head"):
        if isinstance(getattr(mod, attr, None), int):
            return getattr(mod, attr)
    return None


def sync_attention(m: nn.Module) -> None:
    """Head counts of an HF attention module follow its (sliced) projections."""
    hd = _head_dim(m)
    if hd is None:
        raise ValueError("attention module has no head_dim attribute")
    q = _child(m, Q_NAMES)
    if q is not None:
        width = _out_features(q)
    else:  # GPT-2: fused c_attn = [q | k | v]
        width = _out_features(m.c_attn) // 3
        m.split_size = width
    heads = width // hd
    for attr in ("num_heads", "num_attention_heads", "n_heads"):
        if isinstance(getattr(m, attr, None), int):
            setattr(m, attr, heads)
    if isinstance(getattr(m, "all_head_size", None), int):
        m.all_head_size = width
    if q is None and isinstance(getattr(m, "embed_dim", None), int):  # GPT-2
        m.embed_dim = width
    k = _child(m, K_NAMES)
    if k is not None and isinstance(getattr(m, "num_key_value_groups", None), int):
        m.num_key_value_groups = heads // (_out_features(k) // hd)


def _conv1d(m: nn.Module) -> None:
    m.nf = m.weight.shape[1]


def updaters() -> dict[type, Callable[[nn.Module], None]]:
    """Module-sync entries for the transformers classes present in this install."""
    import importlib
    import transformers
    found: dict[str, type] = {}
    for mod_name in ("bert", "roberta", "vit", "gpt2", "llama", "qwen2", "mistral", "phi", "distilbert"):
        try:
            module = importlib.import_module(f"transformers.models.{mod_name}.modeling_{mod_name}")
        except ImportError:
            continue
        for cls_name in ATTN_CLASSES:
            cls = getattr(module, cls_name, None)
            if isinstance(cls, type):
                found[f"{mod_name}.{cls_name}"] = cls
    return {**{cls: sync_attention for cls in found.values()}, transformers.pytorch_utils.Conv1D: _conv1d}


def _layers(model: nn.Module) -> nn.ModuleList | None:
    """The model's list of transformer blocks (the longest ModuleList)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    return max(lists, key=len) if lists else None


def _uniform(values: list[int], what: str, notes: list[str]) -> int | None:
    if not values:
        return None
    if len(set(values)) > 1:
        notes.append(f"config cannot hold per-layer {what} {values}: keep the .pt2 / this module")
        return None
    return values[0]


def sync_config(model: nn.Module, kept_layers: list[int] | None = None) -> list[str]:
    """Rewrite ``model.config`` from the pruned module's shapes. Returns notes (non-uniform …)."""
    cfg, notes = model.config, []
    attn = [m for m in model.modules() if type(m).__name__ in ATTN_CLASSES]
    hd = next((h for h in map(_head_dim, attn) if h), None)
    if hd:
        q = [(_out_features(_child(m, Q_NAMES)) if _child(m, Q_NAMES) is not None
              else _out_features(m.c_attn) // 3) // hd for m in attn]
        heads = _uniform(q, "head counts", notes)
        if heads is not None and heads != cfg.num_attention_heads:
            cfg.head_dim = hd  # read by getattr(config, "head_dim", hidden // heads) models
            cfg.num_attention_heads = heads
        kv = [_out_features(_child(m, K_NAMES)) // hd for m in attn if _child(m, K_NAMES) is not None]
        kv_heads = _uniform(kv, "kv-head counts", notes)
        if kv_heads is not None and hasattr(cfg, "num_key_value_heads"):
            cfg.num_key_value_heads = kv_heads
    ups = [m for name, m in model.named_modules() if name.endswith(UP_NAMES) and hasattr(m, "weight")]
    inter = _uniform([_out_features(m) for m in ups], "MLP widths", notes)
    if inter is not None:
        names = cfg.to_dict()  # GPT-2's n_inner / DistilBERT's hidden_dim win over a stray intermediate_size
        attr = next((a for a in ("n_inner", "hidden_dim", "intermediate_size", "ffn_dim") if a in names), None)
        if attr is not None:
            setattr(cfg, attr, inter)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is not None and hasattr(emb, "weight"):
        for attr in ("hidden_size", "dim"):
            if hasattr(cfg, attr):
                setattr(cfg, attr, emb.weight.shape[1])
                break
    layers = _layers(model)
    if layers is not None and kept_layers is not None:
        for attr in ("num_hidden_layers", "n_layers"):
            if hasattr(cfg, attr):
                setattr(cfg, attr, len(layers))
                break
        if isinstance(getattr(cfg, "layer_types", None), list):
            cfg.layer_types = [cfg.layer_types[i] for i in kept_layers]
    return notes


def check_config(model: nn.Module) -> str:
    """'' if ``type(model)(model.config)`` accepts the pruned state dict, else why not."""
    try:
        validate = getattr(model.config, "validate", None)
        if callable(validate):
            validate()  # what save_pretrained / from_pretrained will check
        fresh = type(model)(model.config)
        missing, unexpected = fresh.load_state_dict(model.state_dict(), strict=False)
    except Exception as err:  # noqa: BLE001 - transformers raises its own validation error types
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()] or [type(err).__name__]
        return f"config cannot express the pruned shapes: {lines[-1][:200]}"
    if unexpected:
        return f"config cannot express the pruned model: unexpected keys {unexpected[:3]}"
    return ""


def load_hf(path: str, input_shape: str | None = None, seq_len: int | None = None,
            trust_remote_code: bool = False) -> Any:
    """``hf:DIR`` → Loaded(model, (), name, example_kwargs={input_ids, attention_mask})."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise InputError(f"{path} is not a Hugging Face model directory (no config.json)",
                         "pass hf:DIR where DIR was written by save_pretrained")
    try:
        import transformers
    except ModuleNotFoundError:
        raise InputError("transformers is not installed", "pip install transformers") from None
    import json
    try:
        raw = json.loads((p / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{p / 'config.json'} is not valid JSON ({err})", "write it with save_pretrained") from None
    if raw.get("auto_map") and not trust_remote_code:
        raise InputError(f"{path} names custom model code (auto_map in config.json); loading it runs that code",
                         "pass --trust-remote-code if you trust it")
    config = transformers.AutoConfig.from_pretrained(p, trust_remote_code=trust_remote_code)
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    cls = cls or transformers.AutoModel
    model = cls.from_pretrained(p, attn_implementation="sdpa", trust_remote_code=trust_remote_code).eval()
    tokenizer = _tokenizer(p)
    seq = seq_len or 32
    if input_shape:
        shape = parse_shape(input_shape)
        batch, seq = (shape[0], shape[-1]) if len(shape) > 1 else (1, shape[0])
    else:
        batch = 1
    if getattr(config, "model_type", "") in ("vit", "deit", "swin"):
        size = getattr(config, "image_size", 224)
        return Loaded(model, (torch.randn(batch, getattr(config, "num_channels", 3), size, size),), p.name,
                      extra={"hf": True, "hf_dir": str(p)})
    vocab = getattr(config, "vocab_size", 1000)
    gen = torch.Generator().manual_seed(0)
    kwargs: dict[str, Any] = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=gen),
                              "attention_mask": torch.ones(batch, seq, dtype=torch.long)}
    if getattr(config, "use_cache", False) or getattr(config, "is_decoder", False):
        kwargs["use_cache"] = False
    return Loaded(model, (), p.name, example_kwargs=kwargs, extra={"hf": True, "hf_dir": str(p),
                                                                   "tokenizer": tokenizer})


def _tokenizer(folder: Path) -> Any:
    """The folder's tokenizer, or None when it has none."""
    if not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt",
                                                  "tokenizer.model", "vocab.json")):
        return None
    import transformers
    try:
        tok = transformers.AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError):
        return None
    return tok
