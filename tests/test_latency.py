"""Latency-aware widths: the table, its cache key, snapping, the allocator, targets, bad input."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import prunec
from prunec.cli import main
from prunec.errors import InputError
from prunec.latency import LatencyTable, Op, candidate_widths, load_cached, parse_target, profile
from prunec.passes.latency_select import allocate, digest, error_curve, folds, next_aim, sensitivity, snap


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10)).eval()


def fake_table(a: dict[int, float], b: dict[int, float], dense_ms: float = 10.0) -> LatencyTable:
    """Two groups 'a' (16 units) and 'b' (16 units): op1 out=a, op2 in=a out=b, op3 in=b."""
    ops = [Op("op1", "conv2d", (1, 3, 8, 8), (16, 3, 1, 1), out_group="a"),
           Op("op2", "conv2d", (1, 16, 8, 8), (16, 16, 1, 1), in_group="a", out_group="b"),
           Op("op3", "linear", (1, 16), (4, 16), in_group="b")]
    curves = {"op1": {"out": dict(a)}, "op2": {"in": dict(a), "out": dict(b)}, "op3": {"in": dict(b)}}
    full = {"op1": a[16], "op2": a[16], "op3": b[16]}
    assert a[16] == b[16]
    return LatencyTable({"key_fields": {"threads": 1}}, dense_ms, ops, curves, full, {"a": 16, "b": 16})


LINEAR = {w: w / 16 for w in (4, 8, 12, 16)}
# 12 is slower than 16 (an odd width), 8 costs as much as 4 (a plateau)
STAIRS = {4: 0.4, 8: 0.4, 12: 1.2, 16: 1.0}


def test_candidate_widths() -> None:
    assert candidate_widths(8) == list(range(1, 9))
    assert candidate_widths(24) == [8, 16, 24] and candidate_widths(20) == [8, 16, 20]  # never off the grid
    assert candidate_widths(40, multiple=16) == [16, 32, 40] and candidate_widths(12, multiple=16) == list(range(1, 13))
    assert candidate_widths(512, points=16) == list(range(32, 513, 32))
    assert all(w % 8 == 0 for w in candidate_widths(200)) and candidate_widths(200)[-1] == 200


def test_predict_is_scaled_to_dense_and_separable() -> None:
    t = fake_table(LINEAR, LINEAR)
    assert t.predict({}) == pytest.approx(10.0)
    # op2 with both sides halved costs a quarter (in · out), the others a half
    assert t.predict({"a": 8, "b": 8}) == pytest.approx(10.0 / 3 * (0.5 + 0.25 + 0.5))


def test_steps_and_snap_skip_slow_widths_and_take_free_ones() -> None:
    t = fake_table(STAIRS, LINEAR)
    assert t.steps("a") == [4, 8, 16]       # 12 is slower than 16 (4 and 8 tie: both are steps)
    assert snap(t, "a", 12) == 8            # 12 is slower than 16: the step below it
    assert snap(t, "a", 5) == 8             # 4..8 cost the same: the free units are kept
    assert snap(t, "b", 12) == 12
    assert 8 in t.staircase("a") or 12 in t.staircase("a")


def test_allocator_spends_removal_where_latency_per_importance_is_cheapest() -> None:
    t = fake_table(LINEAR, LINEAR)
    scores = {"a": np.ones(16), "b": np.r_[np.ones(8), np.full(8, 1e-3)]}   # b's last 8 units are unimportant
    widths, pred = allocate(t, scores, 0.8 * t.dense_ms, {"a": 2, "b": 2})
    assert pred <= 0.8 * t.dense_ms + 1e-9
    assert widths["b"] <= 8 and widths["a"] == 16


def test_calibration_factors_steer_the_allocator() -> None:
    """A group whose standalone savings the whole model doesn't deliver (factor 0) is not cut; the
    prediction counts only what the calibrated groups save."""
    t = fake_table(LINEAR, LINEAR)
    scores = {"a": np.ones(16), "b": np.r_[np.ones(8), np.full(8, 1e-3)]}
    t.factors = {"a": 1.0, "b": 0.0}
    assert t.predict({"b": 4}) == pytest.approx(t.dense_ms)
    assert t.predict({"a": 8}) == pytest.approx(fake_table(LINEAR, LINEAR).predict({"a": 8}))
    widths, pred = allocate(t, scores, 0.8 * t.dense_ms, {"a": 2, "b": 2})
    assert widths["b"] == 16 and widths["a"] < 16 and pred <= 0.8 * t.dense_ms + 1e-9
    again = LatencyTable.from_json(json.loads(json.dumps(t.to_json())))
    assert again.factors == t.factors and again.predict({"a": 8, "b": 4}) == pytest.approx(t.predict({"a": 8, "b": 4}))


def test_calibration_maps_summed_savings_through_joint_cuts(monkeypatch) -> None:
    """Each group cut alone sets its factor; then every group cut together to ~50 % and ~25 % is timed, and
    the summed predictions are mapped through what these cuts measured (single cuts' savings don't add up,
    deep cuts save less than their sum): both joint cuts predicted as measured, monotone, extrapolated."""
    import prunec.latency as lat
    t = fake_table(LINEAR, LINEAR)
    t.meta["key_fields"].update(runtime="torch", batch=1)
    timings = iter([[0.010, 0.009, 0.009],     # s: dense, a cut alone, b cut alone (1 ms saved each)
                    [0.010, 0.008, 0.0075]])   # dense, both cut to 50 % (2 ms saved), both to 25 % (2.5 ms)
    monkeypatch.setattr(lat, "time_interleaved", lambda runs, rounds, stat: next(timings))
    made = []
    lat.calibrate(t, {"a": 16, "b": 16}, lambda ws: made.append(ws) or nn.Identity(), nn.Identity(),
                  (torch.randn(1, 4),))
    assert made == [{"a": 4}, {"b": 4}, {"a": 8, "b": 8}, {"a": 4, "b": 4}]
    assert t.factors["a"] == pytest.approx(1 / 5, abs=1e-3) and t.factors["a"] == t.factors["b"]  # 5 predicted, 1 saved
    assert t.predict({"a": 8, "b": 8}) == pytest.approx(10.0 - 2.0)   # the joint cuts, as measured
    assert t.predict({"a": 4, "b": 4}) == pytest.approx(10.0 - 2.5)
    deeper = [t.predict({"a": w, "b": w}) for w in (16, 12, 8, 6, 4, 2, 1)]
    assert deeper == sorted(deeper, reverse=True) and deeper[-1] < 7.5    # monotone, extrapolated past 25 %
    again = LatencyTable.from_json(json.loads(json.dumps(t.to_json())))
    assert again.predict({"a": 2, "b": 6}) == pytest.approx(t.predict({"a": 2, "b": 6}))
    widths, pred = allocate(t, {"a": np.ones(16), "b": np.ones(16)}, 7.75, {"a": 1, "b": 1})
    assert pred <= 7.75 and pred == pytest.approx(t.predict(widths))   # the allocator meets the mapped prediction


def test_joint_cuts_at_one_predicted_saving_count_once() -> None:
    """A coarse width grid snaps the ~50 % and ~25 % joint cuts to the same widths: the two measurements of one
    predicted saving are averaged, never joined by a vertical segment whose slope sent predictions to -2e6 ms
    (MobileNetV3-Small on eager torch, 2 widths per group)."""
    t = fake_table(LINEAR, LINEAR)
    t.calibration = {"joint": [{"predicted_saved_ms": 1.0, "measured_saved_ms": 1.2},
                               {"predicted_saved_ms": 1.0, "measured_saved_ms": 1.4}]}
    assert t.saving(1.0) == pytest.approx(1.3) and t.saving(0.5) == pytest.approx(0.65)
    assert t.saving(3.0) == pytest.approx(3.3)           # past it: its mean slope, 1.3, capped at 1
    assert t.predict({"a": 1, "b": 1}) > 0


def test_calibration_factors_shrink_toward_one_within_the_noise() -> None:
    """A saving the table predicts well above the timing noise keeps its measured factor; one predicted near
    zero can't show a factor, whatever it measured (the clip value 3 used to go to exactly such groups)."""
    from prunec.latency import shrunk_factor
    assert shrunk_factor(1.0, 5.0, 0.0) == pytest.approx(0.2)
    assert shrunk_factor(4.0, 2.0, 0.1) == pytest.approx(2.0, abs=0.01)
    assert shrunk_factor(1.0, 0.001, 1.5) == pytest.approx(1.0, abs=0.01)
    assert shrunk_factor(-0.5, 3.0, 1.5) < 0.2 and 0 <= shrunk_factor(-5.0, 3.0, 0.1) == 0.0
    assert shrunk_factor(0.0, 0.0, 0.0) == 1.0


