"""Pure-PyTorch reference of the fused depthwise 3x3 conv + bias + GELU on the token layout.

The oracle for tests and benchmarks: it transposes the (B, N, C) tokens to NCHW, runs
``F.conv2d(groups=C)`` with zero padding 1, adds the bias and applies GELU, all in fp32 (fp64 for fp64 inputs), and
returns the result in the input's dtype and token layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dwconv3x3_gelu_reference"]


def dwconv3x3_gelu_reference(
    x: torch.Tensor,
    hw: tuple[int, int],
    weight: torch.Tensor,
    bias: torch.Tensor,
    approximate: str = "none",
) -> torch.Tensor:
    """GELU(depthwise_conv3x3(x) + bias) on (B, N, C) tokens, computed in (at least) fp32.

    Args:
        x: (B, N, C) tokens, N = H * W, row-major over (H, W).
        hw: (H, W).
        weight: (C, 1, 3, 3) depthwise kernel.
        bias: (C,).
        approximate: "none" (erf GELU) or "tanh".
    Returns:
        (B, N, C) in ``x.dtype``.

    Example:
        >>> x = torch.randn(2, 7 * 9, 5)
        >>> y = dwconv3x3_gelu_reference(x, (7, 9), torch.randn(5, 1, 3, 3), torch.randn(5))
    """
    b, n, c = x.shape
    h, w = hw
    dt = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 when tests want an fp64 oracle
    xf = x.to(dt).transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
    z = F.conv2d(xf, weight.to(dt), bias.to(dt), padding=1, groups=c)
    y = F.gelu(z, approximate=approximate)
    return y.flatten(2).transpose(1, 2).to(x.dtype)  # (B, N, C)
