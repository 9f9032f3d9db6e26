"""Head counts a Hugging Face config can express: round each head group's kept count to one it validates."""
from __future__ import annotations

import copy
from typing import Any

import numpy as np

from prunec.passes.base import Pass, PassResult, State, register_pass


def config_accepts(config: Any, heads: int, kv_heads: int | None, head_dim: int) -> bool:
    """True if the model's own config class validates ``heads`` query / ``kv_heads`` kv heads."""
    cfg = copy.deepcopy(config)
    try:
        cfg.head_dim = head_dim
        cfg.num_attention_heads = heads
        if kv_heads is not None:
            cfg.num_key_value_heads = kv_heads
        validate = getattr(cfg, "validate", None)
        if callable(validate):
            validate()
    except Exception:  # noqa: BLE001 - transformers raises its own validation error types
        return False
    return True


def _holds_kv(state: State, members: Any, kv_rows: int) -> bool:
    """True if the group prunes a projection with ``kv_rows`` outputs (the kv heads go with its units)."""
    return any(d == 0 and tuple(state.program.tensor(f).shape[:1]) == (kv_rows,) for f, d in members)


@register_pass("config_heads")
class ConfigHeads(Pass):
    """Keep head counts the model's config validates (transformers 5 checks ``hidden_size %
    num_attention_heads == 0`` for Llama even when ``head_dim`` is set).
    Before: a head group keeping 3 of 4 kv groups (12 of 16 heads, hidden 2048).
    After: the nearest count the config accepts (ties keep more heads), best-scored units first."""

    requires = ("plan",)
    provides = ("plan",)

    def run(self, state: State) -> PassResult:
        config = getattr(state.model, "config", None)
        heads = getattr(config, "num_attention_heads", None)
        if not isinstance(heads, int) or not state.plan.kept:
            return PassResult(state, False)
        kv = getattr(config, "num_key_value_heads", None)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        modified = False
        for name, kept in list(state.plan.kept.items()):
            group = state.coupling.group(name)
            if group.kind != "head" or heads % group.size or len(kept) == group.size:
                continue
            q_per, kv_per = heads // group.size, (kv // group.size if isinstance(kv, int) and kv % group.size == 0
                                                  else None)
            if kv_per and not _holds_kv(state, group.members, kv * head_dim):  # gqa='query': kv heads kept
                valid = [k for k in range(1, group.size + 1) if config_accepts(config, k * q_per, kv, head_dim)]
            else:
                valid = [k for k in range(1, group.size + 1)
                         if config_accepts(config, k * q_per, k * kv_per if kv_per else None, head_dim)]
            if not valid or len(kept) in valid:
                continue
            count = min(valid, key=lambda k: (abs(k - len(kept)), -k))
            scores = state.scores.get(name)
            order = list(np.argsort(-np.asarray(scores), kind="stable")) if scores is not None else list(kept)
            state.plan.kept[name] = sorted(int(i) for i in order[:count])
            modified = True
            state.notes.append(f"{name}: kept {count * q_per} heads instead of {len(kept) * q_per}: "
                               f"{type(config).__name__} cannot express {len(kept) * q_per} "
                               f"(it accepts {[k * q_per for k in valid]})")
        return PassResult(state, modified)
