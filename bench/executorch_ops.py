"""Where MobileNetV3-Large's time goes on ExecuTorch XNNPACK, per op, dense vs uniformly pruned (issue 12).

    python bench/executorch_ops.py --batch 1 --ratios 0.5 --round-to 8,16
    python bench/executorch_ops.py --batch 8 --ratios 0.75

Each model (torchvision MobileNetV3-Large, random weights; prunec --channels R --round-to N) is lowered with
``to_edge_transform_and_lower(XnnpackPartitioner)``, loaded by ``executorch.runtime`` with ETDump on, run
``--iters`` times, and read back with ``executorch.devtools.Inspector`` (needs pandas: the bench extra):
the median time of every XNNPACK op event (the delegate reports each of its ops), summed per op kind, and
each depthwise conv with its channels, stride and kernel. Instrumented times: compare models with each
other, not with the bench's end-to-end timings.
"""
from __future__ import annotations

import argparse
import collections
import copy
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
import torchvision

import prunec

ROOT = Path(__file__).resolve().parents[1]
X = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def op_times(model: torch.nn.Module, batch: int, iters: int, tmp: Path) -> dict[str, float]:
    """Median ms of each op event ETDump records for ``model`` on ExecuTorch XNNPACK, by event name."""
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.devtools import Inspector
    from executorch.exir import to_edge_transform_and_lower
    from executorch.runtime import Runtime
    x = [X.expand(batch, -1, -1, -1).clone()]
    program = to_edge_transform_and_lower(torch.export.export(model.eval(), tuple(x)),
                                          partitioner=[XnnpackPartitioner()]).to_executorch()
    loaded = Runtime.get().load_program(program.buffer, enable_etdump=True, debug_buffer_size=0)
    method = loaded.load_method("forward")
    for _ in range(iters):
        method.execute(x)
    loaded.write_etdump_result_to_file(str(tmp / "etdump.etdp"), str(tmp / "debug.bin"))
    inspector = Inspector(etdump_path=str(tmp / "etdump.etdp"))
    return {ev.name: float(np.median(ev.perf_data.raw)) for block in inspector.event_blocks
            if block.name == "Execute" for ev in block.events if ev.perf_data is not None}


def by_kind(times: dict[str, float]) -> dict[str, float]:
    """Op events summed per kind ('Convolution (NHWC, F32) DWConv #3' → 'Convolution (NHWC, F32) DWConv')."""
    out: collections.Counter = collections.Counter()
    for name, ms in times.items():
        if name not in ("Method::execute", "DELEGATE_CALL"):
            out[re.sub(r" #\d+$", "", name)] += ms
    return dict(out.most_common())


def depthwise(model: torch.nn.Module, times: dict[str, float]) -> list[dict]:
    """Each depthwise conv in module order with its ETDump time (XNNPACK numbers them in the same order)."""
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    ms = [t for _, t in sorted((int(n.split("#")[-1]), t) for n, t in times.items() if "DWConv #" in n)]
    return [{"channels": c.in_channels, "stride": c.stride[0], "kernel": c.kernel_size[0], "ms": t}
            for c, t in zip(convs, ms)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--ratios", default="0.5", help="--channels of the pruned models")
    ap.add_argument("--round-to", default="8")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "executorch_ops.json"))
    args = ap.parse_args()
    torch.manual_seed(0)
    base = torchvision.models.mobilenet_v3_large().eval()
    models = {"dense": base}
    for r in (float(v) for v in args.ratios.split(",")):
        for rt in (int(v) for v in args.round_to.split(",")):
            models[f"--channels {r} --round-to {rt}"] = prunec.compile(copy.deepcopy(base), X, channels=r,
                                                                       round_to=rt).model
    out = {"batch": args.batch, "iters": args.iters, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models.items():
            times = op_times(model, args.batch, args.iters, Path(tmp))
            kinds = by_kind(times)
            out["models"][name] = {"total_ms": sum(kinds.values()), "kinds": kinds,
                                   "depthwise": depthwise(model, times)}
    dense = out["models"]["dense"]
    for name, rec in out["models"].items():
        print(f"{name}: {rec['total_ms']:.2f} ms ({rec['total_ms'] / dense['total_ms']:.3f} of dense)")
        for kind, ms in list(rec["kinds"].items())[:6]:
            print(f"    {kind:45s} {ms:7.3f} ms  ({ms / dense['kinds'].get(kind, ms):.2f} of dense)")
    print("depthwise convs (channels/stride/kernel: ms per model):")
    for i, d in enumerate(dense["depthwise"]):
        cells = [f"{r['depthwise'][i]['channels']}: {r['depthwise'][i]['ms']:.3f}" for r in out["models"].values()]
        print(f"    s{d['stride']} k{d['kernel']}  " + " | ".join(cells))
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
