"""Compile memory (issue 14): no copy of the weights for the reference, shared storage with ``inplace``,
and the original left exactly as it was."""
import torch
from torch import nn

import prunec
from prunec.verify import zeroed_reference
from prunec.cut import Cut
from tests.conftest import assert_verified


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.fc1, self.fc2, self.head = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        return self.head(h + self.fc2(torch.relu(self.fc1(h))))


IDS = torch.randint(0, 50, (2, 7))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_compile_leaves_the_original_bit_exact_and_owns_its_tensors() -> None:
    model = Net().eval()
    before = _snapshot(model)
    result = prunec.compile(model, IDS, mlp=0.5, round_to=1)
    assert_verified(result)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # zeroing was undone
    ours = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    assert not any(t.untyped_storage().data_ptr() in ours for t in result.model.state_dict().values())


def test_inplace_shares_the_unpruned_tensors_and_release_copies_them() -> None:
    model = Net().eval()
    before = _snapshot(model)
    result = prunec.compile(model, IDS, mlp=0.5, round_to=1, inplace=True)
    assert_verified(result)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    shared = result.model.head.bias.untyped_storage().data_ptr() == model.head.bias.untyped_storage().data_ptr()
    assert shared and result.model.fc1.weight.shape[0] < 64  # the output bias is never cut: shared
    want = result.model(IDS)
    result.release_original(model)
    ours = {t.untyped_storage().data_ptr() for t in model.state_dict().values()}
    for module in (result.model, result.program):
        assert not any(t.untyped_storage().data_ptr() in ours for t in module.state_dict().values())
    assert result.coupling is None and torch.equal(result.model(IDS), want)
    assert torch.equal(result.program(IDS), want)


def test_zeroed_reference_restores_even_when_the_run_fails() -> None:
    model = Net().eval()
    before = _snapshot(model)
    coupling = prunec.analyze(model, IDS)
    plan = prunec.compile(model, IDS, mlp=0.5, round_to=1, static=True).plan
    try:
        with zeroed_reference(Cut.of(coupling, plan)) as reference:
            assert float(reference.state_dict()["fc2.weight"].abs().sum()) < float(before["fc2.weight"].abs().sum())
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
