"""upsample_cross_entropy: every implementation against F.interpolate + F.cross_entropy, loss and logits gradient."""

import pytest
import torch

from segformer_fast.ops.upsample_cross_entropy import op as uce_op
from segformer_fast.backends import available_backends, cpu_extension
from segformer_fast.testing import backend_device, cuda_backend_unavailable_reason
from segformer_fast.ops import upsample_cross_entropy
from segformer_fast.ops.upsample_cross_entropy import upsample_cross_entropy_reference
from segformer_fast.utils.memory import SavedTensorRecorder


def _skip_reason(backend):
    if backend == "cuda":  # no GPU: the CPU stand-in (tests/conftest.py)
        return cuda_backend_unavailable_reason("upsample_cross_entropy_fwd")
    status = available_backends()[backend]
    if not status.available:
        return f"{backend} backend unavailable: {status.reason}"
    if backend == "cpp" and not hasattr(cpu_extension(), "upsample_cross_entropy_fwd"):
        return "segformer_fast._C_cpu was built without upsample_cross_entropy; rebuild with pip install --no-build-isolation -e ."
    return None


def _param(name):
    reason = _skip_reason(name)
    return pytest.param(name, marks=pytest.mark.skipif(reason is not None, reason=reason or ""), id=name)


ALL = [_param(b) for b in ("torch", "triton", "cpp", "cuda")]
NATIVE = [_param(b) for b in ("torch", "cpp", "cuda")]  # no interpreter: bigger shapes are cheap

# (B, K, h, w, H, W): odd upsampling, labels smaller than the logits, an exact 4x; K not a multiple of any block.
SHAPES = [(1, 5, 7, 9, 27, 35), (3, 37, 9, 7, 5, 4), (3, 19, 4, 6, 16, 24)]


def make_inputs(B, K, h, w, H, W, device="cpu", dtype=torch.float32, ignore=255, frac_ignored=0.2):
    logits = (torch.randn(B, K, h, w, device=device) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, K, (B, H, W), device=device)
    labels[torch.rand(B, H, W, device=device) < frac_ignored] = ignore
    return logits, labels


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()


def check(backend, B, K, h, w, H, W, reduction="mean", weighted=False, ignore=255, tol=2e-5):
    device = backend_device(backend)
    logits, labels = make_inputs(B, K, h, w, H, W, device, ignore=ignore)
    weight = torch.rand(K, device=device) + 0.1 if weighted else None
    want = upsample_cross_entropy_reference(logits, labels, ignore, weight, reduction)
    got = upsample_cross_entropy(logits, labels, ignore, weight, reduction, backend=backend)
    assert got.shape == want.shape and got.dtype == want.dtype
    assert rel_err(got, want) <= tol
    grad = torch.randn_like(want)
    (g_want,) = torch.autograd.grad(want, logits, grad)
    (g_got,) = torch.autograd.grad(got, logits, grad)
    assert g_got.shape == logits.shape
    assert rel_err(g_got, g_want) <= tol, f"logits gradient differs by {rel_err(g_got, g_want):.2e}"


@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("reduction,weighted", [("mean", False), ("mean", True), ("sum", True), ("none", False)])
def test_matches_reference(backend, shape, reduction, weighted):
    check(backend, *shape, reduction=reduction, weighted=weighted)


@pytest.mark.parametrize("shape", [(1, 5, 7, 9, 27, 35), (2, 70, 3, 4, 5, 9)], ids=str)
def test_triton_matches_reference(shape):
    # K = 70 spans two class blocks: the online logsumexp across blocks is exercised.
    if _skip_reason("triton"):
        pytest.skip(_skip_reason("triton"))
    check("triton", *shape, reduction="mean", weighted=True)


@pytest.mark.parametrize("backend", ALL)
def test_ignore_index_inside_the_class_range(backend):
    check(backend, 2, 6, 3, 5, 8, 9, ignore=0)  # class 0 ignored, PyTorch's rule


