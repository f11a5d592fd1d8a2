"""Every fused op takes fp16 and bf16 inputs directly: forward and every gradient, every backend.

The rule (segformer_fast.testing.precision, the flash-attention tests' rule), for the output and the
gradient of every input and weight:

    err(ours, ref64) <= 2 * err(torch_lowp, ref64) + atol,      err = max |a - b|

- ours: the op on fp16/bf16 tensors, through the backend the test names (asserted to be the
  implementation that runs, not a fallback);
- torch_lowp: the op's ``*_reference`` on the same fp16/bf16 tensors. The references of
  dwconv3x3_gelu, upsample_sum, upsample_cross_entropy and sr_attention upcast to fp32 inside, so
  there the bar is fp32 arithmetic rounded once to the storage dtype; those of mix_ffn, mlp_gelu,
  all_mlp_decoder and conv_bn_relu_up are nn compositions that run in the given dtype. For the
  model, the torch-backend model converted to the same dtype;
- ref64: the same reference on the same values upcast to float64.

atol is one unit in the last place of the dtype at the tensor's largest entry (2**-10 ~ 1e-3 for
fp16, 2**-7 ~ 1e-2 for bf16, times max(1, max|ref64|)). Rounding a result once to the storage
dtype costs up to half of that, and where the reference rounds to the nearer neighbour by luck
(its error ~0: a sum rounded once, a gradient that is zero in exact arithmetic) twice its error is
no bound. An accumulation in the storage dtype or a lost term costs several units and fails
(test_the_rule_rejects_accumulating_in_the_storage_dtype).

Triton runs in its interpreter here, whose bf16 ``tl.dot`` is wrong (Triton 3.9): the launchers
refuse bf16 CPU tensors (ops/triton_launch.py), so bf16 Triton is tested on a GPU only. "cuda"
runs on the CPU stand-in of the extension without a GPU (tests/conftest.py).

Measured ratios err(ours) / err(torch_lowp) are kept as each test's property "ratios":
``pytest tests/ops/test_low_precision.py -o junit_family=xunit1 --junitxml=lowp.xml``.
"""

from __future__ import annotations

import math

import pytest
import torch

from segformer_fast.backends import available_backends
from segformer_fast.configs import get_config
from segformer_fast.dispatch import Explanation, get_spec, record
from segformer_fast.models.segformer import SegFormer
from segformer_fast.ops.all_mlp_decoder import all_mlp_decoder_reference, all_mlp_decoder_train, fold_weights
from segformer_fast.ops.conv_bn_relu_up import conv_bn_relu_up, conv_bn_relu_up_reference
from segformer_fast.ops.dwconv3x3_gelu import dwconv3x3_gelu, dwconv3x3_gelu_reference
from segformer_fast.ops.mix_ffn import mix_ffn, mix_ffn_reference
from segformer_fast.ops.mlp_gelu import mlp_gelu, mlp_gelu_reference
from segformer_fast.ops.sr_attention import sr_attention, sr_attention_reference
from segformer_fast.ops.sr_attention.op import CORE
from segformer_fast.ops.triton_launch import interpreter_refuses
from segformer_fast.ops.upsample_cross_entropy import upsample_cross_entropy, upsample_cross_entropy_reference
from segformer_fast.ops.upsample_sum import upsample_sum, upsample_sum_reference
from segformer_fast.testing import backend_device, cuda_backend_unavailable_reason, perturb_parameters
from segformer_fast.testing.precision import assert_lowp_close, lowp_errors

DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
ULP = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}  # the atol: one ulp at 1 (see the module docstring)
KERNEL_BACKENDS = ("torch", "triton", "cpp", "cuda")


def _skip_unless_runs(backend: str, dtype: torch.dtype) -> str:
    """The device ``backend`` runs on here; skips (with the reason shown) where it cannot run ``dtype``."""
    if backend == "cuda":
        reason = cuda_backend_unavailable_reason()  # no GPU: the CPU stand-in (tests/conftest.py selects it)
    else:
        status = available_backends()[backend]
        reason = None if status.available else f"{backend} backend unavailable: {status.reason}"
    if reason:
        pytest.skip(reason)
    device = backend_device(backend)
    if backend == "triton" and interpreter_refuses(torch.empty(0, dtype=dtype, device=device)):
        pytest.skip("Triton's interpreter computes bf16 tl.dot wrongly (Triton 3.9): the Triton launchers refuse "
                    "bf16 CPU tensors, so bf16 Triton kernels are checked on a GPU only")
    return device


