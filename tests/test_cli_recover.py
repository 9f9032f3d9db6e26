"""CLI recovery: `prunec MODEL ... --recover-steps N --data PATH` and `prunec recover PRUNED ...`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from prunec.cli import main


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    path = tmp_path / "x.npy"
    np.save(path, np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32))
    return path


def _run_pt2(path: Path, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.export.load(path).module()(x)


def test_compile_then_recover_writes_a_trained_artifact_and_report(tmp_path: Path, data: Path) -> None:
    plain, trained, report = tmp_path / "plain.pt2", tmp_path / "trained.pt2", tmp_path / "r.json"
    base = ["zoo:mlp", "--channels", "0.5", "--round-to", "1"]
    assert main([*base, "-o", str(plain)]) == 0
    assert main([*base, "--recover-steps", "6", "--data", str(data), "--eval", str(data),
                 "--recover-lr", "1e-3", "-o", str(trained), "--report", str(report)]) == 0
    rec = json.loads(report.read_text())["recover"]
    assert rec["steps"] == 6 and len(rec["loss"]) == 6 and rec["after"]["kd_loss"] < rec["before"]["kd_loss"]
    x = torch.randn(4, 64)
    assert not torch.allclose(_run_pt2(plain, x), _run_pt2(trained, x))


def test_recover_subcommand_trains_a_pruned_pt2(tmp_path: Path, data: Path, capsys) -> None:
    plain, out = tmp_path / "plain.pt2", tmp_path / "rec.pt2"
    assert main(["zoo:mlp", "--channels", "0.5", "--round-to", "1", "-o", str(plain)]) == 0
    code = main(["recover", str(plain), "--teacher", "zoo:mlp", "--data", str(data), "--steps", "6",
                 "--recover-lr", "1e-3", "-o", str(out)])
    assert code == 0 and "recover 6 steps" in capsys.readouterr().out
    x = torch.randn(4, 64)
    assert _run_pt2(out, x).shape == (4, 10)
    assert not torch.allclose(_run_pt2(plain, x), _run_pt2(out, x))


def test_a_pt2_model_is_its_own_teacher(tmp_path: Path, data: Path) -> None:
    """An exported program refuses .eval(): the teacher loaded from a .pt2 must still run."""
    source, out, report = tmp_path / "src.pt2", tmp_path / "out.pt2", tmp_path / "r.json"
    assert main(["zoo:mlp", "--channels", "0.25", "--round-to", "1", "-o", str(source)]) == 0
    assert main([str(source), "--channels", "0.5", "--round-to", "1", "--recover-steps", "3", "--data", str(data),
                 "-o", str(out), "--report", str(report)]) == 0
    assert len(json.loads(report.read_text())["recover"]["loss"]) == 3


@pytest.mark.parametrize("argv, match", [
    (["zoo:mlp", "--channels", "0.5", "--recover-steps", "5"], "needs data"),
    (["zoo:mlp", "--channels", "0.5", "--recover-steps", "-1", "--data", "{data}"], "must be ≥ 1"),
    (["zoo:mlp", "--channels", "0.5", "--recover-steps", "3", "--data", "{tmp}/none.npy"], "does not exist"),
    (["recover", "{tmp}/none.pt2", "--teacher", "zoo:mlp", "--data", "{data}", "--steps", "3"], "does not exist"),
])
def test_bad_recovery_input_exits_2_and_writes_nothing(tmp_path: Path, data: Path, capsys, argv, match) -> None:
    out = tmp_path / "out.pt2"
    argv = [a.format(data=data, tmp=tmp_path) for a in argv] + ["-o", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prunec: error:") and match in err and len(err.splitlines()) == 1
    assert not out.exists()