def test_torch_implementation_works_in_row_chunks(monkeypatch):
    monkeypatch.setattr(uce_op, "_CHUNK_ELEMENTS", 2 * 5 * 35 * 3)  # three output rows per chunk
    check("torch", 2, 5, 7, 9, 27, 35, weighted=True)


@pytest.mark.parametrize("backend", NATIVE)
def test_all_ignored_is_nan_with_zero_gradient(backend):
    device = backend_device(backend)
    logits = torch.randn(2, 4, 3, 3, device=device, requires_grad=True)
    labels = torch.full((2, 8, 8), 255, device=device)
    loss = upsample_cross_entropy(logits, labels, backend=backend)
    assert torch.isnan(loss) and torch.isnan(upsample_cross_entropy_reference(logits, labels))
    (g,) = torch.autograd.grad(loss, logits)
    assert torch.equal(g, torch.zeros_like(g))
    assert upsample_cross_entropy(logits, labels, reduction="sum", backend=backend).item() == 0.0


@pytest.mark.parametrize("backend", [_param("torch"), _param("cpp")])
def test_bfloat16(backend):
    # err(fast, ref_fp32) <= 2 * err(PyTorch in bf16, ref_fp32) + atol, loss and gradient.
    logits, labels = make_inputs(2, 19, 8, 10, 31, 40, dtype=torch.bfloat16)
    ref_in = logits.detach().float().requires_grad_()
    ref = upsample_cross_entropy_reference(ref_in, labels)
    low = torch.nn.functional.cross_entropy(
        torch.nn.functional.interpolate(logits, size=(31, 40), mode="bilinear"), labels, ignore_index=255
    )
    out = upsample_cross_entropy(logits, labels, backend=backend)
    assert out.dtype == torch.bfloat16
    assert abs(out.float() - ref).item() <= 2 * abs(low.float() - ref).item() + 1e-2
    (g_ref,) = torch.autograd.grad(ref, ref_in)
    (g_low,) = torch.autograd.grad(low, logits)
    (g_out,) = torch.autograd.grad(out, logits)
    assert g_out.dtype == torch.bfloat16
    err = lambda a: (a.float() - g_ref).abs().max().item()  # noqa: E731
    assert err(g_out) <= 2 * err(g_low) + 1e-3 * g_ref.abs().max().item()


