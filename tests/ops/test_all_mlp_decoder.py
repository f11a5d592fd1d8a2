"""all_mlp_decoder (fold identity, eval pass, training autograd) against its functional reference."""

import pytest
import torch

from segformer_fast.backends import available_backends
from segformer_fast.ops.all_mlp_decoder import (
    all_mlp_decoder_eval,
    all_mlp_decoder_reference,
    all_mlp_decoder_train,
    fold_weights,
)
from segformer_fast.ops.math_utils import batch_norm_fold

C, D, K = (8, 12, 20, 24), 16, 5


def _params(dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: (torch.randn(*s, generator=g) * 0.3).to(dtype)  # noqa: E731
    return dict(weights=[r(D, c) for c in C], biases=[r(D) for _ in C], fuse_weight=r(D, 4 * D, 1, 1),
                bn_weight=r(D) + 1, bn_bias=r(D), running_mean=r(D), running_var=r(D).abs() + 0.5,
                cls_weight=r(K, D, 1, 1), cls_bias=r(K))


def _features(dtype=torch.float64):
    sizes = [(9, 13), (5, 7), (3, 4), (2, 2)]
    return [torch.randn(2, c, h, w, dtype=dtype) for c, (h, w) in zip(C, sizes)]


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_eval_matches_reference(backend):
    if not available_backends()[backend].available:
        pytest.skip(available_backends()[backend].reason)
    p, feats = _params(), _features()
    ref = all_mlp_decoder_reference(feats, **p)
    A, a = fold_weights(p["fuse_weight"], p["weights"], p["biases"])
    scale, shift = batch_norm_fold(p["bn_weight"], p["bn_bias"], p["running_mean"], p["running_var"], 1e-5)
    f32 = lambda t: t.float()  # noqa: E731
    out = all_mlp_decoder_eval([f32(f) for f in feats], [f32(t) for t in A], [f32(t) for t in a], f32(scale),
                               f32(shift), f32(p["cls_weight"]).view(K, D), f32(p["cls_bias"]), backend)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_train_matches_reference_forward_and_gradients(backend):
    if not available_backends()[backend].available:
        pytest.skip(available_backends()[backend].reason)
    dtype = torch.float64 if backend == "torch" else torch.float32  # the kernel backends take fp32/16-bit only
    p, feats = _params(dtype), _features(dtype)
    leaves = {k: (v.requires_grad_() if isinstance(v, torch.Tensor) else [t.requires_grad_() for t in v])
              for k, v in p.items() if k not in ("running_mean", "running_var")}
    feats = [f.requires_grad_() for f in feats]
    rm, rv = p["running_mean"].clone(), p["running_var"].clone()
    ref = all_mlp_decoder_reference(feats, **{**p, "running_mean": rm, "running_var": rv}, training=True)
    A, a = fold_weights(p["fuse_weight"], p["weights"], p["biases"])
    out, mean, var = all_mlp_decoder_train(feats, A, a, p["bn_weight"], p["bn_bias"], p["cls_weight"].view(K, D),
                                           p["cls_bias"], eps=1e-5, backend=backend)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)  # batch statistics are taken in fp32
    torch.testing.assert_close(p["running_mean"] * 0.9 + mean * 0.1, rm)
    torch.testing.assert_close(p["running_var"] * 0.9 + var * 0.1, rv)
    inputs = feats + [t for v in leaves.values() for t in (v if isinstance(v, list) else [v])]
    g = torch.randn_like(ref)
    for i, (x, y) in enumerate(zip(torch.autograd.grad(out, inputs, g), torch.autograd.grad(ref, inputs, g))):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=f"input {i}")


# ---------------------------------------------------------------------------------------------
# the Triton glue (BN statistics, BN + ReLU + dropout, their backward) against an fp64 oracle with the same mask

_TRI_C, _TRI_D, _TRI_K = (6, 8, 10, 12), 40, 5  # D = 40: not a multiple of the interpreter's BLOCK_D (32)
_TRI_SIZES = [(13, 17), (7, 9), (4, 5), (1, 2)]


def _triton_or_skip():
    status = available_backends()["triton"]
    if not status.available:
        pytest.skip(status.reason)
    from segformer_fast.ops.all_mlp_decoder import triton_kernels

    return triton_kernels


