"""dwconv3x3_gelu: every implementation against the fp64 reference, forward and all gradients.

Tolerances: fp32 outputs and grad_x within atol 1e-5 (+ rtol 1e-5); weight and bias gradients
are sums over B*H*W positions, so their atol is 1e-5 times the gradient's largest entry. Low
precision per STYLE.md: err(fast, ref) <= 2 * err(PyTorch in that dtype, ref) + atol.
"""

import pytest
import torch
import torch.nn.functional as F

from segformer_fast.backends import available_backends, cpu_extension
from segformer_fast.testing import backend_device, cuda_backend_unavailable_reason
from segformer_fast.ops import dwconv3x3_gelu
from segformer_fast.ops.dwconv3x3_gelu import dwconv3x3_gelu_reference


def _cpp_skip_reason():
    status = available_backends()["cpp"]
    if not status.available:
        return f"cpp backend not built: {status.reason}"
    if not hasattr(cpu_extension(), "dwconv3x3_gelu_fwd"):
        return "segformer_fast._C_cpu was built without dwconv3x3_gelu; rebuild with pip install --no-build-isolation -e ."
    return None


def _cuda_skip_reason():
    return cuda_backend_unavailable_reason("dwconv3x3_gelu_fwd")  # no GPU: the CPU stand-in (tests/conftest.py)


def _triton_skip_reason():
    status = available_backends()["triton"]
    return None if status.available else f"triton backend unavailable: {status.reason}"


def _param(name, reason):
    return pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=reason or ""), id=name)


TRITON = _param("triton", _triton_skip_reason())
CPP = _param("cpp", _cpp_skip_reason())
CUDA = _param("cuda", _cuda_skip_reason())
ALL_BACKENDS = [_param("torch", None), TRITON, CPP, CUDA]
FAST_BACKENDS = [_param("torch", None), CPP, CUDA]  # fast enough for big shapes (no interpreter)

# (B, H, W, C): H and W over {1, 2, 7, 9}, C not a multiple of any block, batch 1 and 3.
SMALL_SHAPES = [
    (1, 1, 1, 5),
    (3, 1, 2, 33),
    (1, 2, 1, 33),
    (3, 2, 2, 5),
    (1, 1, 9, 5),
    (3, 9, 1, 5),
    (1, 7, 9, 33),
    (3, 9, 7, 5),
    (1, 9, 9, 33),
    (3, 7, 2, 5),
    (1, 2, 7, 70),  # several channel blocks (Triton's BLOCK_C is at most 64)
    (1, 3, 19, 5),  # several column blocks
]
LARGE_SHAPES = [(3, 65, 97, 5), (1, 65, 9, 33), (1, 9, 65, 70)]


def _device(backend):
    return backend_device(backend)


def _inputs(b, h, w, c, device="cpu"):
    """fp64 inputs on the CPU (the oracle's) and fp32 leaf copies on ``device``."""
    x = torch.randn(b, h * w, c, dtype=torch.float64)
    weight = torch.randn(c, 1, 3, 3, dtype=torch.float64) * 0.5
    bias = torch.randn(c, dtype=torch.float64) * 0.5
    ref = [t.clone().requires_grad_() for t in (x, weight, bias)]
    fast = [t.to(device=device, dtype=torch.float32).requires_grad_() for t in (x, weight, bias)]
    return ref, fast


def _reference_grads(ref, hw, approximate, grad_y):
    x, weight, bias = ref
    y = dwconv3x3_gelu_reference(x, hw, weight, bias, approximate)
    grads = torch.autograd.grad(y, (x, weight, bias), grad_y)
    return y.detach(), grads


def _assert_close_fp32(actual, expected, summed=False):
    expected = expected.to(actual.device, actual.dtype)
    atol = 1e-5 * max(1.0, expected.abs().max().item()) if summed else 1e-5
    torch.testing.assert_close(actual, expected, atol=atol, rtol=1e-5)


