"""segformer_fast.ops.sr_attention against the eager oracle (Conv2d + LayerNorm + explicit softmax).

Tolerance: the fast paths run in fp32 and are compared with the oracle run in fp64, so the error
measured is the fast path's own. Every output and gradient must satisfy
    max|fast - ref| <= 1e-5 * max(1, max|ref|)
(fp32 has a 6e-8 unit roundoff; the weight gradients sum over B*N tokens, so an absolute 1e-5 on
order-one values, relative on larger ones). Some true gradients are exactly zero (the key bias:
softmax is shift-invariant; q and k when M = 1), hence the floor of 1 rather than a pure rtol.
"""

import pytest
import torch

from segformer_fast.backends import available_backends
from segformer_fast.testing import backend_device
from segformer_fast.nn.attention import SpatialReductionAttention
from segformer_fast.ops import sr_attention, sr_attention_reference
from segformer_fast.ops.sr_attention import op as sr_op

TOL = 1e-5


def weights(m: SpatialReductionAttention) -> dict:
    w = dict(q_weight=m.q.weight, q_bias=m.q.bias, k_weight=m.k.weight, k_bias=m.k.bias, v_weight=m.v.weight,
             v_bias=m.v.bias, proj_weight=m.proj.weight, proj_bias=m.proj.bias, sr=m.sr_ratio)
    if m.sr_ratio > 1:
        w.update(sr_weight=m.sr.weight, sr_bias=m.sr.bias, norm_weight=m.sr_norm.weight, norm_bias=m.sr_norm.bias,
                 eps=m.sr_norm.eps)
    return w


def make(c, heads, sr, qkv_bias=True, device="cpu"):
    m = SpatialReductionAttention(c, heads, sr, qkv_bias=qkv_bias).to(device)
    with torch.no_grad():  # non-trivial LayerNorm affine, so its gradients are checked for real
        if sr > 1:
            m.sr_norm.weight.normal_(1.0, 0.2)
            m.sr_norm.bias.normal_(0.0, 0.2)
    return m


def assert_close(name, got, ref):
    err = (got.double() - ref).abs().max().item()
    bound = TOL * max(1.0, ref.abs().max().item())
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g}"


def check(backend, b, h, w, c, heads, sr, qkv_bias=True, device="cpu"):
    m = make(c, heads, sr, qkv_bias, device)
    params = list(m.parameters())
    x = torch.randn(b, h * w, c, device=device, requires_grad=True)
    y = sr_attention(x, (h, w), heads, **weights(m), backend=backend)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x] + params, g)

    md = make(c, heads, sr, qkv_bias, device).double()
    md.load_state_dict(m.state_dict())
    xd = x.detach().double().requires_grad_()
    yr = sr_attention_reference(xd, (h, w), heads, **weights(md))
    refs = torch.autograd.grad(yr, [xd] + list(md.parameters()), g.double())
    names = ["x"] + [n for n, _ in m.named_parameters()]
    assert len(names) == len(grads) == len(refs) == (13 if sr > 1 else 9) - (0 if qkv_bias else 3)
    assert_close("out", y, yr)
    for n, a, r in zip(names, grads, refs):
        assert_close(f"d{n}", a, r)


def _skip_unless(backend):
    status = available_backends()[backend]  # "cuda" without a GPU: the CPU stand-in (tests/conftest.py)
    if not status.available:
        pytest.skip(status.reason)
    return backend_device(backend)


# (B, H, W, C, heads, sr): head dims 32/64 (Triton), odd N and M, M = 1, heads 1, 2, 5, 8.
SHAPES = [
    (2, 9, 13, 32, 1, 8),  # M = 1*1: B0 stage 1 (sr 8), the reduction floors 9x13 -> 1x1
    (1, 9, 13, 64, 2, 4),  # M = 2*3, head dim 32
    (3, 7, 9, 64, 1, 2),  # M = 3*4, head dim 64, batch 3
    (1, 9, 13, 160, 5, 2),  # heads 5 (B0 stage 3)
    (1, 7, 9, 256, 8, 1),  # heads 8, sr 1: plain attention, N = M = 63
]


