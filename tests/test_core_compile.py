"""End to end on torchvision CNNs: smaller dense tensors, synced module, artifacts, plans."""
import json

import pytest
import torch
import torchvision

import prunec
from prunec.backends import BACKENDS
from tests.conftest import assert_verified, corrupt_rewriter

X = torch.randn(1, 3, 64, 64)


@pytest.fixture(scope="module")
def resnet18_result() -> prunec.CompileResult:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    return prunec.compile(model, X, channels=0.5)


def test_resnet18_is_smaller_and_exact(resnet18_result: prunec.CompileResult) -> None:
    r = resnet18_result
    assert_verified(r)
    rep = r.report
    assert rep["params_after"] < 0.4 * rep["params_before"]
    assert rep["macs_after"] < 0.4 * rep["macs_before"]
    assert set(rep["time_s"]) >= {"trace", "analyze", "plan", "rewrite", "verify", "total"}


def test_resnet18_module_attributes_follow_tensors(resnet18_result: prunec.CompileResult) -> None:
    r = resnet18_result
    assert r.report["module_synced"]
    m = r.model
    assert isinstance(m, torchvision.models.ResNet)
    for conv in [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]:
        assert conv.out_channels == conv.weight.shape[0]
        assert conv.in_channels == conv.weight.shape[1] * conv.groups
        assert conv.out_channels % 8 == 0 or conv.out_channels < 8  # --round-to 8 by default
    assert m.fc.out_features == 10 and m.fc.in_features == m.fc.weight.shape[1] < 512
    bn = m.layer1[0].bn1
    assert bn.num_features == bn.weight.shape[0] == bn.running_mean.shape[0]


def test_state_dict_round_trip(resnet18_result: prunec.CompileResult, tmp_path) -> None:
    r = resnet18_result
    path = tmp_path / "sd.pt"
    torch.save(r.model.state_dict(), path)
    fresh = prunec.apply_plan(torchvision.models.resnet18(num_classes=10).eval(), X, r.plan).model
    fresh.load_state_dict(torch.load(path, weights_only=True))
    with torch.no_grad():
        torch.testing.assert_close(fresh(X), r.model(X))


def test_pt2_artifact_reloads(resnet18_result: prunec.CompileResult, tmp_path) -> None:
    out = tmp_path / "r18.pt2"
    info = BACKENDS["torch"](resnet18_result, out)
    assert out.exists() and out.with_suffix(".safetensors").exists()
    assert info["reload_rel_err"] < 1e-5
    loaded = torch.export.load(out).module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(X), resnet18_result.model(X), rtol=1e-5, atol=1e-5)
    weights = loaded.state_dict()["layer1.0.conv1.weight"]
    assert weights.shape[0] < 64  # genuinely smaller, not masked


def test_plan_json_replays_identically(resnet18_result: prunec.CompileResult, tmp_path) -> None:
    path = tmp_path / "plan.json"
    resnet18_result.plan.save(path)
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["groups"]
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    replay = prunec.apply_plan(model, X, str(path))
    assert_verified(replay)
    with torch.no_grad():
        torch.testing.assert_close(replay.model(X), resnet18_result.model(X))


def test_plan_for_another_model_is_refused(resnet18_result: prunec.CompileResult) -> None:
    other = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    with pytest.raises(prunec.InputError, match="does not have"):
        prunec.apply_plan(other, X, resnet18_result.plan)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "densenet121", "shufflenet_v2_x0_5",
                                  "regnet_x_400mf", "efficientnet_b0", "squeezenet1_1"])
def test_torchvision_cnns_verify(name: str) -> None:
    model = torchvision.models.get_model(name, num_classes=10).eval()
    result = prunec.compile(model, X, channels=0.3)
    assert_verified(result)
    assert result.report["macs_after"] < result.report["macs_before"]


def test_global_ranking_and_round_to() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    uniform = prunec.compile(model, X, channels=0.5, round_to=1)
    ranked = prunec.compile(model, X, channels=0.5, round_to=16, global_rank=True)
    assert_verified(ranked)
    kept = [g["kept"] for g in ranked.report["groups"] if g["kept"] < g["size"]]
    assert kept and all(k % 16 == 0 for k in kept)
    ratios_u = {g["name"]: g["kept"] / g["size"] for g in uniform.report["groups"]}
    ratios_g = {g["name"]: g["kept"] / g["size"] for g in ranked.report["groups"]}
    assert len(set(round(v, 2) for v in ratios_g.values())) > len(set(round(v, 2) for v in ratios_u.values()))


@pytest.mark.parametrize("method", ["l1", "l2", "bn"])
def test_criteria_choose_different_units(method: str) -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():  # make BN scales disagree with conv norms
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.copy_(torch.rand_like(m.weight))
    result = prunec.compile(model, X, channels=0.5, method=method, round_to=1)
    assert_verified(result)
    if method == "bn":
        l1 = prunec.compile(model, X, channels=0.5, method="l1", round_to=1)
        assert result.plan.kept != l1.plan.kept


def test_verifier_catches_a_broken_rewrite(monkeypatch) -> None:
    """Corrupt the rewriter: the verifier must fail the compile."""
    corrupt_rewriter(monkeypatch, "layer1.0.conv2.weight")
    model = torchvision.models.resnet18(num_classes=10).eval()
    with pytest.raises(prunec.errors.InternalError, match="verification failed"):
        prunec.compile(model, X, channels=0.5)


def test_untraceable_model_names_the_place() -> None:
    class DataDependent(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent Python control flow
                return x * 2
            return x

    with pytest.raises(prunec.TraceError) as info:
        prunec.compile(DataDependent(), torch.randn(2, 3))
    line = info.value.one_line()
    assert "\n" not in line and "test_core_compile.py" in line and "in forward" in line


def test_dropped_residual_block_leaves_program_and_module() -> None:
    model = torchvision.models.resnet18(num_classes=10).eval()
    result = prunec.compile(model, X, layers=0.25)
    assert_verified(result)
    dropped = result.plan.meta["dropped_layers"]
    assert dropped and result.report["module_synced"]
    program_params = sum(p.numel() for p in result.program.parameters())
    assert program_params == result.report["params_after"] < result.report["params_before"]
    block = dropped[0].split("#")[0]  # e.g. layer1.0: its tensors are gone from the program
    assert not any(k.startswith(block + ".") for k in result.program.state_dict())
