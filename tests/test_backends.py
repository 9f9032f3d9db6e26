"""Artifact writers: ONNX + onnxruntime, 2:4 sparsity, TensorRT folder, Core ML spec, ExecuTorch run."""
from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
import torch
import torchvision

import prunec
from prunec import models_zoo
from prunec.backends import BACKENDS
from prunec.backends.sparsity import check_2_4, eligible_layers, sparsify_2_4
from prunec.errors import BackendError, InputError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402


@pytest.fixture(scope="module")
def convbn() -> prunec.CompileResult:
    model, inputs = models_zoo.build("convbn")
    return prunec.compile(model, inputs, channels=0.3)


@pytest.fixture(scope="module")
def resnet18() -> prunec.CompileResult:
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    return prunec.compile(model, (torch.randn(1, 3, 64, 64),), channels=0.3)


@contextmanager
def _fresh(result: prunec.CompileResult) -> Iterator[prunec.CompileResult]:
    """Let a sparsity test edit ``result``'s weights in place; restore them afterwards."""
    saved = {k: v.detach().clone() for k, v in result.model.state_dict().items()}
    try:
        yield result
    finally:
        with torch.no_grad():
            for k, v in result.model.state_dict().items():
                v.copy_(saved[k])


def test_onnx_matches_onnxruntime_with_dynamic_batch(convbn, tmp_path: Path) -> None:
    rep = BACKENDS["onnx"](convbn, tmp_path / "m.onnx", {})
    assert rep["rel_err"] < 1e-5 and rep["opset"] == 18
    model = onnx.load(str(tmp_path / "m.onnx"))
    onnx.checker.check_model(model)
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param, "batch axis should be symbolic"
    x = torch.randn(5, 1, 28, 28)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), convbn.model(x), rtol=1e-4, atol=1e-5)


def test_onnx_refuses_old_opset(convbn, tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="opset"):
        BACKENDS["onnx"](convbn, tmp_path / "m.onnx", {"opset": 13})
    assert not (tmp_path / "m.onnx").exists()


def _weights_and_axes(model: "onnx.ModelProto") -> list[tuple[str, torch.Tensor, int]]:
    """(name, weight, axis TensorRT groups by 4) for Conv (group 1), Gemm and MatMul initializers."""
    inits = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer}
    found = []
    for node in model.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = inits[node.input[1]]
        if node.op_type == "Conv" and attrs.get("group", 1) == 1:
            found.append((node.input[1], w, 1))
        elif node.op_type == "Gemm":
            found.append((node.input[1], w, 1 if attrs.get("transB", 0) else 0))
        elif node.op_type == "MatMul" and w.dim() == 2:
            found.append((node.input[1], w, 0))
    return found


def test_onnx_2_4_on_every_eligible_initializer(resnet18, tmp_path: Path) -> None:
    with _fresh(resnet18) as result:
        rep = BACKENDS["onnx"](result, tmp_path / "r18.onnx", {"sparsity": "2:4"})
    assert rep["rel_err"] < 1e-5
    weights = _weights_and_axes(onnx.load(str(tmp_path / "r18.onnx")))
    eligible = [(n, w, a) for n, w, a in weights if w.shape[a] % 4 == 0 and w.shape[a] >= 16]
    assert len(eligible) == rep["sparsity"]["layers_sparsified"] == 20
    for name, w, axis in eligible:
        assert check_2_4(w, axis), name
    assert rep["sparsity"]["skipped"] == {"conv1": "3 input channels (need a multiple of 4, ≥ 16)"}


def test_check_2_4() -> None:
    assert check_2_4(torch.tensor([[0.0, 1, 0, 2], [3, 0, 0, 0]]), 1)
    assert not check_2_4(torch.tensor([[0.0, 1, 5, 2]]), 1)
    assert not check_2_4(torch.zeros(2, 6), 1)          # not a multiple of 4


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_sparsify_methods_mask_and_error(method: str) -> None:
    model, (x,) = models_zoo.build("mlp")
    with torch.no_grad():
        ref = model(x)
        dense_copy = copy.deepcopy(model)
        sparsify_2_4(dense_copy, "magnitude")
        magnitude_err = float((dense_copy(x) - ref).norm())
        stats = sparsify_2_4(model, method, [((x,), {})])
        err = float((model(x) - ref).norm())
    layers, _ = eligible_layers(model)
    assert stats["layers_sparsified"] == 3 and stats["mean_sparsity"] >= 0.5
    assert all(check_2_4(m.weight, 1) for m in layers.values())
    if method == "sparsegpt":   # the OBS update must beat plain magnitude on its calibration data
        assert err < magnitude_err