def _oracle(feats, A, a, gamma, beta, wc, bc, keep, p, eps=1e-5):
    """fp64 decoder from folded weights, dropout by ``keep`` (B, H, W, D): (logits, batch mean, unbiased var)."""
    H, W = feats[0].shape[-2:]
    u = 0
    for c, Ai, ai in zip(feats, A, a):
        z = torch.einsum("bchw,dc->bdhw", c, Ai) + ai.view(-1, 1, 1)
        u = u + torch.nn.functional.interpolate(z, size=(H, W), mode="bilinear", align_corners=False)
    var, mean = torch.var_mean(u, dim=(0, 2, 3), correction=0)
    y = (u - mean.view(-1, 1, 1)) * torch.rsqrt(var + eps).view(-1, 1, 1) * gamma.view(-1, 1, 1) + beta.view(-1, 1, 1)
    d = torch.relu(y)
    if p > 0:
        d = d * keep.permute(0, 3, 1, 2).to(d.dtype) / (1 - p)
    logits = torch.einsum("bdhw,kd->bkhw", d, wc) + bc.view(-1, 1, 1)
    n = u.numel() // u.shape[1]
    return logits, mean, var * n / (n - 1)


def _triton_case(B, dtype, p, dropout2d=False, nan=False, up="torch"):
    kernels = _triton_or_skip()
    g = torch.Generator().manual_seed(1)
    r = lambda *s, scale=1.0: torch.randn(*s, generator=g, dtype=torch.float64) * scale  # noqa: E731
    leaves = dict(feats=[r(B, c, h, w) for c, (h, w) in zip(_TRI_C, _TRI_SIZES)],
                  A=[r(_TRI_D, c, scale=c**-0.5) for c in _TRI_C], a=[r(_TRI_D, scale=0.3) for _ in _TRI_C],
                  gamma=1 + r(_TRI_D, scale=0.2), beta=r(_TRI_D, scale=0.2), wc=r(_TRI_K, _TRI_D, scale=_TRI_D**-0.5),
                  bc=r(_TRI_K, scale=0.1))
    leaves["feats"][0][:, :, 3:5] += 2.0  # a shifted patch: some channels far from zero mean
    if nan:
        leaves["feats"][2][B - 1, 1, 2, 3] = float("nan")
    flat = lambda t: [x for v in t.values() for x in (v if isinstance(v, list) else [v])]  # noqa: E731
    low = {k: ([x.to(dtype) for x in v] if isinstance(v, list) else v.to(dtype)) for k, v in leaves.items()}
    H, W = _TRI_SIZES[0]
    torch.manual_seed(123)
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64).item())  # the draw the op makes
    keep = kernels.dropout_keep_mask(seed, B * H * W, _TRI_D, p, H * W, dropout2d).view(B, H, W, _TRI_D)

    def run(t, fn):
        ins = [x.detach().clone().requires_grad_() for x in flat(t)]
        it = iter(ins)
        parts = {k: ([next(it) for _ in v] if isinstance(v, list) else next(it)) for k, v in t.items()}
        out, mean, var = fn(parts)
        go = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(out.dtype)
        grads = torch.autograd.grad(out, ins, go, allow_unused=True)
        return [out, mean, var, *grads]

    def fast(t, glue="triton", p=p):
        torch.manual_seed(123)
        return all_mlp_decoder_train(t["feats"], t["A"], t["a"], t["gamma"], t["beta"], t["wc"], t["bc"], eps=1e-5,
                                     p=p, dropout2d=dropout2d, backend=up, glue=glue)

    def oracle(t, p=p):
        return _oracle(t["feats"], t["A"], t["a"], t["gamma"], t["beta"], t["wc"], t["bc"], keep, p)

    f64 = {k: ([x.double() for x in v] if isinstance(v, list) else v.double()) for k, v in low.items()}
    exact = run(f64, oracle)
    if dtype == torch.float32:
        return run(low, fast), exact, None
    # PyTorch's own error in this dtype: the oracle run in it, and the torch glue (without dropout: its mask differs)
    err = lambda xs, refs: [(x.double() - r).abs().max().item() for x, r in zip(xs, refs)]  # noqa: E731
    torch_err = err(run(low, lambda t: fast(t, "torch", 0.0)), run(f64, lambda t: oracle(t, 0.0)))
    return run(low, fast), exact, [max(a, b) for a, b in zip(err(run(low, oracle), exact), torch_err)]


