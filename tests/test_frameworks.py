"""Framework-native models stay the user's class when pruned, and round-trip in their framework.

Table-driven: each case builds a small model from a config (nothing downloaded), compiles it at
30 % channels, and checks (1) the verifier passed exactly, (2) the result is the user's own
class, (3) the framework reloads/exports it with the same output.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np
import pytest
import torch

import prunec
from tests.conftest import assert_verified

os.environ.setdefault("YOLO_OFFLINE", "1")


def _yolo(cfg: str) -> tuple[torch.nn.Module, tuple]:
    ultralytics = pytest.importorskip("ultralytics")
    return ultralytics.YOLO(cfg).model.eval(), (torch.randn(1, 3, 64, 64),)


def _unet() -> tuple[torch.nn.Module, tuple]:
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8)
    return model.eval(), (torch.randn(1, 3, 32, 32), torch.tensor([10]))


def _unet_cond() -> tuple[torch.nn.Module, tuple]:
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)
    return model.eval(), (torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 5, 32))


def _vae(**kwargs: Any) -> tuple[torch.nn.Module, tuple]:
    diffusers = pytest.importorskip("diffusers")
    model = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(32, 64),
        latent_channels=4, norm_num_groups=8, **kwargs)
    return model.eval(), (torch.randn(1, 3, 32, 32),)


def _timm(name: str, **kwargs: Any) -> Callable[[], tuple[torch.nn.Module, tuple]]:
    def build() -> tuple[torch.nn.Module, tuple]:
        timm = pytest.importorskip("timm")
        return timm.create_model(name, pretrained=False, **kwargs).eval(), (torch.randn(1, 3, 64, 64),)
    return build


def _res2net() -> tuple[torch.nn.Module, tuple]:
    """A one-block-per-stage Res2Net (the Bottle2neck split is what is tested)."""
    pytest.importorskip("timm")
    from timm.models.res2net import Bottle2neck
    from timm.models.resnet import ResNet
    model = ResNet(block=Bottle2neck, layers=[1, 1, 1, 1], base_width=26, block_args={"scale": 4})
    return model.eval(), (torch.randn(1, 3, 64, 64),)


def _first(out: Any) -> torch.Tensor:
    """The main tensor of a framework output (YOLO tuple, diffusers ``.sample``)."""
    out = getattr(out, "sample", out)
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


def _yolo_roundtrip(result: prunec.CompileResult, tmp_path) -> None:
    """Checkpoint → YOLO(path): same output; ultralytics' own ONNX export runs in onnxruntime."""
    from ultralytics import YOLO
    from prunec.frameworks.ultralytics import save_checkpoint
    ort = pytest.importorskip("onnxruntime")
    x = result.example_inputs[0]
    yolo = YOLO(str(save_checkpoint(result.model, tmp_path / "pruned.pt")))
    with torch.no_grad():
        want = _first(result.model(x))
        torch.testing.assert_close(_first(yolo.model.eval()(x)), want)
    onnx_path = yolo.export(format="onnx", imgsz=x.shape[-1], simplify=False, verbose=False)
    session = ort.InferenceSession(onnx_path)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-3 * float(want.abs().max()))
    assert len(yolo.predict(np.zeros((64, 64, 3), np.uint8), imgsz=64, verbose=False)) == 1


def _diffusers_roundtrip(result: prunec.CompileResult, tmp_path) -> None:
    """save_pretrained → prunec's from_pretrained: the same class, the same output."""
    from prunec.frameworks.diffusers import from_pretrained
    result.model.save_pretrained(tmp_path)
    reloaded = from_pretrained(type(result.model), tmp_path)
    assert type(reloaded) is type(result.model)
    assert any(n.startswith("native_config") and "free plan is kept" in n for n in result.report["notes"])
    with torch.no_grad():
        torch.testing.assert_close(_first(reloaded(*result.example_inputs)), _first(result.model(*result.example_inputs)))


def _pickle_roundtrip(result: prunec.CompileResult, tmp_path) -> None:
    """timm has no config for pruned widths: the synced module pickles and reloads as is."""
    torch.save(result.model, tmp_path / "model.pt")
    reloaded = torch.load(tmp_path / "model.pt", weights_only=False).eval()
    assert type(reloaded) is type(result.model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(*result.example_inputs), result.model(*result.example_inputs))


