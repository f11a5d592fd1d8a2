"""Mix-FFN (fc1 -> depthwise 3x3 conv + GELU -> fc2) keeping x (and fc1's output) for backward.

What autograd keeps per token (fp32 words; C = dim, 4C = hidden):
- eager / reference: x (C), fc1 output (4C), conv output (4C), GELU output (4C) = 13C.
- ``save_hidden=True``: x (C) and the fc1 output h (4C) = 5C; the conv and GELU are recomputed
  from h in backward (fc2's weight gradient needs y = GELU(conv(h)), the conv's backward needs h).
- ``save_hidden=False``: x only (C); backward also recomputes h = fc1(x), one extra (C x 4C) matmul.

Backward, with gout the output gradient (the dwconv3x3_gelu op gives the conv and GELU part):
    y = op(h);  gW2 = gout^T y;  gb2 = sum gout;  gy = gout W2
    gh, gWc, gbc = op_backward(gy, h);  gW1 = gh^T x;  gb1 = sum gh;  gx = gh W1

The conv + GELU runs on the dwconv3x3_gelu op (its backend: "torch", "triton", "cpp", "cuda" or
"auto"); the matmuls are PyTorch's, so this op has one implementation of its own. Where the conv's
backend is Triton and fc1's inputs and fc2's outputs are at most 128 (MiT stages 1 and 2, bound by the
bytes of the hidden tensors), Triton kernels with the conv in their prologue take over
(triton_kernels.py): the forward runs conv + GELU + fc2 as one kernel (y never written, half the
layer's forward bytes); the backward runs three kernels after fc1 (gW2, gb2, gy, gz and the conv's
weight gradients in one; gx; gW1 and gb1) and never writes y, gy or gh, about a third of the unfused
backward's bytes.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...dispatch import Impl, OpSpec, register
from ..fused import fused_op, in_dtype_of
from .. import dwconv3x3_gelu  # noqa: F401  (registers the segformer_fast::dwconv3x3_gelu ops used below)

__all__ = ["mix_ffn", "SPEC", "MAX_OUT_CHANNELS", "fused_fc2_applies"]

MAX_OUT_CHANNELS = 128  # the fused conv + GELU + fc2 kernel's output channels: one block, the conv computed once


def fused_fc2_applies(out_channels: int) -> bool:
    """Whether the Triton Mix-FFN forward fuses fc2 into the conv + GELU for this many output channels."""
    return out_channels <= MAX_OUT_CHANNELS


def _op_forward(x: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor], wc: torch.Tensor, bc: torch.Tensor,
                w2: torch.Tensor, b2: Optional[torch.Tensor], height: int, width: int, approximate: str, backend: str,
                save_hidden: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, h): h = fc1(x) when save_hidden (kept for backward), else an empty tensor."""
    w1, b1, wc, bc, w2, b2 = in_dtype_of(x, w1, b1, wc, bc, w2, b2)
    h = F.linear(x, w1, b1)  # (B, N, 4C)
    if _fused(h, backend, w2.shape[0]):  # y = GELU(conv(h)) never stored: fc2 reads it from registers
        from .triton_kernels import dwconv_gelu_linear_triton

        out = dwconv_gelu_linear_triton(h, (height, width), wc, bc, w2, b2, approximate)
    else:
        y = torch.ops.segformer_fast.dwconv3x3_gelu(h, height, width, wc, bc, approximate, backend)  # (B, N, 4C)
        out = F.linear(y, w2, b2)  # (B, N, C)
    return out, (h if save_hidden else h.new_empty(0))


def _fused(h: torch.Tensor, backend: str, *channels: int) -> bool:
    """The fused kernels (mix_ffn/triton_kernels.py) run where the conv's backend resolves to Triton and each of
    ``channels`` (fc2's outputs; in backward also fc1's inputs) is at most MAX_OUT_CHANNELS; else the
    dwconv3x3_gelu op and matmuls."""
    from ..dwconv3x3_gelu.op import SPEC as DWCONV

    try:
        if DWCONV.resolve(backend, h).backend != "triton":
            return False
    except Exception:  # noqa: BLE001 - the unfused path raises the conv op's own error for this backend
        return False
    return all(fused_fc2_applies(c) for c in channels)


def _op_forward_fake(x, w1, b1, wc, bc, w2, b2, height, width, approximate, backend, save_hidden):
    h = x.new_empty((*x.shape[:-1], w1.shape[0])) if save_hidden else x.new_empty(0)
    return x.new_empty((*x.shape[:-1], w2.shape[0])), h


