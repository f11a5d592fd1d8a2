"""Upsample-and-sum, pure-PyTorch reference: the oracle the fused kernels are tested against.

    out = act(scale * sum_i Up_i(maps[i]) + shift)

Up_i is bilinear interpolation of map i (B, D, h_i, w_i) to ``size`` = (H, W) with
align_corners=False (PyTorch's F.interpolate, its source-index clamping included); scale and
shift are optional per-channel (D,) vectors and act is ReLU or the identity. Computed in fp32 (fp64
for fp64 maps) and cast back to the maps' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["upsample_sum_reference"]


def upsample_sum_reference(
    maps: Sequence[torch.Tensor],
    size: Sequence[int],
    scale: torch.Tensor | None = None,
    shift: torch.Tensor | None = None,
    relu: bool = False,
) -> torch.Tensor:
    """Sum of the bilinearly upsampled maps, then the optional affine and ReLU.

    Args:
        maps: tensors (B, D, h_i, w_i), any float dtype.
        size: output (H, W).
        scale, shift: optional (D,) per-channel affine applied to the sum.
        relu: apply ReLU last.
    Returns:
        (B, D, H, W) in the dtype of ``maps[0]``.

    Example:
        >>> z = [torch.randn(1, 8, 4, 5), torch.randn(1, 8, 2, 3)]
        >>> upsample_sum_reference(z, (7, 9)).shape
        torch.Size([1, 8, 7, 9])
    """
    size = (int(size[0]), int(size[1]))
    dt = torch.promote_types(maps[0].dtype, torch.float32)  # fp32, or fp64 when tests want an fp64 oracle
    out = sum(F.interpolate(m.to(dt), size=size, mode="bilinear", align_corners=False) for m in maps)
    if scale is not None:
        out = out * scale.to(dt).view(1, -1, 1, 1)
    if shift is not None:
        out = out + shift.to(dt).view(1, -1, 1, 1)
    if relu:
        out = F.relu(out)
    return out.to(maps[0].dtype)
