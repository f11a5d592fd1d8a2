"""Segmentation metrics from a confusion matrix: mIoU, per-class IoU, pixel accuracy."""

from __future__ import annotations

import math

import torch

__all__ = ["confusion_matrix", "SegMetrics", "metrics_from_confusion"]


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """(K, K) int64 counts, rows = ground truth, columns = prediction, ignored pixels skipped.

    Args:
        pred, target: integer tensors of the same shape.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    keep = target != ignore_index
    t = target[keep].long()
    p = pred[keep].long()
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


class SegMetrics(dict):
    """{"miou", "pixel_accuracy", "per_class_iou" (list, NaN where a class never occurs), "pixels"}."""

    def format(self, class_names=None) -> str:
        lines = [f"mIoU {self['miou']:.4f}   pixel accuracy {self['pixel_accuracy']:.4f}   ({self['pixels']} pixels)"]
        for k, iou in enumerate(self["per_class_iou"]):
            name = class_names[k] if class_names is not None and k < len(class_names) else str(k)
            lines.append(f"  {k:>4} {name:<20} {'-' if math.isnan(iou) else f'{iou:.4f}'}")
        return "\n".join(lines)


def metrics_from_confusion(conf: torch.Tensor) -> SegMetrics:
    """mIoU (mean over classes present in the ground truth or the prediction), per-class IoU, pixel accuracy."""
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    total = conf.sum()
    present = ~torch.isnan(iou)
    return SegMetrics(
        miou=float(iou[present].mean()) if present.any() else float("nan"),
        pixel_accuracy=float(tp.sum() / total) if total > 0 else float("nan"),
        per_class_iou=[float(v) for v in iou],
        pixels=int(total),
    )
