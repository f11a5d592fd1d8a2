import math

import pytest
import torch

from segformer_fast.train.metrics import confusion_matrix, metrics_from_confusion


def test_hand_computed_case():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 3]])
    conf = confusion_matrix(pred, target, 4)
    # gt 0: preds 0,1 ; gt 1: 1,1,3 ; gt 2: 2,0 ; the 255 pixel is skipped
    expected = torch.tensor([[1, 1, 0, 0], [0, 2, 0, 1], [1, 0, 1, 0], [0, 0, 0, 0]])
    assert torch.equal(conf, expected)
    m = metrics_from_confusion(conf)
    # IoU0 = 1/(2+2-1) ; IoU1 = 2/(3+3-2) ; IoU2 = 1/(2+1-1) ; IoU3 = 0/(0+1-0)
    ious = [1 / 3, 2 / 4, 1 / 2, 0.0]
    assert m["per_class_iou"] == pytest.approx(ious)
    assert m["miou"] == pytest.approx(sum(ious) / 4)
    assert m["pixel_accuracy"] == pytest.approx(4 / 7)
    assert m["pixels"] == 7


def test_absent_class_is_nan_and_excluded():
    target = torch.tensor([0, 0, 1])
    m = metrics_from_confusion(confusion_matrix(torch.tensor([0, 0, 1]), target, 3))
    assert math.isnan(m["per_class_iou"][2]) and m["miou"] == 1.0
    assert "nan" not in m.format().split("\n")[0]


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(torch.zeros(2, 3), torch.zeros(3, 2), 2)
