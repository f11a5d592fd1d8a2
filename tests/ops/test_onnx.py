"""ONNX translations of the fused ops (segformer_fast.ops.onnx) against the ops themselves, in onnxruntime,
on awkward shapes, with a dynamic H and W where the op takes them."""

import pytest
import torch

from segformer_fast.ops.dwconv3x3_gelu import dwconv3x3_gelu
from segformer_fast.ops.mix_ffn import mix_ffn
from segformer_fast.ops.mlp_gelu import mlp_gelu
from segformer_fast.ops.sr_attention import sr_attention
from segformer_fast.ops.upsample_cross_entropy import upsample_cross_entropy
from segformer_fast.ops.upsample_sum import upsample_sum

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")


def _run_onnx(tmp_path, fn, inputs, dynamic_shapes=None):
    """Export ``fn`` (a function of tensors calling one op with grad on, so the custom op is in the graph)
    with the translation table; returns (onnx outputs, eager outputs) on ``inputs``."""
    from segformer_fast.ops.onnx import onnx_translations

    class M(torch.nn.Module):
        def forward(self, *xs):
            return fn(*xs)

    path = tmp_path / "op.onnx"
    with torch.enable_grad():
        torch.onnx.export(M(), tuple(inputs), path, dynamo=True, custom_translation_table=onnx_translations(),
                          dynamic_shapes=None if dynamic_shapes is None else (dynamic_shapes,), verbose=False)
    sess = ort.InferenceSession(str(path))
    return sess, lambda xs: (sess.run(None, {i.name: x.numpy() for i, x in zip(sess.get_inputs(), xs)}),
                             fn(*xs))


def _check(run, xs, atol=1e-5):
    got, want = run(xs)
    want = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got, want):
        w = w.detach()
        assert tuple(g.shape) == tuple(w.shape)
        torch.testing.assert_close(torch.from_numpy(g), w, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("sr", [1, 2])
def test_sr_attention_onnx(tmp_path, sr):
    torch.manual_seed(0)
    C, h = 24, 3
    w = {f"{n}_weight": torch.randn(C, C) * 0.2 for n in ("q", "k", "v", "proj")}
    w.update({f"{n}_bias": torch.randn(C) * 0.1 for n in ("q", "k", "v", "proj")})
    if sr > 1:
        w.update(sr_weight=torch.randn(C, C, sr, sr) * 0.1, sr_bias=torch.randn(C) * 0.1,
                 norm_weight=1 + 0.1 * torch.randn(C), norm_bias=0.1 * torch.randn(C))
    w = {k: v.requires_grad_() for k, v in w.items()}

    def fn(img):  # img (B, C, H, W): H and W come from its shape, as in a model
        x = img.flatten(2).transpose(1, 2)
        return sr_attention(x, img.shape[2:], h, sr=sr, **w)

    dims = {2: torch.export.Dim("H", min=4, max=64), 3: torch.export.Dim("W", min=4, max=64)}
    _, run = _run_onnx(tmp_path, fn, [torch.randn(2, C, 7, 9)], ({0: torch.export.Dim("B", max=8), **dims},))
    _check(run, [torch.randn(2, C, 7, 9)])
    _check(run, [torch.randn(3, C, 13, 6)])


@pytest.mark.parametrize("save_hidden", [True, False])
def test_mix_ffn_onnx(tmp_path, save_hidden):
    torch.manual_seed(0)
    C, Hd = 8, 20
    p = [torch.randn(Hd, C) * 0.3, torch.randn(Hd) * 0.1, torch.randn(Hd, 1, 3, 3) * 0.3, torch.randn(Hd) * 0.1,
         torch.randn(C, Hd) * 0.3, torch.randn(C) * 0.1]
    p = [t.requires_grad_() for t in p]

    def fn(img):
        return mix_ffn(img.flatten(2).transpose(1, 2), img.shape[2:], *p, save_hidden=save_hidden)

    dims = ({2: torch.export.Dim("H", min=2, max=64), 3: torch.export.Dim("W", min=2, max=64)},)
    _, run = _run_onnx(tmp_path, fn, [torch.randn(1, C, 7, 9)], dims)
    _check(run, [torch.randn(1, C, 7, 9)])
    _check(run, [torch.randn(1, C, 5, 12)])


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_dwconv3x3_gelu_onnx(tmp_path, approximate):
    torch.manual_seed(0)
    C = 12
    weight, bias = (torch.randn(C, 1, 3, 3) * 0.3).requires_grad_(), (torch.randn(C) * 0.1).requires_grad_()

    def fn(img):
        return dwconv3x3_gelu(img.flatten(2).transpose(1, 2), img.shape[2:], weight, bias, approximate)

    dims = ({2: torch.export.Dim("H", min=2, max=64), 3: torch.export.Dim("W", min=2, max=64)},)
    _, run = _run_onnx(tmp_path, fn, [torch.randn(1, C, 7, 9)], dims)
    _check(run, [torch.randn(1, C, 9, 7)])


def test_mlp_gelu_onnx(tmp_path):
    torch.manual_seed(0)
    p = [t.requires_grad_() for t in (torch.randn(20, 8) * 0.3, torch.randn(20) * 0.1, torch.randn(6, 20) * 0.3,
                                      torch.randn(6) * 0.1)]
    _, run = _run_onnx(tmp_path, lambda x: mlp_gelu(x, *p), [torch.randn(2, 5, 8)])
    _check(run, [torch.randn(2, 5, 8)])


@pytest.mark.parametrize("affine", [False, True])
def test_upsample_sum_onnx(tmp_path, affine):
    torch.manual_seed(0)
    D = 6
    scale, shift = ((1 + 0.2 * torch.randn(D)).requires_grad_(), (0.1 * torch.randn(D)).requires_grad_()) if affine \
        else (None, None)

    def fn(a, b, c):
        return upsample_sum([a, b, c], a.shape[2:], scale, shift, relu=affine)

    maps = [torch.randn(2, D, 13, 17, requires_grad=True), torch.randn(2, D, 7, 9), torch.randn(2, D, 4, 5)]
    _, run = _run_onnx(tmp_path, fn, maps)
    _check(run, [m.detach() for m in maps])


def test_upsample_cross_entropy_onnx(tmp_path):
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, 9, requires_grad=True)
    labels = torch.randint(0, 5, (2, 27, 35))
    labels[0, :3] = 255  # ignored pixels
    _, run = _run_onnx(tmp_path, lambda x, y: upsample_cross_entropy(x, y, ignore_index=255), [logits, labels])
    _check(run, [logits.detach(), labels])
