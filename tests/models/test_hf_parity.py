"""Our reference SegFormer is Hugging Face's function: same logits, loss and gradients."""

import pytest
import torch

import segformer_fast as sf
from segformer_fast.io.weights import convert_to_layout, detect_layout

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "b0": dict(),
    # B2's widths, heads and decoder dim with fewer blocks, to keep CI short
    "b2-short": dict(hidden_sizes=[64, 128, 320, 512], depths=[2, 1, 1, 1], decoder_hidden_size=768),
}


def _hf_model(name, **extra):
    cfg = transformers.SegformerConfig(num_labels=7, **CONFIGS[name], **extra)
    torch.manual_seed(0)
    model = transformers.SegformerForSemanticSegmentation(cfg)
    with torch.no_grad():  # non-trivial BN statistics and affine, so eval mode tests them
        bn = model.decode_head.batch_norm
        bn.running_mean.normal_(0, 0.1)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_(0, 0.1)
    return model


def _ours_from(hf):
    variant = "b2" if hf.config.decoder_hidden_size == 768 else "b0"
    model = sf.segformer(variant, num_classes=hf.config.num_labels, backend="torch",
                         depths=tuple(hf.config.depths), drop_path_rate=hf.config.drop_path_rate,
                         decoder_dropout=hf.config.classifier_dropout_prob)
    report = sf.load_weights(model, hf)
    assert report.decoder_loaded and not report.missing and not report.unexpected
    return model


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("hw", [(256, 256), (192, 320), (97, 131)])
def test_eval_logits_match_hf(name, hw):
    hf = _hf_model(name).eval()
    ours = _ours_from(hf).eval()
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        want = hf(pixel_values=x).logits
        got = ours(x)
    assert got.shape == want.shape == (2, 7, -(-hw[0] // 4), -(-hw[1] // 4))
    err = (got - want).abs().max().item()
    assert err <= 1e-5, err


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_train_loss_and_gradients_match_hf(name):
    hf = _hf_model(name, drop_path_rate=0.0, classifier_dropout_prob=0.0).train()
    ours = _ours_from(hf).train()
    x = torch.randn(2, 3, 96, 80)
    labels = torch.randint(0, 7, (2, 96, 80))
    labels[:, :10] = 255

    hf_loss = hf(pixel_values=x, labels=labels).loss
    hf_loss.backward()
    loss = ours.loss(ours(x), labels)
    loss.backward()
    torch.testing.assert_close(loss, hf_loss, rtol=1e-5, atol=1e-6)

    layout = detect_layout(hf.state_dict().keys())
    grads = convert_to_layout({n: p.grad for n, p in ours.named_parameters()}, ours.config, layout)
    hf_params = dict(hf.named_parameters())
    assert set(grads) == set(hf_params), set(grads) ^ set(hf_params)
    for key, g in grads.items():
        want = hf_params[key].grad
        scale = want.abs().max().item() + 1e-12
        assert (g - want).abs().max().item() <= 1e-4 * scale + 1e-7, key
    # BatchNorm's running statistics moved identically
    torch.testing.assert_close(ours.decoder.bn.running_mean, hf.decode_head.batch_norm.running_mean)
    torch.testing.assert_close(ours.decoder.bn.running_var, hf.decode_head.batch_norm.running_var)
    assert ours.decoder.bn.num_batches_tracked.item() == hf.decode_head.batch_norm.num_batches_tracked.item() == 1


def test_to_hf_round_trip():
    from segformer_fast.io.hf import to_hf

    ours = sf.segformer("b0", num_classes=4, backend="torch", depths=(1, 1, 1, 1)).eval()
    hf = to_hf(ours).eval()
    ours.set_layer_norm_eps(sf.LayerNormEps(1e-5, 1e-5, 1e-5, 1e-5))  # HF's convention
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert (hf(pixel_values=x).logits - ours(x)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fast_backend_matches_hf(name):
    """The default (fused) model: same logits in eval, same loss and gradients in training."""
    hf = _hf_model(name, drop_path_rate=0.0, classifier_dropout_prob=0.0).eval()
    variant = "b2" if hf.config.decoder_hidden_size == 768 else "b0"
    fast = sf.segformer(variant, num_classes=7, backend="auto", depths=tuple(hf.config.depths),
                        drop_path_rate=0.0, decoder_dropout=0.0)
    sf.load_weights(fast, hf)
    fast.eval()
    x = torch.randn(2, 3, 97, 131)
    with torch.no_grad():
        want = hf(pixel_values=x).logits
        got = fast(x)
    scale = want.abs().max().item()
    assert (got - want).abs().max().item() <= 1e-5 * max(scale, 1.0)

    hf.train()
    fast.train()
    x = torch.randn(2, 3, 64, 96)
    labels = torch.randint(0, 7, (2, 64, 96))
    hf_loss = hf(pixel_values=x, labels=labels).loss
    hf_loss.backward()
    loss = fast.loss(fast(x), labels)
    loss.backward()
    torch.testing.assert_close(loss, hf_loss, rtol=1e-5, atol=1e-6)
    grads = convert_to_layout({n: p.grad for n, p in fast.named_parameters()}, fast.config,
                              detect_layout(hf.state_dict().keys()))
    hf_params = dict(hf.named_parameters())
    for key, g in grads.items():
        want = hf_params[key].grad
        assert (g - want).abs().max().item() <= 1e-4 * want.abs().max().item() + 1e-6, key


def test_recompute_memory_mode_same_gradients_less_memory():
    from segformer_fast.utils.memory import SavedTensorRecorder

    torch.manual_seed(0)
    save = sf.segformer("b0", num_classes=5, depths=(1, 1, 1, 1), drop_path_rate=0.0, decoder_dropout=0.0)
    recompute = sf.segformer("b0", num_classes=5, depths=(1, 1, 1, 1), drop_path_rate=0.0, decoder_dropout=0.0,
                             memory="recompute")
    recompute.load_state_dict(save.state_dict())
    x = torch.randn(1, 3, 64, 64)
    labels = torch.randint(0, 5, (1, 64, 64))
    saved = {}
    for name, m in (("save", save), ("recompute", recompute)):
        with SavedTensorRecorder(list(m.parameters()) + list(m.buffers())) as rec:
            loss = m.loss(m(x), labels)
        loss.backward()
        saved[name] = rec.bytes
    assert saved["recompute"] < saved["save"]
    for (n, a), b in zip(save.named_parameters(), recompute.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6, msg=n)
    with pytest.raises(ValueError, match="memory must be one of"):
        sf.segformer("b0", memory="checkpointed")


def _score_like_shapes(shapes, dims):
    """Saved shapes ending in an N x M score/probability matrix, for the stages where N x M is large."""
    return [s for s in shapes for _, n, m in dims if n * m >= 65536 and len(s) >= 2 and tuple(s[-2:]) in ((n, m), (m, n))]


def test_fast_model_training_keeps_no_attention_matrix():
    """Training forward of the fused model at 320x256 (stage 1: N = 5120, M = 80) saves no N x M tensor."""
    from segformer_fast.utils.memory import SavedTensorRecorder

    kw = dict(num_classes=5, depths=(1, 1, 1, 1), drop_path_rate=0.0)
    x = torch.randn(2, 3, 320, 256)
    fast = sf.segformer("b0", backend="auto", **kw).train()
    cfg = fast.config
    dims, (h, w) = [], (320, 256)
    for i in range(4):
        h, w = -(-h // cfg.strides[i]), -(-w // cfg.strides[i])
        dims.append((2 * cfg.num_heads[i], h * w, (h // cfg.sr_ratios[i]) * (w // cfg.sr_ratios[i])))
    assert dims[0][1:] == (5120, 80)
    with SavedTensorRecorder() as rec:
        fast.loss(fast(x), torch.randint(0, 5, (2, 320, 256)))
    assert rec.shapes, "the recorder saw nothing"
    assert _score_like_shapes(rec.shapes, dims) == []

    # the same check catches a model that does keep the probabilities (Hugging Face, eager attention)
    from segformer_fast.io.hf import to_hf

    hf = to_hf(fast, attn_implementation="eager").train()
    with SavedTensorRecorder() as rec:
        hf(pixel_values=x)
    assert _score_like_shapes(rec.shapes, dims)
