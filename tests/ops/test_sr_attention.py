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


def check(backend, b, h, w, c, heads, sr, qkv_bias=True, device="cpu", save_output=True):
    m = make(c, heads, sr, qkv_bias, device)
    params = list(m.parameters())
    x = torch.randn(b, h * w, c, device=device, requires_grad=True)
    y = sr_attention(x, (h, w), heads, **weights(m), backend=backend, save_output=save_output)
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


@pytest.mark.parametrize("save_output", [True, False], ids=["save", "recompute"])
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_{}x{}_C{}_h{}_sr{}".format(*s))
def test_matches_reference(backend, shape, save_output):
    """Forward and every gradient, with the attention output kept for backward and recomputed there."""
    device = _skip_unless(backend)
    check(backend, *shape, device=device, save_output=save_output)


@pytest.mark.parametrize("save_output", [True, False])
def test_saved_tensors(save_output):
    """What autograd keeps for the activations: x, lse and, with save_output, o (B, N, C); no other activation."""
    m, x, w = _args(sr=2, b=2)
    x.requires_grad_()
    packed = []

    def pack(t):
        packed.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = sr_attention(x, (5, 7), 2, **w, backend="torch", save_output=save_output)
    activations = [t for t in packed if t.shape[:1] == (2,)]  # the weights are (C, ...) with C = 64
    shapes = sorted(tuple(t.shape) for t in activations)
    assert shapes == sorted([(2, 35, 64), (2, 2, 35)] + ([(2, 35, 64)] if save_output else []))
    y.sum().backward()  # the backward runs from what was kept
    assert x.grad is not None and torch.isfinite(x.grad).all()


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


def _op_args(sr, backend, b=2, c=64, heads=2, h=5, w=7, grad=True, save_output=True):
    dev = backend_device(backend)
    m = make(c, heads, sr).to(dev)
    x = torch.randn(b, h * w, c, device=dev, requires_grad=grad)
    wt = weights(m)
    ws = [wt.get(k) if sr > 1 or not k.startswith(("sr_", "norm_")) else None for k in sr_op._WEIGHT_NAMES]
    if not grad:
        ws = [None if t is None else t.detach() for t in ws]
    return (x, h, w, heads, sr, *ws, 1e-5, backend, save_output)


@pytest.mark.parametrize("save_output", [True, False])
@pytest.mark.parametrize("sr", [1, 2])
def test_opcheck(sr, save_output):
    torch.library.opcheck(torch.ops.segformer_fast.sr_attention.default, _op_args(sr, "torch", save_output=save_output))


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


# ---------------------------------------------------------------------------------------------
# the attention core alone: Triton's dot precision, Delta fused into the dQ kernel, dK/dV query splits


def _core_inputs(b, n, m, c, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(b, rows, c, generator=g, dtype=torch.float64) for rows in (n, m, m, n))
    return q, k, v, do


def _core_reference(q, k, v, do, heads, scale):
    """fp64 O, lse and dq, dk, dv by autograd through the explicit softmax (the oracle's formulation)."""
    qh, kh, vh = (sr_op._heads(t.detach().requires_grad_(), heads) for t in (q, k, v))
    s = (qh @ kh.transpose(-1, -2)) * scale  # (B, h, N, M)
    o = sr_op._tokens(s.softmax(-1) @ vh)
    grads = torch.autograd.grad(o, [qh, kh, vh], do)
    return o.detach(), torch.logsumexp(s, -1).detach(), [sr_op._tokens(t) for t in grads]