def _check_against_reference(backend, shape, approximate="none"):
    b, h, w, c = shape
    ref, fast = _inputs(b, h, w, c, _device(backend))
    grad_y = torch.randn(b, h * w, c, dtype=torch.float64)
    y_ref, (gx_ref, gw_ref, gb_ref) = _reference_grads(ref, (h, w), approximate, grad_y)

    y = dwconv3x3_gelu(*fast[:1], (h, w), *fast[1:], approximate=approximate, backend=backend)
    assert y.shape == (b, h * w, c) and y.dtype == torch.float32
    gx, gw, gb = torch.autograd.grad(y, fast, grad_y.to(y))
    _assert_close_fp32(y, y_ref)
    _assert_close_fp32(gx, gx_ref)
    _assert_close_fp32(gw, gw_ref, summed=True)
    _assert_close_fp32(gb, gb_ref, summed=True)


@pytest.mark.parametrize("shape", SMALL_SHAPES, ids=lambda s: "B{}_H{}_W{}_C{}".format(*s))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_matches_reference(backend, shape):
    _check_against_reference(backend, shape)


@pytest.mark.parametrize("shape", LARGE_SHAPES, ids=lambda s: "B{}_H{}_W{}_C{}".format(*s))
@pytest.mark.parametrize("backend", FAST_BACKENDS)
def test_matches_reference_large(backend, shape):
    _check_against_reference(backend, shape)


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("backend", [TRITON])
def test_every_autotuned_forward_tile_matches_reference(backend, index):
    # each declared forward tile, forced (the backward keeps its own): partial tiles along rows, columns and
    # channels (19 x 37 x 130 against 4-8 rows, 16-32 columns, 64-128 channels), both GELU forms
    from segformer_fast.ops.dwconv3x3_gelu.triton_kernels import FWD_TUNER

    with FWD_TUNER.forcing(FWD_TUNER.configs[index]):
        _check_against_reference(backend, (1, 19, 37, 130))
        _check_against_reference(backend, (2, 5, 3, 7), approximate="tanh")


@pytest.mark.parametrize("shape", [(3, 7, 9, 33), (1, 2, 1, 5)], ids=lambda s: "B{}_H{}_W{}_C{}".format(*s))
@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_tanh_matches_reference(backend, shape):
    _check_against_reference(backend, shape, approximate="tanh")


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("backend", [TRITON])
def test_triton_backward_two_passes_across_tile_seams(backend, approximate, monkeypatch):
    """grad_x by the tile borders needs gz from the neighbouring tiles: 3 x 2 row x column tiles (17 x 19
    at ROWS=8, BLOCK_W=16). The backward is two launches: the gz pass (gz stored once, in the input's
    dtype, plus the (tiles, 10, C) partials) and the forward kernel, flipped, on gz; the only per-element
    tensors are gz and grad_x."""
    from segformer_fast.ops.dwconv3x3_gelu import triton_kernels as tk

    launched = []

    class Spy:
        def __init__(self, name):
            self.name, self.kernel = name, getattr(tk, name)

        def __getitem__(self, grid):
            launched.append(self.name)
            return self.kernel[grid]

    for name in ("_dwconv3x3_gelu_fwd_kernel", "_dwconv3x3_gelu_bwd_kernel"):
        monkeypatch.setattr(tk, name, Spy(name))
    allocated = []
    empty = tk.empty
    monkeypatch.setattr(tk, "empty", lambda *shape, **kw: allocated.append(shape) or empty(*shape, **kw))
    b, h, w, c = 1, 17, 19, 5
    ref, (x, weight, bias) = _inputs(b, h, w, c)
    grad_y = torch.randn(b, h * w, c, dtype=torch.float64)
    _, (gx_ref, gw_ref, gb_ref) = _reference_grads(ref, (h, w), approximate, grad_y)
    gx, gw, gb = tk.dwconv3x3_gelu_bwd(grad_y.float(), x.detach(), (h, w), weight.detach(), bias.detach(), approximate)
    assert launched == ["_dwconv3x3_gelu_bwd_kernel", "_dwconv3x3_gelu_fwd_kernel"]
    assert allocated == [(b, h * w, c), (b, h * w, c), (6, 10, c)]  # grad_x, gz, the (tiles, 10, C) partial sums
    _assert_close_fp32(gx, gx_ref)
    _assert_close_fp32(gw, gw_ref, summed=True)
    _assert_close_fp32(gb, gb_ref, summed=True)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_non_contiguous_input(backend):
    b, h, w, c = 3, 7, 9, 33
    device = _device(backend)
    base = torch.randn(b, c, h * w, device=device, requires_grad=True)
    x = base.transpose(1, 2)  # (B, N, C) view with channel stride N
    assert not x.is_contiguous()
    weight = torch.randn(c, 1, 3, 3, device=device) * 0.5
    bias = torch.randn(c, device=device)
    y = dwconv3x3_gelu(x, (h, w), weight, bias, backend=backend)
    y_ref = dwconv3x3_gelu_reference(x.detach().double(), (h, w), weight.double(), bias.double())
    _assert_close_fp32(y, y_ref)
    grad_y = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, base, grad_y)
    x64 = base.detach().double().requires_grad_()
    y64 = dwconv3x3_gelu_reference(x64.transpose(1, 2), (h, w), weight.double(), bias.double())
    (g_ref,) = torch.autograd.grad(y64, x64, grad_y.double())
    _assert_close_fp32(g, g_ref)


