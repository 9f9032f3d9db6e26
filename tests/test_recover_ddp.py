"""Recovery under DistributedDataParallel and FSDP: two CPU processes (gloo), each with half of every
batch, follow the same loss curve and end at the same weights as one process with the whole batch."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from prunec.errors import InputError
from prunec.parallel import fsdp_copy
from prunec.recover import Recovery

from conftest import free_port, gloo_group

STEPS = 6


class Blocks(nn.Module):
    """A stem, a ModuleList of residual blocks (FSDP shards each) and a head."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.stem, self.head = nn.Linear(16, width), nn.Linear(width, 5)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(2))
        self.register_buffer("scale", torch.tensor(0.5), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = x + self.scale * block(x)
        return self.head(x)


def _setup() -> tuple[nn.Module, nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    teacher, student = Blocks(32).eval(), Blocks(8).eval()
    gen = torch.Generator().manual_seed(1)
    return teacher, student, [torch.randn(8, 16, generator=gen) for _ in range(4)]


def _run(fsdp: bool = False, checkpoint_dir: str | None = None) -> tuple[list[float], dict[str, torch.Tensor]]:
    teacher, student, data = _setup()
    run = Recovery(lr=1e-2, warmup=0.2, fsdp=fsdp, checkpoint_dir=checkpoint_dir,
                   checkpoint_every=4).run(student, teacher, data, STEPS)
    assert run.model is student and type(run.model) is Blocks   # the plain module, trained
    assert run.report["fsdp"] is fsdp
    return run.report["loss"], run.model.state_dict()


def _worker(rank: int, world: int, port: int, out: str, fsdp: bool, checkpoint_dir: str | None) -> None:
    with gloo_group(rank, world, port):
        if fsdp:  # each rank holds half of every sharded weight
            weight = fsdp_copy(Blocks(8), torch.device("cpu")).blocks[0][0].weight
            assert weight.shape == (8, 8) and weight.to_local().shape == (4, 8)
        loss, state = _run(fsdp, checkpoint_dir)
        if rank == 0:
            torch.save({"loss": loss, "state": state}, out)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process_with_the_doubled_batch(tmp_path: Path, fsdp: bool) -> None:
    out, ckpt = tmp_path / "ddp.pt", tmp_path / "ckpt"
    mp.spawn(_worker, args=(2, free_port(), str(out), fsdp, str(ckpt)), nprocs=2, join=True)
    ddp = torch.load(out, weights_only=True)
    loss, state = _run()
    assert len(ddp["loss"]) == STEPS and loss[-1] < loss[0]
    torch.testing.assert_close(torch.tensor(ddp["loss"]), torch.tensor(loss), rtol=1e-4, atol=1e-6)
    for name, value in state.items():
        torch.testing.assert_close(ddp["state"][name], value, rtol=1e-4, atol=1e-6)
    # rank 0's checkpoint holds whole tensors, so one process resumes it where the ranks stopped
    saved = torch.load(ckpt / "last.pt", weights_only=True)
    assert saved["step"] == STEPS and saved["model"]["stem.weight"].shape == (8, 16)
    torch.testing.assert_close(saved["model"]["head.weight"], state["head.weight"], rtol=1e-4, atol=1e-6)


def test_fsdp_needs_a_process_group() -> None:
    teacher, student, data = _setup()
    with pytest.raises(InputError, match="process group"):
        Recovery(fsdp=True).run(student, teacher, data, 2)