def _check_triton_core_bwd(b, h, w, m, c, heads, dtype, splits):
    from segformer_fast.ops.sr_attention.triton_kernels import sr_attention_bwd_triton

    n, scale = h * w, (c // heads) ** -0.5
    q, k, v, do = _core_inputs(b, n, m, c, dtype)
    o, lse, refs = _core_reference(q, k, v, do, heads, scale)
    low = [t.to(dtype) for t in (do, q, k, v, o)]
    got = sr_attention_bwd_triton(*low, lse.float(), heads, scale, splits=splits)
    if dtype == torch.float32:
        for name, a, r in zip(("dq", "dk", "dv"), got, refs):
            assert_close(name, a, r)
        return
    # fp16: within twice the error of the same gradients by PyTorch from the fp16-rounded inputs (chunked core,
    # fp32 arithmetic), plus the fp16 rounding of the result itself
    lows = sr_op._chunked_core_bwd(*(t.float() for t in low[:1] + low[1:]), lse.float(), heads, scale)
    for name, a, lo, r in zip(("dq", "dk", "dv"), got, lows, refs):
        err, err_torch = (a.double() - r).abs().max().item(), (lo.half().double() - r).abs().max().item()
        bound = 2 * err_torch + 1e-3 * max(1.0, r.abs().max().item())
        assert err <= bound, f"{name}: fp16 error {err:.3g} > {bound:.3g} (PyTorch's: {err_torch:.3g})"


# (B, H, W tokens, M keys, C, heads, splits): odd N; M not a multiple of BLOCK_K (32); splits that do not
# divide the query blocks; the default split count (None: 1 at these sizes) and one split per query block.
CORE_SHAPES = [
    (1, 7, 9, 13, 64, 2, None),  # N = 63 < one query block
    (3, 7, 9, 40, 32, 1, None),  # batch 3, M = 40: two key blocks, the second partial
    (1, 17, 18, 13, 64, 2, 3),  # N = 306: 5 query blocks in 3 splits of 2, 2, 1 (the last one partial)
    (2, 13, 17, 7, 64, 1, 4),  # N = 221: 4 query blocks, one per split
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", CORE_SHAPES, ids=lambda s: "B{}_{}x{}_M{}_C{}_h{}_splits{}".format(*s))
def test_triton_core_backward_matches_reference(dtype, shape):
    """dQ (with Delta computed in its kernel) and dK, dV (split over queries, partials summed) vs fp64 autograd."""
    _skip_unless("triton")
    _check_triton_core_bwd(*shape[:5], heads=shape[5], dtype=dtype, splits=shape[6])


@pytest.mark.parametrize("index", [0, 1, 2])
@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
def test_every_autotuned_tile_matches_reference(index, tf32):
    """Each declared configuration of the forward / O-recompute and dQ autotuners, forced, on awkward shapes
    (N = 221 and 63: partial query blocks of 32, 64 and 128; M = 40: a partial key block of 32 and 64): the
    exact-fp32 set ("ieee" dots, with the dK/dV kernel's 32-row tile) and the tensor-core set (TF32 here;
    the interpreter computes those dots exactly)."""
    _skip_unless("triton")
    from segformer_fast.ops.sr_attention import triton_kernels as tk

    before = torch.backends.cuda.matmul.allow_tf32  # a property of torch's cuBLAS module: set back by hand
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        _check_forced_tiles(tk, index, tf32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _check_forced_tiles(tk, index, tf32):
    fwd, dq = (tk.FWD_TUNER, tk.DQ_TUNER) if tf32 else (tk.FWD_IEEE_TUNER, tk.DQ_IEEE_TUNER)
    assert fwd.configs == dq.configs and len(fwd.configs) == 3
    cfg = fwd.configs[index]
    for b, n, m, c, heads in ((2, 221, 40, 64, 2), (1, 63, 13, 32, 1)):
        q, k, v, do = _core_inputs(b, n, m, c, torch.float32)
        scale = (c // heads) ** -0.5
        o, lse, refs = _core_reference(q, k, v, do, heads, scale)
        q32, k32, v32, do32 = (t.float() for t in (q, k, v, do))
        with fwd.forcing(cfg), dq.forcing(cfg):
            got_o, got_lse = tk.sr_attention_fwd_triton(q32, k32, v32, heads, scale)
            again, _ = tk.sr_attention_fwd_triton(q32, k32, v32, heads, scale, lse=got_lse)  # O from the saved lse
            grads = tk.sr_attention_bwd_triton(do32, q32, k32, v32, got_o, got_lse, heads, scale,
                                               splits=min(2, -(-n // tk.BLOCK_Q)))  # 2 splits where N allows
        assert_close("o", got_o, o)
        assert_close("lse", got_lse, lse)
        assert_close("o from lse", again, o)
        for name, a, r in zip(("dq", "dk", "dv"), grads, refs):
            assert_close(name, a, r)


def test_attention_autotuners_key_on_layer_shape_not_image_size(monkeypatch):
    """The tuners' keys (head dim, dot precision, O from lse) are the same for every token count."""
    _skip_unless("triton")
    from segformer_fast.ops.sr_attention import triton_kernels as tk

    keys = []
    for tuner in (tk.FWD_IEEE_TUNER, tk.DQ_IEEE_TUNER):  # fp32 without TF32: the exact-fp32 tiles
        def spy(t, launch, key=(), real=tuner.pick):
            keys.append(key)
            return real(t, launch, key)

        monkeypatch.setattr(tuner, "pick", spy)
    for n, m in ((63, 13), (221, 40)):
        q, k, v, do = (t.float() for t in _core_inputs(1, n, m, 64, torch.float32))
        o, lse = tk.sr_attention_fwd_triton(q, k, v, 2, 0.125)
        tk.sr_attention_bwd_triton(do, q, k, v, o, lse, 2, 0.125)
    assert keys[:2] == keys[2:] and keys[0] == (32, "ieee", False) and keys[1] == (32, "ieee")  # fp32, no TF32


def test_dkdv_split_count():
    from segformer_fast.ops.sr_attention.triton_kernels import BLOCK_Q, dkdv_splits, sr_attention_bwd_triton

    assert dkdv_splits(65536, 1024, 8, 132) == 3  # B2 stage 1, batch 8: 256 key-block CTAs -> 768
    assert dkdv_splits(16384, 1024, 16, 132) == 2  # stage 2: 512 -> 1024
    assert dkdv_splits(4096, 1024, 40, 132) == 1  # stage 3: 1280 CTAs fill 132 SMs 4 times over alone
    assert dkdv_splits(63, 13, 2, 132) == 1  # one query block: nothing to split
    assert dkdv_splits(5 * BLOCK_Q, 13, 1, 132) == 1  # 5 query blocks, at least 4 per split
    assert dkdv_splits(64 * 1000, 32, 1, 7) == 28  # few SMs: 28 CTAs wanted; 1000 blocks / 36 each -> 28 splits
    for n in (9 * BLOCK_Q, 10 * BLOCK_Q, 37 * BLOCK_Q + 5):  # never an empty split, nor more than the query blocks
        blocks = -(-n // BLOCK_Q)
        for sms in range(1, 40):
            got = dkdv_splits(n, 32, 1, sms)
            assert 1 <= got <= blocks and (got - 1) * -(-blocks // got) < blocks, (n, sms, got)
    q = torch.randn(1, 63, 64)
    with pytest.raises(ValueError, match=r"splits=2 must be in \[1, 1\]"):
        sr_attention_bwd_triton(q, q, q[:, :5], q[:, :5], q, torch.zeros(1, 1, 63), 1, 0.125, splits=2)


def test_dot_precision_follows_allow_tf32(monkeypatch):
    """fp32 dots are TF32 exactly when torch.backends.cuda.matmul.allow_tf32 is set, read at each call, and
    the launchers pass that to the kernels (the interpreter computes "tf32" dots exactly, so the choice is
    checked here and the numbers by the correctness tests)."""
    from segformer_fast.ops.sr_attention import triton_kernels as tk

    _skip_unless("triton")
    seen = []

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append(kw["PRECISION"])
                return self.kernel[grid](*args, **kw)
            return launch

    for name in ("_sr_attention_fwd_kernel", "_sr_attention_bwd_dq_kernel", "_sr_attention_bwd_dkdv_kernel"):
        monkeypatch.setattr(tk, name, Spy(getattr(tk, name)))
    q, k = torch.randn(1, 5, 32), torch.randn(1, 3, 32)
    before = torch.backends.cuda.matmul.allow_tf32  # a property of torch's cuBLAS module: set back by hand
    try:
        for flag, fp32 in ((False, "ieee"), (True, "tf32")):
            torch.backends.cuda.matmul.allow_tf32 = flag
            assert tk.dot_precision(torch.float32) == fp32
            assert tk.dot_precision(torch.float16) == tk.dot_precision(torch.bfloat16) == "tf32"
            seen.clear()
            o, lse = tk.sr_attention_fwd_triton(q, k, k, 1, 0.2)
            tk.sr_attention_bwd_triton(q, q, k, k, o, lse, 1, 0.2)
            assert seen == [fp32] * 3, (flag, seen)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


# ---------------------------------------------------------------------------------------------
# the ATen core (CUDA flash / memory-efficient attention). No GPU here: the glue (head layouts, the
# lse layouts, the argument order, the flash-or-efficient choice) runs against CPU stand-ins that
# take the real ops' signatures and compute with ATen's CPU flash attention, emulating the CUDA
# ops' outputs (efficient attention's lse padded to a multiple of 32). What the CUDA kernels
# themselves compute, and whether they accept these strides, is not covered here.


class _AtenOnCpu:
    """CPU stand-ins for the four CUDA ops, with their schemas' Python signatures; records the calls."""

    def __init__(self):
        self.calls = []

    def _scaled_dot_product_flash_attention(self, query, key, value, dropout_p=0.0, is_causal=False,
                                            return_debug_mask=False, *, scale=None):
        assert dropout_p == 0.0 and not is_causal and not return_debug_mask and query.dtype != torch.float32
        self.calls.append("flash")
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, scale=scale)
        return o, lse, None, None, query.shape[2], key.shape[2], torch.zeros(()), torch.zeros(()), None

    def _scaled_dot_product_flash_attention_backward(self, grad_out, query, key, value, out, logsumexp, cum_seq_q,
                                                     cum_seq_k, max_q, max_k, dropout_p, is_causal, philox_seed,
                                                     philox_offset, *, scale=None):
        assert cum_seq_q is None and cum_seq_k is None and (max_q, max_k) == (query.shape[2], key.shape[2])
        assert logsumexp.shape == query.shape[:3] and logsumexp.dtype == torch.float32
        self.calls.append("flash_backward")
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, scale=scale)

    def _scaled_dot_product_efficient_attention(self, query, key, value, attn_bias, compute_log_sumexp,
                                                dropout_p=0.0, is_causal=False, *, scale=None):
        assert attn_bias is None and compute_log_sumexp and dropout_p == 0.0 and not is_causal
        self.calls.append("efficient")
        o, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, scale=scale)
        b, h, n = lse.shape
        pad = torch.full((b, h, -(-n // 32) * 32), float("inf"))
        pad[..., :n] = lse
        return o, pad, torch.zeros(()), torch.zeros(())

    def _scaled_dot_product_efficient_attention_backward(self, grad_out_, query, key, value, attn_bias, out,
                                                         logsumexp, philox_seed, philox_offset, dropout_p,
                                                         grad_input_mask, is_causal=False, *, scale=None):
        n = query.shape[2]
        assert attn_bias is None and list(grad_input_mask) == [True, True, True, False]
        assert logsumexp.shape[-1] % 32 == 0 and logsumexp.shape[-1] >= n and torch.isinf(logsumexp[..., n:]).all()
        self.calls.append("efficient_backward")
        return (*torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out_, query, key, value, out, logsumexp[..., :n].contiguous(), dropout_p, is_causal, scale=scale),
            None)


@pytest.fixture
def aten_on_cpu(monkeypatch):
    fake = _AtenOnCpu()
    monkeypatch.setattr(sr_op, "_aten", fake)
    monkeypatch.setattr(sr_op, "_gpu_capability", lambda device: (9, 0))
    return fake


def test_aten_stand_ins_have_the_real_signatures():
    """The stand-ins take the argument names of this torch's ops, which are the ones the glue passes."""
    import inspect

    for op in sr_op._ATEN_ARGS:
        assert sr_op._aten_schema_error(op) is None, sr_op._aten_schema_error(op)
        params = tuple(inspect.signature(getattr(_AtenOnCpu(), op)).parameters)
        assert params == sr_op._ATEN_ARGS[op], op


@pytest.mark.parametrize("dtype, kernel", [(torch.float32, "efficient"), (torch.float16, "flash")], ids=str)
@pytest.mark.parametrize("b, n, m, c, heads", [(1, 63, 13, 64, 2), (3, 35, 33, 48, 1)])
def test_aten_core_glue(aten_on_cpu, dtype, kernel, b, n, m, c, heads):
    """O, lse and every gradient through the ATen core's glue match the fp64 oracle (stand-in kernels)."""
    scale = (c // heads) ** -0.5
    q, k, v, do = _core_inputs(b, n, m, c, dtype)
    o_ref, lse_ref, refs = _core_reference(q, k, v, do, heads, scale)
    low = [t.to(dtype) for t in (q, k, v)]
    o, lse = sr_op._aten_core_fwd(*low, heads, scale, None)
    assert lse.shape == (b, heads, n) and lse.dtype == torch.float32 and lse.is_contiguous()
    grads = sr_op._aten_core_bwd(do.to(dtype), *low, o, lse, heads, scale)
    assert aten_on_cpu.calls == [kernel, kernel + "_backward"]
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for name, a, r in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, *grads), (o_ref, lse_ref, *refs)):
        assert a.shape == r.shape, name
        err = (a.double() - r).abs().max().item()
        assert err <= tol * max(1.0, r.abs().max().item()), f"{name}: {err:.3g}"


def test_aten_core_in_the_layer(aten_on_cpu, monkeypatch):
    """The whole layer's forward and backward with the aten core (stand-ins) vs the torch core."""
    import dataclasses

    # the CUDA-device condition lifted, so that the CPU stand-ins run through the spec
    monkeypatch.setitem(sr_op.CORE.impls, "aten", dataclasses.replace(sr_op.CORE.impls["aten"], conditions=()))
    monkeypatch.setattr(sr_op.CORE, "_cache", {})
    m, x, w = _args(sr=2, b=3)
    wd = sr_op._weights_like(x, [w.get(k) for k in sr_op._WEIGHT_NAMES])
    y, lse, o = sr_op._fwd(x, (5, 7), 2, 2, wd, 1e-5, "torch", "aten")
    y_ref, lse_ref, o_ref = sr_op._fwd(x, (5, 7), 2, 2, wd, 1e-5, "torch", "torch")
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse, lse_ref, rtol=1e-5, atol=1e-6)
    dy = torch.randn_like(y)
    dx_ref, g_ref = sr_op._bwd(dy, x, lse_ref, o_ref, (5, 7), 2, 2, wd, 1e-5, "torch", "torch")
    for saved in (o, o.new_empty(0)):  # the output kept, and recomputed from lse
        dx, g = sr_op._bwd(dy, x, lse, saved, (5, 7), 2, 2, wd, 1e-5, "torch", "aten")
        torch.testing.assert_close(dx, dx_ref, rtol=1e-5, atol=1e-6)
        for k in g_ref:
            torch.testing.assert_close(g[k], g_ref[k], rtol=1e-5, atol=1e-6, msg=k)
    assert "efficient_backward" in aten_on_cpu.calls


def test_aten_core_conditions(monkeypatch):
    from segformer_fast import explain

    q = torch.randn(1, 4, 64)
    rows = {bk: (runs, why) for _, _, bk, runs, why in explain("sr_attention.core", q, head_dim=32).rows()}
    assert not rows["aten"][0] and "CUDA tensors" in rows["aten"][1]
    with pytest.raises(ValueError, match="aten.*CUDA tensors"):
        sr_op.CORE.resolve("aten", q, head_dim=32)
    from types import SimpleNamespace

    cuda_q = SimpleNamespace(device=torch.device("cuda"), dtype=torch.float32)  # what the condition reads
    monkeypatch.setattr(sr_op, "_gpu_capability", lambda device: (9, 0))
    assert sr_op._aten_core_condition(cuda_q, {"head_dim": 32}) is None
    assert "multiple of 8" in sr_op._aten_core_condition(cuda_q, {"head_dim": 20})
    sr_op._aten_schema_error.cache_clear()
    monkeypatch.setitem(sr_op._ATEN_ARGS, "_scaled_dot_product_efficient_attention", ("query", "key"))
    try:
        reason = sr_op._aten_core_condition(cuda_q, {"head_dim": 32})  # fp32: memory-efficient attention
        assert "_scaled_dot_product_efficient_attention in torch" in reason and "this core passes" in reason
    finally:
        sr_op._aten_schema_error.cache_clear()


def test_per_gpu_core_preference(monkeypatch):
    """Auto follows CORE_GPU_PREFERENCE for a listed GPU, the default order for any other one."""
    spec = sr_op.CORE
    assert spec.prefer_gpu is sr_op.CORE_GPU_PREFERENCE and not sr_op.CORE_GPU_PREFERENCE  # filled by measurements
    monkeypatch.setitem(sr_op.CORE_GPU_PREFERENCE, (9, 0), ("aten", "triton", "torch"))
    assert spec.order("cuda", (9, 0)) == ("aten", "triton", "torch")
    assert spec.order("cuda", (8, 0)) == spec.order("cuda") == ("triton", "torch")
    assert spec.order("cpu", (9, 0)) == ("triton", "torch")
