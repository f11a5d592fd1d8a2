"""Upsample-and-sum: dispatch to the torch / triton / cpp / cuda implementations, autograd, public API.

    out = act(scale * sum_i Up_i(maps[i]) + shift)        Up_i: bilinear, align_corners=False

The op behind SegFormer's fused decoder (segformer_fast.nn.decode_head_fused): each stage's
folded Linear + fuse-slice is applied at the stage's own resolution, and this op upsamples the
results to 1/4 resolution and sums them in one pass, with the eval-mode BatchNorm folded into
scale/shift and the ReLU applied on the way out. The upsampled maps never exist.

Layout: channels-last. The kernels read and write (B, h, w, D) with D contiguous, so every tap of
the bilinear gather is one contiguous D-vector. The public function takes (B, D, h, w) tensors;
channels-last memory format (``x.permute(0, 2, 3, 1)`` contiguous) is used as is, NCHW inputs are
copied once. The result is (B, D, H, W) in channels-last memory format.

Backward: the adjoint of the upsampling (the gradient of each map is a gather over the output
pixels that read it), the ReLU mask from the saved output, dshift = sum(g), dscale = sum(g * u)
with u, the pre-affine sum, recomputed from the maps rather than saved.
"""

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F

from ...backends import cpu_extension, cuda_extension, validate_backend
from ...dispatch import KERNEL_PREFERENCE, Impl, OpSpec, register
from ..fused import fused_op

__all__ = ["upsample_sum", "upsample_sum_nhwc", "upsample_sum_fwd_nhwc", "upsample_sum_bwd_nhwc", "IMPLEMENTED"]

MAX_MAPS = 4


def _acc(t):
    return torch.promote_types(t.dtype, torch.float32)  # fp32 math, fp64 for fp64


def _torch_fwd(maps, H, W, scale, shift, relu):
    out, acc = None, _acc(maps[0])
    for m in maps:  # (B, h, w, D) viewed as channels-last NCHW
        up = F.interpolate(m.permute(0, 3, 1, 2).to(acc), size=(H, W), mode="bilinear", align_corners=False)
        out = up if out is None else out + up
    out = out.permute(0, 2, 3, 1)  # (B, H, W, D)
    if scale is not None:
        out = out * scale.to(acc)
    if shift is not None:
        out = out + shift.to(acc)
    if relu:
        out = torch.relu(out)
    return out.to(maps[0].dtype).contiguous()


def _torch_bwd(grad, sizes, maps, out, scale, relu, need_dscale, need_dshift):
    B, H, W, D = grad.shape
    acc = _acc(grad)
    g = grad.to(acc)
    if relu:
        g = torch.where(out <= 0, 0.0, g)  # ATen's ReLU backward: a NaN output passes the gradient
    dshift = g.sum((0, 1, 2)) if need_dshift else None
    dscale = (g * _torch_fwd(maps, H, W, None, None, False).to(acc)).sum((0, 1, 2)) if need_dscale else None
    if scale is not None:
        g = g * scale.to(acc)
    g = g.permute(0, 3, 1, 2)
    grads = [
        torch.ops.aten.upsample_bilinear2d_backward(g, [H, W], [B, D, h, w], False).permute(0, 2, 3, 1).to(grad.dtype).contiguous()
        for h, w in sizes
    ]
    return grads, dscale, dshift


def _f32(t):
    return None if t is None else t.float().contiguous()


def _triton_fwd(maps, H, W, scale, shift, relu):
    from .triton_kernels import upsample_sum_fwd_triton

    return upsample_sum_fwd_triton(maps, H, W, _f32(scale), _f32(shift), relu)


def _triton_bwd(grad, sizes, maps, out, scale, relu, need_dscale, need_dshift):
    from .triton_kernels import upsample_sum_bwd_triton

    return upsample_sum_bwd_triton(grad, sizes, maps, out, _f32(scale), relu, need_dscale, need_dshift)