_NAMES = ["logits", "mean", "var"] + [f"feat{i}" for i in range(4)] + [f"A{i}" for i in range(4)] + \
    [f"a{i}" for i in range(4)] + ["bn_weight", "bn_bias", "cls_weight", "cls_bias"]


@pytest.mark.parametrize("B, dtype, p, dropout2d, up", [
    (3, torch.float32, 0.1, False, "torch"),
    (1, torch.float32, 0.0, False, "torch"),
    (3, torch.float32, 0.1, True, "torch"),
    (3, torch.float16, 0.1, False, "torch"),
    (1, torch.float16, 0.0, False, "torch"),
    (3, torch.float32, 0.1, False, "triton"),
    (3, torch.float16, 0.1, True, "triton"),
], ids=["b3-fp32-p0.1", "b1-fp32-p0", "b3-fp32-p0.1-2d", "b3-fp16-p0.1", "b1-fp16-p0", "b3-fp32-p0.1-gather",
        "b3-fp16-p0.1-2d-gather"])
def test_triton_glue_matches_oracle_forward_and_every_gradient(B, dtype, p, dropout2d, up):
    """The Triton glue, forward and every gradient; with upsample_sum on Triton ("gather") the forward gathers u
    from the stage maps in its kernels (u never stored)."""
    fast, exact, lowp = _triton_case(B, dtype, p, dropout2d, up=up)
    assert len(fast) == len(_NAMES)
    for name, x, ref, err_low in zip(_NAMES, fast, exact, lowp or [None] * len(fast)):
        assert x is not None and x.dtype in (dtype, torch.float32), name
        err = (x.double() - ref).abs().max().item()
        scale = ref.abs().max().item()
        if dtype == torch.float32:
            assert err <= 1e-4 * scale + 1e-5, f"{name}: max error {err:.3g} (max |ref| {scale:.3g})"
        else:  # fp16: within twice PyTorch's own fp16 error (the oracle in fp16, the torch glue in fp16)
            assert err <= 2 * err_low + 2e-3 * scale, f"{name}: max error {err:.3g}, the fp16 oracle's {err_low:.3g}"


def test_triton_glue_matches_torch_glue_without_dropout():
    """p = 0: the Triton and torch glue agree (same upsample_sum backend, the torch one's arithmetic in fp32)."""
    _triton_or_skip()
    feats = [torch.randn(3, c, h, w) for c, (h, w) in zip(_TRI_C, _TRI_SIZES)]
    A = [torch.randn(_TRI_D, c) * c**-0.5 for c in _TRI_C]
    a = [torch.randn(_TRI_D) * 0.3 for _ in _TRI_C]
    rest = [torch.rand(_TRI_D) + 0.5, torch.randn(_TRI_D) * 0.2, torch.randn(_TRI_K, _TRI_D) * 0.2, torch.randn(_TRI_K)]
    outs = {}
    for glue in ("torch", "triton"):
        ins = [t.clone().requires_grad_() for t in feats + A + a + rest]
        n = len(feats)
        out, mean, var = all_mlp_decoder_train(ins[:n], ins[n:2 * n], ins[2 * n:3 * n], *ins[3 * n:], eps=1e-5,
                                               backend="torch", glue=glue)
        outs[glue] = [out, mean, var, *torch.autograd.grad(out, ins, torch.ones_like(out))]
    for name, x, y in zip(_NAMES, outs["triton"], outs["torch"]):
        # a_i's gradient is a sum of O(1) terms cancelling to ~0 (BatchNorm removes the mean): an absolute floor
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4 * max(y.abs().max().item(), 10.0),
                                   msg=lambda m: f"{name}: {m}")


