"""Dispatch and autograd of the fused depthwise 3x3 conv + bias + GELU.

Two ``torch.library`` custom ops, so ``torch.compile`` traces through without graph breaks:
``segformer_fast::dwconv3x3_gelu`` (forward) and ``segformer_fast::dwconv3x3_gelu_backward``
(grads of x, weight, bias). Each runs one backend per call: "torch" (PyTorch composition),
"triton", "cpp" (segformer_fast._C_cpu) or "cuda" (segformer_fast._C_cuda); "auto" picks the
fastest present for the tensor's device (see :mod:`segformer_fast.backends`).

Memory: autograd saves only x (and the weight and bias, which are parameters). The backward
recomputes z = conv(x) + bias for GELU'(z) instead of keeping z or y.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...backends import cpu_extension, cuda_extension, validate_backend
from ...dispatch import KERNEL_PREFERENCE, Impl, OpSpec, register
from ..fused import fused_op
from ...utils.debug import empty
from ..math_utils import gelu_grad
from .reference import dwconv3x3_gelu_reference

__all__ = ["dwconv3x3_gelu", "IMPLEMENTED"]

_ACT_CODES = {"none": 1, "tanh": 2}  # the compiled kernels' GELU codes (0 is identity)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _torch_bwd(grad_y, x, hw, weight, bias, approximate):
    """The backward as a PyTorch composition (NCHW views, fp32), recomputing z from x."""
    b, n, c = x.shape
    h, w = hw
    xf = x.float().transpose(1, 2).reshape(b, c, h, w)  # (B, C, H, W)
    wf = weight.float()
    z = F.conv2d(xf, wf, bias.float(), padding=1, groups=c)
    gz = grad_y.float().transpose(1, 2).reshape(b, c, h, w) * gelu_grad(z, approximate)
    grad_x = F.conv2d(gz, wf.flip(-1, -2), padding=1, groups=c)  # transposed conv = conv with the kernel flipped
    grad_w = torch.nn.grad.conv2d_weight(xf, wf.shape, gz, padding=1, groups=c)
    grad_b = gz.sum((0, 2, 3))
    grad_x = grad_x.flatten(2).transpose(1, 2).to(x.dtype).contiguous()
    return grad_x, grad_w.to(weight.dtype), grad_b.to(bias.dtype)


def _torch_fwd(x, hw, weight, bias, approximate):
    return dwconv3x3_gelu_reference(x, hw, weight, bias, approximate)


def _triton_fwd(x, hw, weight, bias, approximate):
    from .triton_kernels import dwconv3x3_gelu_fwd

    return dwconv3x3_gelu_fwd(x, hw, weight, bias, approximate)


def _triton_bwd(grad_y, x, hw, weight, bias, approximate):
    from .triton_kernels import dwconv3x3_gelu_bwd

    return dwconv3x3_gelu_bwd(grad_y, x, hw, weight, bias, approximate)


def _cpp_fwd(x, hw, weight, bias, approximate):  # fp32 kernels: other dtypes are upcast
    b, n, c = x.shape
    y = empty(b, n, c, dtype=torch.float32, device=x.device)
    cpu_extension().dwconv3x3_gelu_fwd(
        x.float().contiguous(), weight.float().contiguous(), bias.float().contiguous(), y, hw[0], hw[1],
        _ACT_CODES[approximate],
    )  # fmt: skip
    return y.to(x.dtype)


def _cpp_bwd(grad_y, x, hw, weight, bias, approximate):
    b, n, c = x.shape
    grad_w, grad_b = _param_grads(x, c)
    grad_x = empty(b, n, c, dtype=torch.float32, device=x.device)
    cpu_extension().dwconv3x3_gelu_bwd(
        grad_y.float().contiguous(), x.float().contiguous(), weight.float().contiguous(),
        bias.float().contiguous(), grad_x, grad_w, grad_b, hw[0], hw[1], _ACT_CODES[approximate],
    )  # fmt: skip
    return grad_x.to(x.dtype), grad_w.to(weight.dtype), grad_b.to(bias.dtype)


def _cuda_fwd(x, hw, weight, bias, approximate):
    b, n, c = x.shape
    y = empty(b, n, c, dtype=x.dtype, device=x.device)
    cuda_extension().dwconv3x3_gelu_fwd(x, weight, bias, y, hw[0], hw[1], _ACT_CODES[approximate])
    return y


def _cuda_bwd(grad_y, x, hw, weight, bias, approximate):
    b, n, c = x.shape
    grad_w, grad_b = _param_grads(x, c)
    grad_x = empty(b, n, c, dtype=x.dtype, device=x.device)
    cuda_extension().dwconv3x3_gelu_bwd(grad_y, x, weight, bias, grad_x, grad_w, grad_b, hw[0], hw[1],
                                        _ACT_CODES[approximate])
    return grad_x, grad_w.to(weight.dtype), grad_b.to(bias.dtype)


def _param_grads(x, c):
    # the compiled kernels write fp32 weight / bias gradients
    return empty(c, 1, 3, 3, dtype=torch.float32, device=x.device), empty(c, dtype=torch.float32, device=x.device)


_NEEDS = ("dwconv3x3_gelu_fwd", "dwconv3x3_gelu_bwd")
# Auto's order per CUDA GPU, (major, minor) -> order, e.g. (9, 0): ("cuda", "triton", "torch"). Filled from
# measurements on that GPU only (benchmarks/backend_table.py, run by benchmarks/gpu_check.sh); a GPU not listed
# gets KERNEL_PREFERENCE's order.
GPU_PREFERENCE: dict[tuple[int, int], tuple[str, ...]] = {}

SPEC = register(OpSpec("dwconv3x3_gelu", [
    Impl("torch", _torch_fwd, _torch_bwd, note="F.conv2d + GELU (NCHW views), fp32 backward"),
    Impl("triton", _triton_fwd, _triton_bwd, note="Triton kernels (triton_kernels.py)"),
    Impl("cpp", _cpp_fwd, _cpp_bwd, needs=_NEEDS, note="C++/OpenMP, fp32 (other dtypes upcast)"),
    Impl("cuda", _cuda_fwd, _cuda_bwd, needs=_NEEDS, note="CUDA kernels"),
], prefer=KERNEL_PREFERENCE, prefer_gpu=GPU_PREFERENCE))
IMPLEMENTED = tuple(SPEC.impls)


def _forward_impl(x, hw, weight, bias, approximate, backend):
    return SPEC.resolve(backend, x).forward(x, hw, weight, bias, approximate)


def _backward_impl(grad_y, x, hw, weight, bias, approximate, backend):
    return SPEC.resolve(backend, x).backward(grad_y.contiguous(), x, hw, weight, bias, approximate)


def _op_forward(
    x: torch.Tensor, h: int, w: int, weight: torch.Tensor, bias: torch.Tensor, approximate: str, backend: str
) -> torch.Tensor:
    return _forward_impl(x, (h, w), weight, bias, approximate, backend)


def _op_forward_fake(x, h, w, weight, bias, approximate, backend):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _op_backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    h: int,
    w: int,
    weight: torch.Tensor,
    bias: torch.Tensor,
    approximate: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward_impl(grad_y, x, (h, w), weight, bias, approximate, backend)


def _op_backward_fake(grad_y, x, h, w, weight, bias, approximate, backend):
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        torch.empty_like(bias, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    x, h, w, weight, bias, approximate, backend = inputs
    ctx.save_for_backward(x, weight, bias)  # only the input: z is recomputed in backward
    ctx.hw = (h, w)
    ctx.approximate = approximate
    ctx.backend = backend


def _backward(ctx, grad_y):
    x, weight, bias = ctx.saved_tensors
    grad_x, grad_w, grad_b = _dwconv3x3_gelu_backward_op(
        grad_y.contiguous(), x, ctx.hw[0], ctx.hw[1], weight, bias, ctx.approximate, ctx.backend
    )
    return grad_x, None, None, grad_w, grad_b, None, None


_dwconv3x3_gelu_op, _dwconv3x3_gelu_backward_op = fused_op(
    "dwconv3x3_gelu", _op_forward, _op_forward_fake, _op_backward, _op_backward_fake, _setup_context, _backward
)


def _check_inputs(x, hw, weight, bias, approximate) -> tuple[int, int]:
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (isinstance(hw, (tuple, list)) and len(hw) == 2):
        raise TypeError(f"hw must be a pair (H, W), got {hw!r}")
    h, w = (v if isinstance(v, torch.SymInt) else int(v) for v in hw)  # symbolic under torch.export
    if x.dim() != 3:
        raise ValueError(f"x must be (B, N, C) tokens, got a {x.dim()}-d tensor of shape {tuple(x.shape)}")
    b, n, c = x.shape
    if h < 1 or w < 1 or h * w != n:
        raise ValueError(f"hw={tuple(hw)} does not match x of shape {tuple(x.shape)}: need H * W == N = {n}")
    if tuple(weight.shape) != (c, 1, 3, 3):
        raise ValueError(
            f"weight must be (C, 1, 3, 3) = ({c}, 1, 3, 3) for x of shape {tuple(x.shape)}, got {tuple(weight.shape)}"
        )
    if tuple(bias.shape) != (c,):
        raise ValueError(f"bias must be (C,) = ({c},) for x of shape {tuple(x.shape)}, got {tuple(bias.shape)}")
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t.dtype not in _DTYPES:
            raise TypeError(f"{name} must be float32, float16 or bfloat16, got {t.dtype} (shape {tuple(t.shape)})")
    if weight.dtype != bias.dtype or weight.dtype not in (x.dtype, torch.float32):
        raise TypeError(
            f"weight and bias must share a dtype that is x's ({x.dtype}) or float32; "
            f"got weight {weight.dtype}, bias {bias.dtype}"
        )
    if weight.device != x.device or bias.device != x.device:
        raise ValueError(f"x, weight and bias must be on one device; got {x.device}, {weight.device}, {bias.device}")
    if approximate not in _ACT_CODES:
        raise ValueError(f"approximate must be 'none' or 'tanh', got {approximate!r}")
    return h, w


def dwconv3x3_gelu(
    x: torch.Tensor,
    hw: tuple[int, int],
    weight: torch.Tensor,
    bias: torch.Tensor,
    approximate: str = "none",
    backend: str = "auto",
) -> torch.Tensor:
    """GELU(depthwise 3x3 conv(x) + bias) on (B, N, C) tokens, with no transposes.

    Zero padding 1, stride 1; fp32 accumulation for fp16/bf16 inputs. Differentiable in x,
    weight and bias; autograd keeps only x (backward recomputes the conv).

    Args:
        x: (B, N, C) tokens, N = H * W row-major; a non-contiguous x is made contiguous.
        hw: (H, W).
        weight: (C, 1, 3, 3), the ``weight`` of ``nn.Conv2d(C, C, 3, padding=1, groups=C)``.
        bias: (C,).
        approximate: "none" (exact erf GELU) or "tanh".
        backend: "auto", "torch", "triton", "cpp" or "cuda".
    Returns:
        (B, N, C) in x's dtype.

    Example:
        >>> conv = torch.nn.Conv2d(64, 64, 3, padding=1, groups=64)
        >>> y = dwconv3x3_gelu(torch.randn(2, 7 * 9, 64), (7, 9), conv.weight, conv.bias)
    """
    h, w = _check_inputs(x, hw, weight, bias, approximate)
    backend = validate_backend(backend, check_available=False)
    return _dwconv3x3_gelu_op(x.contiguous(), h, w, weight.contiguous(), bias.contiguous(), approximate, backend)