@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_{}x{}_C{}_h{}_sr{}".format(*s))
def test_matches_reference(backend, shape):
    device = _skip_unless(backend)
    check(backend, *shape, device=device)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_qkv_bias_and_other_head_dim(backend):
    device = _skip_unless(backend)
    check(backend, 2, 5, 7, 64, 2, 2, qkv_bias=False, device=device)
    check(backend, 1, 5, 7, 48, 2, 2, device=device)  # head dim 24: the triton path falls back to the torch core


def test_chunked_core_matches_flash(monkeypatch):
    """The torch core used off the CPU (query chunks, bounded score tiles), forced into several chunks."""
    monkeypatch.setattr(sr_op, "_CHUNK_ELEMS", 2 * 13 * 2)  # 2 rows per chunk for (B*h = 2, M = 13)
    q, k, v = torch.randn(1, 11, 64), torch.randn(1, 13, 64), torch.randn(1, 13, 64)
    o, lse = sr_op._chunked_core_fwd(q, k, v, 2, 0.125)
    o_ref, lse_ref = sr_op._torch_core_fwd(q, k, v, 2, 0.125)
    torch.testing.assert_close(o, o_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, lse_ref, atol=1e-6, rtol=1e-5)
    do = torch.randn_like(o)
    got = sr_op._chunked_core_bwd(do, q, k, v, o, lse, 2, 0.125)
    ref = sr_op._torch_core_bwd(do, q, k, v, o_ref, lse_ref, 2, 0.125)
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, atol=1e-6, rtol=1e-5)


def _args(sr=2, c=64, heads=2, h=5, w=7, b=2):
    m = make(c, heads, sr)
    return m, torch.randn(b, h * w, c), weights(m)


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: a.update(x=torch.randn(2, 35)), ValueError, r"\(B, N, C\)"),
        (lambda a: a.update(x=torch.randint(0, 3, (2, 35, 64))), TypeError, "floating"),
        (lambda a: a.update(x=[1.0]), TypeError, "tensor"),
        (lambda a: a.update(hw=(5, 8)), ValueError, "does not match N=35"),
        (lambda a: a.update(hw=(5.0, 7)), TypeError, "pair of ints"),
        (lambda a: a.update(num_heads=3), ValueError, "divisible"),
        (lambda a: a.update(sr=8), ValueError, "smaller than one 8x8"),
        (lambda a: a.update(sr=0), ValueError, "sr must be >= 1"),
        (lambda a: a.update(q_weight=torch.randn(64, 32)), ValueError, r"q_weight must have shape \(64, 64\)"),
        (lambda a: a.update(sr_weight=torch.randn(64, 64, 3, 3)), ValueError, "sr_weight must have shape"),
        (lambda a: a.update(norm_weight=None), ValueError, "norm_weight is required"),
        (lambda a: a.update(k_bias=torch.zeros(64, dtype=torch.float64)), TypeError, "k_bias is torch.float64"),
        (lambda a: a.update(backend="nope"), ValueError, "unknown backend"),
    ],
)
def test_bad_input(mutate, exc, match):
    _, x, w = _args()
    a = dict(x=x, hw=(5, 7), num_heads=2, backend="torch", **w)
    mutate(a)
    with pytest.raises(exc, match=match):
        sr_attention(a.pop("x"), a.pop("hw"), a.pop("num_heads"), **a)


def _op_args(sr, backend, b=2, c=64, heads=2, h=5, w=7, grad=True):
    dev = backend_device(backend)
    m = make(c, heads, sr).to(dev)
    x = torch.randn(b, h * w, c, device=dev, requires_grad=grad)
    wt = weights(m)
    ws = [wt.get(k) if sr > 1 or not k.startswith(("sr_", "norm_")) else None for k in sr_op._WEIGHT_NAMES]
    if not grad:
        ws = [None if t is None else t.detach() for t in ws]
    return (x, h, w, heads, sr, *ws, 1e-5, backend)


