"""Fashion-MNIST: test accuracy vs. MACs removed for data-free and data-driven criteria.

    python bench/fashion_mnist.py     # ~15 min on 2 busy cores; writes bench/results/fashion_mnist.json, docs/data_driven.png

Trains a small residual CNN (cached in bench/cache/), then for each MACs-removed target
(30/50/70 %) prunes it with prunec's l1, bn, taylor, activation, thinet, lasso and with
Torch-Pruning's MagnitudePruner (L1), and measures test accuracy without fine-tuning and after
one epoch of fine-tuning. prunec methods share one uniform channel ratio per target (found by
bisection with TargetSearch, round_to=1); Torch-Pruning's ratio is bisected on the same MACs
counter (prunec.cost.count_macs), so every row is at (nearly) the same MACs.
Data: Debian dataset-fashion-mnist (/usr/share/datasets/fashion-mnist); if absent, falls back
to sklearn's 8×8 digits (and says so).
"""
from __future__ import annotations

import argparse
import copy
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import prunec
from prunec.cost import count_macs
from prunec.passes import Select
from prunec.passes.activation import Activation
from prunec.passes.lasso import Lasso
from prunec.passes.target_search import TargetSearch
from prunec.passes.taylor import Taylor
from prunec.passes.thinet import ThiNet

