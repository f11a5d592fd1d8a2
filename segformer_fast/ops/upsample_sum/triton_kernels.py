"""Upsample-and-sum Triton kernels (channels-last: every tensor is (B, h, w, D), D contiguous).

Forward, one pass over the (B, H, W, D) output: for each output pixel the 4-tap bilinear gather
of each low-resolution map (PyTorch's align_corners=False source index, clamped at 0; see
ops/triton_math.py), summed in fp32, then the optional per-channel affine and ReLU.

Backward: a prep pass (only with ReLU, dscale or dshift) applies the ReLU mask to the incoming
gradient (written in its own dtype: masking does not round) and writes per-block partial sums for
the scale/shift gradients (recomputing the pre-affine sum by the same gather). Then one launch for
every map (:func:`backward_schedule` orders the programs of all maps by the gradient rows they read,
so the gradient comes from DRAM about once, not once per map), the adjoint of the upsampling as a
gather over live taps only: along each axis the output indices that
read input index i form the contiguous range [lo(i), hi(i)) where src(o) = scale (o + 0.5) - 0.5
lies in (i - 1, i + 1), open at both ends since the end points carry weight 0 (all o below i = 0 and
above i = n - 1: the clamped borders). A program loops over its pixels' row range times column
range (the longest in its tile; shorter ones are masked), weights recomputed exactly as in the
forward, and multiplies by the scale once at the end. No atomics, so results are deterministic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...utils.debug import empty
from ..triton_launch import check_interpreter_dtypes, gpu_launch_config
from ..triton_math import bilinear_tap, bilinear_weight, lerp2d as _lerp2d

__all__ = ["launch_config", "reader_ranges", "backward_schedule", "upsample_sum_fwd_triton",
           "upsample_sum_bwd_triton"]

MAX_MAPS = 4


@triton.jit
def _gather(z_ptr, h, w, scale_h, scale_w, b, oh, ow, offs_d, mask, D):
    # (BLOCK_P, BLOCK_D) bilinear sample of map z (B, h, w, D) at output pixels (b, oh, ow).
    y0, y1, ly = bilinear_tap(oh, scale_h, h)
    x0, x1, lx = bilinear_tap(ow, scale_w, w)
    row0 = (b * h + y0) * w
    row1 = (b * h + y1) * w
    d = offs_d[None, :]
    v00 = tl.load(z_ptr + ((row0 + x0) * D)[:, None] + d, mask=mask, other=0.0).to(tl.float32)
    v01 = tl.load(z_ptr + ((row0 + x1) * D)[:, None] + d, mask=mask, other=0.0).to(tl.float32)
    v10 = tl.load(z_ptr + ((row1 + x0) * D)[:, None] + d, mask=mask, other=0.0).to(tl.float32)
    v11 = tl.load(z_ptr + ((row1 + x1) * D)[:, None] + d, mask=mask, other=0.0).to(tl.float32)
    return _lerp2d(v00, v01, v10, v11, ly[:, None], lx[:, None])


@triton.jit
def _gather_sum(
    z0_ptr, z1_ptr, z2_ptr, z3_ptr,
    h0, w0, sh0, sw0, h1, w1, sh1, sw1, h2, w2, sh2, sw2, h3, w3, sh3, sw3,
    b, oh, ow, offs_d, mask, D,
    NUM_MAPS: tl.constexpr,
):
    # fp32 sum of the four maps' taps; the one 16-bit rounding is the output's, whose range is that of
    # the unfused decoder's fuse-conv output in the same dtype (the same sum, computed another way)
    acc = _gather(z0_ptr, h0, w0, sh0, sw0, b, oh, ow, offs_d, mask, D)
    if NUM_MAPS > 1:
        acc += _gather(z1_ptr, h1, w1, sh1, sw1, b, oh, ow, offs_d, mask, D)
    if NUM_MAPS > 2:
        acc += _gather(z2_ptr, h2, w2, sh2, sw2, b, oh, ow, offs_d, mask, D)
    if NUM_MAPS > 3:
        acc += _gather(z3_ptr, h3, w3, sh3, sw3, b, oh, ow, offs_d, mask, D)
    return acc


@triton.jit
def _upsample_sum_fwd_kernel(
    out_ptr, z0_ptr, z1_ptr, z2_ptr, z3_ptr, scale_ptr, shift_ptr,
    h0, w0, sh0, sw0, h1, w1, sh1, sw1, h2, w2, sh2, sw2, h3, w3, sh3, sw3,
    n_pix, H, W, D,
    NUM_MAPS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, RELU: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_p = offs_p < n_pix
    mask_d = offs_d < D
    mask = mask_p[:, None] & mask_d[None, :]
    ow = offs_p % W
    oh = (offs_p // W) % H
    b = offs_p // (W * H)
    acc = _gather_sum(
        z0_ptr, z1_ptr, z2_ptr, z3_ptr,
        h0, w0, sh0, sw0, h1, w1, sh1, sw1, h2, w2, sh2, sw2, h3, w3, sh3, sw3,
        b, oh, ow, offs_d, mask, D, NUM_MAPS,
    )
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + offs_d, mask=mask_d, other=0.0)[None, :]
    if HAS_SHIFT:
        acc = acc + tl.load(shift_ptr + offs_d, mask=mask_d, other=0.0)[None, :]
    if RELU:
        acc = tl.where(acc < 0.0, 0.0, acc)  # ReLU that keeps NaN (tl.maximum may return the 0)
    tl.store(out_ptr + offs_p[:, None] * D + offs_d[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _upsample_sum_bwd_prep_kernel(
    gm_ptr, part_shift_ptr, part_scale_ptr, g_ptr, out_ptr,
    z0_ptr, z1_ptr, z2_ptr, z3_ptr,
    h0, w0, sh0, sw0, h1, w1, sh1, sw1, h2, w2, sh2, sw2, h3, w3, sh3, sw3,
    n_pix, H, W, D,
    NUM_MAPS: tl.constexpr, RELU: tl.constexpr, NEED_DSCALE: tl.constexpr, NEED_DSHIFT: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # gm = g masked by the ReLU (in g's dtype: exact); per-block partial sums of g and g * u.
    pid_p = tl.program_id(0)
    offs_p = pid_p.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_p = offs_p < n_pix
    mask_d = offs_d < D
    mask = mask_p[:, None] & mask_d[None, :]
    idx = offs_p[:, None] * D + offs_d[None, :]
    g = tl.load(g_ptr + idx, mask=mask, other=0.0)
    if RELU:
        y = tl.load(out_ptr + idx, mask=mask, other=0.0)
        g = tl.where(y <= 0.0, 0.0, g)  # ReLU's backward as ATen's: a NaN output passes the gradient
        tl.store(gm_ptr + idx, g.to(gm_ptr.dtype.element_ty), mask=mask)
    g = g.to(tl.float32)
    if NEED_DSHIFT:
        tl.store(part_shift_ptr + pid_p * D + offs_d, tl.sum(g, axis=0), mask=mask_d)
    if NEED_DSCALE:
        ow = offs_p % W
        oh = (offs_p // W) % H
        b = offs_p // (W * H)
        u = _gather_sum(
            z0_ptr, z1_ptr, z2_ptr, z3_ptr,
            h0, w0, sh0, sw0, h1, w1, sh1, sw1, h2, w2, sh2, sw2, h3, w3, sh3, sw3,
            b, oh, ow, offs_d, mask, D, NUM_MAPS,
        )
        tl.store(part_scale_ptr + pid_p * D + offs_d, tl.sum(g * u, axis=0), mask=mask_d)


@triton.jit
def _src(o, scale):
    return scale * (o.to(tl.float32) + 0.5) - 0.5  # bilinear_tap's source index, before the clamp at 0


@triton.jit
def _reader_range(i, scale, n_in, n_out):
    # [lo, hi) (int32): the output indices whose taps read input index i with a nonzero weight:
    # src(o) in (i - 1, i + 1), and every o below for i = 0 and above for i = n_in - 1 (the clamped
    # borders). The closed forms o > (i - 0.5) / scale - 0.5 and o >= (i + 1.5) / scale - 0.5 are
    # rounded in fp32, so each bound is settled by evaluating src exactly as the forward does at the
    # three candidates around the estimate. Empty (lo >= hi) where no output reads i (downsampling).
    fi = i.to(tl.float32)
    e = tl.floor((fi - 0.5) / scale - 0.5).to(tl.int32)  # lo = e + 1 in exact arithmetic
    lo = e - 1 + (_src(e - 1, scale) <= fi - 1.0).to(tl.int32) + (_src(e, scale) <= fi - 1.0).to(tl.int32)
    lo += (_src(e + 1, scale) <= fi - 1.0).to(tl.int32)
    e = tl.floor((fi + 1.5) / scale - 0.5).to(tl.int32)  # hi = e or e + 1 in exact arithmetic
    hi = e - 1 + (_src(e - 1, scale) < fi + 1.0).to(tl.int32) + (_src(e, scale) < fi + 1.0).to(tl.int32)
    hi += (_src(e + 1, scale) < fi + 1.0).to(tl.int32)
    lo = tl.where(i == 0, 0, tl.minimum(tl.maximum(lo, 0), n_out))
    hi = tl.where(i == n_in - 1, n_out, tl.minimum(tl.maximum(hi, 0), n_out))
    return lo, hi


@triton.jit
def _pick(k, a0, a1, a2, a3, NUM_MAPS: tl.constexpr):
    # map k's value of a per-map scalar (k a runtime scalar < NUM_MAPS)
    v = a0
    if NUM_MAPS > 1:
        v = tl.where(k == 1, a1, v)
    if NUM_MAPS > 2:
        v = tl.where(k == 2, a2, v)
    if NUM_MAPS > 3:
        v = tl.where(k == 3, a3, v)
    return v


@triton.jit
def _upsample_sum_bwd_kernel(
    gz0_ptr, gz1_ptr, gz2_ptr, gz3_ptr, g_ptr, scale_ptr, sched_ptr,
    h0, w0, sh0, sw0, h1, w1, sh1, sw1, h2, w2, sh2, sw2, h3, w3, sh3, sw3,
    B, H, W, D,
    NUM_MAPS: tl.constexpr, HAS_SCALE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Adjoint of every map's upsampling in one launch: gz_k[b, ih, iw] = scale * sum_{oh, ow} wy(oh, ih)
    # wx(ow, iw) g[b, oh, ow] over the live taps only: oh in _reader_range(ih), ow in _reader_range(iw).
    # Program i does BLOCK_P input pixels (block sched[i, 1] of map sched[i, 0]); the schedule orders the
    # blocks of all maps by the gradient rows they read, so that the programs in flight read a band of
    # rows that stays in L2 and the gradient comes from DRAM about once for all the maps.
    k = tl.load(sched_ptr + 2 * tl.program_id(0))
    blk = tl.load(sched_ptr + 2 * tl.program_id(0) + 1)
    h = _pick(k, h0, h1, h2, h3, NUM_MAPS)
    w = _pick(k, w0, w1, w2, w3, NUM_MAPS)
    scale_h = _pick(k, sh0, sh1, sh2, sh3, NUM_MAPS)
    scale_w = _pick(k, sw0, sw1, sw2, sw3, NUM_MAPS)
    gz_ptr = _pick(k, gz0_ptr, gz1_ptr, gz2_ptr, gz3_ptr, NUM_MAPS)
    offs_p = blk.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_p = offs_p < B.to(tl.int64) * h * w
    mask_d = offs_d < D
    iw = (offs_p % w).to(tl.int32)
    ih = ((offs_p // w) % h).to(tl.int32)
    b = offs_p // (w * h)
    lo_h, hi_h = _reader_range(ih, scale_h, h, H)
    lo_w, hi_w = _reader_range(iw, scale_w, w, W)
    n_h = tl.where(mask_p, hi_h - lo_h, 0)  # <= 0: nothing reads the pixel (downsampling)
    n_w = tl.where(mask_p, hi_w - lo_w, 0)
    acc = tl.zeros((BLOCK_P, BLOCK_D), dtype=tl.float32)
    for r in range(0, tl.max(n_h, axis=0)):
        oh = lo_h + r
        live_h = r < n_h
        wy = bilinear_weight(oh, ih, scale_h, h, live_h)
        row = (b * H + oh) * W
        for c in range(0, tl.max(n_w, axis=0)):
            ow = lo_w + c
            live = live_h & (c < n_w)
            wt = wy * bilinear_weight(ow, iw, scale_w, w, live)
            g = tl.load(g_ptr + ((row + ow) * D)[:, None] + offs_d[None, :], mask=live[:, None] & mask_d[None, :],
                        other=0.0)
            acc += wt[:, None] * g.to(tl.float32)
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + offs_d, mask=mask_d, other=0.0)[None, :]
    tl.store(gz_ptr + offs_p[:, None] * D + offs_d[None, :], acc.to(gz_ptr.dtype.element_ty),
             mask=mask_p[:, None] & mask_d[None, :])


# kernels the model never launches: benchmarks/aot_compile.py leaves them out
DIAGNOSTIC_KERNELS = ("_reader_range_kernel",)  # reader_ranges(), which tests use to check the backward's ranges


@triton.jit
def _reader_range_kernel(lo_ptr, hi_ptr, n_in, n_out, scale, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    lo, hi = _reader_range(i, scale, n_in, n_out)
    tl.store(lo_ptr + i, lo, mask=i < n_in)
    tl.store(hi_ptr + i, hi, mask=i < n_in)


def reader_ranges(n_in: int, n_out: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The backward kernel's [lo, hi) per input index of an axis n_in upsampled to n_out: two (n_in,) int32.

    Example:
        >>> reader_ranges(2, 4)  # output 0 reads input 1 with weight 0: not a reader
        (tensor([0, 1], dtype=torch.int32), tensor([3, 4], dtype=torch.int32))
    """
    lo = empty(n_in, dtype=torch.int32, device=device)
    hi = empty(n_in, dtype=torch.int32, device=device)
    _reader_range_kernel[(triton.cdiv(n_in, 128),)](lo, hi, n_in, n_out, n_in / n_out, BLOCK=128)
    return lo, hi


