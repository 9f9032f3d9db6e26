"""Cross-check of the 'mlp 0.25' row of bench/smollm_ppl.py without prunec: zero the 25% MLP channels
with the lowest L1 norm (gate row + up row + down column) per layer in plain torch and measure the
same perplexity; then again sparing the layer that holds the largest |down_proj| weight
(a 'super weight', Yu et al., 2024), that channel alone, and an activation-aware score
(‖x_i‖₂ of down_proj's input on 8 calibration windows × ‖W_down[:, i]‖₁).

    HF_HUB_OFFLINE=1 .venv/bin/python bench/smollm_mlp_check.py   # after smollm_ppl.py wrote /tmp/smollm2_fp32
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from smollm_ppl import data, load_fp32, perplexity  # noqa: E402

DIR = "/tmp/smollm2_fp32"


def zero_mlp(model, ratio: float, skip: set[int]) -> None:
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            if i in skip:
                continue
            m = layer.mlp
            score = m.gate_proj.weight.abs().sum(1) + m.up_proj.weight.abs().sum(1) + m.down_proj.weight.abs().sum(0)
            drop = score.argsort()[: int(round(ratio * score.numel()))]
            m.gate_proj.weight[drop] = 0
            m.up_proj.weight[drop] = 0
            m.down_proj.weight[:, drop] = 0


def main() -> None:
    torch.set_num_threads(2)
    out = {}
    model, tok = load_fp32(DIR)
    eval_ids, calib_ids, _ = data(tok, 40, 32)
    eval_ids = eval_ids[:16]   # 16 of the 40 windows: a cheaper cross-check
    out["dense_16"] = perplexity(model, eval_ids)
    downs = [float(l.mlp.down_proj.weight.abs().max()) for l in model.model.layers]
    sw = max(range(len(downs)), key=downs.__getitem__)
    w = model.model.layers[sw].mlp.down_proj.weight
    idx = int(w.abs().argmax())
    row, col = divmod(idx, w.shape[1])
    score = (model.model.layers[sw].mlp.gate_proj.weight.abs().sum(1) + model.model.layers[sw].mlp.up_proj.weight.abs().sum(1)
             + w.abs().sum(0))
    out["super_weight"] = {"layer": sw, "row": row, "channel": col, "value": float(w[row, col]),
                           "max_abs_down_per_layer": [round(d, 3) for d in downs],
                           "channel_l1_rank_from_bottom": int((score < score[col]).sum()), "channels": int(score.numel())}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    zero_mlp(model, 0.25, set())
    out["l1_all_layers_16"] = perplexity(model, eval_ids)
    model.load_state_dict(state)
    zero_mlp(model, 0.25, {sw})
    out[f"l1_sparing_layer_{sw}_16"] = perplexity(model, eval_ids)
    model.load_state_dict(state)
    with torch.no_grad():
        model.model.layers[sw].mlp.down_proj.weight[:, col] = 0
        model.model.layers[sw].mlp.gate_proj.weight[col] = 0
        model.model.layers[sw].mlp.up_proj.weight[col] = 0
    out[f"only_channel_{col}_of_layer_{sw}_zeroed_16"] = perplexity(model, eval_ids)
    model.load_state_dict(state)
    # activation-aware channel score (Wanda-style, structured): ‖x_i‖₂ of down_proj's input channel i
    # on 8 calibration windows × ‖W_down[:, i]‖₁
    norms: dict[int, torch.Tensor] = {}
    hooks = [l.mlp.down_proj.register_forward_hook(
        lambda m, a, o, i=i: norms.__setitem__(i, norms.get(i, 0) + (a[0].detach() ** 2).sum((0, 1))))
        for i, l in enumerate(model.model.layers)]
    with torch.no_grad():
        model(input_ids=calib_ids[:8], use_cache=False)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            m = layer.mlp
            score = norms[i].sqrt() * m.down_proj.weight.abs().sum(0)
            drop = score.argsort()[: int(round(0.25 * score.numel()))]
            m.gate_proj.weight[drop] = 0
            m.up_proj.weight[drop] = 0
            m.down_proj.weight[:, drop] = 0
    out["activation_aware_all_layers_16"] = perplexity(model, eval_ids)
    print(json.dumps(out, indent=1))
    Path(Path(__file__).resolve().parent / "results/smollm_mlp_check.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