def _cpp_fwd(maps, H, W, scale, shift, relu):  # fp32 kernel; 16-bit dtypes are computed in fp32 and cast back
    out = cpu_extension().upsample_sum_fwd([m.float() for m in maps], H, W, _f32(scale), _f32(shift), relu)
    return out.to(maps[0].dtype)


def _cpp_bwd(grad, sizes, maps, out, scale, relu, need_dscale, need_dshift):
    res = cpu_extension().upsample_sum_bwd(
        grad.float().contiguous(), [s for hw in sizes for s in hw], [m.float() for m in maps] if need_dscale else [],
        out.float() if relu else None, _f32(scale), relu, need_dshift,
    )
    return _split([r.to(grad.dtype) for r in res[: len(sizes)]] + res[len(sizes):], len(sizes), need_dscale, need_dshift)


def _cuda_fwd(maps, H, W, scale, shift, relu):
    return cuda_extension().upsample_sum_fwd(maps, H, W, _f32(scale), _f32(shift), relu)


def _cuda_bwd(grad, sizes, maps, out, scale, relu, need_dscale, need_dshift):
    res = cuda_extension().upsample_sum_bwd(
        grad, [s for hw in sizes for s in hw], maps if need_dscale else [], out if relu else None, _f32(scale), relu,
        need_dshift,
    )
    return _split(res, len(sizes), need_dscale, need_dshift)


def _split(res, n, need_dscale, need_dshift):
    # the compiled kernels' [grad_map_i..., dscale?, dshift?] -> (grads, dscale, dshift)
    return res[:n], (res[n] if need_dscale else None), (res[n + int(need_dscale)] if need_dshift else None)


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # fp32 arithmetic: fp64 runs on torch only

# Auto's order per CUDA GPU, (major, minor) -> order, e.g. (9, 0): ("cuda", "triton", "torch"). Filled from
# measurements on that GPU only (benchmarks/backend_table.py, run by benchmarks/gpu_check.sh); a GPU not listed
# gets KERNEL_PREFERENCE's order.
GPU_PREFERENCE: dict[tuple[int, int], tuple[str, ...]] = {}

SPEC = register(OpSpec("upsample_sum", [
    Impl("torch", _torch_fwd, _torch_bwd, note="F.interpolate and its ATen backward, fp32 math (fp64 for fp64)"),
    Impl("triton", _triton_fwd, _triton_bwd, dtypes=_KERNEL_DTYPES, note="Triton kernels (triton_kernels.py)"),
    Impl("cpp", _cpp_fwd, _cpp_bwd, dtypes=_KERNEL_DTYPES, needs=("upsample_sum_fwd", "upsample_sum_bwd"),
         note="C++/OpenMP, fp32 (16-bit dtypes upcast)"),
    Impl("cuda", _cuda_fwd, _cuda_bwd, dtypes=_KERNEL_DTYPES, needs=("upsample_sum_fwd", "upsample_sum_bwd"),
         note="CUDA kernels"),
], prefer=KERNEL_PREFERENCE, prefer_gpu=GPU_PREFERENCE))
IMPLEMENTED = tuple(SPEC.impls)


def _fwd(maps, H, W, scale, shift, relu, backend):
    return SPEC.resolve(backend, maps[0]).forward(maps, H, W, scale, shift, relu)


def _bwd(grad, sizes, maps, out, scale, relu, need_dscale, need_dshift, backend):
    return SPEC.resolve(backend, grad).backward(grad, sizes, maps, out, scale, relu, need_dscale, need_dshift)


def _op_forward(
    maps: list[torch.Tensor],
    height: int,
    width: int,
    scale: Optional[torch.Tensor],
    shift: Optional[torch.Tensor],
    relu: bool,
    backend: str,
) -> torch.Tensor:
    return _fwd(maps, height, width, scale, shift, relu, backend)


def _op_forward_fake(maps, height, width, scale, shift, relu, backend):
    return maps[0].new_empty((maps[0].shape[0], height, width, maps[0].shape[3]))