def _assert_runs(op: str, backend: str, x: torch.Tensor, **facts) -> None:
    """The implementation that runs for ``x`` is the one asked for, not a fallback."""
    assert get_spec(op).resolve(backend, x, **facts).backend == backend


def _forward_backward(fn, tensors: dict, fixed: dict, dtype, device) -> dict:
    """fn(leaves, fixed) on ``tensors`` (leaves) and ``fixed`` (no gradient) cast to ``dtype`` on ``device``
    -> {"out": y, "d<name>": dy/d<name> for every leaf}, on the CPU, for an output gradient drawn from a fixed seed.

    Every leaf must get a gradient, in its own dtype.
    """
    leaves = {k: v.detach().to(device, dtype).requires_grad_() for k, v in tensors.items()}
    consts = {k: v.to(device, dtype) for k, v in fixed.items()}
    out = fn(leaves, consts)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    grads = torch.autograd.grad(out, list(leaves.values()), grad_out.to(device, out.dtype), allow_unused=True)
    res = {"out": out.detach().cpu()}
    for (name, leaf), g in zip(leaves.items(), grads):
        assert g is not None, f"no gradient for {name}"
        assert g.dtype == leaf.dtype, f"d{name} is {g.dtype}, its input {leaf.dtype}"
        res[f"d{name}"] = g.cpu()
    return res


def _check_rule(fast, reference, tensors: dict, dtype, device, record_property, fixed: dict | None = None) -> None:
    """ours = fast(leaves, fixed) on ``device``; torch_lowp = reference(...) in ``dtype`` and ref64 = reference(...)
    in float64, both on the CPU. Forward and every gradient must satisfy the rule."""
    fixed = fixed or {}
    ref64 = _forward_backward(reference, tensors, fixed, torch.float64, "cpu")
    lowp = _forward_backward(reference, tensors, fixed, dtype, "cpu")
    ours = _forward_backward(fast, tensors, fixed, dtype, device)
    assert ours["out"].dtype == dtype
    _assert_rule(ours, lowp, ref64, dtype, record_property)


def _assert_rule(ours: dict, lowp: dict, ref64: dict, dtype, record_property) -> None:
    """The rule for every entry, atol one ulp at the entry's scale; the ratios err(ours) / err(torch_lowp)
    are recorded first as the test's property "ratios" (pytest -o junit_family=xunit1 --junitxml=...)."""
    ratios = {}
    for key, r in ref64.items():
        err, err_torch = lowp_errors(ours[key], lowp[key], r)
        ratios[key] = round(err / err_torch, 3) if err_torch > 0 else (0.0 if err == 0 else math.inf)
    record_property("ratios", ratios)
    for key, r in ref64.items():
        assert_lowp_close(ours[key], lowp[key], r, atol=ULP[dtype] * max(1.0, r.abs().max().item()), name=key)


def _randn(*shape, scale=1.0):
    return torch.randn(*shape, dtype=torch.float64) * scale


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_rule_rejects_accumulating_in_the_storage_dtype(dtype):
    """The bound is tight enough to fail a sum over 1024 terms rounded to fp16/bf16 after each add (what a
    kernel accumulating in its storage dtype does) against the same sum accumulated in fp32."""
    t = dict(x=_randn(1024, 5))

    def rounded_each_add(p, _):
        acc = p["x"][0]
        for row in p["x"][1:]:
            acc = acc + row  # fp16/bf16 + fp16/bf16: rounded at every step
        return acc

    def fp32_sum(p, _):
        return p["x"].to(torch.promote_types(p["x"].dtype, torch.float32)).sum(0).to(p["x"].dtype)

    with pytest.raises(AssertionError, match="out: error .* exceeds"):
        _check_rule(rounded_each_add, fp32_sum, t, dtype, "cpu", lambda *a: None)


# ---------------------------------------------------------------------------------------------
# dwconv3x3_gelu