def _lowp_torch(x, hw, weight, bias):
    """PyTorch's own composition in the input's dtype: the error a low-precision user already accepts."""
    b, n, c = x.shape
    z = F.conv2d(x.transpose(1, 2).reshape(b, c, *hw), weight, bias, padding=1, groups=c)
    return F.gelu(z).flatten(2).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("backend", [_param("torch", None), CPP, CUDA])
def test_low_precision(backend, dtype):
    b, h, w, c = 2, 7, 9, 33
    device = _device(backend)
    ref, _ = _inputs(b, h, w, c)
    grad_y = torch.randn(b, h * w, c, dtype=torch.float64)
    y_ref, g_ref = _reference_grads(ref, (h, w), "none", grad_y)

    def run(fn):
        leaves = [t.detach().to(device, dtype).requires_grad_() for t in ref]
        y = fn(leaves[0], (h, w), leaves[1], leaves[2])
        grads = torch.autograd.grad(y, leaves, grad_y.to(device, dtype))
        assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
        return [t.double().cpu() for t in (y, *grads)]

    fast = run(lambda x, hw, wt, bs: dwconv3x3_gelu(x, hw, wt, bs, backend=backend))
    lowp = run(_lowp_torch)
    for name, a, p, r in zip(("y", "grad_x", "grad_weight", "grad_bias"), fast, lowp, (y_ref, *g_ref)):
        scale = max(1.0, r.abs().max().item())
        err_fast, err_lowp = (a - r).abs().max().item(), (p - r).abs().max().item()
        assert err_fast <= 2 * err_lowp + 1e-3 * scale, f"{name}: fast {err_fast:.3g} vs PyTorch {dtype} {err_lowp:.3g}"


