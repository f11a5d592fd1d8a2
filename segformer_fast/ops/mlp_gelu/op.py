"""Transformer MLP with recomputation: y = fc2(GELU(fc1(x))) keeping x (+ fc1's output) only.

Why: the MLP is matmul-bound, so a kernel gains little time; what it can win is memory. Eager
autograd keeps x (C), h = fc1(x) (4C) and g = GELU(h) (4C) per token. Here:
- ``save_hidden=True``: keep x and h (5C); backward recomputes g = GELU(h) (elementwise).
- ``save_hidden=False``: keep x only (C); backward also recomputes h, one (C x 4C) matmul more.

Backward, with dy the output gradient:
    gW2 = dy^T g,  gb2 = sum dy,  dg = dy W2,  dh = dg * GELU'(h),
    gW1 = dh^T x,  gb1 = sum dh,  dx = dh W1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...dispatch import Impl, OpSpec, register

__all__ = ["mlp_gelu", "SPEC"]


class _MLPGeluFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, save_hidden):
        h = F.linear(x, w1, b1)  # (..., Hd)
        y = F.linear(F.gelu(h), w2, b2)  # (..., C_out)
        ctx.save_for_backward(x, h if save_hidden else None, w1, b1, w2)
        ctx.has_b2 = b2 is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, h, w1, b1, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        if h is None:
            h = F.linear(x, w1, b1)  # recomputed fc1 output
        hd, c_in = w1.shape
        dy2 = dy.reshape(-1, dy.shape[-1])
        gw2 = dy2.t() @ F.gelu(h).reshape(-1, hd) if need[3] else None
        gb2 = dy2.sum(0) if need[4] and ctx.has_b2 else None
        dh = torch.ops.aten.gelu_backward(dy @ w2, h)  # (..., Hd)
        del h
        dh2 = dh.reshape(-1, hd)
        gw1 = dh2.t() @ x.reshape(-1, c_in) if need[1] else None
        gb1 = dh2.sum(0) if need[2] and b1 is not None else None
        dx = dh @ w1 if need[0] else None
        return dx, gw1, gb1, gw2, gb2, None


SPEC = register(OpSpec("mlp_gelu", [
    Impl("torch", _MLPGeluFunction.apply, _MLPGeluFunction.backward,
         note="PyTorch matmuls in an autograd.Function that keeps x (and fc1's output); no backend argument"),
], prefer={"*": ("torch",)}))


def mlp_gelu(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
             b2: torch.Tensor | None, save_hidden: bool = True) -> torch.Tensor:
    """fc2(GELU(fc1(x))) with reduced activation memory in training.

    Args:
        x: (..., C) tokens. w1: (Hd, C), b1: (Hd,) or None; w2: (C_out, Hd), b2: (C_out,) or None.
        save_hidden: keep fc1's output for backward (5C per token at Hd = 4C); False keeps x only
            (C per token) and recomputes fc1 in backward.
    Returns:
        (..., C_out), equal to :func:`mlp_gelu_reference`.

    Example:
        >>> y = mlp_gelu(torch.randn(2, 10, 64), torch.randn(256, 64), None, torch.randn(64, 256), None)
    """
    if x.shape[-1] != w1.shape[1] or w2.shape[1] != w1.shape[0]:
        raise ValueError(f"mlp_gelu: x {tuple(x.shape)}, w1 {tuple(w1.shape)} and w2 {tuple(w2.shape)} do not chain")
    impl = SPEC.resolve("auto", x)
    if not torch.is_grad_enabled() or not (x.requires_grad or w1.requires_grad or w2.requires_grad):
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)  # nothing to keep: no autograd.Function
    return impl.forward(x, w1, b1, w2, b2, bool(save_hidden))
