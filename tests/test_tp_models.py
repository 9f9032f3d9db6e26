"""The model shapes of Torch-Pruning's own test suite (its `tests/` folder), rebuilt small and
compiled by prunec: each either verifies exactly with MACs cut, or prunes nothing / refuses with a
reason we expect (model outputs, approximate dims, a non-finite original)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import prunec
from prunec.errors import InputError


def conv_bn(c_in: int, c_out: int, act: bool = False) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 1), nn.BatchNorm2d(c_out), *([nn.GELU()] if act else [])]


class WideDeep(nn.Module):
    """test_concat: an MLP tower and a linear tower concatenated on the feature dim."""

    def __init__(self, d: int = 32) -> None:
        super().__init__()
        self.deep = nn.Sequential(nn.Linear(d, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Dropout(0.2),
                                  nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))
        self.wide = nn.Linear(d, 3)
        self.top = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return torch.sigmoid(self.top(torch.cat([self.wide(x), self.deep(x)], dim=-1)))


class CascadedConcat(nn.Module):
    """test_cascaded_concat: cat(cat(cat(b1, b2), b3), b4) → conv."""

    def __init__(self, c: int = 10) -> None:
        super().__init__()
        self.b1 = nn.Sequential(*conv_bn(c, c, True), *conv_bn(c, c))
        self.b2 = nn.Sequential(*conv_bn(c, 2 * c, True), *conv_bn(2 * c, 2 * c))
        self.b3 = nn.Sequential(*conv_bn(c, 3 * c))
        self.b4 = nn.Sequential(*conv_bn(c, 6 * c))
        self.out = nn.Conv2d(12 * c, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([torch.cat([torch.cat([self.b1(x), self.b2(x)], 1), self.b3(x)], 1), self.b4(x)], 1)
        return self.out(y)


class ConcatSplit(nn.Module):
    """test_concat_split: split a block's output, concatenate one part with a parallel path, add the other."""

    def __init__(self, c: int = 10) -> None:
        super().__init__()
        self.b1 = nn.Sequential(*conv_bn(c, c, True), *conv_bn(c, 2 * c))
        self.side = nn.Sequential(*conv_bn(c, c, True), *conv_bn(c, c))
        self.b2 = nn.Sequential(*conv_bn(2 * c, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        side = self.side(x)
        head, tail = torch.split(self.b1(x), [self.b2[0].in_channels - side.shape[1],
                                              self.b1[-1].num_features - self.b2[0].in_channels + side.shape[1]], 1)
        return self.b2(torch.cat([head, side], 1)) + tail


class NonFeatureCat(nn.Module):
    """test_non_feature_dim_cat: two paths concatenated along height, a conv, split back."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.b1 = nn.Sequential(*conv_bn(c, c, True), *conv_bn(c, c))
        self.b2 = nn.Sequential(*conv_bn(c, c, True), *conv_bn(c, c))
        self.mix, self.out = nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.b1(x), self.b2(x)
        top, _ = torch.split(self.mix(torch.cat([a, b], dim=2)), [a.shape[2], b.shape[2]], dim=2)
        return self.out(top)


class ReshapeDeconv(nn.Module):
    """test_reshape: linear → view as a 4×4 map → ConvTranspose2d × 2 → flatten → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(32, 64 * 16)
        self.up1 = nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1)
        self.head = nn.Linear(16 * 16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc(x)).view(-1, self.up1.in_channels, 4, 4)
        x = F.relu(self.up2(F.relu(self.up1(x))))
        return self.head(torch.flatten(x, 1))


class Split3(nn.Module):
    """test_split: one block's output split in three; one conv called on two parts; three outputs."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.b1 = nn.Sequential(*conv_bn(c, c, True), *conv_bn(c, 4 * c))
        self.shared = nn.Sequential(*conv_bn(c, c))
        self.wide = nn.Sequential(*conv_bn(2 * c, c))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        c1, c2 = self.shared[0].in_channels, self.wide[0].in_channels
        p, q, r = torch.split(self.b1(x), [c1, c1, c2], dim=1)
        return self.shared(p), self.shared(q), self.wide(r)


class SingleChannelOut(nn.Module):
    """test_single_channel_output: the last conv has one output channel."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.Conv2d(16, 64, 2, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.Conv2d(64, 1, 3, padding=1), nn.BatchNorm2d(1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class SkipMLP(nn.Module):
    """test_fully_connected_layers: fc → fc with a residual skip → fc."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(128, 256), nn.Linear(256, 256), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        return self.fc3(F.relu(self.fc2(h)) + h)


class NormScale(nn.Module):
    """test_customized_layer's layer: x / ‖x‖ · scale + bias → fc (the norm reads every feature)."""

    def __init__(self, d: int, uninitialised: bool) -> None:
        super().__init__()
        make = torch.empty if uninitialised else torch.ones
        self.scale, self.bias = nn.Parameter(make(d)), nn.Parameter(make(d) * 0.1)
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x / x.pow(2).sum(1, keepdim=True).sqrt() * self.scale + self.bias)