@pytest.mark.parametrize("backend", [TRITON])
def test_triton_fp16_storage(backend):
    # fp16 loads and stores through the interpreter (fp32 arithmetic inside); bf16 is left to GPU runs.
    b, h, w, c = 1, 7, 9, 5
    x = torch.randn(b, h * w, c).half()
    weight, bias = torch.randn(c, 1, 3, 3) * 0.5, torch.randn(c)
    dev = _device(backend)
    y = dwconv3x3_gelu(x.to(dev), (h, w), weight.to(dev), bias.to(dev), backend=backend).cpu()
    assert y.dtype == torch.float16
    y_ref = dwconv3x3_gelu_reference(x.double(), (h, w), weight.double(), bias.double())
    torch.testing.assert_close(y.double(), y_ref, atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("backend", [TRITON])
def test_triton_bf16_gz_meets_the_low_precision_rule(backend, approximate, monkeypatch):
    """The backward stores gz = grad_y * GELU'(z) in bf16 between its passes (PyTorch's bf16 reference keeps it
    in fp32): forward and every gradient must still meet the low-precision rule. The kernels have no tl.dot, so
    the interpreter's bf16 (refused by the launchers for tl.dot's sake) is exact enough to run them here."""
    from segformer_fast.ops.dwconv3x3_gelu import triton_kernels as tk
    from segformer_fast.testing.precision import assert_lowp_close

    monkeypatch.setattr(tk, "check_interpreter_dtypes", lambda *args: None)
    b, h, w, c = 3, 7, 9, 33
    torch.manual_seed(0)
    t64 = [torch.randn(b, h * w, c, dtype=torch.float64), torch.randn(c, 1, 3, 3, dtype=torch.float64) * 0.5,
           torch.randn(c, dtype=torch.float64) * 0.5]
    grad_y = torch.randn(b, h * w, c, dtype=torch.float64)

    def torch_run(dtype):
        leaves = [t.to(dtype).requires_grad_() for t in t64]
        y = dwconv3x3_gelu_reference(leaves[0], (h, w), leaves[1], leaves[2], approximate=approximate)
        return [y.detach(), *torch.autograd.grad(y, leaves, grad_y.to(dtype))]

    ref64, lowp = torch_run(torch.float64), torch_run(torch.bfloat16)
    x, weight, bias, gy = (t.to(torch.bfloat16) for t in (*t64, grad_y))
    dev = _device(backend)
    y = tk.dwconv3x3_gelu_fwd(x.to(dev), (h, w), weight.to(dev), bias.to(dev), approximate)
    grads = tk.dwconv3x3_gelu_bwd(gy.to(dev), x.to(dev), (h, w), weight.to(dev), bias.to(dev), approximate)
    for name, ours, p, r in zip(("y", "grad_x", "grad_weight", "grad_bias"), (y, *grads), lowp, ref64):
        assert ours.dtype == torch.bfloat16, name
        assert_lowp_close(ours.cpu(), p, r, atol=2.0**-8 * max(1.0, r.abs().max().item()), name=name)


@pytest.mark.parametrize("backend", [TRITON, CPP])
def test_weight_grad_deterministic(backend):
    b, h, w, c = 3, 9, 7, 33
    _, (x, weight, bias) = _inputs(b, h, w, c, _device(backend))
    grad_y = torch.randn(b, h * w, c, device=x.device)
    runs = []
    for threads in (1, 2):
        prev = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            y = dwconv3x3_gelu(x, (h, w), weight, bias, backend=backend)
            runs.append(torch.autograd.grad(y, (x, weight, bias), grad_y))
        finally:
            torch.set_num_threads(prev)
    for a, r in zip(*runs):
        assert torch.equal(a, r)


def test_auto_backend_matches_reference():
    b, h, w, c = 1, 7, 9, 5
    ref, fast = _inputs(b, h, w, c)
    y = dwconv3x3_gelu(fast[0], (h, w), fast[1], fast[2])  # backend="auto"
    _assert_close_fp32(y, dwconv3x3_gelu_reference(*ref[:1], (h, w), *ref[1:]).detach())


def _good(c=5, h=2, w=3, b=1):
    return torch.randn(b, h * w, c), (h, w), torch.randn(c, 1, 3, 3), torch.randn(c)


@pytest.mark.parametrize(
    "mutate, error, match",
    [
        (lambda x, hw, wt, bs: (x[0], hw, wt, bs), ValueError, r"\(B, N, C\).*\(6, 5\)"),
        (lambda x, hw, wt, bs: (x, (3, 3), wt, bs), ValueError, r"H \* W == N"),
        (lambda x, hw, wt, bs: (x, (2,), wt, bs), TypeError, "pair"),
        (lambda x, hw, wt, bs: (x, hw, wt[:4], bs), ValueError, r"weight must be \(C, 1, 3, 3\).*\(4, 1, 3, 3\)"),
        (lambda x, hw, wt, bs: (x, hw, wt.reshape(5, 9), bs), ValueError, "weight"),
        (lambda x, hw, wt, bs: (x, hw, wt, bs[:3]), ValueError, r"bias must be \(C,\).*\(3,\)"),
        (lambda x, hw, wt, bs: (x.double(), hw, wt, bs), TypeError, "float64"),
        (lambda x, hw, wt, bs: (x.to(torch.int32), hw, wt, bs), TypeError, "int32"),
        (lambda x, hw, wt, bs: (x.half(), hw, wt.half(), bs), TypeError, "share a dtype"),
        (lambda x, hw, wt, bs: (x, hw, wt.to("meta"), bs.to("meta")), ValueError, "one device"),
        (lambda x, hw, wt, bs: (x.numpy(), hw, wt, bs), TypeError, "torch.Tensor"),
    ],
    ids=["rank", "hw", "hw_len", "weight_c", "weight_rank", "bias", "fp64", "int", "mixed", "device", "not_tensor"],
)
def test_bad_inputs(mutate, error, match):
    with pytest.raises(error, match=match):
        dwconv3x3_gelu(*mutate(*_good()), backend="torch")


def test_bad_options():
    x, hw, wt, bs = _good()
    with pytest.raises(ValueError, match="approximate"):
        dwconv3x3_gelu(x, hw, wt, bs, approximate="sigmoid")
    with pytest.raises(ValueError, match="unknown backend"):
        dwconv3x3_gelu(x, hw, wt, bs, backend="opencl")
    # a CPU tensor with the CUDA backend: "not available" without the extension, "cannot run on cpu" with it
    with pytest.raises((RuntimeError, ValueError), match="'cuda'"):
        dwconv3x3_gelu(x, hw, wt, bs, backend="cuda")


@pytest.mark.parametrize("backend", [TRITON])
def test_triton_launcher_validates(backend):
    from segformer_fast.ops.dwconv3x3_gelu.triton_kernels import dwconv3x3_gelu_bwd, dwconv3x3_gelu_fwd

    x, hw, wt, bs = _good()
    with pytest.raises(ValueError, match=r"\(1, 6, 5\)"):
        dwconv3x3_gelu_fwd(x, (3, 3), wt, bs)
    with pytest.raises(ValueError, match="contiguous"):
        dwconv3x3_gelu_fwd(torch.randn(1, 5, 6).transpose(1, 2), hw, wt, bs)
    with pytest.raises(ValueError, match=r"\(1, 6, 4\)"):
        dwconv3x3_gelu_bwd(x[..., :4].contiguous(), x, hw, wt, bs)


@pytest.mark.parametrize("backend", [_param("torch", None), TRITON, CPP, CUDA])
def test_opcheck(backend):
    b, h, w, c = 2, 3, 5, 5
    dev = _device(backend)
    x = torch.randn(b, h * w, c, device=dev, requires_grad=True)
    weight = torch.randn(c, 1, 3, 3, device=dev, requires_grad=True)
    bias = torch.randn(c, device=dev, requires_grad=True)
    torch.library.opcheck(torch.ops.segformer_fast.dwconv3x3_gelu.default, (x, h, w, weight, bias, "none", backend))
    grad_y = torch.randn(b, h * w, c, device=dev)
    torch.library.opcheck(
        torch.ops.segformer_fast.dwconv3x3_gelu_backward.default,
        (grad_y, x.detach(), h, w, weight.detach(), bias.detach(), "tanh", backend),
    )


def test_torch_compile_fullgraph():
    backend = "cpp" if _cpp_skip_reason() is None else "torch"
    b, h, w, c = 2, 7, 9, 5
    ref, (x, weight, bias) = _inputs(b, h, w, c)

    def step(x, weight, bias):
        return dwconv3x3_gelu(x, (h, w), weight, bias, backend=backend).square().sum()

    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(x, weight, bias)
    grads = torch.autograd.grad(loss, (x, weight, bias))
    x64, w64, b64 = ref
    loss_ref = dwconv3x3_gelu_reference(x64, (h, w), w64, b64).square().sum()
    grads_ref = torch.autograd.grad(loss_ref, (x64, w64, b64))
    torch.testing.assert_close(loss.double(), loss_ref.detach(), atol=1e-4, rtol=1e-5)
    for g, r in zip(grads, grads_ref):
        _assert_close_fp32(g, r, summed=True)
