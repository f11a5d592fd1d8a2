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
    """{"miou", "pixel_accuracy", "per_class_iou" (list, NaN where a class never occurs), "pixels"}, and
    once named (:meth:`name_classes`) "class_names" (list) and "per_class_iou_by_name" ({name: IoU})."""

    def name_classes(self, class_names) -> "SegMetrics":
        """Add "class_names" and "per_class_iou_by_name" (a name given twice is keyed "name (k)"); returns self."""
        iou = self["per_class_iou"]
        names = [str(class_names[k]) if k < len(class_names) else f"class {k}" for k in range(len(iou))]
        by_name: dict[str, float] = {}
        for k, (name, value) in enumerate(zip(names, iou)):
            by_name[name if name not in by_name else f"{name} ({k})"] = value
        self["class_names"], self["per_class_iou_by_name"] = names, by_name
        return self

    def format(self, class_names=None) -> str:
        """A summary line and one line per class: id, name (``class_names``, else the metrics' own, else
        none), IoU ("-" for a class absent from ground truth and prediction)."""
        if class_names is None:
            class_names = self.get("class_names")
        names = [class_names[k] if class_names is not None and k < len(class_names) else str(k)
                 for k in range(len(self["per_class_iou"]))]
        width = max([20] + [len(n) for n in names])
        lines = [f"mIoU {self['miou']:.4f}   pixel accuracy {self['pixel_accuracy']:.4f}   ({self['pixels']} pixels)"]
        for k, (name, iou) in enumerate(zip(names, self["per_class_iou"])):
            lines.append(f"  {k:>4} {name:<{width}} {'-' if math.isnan(iou) else f'{iou:.4f}'}")
        return "\n".join(lines)


def metrics_from_confusion(conf: torch.Tensor, class_names=None) -> SegMetrics:
    """mIoU (mean over classes present in the ground truth or the prediction), per-class IoU, pixel accuracy.

    Args:
        conf: a (K, K) confusion matrix (rows ground truth), as :func:`confusion_matrix` makes.
        class_names: K names; when given the metrics also hold them (see :meth:`SegMetrics.name_classes`).
    """
    conf = conf.double()
    tp = conf.diag()
    union = conf.sum(0) + conf.sum(1) - tp
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    total = conf.sum()
    present = ~torch.isnan(iou)
    m = SegMetrics(
        miou=float(iou[present].mean()) if present.any() else float("nan"),
        pixel_accuracy=float(tp.sum() / total) if total > 0 else float("nan"),
        per_class_iou=[float(v) for v in iou],
        pixels=int(total),
    )
    return m if class_names is None else m.name_classes(class_names)
