"""Transformers: head, MLP and layer pruning on small HF / timm / torchvision models.

Every case runs the verifier (pruned == original with the dropped units / branches zeroed,
rel. err ≤ 1e-4) and the pruned module's forward; HF cases also round-trip through
save_pretrained / from_pretrained, and the GQA case checks kv groups go whole.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import prunec
from prunec.layers import find_branches

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore")
SEQ = 12


def _hf(kind: str) -> tuple[torch.nn.Module, tuple, dict]:
    T = transformers
    common = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=96, max_position_embeddings=64)
    cfg, cls = {
        "bert": (lambda: T.BertConfig(**common), T.BertModel),
        "gpt2": (lambda: T.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      bos_token_id=0, eos_token_id=0), T.GPT2LMHeadModel),
        "llama": (lambda: T.LlamaConfig(**common, num_key_value_heads=2), T.LlamaForCausalLM),
        "qwen2": (lambda: T.Qwen2Config(**common, num_key_value_heads=2), T.Qwen2ForCausalLM),
        "mistral": (lambda: T.MistralConfig(**common, num_key_value_heads=1), T.MistralForCausalLM),
    }[kind]
    cfg = cfg()
    cfg._attn_implementation = "sdpa"
    model = cls(cfg).eval()
    kwargs = {"input_ids": torch.randint(0, 96, (1, SEQ)),
              "attention_mask": torch.ones(1, SEQ, dtype=torch.long)}
    if kind != "bert":
        kwargs["use_cache"] = False
    return model, (), kwargs


def _vision(kind: str) -> tuple[torch.nn.Module, tuple, dict]:
    if kind == "timm_vit":
        timm = pytest.importorskip("timm")
        model = timm.create_model("vit_small_patch16_224", pretrained=False, depth=2, img_size=64)
        x = torch.randn(1, 3, 64, 64)
    else:
        import torchvision
        model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2,
                                                     num_heads=4, hidden_dim=64, mlp_dim=128)
        torch.nn.init.normal_(model.heads.head.weight, std=0.1)  # zero-initialised by default
        x = torch.randn(1, 3, 32, 32)
    return model.eval(), (x,), {}


def build(kind: str) -> tuple[torch.nn.Module, tuple, dict]:
    torch.manual_seed(0)
    return _vision(kind) if kind in ("timm_vit", "tv_vit") else _hf(kind)


MODELS = ["bert", "gpt2", "llama", "qwen2", "mistral", "timm_vit", "tv_vit"]
SETTINGS = {"heads": dict(heads=0.5), "mlp": dict(mlp=0.5), "layers": dict(layers=0.5)}
# Module classes that can't express pruned heads: the compiler returns the ProgramModule.
UNSYNCED = {("tv_vit", "heads"): "MultiheadAttention"}


def _tensor(out: object) -> torch.Tensor:
    for attr in ("logits", "last_hidden_state"):
        if hasattr(out, attr):
            return getattr(out, attr)
    return out


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("kind", MODELS)
def test_prune_verified(kind: str, setting: str) -> None:
    model, args, kwargs = build(kind)
    result = prunec.compile(model, args, example_kwargs=kwargs, round_to=1, **SETTINGS[setting])
    report = result.report
    assert report["verify"]["passed"] and report["verify"]["exact"], report["verify"]
    assert report["verify"]["rel_err"] <= 1e-4
    assert report["macs_after"] < report["macs_before"]
    pruned_kind = {"heads": "head", "mlp": "mlp"}.get(setting)
    if pruned_kind:
        pruned = [g for g in report["groups"] if g["kept"] < g["size"]]
        assert pruned and all(g["kind"] == pruned_kind for g in pruned)
        assert len(pruned) == 2  # one group per layer
    else:
        assert len(report["plan"]["dropped_layers"]) == 2  # one block: attention + MLP branch
    with torch.no_grad():
        out = _tensor(result.model(*args, **kwargs))
        ref = _tensor(result.program(*args, **kwargs))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if (kind, setting) in UNSYNCED:
        assert not report["module_synced"] and UNSYNCED[(kind, setting)] in report["module_note"]
    else:
        assert report["module_synced"], report["module_note"]


def test_gqa_drops_whole_kv_groups() -> None:
    model, args, kwargs = build("qwen2")  # 4 query heads, 2 kv heads, head_dim 16
    coupling = prunec.analyze(model, args, kwargs)
    heads = [g for g in coupling.groups if g.kind == "head"]
    assert len(heads) == 2 and all(g.size == 2 for g in heads)  # units are kv groups
    result = prunec.compile(model, args, example_kwargs=kwargs, heads=0.5)
    attn = result.model.model.layers[0].self_attn
    assert attn.q_proj.out_features == 2 * 16 and attn.k_proj.out_features == 16
    assert attn.v_proj.out_features == 16 and attn.o_proj.in_features == 32
    assert result.model.config.num_attention_heads == 2 and result.model.config.num_key_value_heads == 1
    # the query heads kept are exactly those that read the kept kv head
    kept_kv = result.plan.kept[heads[0].name][0]
    q_full = model.model.layers[0].self_attn.q_proj.weight
    torch.testing.assert_close(attn.q_proj.weight, q_full[kept_kv * 32:(kept_kv + 1) * 32])


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_hf_roundtrip(kind: str, tmp_path) -> None:
    model, args, kwargs = build(kind)
    ratios = dict(heads=0.5, mlp=0.5, layers=0.5) if kind == "llama" else dict(mlp=0.5, layers=0.5)
    result = prunec.compile(model, args, example_kwargs=kwargs, round_to=1, **ratios)
    assert result.report["module_synced"], result.report["module_note"]
    pruned = result.model
    assert pruned.config.num_hidden_layers == 1
    pruned.save_pretrained(tmp_path)
    again = type(pruned).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(_tensor(again(**kwargs)), _tensor(pruned(**kwargs)))
    if kind == "llama":
        assert again.config.num_attention_heads == 2 and again.config.head_dim == 16
        prompt = kwargs["input_ids"][:, :5]
        cached = again.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True)
        plain = again.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False)
        assert cached.shape == (1, 10) and torch.equal(cached, plain)


def test_bert_heads_config_note() -> None:
    """BERT derives head size from hidden/heads: pruned heads sync the module, not the config."""
    from prunec.hf import check_config
    model, args, kwargs = build("bert")
    result = prunec.compile(model, args, example_kwargs=kwargs, heads=0.5)
    assert result.report["module_synced"]
    assert "config cannot express" in check_config(result.model)


def test_layer_plan_replays() -> None:
    model, args, kwargs = build("llama")
    first = prunec.compile(model, args, example_kwargs=kwargs, layers=0.5)
    again = prunec.compile(model, args, example_kwargs=kwargs, plan=first.plan)
    assert again.plan.meta["dropped_layers"] == first.plan.meta["dropped_layers"]
    with torch.no_grad():
        torch.testing.assert_close(_tensor(again.model(**kwargs)), _tensor(first.model(**kwargs)))
    bad = prunec.Plan(meta={"dropped_layers": ["model.layers.9#0"]})
    with pytest.raises(prunec.errors.InputError, match="does not have"):
        prunec.compile(model, args, example_kwargs=kwargs, plan=bad)


def test_branches_found_per_block() -> None:
    model, args, kwargs = build("gpt2")
    program = prunec.analyze(model, args, kwargs).program
    branches = find_branches(program.graph, set(program.placeholder_fqns()))
    assert [b.name for b in branches] == ["transformer.h.0#0", "transformer.h.0#1",
                                          "transformer.h.1#0", "transformer.h.1#1"]


def test_hidden_is_approximate_and_reported() -> None:
    model, args, kwargs = build("llama")
    result = prunec.compile(model, args, example_kwargs=kwargs, hidden=0.25, round_to=1)
    v = result.report["verify"]
    assert v["passed"] and not v["exact"] and v["approximate_groups"]
    assert v["rel_err"] <= 1e-4  # the exact part (nothing but the approximate group here)
    assert 0 < v["approximate"]["rel_err"] < 1  # norms read the residual stream: an error, reported, not hidden
    assert result.report["module_synced"] and result.model.config.hidden_size == 48
    assert result.model.model.embed_tokens.weight.shape == (96, 48)