@pytest.mark.parametrize("sr", [1, 2])
def test_opcheck(sr):
    torch.library.opcheck(torch.ops.segformer_fast.sr_attention.default, _op_args(sr, "torch"))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_opcheck_fused(backend):
    _skip_unless(backend)
    torch.library.opcheck(torch.ops.segformer_fast.sr_attention.default, _op_args(2, backend, b=1, h=3, w=5),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_torch_compile_fullgraph():
    m = make(64, 2, 2)
    w = weights(m)

    def f(x):
        return sr_attention(x, (5, 7), 2, **w, backend="torch").square().sum()

    x = torch.randn(2, 35, 64, requires_grad=True)
    compiled = torch.compile(f, fullgraph=True)  # inductor: the custom op stays opaque, the rest is compiled
    loss = compiled(x)
    (gx,) = torch.autograd.grad(loss, x)
    x2 = x.detach().requires_grad_()
    loss_ref = f(x2)
    (gx_ref,) = torch.autograd.grad(loss_ref, x2)
    torch.testing.assert_close(loss, loss_ref)
    torch.testing.assert_close(gx, gx_ref)


def test_cpp_is_a_declared_implementation():
    """backend="cpp" runs the torch implementation on the CPU (ATen's C++ flash attention), as its spec
    declares and explain() shows; it is no hidden mapping, and it does not run on other devices."""
    from segformer_fast import explain
    from segformer_fast.backends import available_backends

    if not available_backends()["cpp"].available:
        pytest.skip(available_backends()["cpp"].reason)
    _, x, w = _args()
    y = sr_attention(x, (5, 7), 2, **w, backend="cpp")
    torch.testing.assert_close(y, sr_attention(x, (5, 7), 2, **w, backend="torch"), rtol=0, atol=0)
    rows = {b: (runs, why) for _, _, b, runs, why in explain("sr_attention", x, backend="cpp").rows()}
    assert rows["cpp"][0] and not rows["torch"][0]
    assert "ATen" in sr_op.SPEC.impls["cpp"].note



@pytest.mark.parametrize("backend", ["torch", "triton", "cpp", "auto"])
@pytest.mark.parametrize("sr", [1, 2])
def test_fp64_is_computed_in_fp64(backend, sr):
    """fp64 in: output and every gradient within ~1e-12 of the fp64 reference (not fp32 arithmetic)."""
    _skip_unless("triton" if backend == "triton" else "torch")
    m = make(64, 2, sr).double()
    x = torch.randn(2, 5 * 7, 64, dtype=torch.float64, requires_grad=True)
    y = sr_attention(x, (5, 7), 2, **weights(m), backend=backend)
    assert y.dtype == torch.float64
    g = torch.randn_like(y)
    params = [x] + list(m.parameters())
    grads = torch.autograd.grad(y, params, g)
    yr = sr_attention_reference(x, (5, 7), 2, **weights(m))
    refs = torch.autograd.grad(yr, params, g)
    for name, a, r in zip(["out", "x"] + [n for n, _ in m.named_parameters()], [y, *grads], [yr, *refs]):
        err = (a - r).abs().max().item()
        assert err <= 1e-12 * max(1.0, r.abs().max().item()), f"{name}: {err:.3g}"


def test_fp64_on_the_cuda_backend_is_a_clear_error(cuda_standin):
    dev = backend_device("cuda")
    m = make(64, 2, 2, device=dev).double()
    x = torch.randn(1, 16, 64, dtype=torch.float64, device=dev)
    with pytest.raises(TypeError, match="float64.*float32, float16, bfloat16"):
        sr_attention(x, (4, 4), 2, **weights(m), backend="cuda")
