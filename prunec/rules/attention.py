"""Attention: scaled_dot_product_attention (MHA, GQA/MQA)."""
from __future__ import annotations

import numpy as np
from torch import fx

from prunec.coupling import KV_KEPT, CouplingBuilder, shape_of
from prunec.rules import arg, aten, coupling_rule, ndim, no_sizes


@coupling_rule(aten.scaled_dot_product_attention.default, fix=no_sizes)
def sdpa(node: fx.Node, g: CouplingBuilder) -> None:
    """y[b, h, l, e] = Σ_s softmax_s(q[b,h,l,:]·k[b,h/r,s,:] · scale) v[b,h/r,s,e]"""
    q, k, v, mask = arg(node, 0), arg(node, 1), arg(node, 2), arg(node, 3, "attn_mask")
    n = ndim(q)
    for d in range(n - 3):
        g.tie((q, d), (k, d), (v, d), (node, d))
    hq, hk = shape_of(q)[n - 3], shape_of(k)[n - 3]
    g.tie((q, n - 3), (node, n - 3))
    g.tie((k, n - 3), (v, n - 3))
    if hq == hk:
        g.tie((q, n - 3), (k, n - 3))
    elif g.gqa_query:  # query heads by in-group slot (head i in slot i % r), kv heads kept
        i = np.arange(hq)
        g.tie_map((q, n - 3), (q, n - 3), i, i % (hq // hk))
        g.freeze(k, n - 3, KV_KEPT)
    else:  # GQA: query head i reads kv head i // r
        i = np.arange(hq)
        g.tie_map((q, n - 3), (k, n - 3), i, i // (hq // hk))
    g.mark_head(q, n - 3)
    g.tie((q, n - 2), (node, n - 2))
    g.tie((k, n - 2), (v, n - 2))
    g.tie((v, n - 1), (node, n - 1))
    g.freeze(q, n - 1, "head_dim sets the softmax scale")
    g.freeze(k, n - 1, "head_dim sets the softmax scale")
    if mask is not None and shape_of(mask) is not None:
        ms = shape_of(mask)
        lead = n - len(ms)
        for d, size in enumerate(ms):
            target = {n - 3: (q, n - 3), n - 2: (q, n - 2), n - 1: (k, n - 2)}.get(lead + d)
            if size > 1 and target is not None and shape_of(target[0])[target[1]] == size:
                g.tie((mask, d), target)