CASES: dict[str, tuple[Callable[[], tuple], dict[str, float], Callable]] = {
    "yolov8n": (lambda: _yolo("yolov8n.yaml"), {"channels": 0.3}, _yolo_roundtrip),
    "yolo11n": (lambda: _yolo("yolo11n.yaml"), {"channels": 0.3}, _yolo_roundtrip),
    "yolov8n-seg": (lambda: _yolo("yolov8n-seg.yaml"), {"channels": 0.3}, _yolo_roundtrip),
    "unet2d": (_unet, {"channels": 0.3, "heads": 0.3}, _diffusers_roundtrip),
    "unet2d_condition": (_unet_cond, {"channels": 0.3, "heads": 0.3}, _diffusers_roundtrip),
    "autoencoder_kl": (_vae, {"channels": 0.3, "heads": 0.3}, _diffusers_roundtrip),
    # timm families whose forward reads split sizes / widths from attributes
    "res2net": (_res2net, {"channels": 0.3}, _pickle_roundtrip),
    "cs3darknet_focus_s": (_timm("cs3darknet_focus_s"), {"channels": 0.3}, _pickle_roundtrip),
    "mixnet_s": (_timm("mixnet_s"), {"channels": 0.3}, _pickle_roundtrip),
    "skresnet18": (_timm("skresnet18"), {"channels": 0.3}, _pickle_roundtrip),
    "tresnet_m": (_timm("tresnet_m"), {"channels": 0.3}, _pickle_roundtrip),
}


@pytest.mark.parametrize("name", list(CASES))
def test_framework_model_synced_and_roundtrips(name: str, tmp_path) -> None:
    build, ratios, roundtrip = CASES[name]
    model, inputs = build()
    static = name != "yolov8n"  # one case takes the default batch-dynamic re-trace; the rest skip it (time)
    result = prunec.compile(model, inputs, static=static, **ratios)
    assert_verified(result)
    assert result.report["module_synced"], result.report["module_note"]
    assert type(result.model) is type(model)
    assert result.report["macs_after"] < 0.8 * result.report["macs_before"]
    roundtrip(result, tmp_path)
    with torch.no_grad():  # the user's model is untouched (no attribute left by the trace)
        model(*inputs)


def test_yolo_trains_one_epoch(tmp_path) -> None:
    """The pruned YOLOv8n trains with ultralytics' trainer on a synthetic dataset, keeping its shapes."""
    ultralytics = pytest.importorskip("ultralytics")
    cv2 = pytest.importorskip("cv2")
    from prunec.frameworks.ultralytics import save_checkpoint, trainer
    model, inputs = _yolo("yolov8n.yaml")
    result = prunec.compile(model, inputs, channels=0.3, static=True)
    for split in ("train", "val"):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "labels" / split).mkdir(parents=True)
        for i in range(2):
            cv2.imwrite(str(tmp_path / "images" / split / f"{i}.jpg"), np.full((64, 64, 3), 40 * i, np.uint8))
            (tmp_path / "labels" / split / f"{i}.txt").write_text("0 0.5 0.5 0.3 0.3\n")
    data = tmp_path / "data.yaml"
    data.write_text(f"path: {tmp_path}\ntrain: images/train\nval: images/val\nnames:\n  0: thing\n")
    yolo = ultralytics.YOLO(str(save_checkpoint(result.model, tmp_path / "pruned.pt")))
    shapes = {k: v.shape for k, v in yolo.model.state_dict().items()}
    yolo.train(trainer=trainer(yolo.model), data=str(data), epochs=1, imgsz=64, batch=2, workers=0,
               device="cpu", plots=False, amp=False, project=str(tmp_path / "runs"), name="t", verbose=False)
    trained = ultralytics.YOLO(str(tmp_path / "runs" / "t" / "weights" / "last.pt")).model
    assert {k: v.shape for k, v in trained.state_dict().items()} == shapes


def test_class_that_cannot_follow_keeps_groups_whole() -> None:
    """YOLO11's PSA attention views v to the input's channel count: those groups stay whole,
    with the reason (class and attribute) in ``frozen``."""
    model, inputs = _yolo("yolo11n.yaml")
    coupling = prunec.analyze(model, inputs)
    from prunec.module_sync import keep_whole
    whole = keep_whole(model, coupling)
    assert whole and all("Attention" in r or "C2PSA" in r for r in whole.values()), whole
    assert not {g.name for g in coupling.groups} & set(whole)
    assert any("x.shape[1]" in r for r in coupling.frozen.values())


