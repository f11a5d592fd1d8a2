"""Every Triton launcher, forward and backward, run in the interpreter with the GPU launch configuration.

On the CPU the launchers pick small interpreter block sizes; inside force_gpu_launch_config()
they pick the ones a GPU launch uses, so the tiles, masks and grids a GPU runs are checked here
against references on every CI run. Shapes are awkward on purpose: odd H and W, channel and class
counts that are not multiples of the block (and span more than one block), N and M that are not
multiples of the attention tiles, batch 1 and 2. Each test also checks, by watching the kernel
launches, that the GPU block sizes were really used.

Tolerance: err <= tol * max(1, max|ref|) against a reference in fp64 (fp32 where the op's own
reference computes in fp32), fed the same (rounded) inputs. fp16 storage with fp32 arithmetic
inside is held to the fp16 rounding of the outputs; the fp16 attention dots to a few fp16 ulps.
"""

import pytest
import torch
import torch.nn.functional as F

from segformer_fast.ops.triton_launch import force_gpu_launch_config
from segformer_fast.ops.dwconv3x3_gelu import dwconv3x3_gelu_reference
from segformer_fast.ops.upsample_cross_entropy import upsample_cross_entropy_reference
from segformer_fast.ops.upsample_sum import upsample_sum_reference
from segformer_fast.testing import interpreter_unavailable_reason

_REASON = interpreter_unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]


class _Spy:
    """Stands in for a kernel object: records every launch's grid and block sizes, then launches."""

    def __init__(self, kernel, launches):
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*args, **kwargs):
            self.launches.append({k: v for k, v in kwargs.items() if k.startswith("BLOCK_") or k == "ROWS"})
            return launch(*args, **kwargs)

        return run


def _spy(monkeypatch, module, *names):
    launches = {name: [] for name in names}
    for name in names:
        monkeypatch.setattr(module, name, _Spy(getattr(module, name), launches[name]))
    return launches


def _assert_close(name, got, ref, tol):
    ref = ref.double()
    err = (got.double() - ref).abs().max().item()
    bound = tol * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


# ---------------------------------------------------------------------------------------------
# sr_attention core: forward (online softmax, and O recomputed from a given lse), dQ and dK/dV

# (B, N, M, head dim, heads): N = 7*9 = 63 < BLOCK_N, M = 13 < BLOCK_M, M = 33 two key tiles.
ATTN_SHAPES = [(1, 63, 13, 32, 1), (2, 63, 33, 64, 2), (1, 63, 33, 32, 5)]
ATTN_TOL = {torch.float32: 5e-6, torch.float16: 2e-3}  # fp16: P rounded to fp16 for the P @ V dot


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "B{}_N{}_M{}_d{}_h{}".format(*s))
def test_sr_attention(monkeypatch, shape, dtype):
    from segformer_fast.ops.sr_attention import triton_kernels as tk

    b, n, m, d, heads = shape
    c = d * heads
    scale = d**-0.5
    q = torch.randn(b, n, c).to(dtype)
    kv = torch.randn(b, m, 2 * c).to(dtype)
    k, v = kv[..., :c], kv[..., c:]  # row stride 2C, as the op's fused K/V projection gives them
    do = torch.randn(b, n, c).to(dtype)
    launches = _spy(monkeypatch, tk, "_sr_attention_fwd_kernel", "_sr_attention_bwd_dkdv_kernel",
                    "_sr_attention_bwd_dq_kernel")
    with force_gpu_launch_config():
        o, lse = tk.sr_attention_fwd_triton(q, k, v, heads, scale)
        o_lse, _ = tk.sr_attention_fwd_triton(q, k, v, heads, scale, lse=lse)
        dq, dk, dv = tk.sr_attention_bwd_triton(do, q, k, v, o, lse, heads, scale)

    def split(t):  # (B, L, C) -> (B, h, L, d)
        return t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2)

    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    s = split(qd) @ split(kd).transpose(-1, -2) * scale  # (B, h, N, M)
    o_ref = (s.softmax(-1) @ split(vd)).transpose(1, 2).reshape(b, n, c)
    grads = torch.autograd.grad(o_ref, (qd, kd, vd), do.double())
    tol = ATTN_TOL[dtype]
    assert o.dtype == dq.dtype == dk.dtype == dv.dtype == dtype and lse.dtype == torch.float32
    _assert_close("lse", lse, torch.logsumexp(s, -1), tol)
    _assert_close("o", o, o_ref, tol)
    _assert_close("o from lse", o_lse, o_ref, tol)
    for name, got, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), grads):
        _assert_close(name, got, ref, tol)

    want = tk.launch_config("ieee" if dtype == torch.float32 else "tf32")  # the same on a GPU and in the interpreter
    assert tk.FWD_IEEE_TUNER.default.meta == tk.DQ_IEEE_TUNER.default.meta == tk.launch_config("ieee")
    assert tk.FWD_TUNER.default.meta == tk.DQ_TUNER.default.meta == tk.launch_config("tf32")
    for name, calls in launches.items():
        assert calls and all(c == {"BLOCK_N": want["BLOCK_N"], "BLOCK_M": want["BLOCK_M"]} for c in calls), name