def backward_schedule(B: int, sizes: tuple[tuple[int, int], ...], H: int, W: int, block_p: int) -> torch.Tensor:
    """The backward's program order: (programs, 2) int32 rows (map index, pixel block of that map).

    Every map's blocks of ``block_p`` input pixels (row-major over (b, ih, iw)), sorted by the
    gradient row their first pixel's taps are centred on, b * H + (ih + 0.5) H / h (ties: map, then
    block): the programs launched together read one band of gradient rows, whichever map they serve.

    Example:
        >>> backward_schedule(1, ((2, 2), (1, 1)), 2, 2, 2).tolist()  # map 1's one pixel reads rows 0-1
        [[0, 0], [1, 0], [0, 1]]
    """
    keys, rows = [], []
    for k, (h, w) in enumerate(sizes):
        blocks = torch.arange(-(-B * h * w // block_p), dtype=torch.int64)
        first = blocks * block_p
        b, ih = first // (h * w), (first // w) % h
        keys.append((b * H).double() + (ih.double() + 0.5) * (H / h))
        rows.append(torch.stack([torch.full_like(blocks, k), blocks], 1))
    order = torch.cat(keys).argsort(stable=True)  # stable: maps, then blocks, in order on equal keys
    return torch.cat(rows)[order].to(torch.int32)


_SCHEDULES: dict = {}


def _schedule(B: int, sizes: tuple, H: int, W: int, block_p: int, device: torch.device) -> torch.Tensor:
    # backward_schedule on the device, built and copied once per (shapes, device)
    key = (B, sizes, H, W, block_p, str(device))
    sched = _SCHEDULES.get(key)
    if sched is None:
        if len(_SCHEDULES) > 64:  # a few shapes per model; bound the cache for shape sweeps
            _SCHEDULES.clear()
        sched = _SCHEDULES[key] = backward_schedule(B, sizes, H, W, block_p).to(device)
    return sched


def _map_args(maps: list[torch.Tensor], H: int, W: int) -> list:
    # (h, w, scale_h, scale_w) per map, PyTorch's scale = in / out, padded to MAX_MAPS.
    args = []
    for i in range(MAX_MAPS):
        m = maps[min(i, len(maps) - 1)]
        h, w = m.shape[1], m.shape[2]
        args += [h, w, h / H, w / W]
    return args


def launch_config(D: int, gpu: bool) -> dict[str, int]:
    """Pixels (BLOCK_P) x channels (BLOCK_D) per program, for D channels; ``gpu``: see gpu_launch_config.

    On a GPU a tile holds about 4096 elements; the interpreter takes 128 pixels whatever D, so
    that it runs fewer (larger) programs.
    """
    block_d = min(128, triton.next_power_of_2(D))
    block_p = max(1, 4096 // block_d) if gpu else 128
    return {"BLOCK_P": block_p, "BLOCK_D": block_d}


def _num_warps(dtype: torch.dtype) -> int:
    # A 4096-element tile at 8 elements a thread (16-bit) or 16 (fp32, whose taps take twice the
    # registers): the 4 maps x 4 taps in flight fit in registers without spilling (ptxas, sm_80/sm_90).
    return 8 if dtype == torch.float32 else 16


def _blocks(D: int, t: torch.Tensor) -> tuple[int, int]:
    cfg = launch_config(D, gpu_launch_config(t))
    return cfg["BLOCK_P"], cfg["BLOCK_D"]


def upsample_sum_fwd_triton(
    maps: list[torch.Tensor], H: int, W: int, scale: torch.Tensor | None, shift: torch.Tensor | None, relu: bool
) -> torch.Tensor:
    """maps: 1..4 contiguous (B, h_i, w_i, D); scale/shift fp32 (D,) or None. Returns (B, H, W, D)."""
    check_interpreter_dtypes("upsample_sum", *maps)
    B, D = maps[0].shape[0], maps[0].shape[3]
    out = empty(B, H, W, D, dtype=maps[0].dtype, device=maps[0].device)
    n_pix = B * H * W
    block_p, block_d = _blocks(D, maps[0])
    zs = [maps[min(i, len(maps) - 1)] for i in range(MAX_MAPS)]
    grid = (triton.cdiv(n_pix, block_p), triton.cdiv(D, block_d))
    _upsample_sum_fwd_kernel[grid](
        out, *zs, scale if scale is not None else out, shift if shift is not None else out,
        *_map_args(maps, H, W), n_pix, H, W, D,
        NUM_MAPS=len(maps), HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, RELU=relu,
        BLOCK_P=block_p, BLOCK_D=block_d, num_warps=_num_warps(maps[0].dtype),
    )
    return out


def upsample_sum_bwd_triton(
    grad: torch.Tensor,
    sizes: list[tuple[int, int]],
    maps: list[torch.Tensor],
    out: torch.Tensor | None,
    scale: torch.Tensor | None,
    relu: bool,
    need_dscale: bool,
    need_dshift: bool,
) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
    """grad: contiguous (B, H, W, D); sizes: (h_i, w_i) per map; maps needed only for need_dscale,
    out (the forward output) only for relu. Returns (grads of the maps, dscale, dshift) in fp32."""
    check_interpreter_dtypes("upsample_sum", grad, *maps, out)
    B, H, W, D = grad.shape
    n_pix = B * H * W
    block_p, block_d = _blocks(D, grad)
    dscale = dshift = None
    gm = grad
    if relu or need_dscale or need_dshift:
        n_blocks = triton.cdiv(n_pix, block_p)
        if relu:
            gm = empty(B, H, W, D, dtype=grad.dtype, device=grad.device)
        part_shift = empty(n_blocks, D, dtype=torch.float32, device=grad.device) if need_dshift else grad
        part_scale = empty(n_blocks, D, dtype=torch.float32, device=grad.device) if need_dscale else grad
        zs = [maps[min(i, len(maps) - 1)] for i in range(MAX_MAPS)] if need_dscale else [grad] * MAX_MAPS
        shapes = maps if need_dscale else [torch.empty(0, h, w, 0) for h, w in sizes]
        # with dscale the prep pass also gathers u: in fp32 half the channels a program (the full tile spills 32 B
        # at sm_90, AOT report)
        prep_d = block_d // 2 if need_dscale and grad.dtype == torch.float32 and block_d >= 64 else block_d
        _upsample_sum_bwd_prep_kernel[(n_blocks, triton.cdiv(D, prep_d))](
            gm, part_shift, part_scale, grad, out if relu else grad,
            *zs, *_map_args(shapes, H, W), n_pix, H, W, D,
            NUM_MAPS=len(sizes), RELU=relu, NEED_DSCALE=need_dscale, NEED_DSHIFT=need_dshift,
            BLOCK_P=block_p, BLOCK_D=prep_d, num_warps=_num_warps(grad.dtype),
        )
        if need_dshift:
            dshift = part_shift.sum(0)
        if need_dscale:
            dscale = part_scale.sum(0)
    grads = [empty(B, h, w, D, dtype=grad.dtype, device=grad.device) for h, w in sizes]
    sched = _schedule(B, tuple(sizes), H, W, block_p, grad.device)
    _upsample_sum_bwd_kernel[(sched.shape[0], triton.cdiv(D, block_d))](
        *(grads[min(i, len(grads) - 1)] for i in range(MAX_MAPS)), gm, scale if scale is not None else grad, sched,
        *_map_args(grads, H, W), B, H, W, D,
        NUM_MAPS=len(sizes), HAS_SCALE=scale is not None, BLOCK_P=block_p, BLOCK_D=block_d,
        num_warps=_num_warps(grad.dtype),
    )
    return grads, dscale, dshift
