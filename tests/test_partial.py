"""Prune what traces: a detector whose post-processing can't be exported gets its traceable
parts pruned, each verified, and the whole model checked end to end against the zeroed reference."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import prunec
from prunec.partial import PartsResult
from prunec.verify import compare

detection = pytest.importorskip("torchvision.models.detection")


def _tiny_faster_rcnn() -> nn.Module:
    """A Faster R-CNN small enough for a test: 3-conv backbone, one feature map, 20 proposals."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign
    backbone = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(),
                             nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU(),
                             nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU())
    backbone.out_channels = 32
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    model = detection.FasterRCNN(
        backbone, min_size=64, max_size=64, box_head=TwoMLPHead(32 * 7 * 7, 64),
        box_predictor=FastRCNNPredictor(64, 3),
        rpn_anchor_generator=AnchorGenerator(((16, 32),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2), box_score_thresh=0.0,
        box_detections_per_img=10, rpn_pre_nms_top_n_test=50, rpn_post_nms_top_n_test=20)
    for p in model.parameters():  # no zero-initialised biases: the check must not be vacuous
        nn.init.normal_(p, 0, 0.1)
    return model.eval()


def test_detector_parts_pruned_and_checked_end_to_end() -> None:
    model = _tiny_faster_rcnn()
    x = [torch.rand(3, 64, 64)]
    with torch.no_grad():
        dense = model(x)
    result = prunec.compile(model, (x,), channels=0.3)
    assert isinstance(result, PartsResult)
    report = result.report
    assert [p["part"] for p in report["parts"]] == ["backbone", "rpn.head", "roi_heads.box_head",
                                                   "roi_heads.box_predictor"]
    assert all(p["synced"] and p["rel_err"] <= 1e-4 for p in report["parts"]), report["parts"]
    # the backbone's features feed the RPN head directly and the box head through RoIAlign (channel-wise,
    # untraced glue): tied across the three parts; the box head's output feeds only the predictor: tied
    assert report["frozen_boundaries"] == []
    assert sorted(b["boundary"] for b in report["boundaries"] if b["tied"]) == [
        "backbone[out 0] → rpn.head[in 0], roi_heads.box_head[in 0] (via roi_align)",
        "roi_heads.box_head[out 0] → roi_heads.box_predictor[in 0]"]
    kept = result.model.backbone[6].out_channels
    assert kept == result.model.rpn.head.conv[0][0].in_channels < 32
    assert result.model.roi_heads.box_head.fc6.in_features == kept * 7 * 7
    fc7, cls = result.model.roi_heads.box_head.fc7, result.model.roi_heads.box_predictor.cls_score
    assert fc7.out_features == cls.in_features == result.model.roi_heads.box_predictor.bbox_pred.in_features < 64
    assert "GuardOnDataDependentSymNode" in report["whole_model_trace_error"]
    assert report["verify_end_to_end"]["rel_err"] <= 1e-4 and report["verify_end_to_end"]["outputs_equal"]
    assert report["verify_end_to_end"]["parts_in_context_rel_err"] <= 1e-4
    assert report["macs_after"] < 0.8 * report["macs_before"]
    assert type(result.model) is type(model)
    assert isinstance(result.model.roi_heads.box_head.fc6, nn.Linear)
    assert result.model.roi_heads.box_head.fc6.out_features < 64
    with torch.no_grad():
        pruned = result.model(x)
        assert len(pruned[0]["boxes"]) == 10
        _, rel = compare(pruned, dense)
        assert rel > 1e-3  # pruning changed the detections: the end-to-end check compared something
        other = result.model([torch.rand(3, 80, 48)])  # other image sizes still run
    assert other[0]["boxes"].shape[1] == 4
    with pytest.raises(prunec.TraceError):
        result.export()


def test_parts_off_raises_trace_error() -> None:
    with pytest.raises(prunec.TraceError, match="could not trace FasterRCNN"):
        prunec.compile(_tiny_faster_rcnn(), ([torch.rand(3, 64, 64)],), channels=0.3, parts=False)


class _Neck(nn.Module):
    """FPN-like: two levels with a top-down add, a third level computed from the second (all returned)."""

    def __init__(self) -> None:
        super().__init__()
        self.c2, self.c3 = nn.Conv2d(3, 16, 3, 2, 1), nn.Conv2d(16, 32, 3, 2, 1)
        self.lat2, self.lat3 = nn.Conv2d(16, 24, 1), nn.Conv2d(32, 24, 1)
        self.out2, self.out3 = nn.Conv2d(24, 24, 3, 1, 1), nn.Conv2d(24, 24, 3, 1, 1)
        self.p4 = nn.Conv2d(24, 24, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        c2 = torch.relu(self.c2(x))
        c3 = torch.relu(self.c3(c2))
        i3 = self.lat3(c3)
        i2 = self.lat2(c2) + nn.functional.interpolate(i3, scale_factor=2.0)
        p3 = self.out3(i3)
        return {"p2": self.out2(i2), "p3": p3, "p4": self.p4(torch.relu(p3))}


class _SharedHead(nn.Module):
    """One conv tower applied to every level it is given (as RetinaNet / the RPN head)."""

    def __init__(self, outs: int) -> None:
        super().__init__()
        self.tower, self.pred = nn.Conv2d(24, 24, 3, 1, 1), nn.Conv2d(24, outs, 1)

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.pred(torch.relu(self.tower(f))) for f in feats]


class _TinyDetector(nn.Module):
    """Neck → a shared score head on p2, p3 and a box head on p4, then data-dependent top-k (no export)."""

    def __init__(self, glue_reads_p2: bool = False, data_sized: bool = False) -> None:
        super().__init__()
        self.neck, self.cls, self.box = _Neck(), _SharedHead(3), _SharedHead(4)
        self.glue_reads_p2, self.data_sized = glue_reads_p2, data_sized

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.neck(x)
        scores = torch.cat([s.flatten(1) for s in self.cls([f["p2"], f["p3"]])], 1)
        if self.glue_reads_p2:  # untraced code reads the FPN level itself
            scores = scores + f["p2"].amax(1).mean()
        boxes = self.box([f["p4"]])[0].flatten(2)
        if self.data_sized:  # exports, but the top-k's size is read from the data
            k = max(1, min(5, int((scores > 0).sum())))
        else:
            k = 5 if bool((scores > 0).any()) else 3  # data-dependent branch: the whole model does not export
        top, idx = scores.topk(k, dim=1)
        return top, boxes[:, :, idx[0] % boxes.shape[2]]


def _tiny_detector(glue_reads_p2: bool = False, data_sized: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = _TinyDetector(glue_reads_p2, data_sized)
    for p in model.parameters():
        nn.init.normal_(p, 0, 0.2)
    return model.eval()


def test_boundary_dims_tied_across_parts() -> None:
    model, x = _tiny_detector(), torch.rand(1, 3, 32, 32)
    result = prunec.compile(model, (x,), channels=0.5, round_to=1)
    report = result.report
    assert [p["part"] for p in report["parts"]] == ["neck", "cls", "box"]
    assert all(p["synced"] and p["rel_err"] <= 1e-4 for p in report["parts"]), report["parts"]
    assert report["frozen_boundaries"] == []
    assert sorted(b["boundary"] for b in report["boundaries"] if b["tied"]) == [
        "neck[out 0] → cls[in 0]", "neck[out 1] → cls[in 1]", "neck[out 2] → box[in 0]"]
    tied = {tuple(t["members"]): t for t in report["tied_groups"]}
    assert {m for t in tied for m in t} == {"cls:tower.weight@1", "neck:out2.weight@0", "neck:out3.weight@0",
                                             "box:tower.weight@1", "neck:p4.weight@0"}
    neck, cls, box = result.model.neck, result.model.cls, result.model.box
    assert neck.out2.out_channels == neck.out3.out_channels == cls.tower.in_channels == 12
    assert neck.p4.out_channels == box.tower.in_channels == 12
    assert neck.p4.in_channels == 12  # p3 is also read inside the neck: its consumer there drops the same units
    # the same channels are dropped on both sides of the boundary: the kept ones carry the same weights
    kept = [next(i for i in range(24) if model.neck.out3.bias[i] == b) for b in neck.out3.bias]
    assert len(set(kept)) == 12
    rows = [next(i for i in range(24) if model.cls.tower.bias[i] == b) for b in cls.tower.bias]
    assert torch.equal(cls.tower.weight, model.cls.tower.weight[rows][:, kept])
    e2e = report["verify_end_to_end"]
    assert e2e["outputs_equal"] and e2e["rel_err"] <= 1e-4 and e2e["parts_in_context_rel_err"] <= 1e-4
    assert report["macs_after"] < 0.6 * report["macs_before"]
    with torch.no_grad():
        assert compare(result.model(x), model(x))[1] > 1e-3  # pruning changed the outputs: the check compared
        result.model(torch.rand(1, 3, 48, 40))  # other input sizes run


def test_boundary_read_by_untraced_code_is_frozen() -> None:
    model, x = _tiny_detector(glue_reads_p2=True), torch.rand(1, 3, 32, 32)
    result = prunec.compile(model, (x,), channels=0.5, round_to=1)
    report = result.report
    rows = {b["boundary"]: b for b in report["boundaries"]}
    assert rows["neck[out 0] → cls[in 0]"]["why"] == "read outside the traced parts by aten.amax.default"
    # p3 is tied in the shared head to p2's frozen channels: kept whole with it, and the report says so
    assert not rows["neck[out 1] → cls[in 1]"]["tied"] and "frozen in" in rows["neck[out 1] → cls[in 1]"]["why"]
    assert rows["neck[out 2] → box[in 0]"]["tied"]
    neck, cls, box = result.model.neck, result.model.cls, result.model.box
    assert neck.out2.out_channels == neck.out3.out_channels == cls.tower.in_channels == 24
    assert neck.p4.out_channels == box.tower.in_channels == 12
    assert report["verify_end_to_end"]["passed"] and report["verify_end_to_end"]["outputs_equal"]


def test_tied_units_that_disagree_are_caught(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each part verifies alone; a producer and a consumer dropping different units must still be caught."""
    import prunec.partial as partial
    real = partial.tie

    def shifted(*args: object, **kwargs: object) -> dict:
        plans = real(*args, **kwargs)
        group = "tower.weight@1"  # the shared head's input channels: shift its kept units by one
        plans["cls"].kept[group] = sorted((i + 1) % 24 for i in plans["cls"].kept[group])
        return plans
    monkeypatch.setattr(partial, "tie", shifted)
    with pytest.raises(prunec.errors.InternalError, match="tied dims disagree across neck"):
        prunec.compile(_tiny_detector(), (torch.rand(1, 3, 32, 32),), channels=0.5, round_to=1)


class _RoiDetector(_TinyDetector):
    """Adds a RoI head fed by untraced multi-level RoIAlign glue (as torchvision's MultiScaleRoIAlign)."""

    def __init__(self) -> None:
        super().__init__()
        self.roi = nn.Sequential(nn.Flatten(), nn.Linear(24 * 2 * 2, 8))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from torchvision.ops import roi_align
        f = self.neck(x)
        scores = torch.cat([s.flatten(1) for s in self.cls([f["p2"], f["p3"]])], 1)
        boxes = self.box([f["p4"]])[0].flatten(2)
        rois = torch.tensor([[0, 0, 0, 8, 8], [0, 4, 4, 16, 16], [0, 2, 2, 6, 10]], dtype=x.dtype)
        levels = (scores.new_tensor([0.0, 1.0, 0.0]) + scores[0, :3].sign().abs() * 0).long()
        pooled = torch.zeros(3, f["p2"].shape[1], 2, 2)
        for level, (feat, scale) in enumerate(((f["p2"], 0.5), (f["p3"], 0.25))):
            idx = torch.where(levels == level)[0]
            pooled[idx] = roi_align(feat, rois[idx], (2, 2), scale)
        k = 5 if bool((scores > 0).any()) else 3
        top, idx = scores.topk(k, dim=1)
        return top, boxes[:, :, idx[0] % boxes.shape[2]], self.roi(pooled)


def test_boundary_tied_through_roi_align_glue() -> None:
    torch.manual_seed(0)
    model = _RoiDetector()
    for p in model.parameters():
        nn.init.normal_(p, 0, 0.2)
    model, x = model.eval(), torch.rand(1, 3, 32, 32)
    result = prunec.compile(model, (x,), channels=0.5, round_to=1)
    report = result.report
    assert report["frozen_boundaries"] == []
    names = sorted(b["boundary"] for b in report["boundaries"])
    assert names[0] == "neck[out 0] → cls[in 0], roi[in 0] (via roi_align → index_put_)", names
    assert names[1] == "neck[out 1] → cls[in 1], roi[in 0] (via roi_align → view → index_put_)", names
    assert all(b["tied"] for b in report["boundaries"])
    neck, roi = result.model.neck, result.model.roi
    assert neck.out2.out_channels == neck.out3.out_channels == 12 and roi[1].in_features == 12 * 2 * 2
    e2e = report["verify_end_to_end"]
    assert e2e["outputs_equal"] and e2e["parts_in_context_rel_err"] <= 1e-4


def test_tied_group_kept_whole_when_a_part_does_not_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    """A part that can't be the user's class stays dense: the tied groups it holds are kept whole everywhere."""
    import prunec.finish as finish
    real = finish.sync_module

    def no_box(model: nn.Module, state: dict, program: nn.Module, *args: object, **kwargs: object) -> tuple:
        if isinstance(model, _SharedHead) and model.pred.out_channels == 4:  # the box head
            return program, False, "user module not synced: (test)"
        return real(model, state, program, *args, **kwargs)
    monkeypatch.setattr(finish, "sync_module", no_box)
    model, x = _tiny_detector(), torch.rand(1, 3, 32, 32)
    result = prunec.compile(model, (x,), channels=0.5, round_to=1)
    rows = {b["boundary"]: b for b in result.report["boundaries"]}
    assert not rows["neck[out 2] → box[in 0]"]["tied"]
    assert rows["neck[out 2] → box[in 0]"]["why"] == "a part can't follow: user module not synced: (test)"
    assert rows["neck[out 0] → cls[in 0]"]["tied"]
    neck = result.model.neck
    assert neck.p4.out_channels == 24  # kept whole in the producer too
    assert isinstance(result.model.box, _SharedHead) and result.model.box.tower.out_channels == 24  # left dense
    assert neck.out2.out_channels == result.model.cls.tower.in_channels == 12
    assert result.report["verify_end_to_end"]["outputs_equal"]


def test_data_dependent_sizes_fall_back_to_parts() -> None:
    """A model that exports only with a data-dependent size (top-k by a count) is pruned part by part."""
    result = prunec.compile(_tiny_detector(data_sized=True), (torch.rand(1, 3, 32, 32),), channels=0.5, round_to=1)
    assert isinstance(result, PartsResult)
    assert "only with data-dependent tensor sizes (topk in <top>)" in result.report["whole_model_trace_error"]
    assert result.model.neck.out2.out_channels == 12 and result.report["verify_end_to_end"]["outputs_equal"]


def test_parts_pruned_with_closed_boundaries_when_the_watch_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    import prunec.partial as partial

    def broken(*args: object) -> list:
        raise RuntimeError("no dispatch mode here")
    monkeypatch.setattr(partial, "find_boundaries", broken)
    result = prunec.compile(_tiny_detector(), (torch.rand(1, 3, 32, 32),), channels=0.5, round_to=1)
    assert result.report["boundaries_note"] == ("crossing dims not analyzed, all kept: RuntimeError: "
                                                "no dispatch mode here")
    assert result.report["boundaries"] == [] and result.report["tied_groups"] == []
    neck = result.model.neck
    assert neck.out2.out_channels == neck.p4.out_channels == 24 and neck.lat2.out_channels == 12
    assert result.report["verify_end_to_end"]["outputs_equal"]


def test_data_driven_criterion_scores_each_part_on_what_it_reads() -> None:
    """Calibration batches are whole-model inputs; each part is scored on the inputs it receives."""
    model = _tiny_detector()
    x, calib = torch.rand(1, 3, 32, 32), [torch.rand(1, 3, 32, 32) for _ in range(3)]
    result = prunec.compile(model, (x,), channels=0.5, round_to=1, method="activation", calib=calib)
    report = result.report
    assert all(p["synced"] and p["rel_err"] <= 1e-4 for p in report["parts"]), report["parts"]
    assert report["verify_end_to_end"]["outputs_equal"]
    # the box head's tower width is its own group: the same units as compiling the box head alone on the
    # feature maps the calibration images give it
    with torch.no_grad():
        feats = [[model.neck(c)["p4"]] for c in calib]
        alone = prunec.compile(copy.deepcopy(model.box), ([model.neck(x)["p4"]],), channels=0.5, round_to=1,
                               method="activation", calib=[(f,) for f in feats])
    assert result.model.box.tower.out_channels == alone.model.tower.out_channels == 12
    assert torch.equal(result.model.box.tower.bias, alone.model.tower.bias)
    by_l1 = prunec.compile(model, (x,), channels=0.5, round_to=1)
    assert not torch.equal(by_l1.model.box.tower.bias, alone.model.tower.bias)  # the data chose other units


def test_pickled_detector_with_a_declared_shape_is_pruned_in_parts(tmp_path) -> None:
    """A pickled model that declares its input shape and traces only in parts: the shape note goes into the parts
    report (it crashed with KeyError: 'notes')."""
    import json

    from prunec.cli import main
    model = _tiny_faster_rcnn()
    model.pretrained_cfg = {"input_size": (3, 64, 64)}
    src, out, report = tmp_path / "frcnn.pt", tmp_path / "p.pt", tmp_path / "r.json"
    torch.save(model, src)
    assert main([str(src), "--trust-pickle", "--channels", "0.3", "-o", str(out), "--report", str(report)]) == 0
    assert "input shape 1,3,64,64 from the model's timm pretrained_cfg (--input-shape sets another)" in \
        json.loads(report.read_text())["notes"]
