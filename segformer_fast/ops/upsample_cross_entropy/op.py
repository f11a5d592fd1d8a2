"""Upsampled cross-entropy: dispatch to the torch / triton / cpp / cuda implementations, autograd, public API.

    loss = CE(Up(logits), labels)     Up: bilinear to the labels' (H, W), align_corners=False

SegFormer's logits come out at 1/4 resolution; the loss upsamples them to the label size. Done
naively, autograd keeps the (B, K, H, W) upsampled logits (B2 at 1024 with 150 classes: 600 MiB
in fp32), and the softmax backward makes another one. Here neither exists.

Forward, per output pixel p with taps t (the four low-resolution pixels of its bilinear gather,
weights a_pt): z_p = sum_t a_pt x_t (a K-vector, computed on the fly), lse_p = logsumexp(z_p),
nll_p = lse_p - z_p[y_p]. Saved for backward: the low-resolution logits x, the labels and lse
(B, H, W) fp32. The reduction is PyTorch's: with w_p = weight[y_p] (1 without class weights) and
0 at ignored pixels, "mean" is sum(w_p nll_p) / sum(w_p) (nan when every pixel is ignored),
"sum" is sum(w_p nll_p), "none" the (B, H, W) map w_p nll_p.

Backward: with c_p = dL/dnll_p (w_p g / sum(w) for "mean"), the gradient of z_p is
G_p = c_p (softmax(z_p) - onehot(y_p)), softmax(z_p)_k = exp(z_pk - lse_p) recomputed from x and
lse. The gradient of x is the adjoint of the bilinear gather, dx_t = sum_p a_pt G_p. The weights
separate, a_pt = a(r, i) a(c, j) for p = (r, c), t = (i, j), so dx[i, j] = sum_r a(r, i) T_r[j]
with T_r[j] = sum_c a(c, j) G[r, c]: the Triton kernel computes G once per (pixel, class) and
output row tap program (about 1.5 times the B H W K useful exponentials at B2 1024, against 11.5
times for a gather over each low-resolution pixel's window; its docstring has the exp and byte
counts), contracts it along the columns with a small matrix product and streams down the rows.
The CUDA kernel computes the adjoint as a gather (each low-resolution pixel sums over the output
pixels that read it, class by class), the C++ kernel as a row-chunked scatter with a fixed
summation order; none uses atomics, so gradients are deterministic. The torch implementation
walks chunks of output rows, so it holds (B, K, rows, W) at a time, never (B, K, H, W).

Label values: checked on the CPU before anything runs; on CUDA without a host sync, raised by a
later call (see :func:`_check_label_values`).

Layout: the kernels read the logits channels-last, (B, h, w, K) with K contiguous, so each tap
is one contiguous K-vector. SegFormer's fused decoder returns its logits in that memory format,
so the permute in :func:`upsample_cross_entropy` is free there.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ...backends import cpu_extension, cuda_extension, validate_backend
from ...dispatch import KERNEL_PREFERENCE, Impl, OpSpec, register
from ..fused import fused_op
from ..math_utils import bilinear_taps

__all__ = ["upsample_cross_entropy", "IMPLEMENTED", "REDUCTIONS"]

REDUCTIONS = ("mean", "sum", "none")
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_CHUNK_ELEMENTS = 1 << 22  # the torch implementation's (B, K, rows, W) chunk: 16 MiB in fp32


def _row_taps(h: int, H: int, r0: int, r1: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear row taps of output rows [r0, r1): input rows i0, i1 (r1 - r0,) and the weight l1 of i1.

    PyTorch's rule (:func:`segformer_fast.ops.math_utils.bilinear_taps`): taps floor(src) and the next
    row (clamped), weights 1 - frac and frac. Applied as a gather (not a matrix over a window of
    rows), so a non-finite logit reaches only the rows that read it, as in F.interpolate.
    """
    i0, i1, l1 = bilinear_taps(h, H, r0, r1, device)
    return i0, i1, l1.view(-1, 1)