def test_triton_glue_propagates_nan():
    fast, exact, _ = _triton_case(3, torch.float32, 0.1, nan=True)
    assert exact[0].isnan().all()  # a NaN anywhere in u makes every batch statistic NaN
    for name, x, ref in zip(_NAMES[:3], fast, exact):
        assert torch.equal(x.isnan(), ref.isnan()), name


def test_triton_stats_deterministic_and_exact_with_offset():
    kernels = _triton_or_skip()
    u = torch.randn(3 * 13 * 17, 40) * 0.01 + 1000.0  # E[u^2] - E[u]^2 would cancel without the shift
    mean, var = kernels.bn_stats_triton(u)
    var_ref, mean_ref = torch.var_mean(u.double(), 0, correction=0)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=0, atol=1e-4)
    torch.testing.assert_close(var.double(), var_ref, rtol=1e-3, atol=1e-9)
    mean2, var2 = kernels.bn_stats_triton(u)
    assert torch.equal(mean, mean2) and torch.equal(var, var2)


def test_triton_dropout_mask_independent_of_blocks():
    kernels = _triton_or_skip()
    from segformer_fast.ops.triton_launch import force_gpu_launch_config

    N, D, HW = 3 * 13 * 17, 40, 13 * 17
    small = kernels.dropout_keep_mask(99, N, D, 0.3)
    with force_gpu_launch_config():
        big = kernels.dropout_keep_mask(99, N, D, 0.3)
    assert torch.equal(small, big)
    assert abs(small.float().mean().item() - 0.7) < 0.03
    assert not torch.equal(small, kernels.dropout_keep_mask(100, N, D, 0.3))
    per_image = kernels.dropout_keep_mask(99, N, D, 0.3, HW, dropout2d=True).view(3, HW, D)
    assert torch.equal(per_image, per_image[:, :1].expand_as(per_image))  # one draw per image and channel


def test_triton_glue_rejects_bad_input():
    kernels = _triton_or_skip()
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        kernels.bn_stats_triton(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="dropout probability"):
        kernels.bn_relu_dropout_fwd_triton(torch.randn(4, 8), torch.ones(8), torch.zeros(8), p=1.0)
    with pytest.raises(ValueError, match="scale must be"):
        kernels.bn_relu_dropout_fwd_triton(torch.randn(4, 8), torch.ones(7), torch.zeros(8))