def test_sensitivity_curves_steer_the_allocator() -> None:
    """Equal latency and equal normalised scores: the group whose cut hurts the output more (measured at
    each probe width) is left whole; the cost curve is the squared error, interpolated between probes in
    the importance removed, never lower for a narrower width."""
    t = fake_table(LINEAR, LINEAR)
    scores = {"a": np.ones(16), "b": np.ones(16)}
    dense = nn.Linear(4, 4)
    per_unit = {"a": 0.9 / 12, "b": 0.1 / 12}   # relative error per unit removed

    def cut(widths: dict[str, int]) -> nn.Module:   # a model whose output error grows with the cut
        (group, width), = widths.items()
        m = nn.Linear(4, 4)
        m.load_state_dict(dense.state_dict())
        with torch.no_grad():
            f = 1 + per_unit[group] * (16 - width)
            m.weight.mul_(f), m.bias.mul_(f)
        return m

    errors, costs = sensitivity(t, scores, cut, dense, [((torch.randn(8, 4),), {})])
    assert sorted(errors["a"]) == [4, 8, 12]                      # the steps nearest 25 / 50 / 75 % kept
    assert errors["a"][4] == pytest.approx(0.9, rel=1e-5) and errors["b"][8] == pytest.approx(0.1 * 8 / 12, rel=1e-5)
    assert costs["a"][16] == 0 and costs["a"][4] == pytest.approx(0.81, rel=1e-5)
    assert costs["a"][10] == pytest.approx((costs["a"][8] + costs["a"][12]) / 2)   # interpolated
    assert costs["a"][2] > costs["a"][4] and np.all(np.diff(costs["a"]) <= 1e-12)  # extrapolated, monotone
    widths, _ = allocate(t, scores, 0.8 * t.dense_ms, {"a": 2, "b": 2}, costs)
    assert widths["a"] == 16 and widths["b"] < 16
    widths, _ = allocate(t, scores, 0.8 * t.dense_ms, {"a": 2, "b": 2}, {"a": costs["b"], "b": costs["a"]})
    assert widths["b"] == 16 and widths["a"] < 16
    made = []
    again = sensitivity(t, scores, lambda ws: made.append(ws) or cut(ws), dense, [((torch.randn(8, 4),), {})],
                        key=digest(dense.state_dict(), "batches 1"))
    assert len(made) == 6 and again[0]["a"][4] == pytest.approx(0.9, rel=1e-5)   # 3 probes × 2 groups, measured
    sensitivity(t, scores, lambda ws: made.append(ws) or cut(ws), dense, [((torch.randn(8, 4),), {})],
                key=digest(dense.state_dict(), "batches 1"))
    assert len(made) == 6                    # same model, batches and scores: reused within the process
    sensitivity(t, scores, lambda ws: made.append(ws) or cut(ws), dense, [((torch.randn(8, 4),), {})],
                key=digest(dense.state_dict(), "batches 2"))
    assert len(made) == 12


