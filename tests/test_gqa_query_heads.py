"""--gqa query: query heads pruned inside their kv groups (the same in-group slots in each), kv heads
kept — on HF Llama's repeat_kv attention and on sdpa(enable_gqa=True). Tiny models, seconds."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunec

from conftest import assert_verified

transformers = pytest.importorskip("transformers")


def _llama(hidden: int = 96) -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


EXAMPLE = {"input_ids": torch.arange(32).reshape(2, 16) % 64, "attention_mask": torch.ones(2, 16, dtype=torch.long),
           "use_cache": False}


def test_query_heads_inside_groups_reload_and_generate(tmp_path: Path) -> None:
    """16 q / 4 kv, --heads 0.25: 12 q / 4 kv (3 per group) with --gqa query; 12 q / 3 kv by whole groups."""
    result = prunec.compile(_llama(), (), example_kwargs=EXAMPLE, heads=0.25, gqa="query")
    assert_verified(result)
    assert result.report["verify"]["exact"] and result.report["module_synced"]
    cfg = result.model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (12, 4)
    attn = result.model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape[0] == 12 * 6 and attn.k_proj.weight.shape[0] == 4 * 6
    assert attn.num_key_value_groups == 3 and result.plan.meta["gqa"] == "query"
    assert all(len(kept) == 3 for kept in result.plan.kept.values())   # 3 of 4 slots per layer

    result.model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 64, (1, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, result.model(input_ids=ids).logits)
    assert torch.equal(reloaded.generate(ids, max_new_tokens=6, do_sample=False),
                       result.model.generate(ids, max_new_tokens=6, do_sample=False))

    groups = prunec.compile(_llama(), (), example_kwargs=EXAMPLE, heads=0.25)
    assert (groups.model.config.num_attention_heads, groups.model.config.num_key_value_heads) == (12, 3)


def test_config_heads_keeps_the_kv_count_when_rounding_query_slots() -> None:
    """hidden 64: LlamaConfig refuses 12 heads; ConfigHeads rounds the slots, kv stays 4."""
    result = prunec.compile(_llama(64), (), example_kwargs=EXAMPLE, heads=0.5, gqa="query")
    assert_verified(result)
    assert (result.model.config.num_attention_heads, result.model.config.num_key_value_heads) == (8, 4)


class _GqaAttention(nn.Module):
    def __init__(self, dim: int = 32, heads: int = 8, kv: int = 2) -> None:
        super().__init__()
        self.heads, self.kv, self.hd = heads, kv, dim // heads
        self.q, self.k = nn.Linear(dim, heads * self.hd), nn.Linear(dim, kv * self.hd)
        self.v, self.o = nn.Linear(dim, kv * self.hd), nn.Linear(heads * self.hd, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q(x).view(b, s, -1, self.hd).transpose(1, 2)
        k = self.k(x).view(b, s, -1, self.hd).transpose(1, 2)
        v = self.v(x).view(b, s, -1, self.hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return self.o(y.transpose(1, 2).reshape(b, s, -1))


def test_sdpa_enable_gqa_prunes_query_slots_and_keeps_kv() -> None:
    torch.manual_seed(0)
    model = _GqaAttention().eval()
    result = prunec.compile(model, torch.randn(2, 5, 32), heads=0.5, gqa="query", round_to=1)
    assert_verified(result)
    state = result.model.state_dict()
    assert state["q.weight"].shape[0] == 4 * 4 and state["k.weight"].shape[0] == 2 * 4   # 2 of 4 slots, kv kept
    with pytest.raises(prunec.errors.InputError, match="gqa"):
        prunec.compile(model, torch.randn(2, 5, 32), heads=0.5, gqa="kv")
