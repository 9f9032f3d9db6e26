"""Fashion-MNIST recovery: half the channels removed, then distillation from the dense model.

    python bench/recovery_fashion_mnist.py    # writes bench/results/recovery_fashion_mnist.json, docs/recovery.png

The residual CNN of bench/fashion_mnist.py, trained on the full 60k training set (cached in
bench/cache/). Three students, each at channels 0.5 (round_to=1, the same final size):
  * l1       one-shot L1 pruning, then --steps of prunec.recover
  * thinet   one-shot ThiNet (least-squares refit, 4096 calibration images), then --steps of recover
  * gradual  prunec.compile(schedule=Gradual(final=0.5, steps=3, every=steps/3)): L1 step by step,
             recovering between steps, the same number of recovery steps in total
  * scratch  not a recovery: the half-width CNN trained from scratch with labels like the dense one
             (--epochs on all 60k images), the capacity the students are bounded by
Recovery data: batches of --batch *unlabeled* training images (labels are never used), drawn
once with a fixed seed; logit KL at T=2 from the dense model; AdamW at --lr, warm-up + cosine.
Test accuracy on the 10k test set before and after; every --eval-every steps on the first 2k test
images (running BN statistics, before the final re-estimation).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prunec  # noqa: E402
from fashion_mnist import CACHE, ResCNN, accuracy, load_data, train  # noqa: E402
from prunec.passes.thinet import ThiNet  # noqa: E402
from prunec.recover import Recovery  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "recovery_fashion_mnist.json"
PNG = ROOT / "docs" / "recovery.png"


def dense_model(xtr: torch.Tensor, ytr: torch.Tensor, epochs: int, width: int) -> ResCNN:
    CACHE.mkdir(parents=True, exist_ok=True)
    weights = CACHE / f"rescnn_w{width}_e{epochs}_{len(xtr)}.pt"
    model = ResCNN(width)
    if weights.exists():
        model.load_state_dict(torch.load(weights, weights_only=True))
    else:
        t = time.time()
        train(model, xtr, ytr, epochs, 3e-3)
        print(f"trained {epochs} epochs on {len(xtr)} images in {time.time() - t:.0f}s", flush=True)
        torch.save(model.state_dict(), weights)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--students", nargs="+", default=["l1", "thinet", "gradual", "scratch"],
                    help="scratch: the half-width CNN trained from scratch with labels like the dense one "
                         "(a capacity reference, not a recovery)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--png", type=Path, default=PNG)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    xtr, ytr, xte, yte, data_name = load_data()
    teacher = dense_model(xtr, ytr, args.epochs, args.width)
    dense_acc = accuracy(teacher, xte, yte)
    print(f"{data_name}: dense test accuracy {dense_acc:.4f}", flush=True)
    gen = torch.Generator().manual_seed(1)
    batches = [xtr[torch.randint(0, len(xtr), (args.batch,), generator=gen)] for _ in range(args.steps)]
    calib = [(xtr[i],) for i in torch.randperm(len(xtr), generator=gen)[:4096].split(256)]
    example = (xtr[:64],)
    rows = []
    for name in args.students:
        curve: list[tuple[int, float]] = []
        t = time.time()
        if name == "scratch":
            recovered, acc0, loss = dense_model(xtr, ytr, args.epochs, args.width // 2), None, []
        elif name == "gradual":
            result = prunec.compile(teacher, example, round_to=1, schedule=prunec.Gradual(
                final=0.5, steps=3, every=args.steps // 3), recover={"data": batches, "lr": args.lr})
            recovered, acc0 = result.model, None
            report = result.report["schedule"]
            loss = [x for s in report["per_step"] for x in s["recover"]["loss"]]
        else:
            passes = [ThiNet(0.5, samples=4096, round_to=1)] if name == "thinet" else None
            result = prunec.compile(teacher, example, channels=0.5, round_to=1, passes=passes, calib=calib)
            assert result.report["verify"]["passed"]
            acc0 = accuracy(result.model, xte, yte)
            curve.append((0, accuracy(result.model, xte[:2000], yte[:2000])))

            def progress(step: int, _loss: float, model=result.model) -> None:
                if step and step % args.eval_every == 0:
                    model.eval()
                    curve.append((step, accuracy(model, xte[:2000], yte[:2000])))
                    model.train()
            run = Recovery(lr=args.lr, progress=progress).run(result.model, teacher, batches, args.steps)
            recovered, loss = run.model, run.report["loss"]
        seconds = time.time() - t
        acc1 = accuracy(recovered, xte, yte)
        params = sum(p.numel() for p in recovered.parameters())
        row = {"student": name, "acc_before": acc0, "acc_after": acc1, "gap_pt": round(100 * (dense_acc - acc1), 2),
               "params": params, "params_dense": sum(p.numel() for p in teacher.parameters()),
               "loss": loss, "acc_curve": curve, "time_s": round(seconds, 1)}
        rows.append(row)
        print(f"{name:8s} params {params} acc {acc0} → {acc1:.4f} (dense {dense_acc:.4f}, gap "
              f"{row['gap_pt']} pt) in {seconds:.0f}s", flush=True)
    key = ("width", "epochs", "steps", "batch", "lr")
    if args.out.exists():  # rows of earlier runs with the same settings are kept (run students one at a time)
        old = json.loads(args.out.read_text())
        if all(old.get(k) == getattr(args, k) for k in key):
            done = {r["student"] for r in rows}
            rows = [r for r in old["rows"] if r["student"] not in done] + rows
    result = {"data": data_name, "dense_acc": dense_acc, "steps": args.steps, "batch": args.batch, "lr": args.lr,
              "train_images": len(xtr), "epochs": args.epochs, "width": args.width, "rows": rows,
              "command": "python " + " ".join(sys.argv)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    plot(result, args.png)
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for row in result["rows"]:
        a.plot(row["loss"], lw=0.8, label=row["student"])
        if row["acc_curve"]:
            b.plot(*zip(*row["acc_curve"]), marker="o", ms=3, label=row["student"])
    a.set_yscale("log")
    a.set_xlabel("recovery step")
    a.set_ylabel("KD loss (KL, T=2)")
    a.legend()
    b.axhline(result["dense_acc"], color="gray", ls="--", lw=1, label="dense")
    b.set_xlabel("recovery step")
    b.set_ylabel("test accuracy (first 2k images)")
    b.legend()
    fig.suptitle(f"{result['data']}: channels 0.5, {result['steps']} steps × {result['batch']} unlabeled images")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
