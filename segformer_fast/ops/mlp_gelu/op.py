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

from typing import Optional

import torch
import torch.nn.functional as F

from ...dispatch import Impl, OpSpec, register
from ..fused import fused_op, in_dtype_of

__all__ = ["mlp_gelu", "SPEC"]


def _op_forward(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], w2: torch.Tensor,
                b2: Optional[torch.Tensor], save_hidden: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, h): h = fc1(x) when save_hidden (kept for backward), else an empty tensor."""
    w1, b1, w2, b2 = in_dtype_of(x, w1, b1, w2, b2)
    h = F.linear(x, w1, b1)  # (..., Hd)
    y = F.linear(F.gelu(h), w2, b2)  # (..., C_out)
    return y, (h if save_hidden else h.new_empty(0))


def _op_forward_fake(x, w1, b1, w2, b2, save_hidden):
    y = x.new_empty((*x.shape[:-1], w2.shape[0]))
    return y, (x.new_empty((*x.shape[:-1], w1.shape[0])) if save_hidden else x.new_empty(0))


def _op_backward(dy: torch.Tensor, x: torch.Tensor, h: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
                 w2: torch.Tensor, has_b2: bool) -> list[torch.Tensor]:
    """[dx, dw1, db1 (empty without b1), dw2, db2 (empty without b2)], each in its input's dtype; an empty
    h is recomputed from x."""
    w1dt, w2dt = w1.dtype, w2.dtype  # the gradients' dtypes (b2, not passed, is taken as w2's)
    b1dt = b1.dtype if b1 is not None else w1dt
    w1, b1, w2 = in_dtype_of(x, w1, b1, w2)
    if h.numel() == 0:
        h = F.linear(x, w1, b1)  # recomputed fc1 output
    hd, c_in = w1.shape
    dy2 = dy.reshape(-1, dy.shape[-1])
    gw2 = dy2.t() @ F.gelu(h).reshape(-1, hd)
    gb2 = dy2.sum(0) if has_b2 else dy.new_empty(0)
    dh = torch.ops.aten.gelu_backward(dy @ w2, h)  # (..., Hd)
    del h
    dh2 = dh.reshape(-1, hd)
    gw1 = dh2.t() @ x.reshape(-1, c_in)
    gb1 = dh2.sum(0) if b1 is not None else dy.new_empty(0)
    return [dh @ w1, gw1.to(w1dt), gb1.to(b1dt), gw2.to(w2dt), gb2.to(w2dt)]


def _op_backward_fake(dy, x, h, w1, b1, w2, has_b2):
    return [torch.empty_like(x), torch.empty_like(w1), torch.empty_like(b1) if b1 is not None else dy.new_empty(0),
            torch.empty_like(w2), dy.new_empty((w2.shape[0],) if has_b2 else (0,))]


def _setup_context(ctx, inputs, output):
    x, w1, b1, w2, b2, _ = inputs
    ctx.save_for_backward(x, output[1], w1, b1, w2)  # output[1]: fc1's output, or empty (recompute)
    ctx.has_b1, ctx.has_b2 = b1 is not None, b2 is not None


def _backward(ctx, dy, _dh):
    x, h, w1, b1, w2 = ctx.saved_tensors
    dx, gw1, gb1, gw2, gb2 = _mlp_gelu_backward_op(dy.contiguous(), x, h, w1, b1, w2, ctx.has_b2)
    return dx, gw1, gb1 if ctx.has_b1 else None, gw2, gb2 if ctx.has_b2 else None, None


_mlp_gelu_op, _mlp_gelu_backward_op = fused_op(
    "mlp_gelu", _op_forward, _op_forward_fake, _op_backward, _op_backward_fake, _setup_context, _backward
)

SPEC = register(OpSpec("mlp_gelu", [
    Impl("torch", _mlp_gelu_op, _mlp_gelu_backward_op,
         note="PyTorch matmuls in a custom op that keeps x (and fc1's output); no backend argument"),
]))


def mlp_gelu(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor,
             b2: torch.Tensor | None, save_hidden: bool = True) -> torch.Tensor:
    """fc2(GELU(fc1(x))) with reduced activation memory in training.

    Args:
        x: (..., C) tokens. w1: (Hd, C), b1: (Hd,) or None; w2: (C_out, Hd), b2: (C_out,) or None;
            in x's dtype, or fp32 with fp16/bf16 x (mixed precision: cast inside, fp32 gradients).
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
        w1, b1, w2, b2 = in_dtype_of(x, w1, b1, w2, b2)
        return F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)  # nothing to keep: no custom op needed
    return impl.forward(x, w1, b1, w2, b2, bool(save_hidden))[0]