ROOT = Path(__file__).resolve().parents[1]
DATA = Path("/usr/share/datasets/fashion-mnist")
CACHE = ROOT / "bench" / "cache"
OUT = ROOT / "bench" / "results" / "fashion_mnist.json"
PNG = ROOT / "docs" / "data_driven.png"
METHODS = ("l1", "bn", "taylor", "activation", "thinet", "lasso", "tp_magnitude")


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResCNN(nn.Module):
    """stem(w) → pool → block(w) → down(2w, /2) → block(2w) → GAP → fc(10)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block1 = Block(width)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.block2 = Block(2 * width)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block1(nn.functional.max_pool2d(self.stem(x), 2))
        x = self.block2(self.down(x))
        return self.fc(x.mean((2, 3)))


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path) as f:
        data = f.read()
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, str]:
    if DATA.is_dir():
        xs = [_idx(DATA / f"{s}-images-idx3-ubyte.gz") for s in ("train", "t10k")]
        ys = [_idx(DATA / f"{s}-labels-idx1-ubyte.gz") for s in ("train", "t10k")]
        name = "Fashion-MNIST (Debian dataset-fashion-mnist)"
    else:
        from sklearn.datasets import load_digits
        d = load_digits()
        x = np.kron(d.images, np.ones((4, 4)))[:, 2:30, 2:30] * 16  # 8×8 → 28×28 (approx. 0..255)
        xs, ys = [x[:1500], x[1500:]], [d.target[:1500], d.target[1500:]]
        name = "sklearn digits (fallback: Fashion-MNIST not installed)"
    norm = [torch.tensor((x.astype(np.float32) / 255.0 - 0.2860) / 0.3530)[:, None] for x in xs]
    return norm[0], torch.tensor(ys[0].astype(np.int64)), norm[1], torch.tensor(ys[1].astype(np.int64)), name


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, lr: float, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * ((len(x) + 127) // 128))
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            sched.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float(sum((model(xb).argmax(1) == yb).sum() for xb, yb in zip(x.split(1000), y.split(1000))) / len(x))


def prunec_model(method: str, model: nn.Module, example: tuple, ratio: float, calib: list,
                 labels: list) -> tuple[nn.Module, bool]:
    sel = Select({"channel": ratio}, round_to=1)
    passes = {"l1": None, "bn": None,
              "taylor": [Taylor(labels=labels), sel], "activation": [Activation(), sel],
              "thinet": [ThiNet(ratio, samples=4096, round_to=1)],
              "lasso": [Lasso(ratio, samples=4096, round_to=1)]}[method]
    result = prunec.compile(model, example, channels=ratio, method=method if passes is None else "l1",
                            round_to=1, passes=passes, calib=calib)
    assert result.report["verify"]["passed"]
    return result.model, bool(result.report["module_synced"])


def tp_model(model: nn.Module, example: tuple, target_keep: float, base_macs: int) -> nn.Module:
    import torch_pruning as tp

    def prune(ratio: float) -> nn.Module:
        m = copy.deepcopy(model)
        pruner = tp.pruner.MagnitudePruner(m, example[0], importance=tp.importance.MagnitudeImportance(p=1),
                                           pruning_ratio=ratio, ignored_layers=[m.fc])
        pruner.step()
        return m.eval()

    lo, hi = 0.0, 0.95
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if count_macs(prune(mid), example) / base_macs >= target_keep else (lo, mid)
    return prune(lo)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--ft-epochs", type=int, default=1)
    ap.add_argument("--removed", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--calib", type=int, default=512, help="calibration images (training set)")
    ap.add_argument("--train-subset", type=int, default=12000,
                    help="training images used for training and for the fine-tuning epoch (2-core budget)")
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--plot", type=Path, default=PNG)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    xtr, ytr, xte, yte, data_name = load_data()
    sub = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(0))[:args.train_subset]
    xtr, ytr = xtr[sub], ytr[sub]
    CACHE.mkdir(parents=True, exist_ok=True)
    weights = CACHE / f"rescnn_w{args.width}_e{args.epochs}_{len(xtr)}.pt"
    model = ResCNN(args.width)
    if weights.exists():
        model.load_state_dict(torch.load(weights, weights_only=True))
    else:
        t = time.time()
        train(model, xtr, ytr, args.epochs, 3e-3)
        print(f"trained {args.epochs} epochs in {time.time() - t:.0f}s", flush=True)
        torch.save(model.state_dict(), weights)
    model.eval()
    example = (xtr[:64],)
    base_macs, base_acc = count_macs(model, example), accuracy(model, xte, yte)
    print(f"{data_name}: dense accuracy {base_acc:.4f}, {base_macs / 64 / 1e6:.2f} MMACs/image", flush=True)
    pick = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(1))[:args.calib]
    calib = [(xtr[i],) for i in pick.split(64)]
    labels = [ytr[i] for i in pick.split(64)]
    rows = []
    for removed in args.removed:
        search = TargetSearch(target_macs=1 - removed, round_to=1, steps=12)
        ratio = prunec.compile(model, example, passes=[search]).plan.meta["search"]["ratio"]
        for method in args.methods:
            t = time.time()
            if method == "tp_magnitude":
                pruned, synced = tp_model(model, example, 1 - removed, base_macs), True
            else:
                pruned, synced = prunec_model(method, copy.deepcopy(model), example, ratio, calib, labels)
            prune_s = time.time() - t
            macs = count_macs(pruned, example)
            acc0 = accuracy(pruned, xte, yte)
            ft = train(copy.deepcopy(pruned), xtr, ytr, args.ft_epochs, 1e-3) if synced else None
            acc1 = accuracy(ft, xte, yte) if ft is not None else None
            row = {"target_removed": removed, "method": method, "channel_ratio": None if method == "tp_magnitude" else ratio,
                   "macs_removed": 1 - macs / base_macs, "acc": acc0, "acc_ft": acc1, "prune_s": round(prune_s, 2)}
            rows.append(row)
            print(f"{removed:.0%} {method:13s} MACs removed {row['macs_removed']:.3f} acc {acc0:.4f} "
                  f"ft {acc1 if acc1 is None else round(acc1, 4)} ({prune_s:.1f}s)", flush=True)
    result = {"data": data_name, "dense_acc": base_acc, "dense_mmacs_per_image": base_macs / 64 / 1e6,
              "epochs": args.epochs, "ft_epochs": args.ft_epochs, "train_images": len(xtr), "width": args.width, "calib_images": args.calib,
              "rows": rows, "command": "python " + " ".join(sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.plot)
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=False)
    for ax, key, title in ((axes[0], "acc", "no fine-tuning"), (axes[1], "acc_ft", "after 1 epoch fine-tuning")):
        for method in dict.fromkeys(r["method"] for r in result["rows"]):
            pts = [(r["macs_removed"], r[key]) for r in result["rows"] if r["method"] == method and r[key] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=method)
        ax.axhline(result["dense_acc"], color="gray", ls="--", lw=1, label="dense")
        ax.set_title(title)
        ax.set_xlabel("fraction of MACs removed")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(result["data"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
