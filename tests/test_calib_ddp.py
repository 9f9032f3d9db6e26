"""Data-parallel calibration (prunec.distributed): two CPU processes (gloo), calibrating on 2 and 1
of 3 batches, reach the plan and the pruned weights of one process on all of them — for the
activation criteria (wanda; activation, a mean), gradient criteria (taylor), layer scores (angular), the sequential LS
refit (after an L1 plan, so only the refit sees the data), and SparseGPT 2:4 Hessians. The shards are
made unlike each other, so a missing reduction shows (each comparison fails without it)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import prunec
from prunec.backends.sparsity import sparsify_2_4
from prunec.distributed import all_reduce_sum, shard

from conftest import free_port, gloo_group

transformers = pytest.importorskip("transformers")

N_BATCHES = 3   # rank 0 gets 2 batches, rank 1 gets 1: means must come from reduced sums and counts


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def _llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def _data() -> tuple[list[tuple[torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """Calibration batches; the even ones (rank 0's shard) unlike the odd ones (rank 1's)."""
    gen = torch.Generator().manual_seed(1)
    images = []
    for i in range(N_BATCHES):
        scale = torch.tensor([4.0, 0.2, 1.0] if i % 2 else [0.2, 4.0, 1.0]).view(1, 3, 1, 1)
        images.append((torch.randn(2, 3, 8, 8, generator=gen) * scale,))
    tokens = [{"input_ids": torch.randint(0, 32, (2, 12), generator=gen) + 32 * (i % 2)} for i in range(N_BATCHES)]
    return images, tokens


def _results(images: list[Any], tokens: list[Any]) -> dict[str, Any]:
    """Plans and pruned weights from every data-driven path, calibrated on the given batches."""
    torch.manual_seed(2)   # the example inputs: angular scores count them once (on rank 0)
    x = torch.randn(2, 3, 8, 8)
    example = {"input_ids": torch.randint(0, 64, (2, 12)), "use_cache": False}
    out: dict[str, Any] = {}
    for method in ("wanda", "activation", "taylor"):
        r = prunec.compile(_cnn(), x, channels=0.5, method=method, round_to=1, calib=images, static=True)
        out[method] = (r.plan.kept, {k: v.detach().clone() for k, v in r.model.state_dict().items()})
    # ThiNet samples rows: every rank gets all ranks' rows, so the ranks agree (other draws than one process)
    out["thinet"] = prunec.compile(_cnn(), x, channels=0.5, method="thinet", round_to=1, calib=images,
                                   static=True).plan.kept
    r = prunec.compile(_llama(), (), example_kwargs=example, mlp=0.5, method="l1", round_to=1,
                       calib=tokens, refit="ls", static=True)
    out["llama_ls"] = (r.plan.kept, {k: v.detach().clone() for k, v in r.model.state_dict().items()},
                       r.report["passes"]["refit"]["sequential"])
    r = prunec.compile(_llama(), (), example_kwargs=example, layers=0.5, calib=tokens, static=True)
    out["angular"] = (r.plan.meta["layer_scores"], r.plan.meta["dropped_layers"])
    cnn, llama = _cnn(), _llama()
    sparsify_2_4(cnn, "sparsegpt", [((t[0],), {}) for t in images])
    sparsify_2_4(llama, "sparsegpt", [((), {**t, "use_cache": False}) for t in tokens])
    out["sparsegpt"] = ({k: v.clone() for k, v in cnn.state_dict().items()},
                        {k: v.clone() for k, v in llama.state_dict().items()})
    return out


def _worker(rank: int, world: int, port: int, out: str) -> None:
    with gloo_group(rank, world, port):
        images, tokens = _data()
        torch.save(_results(shard(images), shard(tokens)), f"{out}.{rank}")


def _same(a: Any, b: Any) -> None:
    if isinstance(a, dict) and a and isinstance(next(iter(a.values())), torch.Tensor):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=lambda m, k=k: f"{k}: {m}")
    elif isinstance(a, dict) and all(isinstance(v, float) for v in a.values()):
        assert a.keys() == b.keys()
        np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=1e-4, atol=1e-6)
    elif isinstance(a, (tuple, list)) and a and not isinstance(a[0], str):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a == b


def test_two_gloo_ranks_on_their_shards_match_one_process_on_all_batches(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    images, tokens = _data()
    want = _results(images, tokens)
    assert want["llama_ls"][2], "the LS refit ran block by block (sequential)"
    assert want["llama_ls"][1].keys() == ranks[0]["llama_ls"][1].keys()
    assert want["wanda"][0] and want["activation"][0] and want["taylor"][0] and want["llama_ls"][0] and want["angular"][1]
    assert ranks[0]["thinet"] == ranks[1]["thinet"]
    for got in ranks:
        for name in want.keys() - {"thinet"}:
            _same(got[name], want[name])


def test_one_process_reductions_and_shards_are_identities() -> None:
    tree = {"a": torch.ones(2), "n": 3, "b": [np.zeros(2), 1.5]}
    assert all_reduce_sum(tree) is tree
    assert shard([1, 2, 3]) == [1, 2, 3]