def _op_backward(gout: torch.Tensor, x: torch.Tensor, h: torch.Tensor, w1: torch.Tensor, b1: Optional[torch.Tensor],
                 wc: torch.Tensor, bc: torch.Tensor, w2: torch.Tensor, has_b2: bool, height: int, width: int,
                 approximate: str, backend: str) -> list[torch.Tensor]:
    """[gx, gw1, gb1 (empty without b1), gwc, gbc, gw2, gb2 (empty without b2)], each in its input's dtype;
    an empty h is recomputed."""
    dtypes = [t.dtype for t in (w1, b1 if b1 is not None else w1, wc, bc, w2)]
    w1, b1, wc, bc, w2 = in_dtype_of(x, w1, b1, wc, bc, w2)
    if h.numel() == 0:
        h = F.linear(x, w1, b1)  # recomputed fc1 output
    dt = h.dtype
    gout = gout.to(dt).contiguous()
    if _fused(h, backend, w2.shape[0], w1.shape[1]):  # y, gy and gh never stored
        from .triton_kernels import mix_ffn_bwd_triton

        gx, gw1, gb1, gwc, gbc, gw2, gb2 = mix_ffn_bwd_triton(gout, x.to(dt), h, (height, width), wc, bc, w1, w2,
                                                              approximate)
        grads = [g.to(gdt) for g, gdt in zip((gw1, gb1, gwc, gbc, gw2), dtypes)]
        return [gx.to(x.dtype), grads[0], grads[1] if b1 is not None else gout.new_empty(0), *grads[2:],
                gb2.to(dtypes[-1]) if has_b2 else gout.new_empty(0)]
    y = torch.ops.segformer_fast.dwconv3x3_gelu(h, height, width, wc, bc, approximate, backend)  # recomputed
    hidden = h.shape[-1]
    gw2 = (gout.reshape(-1, gout.shape[-1]).t() @ y.reshape(-1, hidden)).to(w2.dtype)
    gb2 = gout.sum(dim=(0, 1)).to(w2.dtype) if has_b2 else gout.new_empty(0)
    del y
    gy = gout @ w2.to(dt)  # (B, N, 4C)
    gh, gwc, gbc = torch.ops.segformer_fast.dwconv3x3_gelu_backward(gy, h, height, width, wc, bc, approximate,
                                                                    backend)
    del gy
    gx = (gh @ w1.to(dt)).to(x.dtype)
    gw1 = (gh.reshape(-1, hidden).t() @ x.to(dt).reshape(-1, x.shape[-1])).to(w1.dtype)
    gb1 = gh.sum(dim=(0, 1)).to(w1.dtype) if b1 is not None else gout.new_empty(0)
    gw1, gb1, gwc, gbc, gw2 = (g.to(gdt) for g, gdt in zip((gw1, gb1, gwc, gbc, gw2), dtypes))
    return [gx, gw1, gb1, gwc, gbc, gw2, gb2.to(dtypes[-1])]


def _op_backward_fake(gout, x, h, w1, b1, wc, bc, w2, has_b2, height, width, approximate, backend):
    return [torch.empty_like(x), torch.empty_like(w1), torch.empty_like(b1) if b1 is not None else x.new_empty(0),
            torch.empty_like(wc), torch.empty_like(bc), torch.empty_like(w2),
            x.new_empty((w2.shape[0],) if has_b2 else (0,))]


def _setup_context(ctx, inputs, output):
    x, w1, b1, wc, bc, w2, b2, height, width, approximate, backend, _ = inputs
    ctx.save_for_backward(x, output[1], w1, b1, wc, bc, w2)  # output[1]: fc1's output, or empty (recompute)
    ctx.args = (b2 is not None, height, width, approximate, backend)
    ctx.has_b1 = b1 is not None


def _backward(ctx, gout, _gh):
    x, h, w1, b1, wc, bc, w2 = ctx.saved_tensors
    has_b2 = ctx.args[0]
    gx, gw1, gb1, gwc, gbc, gw2, gb2 = _mix_ffn_backward_op(gout, x, h, w1, b1, wc, bc, w2, *ctx.args)
    return (gx, gw1, gb1 if ctx.has_b1 else None, gwc, gbc, gw2, gb2 if has_b2 else None,
            None, None, None, None, None)


_mix_ffn_op, _mix_ffn_backward_op = fused_op(
    "mix_ffn", _op_forward, _op_forward_fake, _op_backward, _op_backward_fake, _setup_context, _backward
)

SPEC = register(OpSpec("mix_ffn", [
    Impl("torch", _mix_ffn_op, _mix_ffn_backward_op,
         note="PyTorch matmuls around the dwconv3x3_gelu op (its own backend), in a custom op keeping x "
              "(and fc1's output)"),
]))


def mix_ffn(x: torch.Tensor, hw: tuple[int, int], w1: torch.Tensor, b1: torch.Tensor | None, wc: torch.Tensor,
            bc: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor | None, approximate: str = "none",
            backend: str = "auto", save_hidden: bool = True) -> torch.Tensor:
    """fc2(GELU(dwconv3x3(fc1(x)) + bc)) on (B, N, C) tokens, keeping x (and fc1's output) for backward.

    Args:
        x: (B, N, C), N = H * W row-major. hw: (H, W).
        w1, b1: fc1 (4C, C), (4C,). wc, bc: the depthwise conv (4C, 1, 3, 3), (4C,). w2, b2: fc2 (C_out, 4C), (C_out,).
            In x's dtype, or fp32 with fp16/bf16 x (mixed precision: cast inside, fp32 gradients).
        approximate: GELU's "none" (erf) or "tanh".
        backend: the dwconv3x3_gelu op's backend ("auto", "torch", "triton", "cpp", "cuda").
        save_hidden: keep fc1's output (5C per token); False keeps x only (C) and recomputes fc1.
    Returns:
        (B, N, C_out), equal to :func:`mix_ffn_reference` up to rounding.

    Example:
        >>> ffn = segformer_fast.nn.MixFFN(64, 256)
        >>> y = mix_ffn(torch.randn(2, 63, 64), (7, 9), ffn.fc1.weight, ffn.fc1.bias, ffn.dwconv.weight,
        ...             ffn.dwconv.bias, ffn.fc2.weight, ffn.fc2.bias)
    """
    if x.dim() != 3 or x.shape[-1] != w1.shape[1]:
        raise ValueError(f"mix_ffn: x must be (B, N, {w1.shape[1]}), got shape {tuple(x.shape)}")
    hh, ww = (s if isinstance(s, torch.SymInt) else int(s) for s in hw)  # symbolic under torch.export
    if hh * ww != x.shape[1]:
        raise ValueError(f"mix_ffn: hw={tuple(hw)} does not match x of shape {tuple(x.shape)}: need H * W == N")
    return SPEC.resolve("auto", x).forward(x.contiguous(), w1, b1, wc, bc, w2, b2, hh, ww, approximate, backend,
                                           bool(save_hidden))[0]
