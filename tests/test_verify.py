"""The layered verifier: the exact part of a mixed plan is proven; bugs are InternalErrors."""
import pytest
import torch
from torch import nn

import prunec
from prunec.errors import InternalError
from tests.conftest import assert_verified, corrupt_rewriter


class Mixed(nn.Module):
    """A residual stream read by a LayerNorm (approximate 'hidden' group) around an MLP (exact)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.norm = nn.Linear(8, 32), nn.LayerNorm(32)
        self.fc1, self.fc2, self.head = nn.Linear(32, 64), nn.Linear(64, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.fc2(torch.relu(self.fc1(self.norm(h))))
        return self.head(h)


X = torch.randn(3, 5, 8)


def test_mixed_plan_verifies_exact_part_and_reports_approximate() -> None:
    result = prunec.compile(Mixed().eval(), X, mlp=0.5, hidden=0.25, round_to=1)
    v = result.report["verify"]
    assert v["passed"] and not v["exact"], v
    assert v["rel_err"] <= v["tolerance"] <= 1e-4
    assert v["approximate"]["groups"] == v["approximate_groups"] and v["approximate"]["rel_err"] > 1e-4
    assert {g["kind"] for g in result.report["groups"] if g["kept"] < g["size"]} == {"mlp", "hidden"}
    assert v["batch_sizes"][0] == 3


def test_corrupted_exact_group_is_caught_while_an_approximate_group_is_cut(monkeypatch) -> None:
    """fc2's input columns belong to the exact MLP group: scramble them after slicing."""
    corrupt_rewriter(monkeypatch, "fc2.weight")
    with pytest.raises(InternalError, match="verification failed") as info:
        prunec.compile(Mixed().eval(), X, mlp=0.5, hidden=0.25, round_to=1)
    assert "plan" in info.value.context and "prunec bug" in info.value.one_line()


def test_second_batch_size_is_checked() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 3)).eval()
    result = prunec.compile(model, torch.randn(2, 3, 12, 12), channels=0.5, round_to=1)
    assert_verified(result)
    assert result.report["verify"]["batch_sizes"] == [2, 3, 4]   # 2 and 3 statically, 3 and 4 on the dynamic program


def test_rewrite_that_bakes_the_batch_size_is_an_internal_error(monkeypatch) -> None:
    """A fixer that writes the example's batch into a view breaks batch 3: caught."""
    from prunec import rewrite as rw

    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 16), nn.Linear(16, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(x)).reshape(-1, 16))

    original = rw.rewrite_graph

    def baking(cut):
        graph, node_map = original(cut)
        for node in graph.nodes:
            if node.target in (torch.ops.aten.view.default, torch.ops.aten.reshape.default):
                node.args = (node.args[0], [2, -1])
        return graph, node_map

    monkeypatch.setattr(rw, "rewrite_graph", baking)
    x = torch.randn(2, 6)
    with pytest.raises(InternalError, match="batch 3"):
        prunec.compile(Flat().eval(), x, channels=0.5, round_to=1)


def test_cli_internal_error_exits_3_with_a_repro_bundle(monkeypatch, tmp_path, capsys) -> None:
    """A prunec bug (here: a corrupted slicer) → exit 3, one line, a bundle next to the output."""
    import json

    from prunec import rewrite as rw
    from prunec.cli import main

    original = rw.slice_state

    def broken(cut, *args, **kwargs):
        state = original(cut, *args, **kwargs)
        for fqn in state:
            if fqn.endswith("weight") and state[fqn].dim() == 4 and state[fqn].shape[1] > 1:
                state[fqn] = torch.roll(state[fqn], 1, dims=1)
        return state

    monkeypatch.setattr(rw, "slice_state", broken)
    out = tmp_path / "out" / "m.pt2"
    out.parent.mkdir()
    code = main(["zoo:convbn", "--channels", "0.5", "--round-to", "1", "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 3 and not out.exists()
    assert len(err.splitlines()) == 1 and "prunec bug" in err and "repro bundle in" in err
    bundles = list(out.parent.glob("prunec-bug-*"))
    assert len(bundles) == 1
    files = {p.name for p in bundles[0].iterdir()}
    assert files == {"plan.json", "command.json", "versions.json", "traceback.txt"}
    assert json.loads((bundles[0] / "plan.json").read_text())["groups"]
    assert json.loads((bundles[0] / "command.json").read_text())["model"] == "zoo:convbn"
    assert "torch" in json.loads((bundles[0] / "versions.json").read_text())


def test_empty_exception_message_does_not_break_sync() -> None:
    """finish.sync_module reports a failing eager module even when its error has no message."""
    from prunec.finish import sync_module as _sync

    class Fails(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError()

    program = nn.Identity()
    module, synced, note = _sync(Fails(), {}, program, (torch.zeros(1),), {}, list)
    assert module is program and not synced
    assert note.startswith("user module not synced: RuntimeError at ") and "test_verify.py" in note


def _convnet() -> tuple[nn.Module, torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(),
                          nn.Conv2d(16, 4, 3)).eval()
    return model, torch.randn(2, 3, 12, 12), [torch.randn(4, 3, 12, 12) for _ in range(2)]


def test_refit_is_reported_and_applied_when_it_helps() -> None:
    model, x, calib = _convnet()
    result = prunec.compile(model, x, method="thinet", channels=0.5, round_to=1, calib=calib)
    refit = result.report["verify"]["refit"]
    assert refit["applied"] and refit["rel_err_after"] < refit["rel_err_before"] and refit["batches"] == 2
    assert result.report["passes"]["thinet"]["errors"]  # per consumer, on the calibration samples


def test_refit_worse_than_none_is_not_applied(monkeypatch) -> None:
    """A refit that makes the output error vs the original worse is dropped with a note."""
    from prunec.passes import thinet

    original = thinet.Reconstruction.refit

    def bad(self, kept):
        return [(10 * torch.randn_like(w), before, after) for w, before, after in original(self, kept)]

    model, x, calib = _convnet()
    plain = prunec.compile(model, x, passes=[thinet.ThiNet(0.5, round_to=1, refit=False)], calib=calib)
    monkeypatch.setattr(thinet.Reconstruction, "refit", bad)
    result = prunec.compile(model, x, method="thinet", channels=0.5, round_to=1, calib=calib)
    refit = result.report["verify"]["refit"]
    assert not refit["applied"] and refit["rel_err_after"] > refit["rel_err_before"]
    assert any("refit not applied" in n for n in result.report["notes"])
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), plain.model(x))