def test_sparsity_refuses_other_patterns(convbn, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="1:4 is not supported"), _fresh(convbn) as result:
        BACKENDS["onnx"](result, tmp_path / "m.onnx", {"sparsity": "1:4"})


def test_tensorrt_writes_folder_and_no_engine_here(convbn, tmp_path: Path) -> None:
    out = tmp_path / "trt"
    with _fresh(convbn) as result:
        rep = BACKENDS["tensorrt"](result, out, {"sparsity": "2:4", "sparsity_method": "wanda"})
    assert sorted(p.name for p in out.iterdir()) == ["build_engine.py", "model.onnx", "model_fp16.onnx",
                                                     "trtexec.txt"]
    if not torch.cuda.is_available():
        assert rep["engine"] is None and "wrote ONNX + build_engine.py + trtexec command" in rep["reason"]
    line = (out / "trtexec.txt").read_text().strip()
    assert line == rep["trtexec"]
    # FP16 strongly typed from the FP16 ONNX: TensorRT 11 removed --fp16 and the FP16 builder flag
    assert line.startswith(f"trtexec --onnx={out / 'model_fp16.onnx'} --saveEngine={out / 'model.engine'} "
                           "--stronglyTyped")
    assert "--sparsity=enable" in line and "--minShapes=" in line
    compile(Path(out / "build_engine.py").read_text(), "build_engine.py", "exec")
    assert "SPARSE_WEIGHTS" in (out / "build_engine.py").read_text()
    import onnx
    half = onnx.load(str(out / "model_fp16.onnx"))
    assert {i.type.tensor_type.elem_type for i in half.graph.input} == {onnx.TensorProto.FLOAT}   # FP32 inputs
    assert onnx.TensorProto.FLOAT16 in {t.data_type for t in half.graph.initializer}
    fp16 = rep["fp16_onnx"]
    assert fp16["checked"] and 0 < fp16["rel_err"] < 1e-2   # run in onnxruntime: FP16's own error, not a bug's


def test_tensorrt_build_script_builds_fp16_strongly_typed_on_tensorrt_10_and_11(convbn, tmp_path: Path,
                                                                                  monkeypatch) -> None:
    """build_engine.py against the API of TensorRT 10 (FP16/INT8 builder flags) and 11 (none): FP16 builds the
    FP16 ONNX strongly typed on both; --int8 uses the flags on 10 and is refused on 11 with a reason.
    (A recording stand-in for the tensorrt module: no TensorRT or GPU here; the real build runs on a GPU host.)"""
    import runpy
    import sys
    import types
    out = tmp_path / "trt"
    with _fresh(convbn) as result:
        BACKENDS["tensorrt"](result, out, {})
    for version in ("10.13.0", "11.5.0"):
        calls: list = []
        trt = types.ModuleType("tensorrt")
        trt.__version__ = version
        flags = ["SPARSE_WEIGHTS"] + (["FP16", "INT8"] if version.startswith("10") else [])
        trt.BuilderFlag = types.SimpleNamespace(**{f: f for f in flags})
        trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
        trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})

        class Network:
            num_inputs = 0

        class Parser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                calls.append(("parse", Path(path).name))
                return True

        class Config:
            def set_flag(self, flag):
                calls.append(("flag", flag))

            def add_optimization_profile(self, profile):
                pass

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                calls.append(("network", flags))
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return None

            def build_serialized_network(self, network, config):
                return b"engine"

        trt.Builder, trt.OnnxParser = Builder, Parser
        monkeypatch.setitem(sys.modules, "tensorrt", trt)
        weak_fp16 = [("network", 0), ("parse", "model.onnx"), ("flag", "FP16")]
        for argv, expect in ((["--no-sparse"], [("network", 2), ("parse", "model_fp16.onnx")]),
                             (["--int8"], weak_fp16 + [("flag", "INT8")]),
                             (["--no-fp16"], [("network", 2), ("parse", "model.onnx")]),
                             (["--no-sparse", "no model_fp16.onnx"], weak_fp16)):
            calls.clear()
            if "no model_fp16.onnx" in argv:   # the conversion failed at compile time (see the next test)
                (out / "model_fp16.onnx").rename(tmp_path / "aside.onnx")
            monkeypatch.setattr(sys, "argv", ["build_engine.py", "--engine", str(tmp_path / "e.engine"),
                                              *[a for a in argv if a.startswith("--")]])
            if expect[0] == ("network", 0) and version.startswith("11"):   # no precision flags on 11
                with pytest.raises(SystemExit, match="INT8 needs Q/DQ nodes" if "--int8" in argv
                                   else "FP16 needs model_fp16.onnx"):
                    runpy.run_path(str(out / "build_engine.py"), run_name="__main__")
            else:
                runpy.run_path(str(out / "build_engine.py"), run_name="__main__")
                assert calls == expect, (version, argv)
            if "no model_fp16.onnx" in argv:
                (tmp_path / "aside.onnx").rename(out / "model_fp16.onnx")


