"""mix_ffn (the fused Mix-FFN autograd) against its functional reference, forward and every gradient."""

import pytest
import torch

from segformer_fast.backends import available_backends
from segformer_fast.ops.mix_ffn import mix_ffn, mix_ffn_reference


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("save_hidden", [True, False])
def test_matches_reference(backend, save_hidden):
    if not available_backends()[backend].available:
        pytest.skip(available_backends()[backend].reason)
    b, (h, w), c, hidden = 3, (7, 9), 8, 36
    torch.manual_seed(0)
    args = [torch.randn(b, h * w, c), torch.randn(hidden, c) * 0.3, torch.randn(hidden), torch.randn(hidden, 1, 3, 3) * 0.3,
            torch.randn(hidden), torch.randn(c, hidden) * 0.3, torch.randn(c)]
    ref_in = [t.double().requires_grad_() for t in args]
    fast_in = [t.clone().requires_grad_() for t in args]
    x, w1, b1, wc, bc, w2, b2 = ref_in
    ref = mix_ffn_reference(x, (h, w), w1, b1, wc, bc, w2, b2)
    x, w1, b1, wc, bc, w2, b2 = fast_in
    out = mix_ffn(x, (h, w), w1, b1, wc, bc, w2, b2, backend=backend, save_hidden=save_hidden)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    for name, a, r in zip(("x", "w1", "b1", "wc", "bc", "w2", "b2"), torch.autograd.grad(out, fast_in, g.float()),
                          torch.autograd.grad(ref, ref_in, g)):
        torch.testing.assert_close(a.double(), r, rtol=1e-4, atol=1e-4, msg=name)


def test_bad_input_is_named():
    x = torch.randn(2, 63, 8)
    w1, wc, w2 = torch.randn(36, 8), torch.randn(36, 1, 3, 3), torch.randn(8, 36)
    with pytest.raises(ValueError, match="does not match x"):
        mix_ffn(x, (7, 8), w1, None, wc, torch.zeros(36), w2, None)
    with pytest.raises(ValueError, match=r"must be \(B, N, 8\)"):
        mix_ffn(x[..., :4], (7, 9), w1, None, wc, torch.zeros(36), w2, None)


@pytest.mark.parametrize("save_hidden", [True, False])
def test_opcheck(save_hidden):
    x = torch.randn(2, 12, 8, requires_grad=True)
    w1, b1 = torch.randn(16, 8, requires_grad=True), torch.randn(16, requires_grad=True)
    wc, bc = torch.randn(16, 1, 3, 3, requires_grad=True), torch.randn(16, requires_grad=True)
    w2, b2 = torch.randn(8, 16, requires_grad=True), torch.randn(8, requires_grad=True)
    torch.library.opcheck(torch.ops.segformer_fast.mix_ffn.default,
                          (x, w1, b1, wc, bc, w2, b2, 3, 4, "none", "torch", save_hidden))


def _triton_or_skip():
    if not available_backends()["triton"].available:
        pytest.skip(available_backends()["triton"].reason)
    from segformer_fast.ops.mix_ffn import triton_kernels

    return triton_kernels


# (B, H, W, hidden, C_out): partial pixel tiles (4 x 16) at every edge, hidden not a multiple of the hidden
# step (16 / 32), C_out not a power of two, one-row / one-column images, C_out at the fused path's limit
FUSED_SHAPES = [(2, 7, 9, 40, 24), (1, 5, 33, 70, 64), (1, 1, 17, 16, 5), (3, 9, 1, 33, 128)]


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", FUSED_SHAPES, ids=lambda s: "B{}_{}x{}_K{}_C{}".format(*s))
def test_fused_conv_gelu_fc2_matches_reference(shape, approximate):
    """The Triton conv + GELU + fc2 kernel against fp64 (fp32: exact-fp32 dots) and, in fp16, within twice the
    error of the unfused fp16 path (y rounded to fp16, then an fp16 matmul) plus one fp16 ulp."""
    tk = _triton_or_skip()
    from segformer_fast.ops.dwconv3x3_gelu import dwconv3x3_gelu_reference

    b, h, w, k, c = shape
    g = torch.Generator().manual_seed(sum(shape))
    hid = torch.randn(b, h * w, k, generator=g, dtype=torch.float64)
    wc, bc = torch.randn(k, 1, 3, 3, generator=g, dtype=torch.float64) * 0.4, torch.randn(k, generator=g, dtype=torch.float64)
    w2, b2 = torch.randn(c, k, generator=g, dtype=torch.float64) * 0.2, torch.randn(c, generator=g, dtype=torch.float64)
    ref = dwconv3x3_gelu_reference(hid, (h, w), wc, bc, approximate) @ w2.t() + b2
    got = tk.dwconv_gelu_linear_triton(hid.float(), (h, w), wc.float(), bc.float(), w2.float(), b2.float(), approximate)
    assert got.shape == (b, h * w, c) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    no_bias = tk.dwconv_gelu_linear_triton(hid.float(), (h, w), wc.float(), bc.float(), w2.float(), None, approximate)
    torch.testing.assert_close(no_bias.double(), ref - b2, rtol=1e-5, atol=1e-5)
    lo = [t.half() for t in (hid, wc, bc, w2, b2)]
    got16 = tk.dwconv_gelu_linear_triton(lo[0], (h, w), *lo[1:4], lo[4], approximate)
    y16 = dwconv3x3_gelu_reference(lo[0].float(), (h, w), lo[1].float(), lo[2].float(), approximate).half()
    unfused = (y16.float() @ lo[3].float().t() + lo[4].float()).half()
    err, err_unfused = ((t.double() - ref).abs().max().item() for t in (got16, unfused))
    assert got16.dtype == torch.float16
    assert err <= 2 * err_unfused + 2**-10 * ref.abs().max().item(), (err, err_unfused)