# ---------------------------------------------------------------------------------------------
# dwconv3x3 + GELU: forward, and the backward's two passes (gz in the input dtype + weight/bias partials, then
# the forward kernel flipped on gz)

DW_SHAPES = [(1, 7, 9, 33), (2, 9, 7, 70)]  # (B, H, W, C): C = 70 spans two channel blocks of 64
DW_TOL = {torch.float32: 2e-6, torch.float16: 1.5e-3}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", DW_SHAPES, ids=lambda s: "B{}_{}x{}_C{}".format(*s))
def test_dwconv3x3_gelu(monkeypatch, shape, dtype):
    from segformer_fast.ops.dwconv3x3_gelu import triton_kernels as tk

    b, h, w, c = shape
    x = torch.randn(b, h * w, c).to(dtype)
    weight = (torch.randn(c, 1, 3, 3) * 0.5).to(dtype)
    bias = torch.randn(c).to(dtype)
    grad_y = torch.randn(b, h * w, c).to(dtype)
    launches = _spy(monkeypatch, tk, "_dwconv3x3_gelu_fwd_kernel", "_dwconv3x3_gelu_bwd_kernel")
    with force_gpu_launch_config():
        y = tk.dwconv3x3_gelu_fwd(x, (h, w), weight, bias)
        gx, gw, gb = tk.dwconv3x3_gelu_bwd(grad_y, x, (h, w), weight, bias)

    leaves = [t.detach().double().requires_grad_() for t in (x, weight, bias)]
    y_ref = dwconv3x3_gelu_reference(leaves[0], (h, w), leaves[1], leaves[2])
    g_ref = torch.autograd.grad(y_ref, leaves, grad_y.double())
    tol = DW_TOL[dtype]
    assert y.dtype == gx.dtype == gw.dtype == gb.dtype == dtype
    for name, got, ref in zip(("y", "grad_x", "grad_weight", "grad_bias"), (y, gx, gw, gb), (y_ref, *g_ref)):
        _assert_close(name, got, ref, tol)

    want = tk.launch_config(h, w, c)  # capped by the image; the same on a GPU and in the interpreter
    assert len(launches["_dwconv3x3_gelu_fwd_kernel"]) == 2 and len(launches["_dwconv3x3_gelu_bwd_kernel"]) == 1
    for name, calls in launches.items():
        assert all(call == want for call in calls), (name, calls, want)


# ---------------------------------------------------------------------------------------------
# upsample_sum: forward, the backward's prep pass (ReLU mask, scale, dscale/dshift partials), adjoint

# (B, (H, W), D, maps, affine + ReLU): D = 40 and 150 are not multiples of the channel block
# (64 and 128); 150 spans two. Maps ceil-halve from (H, W).
US_CASES = [(1, (7, 9), 40, 4, True), (2, (9, 7), 150, 2, True), (2, (7, 9), 40, 3, False)]
US_TOL = {torch.float32: 2e-6, torch.float16: 1.5e-3}


