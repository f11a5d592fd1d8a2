"""A CPU stand-in for the compiled CUDA extension ``segformer_fast._C_cuda``. Test only.

With ``SEGFORMER_FAST_TEST_CUDA_STANDIN=1`` in the environment, :func:`segformer_fast.backends.cuda_extension`
returns this module and ``backend="cuda"`` runs on CPU tensors, so every line of the ops' CUDA
glue (argument order, dtypes, contiguity, which saved tensors go where) executes in CI on a
machine with no GPU. It is not a backend for users: it is slow, and "auto" never picks it.

Each function has the name, argument names and results of its binding in csrc/<op>/<op>_bind_cuda.h
(a test compares them), performs the same argument checks (with "CPU" in place of "CUDA tensor"),
and computes what the CUDA kernel computes: from the C++ CPU kernels (``segformer_fast._C_cpu``,
fp32; other dtypes are upcast and the result cast back, as the CUDA kernels accumulate in fp32)
and, for the spatial-reduction helpers that have no CPU kernel, from PyTorch in fp32.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

__all__ = ["ENV_VAR", "active", "unavailable_reason"]

ENV_VAR = "SEGFORMER_FAST_TEST_CUDA_STANDIN"
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # the CUDA launchers' storage types


def active() -> bool:
    """True when the environment selects the stand-in (``SEGFORMER_FAST_TEST_CUDA_STANDIN=1``)."""
    return os.environ.get(ENV_VAR, "0") == "1"


def unavailable_reason() -> Optional[str]:
    """None when the stand-in can run here, else why not (it computes with the C++ CPU kernels)."""
    from ..backends import cpu_extension

    ext = cpu_extension()
    missing = [f for f in ("upsample_sum_fwd", "dwconv3x3_gelu_fwd", "upsample_cross_entropy_fwd") if not hasattr(ext, f)]
    if ext is None or missing:
        return ("the CUDA stand-in computes with segformer_fast._C_cpu, which is not built"
                if ext is None else f"segformer_fast._C_cpu lacks {missing}; rebuild it")
    return None


def _cpu():
    from ..backends import cpu_extension

    reason = unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    return cpu_extension()


def _check(cond: bool, op: str, *msg) -> None:
    if not cond:
        raise RuntimeError(f"{op} (cuda stand-in): " + "".join(str(m) for m in msg))


def _check_dtype(t: torch.Tensor, op: str) -> None:
    _check(t.dtype in _DTYPES, op, "dtype must be float32, float16 or bfloat16, got ", t.dtype)


def _on(t: torch.Tensor, like: torch.Tensor, op: str, what: str) -> None:
    # The CUDA bindings demand a CUDA tensor on the input's device; the stand-in demands the CPU.
    _check(t.device.type == "cpu" and t.device == like.device, op, what, " must be a CPU tensor (the stand-in's device)")


def _f32(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.float().contiguous()


# ---------------------------------------------------------------------------------------------
# upsample_sum (csrc/upsample_sum/upsample_sum_bind_cuda.h)

_US = "upsample_sum"


def _us_map(t: torch.Tensor, like: torch.Tensor, what: str) -> None:
    _on(t, like, _US, what)
    _check(t.dtype == like.dtype, _US, what, " has dtype ", t.dtype, ", expected ", like.dtype)
    _check(t.dim() == 4 and t.is_contiguous(), _US, what, " must be a contiguous (B, h, w, D) tensor, got shape ",
           tuple(t.shape))


def _us_vec(t: Optional[torch.Tensor], like: torch.Tensor, d: int, what: str) -> None:
    if t is not None:
        _check(t.device == like.device and t.dtype == torch.float32 and t.is_contiguous() and t.numel() == d, _US,
               what, " must be a contiguous float32 tensor of ", d, " elements on ", like.device)


def upsample_sum_fwd(maps: Sequence[torch.Tensor], H: int, W: int, scale: Optional[torch.Tensor],
                     shift: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    _check(0 < len(maps) <= 4, _US, "needs 1 to 4 maps, got ", len(maps))
    m0 = maps[0]
    for m in maps:
        _us_map(m, m0, "each map")
        _check(m.shape[0] == m0.shape[0] and m.shape[3] == m0.shape[3], _US, "maps disagree on B or D: ", tuple(m.shape))
    _check_dtype(m0, _US)
    _us_vec(scale, m0, m0.shape[3], "scale")
    _us_vec(shift, m0, m0.shape[3], "shift")
    out = _cpu().upsample_sum_fwd([m.float() for m in maps], H, W, scale, shift, relu)
    return out.to(m0.dtype)


def upsample_sum_bwd(grad: torch.Tensor, sizes: Sequence[int], maps: Sequence[torch.Tensor],
                     out: Optional[torch.Tensor], scale: Optional[torch.Tensor], relu: bool,
                     need_dshift: bool) -> list[torch.Tensor]:
    _us_map(grad, grad, "grad")
    _check_dtype(grad, _US)
    _check(0 < len(sizes) <= 8 and len(sizes) % 2 == 0, _US, "sizes must be [h0, w0, ...] for 1 to 4 maps")
    n = len(sizes) // 2
    _check(not maps or len(maps) == n, _US, "maps and sizes disagree")
    for i, m in enumerate(maps):
        _us_map(m, grad, "each map")
        _check(m.shape[1] == sizes[2 * i] and m.shape[2] == sizes[2 * i + 1], _US, "map ", i, " has shape ",
               tuple(m.shape), ", sizes say ", sizes[2 * i], "x", sizes[2 * i + 1])
    if relu:
        _check(out is not None, _US, "relu backward needs the forward output")
        _us_map(out, grad, "out")
    _us_vec(scale, grad, grad.shape[3], "scale")
    res = _cpu().upsample_sum_bwd(grad.float().contiguous(), list(sizes), [m.float() for m in maps],
                                  out.float() if relu else None, scale, relu, need_dshift)
    return [r.to(grad.dtype) for r in res[:n]] + list(res[n:])  # dscale / dshift stay fp32


# ---------------------------------------------------------------------------------------------
# dwconv3x3_gelu (csrc/dwconv3x3_gelu/dwconv3x3_gelu_bind_cuda.h)

_DW = "dwconv3x3_gelu"


def _dw_check(t: torch.Tensor, name: str, like: torch.Tensor, shape: tuple) -> None:
    _on(t, like, _DW, name)
    _check(t.is_contiguous(), _DW, name, " must be contiguous")
    _check(tuple(t.shape) == tuple(shape), _DW, name, " must have shape ", tuple(shape), ", got ", tuple(t.shape))


def _dw_x(x: torch.Tensor, H: int, W: int) -> tuple[int, int]:
    _check(x.dim() == 3 and x.shape[1] == H * W, _DW, "x must be (B, H*W, C) with H*W = ", H * W, ", got ",
           tuple(x.shape))
    _check_dtype(x, _DW)
    return x.shape[0], x.shape[2]


def dwconv3x3_gelu_fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, y: torch.Tensor, H: int, W: int,
                       act: int) -> None:
    _, c = _dw_x(x, H, W)
    _dw_check(x, "x", x, x.shape)
    _dw_check(y, "y", x, x.shape)
    _check(y.dtype == x.dtype, _DW, "y must have x's dtype")
    _dw_check(weight, "weight", x, (c, 1, 3, 3))
    _dw_check(bias, "bias", x, (c,))
    y32 = torch.empty(x.shape, dtype=torch.float32)
    _cpu().dwconv3x3_gelu_fwd(x.float().contiguous(), _f32(weight), _f32(bias), y32, H, W, act)
    y.copy_(y32)


def dwconv3x3_gelu_bwd(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       grad_x: torch.Tensor, grad_weight: torch.Tensor, grad_bias: torch.Tensor, H: int, W: int,
                       act: int) -> None:
    _, c = _dw_x(x, H, W)
    for t, name in ((x, "x"), (grad_y, "grad_y"), (grad_x, "grad_x")):
        _dw_check(t, name, x, x.shape)
    _check(grad_y.dtype == x.dtype and grad_x.dtype == x.dtype, _DW, "grad_y and grad_x must have x's dtype")
    _dw_check(weight, "weight", x, (c, 1, 3, 3))
    _dw_check(bias, "bias", x, (c,))
    _dw_check(grad_weight, "grad_weight", x, (c, 1, 3, 3))
    _dw_check(grad_bias, "grad_bias", x, (c,))
    _check(grad_weight.dtype == torch.float32 and grad_bias.dtype == torch.float32, _DW,
           "grad_weight and grad_bias must be float32")
    gx32 = torch.empty(x.shape, dtype=torch.float32)
    _cpu().dwconv3x3_gelu_bwd(grad_y.float().contiguous(), x.float().contiguous(), _f32(weight), _f32(bias), gx32,
                              grad_weight, grad_bias, H, W, act)
    grad_x.copy_(gx32)


# ---------------------------------------------------------------------------------------------
# upsample_cross_entropy (csrc/upsample_cross_entropy/upsample_cross_entropy_bind_cuda.h)

_CE = "upsample_cross_entropy"


def _ce_check(x: torch.Tensor, labels: torch.Tensor) -> None:
    _on(x, x, _CE, "logits")
    _on(labels, x, _CE, "labels")
    _check(x.dim() == 4 and x.is_contiguous(), _CE, "logits must be a contiguous (B, h, w, K) tensor, got ",
           tuple(x.shape))
    _check(labels.dtype == torch.int64 and labels.dim() == 3 and labels.is_contiguous()
           and labels.shape[0] == x.shape[0], _CE, "labels must be a contiguous int64 (B, H, W) tensor, got ",
           labels.dtype, " ", tuple(labels.shape))
    _check_dtype(x, _CE)


def _ce_pixels(t: torch.Tensor, labels: torch.Tensor, what: str) -> None:
    _check(t.device == labels.device and t.dtype == torch.float32 and t.is_contiguous() and t.shape == labels.shape,
           _CE, what, " must be a contiguous float32 ", tuple(labels.shape), " tensor on ", labels.device)


def upsample_cross_entropy_fwd(x: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> list[torch.Tensor]:
    _ce_check(x, labels)
    return list(_cpu().upsample_cross_entropy_fwd(x.float().contiguous(), labels, ignore_index))


def upsample_cross_entropy_bwd(coef: torch.Tensor, x: torch.Tensor, labels: torch.Tensor,
                               lse: torch.Tensor) -> torch.Tensor:
    _ce_check(x, labels)
    _ce_pixels(coef, labels, "coef")
    _ce_pixels(lse, labels, "lse")
    return _cpu().upsample_cross_entropy_bwd(coef, x.float().contiguous(), labels, lse).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# sr_attention helpers (csrc/sr_attention/sr_attention_bind_cuda.h); no CPU kernels: PyTorch, fp32

_SR = "sr_attention"


def _sr_check(t: torch.Tensor, like: torch.Tensor, dim: int, what: str) -> None:
    _on(t, like, _SR, what)
    _check(t.dtype == like.dtype, _SR, what, " has dtype ", t.dtype, ", expected ", like.dtype)
    _check(t.dim() == dim and t.is_contiguous(), _SR, what, " must be a contiguous ", dim, "-d tensor, got shape ",
           tuple(t.shape))


def _sr_grid(t: torch.Tensor, H: int, W: int, sr: int) -> tuple[int, int, int]:
    b, _, c = t.shape
    return b, c, (H // sr) * (W // sr)


def _patch_view(t: torch.Tensor, H: int, W: int, sr: int) -> torch.Tensor:
    # (B, H*W, C) -> the cropped (B, Hr, Wr, sr, sr, C) view that the patches enumerate
    b, _, c = t.shape
    hr, wr = H // sr, W // sr
    return t.view(b, H, W, c)[:, : hr * sr, : wr * sr].view(b, hr, sr, wr, sr, c).permute(0, 1, 3, 2, 4, 5)


def sr_attention_patchify(x: torch.Tensor, H: int, W: int, sr: int) -> torch.Tensor:
    _sr_check(x, x, 3, "x")
    _check(sr >= 1 and H >= sr and W >= sr and x.shape[1] == H * W, _SR, "x ", tuple(x.shape), " does not fit H=", H,
           " W=", W, " sr=", sr)
    _check_dtype(x, _SR)
    b, c, m = _sr_grid(x, H, W, sr)
    return _patch_view(x, H, W, sr).reshape(b, m, sr * sr * c).clone()


def sr_attention_unpatchify_add(dx: torch.Tensor, dpatches: torch.Tensor, H: int, W: int, sr: int) -> None:
    _sr_check(dx, dx, 3, "dx")
    _sr_check(dpatches, dx, 3, "dpatches")
    _check_dtype(dx, _SR)
    b, c, m = _sr_grid(dx, H, W, sr)
    _check(sr >= 1 and dx.shape[1] == H * W and tuple(dpatches.shape) == (b, m, sr * sr * c), _SR, "dx ",
           tuple(dx.shape), " and dpatches ", tuple(dpatches.shape), " do not fit H=", H, " W=", W, " sr=", sr)
    view = _patch_view(dx, H, W, sr)  # every cropped token lies in exactly one patch: a plain add, in fp32
    view.copy_(view.float() + dpatches.view(view.shape).float())


def _sr_vec(t: Optional[torch.Tensor], like: torch.Tensor, c: int, what: str) -> Optional[torch.Tensor]:
    if t is None:
        return None
    _check(t.device == like.device and t.numel() == c, _SR, what, " must have ", c, " elements on ", like.device)
    return t.float().reshape(c)


def _sr_affine(weight: torch.Tensor, r: torch.Tensor, c: int, what: str) -> None:
    _sr_check(weight, r, 1, what)
    _check(weight.numel() == c, _SR, "norm affine must have ", c, " elements")


def sr_attention_bias_ln_fwd(r: torch.Tensor, bias: Optional[torch.Tensor], weight: torch.Tensor, beta: torch.Tensor,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _sr_check(r, r, 3, "r")
    _check_dtype(r, _SR)
    c = r.shape[2]
    _sr_affine(weight, r, c, "norm weight")
    _sr_affine(beta, r, c, "norm bias")
    b32 = _sr_vec(bias, r, c, "conv bias")
    z = r.float() if b32 is None else r.float() + b32  # (B, M, C), the LayerNorm's input
    mean = z.mean(-1)
    rstd = torch.rsqrt(z.var(-1, unbiased=False) + eps)
    y = (z - mean[..., None]) * rstd[..., None] * weight.float() + beta.float()
    return y.to(r.dtype), mean, rstd


def sr_attention_bias_ln_bwd(dy: torch.Tensor, r: torch.Tensor, bias: Optional[torch.Tensor], weight: torch.Tensor,
                             mean: torch.Tensor, rstd: torch.Tensor
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _sr_check(r, r, 3, "r")
    _sr_check(dy, r, 3, "dy")
    _check(dy.shape == r.shape, _SR, "dy ", tuple(dy.shape), " and r ", tuple(r.shape), " differ")
    _check_dtype(r, _SR)
    c, rows = r.shape[2], r.shape[0] * r.shape[1]
    _sr_affine(weight, r, c, "norm weight")
    for t in (mean, rstd):
        _check(t.device == r.device and t.dtype == torch.float32 and t.is_contiguous() and t.numel() == rows, _SR,
               "mean/rstd must be contiguous float32 with ", rows, " elements")
    b32 = _sr_vec(bias, r, c, "conv bias")
    z = r.float() if b32 is None else r.float() + b32
    m, s = mean.reshape(r.shape[:2])[..., None], rstd.reshape(r.shape[:2])[..., None]
    xhat = (z - m) * s  # (B, M, C)
    g = dy.float()
    gx = g * weight.float()
    dz = s * (gx - gx.mean(-1, keepdim=True) - xhat * (gx * xhat).mean(-1, keepdim=True))
    return dz.to(r.dtype), (g * xhat).sum((0, 1)), g.sum((0, 1)), dz.sum((0, 1))
