"""patch()/unpatch() on Hugging Face and our own models, torch.compile, autocast and ONNX export."""

import pytest
import torch

import segformer_fast as sf
from segformer_fast.io.weights import convert_to_layout, detect_layout

transformers = pytest.importorskip("transformers")


def _hf(num_labels=5, **kw):
    torch.manual_seed(0)
    cfg = transformers.SegformerConfig(num_labels=num_labels, depths=[1, 2, 1, 1], **kw)
    model = transformers.SegformerForSemanticSegmentation(cfg)
    with torch.no_grad():
        model.decode_head.batch_norm.running_var.uniform_(0.5, 2.0)
        model.decode_head.batch_norm.running_mean.normal_(0, 0.1)
    return model


def test_patch_hf_keeps_parameters_keys_and_logits():
    hf = _hf().eval()
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        want = hf(pixel_values=x).logits
    params = [id(p) for p in hf.parameters()]
    sd = hf.state_dict()
    opt = torch.optim.SGD(hf.parameters(), lr=0.1)  # built before patching: must keep working

    assert sf.patch(hf) is hf and sf.is_patched(hf)
    assert type(hf.decode_head).__name__ == "PatchedSegformerDecodeHead"
    assert type(hf.segformer.stages[0].blocks[0].attention).__name__ == "PatchedSegformerAttention"
    assert type(hf.segformer.stages[0].blocks[0].mlp).__name__ == "PatchedSegformerMixMLP"
    assert [id(p) for p in hf.parameters()] == params
    new_sd = hf.state_dict()
    assert list(new_sd) == list(sd)
    assert all(new_sd[k].data_ptr() == sd[k].data_ptr() for k in sd)
    with torch.no_grad():
        got = hf(pixel_values=x).logits
    assert (got - want).abs().max() <= 1e-4

    hf.train()
    hf.config.classifier_dropout_prob = 0.0
    hf.decode_head.dropout.p = 0.0
    labels = torch.randint(0, 5, (2, 97, 131))
    loss = hf(pixel_values=x, labels=labels).loss
    loss.backward()
    opt.step()  # the optimizer's params are the patched model's params
    assert all(p.grad is not None for p in hf.parameters())

    sf.unpatch(hf)
    assert not sf.is_patched(hf)
    assert type(hf.decode_head).__name__ == "SegformerDecodeHead"
    assert [id(p) for p in hf.parameters()] == params


def test_patched_hf_training_matches_unpatched():
    ref = _hf(drop_path_rate=0.0, classifier_dropout_prob=0.0).train()
    fast = _hf(drop_path_rate=0.0, classifier_dropout_prob=0.0).train()
    fast.load_state_dict(ref.state_dict())
    sf.patch(fast, memory="recompute")
    fused = [m.fused() for m in fast.modules() if hasattr(m, "fused")]
    assert {type(f).__name__ for f in fused if hasattr(f, "memory")} == {"FusedSpatialReductionAttention",
                                                                        "FusedMixFFN"}
    assert {f.memory for f in fused if hasattr(f, "memory")} == {"recompute"}
    x = torch.randn(2, 3, 64, 96)
    labels = torch.randint(0, 5, (2, 64, 96))
    out_ref = ref(pixel_values=x, labels=labels, output_hidden_states=True)
    out = fast(pixel_values=x, labels=labels, output_hidden_states=True)
    torch.testing.assert_close(out.loss, out_ref.loss, rtol=1e-5, atol=1e-6)
    assert len(out.hidden_states) == len(out_ref.hidden_states) == 4
    out.loss.backward()
    out_ref.loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in fast.named_parameters():
        want = ref_params[name].grad
        assert (p.grad - want).abs().max() <= 1e-4 * want.abs().max() + 1e-6, name
    torch.testing.assert_close(fast.decode_head.batch_norm.running_var, ref.decode_head.batch_norm.running_var)


def test_patch_our_reference_model_and_unpatch():
    model = sf.segformer("b0", num_classes=4, backend="torch", depths=(1, 1, 1, 1)).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        want = model(x)
    keys = list(model.state_dict())
    sf.patch(model)
    assert type(model.decoder).__name__ == "FusedAllMLPDecoder"
    assert type(model.encoder.stages[0].blocks[0].mlp).__name__ == "FusedMixFFN"
    assert list(model.state_dict()) == keys
    with torch.no_grad():
        assert (model(x) - want).abs().max() <= 1e-4
    sf.unpatch(model)
    assert type(model.decoder).__name__ == "AllMLPDecoder"
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=0, atol=0)


