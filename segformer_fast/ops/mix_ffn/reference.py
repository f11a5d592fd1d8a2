"""Mix-FFN, literally: fc1 -> depthwise 3x3 conv (NCHW view) -> GELU -> fc2, on (B, N, C) tokens."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["mix_ffn_reference"]


def mix_ffn_reference(x: torch.Tensor, hw: tuple[int, int], w1: torch.Tensor, b1: torch.Tensor | None,
                      wc: torch.Tensor, bc: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None,
                      approximate: str = "none") -> torch.Tensor:
    """The oracle of :func:`segformer_fast.ops.mix_ffn.mix_ffn`: (B, N, C) -> (B, N, C_out)."""
    b, n, _ = x.shape
    h = F.linear(x, w1, b1).transpose(1, 2).reshape(b, -1, hw[0], hw[1])  # (B, 4C, H, W)
    y = F.gelu(F.conv2d(h, wc, bc, padding=1, groups=wc.shape[0]), approximate=approximate)
    return F.linear(y.flatten(2).transpose(1, 2), w2, b2)