def _op_backward(
    grad: torch.Tensor,
    sizes: list[int],
    maps: list[torch.Tensor],
    out: Optional[torch.Tensor],
    scale: Optional[torch.Tensor],
    relu: bool,
    need_dscale: bool,
    need_dshift: bool,
    backend: str,
) -> list[torch.Tensor]:
    pairs = list(zip(sizes[0::2], sizes[1::2]))
    grads, dscale, dshift = _bwd(grad, pairs, maps, out, scale, relu, need_dscale, need_dshift, backend)
    return grads + ([dscale] if need_dscale else []) + ([dshift] if need_dshift else [])


def _op_backward_fake(grad, sizes, maps, out, scale, relu, need_dscale, need_dshift, backend):
    B, _, _, D = grad.shape
    res = [grad.new_empty((B, h, w, D)) for h, w in zip(sizes[0::2], sizes[1::2])]
    res += [grad.new_empty((D,), dtype=_acc(grad)) for _ in range(int(need_dscale) + int(need_dshift))]
    return res


def _setup_context(ctx, inputs, output):
    maps, height, width, scale, shift, relu, backend = inputs
    ctx.sizes = [s for m in maps for s in (m.shape[1], m.shape[2])]
    ctx.n, ctx.relu, ctx.backend = len(maps), relu, backend
    ctx.need_dscale = scale is not None and scale.requires_grad
    ctx.need_dshift = shift is not None and shift.requires_grad
    ctx.has_scale, ctx.has_shift = scale is not None, shift is not None
    saved_maps = list(maps) if ctx.need_dscale else []  # only dscale needs the pre-affine sum again
    ctx.save_for_backward(output if relu else None, scale, *saved_maps)


def _backward(ctx, grad):
    out, scale, *maps = ctx.saved_tensors
    res = torch.ops.segformer_fast.upsample_sum_backward(
        grad.contiguous(), ctx.sizes, maps, out, scale, ctx.relu, ctx.need_dscale, ctx.need_dshift, ctx.backend
    )
    n = ctx.n
    dscale = res[n].to(scale.dtype) if ctx.need_dscale else None
    dshift = res[n + int(ctx.need_dscale)] if ctx.need_dshift else None
    return list(res[:n]), None, None, dscale, dshift, None, None


_upsample_sum_op, _upsample_sum_backward_op = fused_op(
    "upsample_sum", _op_forward, _op_forward_fake, _op_backward, _op_backward_fake, _setup_context, _backward
)


def _validate(maps, scale, shift, channels_last: bool):
    if not isinstance(maps, (list, tuple)) or not 1 <= len(maps) <= MAX_MAPS:
        raise ValueError(f"upsample_sum: maps must be a list of 1 to {MAX_MAPS} tensors, got {type(maps).__name__}"
                         f"{'' if not isinstance(maps, (list, tuple)) else f' of length {len(maps)}'}")
    layout = "(B, h, w, D)" if channels_last else "(B, D, h, w)"
    shapes = [tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__ for m in maps]
    for m in maps:
        if not isinstance(m, torch.Tensor) or m.ndim != 4:
            raise ValueError(f"upsample_sum: every map must be a 4-d tensor {layout}, got {shapes}")
    m0 = maps[0]
    d_axis = 3 if channels_last else 1
    for m in maps:
        if m.shape[0] != m0.shape[0] or m.shape[d_axis] != m0.shape[d_axis]:
            raise ValueError(f"upsample_sum: maps must share B and D {layout}, got shapes {shapes}")
        if m.dtype != m0.dtype or not m.is_floating_point():
            raise ValueError(f"upsample_sum: maps must share one floating dtype, got {[x.dtype for x in maps]}")
        if m.device != m0.device:
            raise ValueError(f"upsample_sum: maps must be on one device, got {[str(x.device) for x in maps]}")
        if min(m.shape[1:3] if channels_last else m.shape[2:]) < 1 or m.shape[0] < 1:
            raise ValueError(f"upsample_sum: maps must be non-empty, got shapes {shapes}")
    D = m0.shape[d_axis]
    for name, v in (("scale", scale), ("shift", shift)):
        if v is None:
            continue
        if not isinstance(v, torch.Tensor) or v.shape != (D,) or not v.is_floating_point():
            got = f"{tuple(v.shape)} {v.dtype}" if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"upsample_sum: {name} must be a floating ({D},) tensor, got {got}")
        if v.device != m0.device:
            raise ValueError(f"upsample_sum: {name} is on {v.device}, the maps on {m0.device}")


