"""ONNX translations of the fused ops: each op's reference math written in ONNX operators.

The fused ops are ``torch.library`` custom ops (``segformer_fast::<op>``) that ONNX has no kernels for.
``torch.onnx.export(..., dynamo=True)`` turns each op of the exported graph into ONNX through a
translation table; :data:`ONNX_TRANSLATIONS` gives it one entry per fused forward op, so a model that
uses the fused layers (``segformer_fast.patch`` of a Hugging Face Segformer, or our own models)
exports as it is, with dynamic height and width:

    >>> from segformer_fast.ops.onnx import ONNX_TRANSLATIONS
    >>> torch.onnx.export(model, (x,), "m.onnx", dynamo=True, custom_translation_table=ONNX_TRANSLATIONS,
    ...                   dynamic_shapes=...)

Each translation computes what the op's reference computes (``<op>_reference`` beside the op), in the
input's dtype with fp32 softmax / log-sum-exp, and returns every output the op returns (the saved
tensors of the training path included, which an inference graph then drops). The backward ops have no
translation: an ONNX graph is an inference graph.

The ONNX operators used are all in the default opset 18 (``LayerNormalization`` needs 17).
"""

from __future__ import annotations

import math

__all__ = ["ONNX_TRANSLATIONS", "onnx_translations", "register_onnx_translations"]

_SQRT_HALF = 1.0 / math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _op():
    from onnxscript import opset18

    return opset18


def _ints(*values):
    """A 1-d INT64 tensor from Python ints and 0-d / 1-d INT64 graph values (dynamic sizes)."""
    op = _op()
    parts = []
    for v in values:
        if isinstance(v, int):
            parts.append(op.Constant(value_ints=[v]))
        else:
            parts.append(op.Reshape(op.Cast(v, to=7), op.Constant(value_ints=[1])))  # 7: INT64
    return op.Concat(*parts, axis=0)


def _dim(x, axis: int):
    """x.shape[axis] as a 1-d INT64 tensor of one element."""
    return _op().Shape(x, start=axis, end=axis + 1)


def _linear(x, weight, bias):
    """F.linear: x (..., C_in) @ weight (C_out, C_in)^T + bias (C_out,); weights cast to x's dtype."""
    op = _op()
    y = op.MatMul(x, op.Transpose(op.CastLike(weight, x), perm=[1, 0]))
    return y if bias is None else op.Add(y, op.CastLike(bias, x))


def _gelu(x, approximate: str):
    """GELU in fp32 (erf form, or the tanh form with approximate="tanh"), returned in x's dtype."""
    op = _op()
    xf = op.Cast(x, to=1)  # 1: FLOAT
    if approximate == "tanh":
        inner = op.Mul(op.Add(xf, op.Mul(op.Mul(op.Mul(xf, xf), xf), op.Constant(value_float=0.044715))),
                       op.Constant(value_float=_SQRT_2_OVER_PI))
        g = op.Tanh(inner)
    else:
        g = op.Erf(op.Mul(xf, op.Constant(value_float=_SQRT_HALF)))
    y = op.Mul(op.Mul(xf, op.Constant(value_float=0.5)), op.Add(g, op.Constant(value_float=1.0)))
    return op.CastLike(y, x)


def _tokens_to_image(x, height, width):
    """(B, N, C) tokens, N = H*W row-major -> (B, C, H, W)."""
    op = _op()
    return op.Reshape(op.Transpose(x, perm=[0, 2, 1]), op.Concat(_dim(x, 0), _dim(x, 2), _ints(height, width), axis=0))


def _image_to_tokens(img):
    """(B, C, H, W) -> (B, H*W, C)."""
    op = _op()
    return op.Transpose(op.Reshape(img, op.Constant(value_ints=[0, 0, -1])), perm=[0, 2, 1])


def _empty_like(x):
    """An empty (0,) tensor of x's dtype: the op's placeholder for a saved tensor it did not keep."""
    op = _op()
    return op.CastLike(op.ConstantOfShape(op.Constant(value_ints=[0])), x)


