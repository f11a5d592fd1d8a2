"""The spatial reduction as a matmul over patches, on the (B, N, C) token layout.

A Conv2d(C, C, k=sr, s=sr) reads non-overlapping sr x sr patches, so it is one matmul:

    x (B, N, C) -> crop to (B, Hr*sr, Wr*sr, C), Hr = H // sr, Wr = W // sr (Conv2d floors)
                -> view (B, Hr, sr, Wr, sr, C) -> patches (B, M, sr*sr*C), M = Hr*Wr
    reduced = patches @ Wmat^T + b,    Wmat = conv weight (C, C, sr, sr) permuted to (C, sr, sr, C)

The patch vector is ordered (row in patch, column in patch, channel), matching Wmat. No NCHW copy
of x is made; the only copy is the patch gather (a permutation of the cropped tokens).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["reduced_size", "conv_weight_matrix", "patchify", "unpatchify_add", "reduce_tokens"]


def reduced_size(hw: tuple[int, int], sr: int) -> tuple[int, int]:
    """(Hr, Wr): the output size of Conv2d(k=sr, s=sr) on an (H, W) map (floors, like nn.Conv2d)."""
    return hw[0] // sr, hw[1] // sr


def conv_weight_matrix(weight: torch.Tensor) -> torch.Tensor:
    """Conv weight (C_out, C_in, sr, sr) -> (C_out, sr*sr*C_in) in the patch order of :func:`patchify`."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def patchify(x: torch.Tensor, hw: tuple[int, int], sr: int) -> torch.Tensor:
    """Tokens (B, H*W, C) -> patches (B, Hr*Wr, sr*sr*C) (contiguous)."""
    b, _, c = x.shape
    h, w = hw
    hr, wr = reduced_size(hw, sr)
    img = x.view(b, h, w, c)[:, : hr * sr, : wr * sr]  # crop: (B, Hr*sr, Wr*sr, C), a view
    p = img.reshape(b, hr, sr, wr, sr, c).permute(0, 1, 3, 2, 4, 5)  # (B, Hr, Wr, sr, sr, C)
    return p.reshape(b, hr * wr, sr * sr * c)


def unpatchify_add(dx: torch.Tensor, dpatches: torch.Tensor, hw: tuple[int, int], sr: int) -> torch.Tensor:
    """Adjoint of :func:`patchify`: adds dpatches (B, M, sr*sr*C) into dx (B, H*W, C) in place; returns dx."""
    b, _, c = dx.shape
    h, w = hw
    hr, wr = reduced_size(hw, sr)
    img = dx.view(b, h, w, c)[:, : hr * sr, : wr * sr].view(b, hr, sr, wr, sr, c)
    img.add_(dpatches.view(b, hr, wr, sr, sr, c).permute(0, 1, 3, 2, 4, 5))
    return dx


def reduce_tokens(
    x: torch.Tensor, hw: tuple[int, int], sr: int, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> torch.Tensor:
    """Conv2d(k=s=sr) on tokens: (B, N, C) -> (B, M, C), differentiable (plain torch ops)."""
    return F.linear(patchify(x, hw, sr), conv_weight_matrix(weight), bias)