@pytest.mark.parametrize("B, H, W, D, K, p, dropout2d", [
    (2, 5, 7, 40, 19, 0.0, False), (1, 97, 1, 36, 150, 0.3, False), (5, 2, 5, 64, 5, 0.2, True),
    (3, 11, 1, 20, 256, 0.1, False),
], ids=["K19", "K150-dropout", "K5-dropout2d", "K256"])
def test_triton_fused_classifier_matches_unfused(B, H, W, D, K, p, dropout2d):
    """dropout(relu(scale u + shift)) Wc^T + bc in one kernel (u given as the one map) against the fp64 oracle with
    the kernels' mask, and in fp16 within twice the unfused path's error (d rounded to fp16 by the glue kernel,
    then an fp16 matmul) plus one fp16 ulp; both class blocks (K past 16), rows and channels not multiples of the
    blocks."""
    kernels = _triton_or_skip()
    assert kernels.class_blocks(K)[0] + kernels.class_blocks(K)[1] >= K
    N, hw = B * H * W, H * W
    g = torch.Generator().manual_seed(N + K)
    u, wc = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(K, D, generator=g, dtype=torch.float64) * 0.2
    scale, shift = torch.rand(D, generator=g, dtype=torch.float64) + 0.5, torch.randn(D, generator=g, dtype=torch.float64)
    bc = torch.randn(K, generator=g, dtype=torch.float64)
    keep = kernels.dropout_keep_mask(5, N, D, p, hw, dropout2d) if p > 0 else torch.ones(N, D, dtype=torch.bool)
    ref = (torch.relu(u * scale + shift) * keep / (1 - p)) @ wc.t() + bc

    def fused(t, w, b):  # u itself (read), then u as the one map (gathered): the same logits
        out = kernels.bn_relu_dropout_linear_triton(t, H, W, scale, shift, w, b, p, 5, dropout2d)
        assert torch.equal(out, kernels.bn_relu_dropout_linear_triton([t.view(B, H, W, D)], H, W, scale, shift, w, b,
                                                                      p, 5, dropout2d))
        return out

    got = fused(u.float(), wc.float(), bc.float())
    assert got.shape == (N, K) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused(u.float(), wc.float(), None).double(), ref - bc, rtol=1e-5, atol=1e-5)
    got16 = fused(u.half(), wc.half(), bc.half())
    d16 = kernels.bn_relu_dropout_fwd_triton(u.half(), scale, shift, p, 5, hw, dropout2d)
    unfused = (d16.float() @ wc.half().float().t() + bc.half().float()).half()
    err, err_unfused = ((t.double() - ref).abs().max().item() for t in (got16, unfused))
    assert got16.dtype == torch.float16
    assert err <= 2 * err_unfused + 2**-10 * ref.abs().max().item(), (err, err_unfused)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_gathered_u_is_upsample_sums(dtype):
    """The statistics and the classifier gathering u from the stage maps equal, bit for bit, the same kernels on the
    u the upsample_sum op's Triton kernel stores (the backward recomputes u that way)."""
    kernels = _triton_or_skip()
    from segformer_fast.ops.upsample_sum.triton_kernels import upsample_sum_fwd_triton

    g = torch.Generator().manual_seed(4)
    B, D, K, (H, W) = 2, 40, 19, _TRI_SIZES[0]
    maps = [torch.randn(B, h, w, D, generator=g).to(dtype) for h, w in _TRI_SIZES]
    u = upsample_sum_fwd_triton(maps, H, W, None, None, False)
    for got, want in zip(kernels.bn_stats_gather_triton(maps, H, W), kernels.bn_stats_triton(u.view(-1, D))):
        assert torch.equal(got, want)
    scale, shift, wc = torch.rand(D, generator=g) + 0.5, torch.randn(D, generator=g), torch.randn(K, D, generator=g).to(dtype)
    args = (scale, shift, wc, None, 0.2, 9)
    assert torch.equal(kernels.bn_relu_dropout_linear_triton(maps, H, W, *args),
                       kernels.bn_relu_dropout_linear_triton([u], H, W, *args))


def test_triton_fused_classifier_runs_up_to_its_class_limit(monkeypatch):
    """The training decoder on the Triton glue fuses the classifier into its forward and both backward passes up
    to MAX_CLASSES classes (two class blocks at 256), and runs the glue passes and matmuls past it; both agree with
    the torch glue (p = 0), forward and every gradient."""
    kernels = _triton_or_skip()
    calls = []
    for name in ("bn_relu_dropout_linear_triton", "bn_relu_dropout_bwd_reduce_linear_triton",
                 "bn_relu_dropout_bwd_linear_triton"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    g = torch.Generator().manual_seed(3)
    feats = [torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 6, 3, 3, generator=g)]
    A, a = [torch.randn(8, 4, generator=g), torch.randn(8, 6, generator=g)], [torch.randn(8, generator=g), None]
    gamma, beta = torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    for K, fused in ((kernels.MAX_CLASSES, True), (kernels.MAX_CLASSES + 1, False)):
        wc, bc = torch.randn(K, 8, generator=g) * 0.3, torch.randn(K, generator=g)
        go = torch.randn(2, K, 6, 6, generator=g)
        results = []
        for glue in ("triton", "torch"):
            ins = [t.clone().requires_grad_() for t in (*feats, *A, a[0], gamma, beta, wc, bc)]
            calls.clear()
            out = all_mlp_decoder_train(ins[:2], ins[2:4], [ins[4], None], *ins[5:], eps=1e-5, backend="torch",
                                        glue=glue)[0]
            results.append([out, *torch.autograd.grad(out, ins, go)])
            if glue == "triton":
                assert len(calls) == (3 if fused else 0), (K, calls)
        for x, y in zip(*results):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="classes"):
        kernels.class_blocks(kernels.MAX_CLASSES + 1)
    with pytest.raises(ValueError, match=r"wc must be \(K, 8\)"):
        kernels.bn_relu_dropout_linear_triton([torch.randn(1, 2, 2, 8)], 2, 2, torch.ones(8), torch.zeros(8),
                                              torch.randn(3, 7), None)


