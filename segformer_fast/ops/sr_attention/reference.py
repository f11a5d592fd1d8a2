"""Eager oracle for spatial-reduction attention: conv reduction, LayerNorm, explicit softmax(QK^T s)V.

Deliberately the naive formulation (NCHW Conv2d, the full (N, M) score matrix, softmax), computed
in fp32 (or fp64 when given fp64), so the fused paths are checked against an independent route.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["sr_attention_reference"]


def sr_attention_reference(
    x: torch.Tensor,
    hw: tuple[int, int],
    num_heads: int,
    *,
    q_weight: torch.Tensor,
    q_bias: Optional[torch.Tensor],
    k_weight: torch.Tensor,
    k_bias: Optional[torch.Tensor],
    v_weight: torch.Tensor,
    v_bias: Optional[torch.Tensor],
    proj_weight: torch.Tensor,
    proj_bias: Optional[torch.Tensor],
    sr: int = 1,
    sr_weight: Optional[torch.Tensor] = None,
    sr_bias: Optional[torch.Tensor] = None,
    norm_weight: Optional[torch.Tensor] = None,
    norm_bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Same contract as :func:`segformer_fast.ops.sr_attention` (output after the projection).

    x: (B, N, C), N = H*W. Returns (B, N, C) in x's dtype; arithmetic in fp32 (fp64 stays fp64).
    """
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32

    def up(t):
        return None if t is None else t.to(ct)

    b, n, c = x.shape
    h, w = hw
    d = c // num_heads
    xf = up(x)
    q = F.linear(xf, up(q_weight), up(q_bias)).reshape(b, n, num_heads, d).transpose(1, 2)  # (B, h, N, d)
    if sr > 1:
        img = xf.transpose(1, 2).reshape(b, c, h, w)
        red = F.conv2d(img, up(sr_weight), up(sr_bias), stride=sr).flatten(2).transpose(1, 2)  # (B, M, C)
        kvx = F.layer_norm(red, (c,), up(norm_weight), up(norm_bias), eps)
    else:
        kvx = xf
    m = kvx.shape[1]
    k = F.linear(kvx, up(k_weight), up(k_bias)).reshape(b, m, num_heads, d).transpose(1, 2)  # (B, h, M, d)
    v = F.linear(kvx, up(v_weight), up(v_bias)).reshape(b, m, num_heads, d).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) * d**-0.5  # (B, h, N, M)
    out = scores.softmax(-1) @ v  # (B, h, N, d)
    out = out.transpose(1, 2).reshape(b, n, c)
    return F.linear(out, up(proj_weight), up(proj_bias)).to(x.dtype)