def _size(size) -> tuple[int, int]:
    if len(size) != 2 or size[0] < 1 or size[1] < 1:
        raise ValueError(f"upsample_sum: size must be (H, W) with H, W >= 1, got {tuple(size)}")
    return tuple(s if isinstance(s, torch.SymInt) else int(s) for s in size)  # symbolic under torch.export


def upsample_sum_nhwc(
    maps: Sequence[torch.Tensor],
    size: Sequence[int],
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    relu: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Channels-last form of :func:`upsample_sum`: maps (B, h_i, w_i, D), returns (B, H, W, D), differentiable."""
    _validate(maps, scale, shift, channels_last=True)
    H, W = _size(size)
    backend = validate_backend(backend, check_available=False)
    maps = [m.contiguous() for m in maps]
    return torch.ops.segformer_fast.upsample_sum(maps, H, W, scale, shift, relu, backend)


def upsample_sum_fwd_nhwc(maps, size, scale=None, shift=None, relu=False, backend="auto") -> torch.Tensor:
    """Forward only, no autograd: (B, h_i, w_i, D) contiguous maps -> (B, H, W, D)."""
    return _fwd(list(maps), int(size[0]), int(size[1]), scale, shift, relu, backend)


def upsample_sum_bwd_nhwc(grad, sizes, backend="auto") -> list[torch.Tensor]:
    """Adjoint only (no affine, no ReLU): grad (B, H, W, D) -> grads (B, h_i, w_i, D) for sizes [(h_i, w_i)]."""
    return _bwd(grad.contiguous(), [tuple(s) for s in sizes], [], None, None, False, False, False, backend)[0]


def upsample_sum(
    maps: Sequence[torch.Tensor],
    size: Sequence[int],
    scale: Optional[torch.Tensor] = None,
    shift: Optional[torch.Tensor] = None,
    relu: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Bilinearly upsample each map to ``size`` and sum them, then an optional affine and ReLU.

    ``out = relu?(scale * sum_i interpolate(maps[i], size, bilinear, align_corners=False) + shift)``
    in one pass: the upsampled maps are never materialised. Differentiable in the maps, scale, shift.

    Args:
        maps: 1 to 4 tensors (B, D, h_i, w_i) of one float dtype and device. Channels-last memory
            format is the fast layout (no copy); contiguous NCHW is accepted and copied once.
        size: output (H, W).
        scale, shift: optional per-channel (D,) tensors (fp32 recommended).
        relu: apply ReLU last.
        backend: "auto", "torch", "triton", "cpp" or "cuda" (see segformer_fast.available_backends()).
            The kernels take float32, float16 and bfloat16 (fp32 arithmetic); float64 maps run on
            "torch" in fp64 ("auto" picks it; naming a kernel backend is a TypeError).
    Returns:
        (B, D, H, W) in the maps' dtype, channels-last memory format.

    Example:
        >>> z = [torch.randn(2, 16, 8, 8), torch.randn(2, 16, 4, 4)]
        >>> upsample_sum(z, (8, 8), relu=True).shape
        torch.Size([2, 16, 8, 8])
    """
    _validate(maps, scale, shift, channels_last=False)
    nhwc = [m.permute(0, 2, 3, 1) for m in maps]
    return upsample_sum_nhwc(nhwc, size, scale, shift, relu, backend).permute(0, 3, 1, 2)
