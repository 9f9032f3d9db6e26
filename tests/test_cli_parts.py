"""CLI on a model that does not export whole (a tiny Faster R-CNN: data-dependent NMS): the parts that
export are pruned and the artifacts load and run; targets and options that need one program are refused."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import prunec
from prunec.cli import main
from prunec.verify import compare

pytest.importorskip("torchvision.models.detection")
from tests.test_partial import _tiny_faster_rcnn  # noqa: E402

SHAPE = ["--input-shape", "1,3,64,64", "--trust-pickle", "--channels", "0.3"]


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    model = _tiny_faster_rcnn()
    path = tmp_path_factory.mktemp("model") / "frcnn.pt"
    torch.save(model, path)
    return model, path


def test_torch_and_onnx_artifacts_of_a_model_pruned_part_by_part(dense: tuple, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture) -> None:
    model, path = dense
    report = tmp_path / "r.json"
    assert main([str(path), *SHAPE, "-o", str(tmp_path / "p.pt"), "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "part    backbone (Sequential)" in out and "e2e     PASSED" in out and "ties    2/2" in out
    rep = json.loads(report.read_text())
    assert [p["part"] for p in rep["parts"]] == ["backbone", "rpn.head", "roi_heads.box_head",
                                                 "roi_heads.box_predictor"]
    assert rep["verify_end_to_end"]["outputs_equal"] and rep["artifact"]["reload_rel_err"] == 0
    pruned = torch.load(tmp_path / "p.pt", weights_only=False)
    assert type(pruned) is type(model) and pruned.backbone[6].out_channels < 32
    image = [torch.rand(3, 80, 48)]  # another size than the example
    with torch.no_grad():
        want = pruned(image)
        # the safetensors go into the user's dense model without unpickling anything
        assert compare(prunec.load_pruned(model, tmp_path / "p.safetensors")(image), want)[1] == 0
        assert compare(model(image), want)[1] > 1e-3  # pruning changed the detections
    assert main([str(path), *SHAPE, "--target", "onnx", "-o", str(tmp_path / "p.onnx")]) == 0
    assert "runtime onnxruntime vs torch on other_size [[1, 3, 80, 48]]" in capsys.readouterr().out
    import onnxruntime as ort
    sess = ort.InferenceSession(str(tmp_path / "p.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: image[0][None].numpy()})
    assert len(got) == 3 and compare([torch.from_numpy(g) for g in got], list(want[0].values()))[1] <= 1e-4


@pytest.mark.parametrize("args, message", [
    (["--target", "executorch"], "--target executorch needs one exported program. Use --target torch"),
    (["-o", "{tmp}/x.pt2"], "-o {tmp}/x.pt2 names an ExportedProgram (.pt2). Write -o {tmp}/x.pt"),
    (["--sparsity", "2:4"], "--sparsity is not supported for parts"),
    (["--refit", "ls"], "--refit is not supported for parts (parts are pruned without refits)"),
])
def test_options_that_need_one_program_are_refused(args: list[str], message: str, dense: tuple, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main([str(dense[1]), *SHAPE, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "could not trace FasterRCNN" in err, err
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_pickled_output_refused_for_a_model_that_exports_whole(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["zoo:convbn", "--channels", "0.5", "-o", str(tmp_path / "m.pt")]) == 2
    assert "exports whole. Write -o" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_data_driven_method_scores_parts_on_calibration_images(dense: tuple, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    """--calib images go through the whole detector; each part is scored on what it reads."""
    model, path = dense
    torch.manual_seed(1)
    np_path = tmp_path / "calib.npy"
    import numpy as np
    np.save(np_path, torch.rand(4, 3, 64, 64).numpy())
    args = [str(path), *SHAPE, "--calib", str(np_path), "--calib-samples", "4", "-o", str(tmp_path / "a.pt")]
    assert main([*args, "--method", "activation"]) == 0
    assert "e2e     PASSED" in capsys.readouterr().out
    assert main([*args[:-1], str(tmp_path / "l1.pt")]) == 0
    by_data = torch.load(tmp_path / "a.pt", weights_only=False)
    by_l1 = torch.load(tmp_path / "l1.pt", weights_only=False)
    # the same widths, other units: the activations chose them
    assert by_data.rpn.head.conv[0][0].out_channels == by_l1.rpn.head.conv[0][0].out_channels
    assert not torch.equal(by_data.rpn.head.conv[0][0].bias, by_l1.rpn.head.conv[0][0].bias)
