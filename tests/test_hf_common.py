"""A patched Hugging Face Segformer checked the way transformers' common model tests check any model:
save/load, deepcopy, pickling, hidden states, attentions, training with gradient checkpointing,
torch.compile, torch.export (static and dynamic H, W), ONNX export and fp16/bf16 casts, for the three
Segformer classes ``segformer_fast.patch`` supports. Every case compares with the unpatched model of the
same weights.

Nothing here is refused: all three classes patch, and every case runs. Limits asserted instead:
``torch.save`` of a model that has run a forward fails in transformers itself (its output-capturing
hooks are local functions), so pickling is checked before the first forward; dynamic export takes
H, W >= 64 (below, the 1/32 stage is one pixel, a size torch.export specialises).
"""

import copy

import pytest
import torch

import segformer_fast as sf

transformers = pytest.importorskip("transformers")

CLASSES = ["SegformerModel", "SegformerForImageClassification", "SegformerForSemanticSegmentation"]
X_SHAPE = (1, 3, 64, 96)


def _pair(name, **kw):
    """(unpatched reference, patched model) of one class, same weights, eval mode."""
    torch.manual_seed(0)
    cfg = transformers.SegformerConfig(num_labels=5, depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 40, 64],
                                       num_attention_heads=[1, 2, 2, 4], decoder_hidden_size=32,
                                       drop_path_rate=0.0, classifier_dropout_prob=0.0, **kw)
    ref = getattr(transformers, name)(cfg).eval()
    if hasattr(ref, "decode_head"):
        with torch.no_grad():
            ref.decode_head.batch_norm.running_var.uniform_(0.5, 2.0)
            ref.decode_head.batch_norm.running_mean.normal_(0, 0.1)
    model = copy.deepcopy(ref)
    return ref, sf.patch(model)


def _main(out):
    """The class's main output: logits, or the last hidden state of SegformerModel."""
    if isinstance(out, tuple):
        return out[0]
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits


def _labels(name, b=1):
    if name == "SegformerForSemanticSegmentation":
        return {"labels": torch.randint(0, 5, (b, *X_SHAPE[2:]))}
    if name == "SegformerForImageClassification":
        return {"labels": torch.randint(0, 5, (b,))}
    return {}


def _close(a, b, tol=1e-4):
    assert a.shape == b.shape
    assert (a - b).abs().max() <= tol * max(1.0, b.abs().max().item()), (a - b).abs().max()


@pytest.mark.parametrize("name", CLASSES)
def test_save_pretrained_round_trip(name, tmp_path):
    ref, model = _pair(name)
    model.save_pretrained(tmp_path)
    loaded = getattr(transformers, name).from_pretrained(tmp_path).eval()
    assert type(loaded) is getattr(transformers, name) and not sf.is_patched(loaded)
    assert loaded.config.architectures == [name]
    x = torch.randn(X_SHAPE)
    with torch.no_grad():
        _close(_main(sf.patch(loaded)(pixel_values=x)), _main(ref(pixel_values=x)))


@pytest.mark.parametrize("name", CLASSES)
def test_deepcopy_computes_with_its_own_weights(name):
    ref, model = _pair(name)
    twin = copy.deepcopy(model)
    x = torch.randn(X_SHAPE)
    with torch.no_grad():
        before = _main(model(pixel_values=x))
        for p in list(twin.parameters()) + list(ref.parameters()):
            p.mul_(0.5)
        _close(_main(twin(pixel_values=x)), _main(ref(pixel_values=x)))
        assert torch.equal(_main(model(pixel_values=x)), before)