def test_sensitivity_samples_are_capped() -> None:
    """The curves run three forwards per group over the calibration data: only its first 32 samples, the
    last batch cut (a keyword input is cut alike; a call without a shared batch dim counts as one)."""
    from prunec.calib import first_samples
    batches = [((torch.randn(12, 3), torch.randn(12)), {"mask": torch.ones(12, 5)}) for _ in range(4)]
    picked = first_samples(batches, 32)
    assert [c[0][0].shape[0] for c in picked] == [12, 12, 8] and picked[2][1]["mask"].shape == (8, 5)
    assert torch.equal(picked[2][0][1], batches[2][0][1][:8])
    assert len(first_samples([((torch.randn(3), torch.randn(4)), {})] * 40, 32)) == 32


def test_refit_probes_are_measured_on_samples_their_refit_never_saw() -> None:
    """``folds``: the first 32 samples halved (alternate calls, or the rows of one call); each half is measured with
    a refit fitted on the other half plus every later call; one sample can't be halved."""
    calls = [((torch.full((8, 2), float(i)),), {}) for i in range(6)]          # 48 samples: 32 measured, 16 more
    (fit_a, on_a), (fit_b, on_b) = folds(calls, 32)
    ids = lambda cs: [int(c[0][0][0, 0]) for c in cs]   # noqa: E731
    assert ids(on_a) == [0, 2] and ids(fit_a) == [1, 3, 4, 5]
    assert ids(on_b) == [1, 3] and ids(fit_b) == [0, 2, 4, 5]
    one = [((torch.arange(10.0)[:, None],), {"w": torch.ones(10, 3)})]
    (fit_a, on_a), (fit_b, on_b) = folds(one, 32)
    assert on_a[0][0][0].flatten().tolist() == [0, 1, 2, 3, 4] == fit_b[0][0][0].flatten().tolist()
    assert on_b[0][1]["w"].shape == (5, 3) and fit_a[0][0][0].flatten().tolist() == [5, 6, 7, 8, 9]
    assert folds([((torch.randn(1, 2),), {})], 32) == [] and folds([], 32) == []