@pytest.mark.parametrize("N, D, K, p, dropout2d", [
    (70, 40, 19, 0.0, False), (97, 36, 150, 0.3, False), (50, 64, 5, 0.2, True),
], ids=["K19", "K150-dropout", "K5-dropout2d"])
def test_triton_fused_classifier_backward_matches_unfused(N, D, K, p, dropout2d):
    """Both backward passes with g = gl Wc computed per tile against fp64 (d from the kernels' mask): sum(gy),
    sum(gy xhat), dWc = gl^T d, dbc = sum gl and dL/du; fp16 within twice the unfused fp16 path's error plus one
    fp16 ulp of each result's scale."""
    kernels = _triton_or_skip()
    g = torch.Generator().manual_seed(N * K)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    u, gl, wc = r(N, D), r(N, K), r(K, D) * 0.2
    mean, invstd = r(D) * 0.1, torch.rand(D, generator=g, dtype=torch.float64) + 0.5
    scale, shift, gscale = 1 + 0.2 * r(D), 0.3 * r(D), 1 + 0.2 * r(D)
    hw = 10 if N % 10 == 0 else N  # pixels per image (H = 1 x W = hw)
    keep = kernels.dropout_keep_mask(5, N, D, p, hw, dropout2d) if p > 0 else torch.ones(N, D, dtype=torch.bool)
    y = u * scale + shift
    live = (y > 0) & keep
    d = torch.where(live, y / (1 - p), 0.0)
    gy = torch.where(live, (gl @ wc) / (1 - p), 0.0)
    xhat = (u - mean) * invstd
    sums = [gy.sum(0), (gy * xhat).sum(0), gl.t() @ d, gl.sum(0)]
    gu = gscale * (gy - sums[0] / N - xhat * sums[1] / N)
    drop = (p, 5, dropout2d)
    vec = [t.float() for t in (mean, invstd, scale, shift)]

    def run(dt):
        got = kernels.bn_relu_dropout_bwd_reduce_linear_triton(u.to(dt), 1, hw, gl.to(dt), wc.to(dt), *vec, *drop)
        return [*got, *kernels.bn_relu_dropout_bwd_linear_triton(u.to(dt), 1, hw, gl.to(dt), wc.to(dt), *vec,
                                                                  gscale.float(), sums[0].float(), sums[1].float(), N,
                                                                  *drop)]

    got32 = run(torch.float32)
    # a sum of N fp32 values: within a few fp32 ulps of N * max |gu|
    torch.testing.assert_close(got32[5].double(), gu.sum(0), rtol=1e-5, atol=1e-6 * N * gu.abs().max().item(),
                               msg="gu column sums")
    for name, a, ref in zip(("sum_g", "sum_gx", "dWc", "dbc", "gu"), got32, [*sums, gu]):
        assert a.shape == ref.shape and a.dtype == torch.float32, name
        torch.testing.assert_close(a.double(), ref, rtol=1e-5, atol=1e-5, msg=name)
    u16, gl16, wc16 = u.half(), gl.half(), wc.half()
    g16 = (gl16.float() @ wc16.float()).half()  # the unfused GEMM's fp16 g
    d16, sg16, sgx16 = kernels.bn_relu_dropout_bwd_reduce_triton(u16, g16, *vec, p, 5, hw, dropout2d)
    gu16 = kernels.bn_relu_dropout_bwd_triton(u16, g16, *vec, gscale.float(), sums[0].float(), sums[1].float(), N,
                                              p, 5, hw, dropout2d)
    unfused = [sg16, sgx16, (gl16.float().t() @ d16.float()).half(), gl16.float().sum(0), gu16]
    for name, a, b, ref in zip(("sum_g", "sum_gx", "dWc", "dbc", "gu"), run(torch.float16), unfused, [*sums, gu]):
        err, err_unfused = ((t.double() - ref).abs().max().item() for t in (a, b))
        assert err <= 2 * err_unfused + 2**-10 * ref.abs().max().item(), (name, err, err_unfused)


