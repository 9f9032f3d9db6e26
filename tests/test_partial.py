"""Prune what traces: a detector whose post-processing can't be exported gets its traceable
parts pruned, each verified, and the whole model checked end to end against the zeroed reference."""
from __future__ import annotations

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
    # the backbone's features are also read by RoIAlign outside the parts: frozen, with why
    assert report["frozen_boundaries"] == ["backbone[out 0] → rpn.head[in 0]: read outside the traced parts "
                                           "by torchvision.roi_align.default"]
    # the box head's output feeds only the predictor: tied, both drop the same units
    assert {b["boundary"]: b["tied"] for b in report["boundaries"]}[
        "roi_heads.box_head[out 0] → roi_heads.box_predictor[in 0]"]
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