@pytest.mark.parametrize("backend", [_param("cpp")])
def test_backward_is_deterministic(backend):
    logits, labels = make_inputs(3, 37, 9, 7, 36, 28)
    loss = upsample_cross_entropy(logits, labels, backend=backend)
    (g1,) = torch.autograd.grad(loss, logits, retain_graph=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        (g2,) = torch.autograd.grad(loss, logits)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(g1, g2)


def test_bad_inputs():
    logits = torch.randn(2, 5, 4, 4)
    labels = torch.randint(0, 5, (2, 16, 16))
    with pytest.raises(ValueError, match=r"logits must be a \(B, K, h, w\) tensor, got \(2, 5, 4\)"):
        upsample_cross_entropy(logits[..., 0], labels)
    with pytest.raises(ValueError, match=r"labels must be \(B, H, W\) with B=2, got \(1, 16, 16\)"):
        upsample_cross_entropy(logits, labels[:1])
    with pytest.raises(ValueError, match="integer tensor, got torch.float32"):
        upsample_cross_entropy(logits, labels.float())
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        upsample_cross_entropy(logits.double(), labels)
    with pytest.raises(ValueError, match=r"weight must be a floating \(5,\) tensor"):
        upsample_cross_entropy(logits, labels, weight=torch.ones(4))
    with pytest.raises(ValueError, match="reduction must be one of"):
        upsample_cross_entropy(logits, labels, reduction="avg")
    with pytest.raises(ValueError, match="unknown backend"):
        upsample_cross_entropy(logits, labels, backend="nope")
    for backend in ("torch", "cpp"):
        bad = labels.clone()
        bad[1, 3, 7] = 7
        with pytest.raises(ValueError, match=r"label value 7 is outside \[0, 5\)"):
            upsample_cross_entropy(logits, bad, backend=backend)
        bad[1, 3, 7] = -1
        with pytest.raises(ValueError, match="label value -1"):
            upsample_cross_entropy(logits, bad, backend=backend)


@pytest.mark.parametrize("backend", [_param("torch"), _param("cpp"), _param("triton"), _param("cuda")])
def test_opcheck(backend):
    dev = backend_device(backend)
    logits = torch.randn(2, 2, 3, 5, device=dev, requires_grad=True)  # (B, h, w, K), as the op takes it
    labels = torch.randint(0, 5, (2, 5, 4), device=dev)
    labels[0, 0] = 255
    weight = torch.rand(5, device=dev)
    for reduction in ("mean", "none"):
        torch.library.opcheck(torch.ops.segformer_fast.upsample_cross_entropy.default,
                              (logits, labels, weight, 255, reduction, backend))
    loss, lse = torch.ops.segformer_fast.upsample_cross_entropy(logits.detach(), labels, None, 255, "sum", backend)
    torch.library.opcheck(torch.ops.segformer_fast.upsample_cross_entropy_backward.default,
                          (torch.tensor(1.5, device=dev), logits.detach(), labels, None, lse, 255, "sum", backend))


def test_torch_compile_fullgraph():
    backend = "cpp" if _skip_reason("cpp") is None else "torch"
    logits, labels = make_inputs(2, 7, 5, 6, 19, 23)

    def f(x, y):
        return upsample_cross_entropy(x, y, backend=backend) * 2.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    loss = compiled(logits, labels)
    want = upsample_cross_entropy_reference(logits, labels) * 2.0
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(loss, logits)[0], torch.autograd.grad(want, logits)[0],
                               rtol=1e-4, atol=1e-7)


def _full_res_saved(fn, full):
    with SavedTensorRecorder() as rec:
        out = fn()
    return out, [s for s in rec.shapes if torch.Size(s).numel() >= full]