def test_latency_target_refit_probes_are_cross_fitted(monkeypatch, tmp_path) -> None:
    """With a refit, no error probe is measured on a sample its refit was fitted to (a least-squares refit looks
    free on its own samples), and the report says the errors are out of sample."""
    from prunec.passes import Refit
    from prunec.passes import latency_select
    monkeypatch.setenv("PRUNEC_CACHE_DIR", str(tmp_path))
    fitted, measured = [], []
    fitter = Refit.fitter

    def spy_fitter(self, state, groups):
        fitted.append({id(t) for c in state.calib for t in c[0]})
        return fitter(self, state, groups)

    original = latency_select.sensitivity

    def spy_sensitivity(table, scores, cut, dense, batches, *a, **k):
        measured.append({id(t) for c in batches for t in c[0]})
        return original(table, scores, cut, dense, batches, *a, **k)

    monkeypatch.setattr(Refit, "fitter", spy_fitter)
    monkeypatch.setattr(latency_select, "sensitivity", spy_sensitivity)
    calib = [(torch.randn(4, 3, 16, 16),) for _ in range(4)]
    r = prunec.compile(tiny(), torch.randn(1, 3, 16, 16), target_latency=0.95, runtime="torch", threads=1,
                       method="flap", refit="ls", calib=calib)
    assert r.report["verify"]["passed"]
    assert len(fitted) == len(measured) == 2 and all(not (f & m) for f, m in zip(fitted, measured))
    assert fitted[0] | measured[0] == {id(c[0]) for c in calib}
    assert r.report["passes"]["latency_select"]["sensitivity"]["out_of_sample"] is True