class CustomLayerNet(nn.Module):
    def __init__(self, uninitialised: bool = False) -> None:
        super().__init__()
        self.fc1, self.custom, self.fc2 = nn.Linear(128, 64), NormScale(64, uninitialised), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.custom(F.relu(self.fc1(x))))


class TwoInTwoOut(nn.Module):
    """test_multiple_inputs_and_outputs: two inputs; the two hidden layers are also returned."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(128, 32), nn.Linear(64, 32), nn.Linear(64, 100)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        a, b = F.relu(self.fc1(x1)), F.relu(self.fc2(x2))
        return a, b, F.relu(self.fc3(torch.cat([a, b], dim=1)))


class LeNet(nn.Module):
    """test_dependency_lenet."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
                                      nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2))
        self.classifier = nn.Sequential(nn.Linear(256, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                                        nn.Linear(84, 10), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


@dataclass
class TPModel:
    name: str            # the Torch-Pruning test file it mirrors
    model: Callable[[], nn.Module]
    inputs: Callable[[], tuple[torch.Tensor, ...]]
    expect: str          # verified | approximate | little: <reason> | nothing: <reason> | refused or verified
    options: dict[str, Any] | None = None


def _x(*shape: int) -> Callable[[], tuple[torch.Tensor, ...]]:
    return lambda: (torch.randn(*shape),)


TP_MODELS = [
    TPModel("test_concat", WideDeep, _x(4, 32), "verified"),
    TPModel("test_cascaded_concat", CascadedConcat, _x(2, 10, 7, 7), "verified"),
    TPModel("test_concat_split", ConcatSplit, _x(2, 10, 7, 7), "verified"),
    TPModel("test_non_feature_dim_cat", NonFeatureCat, _x(2, 16, 7, 7), "verified"),
    TPModel("test_reshape", ReshapeDeconv, _x(2, 32), "verified"),
    TPModel("test_split", Split3, _x(2, 16, 7, 7), "verified"),
    TPModel("test_single_channel_output", SingleChannelOut, _x(2, 3, 32, 32), "verified"),
    TPModel("test_fully_connected_layers", SkipMLP, _x(2, 128), "verified"),
    TPModel("test_customized_layer", CustomLayerNet, _x(2, 128), "little: hidden groups not asked for"),
    TPModel("test_customized_layer --hidden", CustomLayerNet, _x(2, 128), "approximate", {"hidden": 0.5}),
    TPModel("test_customized_layer (torch.Tensor(n) weights)", lambda: CustomLayerNet(uninitialised=True),
            _x(2, 128), "refused or verified"),
    TPModel("test_multiple_inputs_and_outputs", TwoInTwoOut, lambda: (torch.randn(2, 128), torch.randn(2, 64)),
            "nothing: model output"),
    TPModel("test_dependency_lenet", LeNet, _x(2, 1, 28, 28), "verified"),
]


def compile_tp(case: TPModel) -> prunec.CompileResult:
    model = case.model().eval()
    return prunec.compile(model, case.inputs(), round_to=1, **(case.options or {"channels": 0.5}))


@pytest.mark.parametrize("case", TP_MODELS, ids=lambda c: c.name)
def test_torch_pruning_suite_model(case: TPModel) -> None:
    if case.expect == "refused or verified":  # uninitialised memory: either outcome, never a failed verify
        try:
            result = compile_tp(case)
        except InputError as err:
            assert "not finite" in str(err)
            return
        assert result.report["verify"]["passed"]
        return
    result = compile_tp(case)
    report = result.report
    v = report["verify"]
    assert v["passed"], v
    if case.expect == "verified":
        assert v["exact"] and v["rel_err"] <= 1e-4
        assert report["macs_after"] < 0.8 * report["macs_before"], (report["macs_after"], report["macs_before"])
        assert report["shortfall"] is None
    elif case.expect == "approximate":
        assert not v["exact"] and report["macs_after"] < report["macs_before"]
    else:
        status, reason = case.expect.split(": ")
        assert v["exact"] and v["rel_err"] <= 1e-4
        assert (report["macs_after"] == report["macs_before"]) == (status == "nothing")
        assert report["shortfall"]["status"] == status
        assert reason in [r["reason"] for r in report["shortfall"]["reasons"]]


def test_cascaded_concat_halves_every_branch() -> None:
    """Torch-Pruning's own assertion for this model: every branch keeps half its channels."""
    model = CascadedConcat().eval()
    result = prunec.compile(model, torch.randn(2, 10, 7, 7), channels=0.5, round_to=1)
    state = result.program.state_dict()
    assert [state[f"b{i}.0.weight"].shape[0] for i in (1, 2, 3, 4)] == [5, 10, 15, 30]