@pytest.mark.parametrize("backend", [_param("torch"), _param("cpp")])
def test_saves_nothing_of_full_resolution_times_classes(backend):
    B, K, H, W = 2, 19, 64, 80
    logits, labels = make_inputs(B, K, 16, 20, H, W)
    out, big = _full_res_saved(lambda: upsample_cross_entropy(logits, labels, backend=backend), B * K * H * W // 4)
    assert big == [], f"saved full-resolution x K tensors: {big}"
    out.backward()
    # the same check catches the literal composition, which keeps the upsampled logits
    _, big_ref = _full_res_saved(lambda: upsample_cross_entropy_reference(logits, labels), B * K * H * W // 4)
    assert (B, K, H, W) in big_ref


# ---------------------------------------------------------------------------------------------
# The Triton backward (row-streamed, column adjoint as a dot): every path of its program tiling.

def _triton_check(B, K, h, w, H, W, dtype=torch.float32, reduction="mean", weighted=True, ignore=255, tol=2e-5):
    if _skip_reason("triton"):
        pytest.skip(_skip_reason("triton"))
    logits, labels = make_inputs(B, K, h, w, H, W, dtype=dtype, ignore=ignore)
    weight = torch.rand(K) + 0.1 if weighted else None
    ref_in = logits.detach().float().requires_grad_()
    want = upsample_cross_entropy_reference(ref_in, labels, ignore, weight, reduction)
    got = upsample_cross_entropy(logits, labels, ignore, weight, reduction, backend="triton")
    assert got.shape == want.shape and got.dtype == dtype
    grad = torch.randn_like(want)
    (g_want,) = torch.autograd.grad(want, ref_in, grad)
    (g_got,) = torch.autograd.grad(got, logits, grad)
    assert g_got.dtype == dtype and g_got.shape == logits.shape
    assert rel_err(got, want) <= tol, f"loss differs by {rel_err(got, want):.2e}"
    assert rel_err(g_got, g_want) <= tol, f"logits gradient differs by {rel_err(g_got, g_want):.2e}"


# (B, K, h, w, H, W): 7x9 up to 28x36 (x4, two column blocks of the interpreter's 6), 13 -> 50 rows
# (non-integer, four row bands), 6 -> 23 columns; K = 33 (three class blocks, the last nearly
# empty) and 150 (SegFormer's ADE20K classes, ten blocks of 16) at a tiny size; labels smaller.
TRITON_SHAPES = [(1, 33, 7, 9, 28, 36), (1, 5, 13, 6, 50, 23), (1, 150, 3, 2, 8, 9), (3, 6, 9, 7, 5, 4)]


@pytest.mark.parametrize("shape", TRITON_SHAPES, ids=str)
def test_triton_backward_matches_reference(shape):
    _triton_check(*shape)


@pytest.mark.parametrize("reduction,weighted", [("sum", False), ("none", True)])
def test_triton_backward_reductions(reduction, weighted):
    _triton_check(3, 5, 5, 7, 19, 27, reduction=reduction, weighted=weighted)


def test_triton_backward_float16():
    # fp16 logits are loaded and upcast; the gradient is accumulated in fp32 and rounded once to fp16.
    _triton_check(1, 19, 7, 9, 28, 36, dtype=torch.float16, tol=2e-3)


def test_forward_class_block_pads_the_fewest_lanes():
    from segformer_fast.ops.upsample_cross_entropy import triton_kernels as tk

    # K = 150: 160 lanes with 16 or 32 (32 taken: fewer loop trips), 192 with 64
    assert {K: tk.fwd_class_block(K) for K in (1, 19, 64, 150, 171, 200)} == {
        1: 16, 19: 32, 64: 64, 150: 32, 171: 16, 200: 16}
    for K in (1, 19, 150, 171):
        assert tk.launch_config(K, gpu=True) == {"BLOCK_P": 2048 // tk.fwd_class_block(K),
                                                 "BLOCK_K": tk.fwd_class_block(K)}


def test_triton_backward_gpu_tiles():
    # The GPU configuration in the interpreter: 32 low-res rows per program.
    from segformer_fast.ops.triton_launch import force_gpu_launch_config
    from segformer_fast.ops.upsample_cross_entropy import triton_kernels as tk

    assert tk.bwd_launch_config(150, 256, 1024, gpu=True) == {
        "BLOCK_J": 16, "BLOCK_C": 32, "BLOCK_K": 16, "COLS": 7, "ROWS": 32}  # 8 first taps x 4 columns
    with force_gpu_launch_config():
        _triton_check(1, 5, 34, 17, 34, 68, ignore=0)  # 3 column blocks, 2 row bands; class 0 ignored


@pytest.mark.parametrize("ratio", [0.3, 1.0, 3.846, 4.0, 7.5, 31.0, 75.0], ids=str)
@pytest.mark.parametrize("gpu", [True, False], ids=["gpu", "interpreter"])
def test_triton_backward_column_plan_fits(ratio, gpu):
    # The launcher's bound: the output columns whose first tap is in any COLS + 1 consecutive
    # low-res columns fit in BLOCK_C (the kernel computes exactly these, by PyTorch's tap rule).
    from segformer_fast.ops.math_utils import bilinear_taps
    from segformer_fast.ops.upsample_cross_entropy import triton_kernels as tk

    for w in (2, 7, 13, 64, 257):
        W = max(1, round(w * ratio))
        cfg = tk.bwd_launch_config(150, w, W, gpu)
        assert 1 <= cfg["COLS"] <= cfg["BLOCK_J"] - 2
        i0 = bilinear_taps(w, W, 0, W, "cpu")[0]
        for j_lo in range(-1, w, cfg["COLS"]):
            n = int(((i0 >= j_lo) & (i0 <= j_lo + cfg["COLS"])).sum())
            assert n <= cfg["BLOCK_C"], (w, W, j_lo, n, cfg)
        if cfg["COLS"] < min(w, cfg["BLOCK_J"] - 2):  # and the most columns that fit: one more does not
            more = cfg["COLS"] + 1
            assert max(int(((i0 >= j) & (i0 <= j + more)).sum()) for j in range(-1, w, more)) > cfg["BLOCK_C"]


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_triton_backward_non_finite_at_tile_edges(value):
    # Planted on a column-block edge (the interpreter's COLS = 6) and a row-band edge (ROWS = 4):
    # non-finite exactly where the reference's are, and the rest of the gradient still right.
    if _skip_reason("triton"):
        pytest.skip(_skip_reason("triton"))
    logits, labels = make_inputs(1, 5, 9, 14, 11, 56)
    x = logits.detach().clone()
    x[0, 2, 4, 6] = value
    x[0, 0, 7, 12] = value
    ref_in, fast_in = x.clone().requires_grad_(), x.clone().requires_grad_()
    grad = torch.randn(1, 11, 56)
    (g_ref,) = torch.autograd.grad(upsample_cross_entropy_reference(ref_in, labels, reduction="none"), ref_in, grad)
    (g,) = torch.autograd.grad(upsample_cross_entropy(fast_in, labels, reduction="none", backend="triton"), fast_in, grad)
    bad = (lambda t: t.isnan()) if value != value else (lambda t: ~t.isfinite())
    assert bad(g_ref).any() and torch.equal(bad(g), bad(g_ref))
    ok = ~bad(g_ref)
    assert rel_err(g[ok], g_ref[ok]) <= 2e-5


def test_triton_backward_is_deterministic():
    if _skip_reason("triton"):
        pytest.skip(_skip_reason("triton"))
    logits, labels = make_inputs(1, 5, 5, 7, 10, 28)
    loss = upsample_cross_entropy(logits, labels, backend="triton")
    (g1,) = torch.autograd.grad(loss, logits, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, logits)
    assert torch.equal(g1, g2)


# ---------------------------------------------------------------------------------------------
# Label values on CUDA: checked without a host sync (the asynchronous path, run here on the CPU).

@pytest.fixture
def label_reports():
    uce_op._PENDING_LABEL_REPORTS.clear()
    yield uce_op._PENDING_LABEL_REPORTS
    uce_op._PENDING_LABEL_REPORTS.clear()


def test_label_check_asynchronous_path(label_reports):
    labels = torch.randint(0, 5, (2, 6, 7))
    assert torch.equal(uce_op._check_label_values(labels, 5, 255, asynchronous=True), labels)
    uce_op._raise_pending_label_error()  # good labels: nothing to raise
    assert label_reports == []
    bad = labels.clone()
    bad[0, 0, 0] = 255  # ignored: fine
    bad[1, 2, 3], bad[1, 4, 0] = 9, -3
    safe = uce_op._check_label_values(bad, 5, 255, asynchronous=True)  # no error yet: queued
    assert safe[1, 2, 3] == 255 and safe[1, 4, 0] == 255 and safe[0, 0, 0] == 255
    assert torch.equal(safe[bad == labels], labels[bad == labels])
    with pytest.raises(ValueError, match=r"label value 9 is outside \[0, 5\) and is not ignore_index=255 \(in the "
                                         r"labels of an earlier call"):
        uce_op._check_label_values(labels, 5, 255, asynchronous=True)  # the next call reports it
    assert label_reports == []


def test_label_check_waits_only_when_asked(label_reports):
    class Pending:  # an event whose copy has not landed yet
        done = False

        def query(self):
            return self.done

        def synchronize(self):
            self.done = True

    event = Pending()
    label_reports.append((event, torch.tensor([1, 7]), 5, 255))
    uce_op._raise_pending_label_error()  # not landed: no wait, nothing raised
    assert len(label_reports) == 1 and not event.done
    with pytest.raises(ValueError, match="label value 7"):
        uce_op._raise_pending_label_error(wait=True)
    assert event.done and label_reports == []