def test_a_missed_latency_target_is_said(monkeypatch, tmp_path) -> None:
    """When no allocation measures within ±10 % of the goal, the closest is kept and a note says so."""
    from prunec.passes import latency_select
    monkeypatch.setenv("PRUNEC_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(latency_select, "measure", lambda rt, models, *a, **k: {"dense": 10.0, "pruned": 9.5})
    r = prunec.compile(tiny(), torch.randn(1, 3, 16, 16), target_latency=0.8, runtime="torch", threads=1)
    tries = r.report["passes"]["latency_select"]["refine"]
    assert len(tries) >= 2 and {t["measured_ratio"] for t in tries} == {0.95}
    assert [n for n in r.report["notes"] if n.startswith("latency_select: target missed: measured 0.95 of dense "
                                                        f"for a goal of 0.80 after {len(tries)} allocation(s)")]
    monkeypatch.setattr(latency_select, "measure", lambda rt, models, *a, **k: {"dense": 10.0, "pruned": 8.3})
    r = prunec.compile(tiny(), torch.randn(1, 3, 16, 16), target_latency=0.8, runtime="torch", threads=1)
    assert not [n for n in r.report["notes"] if "target missed" in n]


def test_error_curve_is_monotone_under_noisy_measurements() -> None:
    """A narrower probe that measured a smaller error (noise, or a lucky cut) costs as much as the wider one."""
    curve = error_curve(np.ones(16), {12: 0.5, 8: 0.3, 4: 0.6})
    assert curve[8] == pytest.approx(0.25) and curve[4] == pytest.approx(0.36) and curve[16] == 0


def test_next_aim_bisects_once_the_goal_is_bracketed() -> None:
    """Proportional steps first; once one aim measured too fast and a larger one too slow, the midpoint."""
    first = [{"aim_ms": 5.0, "measured_ratio": 0.3, "goal": 0.5}]
    assert next_aim(first, 5.0, 10.0) == pytest.approx(7.5)            # ×1.5 at most
    both = first + [{"aim_ms": 7.5, "measured_ratio": 0.65, "goal": 0.5}]
    assert next_aim(both, 5.0, 10.0) == pytest.approx(6.25)            # not 7.5 × 0.77 = 5.77, then back up
    noisy = both + [{"aim_ms": 4.0, "measured_ratio": 0.7, "goal": 0.5}]  # a smaller aim measured slower
    assert next_aim(noisy, 5.0, 10.0) == pytest.approx(4.0 / 1.4)      # no bracket: proportional from the last


def test_allocator_unreachable_names_best_reachable() -> None:
    t = fake_table(LINEAR, LINEAR)
    with pytest.raises(InputError, match=r"unreachable: the best reachable is .* ms \(0\.\d+ of the dense"):
        allocate(t, {"a": np.ones(16), "b": np.ones(16)}, 0.01, {"a": 8, "b": 8})


def test_parse_target() -> None:
    assert parse_target(0.5) == ("fraction", 0.5)
    assert parse_target("12ms") == ("ms", 12.0)
    assert parse_target("0.02s") == ("ms", 20.0)
    for bad in ("fast", "1.5", "0", "-3ms"):
        with pytest.raises(InputError):
            parse_target(bad)


def test_profile_caches_keyed_table_and_refuses_a_stale_one(tmp_path: Path) -> None:
    model, x = tiny(), (torch.randn(1, 3, 16, 16),)
    coupling = prunec.analyze(model, x)
    t1 = profile(model, coupling.program, coupling, "torch", threads=1, points=4, rounds=2, cache=tmp_path)
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1 and t1.meta["cache"] == str(files[0])
    assert len(t1.ops) == 4 and all(t1.full[o.name] > 0 for o in t1.ops)
    t2 = profile(model, coupling.program, coupling, "torch", threads=1, points=4, rounds=2, cache=tmp_path)
    assert t2.curves == t1.curves and t2.dense_ms == t1.dense_ms      # read back, not re-measured
    profile(model, coupling.program, coupling, "torch", batch=2, threads=1, points=4, rounds=2, cache=tmp_path)
    assert len(list(tmp_path.glob("*.json"))) == 2                      # another batch: another key
    data = json.loads(files[0].read_text())
    data["meta"]["key_fields"]["threads"] = 7                          # a table measured elsewhere
    files[0].write_text(json.dumps(data))
    with pytest.raises(InputError, match="measured for a different threads"):
        load_cached(files[0], t1.meta["key_fields"])


def test_width_grid_is_the_runtimes_vector_width(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A runtime whose kernels are 16 floats wide gets its widths timed (and so chosen) in multiples of 16,
    and a table measured on another grid has another key."""
    import dataclasses

    from prunec.runtimes import RUNTIMES
    model, x = tiny(), (torch.randn(1, 3, 16, 16),)
    coupling = prunec.analyze(model, x)
    by8 = profile(model, coupling.program, coupling, "torch", threads=1, points=8, rounds=1, cache=tmp_path)
    monkeypatch.setitem(RUNTIMES, "torch", dataclasses.replace(RUNTIMES["torch"], multiple=16))
    by16 = profile(model, coupling.program, coupling, "torch", threads=1, points=8, rounds=1, cache=tmp_path)
    assert by16.meta["key"] != by8.meta["key"] and by16.meta["key_fields"]["multiple"] == 16
    wide = [o.name for o in by16.ops if o.w_shape[0] == 64]
    assert wide and all(w % 16 == 0 for o in wide for w in by16.curves[o]["out"])
    assert any(w % 16 for o in wide for w in by8.curves[o]["out"])   # 8, 24, … on the default grid
    assert RUNTIMES["executorch"].multiple in (8, 16) and RUNTIMES["onnxruntime"].multiple == 8


def test_op_timing_is_chosen_and_keyed(tmp_path: Path) -> None:
    """``op_timing="wall"`` times each standalone op end to end instead of by its kernels; the key records which
    (a runtime without a kernel timer, torch, is wall-timed either way), and an unknown timing is bad input."""
    pytest.importorskip("onnxruntime")
    model, x = tiny(), (torch.randn(1, 3, 16, 16),)
    coupling = prunec.analyze(model, x)
    kw = dict(threads=1, points=4, rounds=1, cache=tmp_path)
    kernel = profile(model, coupling.program, coupling, "onnxruntime", **kw)
    wall = profile(model, coupling.program, coupling, "onnxruntime", op_timing="wall", **kw)
    assert (kernel.meta["key_fields"]["op_timing"], wall.meta["key_fields"]["op_timing"]) == ("kernel", "wall")
    assert kernel.meta["key"] != wall.meta["key"] and len(list(tmp_path.glob("*.json"))) == 2
    assert profile(model, coupling.program, coupling, "torch", **kw).meta["key_fields"]["op_timing"] == "wall"
    with pytest.raises(InputError, match="op timing 'cycles' is unknown"):
        profile(model, coupling.program, coupling, "torch", op_timing="cycles", **kw)


def test_cli_profile_prints_staircase_and_how_ops_were_timed(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("PRUNEC_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "table.json"
    for timing, says in (("kernel", "by their kernels' own time"), ("wall", "end to end")):
        code = main(["profile", "zoo:convbn", "--runtime", "onnxruntime", "--threads", "1", "--points", "4",
                     "--rounds", "1", "--op-timing", timing, "-o", str(out)])
        stdout = capsys.readouterr().out
        assert code == 0 and says in stdout.splitlines()[0] and "table   " in stdout
        assert json.loads(out.read_text())["meta"]["key_fields"]["op_timing"] == timing
    assert len(list((tmp_path / "cache" / "latency").glob("*.json"))) == 2


def test_kernel_timer_leaves_no_folder_behind() -> None:
    """onnxruntime's profile folder goes with its run, read or not (a later variant's build may fail first)."""
    pytest.importorskip("onnxruntime")
    import gc

    from prunec.runtimes import OrtKernelRun
    conv, x = nn.Conv2d(8, 8, 1), (torch.randn(1, 8, 4, 4),)
    read, unread = OrtKernelRun(conv, x, 1), OrtKernelRun(conv, x, 1)
    folders = [Path(read._dir), Path(unread._dir)]
    read()
    assert read.kernel_s() > 0 and not folders[0].exists() and folders[1].is_dir()
    del unread
    gc.collect()
    assert not folders[1].exists()


def _cli(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = main(args)
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("runtime,package", [("onnxruntime", "onnxruntime"), ("executorch", "executorch.runtime")])
def test_ops_are_timed_without_their_edge_layout_changes(runtime: str, package: str) -> None:
    """A standalone conv pays layout changes at its edges that the model it came from does not (onnxruntime's
    NCHW↔NCHWc reorders, XNNPACK's NCHW↔NHWC transposes): the latency table takes the kernels' own time from
    the runtime's profiler (onnxruntime's, ETDump), those left out."""
    pytest.importorskip(package)
    from prunec.runtimes import RUNTIMES, time_interleaved
    conv, x = nn.Conv2d(32, 32, 3, padding=1, groups=32, bias=False), (torch.randn(2, 32, 56, 56),)
    run = RUNTIMES[runtime].prepare_op(conv, x, 1)
    wall = time_interleaved([run], rounds=3, stat="min")[0]
    kernel = run.kernel_s()
    assert 0 < kernel < wall


def test_cli_bad_latency_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "m.pt2"
    code, err = _cli(["zoo:convbn", "--target-latency", "0.5", "--runtime", "tvm", "-o", str(out)], capsys)
    assert code == 2 and err == ("prunec: error: unknown runtime 'tvm'. Use one of "
                                 "['executorch', 'onnxruntime', 'tensorrt', 'torch'].")
    code, err = _cli(["zoo:convbn", "--target-latency", "soon", "-o", str(out)], capsys)
    assert code == 2 and "is not a fraction or a time" in err and len(err.splitlines()) == 1
    code, err = _cli(["zoo:convbn", "--target-latency", "0.5", "--channels", "0.3", "-o", str(out)], capsys)
    assert code == 2 and "latency target and channel ratios both given" in err
    code, err = _cli(["zoo:convbn", "--target-latency", "0.5", "--target-macs", "0.5", "-o", str(out)], capsys)
    assert code == 2 and "Ask for one target" in err
    import prunec.runtimes
    monkeypatch.setattr(prunec.runtimes.importlib.util, "find_spec", lambda name: None)
    code, err = _cli(["profile", "zoo:convbn", "--runtime", "executorch"], capsys)
    assert code == 2 and err == ("prunec: error: runtime 'executorch' is not installed (no package 'executorch'). "
                                 "Install it with: pip install 'prunec[executorch]'.")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_tensorrt_runtime_is_refused_without_its_package_or_a_gpu(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """--target tensorrt times on TensorRT (not on this CPU's onnxruntime): without the package, or with it and
    no CUDA GPU, one line that says which, and nothing written; a table's key names the GPU it was timed on."""
    import prunec.runtimes
    from prunec.latency import key_fields, layer_ops
    from prunec.runtimes import RUNTIMES
    out = tmp_path / "m_trt"
    real_find_spec = prunec.runtimes.importlib.util.find_spec
    monkeypatch.setattr(prunec.runtimes.importlib.util, "find_spec",
                        lambda name: None if name == "tensorrt" else real_find_spec(name))
    code, err = _cli(["zoo:convbn", "--target", "tensorrt", "--target-latency", "0.5", "-o", str(out)], capsys)
    assert code == 2 and err == ("prunec: error: runtime 'tensorrt' is not installed (no package 'tensorrt'). "
                                 "Install it with: pip install 'prunec[tensorrt]' on a host with an NVIDIA GPU, or "
                                 "time on --runtime onnxruntime.")
    monkeypatch.setattr(prunec.runtimes.importlib.util, "find_spec",
                        lambda name: object() if name == "tensorrt" else real_find_spec(name))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, err = _cli(["profile", "zoo:convbn", "--runtime", "tensorrt"], capsys)
    assert code == 2 and err == ("prunec: error: runtime 'tensorrt' needs a CUDA GPU and torch sees none. Run on a "
                                 "host with an NVIDIA GPU and CUDA-enabled torch, or time on --runtime onnxruntime.")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()   # torch.export asks find_spec too
    model, x = tiny(), (torch.randn(1, 3, 16, 16),)
    coupling = prunec.analyze(model, x)
    ops = layer_ops(coupling.program, coupling)
    keys = {}
    monkeypatch.setattr(type(RUNTIMES["tensorrt"]), "version", lambda self: "10.13")   # not installed here
    for gpu in ("NVIDIA H100 80GB HBM3", "NVIDIA L4"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, gpu=gpu: gpu)
        keys[gpu] = key_fields(coupling.program, ops, RUNTIMES["tensorrt"], 1, 1, 8)["machine"]
    assert keys["NVIDIA L4"].endswith("NVIDIA L4") and len(set(keys.values())) == 2
    # CPU threads don't apply to a GPU runtime: one table whatever --threads says
    assert key_fields(coupling.program, ops, RUNTIMES["tensorrt"], 1, 16, 8) == \
        key_fields(coupling.program, ops, RUNTIMES["tensorrt"], 1, 2, 8)
    assert RUNTIMES["onnxruntime"].device() == ""


def test_cli_unreachable_target_names_the_best(tmp_path: Path, capsys: pytest.CaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRUNEC_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "m.pt2"
    code, err = _cli(["zoo:convbn", "--target-latency", "1us", "--runtime", "torch", "--threads", "1",
                      "-o", str(out)], capsys)
    assert code == 2, err
    code, err = _cli(["zoo:convbn", "--target-latency", "0.001ms", "--runtime", "torch", "--threads", "1",
                      "-o", str(out)], capsys)
    assert code == 2 and "is unreachable: the best reachable is" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_target_latency_end_to_end_on_onnxruntime(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv("PRUNEC_CACHE_DIR", str(tmp_path / "cache"))
    path, out, report = tmp_path / "tiny.pt", tmp_path / "tiny.onnx", tmp_path / "r.json"
    torch.save(tiny(), path)
    code = main([str(path), "--trust-pickle", "--input-shape", "1,3,64,64", "--target", "onnx",
                 "--target-latency", "0.7", "--threads", "1", "-o", str(out), "--report", str(report)])
    stdout = capsys.readouterr().out
    assert code == 0
    data = json.loads(report.read_text())
    assert data["verify"]["passed"] and "verify  PASSED" in stdout
    lat = data["latency"]
    assert lat["runtime"] == "onnxruntime" and lat["mode"] == "target"
    assert lat["predicted_ms"] > 0 and lat["measured_ms"] > 0 and lat["dense_ms"] > 0
    assert data["macs_after"] < data["macs_before"]
    assert "latency predicted" in stdout and "measured" in stdout
    cached = [json.loads(f.read_text()) for f in (tmp_path / "cache" / "latency").glob("*.json")]
    # each group was calibrated on the whole model once, and the factors went into the cached table
    assert cached and cached[0]["factors"] and set(cached[0]["factors"]) == set(cached[0]["calibration"]["groups"])
    joint = cached[0]["calibration"]["joint"]                           # then every group cut together, twice
    assert [j["fraction"] for j in joint] == [0.5, 0.25] and all(j["predicted_saved_ms"] > 0 for j in joint)
    assert data["passes"]["latency_select"]["factors"]["groups"] == len(cached[0]["factors"])
    # and each group's cut was weighed by the output error it causes (measured on the example input)
    sens = data["passes"]["latency_select"]["sensitivity"]
    assert sens["groups"] == len(cached[0]["factors"]) and 0 < sens["min"] <= sens["max"]


class KeywordMLP(nn.Module):
    """A model called with keyword inputs only, as HF models are (``input=…, scale=…, use_cache=False``)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(256, 1024), nn.Linear(1024, 256)

    def forward(self, *, hidden: torch.Tensor, scale: torch.Tensor, use_cache: bool = True) -> torch.Tensor:
        assert not use_cache, "the runtimes must get the example's options too"
        return self.down(torch.relu(self.up(hidden))) * scale


def test_target_latency_with_keyword_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The runtimes are fed the example's keyword inputs (tensors positional, options fixed): the dense model,
    the calibration cuts, the re-aims and the report's measurement all run (they called the model without them)."""
    monkeypatch.setenv("PRUNEC_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    kwargs = {"hidden": torch.randn(64, 256), "scale": torch.rand(64, 1), "use_cache": False}
    r = prunec.compile(KeywordMLP().eval(), (), example_kwargs=kwargs, target_latency=0.8, runtime="torch",
                       threads=1)
    lat = r.report["latency"]
    assert r.report["verify"]["passed"] and r.report["macs_after"] < r.report["macs_before"]
    assert lat["measured_ms"] > 0 and lat["dense_ms"] > 0 and lat["mode"] == "target"
    assert r.report["passes"]["latency_select"]["factors"]["groups"] == 1


def test_executorch_timer_outlives_garbage_collection() -> None:
    """The XNNPACK method points into its loaded program: the timer keeps it alive (it segfaulted
    on the first call after a collection when only the method was kept)."""
    pytest.importorskip("executorch.runtime")
    import gc

    from prunec.runtimes import get_runtime
    run = get_runtime("executorch").prepare(tiny(), (torch.randn(1, 3, 16, 16),), 1)
    gc.collect()
    junk = [bytearray(b"\xff" * (1 << 16)) for _ in range(256)]  # reuse whatever memory was freed
    out = run()
    del junk
    assert tuple(out[0].shape) == (1, 10)


def test_report_says_when_the_prediction_is_uncalibrated() -> None:
    """`--channels R --runtime X` snaps widths on the table as profiled; until a target compile calibrates it on the
    whole model, its prediction is standalone ops only, and the report line says so."""
    from prunec.cli_report import latency_lines
    lat = {"runtime": "onnxruntime", "batch": 1, "threads": 1, "predicted_ms": 3.7, "predicted_ratio": 0.37,
           "measured_ms": 4.7, "dense_ms": 10.0, "measured_ratio": 0.47, "load": [0.5]}
    (line,) = latency_lines({**lat, "calibrated": False})
    assert "predicted 3.7 ms (0.37 of dense) by standalone ops (the table is not calibrated" in line
    assert "standalone" not in latency_lines({**lat, "calibrated": True})[0]


def test_runtime_feeds_inputs_by_name_when_the_exporter_drops_one() -> None:
    """A model that ignores one of its inputs exports without it; the timers bind the rest by name (positional
    binding fed the ignored 2-D input to the conv: onnxruntime refused its rank)."""
    from prunec.latency import measure

    class IgnoresFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.conv(b)

    ms = measure("onnxruntime", {"m": IgnoresFirst().eval()}, (torch.randn(1, 5), torch.randn(1, 3, 16, 16)), 1, 1, 1)
    assert ms["m"] > 0