def _stage_sizes(hw, n):
    sizes = [hw]
    while len(sizes) < n:
        sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
    return sizes


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", US_CASES, ids=lambda s: "B{}_{}x{}_D{}_maps{}_affine{}".format(s[0], *s[1], *s[2:]))
def test_upsample_sum(monkeypatch, case, dtype):
    from segformer_fast.ops.upsample_sum import triton_kernels as tk

    b, (H, W), D, n_maps, affine = case
    sizes = _stage_sizes((H, W), n_maps)
    maps = [torch.randn(b, h, w, D).to(dtype) for h, w in sizes]  # (B, h, w, D)
    scale = torch.rand(D) + 0.5 if affine else None
    shift = torch.randn(D) * 0.5 if affine else None
    grad = torch.randn(b, H, W, D).to(dtype)
    launches = _spy(monkeypatch, tk, "_upsample_sum_fwd_kernel", "_upsample_sum_bwd_prep_kernel",
                    "_upsample_sum_bwd_kernel")
    with force_gpu_launch_config():
        out = tk.upsample_sum_fwd_triton(maps, H, W, scale, shift, affine)
        gmaps, dscale, dshift = tk.upsample_sum_bwd_triton(grad, sizes, maps, out, scale, affine, affine, affine)

    leaves = [m.detach().float().permute(0, 3, 1, 2).requires_grad_() for m in maps]  # (B, D, h, w)
    affine_leaves = [scale.clone().requires_grad_(), shift.clone().requires_grad_()] if affine else [None, None]
    ref = upsample_sum_reference(leaves, (H, W), *affine_leaves, affine).permute(0, 2, 3, 1)  # (B, H, W, D)
    inputs = leaves + (affine_leaves if affine else [])
    g_ref = torch.autograd.grad(ref, inputs, grad.float())
    tol = US_TOL[dtype]
    assert out.dtype == dtype and all(g.dtype == dtype for g in gmaps)
    _assert_close("out", out, ref, tol)
    for i, (got, r) in enumerate(zip(gmaps, g_ref)):
        _assert_close(f"grad map {i}", got, r.permute(0, 2, 3, 1), tol)
    if affine:
        _assert_close("dscale", dscale, g_ref[-2], 2e-6)
        _assert_close("dshift", dshift, g_ref[-1], 2e-6)
    else:
        assert dscale is None and dshift is None

    want, cpu = tk.launch_config(D, gpu=True), tk.launch_config(D, gpu=False)
    assert want != cpu  # the override changed the block sizes at this D
    assert len(launches["_upsample_sum_fwd_kernel"]) == 1 and len(launches["_upsample_sum_bwd_kernel"]) == 1
    assert len(launches["_upsample_sum_bwd_prep_kernel"]) == int(affine)
    for name, calls in launches.items():
        # the prep pass gathering u for dscale runs half the channels a program in fp32 (no spills at sm_90)
        halve = name == "_upsample_sum_bwd_prep_kernel" and dtype == torch.float32 and want["BLOCK_D"] >= 64
        expect = dict(want, BLOCK_D=want["BLOCK_D"] // 2) if halve else want
        assert all(call == expect for call in calls), (name, calls, expect)


# ---------------------------------------------------------------------------------------------
# upsample_cross_entropy: forward (online logsumexp over class blocks) and the gather-adjoint backward

# (B, K, h, w, H, W): K = 5 (one class block of 8) and 70 (two of 64); odd upsampling, and labels
# smaller than the logits.
UCE_SHAPES = [(1, 5, 7, 9, 27, 35), (2, 70, 3, 4, 5, 9)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", UCE_SHAPES, ids=lambda s: "B{}_K{}_{}x{}_to_{}x{}".format(*s))
def test_upsample_cross_entropy(monkeypatch, shape, dtype):
    from segformer_fast.ops.upsample_cross_entropy import triton_kernels as tk

    b, K, h, w, H, W = shape
    x = (torch.randn(b, h, w, K) * 3).to(dtype)  # (B, h, w, K)
    labels = torch.randint(0, K, (b, H, W))
    labels[torch.rand(b, H, W) < 0.2] = 255
    coef = torch.rand(b, H, W) * (labels != 255)  # d loss / d nll per pixel
    launches = _spy(monkeypatch, tk, "_upsample_cross_entropy_fwd_kernel", "_upsample_cross_entropy_bwd_kernel")
    with force_gpu_launch_config():
        nll, lse = tk.upsample_cross_entropy_fwd_triton(x, labels, 255)
        gx = tk.upsample_cross_entropy_bwd_triton(coef, x, labels, lse)

    logits = x.detach().float().permute(0, 3, 1, 2).requires_grad_()  # (B, K, h, w)
    nll_ref = upsample_cross_entropy_reference(logits, labels, 255, reduction="none")  # (B, H, W)
    up = F.interpolate(logits.detach().double(), size=(H, W), mode="bilinear", align_corners=False)
    (g_ref,) = torch.autograd.grad((nll_ref * coef).sum(), logits)
    assert nll.dtype == lse.dtype == gx.dtype == torch.float32
    _assert_close("nll", nll, nll_ref, 2e-6)  # fp16 logits are only loaded: fp32 arithmetic inside
    _assert_close("lse", lse, torch.logsumexp(up, 1), 2e-6)
    _assert_close("grad", gx, g_ref.permute(0, 2, 3, 1), 2e-6)

    want, cpu = tk.launch_config(K, gpu=True), tk.launch_config(K, gpu=False)
    assert want != cpu
    want_bwd = {k: v for k, v in tk.bwd_launch_config(K, w, W, gpu=True).items() if k.startswith("BLOCK_") or k == "ROWS"}
    assert want_bwd != tk.bwd_launch_config(K, w, W, gpu=False)
    for name, calls in launches.items():
        expected = want_bwd if name == "_upsample_cross_entropy_bwd_kernel" else want
        assert len(calls) == 1 and calls[0] == expected, (name, calls, expected)