def test_triton_forward_gathers_u_unless_another_upsample_backend_is_named(monkeypatch):
    """With upsample_sum's backend "auto" or "triton" the training glue gathers u from the stage maps in its
    kernels; with another backend named it reads that op's u. All give the same logits."""
    kernels = _triton_or_skip()
    calls = []
    real = kernels.bn_stats_gather_triton
    monkeypatch.setattr(kernels, "bn_stats_gather_triton", lambda *a, **k: calls.append("gather") or real(*a, **k))
    feats = [torch.randn(2, 4, 6, 6), torch.randn(2, 6, 3, 3)]
    A, a = [torch.randn(8, 4), torch.randn(8, 6)], [torch.randn(8), None]
    wc, bc = torch.randn(19, 8), torch.randn(19)
    outs = {}
    for backend in ("triton", "auto", "torch"):
        calls.clear()
        outs[backend] = all_mlp_decoder_train(feats, A, a, None, None, wc, bc, eps=1e-5, backend=backend,
                                              glue="triton")[0]
        assert calls == (["gather"] if backend != "torch" else []), backend
    for backend in ("triton", "auto"):
        torch.testing.assert_close(outs[backend], outs["torch"], rtol=1e-5, atol=1e-5)


def test_triton_stage_one_computed_in_kernel():
    """The finest stage given as its features (StageOne: z_1 = A c + a computed by a tl.dot in each kernel, never
    stored) gives, in fp32, the statistics, logits and both backward passes of the same kernels on z_1 computed
    beforehand, bit for bit; bad features are named."""
    kernels = _triton_or_skip()
    g = torch.Generator().manual_seed(5)
    B, D, K, C1, (H, W) = 2, 40, 19, 12, _TRI_SIZES[0]
    c1, A1, a1 = torch.randn(B, C1, H, W, generator=g), torch.randn(D, C1, generator=g) * 0.3, torch.randn(D, generator=g)
    rest = [torch.randn(B, h, w, D, generator=g) for h, w in _TRI_SIZES[1:]]
    z1 = (c1.permute(0, 2, 3, 1).reshape(-1, C1) @ A1.t() + a1).view(B, H, W, D)
    src, maps = [kernels.StageOne(c1, A1, a1), *rest], [z1, *rest]
    scale, shift, wc = torch.rand(D, generator=g) + 0.5, torch.randn(D, generator=g), torch.randn(K, D, generator=g)
    gl, mean, invstd = torch.randn(B * H * W, K, generator=g), torch.randn(D, generator=g), torch.rand(D, generator=g) + 0.5

    def run(u):
        out = [*kernels.bn_stats_gather_triton(u, H, W),
               kernels.bn_relu_dropout_linear_triton(u, H, W, scale, shift, wc, None, 0.2, 3)]
        red = kernels.bn_relu_dropout_bwd_reduce_linear_triton(u, H, W, gl, wc, mean, invstd, scale, shift, 0.2, 3)
        return out + [*red, *kernels.bn_relu_dropout_bwd_linear_triton(u, H, W, gl, wc, mean, invstd, scale, shift,
                                                                        scale, red[0], red[1], B * H * W, 0.2, 3,
                                                                        stage_one_grad=True)]

    got, want = run(src), run(maps)
    assert got[-1] is not None and want[-1] is None  # dA_1 only where pass 2 has the finest stage's features
    for x, y in zip(got[:-1], want[:-1]):
        assert torch.equal(x, y)
    # dA_1 = sum over pixels of gu^T c_1 (gu as stored), against fp64 on the same gu
    gu = got[-3].double()
    ref = gu.t() @ c1.double().permute(0, 2, 3, 1).reshape(-1, C1)
    assert got[-1].shape == (D, C1) and got[-1].dtype == torch.float32
    torch.testing.assert_close(got[-1].double(), ref, rtol=1e-5, atol=1e-5 * B * H * W * gu.abs().max().item())
    with pytest.raises(ValueError, match="finest stage's features"):
        kernels.bn_stats_gather_triton([kernels.StageOne(c1[:, :, :4], A1, a1), *rest], H, W)
    with pytest.raises(ValueError, match="finest stage's A"):
        kernels.bn_stats_gather_triton([kernels.StageOne(c1, A1[:, :5], a1), *rest], H, W)
