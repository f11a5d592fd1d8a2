"""upsample_sum: every implementation against the F.interpolate reference, forward and every gradient."""

import math

import pytest
import torch

from segformer_fast.backends import available_backends, cpu_extension
from segformer_fast.testing import backend_device
from segformer_fast.ops import upsample_sum
from segformer_fast.ops.math_utils import bilinear_taps
from segformer_fast.ops.upsample_sum import upsample_sum_bwd_nhwc, upsample_sum_nhwc, upsample_sum_reference

# 1/4 map sizes; the stage maps are ceil-halved from there (7x9 -> 4x5 -> 2x3 -> 1x2).
SHAPES = [(1, (7, 9)), (3, (17, 33))]
D = 20  # not a multiple of any block size


def stage_sizes(hw, n=4):
    sizes = [hw]
    for _ in range(n - 1):
        h, w = sizes[-1]
        sizes.append((math.ceil(h / 2), math.ceil(w / 2)))
    return sizes


def require(backend):
    status = available_backends()[backend]
    if not status.available:
        pytest.skip(f"{backend} backend unavailable: {status.reason}")
    if backend == "cpp" and not hasattr(cpu_extension(), "upsample_sum_fwd"):
        pytest.skip("segformer_fast._C_cpu was built without upsample_sum; rebuild with pip install --no-build-isolation -e .")
    return backend_device(backend)  # "cuda" without a GPU: the CPU stand-in (tests/conftest.py)


def make_inputs(B, hw, device, dtype=torch.float32, n=4, affine=True):
    maps = [
        torch.randn(B, h, w, D, device=device, dtype=dtype).permute(0, 3, 1, 2).requires_grad_()
        for h, w in stage_sizes(hw, n)
    ]
    scale = (torch.rand(D, device=device) + 0.5).requires_grad_() if affine else None
    shift = (torch.randn(D, device=device) * 0.5).requires_grad_() if affine else None
    return maps, scale, shift


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def check_against_reference(backend, B, hw, affine, relu, n=4, tol=1e-5):
    device = require(backend)
    maps, scale, shift = make_inputs(B, hw, device, n=n, affine=affine)
    ref = upsample_sum_reference(maps, hw, scale, shift, relu)
    out = upsample_sum(maps, hw, scale, shift, relu, backend=backend)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(out, ref) <= tol
    grad = torch.randn_like(ref)
    inputs = maps + ([scale, shift] if affine else [])
    g_ref = torch.autograd.grad(ref, inputs, grad)
    g_out = torch.autograd.grad(out, inputs, grad)
    for i, (a, b) in enumerate(zip(g_out, g_ref)):
        assert a.shape == b.shape
        assert rel_err(a, b) <= tol, f"gradient {i} ({tuple(b.shape)}) differs: {rel_err(a, b):.2e}"


@pytest.mark.parametrize("backend", ["torch", "triton", "cpp", "cuda"])
@pytest.mark.parametrize("B,hw", SHAPES)
@pytest.mark.parametrize("affine,relu", [(False, False), (True, True)])
def test_matches_reference(backend, B, hw, affine, relu):
    check_against_reference(backend, B, hw, affine, relu)


@pytest.mark.parametrize("backend", ["torch", "triton", "cpp", "cuda"])
def test_fewer_maps_and_affine_without_relu(backend):
    check_against_reference(backend, 2, (7, 9), affine=True, relu=False, n=2)