@pytest.mark.parametrize("shape", [(3, 7, 9, 33), (1, 13, 11, 70)], ids=lambda s: "B{}_{}x{}_C{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_dwconv3x3_gelu(backend, dtype, shape, record_property):
    device = _skip_unless_runs(backend, dtype)
    b, h, w, c = shape
    t = dict(x=_randn(b, h * w, c), weight=_randn(c, 1, 3, 3, scale=0.5), bias=_randn(c, scale=0.5))
    _assert_runs("dwconv3x3_gelu", backend, t["x"].to(device, dtype))
    _check_rule(lambda p, _: dwconv3x3_gelu(p["x"], (h, w), p["weight"], p["bias"], backend=backend),
                lambda p, _: dwconv3x3_gelu_reference(p["x"], (h, w), p["weight"], p["bias"]),
                t, dtype, device, record_property)


# ---------------------------------------------------------------------------------------------
# upsample_sum


@pytest.mark.parametrize("b, hw", [(3, (13, 11)), (1, (7, 9))], ids=["B3_13x11", "B1_7x9"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_upsample_sum(backend, dtype, b, hw, record_property):
    device = _skip_unless_runs(backend, dtype)
    d = 20  # not a multiple of any block
    sizes = [hw]
    for _ in range(3):  # the stage maps, ceil-halved
        sizes.append((math.ceil(sizes[-1][0] / 2), math.ceil(sizes[-1][1] / 2)))
    t = {f"map{i}": _randn(b, d, h, w) for i, (h, w) in enumerate(sizes)}
    t.update(scale=torch.rand(d, dtype=torch.float64) + 0.5, shift=_randn(d, scale=0.5))
    _assert_runs("upsample_sum", backend, t["map0"].to(device, dtype))

    def args(p):
        return [p[f"map{i}"] for i in range(len(sizes))], hw, p["scale"], p["shift"], True

    _check_rule(lambda p, _: upsample_sum(*args(p), backend=backend), lambda p, _: upsample_sum_reference(*args(p)),
                t, dtype, device, record_property)


# ---------------------------------------------------------------------------------------------
# upsample_cross_entropy


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_upsample_cross_entropy(backend, dtype, reduction, record_property):
    device = _skip_unless_runs(backend, dtype)
    b, k, (h, w), (hh, ww) = 3, 19, (7, 9), (27, 35)
    t = dict(logits=_randn(b, k, h, w, scale=3.0))
    labels = torch.randint(0, k, (b, hh, ww))
    labels[torch.rand(b, hh, ww) < 0.2] = 255
    class_weight = torch.rand(k) + 0.1  # fp32 in every run (the op takes class weights as fp32)
    _assert_runs("upsample_cross_entropy", backend, t["logits"].to(device, dtype))

    def fast(p, _):
        return upsample_cross_entropy(p["logits"], labels.to(device), 255, class_weight.to(device), reduction,
                                      backend=backend)

    def reference(p, _):
        return upsample_cross_entropy_reference(p["logits"], labels, 255, class_weight, reduction)

    _check_rule(fast, reference, t, dtype, device, record_property)


# ---------------------------------------------------------------------------------------------
# sr_attention


# (B, H, W, C, heads, sr): head dims 32 (the Triton kernels'), odd N and M, sr 1 (plain attention).
SR_SHAPES = [(3, 7, 9, 64, 2, 2), (1, 13, 11, 32, 1, 4), (1, 5, 7, 64, 2, 1)]


# every backend with the attention output kept for backward (memory="save"); the kernels' own backends also with
# it recomputed there in 16 bits (memory="recompute")
SR_MODES = [(b, True) for b in KERNEL_BACKENDS] + [("triton", False), ("cuda", False)]


@pytest.mark.parametrize("shape", SR_SHAPES, ids=lambda s: "B{}_{}x{}_C{}_h{}_sr{}".format(*s))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend, save_output", SR_MODES,
                         ids=[f"{b}-{'save' if keep else 'recompute'}" for b, keep in SR_MODES])
def test_sr_attention(backend, save_output, dtype, shape, record_property):
    device = _skip_unless_runs(backend, dtype)
    b, h, w, c, heads, sr = shape
    s = c**-0.5  # weights of unit gain: activations stay of order one
    t = {f"{n}_weight": _randn(c, c, scale=s) for n in ("q", "k", "v", "proj")}
    t.update({f"{n}_bias": _randn(c, scale=0.1) for n in ("q", "k", "v", "proj")})
    if sr > 1:
        t.update(sr_weight=_randn(c, c, sr, sr, scale=s / sr), sr_bias=_randn(c, scale=0.1),
                 norm_weight=1 + _randn(c, scale=0.2), norm_bias=_randn(c, scale=0.2))
    t["x"] = _randn(b, h * w, c)
    x_low = t["x"].to(device, dtype)
    _assert_runs("sr_attention", backend, x_low)  # cpp: its declared implementation is the torch one
    if backend == "triton":  # and the attention core that runs is the Triton one, not its torch fallback
        assert CORE.resolve("triton", x_low, use_env=False, head_dim=c // heads).backend == "triton"

    def call(fn, p, **kw):
        return fn(p["x"], (h, w), heads, sr=sr, **{k: v for k, v in p.items() if k != "x"}, **kw)

    _check_rule(lambda p, _: call(sr_attention, p, backend=backend, save_output=save_output),
                lambda p, _: call(sr_attention_reference, p), t, dtype, device, record_property)


# ---------------------------------------------------------------------------------------------
# mix_ffn (its conv + GELU on the dwconv3x3_gelu op, whose backend is the test's)


@pytest.mark.parametrize("save_hidden", [True, False], ids=["save", "recompute"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_mix_ffn(backend, dtype, save_hidden, record_property):
    device = _skip_unless_runs(backend, dtype)
    b, (h, w), c, hidden = 3, (7, 9), 8, 36
    t = dict(x=_randn(b, h * w, c), w1=_randn(hidden, c, scale=c**-0.5), b1=_randn(hidden, scale=0.1),
             wc=_randn(hidden, 1, 3, 3, scale=0.3), bc=_randn(hidden, scale=0.1),
             w2=_randn(c, hidden, scale=hidden**-0.5), b2=_randn(c, scale=0.1))
    _assert_runs("mix_ffn", "torch", t["x"].to(device, dtype))
    _assert_runs("dwconv3x3_gelu", backend, torch.empty(b, h * w, hidden, device=device, dtype=dtype))
    names = ("w1", "b1", "wc", "bc", "w2", "b2")
    _check_rule(lambda p, _: mix_ffn(p["x"], (h, w), *(p[n] for n in names), backend=backend, save_hidden=save_hidden),
                lambda p, _: mix_ffn_reference(p["x"], (h, w), *(p[n] for n in names)),
                t, dtype, device, record_property)


# ---------------------------------------------------------------------------------------------
# mlp_gelu (torch only)


@pytest.mark.parametrize("save_hidden", [True, False], ids=["save", "recompute"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_gelu(dtype, save_hidden, record_property):
    c, hd, c_out = 12, 40, 9
    t = dict(x=_randn(3, 5, c), w1=_randn(hd, c, scale=c**-0.5), b1=_randn(hd, scale=0.1),
             w2=_randn(c_out, hd, scale=hd**-0.5), b2=_randn(c_out, scale=0.1))
    _assert_runs("mlp_gelu", "torch", t["x"].to(dtype))
    names = ("x", "w1", "b1", "w2", "b2")
    _check_rule(lambda p, _: mlp_gelu(*(p[n] for n in names), save_hidden=save_hidden),
                lambda p, _: mlp_gelu_reference(*(p[n] for n in names)), t, dtype, "cpu", record_property)


# ---------------------------------------------------------------------------------------------
# all_mlp_decoder (training; its upsample-and-sum on the upsample_sum op, whose backend is the test's)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_all_mlp_decoder_train(backend, dtype, record_property):
    device = _skip_unless_runs(backend, dtype)
    chans, sizes, d, k = (8, 12, 20, 24), [(9, 13), (5, 7), (3, 4), (2, 2)], 16, 5
    t = {f"feat{i}": _randn(3, c, h, w) for i, (c, (h, w)) in enumerate(zip(chans, sizes))}
    t.update({f"weight{i}": _randn(d, c, scale=c**-0.5) for i, c in enumerate(chans)})
    t.update({f"bias{i}": _randn(d, scale=0.1) for i in range(4)})
    t.update(fuse_weight=_randn(d, 4 * d, 1, 1, scale=(4 * d) ** -0.5), bn_weight=1 + _randn(d, scale=0.2),
             bn_bias=_randn(d, scale=0.1), cls_weight=_randn(k, d, 1, 1, scale=d**-0.5), cls_bias=_randn(k, scale=0.1))
    _assert_runs("all_mlp_decoder", "torch", t["feat0"].to(device, dtype))
    _assert_runs("upsample_sum", backend, t["feat0"].to(device, dtype))

    def stages(p, name):
        return [p[f"{name}{i}"] for i in range(4)]

    def fast(p, _):
        A, a = fold_weights(p["fuse_weight"], stages(p, "weight"), stages(p, "bias"))
        return all_mlp_decoder_train(stages(p, "feat"), A, a, p["bn_weight"], p["bn_bias"], p["cls_weight"].view(k, d),
                                     p["cls_bias"], eps=1e-5, backend=backend)[0]

    def reference(p, _):
        return all_mlp_decoder_reference(stages(p, "feat"), stages(p, "weight"), stages(p, "bias"), p["fuse_weight"],
                                         p["bn_weight"], p["bn_bias"], None, None, p["cls_weight"], p["cls_bias"],
                                         training=True)

    _check_rule(fast, reference, t, dtype, device, record_property)


# ---------------------------------------------------------------------------------------------
# conv_bn_relu_up (torch only)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("k, scale, classes", [(3, 2, 4), (1, 1, 0)], ids=["k3_up2_cls", "k1"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_bn_relu_up(dtype, k, scale, classes, training, record_property):
    c_in, c_out = 5, 6
    t = dict(x=_randn(3, c_in, 7, 9), weight=_randn(c_out, c_in, k, k, scale=(c_in * k * k) ** -0.5),
             bn_weight=torch.rand(c_out, dtype=torch.float64) + 0.5, bn_bias=_randn(c_out, scale=0.1))
    if classes:
        t.update(cls_weight=_randn(classes, c_out, 1, 1, scale=c_out**-0.5), cls_bias=_randn(classes, scale=0.1))
    stats = {} if training else dict(mean=_randn(c_out, scale=0.1), var=torch.rand(c_out, dtype=torch.float64) + 0.5)
    _assert_runs("conv_bn_relu_up", "torch", t["x"].to(dtype))

    def call(fn, p, s):
        return fn(p["x"], p["weight"], p["bn_weight"], p["bn_bias"], s.get("mean"), s.get("var"), training=training,
                  scale=scale, cls_weight=p.get("cls_weight"), cls_bias=p.get("cls_bias"))

    _check_rule(lambda p, s: call(conv_bn_relu_up, p, s), lambda p, s: call(conv_bn_relu_up_reference, p, s),
                t, dtype, "cpu", record_property, fixed=stats)


# ---------------------------------------------------------------------------------------------
# a whole SegFormer-B0 converted with .to(dtype): a training step


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["torch", "cpp"])
def test_segformer_b0_training_step(backend, dtype, record_property):
    """Training forward, loss and backward of a model converted with ``.to(dtype)``: finite, in ``dtype``,
    every fused op in the backend asked for; the logits and the loss within the rule against the fp64
    model, with the torch model in ``dtype`` as PyTorch's own error (for backend "torch" that model is
    the one tested, so the rule would be vacuous and only the training step is checked)."""
    device = _skip_unless_runs(backend, dtype)
    cfg = get_config("b0", num_classes=5, drop_path_rate=0.0, decoder_dropout=0.0)
    ref = perturb_parameters(SegFormer(cfg, backend="torch")).double().train()  # batch statistics in every BatchNorm
    x = torch.randn(1, 3, 65, 97, dtype=torch.float64)  # odd sizes: every stage crops in the reduction
    labels = torch.randint(0, 5, (1, 65, 97))
    labels[0, :9] = 255

    def low(b):
        m = SegFormer(cfg, backend=b)
        m.load_state_dict(ref.state_dict())
        return m.to(device, dtype).train()

    model = low(backend)
    with record() as log:
        logits = model(x.to(device, dtype))
        loss = model.loss(logits, labels.to(device))
    loss.backward()
    chosen = Explanation(log).chosen()
    for op, impl in chosen.items():  # ops without a kernel in ``backend`` run torch
        assert impl == (backend if backend in get_spec(op).impls else "torch"), (op, impl)
    if backend != "torch":  # the torch model runs the reference layers, no fused op
        assert {"sr_attention", "dwconv3x3_gelu", "upsample_sum", "upsample_cross_entropy"} <= set(chosen), chosen
    assert logits.dtype == dtype and loss.dtype == dtype
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == dtype and torch.isfinite(p.grad).all(), name
    if backend == "torch":
        return

    with torch.no_grad():
        results = {}
        for name, m, dt in (("lowp", low("torch"), dtype), ("ref64", ref, torch.float64)):
            out = m(x.to(device, dt))
            results[name] = {"logits": out.cpu(), "loss": m.loss(out, labels.to(device)).cpu()}
    ours = {"logits": logits.detach().cpu(), "loss": loss.detach().cpu()}
    _assert_rule(ours, results["lowp"], results["ref64"], dtype, record_property)
