"""Recovery under DistributedDataParallel: two CPU processes (gloo), each with half of every batch,
follow the same loss curve and end at the same weights as one process with the whole batch."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn

from prunec.recover import Recovery

from conftest import free_port, gloo_group

STEPS = 6


def _setup() -> tuple[nn.Module, nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    student = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 5)).eval()
    gen = torch.Generator().manual_seed(1)
    return teacher, student, [torch.randn(8, 16, generator=gen) for _ in range(4)]


def _run() -> tuple[list[float], dict[str, torch.Tensor]]:
    teacher, student, data = _setup()
    run = Recovery(lr=1e-2, warmup=0.2).run(student, teacher, data, STEPS)
    return run.report["loss"], run.model.state_dict()


def _worker(rank: int, world: int, port: int, out: str) -> None:
    with gloo_group(rank, world, port):
        loss, state = _run()
        if rank == 0:
            torch.save({"loss": loss, "state": state}, out)


def test_two_gloo_processes_match_one_process_with_the_doubled_batch(tmp_path: Path) -> None:
    out = tmp_path / "ddp.pt"
    mp.spawn(_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    loss, state = _run()
    assert len(ddp["loss"]) == STEPS and loss[-1] < loss[0]
    torch.testing.assert_close(torch.tensor(ddp["loss"]), torch.tensor(loss), rtol=1e-4, atol=1e-6)
    for name, value in state.items():
        torch.testing.assert_close(ddp["state"][name], value, rtol=1e-4, atol=1e-6)
