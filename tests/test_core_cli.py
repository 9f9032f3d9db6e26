"""CLI: a working run, and every bad input → one line, exit 2, no partial output."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prunec import models_zoo
from prunec.cli import main


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "prunec", *args], cwd=cwd, capture_output=True,
                          text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_compile_zoo_model_writes_artifact_and_report(tmp_path: Path) -> None:
    out, report, plan = tmp_path / "m.pt2", tmp_path / "r.json", tmp_path / "p.json"
    proc = run("zoo:convbn", "--channels", "0.5", "-o", str(out), "--report", str(report),
               "--save-plan", str(plan), "--round-to", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "verify  PASSED" in proc.stdout
    data = json.loads(report.read_text())
    for key in ("params_before", "params_after", "macs_before", "macs_after", "verify", "groups", "time_s"):
        assert key in data
    assert data["verify"]["passed"] and data["params_after"] < data["params_before"]
    assert torch.export.load(out).module()(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    replay = run("zoo:convbn", "--plan", str(plan), "-o", str(tmp_path / "m2.pt2"), cwd=tmp_path)
    assert replay.returncode == 0, replay.stderr


def test_inspect_lists_groups(tmp_path: Path) -> None:
    proc = run("inspect", "zoo:convbn", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert len(data["groups"]) == 2 and "stem.0.weight@1" in data["frozen"]


@pytest.fixture()
def files(tmp_path: Path) -> dict[str, Path]:
    model, _ = models_zoo.build("convbn")
    pickled = tmp_path / "model.pt"
    torch.save(model, pickled)
    state = tmp_path / "state.pt"
    torch.save(model.state_dict(), state)
    text = tmp_path / "notes.pt"
    text.write_text("not a model")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    return {"pickle": pickled, "state": state, "text": text, "ro": ro}


BAD = [
    (["missing.pt2"], "does not exist"),
    (["{text}"], "is not a PyTorch file"),
    (["{pickle}", "--input-shape", "1,1,28,28"], "--trust-pickle"),
    (["{state}", "--input-shape", "1,1,28,28"], "holds a state dict, not a model"),
    (["zoo:convbn", "--channels", "1.0"], "outside [0, 1)"),
    (["zoo:convbn", "--channels", "-0.1"], "outside [0, 1)"),
    (["zoo:convbn", "--input-shape", "1,x,28"], "--input-shape"),
    (["zoo:convbn", "-o", "{tmp}/no/such/dir/out.pt2"], "does not exist"),
    (["zoo:convbn", "-o", "{ro}/out.pt2"], "not writable"),
    (["zoo:convbn", "--input-shape", "1,3,28,28"], "could not trace"),
    (["zoo:convbn", "--method", "nope"], "unknown pruning method"),
    (["zoo:nope"], "has no model"),
    (["zoo:convbn", "--plan", "{text}"], "is not JSON"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_one_line_exit_2(args: list[str], message: str, files: dict[str, Path],
                                   tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    if os.geteuid() == 0 and "{ro}" in " ".join(args):
        os.chmod(files["ro"], 0o500)
        if os.access(files["ro"], os.W_OK):
            pytest.skip("root can write to a read-only directory")
    fmt = {**{k: str(v) for k, v in files.items()}, "tmp": str(tmp_path)}
    argv = [a.format(**fmt) for a in args]
    before = set(Path.cwd().iterdir())
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and err.startswith("prunec: error: "), err
    assert message in err, err
    assert set(Path.cwd().iterdir()) == before  # no partial output
    assert not list(tmp_path.glob("**/*.pt2"))


def test_trust_pickle_loads_module(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "p.pt2"
    code = main([str(files["pickle"]), "--trust-pickle", "--input-shape", "2,1,28,28",
                 "--channels", "0.3", "-o", str(out)])
    assert code == 0 and out.exists()


def test_pickled_timm_model_needs_no_input_shape(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The mission's command on a torch.save'd timm model: the input shape comes from the size it was built at
    (patch_embed.img_size, here not its pretrained_cfg's 224), and the report says so; a pickled module that
    declares none still asks for --input-shape."""
    timm = pytest.importorskip("timm")
    src, out = tmp_path / "model.pt", tmp_path / "m.pt2"
    torch.save(timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=16, depth=1).eval(), src)
    assert main([str(src), "--trust-pickle", "--heads", "0.34", "-o", str(out)]) == 0 and out.exists()
    printed = capsys.readouterr().out
    assert "note    input shape 1,3,32,32 from the model's timm patch_embed.img_size (--input-shape sets another)" \
        in printed
    bare = tmp_path / "bare.pt"
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 8)), bare)
    assert main([str(bare), "--trust-pickle", "-o", str(tmp_path / "b.pt2")]) == 2
    assert "does not record its input shape" in capsys.readouterr().err