def _chunks(B: int, K: int, H: int, W: int):
    rows = max(1, _CHUNK_ELEMENTS // max(1, B * K * W))
    for r0 in range(0, H, rows):
        yield r0, min(H, r0 + rows)


def _torch_upsampled_rows(x, h, H, W, r0, r1):
    """Up(x) for output rows [r0, r1): (B, K, r1 - r0, W) fp32, plus the row taps (i0, i1, l1)."""
    i0, i1, l1 = taps = _row_taps(h, H, r0, r1, x.device)
    xf = x.float()
    rows = xf.index_select(2, i0) * (1.0 - l1) + xf.index_select(2, i1) * l1  # (B, K, R, w)
    return F.interpolate(rows, size=(r1 - r0, W), mode="bilinear", align_corners=False), taps


def _torch_fwd(x_nhwc, labels, ignore_index):
    x = x_nhwc.permute(0, 3, 1, 2)  # (B, K, h, w) view
    B, K, h, _ = x.shape
    H, W = labels.shape[-2:]
    nll = torch.empty(B, H, W, dtype=torch.float32, device=x.device)
    lse = torch.empty_like(nll)
    for r0, r1 in _chunks(B, K, H, W):
        z, _ = _torch_upsampled_rows(x, h, H, W, r0, r1)  # (B, K, R, W)
        y = labels[:, r0:r1]
        valid = y != ignore_index
        lse[:, r0:r1] = torch.logsumexp(z, dim=1)
        zy = z.gather(1, torch.where(valid, y, 0).unsqueeze(1)).squeeze(1)
        nll[:, r0:r1] = torch.where(valid, lse[:, r0:r1] - zy, 0.0)
    return nll, lse


def _torch_bwd(coef, x_nhwc, labels, lse):
    x = x_nhwc.permute(0, 3, 1, 2)
    B, K, h, w = x.shape
    H, W = labels.shape[-2:]
    grad = torch.zeros(B, K, h, w, dtype=torch.float32, device=x.device)
    for r0, r1 in _chunks(B, K, H, W):
        z, (i0, i1, l1) = _torch_upsampled_rows(x, h, H, W, r0, r1)
        c = coef[:, r0:r1].unsqueeze(1)  # (B, 1, R, W)
        g = torch.exp(z - lse[:, r0:r1].unsqueeze(1)).mul_(c)  # c * softmax
        y = labels[:, r0:r1].clamp(0, K - 1).unsqueeze(1)  # where c != 0, y is a class
        g.scatter_add_(1, y, -c)  # - c * onehot
        g_rows = torch.ops.aten.upsample_bilinear2d_backward(g, [r1 - r0, W], [B, K, r1 - r0, w], False)
        grad.index_add_(2, i0, g_rows * (1.0 - l1)).index_add_(2, i1, g_rows * l1)  # the row gather's adjoint
    return grad.permute(0, 2, 3, 1)  # (B, h, w, K) view


def _triton_fwd(x_nhwc, labels, ignore_index):
    from .triton_kernels import upsample_cross_entropy_fwd_triton

    return upsample_cross_entropy_fwd_triton(x_nhwc, labels, ignore_index)


def _triton_bwd(coef, x_nhwc, labels, lse):
    from .triton_kernels import upsample_cross_entropy_bwd_triton

    return upsample_cross_entropy_bwd_triton(coef, x_nhwc, labels, lse, out_dtype=x_nhwc.dtype)  # no fp32 copy


def _cpp_fwd(x_nhwc, labels, ignore_index):  # fp32 kernel: other dtypes are upcast (the logits are low resolution)
    return tuple(cpu_extension().upsample_cross_entropy_fwd(x_nhwc.float().contiguous(), labels, ignore_index))


def _cpp_bwd(coef, x_nhwc, labels, lse):
    return cpu_extension().upsample_cross_entropy_bwd(coef, x_nhwc.float().contiguous(), labels, lse)


def _cuda_fwd(x_nhwc, labels, ignore_index):
    return tuple(cuda_extension().upsample_cross_entropy_fwd(x_nhwc, labels, ignore_index))


def _cuda_bwd(coef, x_nhwc, labels, lse):
    return cuda_extension().upsample_cross_entropy_bwd(coef, x_nhwc, labels, lse)


_NEEDS = ("upsample_cross_entropy_fwd", "upsample_cross_entropy_bwd")
# Auto's order per CUDA GPU, (major, minor) -> order, e.g. (9, 0): ("cuda", "triton", "torch"). Filled from
# measurements on that GPU only (benchmarks/backend_table.py, run by benchmarks/gpu_check.sh); a GPU not listed
# gets KERNEL_PREFERENCE's order.
GPU_PREFERENCE: dict[tuple[int, int], tuple[str, ...]] = {}

SPEC = register(OpSpec("upsample_cross_entropy", [
    Impl("torch", _torch_fwd, _torch_bwd, note="row-chunked PyTorch (interpolation matrices), fp32"),
    Impl("triton", _triton_fwd, _triton_bwd, note="Triton kernels (triton_kernels.py)"),
    Impl("cpp", _cpp_fwd, _cpp_bwd, needs=_NEEDS, note="C++/OpenMP, fp32 (other dtypes upcast)"),
    Impl("cuda", _cuda_fwd, _cuda_bwd, needs=_NEEDS, note="CUDA kernels"),
], prefer=KERNEL_PREFERENCE, prefer_gpu=GPU_PREFERENCE))
IMPLEMENTED = tuple(SPEC.impls)


def _fwd(x_nhwc, labels, ignore_index, backend):
    """Per-pixel (nll, lse), both (B, H, W) fp32; nll is 0 at ignored pixels."""
    return SPEC.resolve(backend, x_nhwc).forward(x_nhwc, labels, ignore_index)


def _bwd(coef, x_nhwc, labels, lse, backend):
    """Gradient of sum_p coef_p nll_p with respect to the (B, h, w, K) logits."""
    return SPEC.resolve(backend, x_nhwc).backward(coef, x_nhwc, labels, lse)


def _label_error(value: int, K: int, ignore_index: int, earlier: bool = False) -> ValueError:
    where = " (in the labels of an earlier call: on CUDA they are checked without waiting for the GPU)" if earlier else ""
    return ValueError(
        f"upsample_cross_entropy: label value {value} is outside [0, {K}) and is not ignore_index={ignore_index}{where}"
    )


# Label reports of CUDA calls not read yet, oldest first: (event, host (2,) int64 [count, first bad
# value], K, ignore_index); the copy to ``host`` has landed once the event has (no event: at once).
_PENDING_LABEL_REPORTS: list = []
_MAX_PENDING_LABEL_REPORTS = 16  # beyond this many unread reports, wait for the oldest


def _queue_label_report(labels, bad, K, ignore_index):
    """The count and first value of this call's bad labels, for :func:`_raise_pending_label_error`; no host sync.

    On CUDA the (2,) report is copied to pinned memory behind an event; on the CPU (tests) it is
    ready at once.
    """
    flat = bad.reshape(-1)
    report = torch.stack([flat.sum(), labels.reshape(-1)[flat.to(torch.uint8).argmax()]])  # first bad, or labels[0]
    host, event = report, None
    if report.is_cuda:
        host = torch.empty(2, dtype=torch.int64, pin_memory=True)
        host.copy_(report, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
    _PENDING_LABEL_REPORTS.append((event, host, K, ignore_index))


def _raise_pending_label_error(wait: bool = False):
    """Raise ValueError for the oldest queued report with a bad label whose copy has landed (all, with ``wait``).

    Reports are read in order and dropped once read; an unread one stops the scan, unless more
    than _MAX_PENDING_LABEL_REPORTS are queued, when the oldest is waited for.
    """
    while _PENDING_LABEL_REPORTS:
        event, host, K, ignore_index = _PENDING_LABEL_REPORTS[0]
        if event is not None:
            if not (wait or event.query() or len(_PENDING_LABEL_REPORTS) > _MAX_PENDING_LABEL_REPORTS):
                return
            event.synchronize()
        _PENDING_LABEL_REPORTS.pop(0)
        count, value = (int(v) for v in host.tolist())
        if count:
            _PENDING_LABEL_REPORTS.clear()  # a later report would name the same kind of error
            raise _label_error(value, K, ignore_index, earlier=True)


def _check_label_values(labels, K, ignore_index, asynchronous=None):
    """Every label in [0, K) or ignore_index: returns the labels the kernels may index with.

    CPU: checked now (a host read of a CPU tensor costs nothing); ValueError naming the first bad
    value. CUDA: ``bad.any()`` would wait for the GPU every training step, so the check is
    asynchronous: this call's (count, first bad value) is copied to pinned memory behind an event
    and read by a later call of the op (forward or backward) once it has landed, which then raises
    the same ValueError, saying it concerns an earlier call. Meanwhile the bad labels are replaced
    by ignore_index, so that no kernel indexes with them (an out-of-range read would poison the
    CUDA context before the error could be raised). Not ``torch._assert_async``: on CUDA it is a
    device-side assert whose message does not name the problem and which leaves the context unusable.
    ``asynchronous``: the CUDA way (default: for CUDA labels); tests run it on the CPU.
    """
    bad = _bad_labels(labels, K, ignore_index)
    if not (labels.is_cuda if asynchronous is None else asynchronous):
        if bad.any():
            raise _label_error(int(labels[bad][0]), K, ignore_index)
        return labels
    _raise_pending_label_error()
    _queue_label_report(labels, bad, K, ignore_index)
    return labels.masked_fill(bad, ignore_index)


def _bad_labels(labels, K, ignore_index):
    return ((labels < 0) | (labels >= K)) & (labels != ignore_index)


def _pixel_weights(labels, weight, ignore_index, K):
    """w_p: the class weight of each pixel's label (1 without weights), 0 at ignored pixels; (B, H, W) fp32."""
    valid = labels != ignore_index
    if weight is None:
        return valid.float()
    return torch.where(valid, weight.float()[torch.where(valid, labels, 0).clamp(0, K - 1)], 0.0)


def _op_forward(
    logits: torch.Tensor,
    labels: torch.Tensor,
    weight: Optional[torch.Tensor],
    ignore_index: int,
    reduction: str,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    K = logits.shape[3]
    labels = _check_label_values(labels, K, ignore_index)
    nll, lse = _fwd(logits, labels, ignore_index, backend)
    wp = _pixel_weights(labels, weight, ignore_index, K)
    losses = nll * wp
    if reduction == "none":
        loss = losses
    elif reduction == "sum":
        loss = losses.sum()
    else:
        loss = losses.sum() / wp.sum()  # 0 / 0 = nan when every pixel is ignored, as PyTorch
    return loss, lse  # fp32; the public function returns it in the logits' dtype outside autocast


def _op_forward_fake(logits, labels, weight, ignore_index, reduction, backend):
    shape = labels.shape if reduction == "none" else ()
    return logits.new_empty(shape, dtype=torch.float32), labels.new_empty(labels.shape, dtype=torch.float32)


def _op_backward(
    grad: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    weight: Optional[torch.Tensor],
    lse: torch.Tensor,
    ignore_index: int,
    reduction: str,
    backend: str,
) -> torch.Tensor:
    if labels.device.type == "cuda":  # the forward's labels (see _check_label_values); no host sync
        _raise_pending_label_error()
        labels = labels.masked_fill(_bad_labels(labels, logits.shape[3], ignore_index), ignore_index)
    wp = _pixel_weights(labels, weight, ignore_index, logits.shape[3])
    g = grad.float()
    if reduction == "mean":
        total = wp.sum()
        g = torch.where(total > 0, g / total, 0.0)  # no pixel counts: zero gradient, as PyTorch
    coef = (wp * g).contiguous()  # (B, H, W): dL/dnll_p
    return _bwd(coef, logits, labels, lse, backend).to(logits.dtype).contiguous()


def _op_backward_fake(grad, logits, labels, weight, lse, ignore_index, reduction, backend):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    logits, labels, weight, ignore_index, reduction, backend = inputs
    ctx.save_for_backward(logits, labels, weight, output[1])  # low-resolution logits, labels, lse
    ctx.mark_non_differentiable(output[1])
    ctx.ignore_index, ctx.reduction, ctx.backend = ignore_index, reduction, backend


def _backward(ctx, grad, _grad_lse):
    logits, labels, weight, lse = ctx.saved_tensors
    grad_logits = torch.ops.segformer_fast.upsample_cross_entropy_backward(
        grad.contiguous(), logits, labels, weight, lse, ctx.ignore_index, ctx.reduction, ctx.backend
    )
    return grad_logits, None, None, None, None, None


_upsample_cross_entropy_op, _upsample_cross_entropy_backward_op = fused_op(
    "upsample_cross_entropy", _op_forward, _op_forward_fake, _op_backward, _op_backward_fake, _setup_context, _backward
)


def _validate(logits, labels, weight, reduction, ignore_index):
    if not isinstance(logits, torch.Tensor) or logits.ndim != 4:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"upsample_cross_entropy: logits must be a (B, K, h, w) tensor, got {got}")
    if logits.dtype not in _DTYPES:
        raise ValueError(f"upsample_cross_entropy: logits must be float32, float16 or bfloat16, got {logits.dtype}")
    if not isinstance(labels, torch.Tensor) or labels.ndim != 3 or labels.shape[0] != logits.shape[0]:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"upsample_cross_entropy: labels must be (B, H, W) with B={logits.shape[0]}, got {got}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"upsample_cross_entropy: labels must be an integer tensor, got {labels.dtype}")
    if logits.numel() == 0 or labels.numel() == 0:
        raise ValueError(
            f"upsample_cross_entropy: empty input, logits {tuple(logits.shape)}, labels {tuple(labels.shape)}"
        )
    if labels.device != logits.device:
        raise ValueError(f"upsample_cross_entropy: labels are on {labels.device}, the logits on {logits.device}")
    K = logits.shape[1]
    if weight is not None:
        if not isinstance(weight, torch.Tensor) or weight.shape != (K,) or not weight.is_floating_point():
            got = f"{tuple(weight.shape)} {weight.dtype}" if isinstance(weight, torch.Tensor) else type(weight).__name__
            raise ValueError(f"upsample_cross_entropy: weight must be a floating ({K},) tensor, got {got}")
        if weight.device != logits.device:
            raise ValueError(f"upsample_cross_entropy: weight is on {weight.device}, the logits on {logits.device}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"upsample_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise ValueError(f"upsample_cross_entropy: ignore_index must be an int, got {ignore_index!r}")


def upsample_cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = 255,
    weight: Optional[torch.Tensor] = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-entropy of logits bilinearly upsampled to the labels' size, without the upsampled logits.

    Equal to ``F.cross_entropy(F.interpolate(logits, labels.shape[-2:], mode="bilinear",
    align_corners=False), labels, weight, ignore_index=ignore_index, reduction=reduction)``;
    autograd keeps only the low-resolution logits, the labels and one fp32 value per pixel.
    Differentiable in the logits.

    Args:
        logits: (B, K, h, w) float32 / float16 / bfloat16; channels-last memory format is read
            without a copy.
        labels: (B, H, W) integer class ids in [0, K) or ``ignore_index`` (any other value raises
            ValueError naming it). H, W may be larger or smaller than h, w.
        ignore_index: label value that adds neither loss nor gradient.
        weight: optional (K,) class weights; "mean" is then the weighted mean, as in PyTorch.
        reduction: "mean" (nan when every pixel is ignored), "sum" or "none" ((B, H, W) losses).
        backend: "auto", "torch", "triton", "cpp" or "cuda" (see segformer_fast.available_backends()).
    Returns:
        A scalar (or (B, H, W) for "none"), computed in fp32: in the logits' dtype, as F.cross_entropy
        returns it, or fp32 under autocast, as autocast runs F.cross_entropy.

    Example:
        >>> logits = torch.randn(2, 19, 16, 16, requires_grad=True)
        >>> labels = torch.randint(0, 19, (2, 64, 64))
        >>> upsample_cross_entropy(logits, labels).backward()
    """
    _validate(logits, labels, weight, reduction, ignore_index)
    backend = validate_backend(backend, check_available=False)
    x = logits.permute(0, 2, 3, 1).contiguous()  # (B, h, w, K): free for channels-last logits
    w = None if weight is None else weight.detach().float().contiguous()
    loss, _ = torch.ops.segformer_fast.upsample_cross_entropy(
        x, labels.long().contiguous(), w, ignore_index, reduction, backend
    )
    if torch.is_autocast_enabled(logits.device.type):
        return loss
    return loss.to(logits.dtype)