def test_fused_path_runs_where_it_applies(monkeypatch):
    """mix_ffn on the Triton conv backend launches the fused forward for C_out <= 128 and the fused backward when
    C_in <= 128 too, and keeps the unfused conv + matmuls past them; torch never fuses."""
    tk = _triton_or_skip()
    from segformer_fast.ops.mix_ffn import op as mix_op

    calls = []
    fwd, bwd = tk.dwconv_gelu_linear_triton, tk.mix_ffn_bwd_triton
    monkeypatch.setattr(tk, "dwconv_gelu_linear_triton", lambda *a, **k: calls.append("fwd") or fwd(*a, **k))
    monkeypatch.setattr(tk, "mix_ffn_bwd_triton", lambda *a, **k: calls.append("bwd") or bwd(*a, **k))
    assert tk.fused_fc2_applies(128) and not tk.fused_fc2_applies(129)
    for c_in, c_out, backend, fused in ((8, 24, "triton", ["fwd", "bwd"]), (8, 130, "triton", []),
                                        (130, 24, "triton", ["fwd"]), (8, 24, "torch", [])):
        x = torch.randn(1, 12, c_in, requires_grad=True)
        w1, wc, w2 = torch.randn(16, c_in), torch.randn(16, 1, 3, 3), torch.randn(c_out, 16)
        calls.clear()
        out = mix_op.mix_ffn(x, (3, 4), w1, None, wc, torch.zeros(16), w2, None, backend=backend)
        out.sum().backward()
        assert out.shape == (1, 12, c_out) and calls == fused, (c_in, c_out, backend)


def test_fused_kernel_validates():
    tk = _triton_or_skip()
    h, wc, bc = torch.randn(1, 12, 16), torch.randn(16, 1, 3, 3), torch.randn(16)
    with pytest.raises(ValueError, match="do not fit"):
        tk.dwconv_gelu_linear_triton(h, (3, 5), wc, bc, torch.randn(8, 16), None)  # 3 x 5 != 12
    with pytest.raises(ValueError, match="do not fit"):
        tk.dwconv_gelu_linear_triton(h, (3, 4), wc, bc, torch.randn(129, 16), None)  # C_out past the limit
    with pytest.raises(TypeError, match="bfloat16"):
        tk.dwconv_gelu_linear_triton(h.bfloat16(), (3, 4), wc.bfloat16(), bc.bfloat16(), torch.randn(8, 16).bfloat16(), None)


# (B, H, W, hidden, C_in, C_out): partial tiles at every edge and a pixel-tile count the interpreter's 3 groups
# do not divide (slots past the last tile), hidden not a multiple of the channel block, C_in != C_out, one-row
# images, both channel counts at the fused path's limit
FUSED_BWD_SHAPES = [(2, 7, 9, 40, 24, 12, "none"), (1, 5, 33, 70, 8, 64, "tanh"), (2, 1, 17, 16, 5, 3, "none"),
                    (1, 3, 5, 20, 128, 128, "none")]


def _unfused_backward(monkeypatch, *args):
    """mix_ffn's backward on the Triton conv with the fused kernels switched off (conv op + matmuls)."""
    from segformer_fast.ops.mix_ffn import op as mix_op

    with monkeypatch.context() as m:
        m.setattr(mix_op, "_fused", lambda *a: False)
        return mix_op._op_backward(*args)