def test_zoo_with_weights_file(files: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "w.pt2"
    assert main(["zoo:convbn", "--weights", str(files["state"]), "-o", str(out)]) == 0
    bad = main(["torchvision:resnet18", "--weights", str(files["state"]), "-o", str(out)])
    assert bad == 2


def test_pt2_model_input_uses_recorded_shape(tmp_path: Path) -> None:
    model, inputs = models_zoo.build("convbn")
    src = tmp_path / "dense.pt2"
    torch.export.save(torch.export.export(model, inputs), src)
    out = tmp_path / "pruned.pt2"
    assert main([str(src), "--channels", "0.5", "--round-to", "1", "-o", str(out)]) == 0
    pruned = torch.export.load(out)
    assert pruned.state_dict["stem.0.weight"].shape[0] == 8  # 16 → 8: smaller dense tensors
    assert pruned.module()(inputs[0]).shape == (2, 10)


@pytest.mark.parametrize("method", ["thinet", "taylor"])
def test_data_driven_method_with_calib_file(method: str, tmp_path: Path) -> None:
    import numpy as np
    calib = tmp_path / "calib.npy"
    np.save(calib, np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype("float32"))
    report = tmp_path / "r.json"
    code = main(["zoo:convbn", "--channels", "0.5", "--method", method, "--calib", str(calib),
                 "--calib-samples", "4", "--round-to", "1", "-o", str(tmp_path / "m.pt2"),
                 "--report", str(report)])
    assert code == 0
    data = json.loads(report.read_text())
    assert data["verify"]["passed"] and data["macs_after"] < 0.5 * data["macs_before"]
    if method == "thinet":
        assert any("refit" in n for n in data["notes"])


def test_data_driven_method_without_calib_is_refused(capsys: pytest.CaptureFixture) -> None:
    assert main(["zoo:convbn", "--channels", "0.5", "--method", "taylor"]) == 2
    assert "needs calibration data" in capsys.readouterr().err


def test_directory_target_reruns_and_default_suffix(tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "trt"
    for _ in range(2):  # an existing artifact directory is replaced, not refused
        assert main(["zoo:convbn", "--channels", "0.5", "--target", "tensorrt", "-o", str(out)]) == 0
    assert (out / "model.onnx").exists() and (out / "build_engine.py").exists()
    monkeypatch.chdir(tmp_path)
    assert main(["zoo:convbn", "--channels", "0.5", "--target", "onnx"]) == 0
    assert (tmp_path / "convbn.pruned.onnx").exists()


def test_first_line_names_the_error_even_without_a_message():
    """Every error line quotes the first line of the cause; an empty message names where it was raised
    (the call sites' own copies of this raised IndexError on one)."""
    from prunec.errors import first_line

    assert first_line(ValueError("shape mismatch\nfull traceback")) == "ValueError: shape mismatch"
    assert first_line(ValueError("x" * 500), 10) == "ValueError: " + "x" * 10
    try:
        raise RuntimeError()
    except RuntimeError as err:
        line = first_line(err)
    assert line.startswith("RuntimeError at ") and "test_core_cli.py" in line and "raise RuntimeError()" in line