def test_sync_note_for_empty_message_error() -> None:
    """An exception without a message while syncing becomes a note naming where it was raised."""
    from prunec.finish import sync_module as _sync

    class Broken(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise AssertionError()  # diffusers' bare asserts: no message

    x = torch.randn(1, 2)
    program = torch.nn.Identity()
    module, synced, note = _sync(Broken(), {}, program, (x,), {})  # type: ignore[arg-type]
    assert module is program and not synced
    assert note.startswith("user module not synced: AssertionError at ") and "test_frameworks.py" in note


def _native_roundtrip(result: prunec.CompileResult, tmp_path) -> torch.Tensor:
    """save_pretrained → the class's OWN from_pretrained (diffusers' loader); every tensor must come back
    bit-exact; returns |Δ| of the outputs (not 0: the reloaded tensors are memory-mapped from the
    safetensors file at addresses not 64-byte aligned, and the CPU kernels round those differently)."""
    from prunec.frameworks.diffusers import check_config
    assert check_config(result.model) == ""
    result.model.save_pretrained(tmp_path)
    reloaded = type(result.model).from_pretrained(tmp_path).eval()
    mine, theirs = result.model.state_dict(), reloaded.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    with torch.no_grad():
        return (_first(reloaded(*result.example_inputs)) - _first(result.model(*result.example_inputs))).abs().max()


def _vae_plain() -> tuple[torch.nn.Module, tuple]:
    """The small VAE without its mid-block attention (a single head as wide as the last block)."""
    return _vae(mid_block_add_attention=False)


def test_native_config_vae_reloads_with_diffusers_own_loader(tmp_path) -> None:
    """Every width the plan needs is one the config holds: block_out_channels and norm_num_groups scale
    together, model.config follows, and AutoencoderKL.from_pretrained rebuilds the pruned model."""
    model, inputs = _vae_plain()
    result = prunec.compile(model, inputs, channels=0.3, static=True)
    assert_verified(result)
    assert result.report["passes"]["native_config"] == {
        "config": {"block_out_channels": (24, 48), "norm_num_groups": 6}, "refused": []}
    assert result.model.config.block_out_channels == (24, 48) and result.model.config.norm_num_groups == 6
    assert result.report["macs_after"] < 0.7 * result.report["macs_before"]
    assert _native_roundtrip(result, tmp_path) < 1e-5
    from prunec.frameworks.diffusers import check_config  # shapes alone don't show a GroupNorm's groups:
    result.model.register_to_config(norm_num_groups=8)  # same shapes, 8 groups of 3 channels
    assert "num_groups: pruned 6, config builds 8" in check_config(result.model)


@pytest.mark.parametrize("build", [_unet, _unet_cond])
def test_native_config_unets(build, tmp_path) -> None:
    """A UNet's block_out_channels[0] also sets its sinusoidal time projection (and the GroupNorms over
    concatenated skips straddle levels), so the default keeps the free plan (see _diffusers_roundtrip);
    native_config=True prunes only what the config expresses (time_embedding_dim) and reloads natively."""
    model, inputs = build()
    result = prunec.compile(model, inputs, channels=0.3, static=True, native_config=True)
    assert_verified(result)
    native = result.report["passes"]["native_config"]
    assert list(native["config"]) == ["time_embedding_dim"] and "conv_in.weight" in native["refused"][0]
    assert 0 < result.model.config.time_embedding_dim < 128
    assert result.model.time_embedding.linear_1.weight.shape[0] == result.model.config.time_embedding_dim
    assert _native_roundtrip(result, tmp_path) < 1e-5


def test_native_config_strict_prunes_nothing_it_cannot_express() -> None:
    """AutoencoderKL's mid-block attention is one head as wide as block_out_channels[-1] (its softmax
    scale): no smaller width is exact, so native_config=True keeps the model whole, saying why."""
    model, inputs = _vae()
    result = prunec.compile(model, inputs, channels=0.3, static=True, native_config=True)
    assert result.report["macs_after"] == result.report["macs_before"]
    assert any("nothing pruned" in n and "mid_block.attentions.0.to_q" in n for n in result.report["notes"])


def test_native_config_needs_rules() -> None:
    """Asking for config-expressible widths of a class without rules is the user's error, said at once."""
    with pytest.raises(prunec.errors.InputError, match="no config rules for Linear"):
        prunec.compile(torch.nn.Linear(4, 4), torch.randn(1, 4), channels=0.3, native_config=True)