def sr_attention_onnx(x, height, width, num_heads: int, sr: int, q_weight, q_bias, k_weight, k_bias, v_weight,
                      v_bias, proj_weight, proj_bias, sr_weight, sr_bias, norm_weight, norm_bias, eps: float,
                      backend: str, save_output: bool):
    """segformer_fast::sr_attention -> (y (B, N, C), lse (B, h, N) fp32, o (B, N, C) or empty), as
    sr_attention_reference."""
    op = _op()
    q = _linear(x, q_weight, q_bias)  # (B, N, C)
    if sr > 1:
        img = _tokens_to_image(x, height, width)  # (B, C, H, W)
        r = op.Conv(img, op.CastLike(sr_weight, x), *(() if sr_bias is None else (op.CastLike(sr_bias, x),)),
                    kernel_shape=[sr, sr], strides=[sr, sr])  # floors, as nn.Conv2d: (B, C, H//sr, W//sr)
        kvx, _, _ = op.LayerNormalization(_image_to_tokens(r), op.CastLike(norm_weight, x), op.CastLike(norm_bias, x),
                                          axis=-1, epsilon=float(eps))  # (B, M, C); also mean, 1/std
    else:
        kvx = x
    k, v = _linear(kvx, k_weight, k_bias), _linear(kvx, v_weight, v_bias)  # (B, M, C)
    heads = op.Constant(value_ints=[0, 0, num_heads, -1])

    def split(t):  # (B, L, C) -> (B, h, L, d), in fp32
        return op.Cast(op.Transpose(op.Reshape(t, heads), perm=[0, 2, 1, 3]), to=1)

    qh, kh, vh = split(q), split(k), split(v)
    head_dim = op.Cast(op.Shape(qh, start=3, end=4), to=1)
    scale = op.Reciprocal(op.Sqrt(head_dim))  # d**-0.5
    scores = op.Mul(op.MatMul(qh, op.Transpose(kh, perm=[0, 1, 3, 2])), scale)  # (B, h, N, M) fp32
    lse = op.ReduceLogSumExp(scores, op.Constant(value_ints=[-1]), keepdims=0)  # (B, h, N)
    o = op.MatMul(op.Softmax(scores, axis=-1), vh)  # (B, h, N, d)
    o = op.Reshape(op.Transpose(op.CastLike(o, x), perm=[0, 2, 1, 3]), op.Constant(value_ints=[0, 0, -1]))
    return _linear(o, proj_weight, proj_bias), lse, (o if save_output else _empty_like(x))


def _dwconv_gelu(h, height, width, weight, bias, approximate):
    """GELU(depthwise 3x3 conv(h) + bias) on (B, N, C) tokens."""
    op = _op()
    img = _tokens_to_image(h, height, width)  # (B, C, H, W)
    channels = weight.shape[0]  # static: the weight's shape
    y = op.Conv(img, op.CastLike(weight, h), op.CastLike(bias, h), kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                group=channels)
    return _gelu(_image_to_tokens(y), approximate)


def dwconv3x3_gelu_onnx(x, height, width, weight, bias, approximate: str, backend: str):
    """segformer_fast::dwconv3x3_gelu -> (B, N, C)."""
    return _dwconv_gelu(x, height, width, weight, bias, approximate)


def mix_ffn_onnx(x, w1, b1, wc, bc, w2, b2, height, width, approximate: str, backend: str, save_hidden: bool):
    """segformer_fast::mix_ffn -> (out (B, N, C_out), fc1's output or an empty tensor)."""
    h = _linear(x, w1, b1)  # (B, N, 4C)
    out = _linear(_dwconv_gelu(h, height, width, wc, bc, approximate), w2, b2)
    return out, (h if save_hidden else _empty_like(x))


def mlp_gelu_onnx(x, w1, b1, w2, b2, save_hidden: bool):
    """segformer_fast::mlp_gelu -> (fc2(GELU(fc1(x))), fc1's output or an empty tensor)."""
    h = _linear(x, w1, b1)
    return _linear(_gelu(h, "none"), w2, b2), (h if save_hidden else _empty_like(x))


