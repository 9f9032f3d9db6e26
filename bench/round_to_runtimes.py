"""Uniform widths rounded to 8, 16 or 32 on ONNX Runtime and ExecuTorch XNNPACK (issue 12: which width grid
each runtime's kernels want).

    python bench/round_to_runtimes.py executorch 1,8
    python bench/round_to_runtimes.py onnxruntime 1,8

torchvision MobileNetV3-Large (random weights), prunec --channels 0.293 / 0.5 with --round-to 8, 16, 32, all
models timed interleaved on the runtime (9 rounds, 1 thread, the fastest sample), MACs counted with
Torch-Pruning's counter; efficiency = MACs ratio ÷ latency ratio.
"""
import copy
import sys
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
import latency as old  # noqa: E402  (bench/latency.py: the MACs counter)

import prunec  # noqa: E402
from prunec.latency import batched  # noqa: E402
from prunec.runtimes import get_runtime, time_interleaved  # noqa: E402

torch.manual_seed(0)
X = torch.randn(1, 3, 224, 224)
base = torchvision.models.mobilenet_v3_large().eval()
dm = old.macs_of(base)
models = {"dense": base}
for r in (0.293, 0.5):
    for rt in (8, 16, 32):
        models[f"ch{r}_r{rt}"] = prunec.compile(copy.deepcopy(base), X, channels=r, round_to=rt, check=False).model.eval()
macs = {k: old.macs_of(m) / dm for k, m in models.items()}
for rt_name, batch in [(sys.argv[1], int(b)) for b in sys.argv[2].split(",")]:
    rt = get_runtime(rt_name)
    runs = [rt.prepare(m, batched((X,), batch), 1) for m in models.values()]
    secs = time_interleaved(runs, 9, stat="min")
    for k, s in zip(models, secs):
        print(rt_name, batch, k, "macs %.3f lat %.3f eff %.2f" % (macs[k], s / secs[0], macs[k] / (s / secs[0])), flush=True)
