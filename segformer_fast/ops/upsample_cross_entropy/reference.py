"""Upsampled cross-entropy, pure-PyTorch reference: the oracle the fused kernels are tested against.

    loss = cross_entropy(interpolate(logits, labels.shape[-2:], bilinear, align_corners=False), labels)

This materialises the full-resolution (B, K, H, W) logits (and autograd keeps them); the fused op
(:func:`segformer_fast.ops.upsample_cross_entropy`) computes the same numbers without them.
Computed in fp32 (fp64 for fp64 logits) and cast back to the logits' dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["upsample_cross_entropy_reference"]


def upsample_cross_entropy_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = 255,
    weight: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """F.cross_entropy of the logits bilinearly upsampled to the labels' size.

    Args:
        logits: (B, K, h, w), any float dtype.
        labels: (B, H, W) integer class ids in [0, K) or ``ignore_index``.
        ignore_index: label value that contributes neither loss nor gradient.
        weight: optional (K,) class weights (PyTorch's weighted mean for reduction "mean").
        reduction: "mean", "sum" or "none" (per-pixel (B, H, W) losses).
    Returns:
        A scalar, or (B, H, W) for reduction "none", in the logits' dtype.

    Example:
        >>> logits, labels = torch.randn(2, 5, 7, 9), torch.randint(0, 5, (2, 27, 35))
        >>> upsample_cross_entropy_reference(logits, labels).shape
        torch.Size([])
    """
    dt = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 when tests want an fp64 oracle
    up = F.interpolate(logits.to(dt), size=tuple(labels.shape[-2:]), mode="bilinear", align_corners=False)
    w = None if weight is None else weight.to(dt)
    loss = F.cross_entropy(up, labels.long(), weight=w, ignore_index=ignore_index, reduction=reduction)
    return loss.to(logits.dtype)