@pytest.mark.parametrize("shape", FUSED_BWD_SHAPES, ids=lambda s: "B{}_{}x{}_K{}_Cin{}_Cout{}_{}".format(*s))
def test_fused_backward_matches_reference(shape, monkeypatch):
    """The three backward kernels (mix_ffn_bwd_triton) against fp64 autograd of the reference, every gradient
    (fp32: exact-fp32 dots); in fp16, each gradient within twice the unfused fp16 path's error (the conv op,
    then fp16 matmuls) plus one fp16 ulp of its scale."""
    tk = _triton_or_skip()
    from segformer_fast.ops.dwconv3x3_gelu import dwconv3x3_gelu_reference

    b, h, w, k, c_in, c_out, approximate = shape
    g = torch.Generator().manual_seed(b * h * w + k)
    hid = torch.randn(b, h * w, k, generator=g, dtype=torch.float64).requires_grad_()
    x = torch.randn(b, h * w, c_in, generator=g, dtype=torch.float64)
    wc = (torch.randn(k, 1, 3, 3, generator=g, dtype=torch.float64) * 0.4).requires_grad_()
    bc = torch.randn(k, generator=g, dtype=torch.float64).requires_grad_()
    w1 = torch.randn(k, c_in, generator=g, dtype=torch.float64) * 0.3
    w2 = (torch.randn(c_out, k, generator=g, dtype=torch.float64) * 0.2).requires_grad_()
    b2 = torch.randn(c_out, generator=g, dtype=torch.float64).requires_grad_()
    out = dwconv3x3_gelu_reference(hid, (h, w), wc, bc, approximate) @ w2.t() + b2
    gout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    g_hid, gwc, gbc, gw2, gb2 = torch.autograd.grad(out, [hid, wc, bc, w2, b2], gout)
    ref = dict(gx=g_hid @ w1, gw1=g_hid.reshape(-1, k).t() @ x.reshape(-1, c_in), gb1=g_hid.sum((0, 1)), gwc=gwc,
               gbc=gbc, gw2=gw2, gb2=gb2)
    names = list(ref)
    args = [t.detach() for t in (gout, x, hid, wc, bc, w1, w2)]
    got = tk.mix_ffn_bwd_triton(*(t.float() for t in args[:3]), (h, w), *(t.float() for t in args[3:]), approximate)
    for name, a in zip(names, got):
        assert a.dtype == torch.float32 and a.shape == ref[name].shape, name
        torch.testing.assert_close(a.double(), ref[name], rtol=1e-5, atol=1e-5, msg=name)
    lo = [t.half() for t in args]
    got16 = tk.mix_ffn_bwd_triton(*lo[:3], (h, w), *lo[3:], approximate)
    gout16, x16, hid16, wc16, bc16, w116, w216 = lo
    unfused = _unfused_backward(monkeypatch, gout16, x16, hid16, w116, torch.zeros(k, dtype=torch.half), wc16, bc16,
                                w216, True, h, w, approximate, "triton")
    assert got16[0].dtype == torch.float16
    for name, a, u in zip(names, got16, unfused):
        r = ref[name]
        err, err_unfused = ((t.double() - r).abs().max().item() for t in (a, u))
        assert err <= 2 * err_unfused + 2**-10 * r.abs().max().item(), (name, err, err_unfused)


def test_fused_backward_validates():
    tk = _triton_or_skip()
    gout, x, h = torch.randn(1, 12, 8), torch.randn(1, 12, 8), torch.randn(1, 12, 16)
    wc, bc, w1, w2 = torch.randn(16, 1, 3, 3), torch.randn(16), torch.randn(16, 8), torch.randn(8, 16)
    with pytest.raises(ValueError, match="do not fit"):
        tk.mix_ffn_bwd_triton(gout, x, h, (3, 5), wc, bc, w1, w2)  # 3 x 5 != 12
    with pytest.raises(ValueError, match="do not fit"):
        tk.mix_ffn_bwd_triton(gout, torch.randn(1, 12, 129), h, (3, 4), wc, bc, torch.randn(16, 129), w2)
    with pytest.raises(ValueError, match="do not fit h"):
        tk.mix_ffn_bwd_triton(gout[:, :6], x, h, (3, 4), wc, bc, w1, w2)
    with pytest.raises(TypeError, match="bfloat16"):
        tk.mix_ffn_bwd_triton(*(t.bfloat16() for t in (gout, x, h)), (3, 4), *(t.bfloat16() for t in (wc, bc, w1, w2)))