def upsample_sum_onnx(maps, height, width, scale, shift, relu: bool, backend: str):
    """segformer_fast::upsample_sum: maps (B, h_i, w_i, D) -> relu?(scale * sum_i bilinear(maps_i) + shift),
    (B, H, W, D); bilinear as F.interpolate(align_corners=False)."""
    op = _op()
    m0 = maps[0]
    sizes = op.Concat(_dim(m0, 0), _dim(m0, 3), _ints(height, width), axis=0)  # NCHW output size
    total = None
    for m in maps:
        up = op.Resize(op.Transpose(m, perm=[0, 3, 1, 2]), None, None, sizes, mode="linear",
                       coordinate_transformation_mode="pytorch_half_pixel")  # (B, D, H, W)
        total = up if total is None else op.Add(total, up)
    out = op.Transpose(total, perm=[0, 2, 3, 1])  # (B, H, W, D)
    if scale is not None or shift is not None:
        acc = op.Cast(out, to=1)  # the affine in fp32, as the kernels
        if scale is not None:
            acc = op.Mul(acc, op.Cast(scale, to=1))
        if shift is not None:
            acc = op.Add(acc, op.Cast(shift, to=1))
        out = op.CastLike(acc, m0)
    return op.Relu(out) if relu else out


def upsample_cross_entropy_onnx(logits, labels, weight, ignore_index: int, reduction: str, backend: str):
    """segformer_fast::upsample_cross_entropy: logits (B, h, w, K) channels-last, labels (B, H, W) ->
    (loss in fp32: () or (B, H, W) for "none", per-pixel log-sum-exp (B, H, W) fp32)."""
    op = _op()
    x = op.Cast(op.Transpose(logits, perm=[0, 3, 1, 2]), to=1)  # (B, K, h, w) fp32
    sizes = op.Concat(_dim(x, 0), _dim(x, 1), op.Shape(labels, start=1, end=3), axis=0)
    up = op.Resize(x, None, None, sizes, mode="linear", coordinate_transformation_mode="pytorch_half_pixel")
    lse = op.ReduceLogSumExp(up, op.Constant(value_ints=[1]), keepdims=0)  # (B, H, W)
    logp = op.Sub(up, op.Unsqueeze(lse, op.Constant(value_ints=[1])))  # log-softmax over K
    args = (logp, labels) if weight is None else (logp, labels, op.Cast(weight, to=1))
    loss = op.NegativeLogLikelihoodLoss(*args, ignore_index=int(ignore_index), reduction=reduction)
    return loss, lse


def onnx_translations() -> dict:
    """{fused forward op overload: its ONNX translation}, for ``torch.onnx.export(custom_translation_table=...)``."""
    import torch

    from . import dwconv3x3_gelu, mix_ffn, mlp_gelu, sr_attention, upsample_cross_entropy, upsample_sum  # noqa: F401

    ops = torch.ops.segformer_fast
    return {
        ops.sr_attention.default: sr_attention_onnx,
        ops.dwconv3x3_gelu.default: dwconv3x3_gelu_onnx,
        ops.mix_ffn.default: mix_ffn_onnx,
        ops.mlp_gelu.default: mlp_gelu_onnx,
        ops.upsample_sum.default: upsample_sum_onnx,
        ops.upsample_cross_entropy.default: upsample_cross_entropy_onnx,
    }


def register_onnx_translations() -> None:
    """Make every ``torch.onnx.export(..., dynamo=True)`` of this process translate the fused ops, with no
    ``custom_translation_table`` argument: for exporters that call torch.onnx.export themselves
    (transformers', optimum's). Registers the translations in onnxscript's torch_lib registry, which
    torch.onnx reads at each export. Idempotent.

    Example:
        >>> segformer_fast.ops.onnx.register_onnx_translations()
        >>> torch.onnx.export(patched_model, (x,), "m.onnx", dynamo=True)
    """
    from onnxscript.function_libs.torch_lib.registration import default_registry, torch_op

    for target, fn in onnx_translations().items():
        name = target.name()  # "segformer_fast::sr_attention"
        if name not in default_registry:
            torch_op(name, trace_only=True)(fn)


def __getattr__(name: str):
    if name == "ONNX_TRANSLATIONS":  # built on first use: onnxscript is imported only by the translations
        return onnx_translations()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
