"""Data-driven passes: calibration loading/streaming, criteria, ThiNet/LASSO refit, searches."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import prunec
from prunec.calib import collect, load_calib
from prunec.errors import InputError
from prunec.models_zoo import build
from prunec.passes import L1, Select
from prunec.passes.activation import Activation, ActivationVariance
from prunec.passes.fisher import Fisher
from prunec.passes.lasso import Lasso, lasso_gram, lasso_keep
from prunec.passes.obd import OBD
from prunec.passes.sensitivity import Sensitivity
from prunec.passes.target_search import TargetSearch
from prunec.passes.taylor import Taylor
from prunec.passes.thinet import ThiNet
from prunec.passes.wanda import Wanda

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def convbn():
    model, inputs = build("convbn")
    gen = torch.Generator().manual_seed(1)
    calib = [(torch.randn(2, 1, 28, 28, generator=gen),) for _ in range(3)]
    return model, inputs, calib


@pytest.fixture(scope="module")
def l1_plan(convbn):
    model, inputs, _ = convbn
    return prunec.compile(model, inputs, channels=0.5).plan.kept


CRITERIA = [Taylor, Fisher, lambda: OBD(probes=1), Activation, ActivationVariance, Wanda]


@pytest.mark.parametrize("make", CRITERIA, ids=["taylor", "fisher", "obd", "activation",
                                                "activation_var", "wanda"])
def test_criterion_compiles_verifies_and_differs_from_l1(convbn, l1_plan, make):
    model, inputs, calib = convbn
    result = prunec.compile(model, inputs, passes=[make(), Select({"channel": 0.5})], calib=calib)
    assert result.report["verify"]["passed"]
    assert result.report["macs_after"] < 0.5 * result.report["macs_before"]
    assert {n: len(k) for n, k in result.plan.kept.items()} == {n: len(k) for n, k in l1_plan.items()}
    assert result.plan.kept != l1_plan  # data changes the choice on this random-weight model


@pytest.mark.parametrize("name", ["taylor", "fisher", "obd", "activation", "activation_var",
                                  "wanda", "thinet", "lasso"])
def test_data_passes_need_calibration(convbn, name):
    model, inputs, _ = convbn
    from prunec.passes.base import PASSES
    select = [Select({"channel": 0.5})] if "scores" in PASSES[name].provides else []
    with pytest.raises(InputError, match="needs calibration data"):
        prunec.compile(model, inputs, passes=[PASSES[name](), *select])


def test_taylor_cross_entropy_with_labels_differs_from_output_norm(convbn):
    model, inputs, calib = convbn
    from prunec.passes.base import State, run_passes
    from prunec.analyze import build_coupling
    from prunec.trace import trace
    program = trace(model, inputs)
    coupling = build_coupling(program)
    labels = [torch.tensor([1, 7]), torch.tensor([3, 3]), torch.tensor([0, 9])]
    ce = run_passes([Taylor(labels=labels)], State(model, program, coupling, calib=calib)).scores
    norm = run_passes([Taylor()], State(model, program, coupling, calib=calib)).scores
    assert set(ce) == set(norm) == {g.name for g in coupling.groups}
    name = "body.0.weight@0"
    assert not np.allclose(ce[name] / ce[name].sum(), norm[name] / norm[name].sum(), rtol=1e-2)
    assert all(p.grad is None for p in model.parameters())  # the user's .grad is untouched


def _output_error(model, pruned, calib):
    with torch.no_grad():
        return float(np.mean([float((pruned(*b) - model(*b)).norm() / model(*b).norm()) for b in calib]))


@pytest.mark.parametrize("cls", [ThiNet, Lasso], ids=["thinet", "lasso"])
def test_selection_refit_reduces_reconstruction_error(convbn, cls):
    model, inputs, calib = convbn
    refit = cls(0.5, samples=512)
    with_refit = prunec.compile(model, inputs, passes=[refit], calib=calib)
    without = prunec.compile(model, inputs, passes=[cls(0.5, samples=512, refit=False)], calib=calib)
    assert with_refit.report["verify"]["passed"] and without.report["verify"]["passed"]
    assert with_refit.plan.kept == without.plan.kept
    # the requested count: 16 → 8 and 32 → 16 channels (round_to=8)
    assert sorted(len(k) for k in with_refit.plan.kept.values()) == [8, 16]
    errors = with_refit.report["passes"][refit.name]["errors"]
    assert set(errors) == {"body.0.weight", "body.3.weight", "head.weight"}
    for fqn, (before, after) in errors.items():
        assert after < 0.5 * before, (fqn, before, after)
    # end to end on the calibration inputs: the refit model is much closer to the original
    err_refit = _output_error(model, with_refit.model, calib)
    err_plain = _output_error(model, without.model, calib)
    assert err_refit < 0.2 * err_plain, (err_refit, err_plain)
    assert with_refit.model.body[0].weight.shape == (16, 8, 3, 3)


@pytest.mark.parametrize("cls", [ThiNet, Lasso], ids=["thinet", "lasso"])
def test_selection_is_deterministic_with_seed(convbn, cls):
    model, inputs, calib = convbn
    a = prunec.compile(model, inputs, passes=[cls(0.5, samples=256, seed=3)], calib=calib)
    b = prunec.compile(model, inputs, passes=[cls(0.5, samples=256, seed=3)], calib=calib)
    assert a.plan.kept == b.plan.kept
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(x, y), name


def test_thinet_beats_l1_on_output_error(convbn):
    model, inputs, calib = convbn
    thinet = prunec.compile(model, inputs, passes=[ThiNet(0.5, samples=512, refit=False)], calib=calib)
    l1 = prunec.compile(model, inputs, passes=[L1(), Select({"channel": 0.5}, round_to=8)])
    assert _output_error(model, thinet.model, calib) < _output_error(model, l1.model, calib)


def test_lasso_solver_limits_and_count():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(10, 200))
    gram, cross = z @ z.T, z @ z.sum(0)
    np.testing.assert_allclose(lasso_gram(gram, cross, 1e-12), np.ones(10), atol=1e-5)
    assert np.count_nonzero(lasso_gram(gram, cross, float(np.abs(cross).max()) * 1.01)) == 0
    for n_keep in (1, 4, 7):
        kept = lasso_keep(gram, cross, n_keep)
        assert len(kept) == n_keep and len(set(kept.tolist())) == n_keep


def test_sensitivity_json_and_plot(convbn, tmp_path):
    model, inputs, calib = convbn
    ratios = [0.1, 0.4, 0.7]
    sens = Sensitivity(ratios=ratios, out=tmp_path / "s.json", plot=tmp_path / "s.png")
    result = prunec.compile(model, inputs, passes=[sens, L1(), Select({"channel": 0.25})], calib=calib)
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["ratios"] == ratios and data["metric"] == "relative output error"
    assert set(data["units"]) == {g.name for g in result.coupling.groups}
    for row in data["units"].values():
        assert len(row["drop"]) == len(ratios) and row["kind"] == "channel"
        assert row["drop"][-1] > row["drop"][0] >= 0.0
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by_kind = Sensitivity(ratios=[0.5], by="kind")
    again = prunec.compile(model, inputs, passes=[by_kind, "l1", Select({"channel": 0.25})], calib=calib)
    assert list(again.report["passes"]["sensitivity"]["units"]) == ["channel"]


def test_target_search_hits_macs_within_5_percent(convbn):
    model, inputs, _ = convbn
    search = TargetSearch(target_macs=0.5, round_to=1, steps=8)
    result = prunec.compile(model, inputs, passes=[search])
    assert result.report["verify"]["passed"]
    kept = result.report["macs_after"] / result.report["macs_before"]
    assert abs(kept - 0.5) <= 0.05 * 0.5, kept


def test_max_drop_search_respects_the_floor(convbn):
    model, inputs, calib = convbn
    with torch.no_grad():
        ref = [model(*b) for b in calib]

    def fidelity(m):  # higher is better
        with torch.no_grad():
            return -float(np.mean([float((m(*b) - r).norm() / r.norm()) for b, r in zip(calib, ref)]))

    search = TargetSearch(max_drop=0.3, metric=fidelity, round_to=1, steps=6)
    result = prunec.compile(model, inputs, passes=[search])
    ratio = result.plan.meta["search"]["ratio"]
    assert 0.0 < ratio < 0.95
    assert 0.0 - fidelity(result.model) <= 0.3 + 1e-6
    with pytest.raises(InputError, match="needs a metric"):
        TargetSearch(max_drop=0.1)


def test_load_calib_tensors_images_text(tmp_path):
    example = (torch.zeros(4, 1, 28, 28),)
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(20, 1, 28, 28)).astype(np.float32))
    a = load_calib(tmp_path / "x.npy", example, n_samples=10, seed=0)
    b = load_calib(tmp_path / "x.npy", example, n_samples=10, seed=0)
    c = load_calib(tmp_path / "x.npy", example, n_samples=10, seed=1)
    assert [t[0].shape[0] for t in a] == [4, 4, 2]
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a, b))
    assert not all(torch.equal(x[0], y[0]) for x, y in zip(a, c))
    torch.save(torch.randn(6, 1, 28, 28), tmp_path / "x.pt")
    assert sum(t[0].shape[0] for t in load_calib(tmp_path / "x.pt", example, 100)) == 6
    from PIL import Image
    (tmp_path / "img").mkdir()
    for i in range(5):
        Image.fromarray(np.full((40, 30, 3), 50 * i, np.uint8)).save(tmp_path / "img" / f"{i}.png")
    imgs = load_calib(tmp_path / "img", (torch.zeros(2, 3, 16, 16),), n_samples=5)
    assert [t[0].shape for t in imgs] == [(2, 3, 16, 16)] * 2 + [(1, 3, 16, 16)]
    (tmp_path / "t.jsonl").write_text('{"text": "hello"}\n')
    with pytest.raises(InputError, match="needs a tokenizer"):
        load_calib(tmp_path / "t.jsonl", (torch.zeros(1, 8, dtype=torch.long),))
    with pytest.raises(InputError, match="shape"):
        load_calib(tmp_path / "x.npy", (torch.zeros(1, 3, 28, 28),))


def test_text_models_calibrate_on_token_id_arrays(tmp_path):
    """A text model's --calib may be token ids saved as an integer array (no tokenizer needed): rows are one
    stream, cut into windows of the example's length; floats, negative ids and ids past the vocabulary are refused."""
    from prunec.calib import load_text_calib
    example = {"input_ids": torch.zeros(2, 8, dtype=torch.long), "use_cache": False}
    np.save(tmp_path / "ids.npy", np.arange(40, dtype=np.int32).reshape(4, 10))
    batches = load_text_calib(tmp_path / "ids.npy", example, None, n_samples=5, vocab=100)
    assert [b["input_ids"].shape for b in batches] == [(2, 8), (2, 8), (1, 8)]
    assert all(b["use_cache"] is False and b["input_ids"].dtype == torch.long for b in batches)
    assert sorted(int(b["input_ids"][i, 0]) for b in batches for i in range(len(b["input_ids"]))) == [0, 8, 16, 24, 32]
    for bad, match in ((np.ones((2, 8), np.float32), "float32 values, not token ids"),
                       (-np.ones((2, 8), np.int64), "negative token ids"), (np.full((2, 8), 100), "token id 100")):
        np.save(tmp_path / "bad.npy", bad)
        with pytest.raises(InputError, match=match):
            load_text_calib(tmp_path / "bad.npy", example, None, vocab=100)
    (tmp_path / "t.txt").write_text("hello world\n")
    with pytest.raises(InputError, match="needs the model's tokenizer"):
        load_text_calib(tmp_path / "t.txt", example, None)


def test_collect_streams_the_same_statistics_as_hooks(convbn):
    model, inputs, calib = convbn
    program = prunec.compile(model, inputs, channels=0.0).coupling.program
    sums = {}

    def fn(node, value):
        if node.target is torch.ops.aten.conv2d.default:
            sums[node.name] = sums.get(node.name, 0) + value.sum((0, 2, 3))

    collect(program, calib, fn)
    seen = []
    hook = model.body[0].register_forward_hook(lambda m, i, o: seen.append(o.sum((0, 2, 3))))
    with torch.no_grad():
        for b in calib:
            model(*b)
    hook.remove()
    torch.testing.assert_close(sums["conv2d_1"], sum(seen), rtol=1e-5, atol=1e-4)
