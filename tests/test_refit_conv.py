"""Refit of conv consumers: FLAP's bias compensation (into a conv's bias, or the running mean of the BatchNorm a
bias-free conv feeds) and least squares for 1×1 convs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import prunec
from conftest import assert_verified


class ConstConvNet(nn.Module):
    """conv → BN → ReLU whose channels 0–7 are constant (zero conv weight, positive BN bias), read by a bias-free
    1×1 conv into a BN and by an unpadded 3×3 conv with a bias."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.b, self.bn_b = nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.c = nn.Conv2d(16, 4, 3)
        with torch.no_grad():
            self.a.weight[:8] = 0
            self.bn_a.bias[:8] = torch.linspace(0.5, 2.0, 8)
            for bn in (self.bn_a, self.bn_b):
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn_a(self.a(x)))
        return torch.cat([self.bn_b(self.b(y)).mean((2, 3)), self.c(y).mean((2, 3))], 1)


def test_bias_compensation_of_conv_consumers_is_exact_for_constant_channels() -> None:
    torch.manual_seed(0)
    model, x = ConstConvNet().eval(), torch.randn(2, 3, 10, 10)
    calib = [(torch.randn(4, 3, 10, 10),) for _ in range(2)]
    comp = prunec.compile(model, x, channels=0.5, method="flap", round_to=1, calib=calib)   # refit 'bias'
    plain = prunec.compile(model, x, channels=0.5, method="flap", round_to=1, calib=calib, refit="none")
    assert_verified(comp)
    assert comp.plan.kept == plain.plan.kept and sorted(next(iter(comp.plan.kept.values()))) == list(range(8, 16))
    notes = " | ".join(comp.report["notes"])
    assert "refit 'bias': 2 layer(s) by bias compensation" in notes, notes
    with torch.no_grad():
        want, got, cut = model(x), comp.model(x), plain.model(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)     # the constant channels' share restored
    assert (cut - want).abs().max() > 0.1                            # and without it, lost
    state = comp.program.state_dict()   # shifts held by c's bias and by bn_b's running mean (b has no bias)
    assert not torch.allclose(state["bn_b.running_mean"], model.bn_b.running_mean)
    assert not torch.allclose(state["c.bias"], model.c.bias)


def test_least_squares_refit_of_pointwise_convs() -> None:
    """'ls' solves the 1×1 conv (at its stride) and compensates the k×k one's bias; both lower the error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU6(),
                          nn.Conv2d(32, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.bias.uniform_(0, 1)
    x, calib = torch.randn(1, 3, 16, 16), [(torch.randn(8, 3, 16, 16),) for _ in range(4)]
    r = prunec.compile(model, x, channels=0.5, calib=calib, refit="ls")
    assert_verified(r)
    refit = r.report["verify"]["refit"]
    assert refit["applied"] and refit["rel_err_after"] < 0.5 * refit["rel_err_before"], refit
    errors = r.report["passes"]["refit"]["errors"]
    assert list(errors) == ["3.weight"] and errors["3.weight"][1] < errors["3.weight"][0]
    assert any("(1 k×k conv(s) by bias compensation)" in n for n in r.report["notes"])
    with torch.no_grad():
        assert r.model(torch.randn(3, 3, 16, 16)).shape == (3, 8)


def test_conv_without_a_place_for_the_shift_is_left_as_it_is() -> None:
    """'bias' needs a bias or a BatchNorm after the conv to hold the shift; without either: a note, no refit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1, bias=False),
                          nn.ReLU(), nn.Flatten()).eval()
    x, calib = torch.randn(1, 3, 6, 6), [(torch.randn(4, 3, 6, 6),)]
    r = prunec.compile(model, x, channels=0.5, calib=calib, refit="bias")
    assert_verified(r)
    assert any("1 consumer(s) not refit" in n for n in r.report["notes"]), r.report["notes"]
    assert r.report["verify"].get("refit") is None