def test_patch_errors():
    with pytest.raises(TypeError, match="patch\\(\\) supports segformer_fast.SegFormer"):
        sf.patch(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown backend"):
        sf.patch(_hf(), backend="fastest")
    with pytest.raises(ValueError, match="memory must be one of"):
        sf.patch(_hf(), memory="everything")
    if not sf.available_backends()["cuda"].available:
        with pytest.raises(RuntimeError, match="backend 'cuda' is not available"):
            sf.patch(_hf(), backend="cuda")


def test_patch_image_classification_model():
    torch.manual_seed(0)
    cfg = transformers.SegformerConfig(num_labels=3, depths=[1, 1, 1, 1])
    model = transformers.SegformerForImageClassification(cfg).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        want = model(pixel_values=x).logits
        sf.patch(model)
        got = model(pixel_values=x).logits
    assert (got - want).abs().max() <= 1e-4


def _fast_backend():
    return "auto" if sf.available_backends()["cpp"].available else "torch"


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_compile_fullgraph_patched_model(mode):
    """Our patched model compiles as one graph, forward and backward: every fused op is traceable."""
    torch._dynamo.reset()
    model = sf.segformer("b0", num_classes=4, backend="torch", depths=(1, 1, 1, 1), drop_path_rate=0.0,
                         decoder_dropout=0.0)
    sf.patch(model, backend=_fast_backend())
    model.train(mode == "train")
    x = torch.randn(1, 3, 64, 64)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    if mode == "eval":
        with torch.no_grad():
            assert (compiled(x) - model(x)).abs().max() <= 1e-4
    else:
        compiled(x).float().sum().backward()
        assert all(p.grad is not None for p in model.parameters())


def test_compile_patched_hf_pieces_fullgraph_and_no_new_breaks():
    """The patched HF layers compile as single graphs (forward and backward), and patching adds no
    graph break to the whole model (transformers' own output capturing breaks it either way)."""
    torch._dynamo.reset()
    hf = _hf(drop_path_rate=0.0, classifier_dropout_prob=0.0).train()
    x = torch.randn(1, 3, 64, 64)
    before = torch._dynamo.explain(hf)(pixel_values=x).graph_break_count
    torch._dynamo.reset()
    sf.patch(hf, backend=_fast_backend())
    after = torch._dynamo.explain(hf)(pixel_values=x).graph_break_count
    assert after <= before

    torch._dynamo.reset()
    # a model that has not run: once it has, transformers' output-capturing hooks (on the stages and the
    # attention, patched or not: attentions are captured from it) break a graph compiled outside its forward
    hf = sf.patch(_hf(drop_path_rate=0.0, classifier_dropout_prob=0.0).train(), backend=_fast_backend())
    block = hf.segformer.stages[0].blocks[0]  # patched attention + Mix-FFN
    tokens = torch.randn(1, 16 * 16, 32, requires_grad=True)
    out = torch.compile(block, fullgraph=True, backend="aot_eager")(tokens, 16, 16)
    feats = [torch.randn(1, c, 16 // 2**i, 16 // 2**i, requires_grad=True) for i, c in enumerate((32, 64, 160, 256))]
    logits = torch.compile(hf.decode_head, fullgraph=True, backend="aot_eager")(feats)
    (out.sum() + logits.sum()).backward()
    assert block.attention.q_proj.weight.grad is not None and block.mlp.fc1.weight.grad is not None
    assert hf.decode_head.linear_fuse.weight.grad is not None and feats[3].grad is not None


def test_autocast_bf16_patched_within_low_precision_tolerance():
    hf = _hf().eval()
    ref = _hf().eval()
    ref.load_state_dict(hf.state_dict())
    sf.patch(hf)
    x = 4.0 * torch.randn(1, 3, 64, 96)  # large activations
    with torch.no_grad():
        want = ref(pixel_values=x).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = hf(pixel_values=x).logits.float()
            torch_low = ref(pixel_values=x).logits.float()
    assert torch.isfinite(got).all()
    err, err_torch = (got - want).abs().max().item(), (torch_low - want).abs().max().item()
    assert err <= 2 * err_torch + 1e-2 * want.abs().max().item(), (err, err_torch)

    hf.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = hf(pixel_values=x, labels=torch.randint(0, 5, (1, 64, 96))).loss
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in hf.parameters() if p.grad is not None)


def test_export_onnx_dynamic_hw(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = sf.segformer("b0", num_classes=4, depths=(1, 1, 1, 1)).eval()  # fast backend
    path = sf.export_onnx(model, tmp_path / "m.onnx", example_size=(64, 64))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    sess = ort.InferenceSession(str(path))
    for hw in [(64, 96), (97, 131)]:
        x = torch.randn(1, 3, *hw)
        with torch.no_grad():
            want = model(x)
        got = torch.from_numpy(sess.run(None, {"images": x.numpy()})[0])
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-4


def test_export_onnx_patched_hf(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    hf = sf.patch(_hf().eval())
    sf.export_onnx(hf, tmp_path / "hf.onnx", example_size=(64, 64))
    assert sf.is_patched(hf)  # the model itself is left as it was
    sess = ort.InferenceSession(str(tmp_path / "hf.onnx"))
    for hw in [(64, 64), (96, 160)]:
        x = torch.randn(2, 3, *hw)
        with torch.no_grad():
            want = hf(pixel_values=x).logits
        assert (torch.from_numpy(sess.run(None, {"images": x.numpy()})[0]) - want).abs().max() <= 1e-4


def test_patched_hf_loss_is_fused_and_tuple_outputs_work():
    from segformer_fast.utils.memory import SavedTensorRecorder

    hf = _hf(drop_path_rate=0.0, classifier_dropout_prob=0.0).train()
    x = torch.randn(1, 3, 64, 96)
    labels = torch.randint(0, 5, (1, 64, 96))
    want = hf(pixel_values=x, labels=labels).loss
    sf.patch(hf)
    params = list(hf.parameters()) + list(hf.buffers())
    with SavedTensorRecorder(params) as rec:
        out = hf(pixel_values=x, labels=labels)
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-6)
    assert (1, 5, 64, 96) not in rec.shapes  # no full-resolution logits kept for backward
    as_tuple = hf(pixel_values=x, labels=labels, return_dict=False)
    torch.testing.assert_close(as_tuple[0], want, rtol=1e-5, atol=1e-6)
    assert as_tuple[1].shape == (1, 5, 16, 24)
    sf.unpatch(hf)
    assert "forward" not in hf.__dict__


def _tiny_hf(**kw):
    """A small SegformerForSemanticSegmentation with random BatchNorm statistics, patched."""
    torch.manual_seed(0)
    cfg = transformers.SegformerConfig(num_labels=5, depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 40, 64],
                                       num_attention_heads=[1, 2, 2, 4], decoder_hidden_size=32, **kw)
    model = transformers.SegformerForSemanticSegmentation(cfg)
    with torch.no_grad():
        model.decode_head.batch_norm.running_var.uniform_(0.5, 2.0)
        model.decode_head.batch_norm.running_mean.normal_(0, 0.1)
    return model.eval()


def test_deepcopy_of_patched_model_computes_with_its_own_weights():
    import copy

    hf = sf.patch(_tiny_hf())
    twin = copy.deepcopy(hf)
    assert sf.is_patched(twin)
    x, labels = torch.randn(1, 3, 64, 96), torch.randint(0, 5, (1, 64, 96))
    with torch.no_grad():
        before = hf(pixel_values=x).logits
        for p in twin.parameters():
            p.mul_(0.5)
        got_twin, got = twin(pixel_values=x, labels=labels), hf(pixel_values=x).logits
        ref = sf.unpatch(copy.deepcopy(twin))  # the halved weights, reference layers
        want = ref(pixel_values=x, labels=labels)
    assert torch.equal(got, before)  # the original is untouched
    assert (got_twin.logits - before).abs().max() > 1e-3  # the copy computes with its own, halved weights
    torch.testing.assert_close(got_twin.logits, want.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_twin.loss, want.loss, rtol=1e-5, atol=1e-6)


def test_torch_save_load_patched_model_round_trip(tmp_path):
    hf = sf.patch(_tiny_hf())
    torch.save(hf, tmp_path / "model.pt")  # before any forward: transformers' capture hooks are local functions
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert sf.is_patched(loaded) and type(loaded).__name__ == "SegformerForSemanticSegmentation"
    x, labels = torch.randn(1, 3, 64, 96), torch.randint(0, 5, (1, 64, 96))
    with torch.no_grad():
        want, got = hf(pixel_values=x, labels=labels), loaded(pixel_values=x, labels=labels)
        torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
        torch.testing.assert_close(got.loss, want.loss, rtol=0, atol=0)
        for p in loaded.parameters():
            p.mul_(0.5)
        assert (loaded(pixel_values=x).logits - want.logits).abs().max() > 1e-3
    sf.unpatch(loaded)
    assert type(loaded) is transformers.SegformerForSemanticSegmentation


def test_averaged_model_of_patched_model_tracks_its_own_weights():
    from torch.optim.swa_utils import AveragedModel

    hf = sf.patch(_tiny_hf())
    ema = AveragedModel(hf)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        before = hf(pixel_values=x).logits
        for p in hf.parameters():
            p.mul_(0.5)
        torch.testing.assert_close(ema(pixel_values=x).logits, before, rtol=0, atol=0)  # its own weights
        ema.update_parameters(hf)  # the first update copies the model's weights
        torch.testing.assert_close(ema(pixel_values=x).logits, hf(pixel_values=x).logits, rtol=1e-6, atol=1e-7)


def test_torch_export_dynamic_hw_patched_hf():
    hf = sf.patch(_tiny_hf())
    # H, W >= 64: below, the 1/32 stage is 1 pixel wide, a size torch.export specialises
    dims = {2: torch.export.Dim("h", min=64, max=1024), 3: torch.export.Dim("w", min=64, max=1024)}
    ep = torch.export.export(hf, (), {"pixel_values": torch.randn(1, 3, 64, 96)}, dynamic_shapes={"pixel_values": dims})
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert {"segformer_fast.sr_attention.default", "segformer_fast.mix_ffn.default"} <= targets  # the fused ops
    for hw in [(64, 96), (97, 131)]:
        x = torch.randn(1, 3, *hw)
        with torch.no_grad():
            torch.testing.assert_close(ep.module()(pixel_values=x).logits, hf(pixel_values=x).logits,
                                       rtol=1e-5, atol=1e-6)


def test_jit_trace_patched_hf():
    hf = sf.patch(_tiny_hf(), backend="torch")
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        traced = torch.jit.trace(hf, (x,), strict=False)
        torch.testing.assert_close(traced(x)["logits"], hf(pixel_values=x).logits, rtol=1e-5, atol=1e-6)


def test_torch_onnx_export_of_patched_hf_as_it_is(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    hf = sf.patch(_tiny_hf())  # registers the fused ops' ONNX translations: no translation table passed below
    dims = {2: torch.export.Dim("h", min=64, max=1024), 3: torch.export.Dim("w", min=64, max=1024)}
    torch.onnx.export(hf, (torch.randn(1, 3, 64, 96),), tmp_path / "m.onnx", dynamo=True, dynamic_shapes=(dims,),
                      input_names=["pixel_values"], verbose=False)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"))
    for hw in [(64, 96), (97, 131)]:
        x = torch.randn(1, 3, *hw)
        with torch.no_grad():
            want = hf(pixel_values=x).logits
        got = torch.from_numpy(sess.run(None, {"pixel_values": x.numpy()})[0])
        assert got.shape == want.shape and (got - want).abs().max() <= 1e-4


@pytest.mark.parametrize("hooks_before_patch", [False, True])
def test_output_attentions_patched_hf_returns_reference_probabilities(hooks_before_patch):
    ref = _tiny_hf(attn_implementation="eager")
    hf = _tiny_hf()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        want = ref(pixel_values=x, output_attentions=True)
        if hooks_before_patch:  # transformers installs its capture hooks on the first forward asking for them
            hf(pixel_values=x, output_hidden_states=True)
        sf.patch(hf)
        got = hf(pixel_values=x, output_attentions=True)
        plain = hf(pixel_values=x)
    assert len(want.attentions) == 4 and len(got.attentions) == 4
    for a, b in zip(got.attentions, want.attentions):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.logits, want.logits, rtol=1e-4, atol=1e-5)
    assert plain.attentions is None or len(plain.attentions) == 0  # the fused path when not asked
    got.logits.sum()  # and the tuple form
    as_tuple = hf(pixel_values=x, output_attentions=True, return_dict=False)
    assert len(as_tuple[-1]) == 4


def test_patch_refuses_meta_weights():
    cfg = transformers.SegformerConfig(num_labels=5, depths=[1, 1, 1, 1])
    with torch.device("meta"):
        model = transformers.SegformerForSemanticSegmentation(cfg)
    with pytest.raises(ValueError, match="meta device"):
        sf.patch(model)
    assert not sf.is_patched(model)


def test_patch_refuses_accelerate_offload(tmp_path):
    pytest.importorskip("accelerate", reason="accelerate is not installed: the offload case needs it")
    _tiny_hf().save_pretrained(tmp_path / "m")
    model = transformers.SegformerForSemanticSegmentation.from_pretrained(
        tmp_path / "m", device_map={"segformer": "cpu", "decode_head": "disk"}, offload_folder=str(tmp_path / "off"))
    with pytest.raises(ValueError, match="accelerate offloads the weights"):
        sf.patch(model)
    assert not sf.is_patched(model)
    assert model(pixel_values=torch.randn(1, 3, 64, 64)).logits.shape == (1, 5, 16, 16)  # still usable unpatched