@pytest.mark.parametrize("name", CLASSES)
def test_pickle_round_trip(name, tmp_path):
    ref, model = _pair(name)
    torch.save(model, tmp_path / "m.pt")  # before a forward: see the module docstring
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert sf.is_patched(loaded) and type(loaded).__name__ == name
    x = torch.randn(X_SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(_main(loaded(pixel_values=x)), _main(model(pixel_values=x)), rtol=0, atol=0)


@pytest.mark.parametrize("name", CLASSES)
def test_hidden_states(name):
    ref, model = _pair(name)
    x = torch.randn(X_SHAPE)
    with torch.no_grad():
        got, want = model(pixel_values=x, output_hidden_states=True), ref(pixel_values=x, output_hidden_states=True)
    assert len(got.hidden_states) == len(want.hidden_states) == 4
    for a, b in zip(got.hidden_states, want.hidden_states):
        _close(a, b)


@pytest.mark.parametrize("name", CLASSES)
def test_attentions(name):
    ref, model = _pair(name, attn_implementation="eager")  # the reference returns probabilities with eager
    x = torch.randn(X_SHAPE)
    with torch.no_grad():
        got, want = model(pixel_values=x, output_attentions=True), ref(pixel_values=x, output_attentions=True)
    assert len(got.attentions) == len(want.attentions) == 4
    for a, b in zip(got.attentions, want.attentions):
        _close(a, b, 1e-5)
    _close(_main(got), _main(want))


@pytest.mark.parametrize("name", CLASSES)
def test_training_with_gradient_checkpointing(name):
    ref, model = _pair(name)
    for m in (ref, model):
        m.train()
        m.gradient_checkpointing_enable()
    x, labels = torch.randn(2, *X_SHAPE[1:]), _labels(name, 2)
    losses = []
    for m in (ref, model):
        out = m(pixel_values=x, **labels)
        loss = out.loss if labels else out.last_hidden_state.square().mean()
        loss.backward()
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    ref_params = dict(ref.named_parameters())
    for pname, p in model.named_parameters():
        want = ref_params[pname].grad
        assert p.grad is not None, pname
        assert (p.grad - want).abs().max() <= 1e-4 * want.abs().max() + 1e-6, pname
    if hasattr(model, "decode_head"):
        _close(model.decode_head.batch_norm.running_var, ref.decode_head.batch_norm.running_var, 1e-5)


@pytest.mark.parametrize("name", CLASSES)
def test_torch_compile(name):
    torch._dynamo.reset()
    ref, model = _pair(name)
    x = torch.randn(X_SHAPE)
    with torch.no_grad():
        _close(_main(torch.compile(model, backend="aot_eager")(pixel_values=x)), _main(ref(pixel_values=x)))


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_export(name, dynamic):
    ref, model = _pair(name)
    x = torch.randn(X_SHAPE)
    dims = {2: torch.export.Dim("h", min=64, max=1024), 3: torch.export.Dim("w", min=64, max=1024)}
    ep = torch.export.export(model, (), {"pixel_values": x},
                             dynamic_shapes={"pixel_values": dims} if dynamic else None)
    assert any("segformer_fast" in str(n.target) for n in ep.graph.nodes)  # the fused ops are in the graph
    for hw in [(64, 96), (97, 131)] if dynamic else [(64, 96)]:
        y = torch.randn(1, 3, *hw)
        with torch.no_grad():
            _close(_main(ep.module()(pixel_values=y)), _main(ref(pixel_values=y)))
    with torch.no_grad():  # exporting leaves the model as it was
        _close(_main(model(pixel_values=x)), _main(ref(pixel_values=x)))


@pytest.mark.parametrize("name", CLASSES)
def test_onnx_export(name, tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    ref, model = _pair(name)
    dims = {2: torch.export.Dim("h", min=64, max=1024), 3: torch.export.Dim("w", min=64, max=1024)}
    torch.onnx.export(model, (torch.randn(X_SHAPE),), tmp_path / "m.onnx", dynamo=True, dynamic_shapes=(dims,),
                      input_names=["pixel_values"], verbose=False)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    for hw in [(64, 96), (97, 131)]:
        y = torch.randn(1, 3, *hw)
        with torch.no_grad():
            want = _main(ref(pixel_values=y))
        _close(torch.from_numpy(sess.run(None, {"pixel_values": y.numpy()})[0]), want)


@pytest.mark.parametrize("name", CLASSES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_cast(name, dtype):
    """err(patched in dtype, fp32) <= 2 err(unpatched in dtype, fp32) + atol (the flash-attention rule)."""
    ref, model = _pair(name)
    x = torch.randn(X_SHAPE)
    with torch.no_grad():
        want = _main(ref(pixel_values=x)).float()
        low_ref = copy.deepcopy(ref).to(dtype)
        model.to(dtype)
        got = _main(model(pixel_values=x.to(dtype)))
        torch_low = _main(low_ref(pixel_values=x.to(dtype))).float()
    assert got.dtype == dtype and torch.isfinite(got).all()
    err, err_torch = (got.float() - want).abs().max().item(), (torch_low - want).abs().max().item()
    assert err <= 2 * err_torch + 1e-2 * want.abs().max().item(), (err, err_torch)
