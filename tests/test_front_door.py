"""The front door: every kind of model file, results that take any batch, outputs that load, CLI = API."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch

import prunec
from conftest import make_hf_llama
from prunec import models_zoo
from prunec.cli import main

warnings.filterwarnings("ignore")


def _convbn_files(tmp_path: Path) -> dict[str, Path]:
    """The same model as a torch.export archive and a traced TorchScript file, both named *.pt."""
    model, (x,) = models_zoo.build("convbn")
    files = {"export": tmp_path / "export_model.pt", "torchscript": tmp_path / "ts_model.pt"}
    torch.export.save(torch.export.export(model, (x,)), files["export"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(model, x), files["torchscript"])
    return files


@pytest.mark.parametrize("kind", ["export", "torchscript"])
def test_model_pt_loads_by_content_and_runs_at_any_batch(kind: str, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    src = _convbn_files(tmp_path)[kind]
    out, report = tmp_path / "pruned", tmp_path / "r.json"
    assert main([str(src), "--channels", "0.5", "--round-to", "1", "-o", str(out), "--report", str(report)]) == 0
    assert "verify  PASSED" in capsys.readouterr().out
    pruned = torch.export.load(tmp_path / "pruned.pt2")   # -o without a suffix gets .pt2
    assert pruned.state_dict["stem.0.weight"].shape[0] == 8
    for batch in (1, 2, 5):
        assert pruned.module()(torch.randn(batch, 1, 28, 28)).shape == (batch, 10)
    assert json.loads(report.read_text())["dynamic"]["dynamic"] is True


def test_api_result_and_program_take_any_batch() -> None:
    model, (x,) = models_zoo.build("convbn")
    result = prunec.compile(model, x[:1], channels=0.5, round_to=1)
    reference = prunec.compile(model, x[:1], channels=0.5, round_to=1, static=True)
    assert result.dynamic is not None and reference.dynamic is None
    batch = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(result.model(batch), result.program(batch))
        # the static program is pinned to batch 1: compare sample by sample
        torch.testing.assert_close(result.program(batch), torch.cat([reference.program(b[None]) for b in batch]))
    assert result.export().module()(batch).shape == (3, 10)


def test_verify_entry_counts_the_batch_the_dynamic_program_checked() -> None:
    """A static trace pinned to batch 1 (a class token expanded to the traced batch) can't be checked at batch 2;
    the batch-dynamic program is, and the report's verify entry says so instead of "batch 2 not checked"."""
    class ClassToken(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)
            self.cls = torch.nn.Parameter(torch.randn(1, 1, 16))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.fc1(x)], 1)
            return self.fc2(h.relu()).mean(1)

    torch.manual_seed(0)
    model, x = ClassToken().eval(), torch.randn(1, 5, 8)
    pinned = prunec.compile(model, x, channels=0.5, round_to=1, static=True).report["verify"]
    assert pinned["batch_sizes"] == [1] and pinned["notes"] == [
        "batch 2 not checked: the traced program only runs at batch 1 (RuntimeError)"]
    result = prunec.compile(model, x, channels=0.5, round_to=1)
    verified, dynamic = result.report["verify"], result.report["dynamic"]
    assert verified["passed"] and verified["batch_sizes"] == [1, 2] and dynamic["batch_sizes"] == [2]
    assert len(verified["notes"]) == 1 and verified["notes"][0].startswith(
        "batch 2 checked on the batch-dynamic program against the verified static program")
    with torch.no_grad():
        torch.testing.assert_close(result.model(torch.cat([x, x])), torch.cat([result.model(x)] * 2))


def test_unsynced_program_is_dynamic_too() -> None:
    class HardSplit(torch.nn.Module):  # a forward with hard-coded split sizes: the class can't follow
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.head = torch.nn.Conv2d(3, 16, 3), torch.nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = torch.split(self.conv(x), [8, 8], dim=1)
            return self.head((a * b).mean((2, 3)))

    result = prunec.compile(HardSplit().eval(), torch.randn(1, 3, 8, 8), channels=0.5, round_to=1)
    assert not result.report["module_synced"] and result.dynamic is not None
    assert result.model(torch.randn(4, 3, 8, 8)).shape == (4, 4)