def test_tensorrt_folder_without_fp16_onnx_falls_back_to_the_fp16_flag(convbn, tmp_path: Path,
                                                                      monkeypatch, capsys) -> None:
    """If the FP16 conversion fails, the folder is still written (model.onnx, the --fp16 trtexec line for
    TensorRT 10) and the report and the CLI line say why model_fp16.onnx is missing."""
    from onnxconverter_common import float16

    from prunec.cli_report import fp16_lines

    def fail(*a, **k):
        raise ValueError("a graph the converter can't type")
    monkeypatch.setattr(float16, "convert_float_to_float16", fail)
    out = tmp_path / "trt"
    with _fresh(convbn) as result:
        rep = BACKENDS["tensorrt"](result, out, {})
    assert sorted(p.name for p in out.iterdir()) == ["build_engine.py", "model.onnx", "trtexec.txt"]
    assert rep["fp16_onnx"] == {"written": False, "reason": "ValueError: a graph the converter can't type"}
    assert rep["trtexec"].startswith(f"trtexec --onnx={out / 'model.onnx'} --saveEngine={out / 'model.engine'} "
                                     "--fp16")
    assert fp16_lines(rep["fp16_onnx"]) == ["fp16    model_fp16.onnx not written (ValueError: a graph the converter "
                                            "can't type): FP16 engines need TensorRT 10's flag"]
    assert "check accuracy before deploying" in fp16_lines({"written": True, "checked": True,
                                                            "rel_err": float("nan")})[0]


def test_coreml_package_spec(convbn, tmp_path: Path) -> None:
    pytest.importorskip("coremltools")
    out = tmp_path / "m.mlpackage"
    rep = BACKENDS["coreml"](convbn, out, {"sparsity": "2:4"})
    assert out.is_dir() and rep["inputs"] and list(rep["inputs"].values())[0] == [2, 1, 28, 28]
    assert rep["weight_ops"].get("constexpr_sparse_to_dense", 0) >= 1
    assert rep["minimum_deployment_target"] == "iOS16"


def test_executorch_runs_and_matches(convbn, tmp_path: Path) -> None:
    pytest.importorskip("executorch.runtime")
    rep = BACKENDS["executorch"](convbn, tmp_path / "m.pte", {})
    assert (tmp_path / "m.pte").stat().st_size == rep["bytes"] > 0
    assert rep["delegated_calls"] >= 1 and rep["rel_err"] < 1e-4


def test_executorch_refuses_2_4(convbn, tmp_path: Path) -> None:
    pytest.importorskip("executorch.runtime")
    with pytest.raises(BackendError, match="no ExecuTorch"):
        BACKENDS["executorch"](convbn, tmp_path / "m.pte", {"sparsity": "2:4"})