@pytest.mark.parametrize("backend", ["torch", "cpp", "cuda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(backend, dtype):
    # err(fast, ref_fp32) <= 2 * err(PyTorch in low precision, ref_fp32) + atol, output and map grads.
    device = require(backend)
    hw = (17, 33)
    maps32, scale, shift = make_inputs(3, hw, device, affine=True)
    scale, shift = scale.detach(), shift.detach()
    maps = [m.detach().to(dtype).requires_grad_() for m in maps32]
    ref_in = [m.detach().float().requires_grad_() for m in maps]
    ref = upsample_sum_reference(ref_in, hw, scale, shift, True)
    low_in = [m.detach().requires_grad_() for m in maps]
    low = torch.relu(
        sum(torch.nn.functional.interpolate(m, size=hw, mode="bilinear") for m in low_in) * scale.to(dtype).view(1, -1, 1, 1)
        + shift.to(dtype).view(1, -1, 1, 1)
    )
    out = upsample_sum(maps, hw, scale, shift, True, backend=backend)
    assert out.dtype == dtype

    def err(a, b):
        return (a.float() - b.float()).abs().max().item()

    assert err(out, ref) <= 2 * err(low, ref) + 1e-3 * ref.abs().max().item()
    grad = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, ref_in, grad)
    g_low = torch.autograd.grad(low, low_in, grad.to(dtype))
    g_out = torch.autograd.grad(out, maps, grad.to(dtype))
    for a, b, c in zip(g_out, g_ref, g_low):
        assert a.dtype == dtype
        assert err(a, b) <= 2 * err(c, b) + 1e-3 * b.abs().max().item()


def brute_force_ranges(n_in, n_out):
    # [lo, hi) per input index from every output index's taps with a nonzero weight (and a check that
    # the readers of each input index are contiguous, which the kernel's ranges assume)
    i0, i1, l1 = bilinear_taps(n_in, n_out, 0, n_out, "cpu")
    weight = torch.zeros(n_out, n_in)
    o = torch.arange(n_out)
    weight.index_put_((o, i0), 1.0 - l1, accumulate=True)
    weight.index_put_((o, i1), l1, accumulate=True)
    lo, hi = [], []
    for i in range(n_in):
        readers = (weight[:, i] != 0).nonzero().flatten().tolist()
        assert readers == list(range(readers[0], readers[-1] + 1)) if readers else True
        lo.append(readers[0] if readers else None)
        hi.append(readers[-1] + 1 if readers else None)
    return lo, hi


RANGE_SIZES = [1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 31, 32, 33, 64, 100, 128]


def test_reader_range_is_exact():
    """The Triton kernel's closed-form [lo, hi) is exactly the set of output indices with a nonzero
    weight, for up- and downsampling, integer and non-integer ratios, sizes 1 and odd."""
    require("triton")
    from segformer_fast.ops.upsample_sum.triton_kernels import reader_ranges

    for n_in in RANGE_SIZES:
        for n_out in RANGE_SIZES + [255, 256]:
            lo, hi = reader_ranges(n_in, n_out)
            want_lo, want_hi = brute_force_ranges(n_in, n_out)
            for i in range(n_in):
                if want_lo[i] is None:
                    assert lo[i] >= hi[i], (n_in, n_out, i)
                else:
                    assert (lo[i].item(), hi[i].item()) == (want_lo[i], want_hi[i]), (n_in, n_out, i)


ADJOINT_SIZES = [((1, 1), (5, 7)), ((1, 4), (3, 1)), ((4, 5), (7, 9)), ((7, 9), (7, 9)), ((2, 3), (17, 33)),
                 ((9, 13), (5, 4)), ((3, 7), (1, 2)), ((5, 3), (16, 12)), ((8, 8), (33, 31)), ((6, 11), (13, 13))]


@pytest.mark.parametrize("backend", ["triton", "cpp", "cuda"])
def test_adjoint_matches_torch_upsample_backward(backend):
    """The maps' gradient alone against ATen's upsample_bilinear2d backward in fp64: upsampling and
    downsampling, non-integer ratios, h = 1, odd sizes. A tap missed or added is an O(1) error."""
    device = require(backend)
    for (h, w), (H, W) in ADJOINT_SIZES:
        g = torch.randn(2, H, W, 3, dtype=torch.float64, device=device)
        want = torch.ops.aten.upsample_bilinear2d_backward(g.permute(0, 3, 1, 2), [H, W], [2, 3, h, w], False)
        got = upsample_sum_bwd_nhwc(g.float(), [(h, w)], backend=backend)[0]
        assert got.shape == (2, h, w, 3)
        assert rel_err(got.double(), want.permute(0, 2, 3, 1)) <= 2e-6, ((h, w), (H, W))


def test_nchw_input_accepted_and_equal():
    maps, scale, shift = make_inputs(2, (7, 9), "cpu")
    nchw = [m.detach().contiguous() for m in maps]
    assert not nchw[0].is_contiguous(memory_format=torch.channels_last)
    a = upsample_sum(nchw, (7, 9), scale, shift, True, backend="torch")
    b = upsample_sum([m.detach() for m in maps], (7, 9), scale, shift, True, backend="torch")
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["cpp"])
def test_backward_is_deterministic(backend):
    require(backend)
    maps, scale, shift = make_inputs(3, (17, 33), "cpu")
    out = upsample_sum(maps, (17, 33), scale, shift, True, backend=backend)
    grad = torch.randn_like(out)
    g1 = torch.autograd.grad(out, maps + [scale, shift], grad, retain_graph=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        g2 = torch.autograd.grad(out, maps + [scale, shift], grad)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def test_bad_inputs():
    m = torch.randn(2, 4, 3, 3)
    with pytest.raises(ValueError, match="list of 1 to 4"):
        upsample_sum([], (6, 6))
    with pytest.raises(ValueError, match="list of 1 to 4"):
        upsample_sum([m] * 5, (6, 6))
    with pytest.raises(ValueError, match=r"4-d tensor \(B, D, h, w\).*\(2, 4, 3\)"):
        upsample_sum([m, m[..., 0]], (6, 6))
    with pytest.raises(ValueError, match=r"share B and D.*\(2, 4, 3, 3\), \(2, 5, 3, 3\)"):
        upsample_sum([m, torch.randn(2, 5, 3, 3)], (6, 6))
    with pytest.raises(ValueError, match=r"share B and D.*\(3, 4, 3, 3\)"):
        upsample_sum([m, torch.randn(3, 4, 3, 3)], (6, 6))
    with pytest.raises(ValueError, match="float32.*float64"):
        upsample_sum([m, m.double()], (6, 6))
    with pytest.raises(ValueError, match="floating dtype"):
        upsample_sum([m.long()], (6, 6))
    with pytest.raises(ValueError, match="one device"):
        upsample_sum([m, m.to("meta")], (6, 6))
    with pytest.raises(ValueError, match=r"scale must be a floating \(4,\) tensor, got \(5,\)"):
        upsample_sum([m], (6, 6), scale=torch.ones(5))
    with pytest.raises(ValueError, match=r"shift must be a floating \(4,\) tensor"):
        upsample_sum([m], (6, 6), shift=torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"size must be \(H, W\)"):
        upsample_sum([m], (0, 6))
    with pytest.raises(ValueError, match="unknown backend"):
        upsample_sum([m], (6, 6), backend="nope")
    with pytest.raises(ValueError, match=r"\(B, h, w, D\)"):
        upsample_sum_nhwc([m[0]], (6, 6))


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton", "cuda"])
def test_opcheck(backend):
    dev = require(backend)
    maps = [torch.randn(2, h, w, 5, device=dev, requires_grad=True) for h, w in [(5, 6), (3, 3), (2, 2)]]
    scale = torch.rand(5, device=dev, requires_grad=True)
    shift = torch.randn(5, device=dev, requires_grad=True)
    torch.library.opcheck(torch.ops.segformer_fast.upsample_sum.default, (maps, 5, 6, scale, shift, True, backend))
    torch.library.opcheck(torch.ops.segformer_fast.upsample_sum.default, (maps[:1], 7, 9, None, None, False, backend))
    grad = torch.randn(2, 5, 6, 5, device=dev)
    out = torch.relu(torch.randn(2, 5, 6, 5, device=dev))
    args = (grad, [5, 6, 3, 3, 2, 2], [m.detach() for m in maps], out, scale.detach(), True, True, True, backend)
    torch.library.opcheck(torch.ops.segformer_fast.upsample_sum_backward.default, args)


def test_torch_compile_fullgraph_forward_backward():
    maps, scale, shift = make_inputs(2, (7, 9), "cpu")

    def f(ms, s, t):
        return upsample_sum(ms, (7, 9), s, t, relu=True, backend="auto").square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    inputs = maps + [scale, shift]
    g_eager = torch.autograd.grad(f(maps, scale, shift), inputs)
    loss = compiled(maps, scale, shift)
    assert torch.allclose(loss, f(maps, scale, shift), rtol=1e-5)
    g_comp = torch.autograd.grad(loss, inputs)
    for a, b in zip(g_comp, g_eager):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("relu", [False, True])
def test_fp64_is_computed_in_fp64(backend, relu):
    """fp64 maps: output and gradients within ~1e-12 of the fp64 reference (not fp32 arithmetic)."""
    maps = [torch.randn(2, 6, 5, 7, dtype=torch.float64, requires_grad=True),
            torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)]
    scale = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    shift = torch.randn(6, dtype=torch.float64, requires_grad=True)
    out = upsample_sum(maps, (9, 13), scale, shift, relu=relu, backend=backend)
    assert out.dtype == torch.float64
    ref = upsample_sum_reference(maps, (9, 13), scale, shift, relu=relu)
    g = torch.randn_like(ref)
    for a, r in zip([out, *torch.autograd.grad(out, [*maps, scale, shift], g)],
                    [ref, *torch.autograd.grad(ref, [*maps, scale, shift], g)]):
        assert a.dtype == torch.float64
        assert (a - r).abs().max().item() <= 1e-12 * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("backend", ["triton", "cpp", "cuda"])