def test_user_dynamic_dims_keep_their_range(tmp_path: Path) -> None:
    model, (x,) = models_zoo.build("convbn")
    batch = torch.export.Dim("batch", min=1, max=64)
    src = tmp_path / "dyn.pt2"
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: batch},)), src)
    out = tmp_path / "out.pt2"
    assert main([str(src), "--channels", "0.5", "--round-to", "1", "-o", str(out)]) == 0
    ep = torch.export.load(out)
    ranges = [(int(r.lower), int(r.upper)) for r in ep.range_constraints.values()]
    assert (1, 64) in ranges or (2, 64) in ranges, ranges
    assert ep.module()(torch.randn(7, 1, 28, 28)).shape == (7, 10)


def test_onnx_runs_at_two_batch_sizes(tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    out, report = tmp_path / "m", tmp_path / "r.json"
    assert main(["zoo:convbn", "--channels", "0.5", "--target", "onnx", "-o", str(out),
                 "--report", str(report)]) == 0
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    for batch in (1, 3):
        assert sess.run(None, {name: torch.randn(batch, 1, 28, 28).numpy()})[0].shape == (batch, 10)
    assert json.loads(report.read_text())["artifact"]["rel_err"] < 1e-3


def test_coreml_suffix_added_and_shape_flexible(tmp_path: Path) -> None:
    pytest.importorskip("coremltools")
    report = tmp_path / "r.json"
    assert main(["zoo:mlp", "--channels", "0.5", "--target", "coreml", "-o", str(tmp_path / "vit"),
                 "--report", str(report)]) == 0
    assert (tmp_path / "vit.mlpackage").is_dir()
    assert json.loads(report.read_text())["artifact"]["flexible_shapes"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    return make_hf_llama(tmp_path_factory.mktemp("llama"))


def test_hf_output_is_a_from_pretrained_folder(llama_dir: Path, tmp_path: Path) -> None:
    import transformers
    out, report = tmp_path / "out", tmp_path / "r.json"
    assert main([f"hf:{llama_dir}", "--heads", "0.5", "--mlp", "0.25", "--round-to", "1", "--seq-len", "8",
                 "--calib", str(llama_dir / "calib.txt"), "--method", "wanda", "--calib-samples", "4",
                 "-o", str(out), "--report", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["verify"]["passed"] and data["artifact"]["hf_dir"] == str(out)
    assert data["artifact"]["reload_from_pretrained_rel_err"] < 1e-5
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert model.config.num_attention_heads == 2 and model.config.num_key_value_heads == 1
    for prompt in ("The quick brown", "A smaller dense model runs faster on real hardware . Pruning"):
        ids = tok(prompt, return_tensors="pt")
        assert model.generate(**ids, max_new_tokens=3, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 3
    program = torch.export.load(out / "model.pt2").module()
    for batch, seq in ((1, 5), (3, 11)):
        logits = program(input_ids=torch.randint(0, 64, (batch, seq)),
                         attention_mask=torch.ones(batch, seq, dtype=torch.long)).logits
        assert logits.shape == (batch, seq, 64)


def test_hf_heads_rounded_to_what_the_config_validates(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    folder = make_hf_llama(tmp_path / "llama16", heads=16, kv_heads=4, hidden=64)
    report = tmp_path / "r.json"
    code = main([f"hf:{folder}", "--heads", "0.25", "--round-to", "1", "--seq-len", "8",
                 "-o", str(tmp_path / "out"), "--report", str(report)])
    assert code == 0  # 12 of 16 heads: hidden 64 % 12 != 0, which LlamaConfig refuses
    data = json.loads(report.read_text())
    assert any("cannot express 12" in n for n in data["notes"])
    assert data["artifact"]["hf_dir"]


def test_hf_custom_code_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("transformers")
    folder = make_hf_llama(tmp_path / "custom")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.Custom"}
    (folder / "config.json").write_text(json.dumps(config))
    assert main([f"hf:{folder}", "--heads", "0.5"]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err


def test_sparsity_with_torch_target_writes_2_4_weights(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from prunec.backends.sparsity import check_2_4
    out, report = tmp_path / "s.pt2", tmp_path / "r.json"
    assert main(["zoo:mlp", "--channels", "0.25", "--sparsity", "2:4", "-o", str(out), "--report", str(report)]) == 0
    weights = load_file(str(tmp_path / "s.safetensors"))
    assert check_2_4(weights["fc2.weight"], axis=1)
    assert "dense" in json.loads(report.read_text())["artifact"]["sparsity"]["note"]


def test_target_macs_from_the_cli(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    assert main(["torchvision:resnet18", "--input-shape", "1,3,64,64", "--target-macs", "0.5",
                 "-o", str(tmp_path / "r.pt2"), "--report", str(report), "--static"]) == 0
    data = json.loads(report.read_text())
    assert abs(data["macs_after"] / data["macs_before"] - 0.5) < 0.1


def test_sensitivity_command_writes_table_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "sens.json"
    assert main(["sensitivity", "zoo:convbn", "--ratios", "0.25,0.5", "-o", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["ratios"] == [0.25, 0.5] and data["units"]
    assert all(len(row["drop"]) == 2 for row in data["units"].values())
    assert out.with_suffix(".png").stat().st_size > 0


def _bad_files(tmp_path: Path) -> dict[str, Path]:
    files = _convbn_files(tmp_path)
    data = files["export"].read_bytes()
    (tmp_path / "empty.pt2").write_bytes(b"")
    (tmp_path / "trunc.pt2").write_bytes(data[: len(data) // 2])
    from safetensors.torch import save_file
    save_file({"w": torch.randn(8, 8)}, str(tmp_path / "w.safetensors"))
    raw = (tmp_path / "w.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(raw[: len(raw) - 40])
    (tmp_path / "model.onnx").write_bytes(b"\x08\x08\x12\x07pytorch")

    class Loop(torch.nn.Module):  # a while loop: torch's TorchScript converter refuses prim::Loop
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            i, n, out = 0, int(x.shape[0]), x
            while i < n:
                out = self.fc(out)
                i += 1
            return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(Loop()), str(tmp_path / "loop.pt"))
    (tmp_path / "adir.pt2").mkdir()
    return {"empty": tmp_path / "empty.pt2", "trunc": tmp_path / "trunc.pt2",
            "safetensors": tmp_path / "w.safetensors", "trunc_st": tmp_path / "trunc.safetensors",
            "onnx": tmp_path / "model.onnx", "loop": tmp_path / "loop.pt", "dir": tmp_path / "adir.pt2",
            "ts": files["torchscript"]}


BAD = [
    (["{empty}"], "it is empty"),
    (["{trunc}"], "truncated"),
    (["{safetensors}"], "holds weights (safetensors)"),
    (["{trunc_st}"], "truncated or damaged safetensors"),
    (["{onnx}"], "ONNX"),
    (["{loop}", "--input-shape", "2,4"], "cannot turn into an ExportedProgram"),
    (["{loop}"], "--input-shape"),
    (["zoo:convbn", "-o", "{dir}"], "is a directory"),
    (["zoo:convbn", "-o", "{tmp}/m.onnx"], "does not end in .pt2"),
    (["zoo:convbn", "--target", "onnx", "-o", "{tmp}/m.pt2"], "does not end in .onnx"),
    (["zoo:convbn", "--target-macs", "1.5"], "outside (0, 1]"),
    (["zoo:convbn", "--max-drop", "0.1"], "needs --calib"),
    (["sensitivity", "zoo:convbn", "--ratios", "0.5,2"], "fractions in (0, 1)"),
]


@pytest.mark.parametrize("args,message", BAD)
def test_bad_input_one_line_exit_2(args: list[str], message: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    files = _bad_files(tmp_path)
    capsys.readouterr()  # setup's own warnings
    monkeypatch.chdir(tmp_path)
    before = set(tmp_path.iterdir())
    argv = [a.format(**{**{k: str(v) for k, v in files.items()}, "tmp": str(tmp_path)}) for a in args]
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("prunec: error: "), err
    assert message in err, err
    assert set(tmp_path.iterdir()) == before  # nothing written
    assert not os.listdir(files["dir"])


def test_torchvision_detector_loads_without_downloading_a_backbone() -> None:
    """Detection/segmentation builders default to ImageNet backbone weights: the loader must not fetch them."""
    from prunec.load import _zoo
    loaded = _zoo("torchvision:fasterrcnn_mobilenet_v3_large_320_fpn", None)
    assert type(loaded.model).__name__ == "FasterRCNN"
