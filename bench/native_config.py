"""diffusers small configs at channels 0.3: the config-expressible plan (native_config=True) vs the free
plan (native_config=False): MACs, and whether diffusers' own from_pretrained reloads save_pretrained's
folder with the same output. Usage: python bench/native_config.py --out bench/results/native_config.json"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import prunec  # noqa: E402
from prunec.frameworks.diffusers import check_config  # noqa: E402
from tests.test_frameworks import _first, _unet, _unet_cond, _vae  # noqa: E402  (the configs the tests use)

MODELS = {"unet2d": _unet, "unet2d_condition": _unet_cond, "autoencoder_kl": _vae,
          "autoencoder_kl_no_mid_attention": lambda: _vae(mid_block_add_attention=False)}


def native_reload(result: Any) -> float | str:
    """max |Δ| between the pruned model and ``type(model).from_pretrained`` of its folder, or the error."""
    with tempfile.TemporaryDirectory() as tmp:
        result.model.save_pretrained(tmp)
        try:
            reloaded = type(result.model).from_pretrained(tmp).eval()
        except (ValueError, RuntimeError) as err:
            return f"refused: {str(err)[:120]}"
        with torch.no_grad():
            inputs = result.example_inputs
            return float((_first(reloaded(*inputs)) - _first(result.model(*inputs))).abs().max())


def row(name: str, channels: float) -> dict[str, Any]:
    model, inputs = MODELS[name]()
    out: dict[str, Any] = {"model": name, "channels": channels}
    for mode, flag in (("free", False), ("native", True)):
        r = prunec.compile(model, inputs, channels=channels, static=True, native_config=flag)
        out[mode] = {"macs_ratio": round(r.report["macs_after"] / r.report["macs_before"], 4),
                     "verify_passed": r.report["verify"]["passed"], "check_config": check_config(r.model),
                     "native_reload_max_abs_diff": native_reload(r),
                     "config": r.report["passes"].get("native_config", {}).get("config"),
                     "kept_whole": r.report["passes"].get("native_config", {}).get("refused")}
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="bench/results/native_config.json")
    p.add_argument("--channels", type=float, default=0.3)
    args = p.parse_args()
    rows = [row(name, args.channels) for name in MODELS]
    with open(args.out, "w") as f:
        json.dump({"uptime": os.popen("uptime").read().strip(), "rows": rows}, f, indent=1)
    for r in rows:
        print(r["model"], "free", r["free"]["macs_ratio"], "native", r["native"]["macs_ratio"],
              r["native"]["config"], "reload", r["free"]["native_reload_max_abs_diff"],
              r["native"]["native_reload_max_abs_diff"])


if __name__ == "__main__":
    main()