def test_fp64_on_a_kernel_backend_is_a_clear_error(backend):
    require(backend)
    m = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="float64.*float32, float16, bfloat16"):
        upsample_sum([m], (6, 6), backend=backend)


@pytest.mark.parametrize("B,sizes,H,W,block_p", [
    (2, ((9, 7), (5, 4), (3, 2), (1, 1)), 9, 7, 4),
    (1, ((16, 16), (8, 8), (4, 4), (2, 2)), 16, 16, 32),
    (3, ((4, 6), (12, 5)), 8, 10, 128),  # a map larger than the output along one axis
])
def test_backward_schedule_runs_every_block_once_in_row_order(B, sizes, H, W, block_p):
    pytest.importorskip("triton")
    from segformer_fast.ops.upsample_sum.triton_kernels import backward_schedule

    sched = backward_schedule(B, sizes, H, W, block_p)
    assert sched.dtype == torch.int32 and sched.shape[1] == 2
    want = sorted((k, j) for k, (h, w) in enumerate(sizes) for j in range(-(-B * h * w // block_p)))
    assert sorted(map(tuple, sched.tolist())) == want  # a permutation of every map's blocks
    keys = []
    for k, j in sched.tolist():
        h, w = sizes[k]
        p = j * block_p
        keys.append(p // (h * w) * H + ((p // w) % h + 0.5) * H / h)
    assert keys == sorted(keys)  # the gradient rows read go down the images once
