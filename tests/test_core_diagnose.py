"""Whose fault: a non-finite original output is refused; a compile that prunes little says why."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import prunec
from prunec.cli import main
from prunec.errors import InputError


class Unruled(nn.Module):
    """Everything passes through cumsum (no rule): nothing can be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.cumsum(self.a(x), dim=-1))


class MostlyUnruled(nn.Module):
    """A big branch behind cumsum and a small prunable one: little of the asked MACs can go."""

    def __init__(self) -> None:
        super().__init__()
        self.big_a, self.big_b = nn.Linear(8, 256), nn.Linear(256, 4)
        self.small_a, self.small_b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        big = self.big_b(torch.cumsum(self.big_a(x), dim=-1))
        return big + self.small_b(torch.relu(self.small_a(x)))


class Uninitialised(nn.Module):
    """Torch-Pruning's custom-layer test builds parameters with torch.Tensor(n): garbage memory."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.scale = nn.Parameter(torch.full((8,), float("nan")))
        self.out = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(x) * self.scale)


def test_nothing_pruned_is_reported_with_reasons() -> None:
    result = prunec.compile(Unruled().eval(), torch.randn(2, 8), channels=0.5)
    s = result.report["shortfall"]
    assert s["status"] == "nothing" and s["macs_cut"] == 0.0 and s["asked"] == "--channels 0.5"
    assert s["reasons"][0]["reason"] == "no coupling rule for aten.cumsum.default"
    assert s["reasons"][0]["share"] > 0.5 and "a.weight" in s["reasons"][0]["example"]
    assert "model output" in [r["reason"] for r in s["reasons"]]


def test_little_pruned_is_reported() -> None:
    result = prunec.compile(MostlyUnruled().eval(), torch.randn(2, 8), channels=0.5, round_to=1)
    s = result.report["shortfall"]
    assert s["status"] == "little" and 0 < s["macs_cut"] < 0.25
    assert s["reasons"][0]["reason"] == "no coupling rule for aten.cumsum.default"


def test_enough_pruned_has_no_shortfall() -> None:
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    result = prunec.compile(model, torch.randn(2, 8), channels=0.5, round_to=1)
    assert result.report["shortfall"] is None


def test_approximate_groups_not_asked_are_a_reason() -> None:
    """A LayerNorm-read residual stream is a hidden group: --channels alone can't cut it."""
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp, self.norm = nn.Linear(8, 64), nn.LayerNorm(64)
            self.f, self.out = nn.Linear(64, 64), nn.Linear(64, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.inp(x)
            h = h + self.f(self.norm(h))
            return self.out(h)

    result = prunec.compile(Residual().eval(), torch.randn(2, 8), channels=0.5, round_to=1)
    s = result.report["shortfall"]
    assert s["status"] == "nothing"
    top = s["reasons"][0]
    assert top["reason"] == "hidden groups not asked for" and "--hidden" in top["hint"]


def test_ratio_rounding_to_zero_is_the_first_reason() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    s = prunec.compile(model, torch.randn(2, 8), channels=0.1, round_to=8).report["shortfall"]
    assert s["status"] == "nothing" and "round" in s["reasons"][0]["reason"] and "--round-to" in s["hint"]


def test_non_finite_original_is_refused_before_pruning() -> None:
    with pytest.raises(InputError, match="original model's output .* not finite"):
        prunec.compile(Uninitialised().eval(), torch.randn(2, 4), channels=0.5)


def _pt2(model: nn.Module, x: torch.Tensor, path: Path) -> Path:
    torch.export.save(torch.export.export(model.eval(), (x,)), path)
    return path


def test_cli_prints_shortfall_line_and_exits_zero(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = _pt2(Unruled(), torch.randn(2, 8), tmp_path / "unruled.pt2")
    code = main([str(model), "--channels", "0.5", "-o", str(tmp_path / "out.pt2"),
                 "--report", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert code == 0
    first = out.splitlines()[0]
    assert first.startswith("warning nothing was pruned (--channels 0.5: 0.0% of MACs cut)")
    assert "no coupling rule for aten.cumsum.default" in first and "To proceed:" in first
    assert json.loads((tmp_path / "r.json").read_text())["shortfall"]["status"] == "nothing"


def test_cli_refuses_non_finite_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = _pt2(Uninitialised(), torch.randn(2, 4), tmp_path / "nan.pt2")
    out = tmp_path / "out.pt2"
    assert main([str(model), "--channels", "0.5", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not finite" in err and not out.exists()


def test_inspect_leads_with_summary(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = _pt2(Unruled(), torch.randn(2, 8), tmp_path / "unruled.pt2")
    assert main(["inspect", str(model)]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("nothing is prunable; held back: no coupling rule for aten.cumsum.default")
    assert main(["inspect", str(model), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["prunable_share"] == 0 and data["summary"]["groups"] == 0