@pytest.mark.parametrize("refit", ["ls"])
def test_conv_refit_under_torchvision_mobilenet(refit: str) -> None:
    """A real depthwise-separable net: projection convs read the pruned expanded channels; the grouped
    (depthwise) convs are pruned with them, never refit."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(weights=None, width_mult=0.35).eval()
    x, calib = torch.randn(1, 3, 64, 64), [(torch.randn(4, 3, 64, 64),) for _ in range(2)]
    r = prunec.compile(model, x, channels=0.3, method="flap", calib=calib, refit=refit)
    assert_verified(r)
    v = r.report["verify"]["refit"]
    assert v["tensors"] > 10 and v["rel_err_after"] <= v["rel_err_before"], v


def test_least_squares_needs_enough_calibration_positions() -> None:
    """A layer with fewer than 2 calibration positions per kept input column (a classifier on a few images) would
    be interpolated, not fit: it gets the bias compensation instead, and the report names it."""
    from prunec.passes.refit import MIN_ROWS_PER_COLUMN
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
    x, calib = torch.randn(1, 3, 8, 8), [(torch.randn(4, 3, 8, 8),) for _ in range(2)]   # 8 rows < 2 × 16
    assert 8 < MIN_ROWS_PER_COLUMN * 16
    r = prunec.compile(model, x, channels=0.5, round_to=1, calib=calib, refit="ls")
    assert_verified(r)
    assert r.report["passes"]["refit"]["too_few_samples"] == ["5.weight"]
    assert "5.weight" not in r.report["passes"]["refit"]["errors"]            # not solved
    assert any("1 with fewer than 2 calibration positions per input column" in n for n in r.report["notes"])
    assert r.report["verify"]["refit"]["tensors"] == 2                         # weight sliced, bias compensated


def test_fitter_refits_any_plan_as_the_compile_does() -> None:
    """``Refit.fitter`` (what a latency allocation's probes use) gives the updates the compile's Refit pass
    writes, for any plan over the groups it was built for, and ``deployed`` writes them in."""
    from prunec.compiler import services
    from prunec.analyze import build_coupling
    from prunec.passes import Flap, Refit
    from prunec.passes.base import State
    from prunec.plan import Plan
    from prunec.trace import trace
    torch.manual_seed(0)
    model, x = ConstConvNet().eval(), torch.randn(2, 3, 10, 10)
    calib = [(torch.randn(4, 3, 10, 10),) for _ in range(2)]
    program = trace(model, (x,), {})
    coupling = build_coupling(program)
    state = Flap().run(State(model, program, coupling, calib=calib, services=services(coupling, model))).state
    (group,) = [g.name for g in coupling.groups]
    fit = Refit("bias").fitter(state, [group])
    for kept in (list(range(8, 16)), list(range(4, 16))):
        plan = Plan(kept={group: kept}, sizes={group: 16})
        ref = Refit("bias").run(State(model, program, coupling, calib=calib, plan=plan)).state.updates
        got = fit(plan)
        assert sorted(got) == sorted(ref) == ["b.weight", "bn_b.running_mean", "c.bias", "c.weight"]
        for fqn in ref:
            torch.testing.assert_close(got[fqn], ref[fqn])
    plan = Plan(kept={group: list(range(8, 16))}, sizes={group: 16})
    with torch.no_grad():
        torch.testing.assert_close(state.services.deployed(plan, fit(plan))[1](x), model(x), rtol=1e-4, atol=1e-5)
        assert (state.services.deployed(plan)[1](x) - model(x)).abs().max() > 0.1


def test_latency_target_probes_are_refit_like_the_result(tmp_path, monkeypatch) -> None:
    """With a refit (here FLAP's default bias compensation), the allocator's error probes measure each cut refit,
    so a group whose cut the refit restores costs (almost) nothing."""
    monkeypatch.setenv("PRUNEC_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    model, x = ConstConvNet().eval(), torch.randn(1, 3, 96, 96)
    calib = [(torch.randn(2, 3, 96, 96),) for _ in range(2)]
    runs = {}
    for refit in ("bias", "none"):
        r = prunec.compile(model, x, target_latency=0.95, runtime="torch", threads=1, method="flap", calib=calib,
                           refit=refit)
        assert_verified(r)
        runs[refit] = r.report
    assert any("refit 'bias'" in n for n in runs["bias"]["notes"])
    errs = {k: v["passes"]["latency_select"]["sensitivity"] for k, v in runs.items()}
    assert errs["bias"]["groups"] == errs["none"]["groups"] == 1
    assert errs["bias"]["max"] < 0.7 * errs["none"]["max"], errs   # the probes' cuts were compensated


def test_cli_refits_a_cnn_from_calibration_data(tmp_path) -> None:
    """`prunec zoo:convbn --method flap --refit ls --calib x.npy`: the convs reading pruned channels are refit,
    the report says so, and the artifact runs at another batch size."""
    import json

    import numpy as np

    from prunec.cli import main
    calib, out, report = tmp_path / "x.npy", tmp_path / "m.pt2", tmp_path / "r.json"
    np.save(calib, np.random.default_rng(0).standard_normal((32, 1, 28, 28)).astype(np.float32))
    assert main(["zoo:convbn", "--channels", "0.5", "--method", "flap", "--refit", "ls", "--calib", str(calib),
                 "-o", str(out), "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["verify"]["passed"] and data["verify"]["refit"]["applied"], data["verify"]
    assert any(n.startswith("refit 'ls': ") and "k×k conv(s) by bias compensation" in n for n in data["notes"])
    assert torch.export.load(out).module()(torch.randn(3, 1, 28, 28)).shape == (3, 10)
