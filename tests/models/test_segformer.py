import math

import pytest
import torch

import segformer_fast as sf
from segformer_fast.configs import SEGFORMER_VARIANTS

PAPER_PARAMS_M = {"b0": 3.8, "b1": 13.7, "b2": 27.5, "b3": 47.3, "b4": 64.1, "b5": 84.7}


@pytest.mark.parametrize("variant", sorted(SEGFORMER_VARIANTS))
def test_parameter_count_matches_paper(variant):
    with torch.device("meta"):
        model = sf.segformer(variant, num_classes=150, backend="torch")
    n = sum(p.numel() for p in model.parameters()) / 1e6
    assert abs(n - PAPER_PARAMS_M[variant]) < 0.06, n


@pytest.mark.parametrize("hw", [(32, 32), (64, 96), (97, 131), (33, 65)])
def test_output_shapes(hw):
    model = sf.segformer("b0", num_classes=5, backend="torch", depths=(1, 1, 1, 1)).eval()
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        feats = model.encoder(x)
        logits = model.decoder(feats)
        full = model(x)
    h, w = hw
    for i, (f, c) in enumerate(zip(feats, model.config.hidden_sizes)):
        s = 4 * 2**i
        expect = (h, w)
        for _ in range(i + 1):  # each patch embedding rounds up
            expect = (math.ceil(expect[0] / (4 if _ == 0 else 2)), math.ceil(expect[1] / (4 if _ == 0 else 2)))
        assert f.shape == (2, c, *expect), (i, s, f.shape)
    assert logits.shape == (2, 5, math.ceil(h / 4), math.ceil(w / 4))
    torch.testing.assert_close(full, logits)


def test_drop_path_rates_spread_linearly():
    model = sf.segformer("b2", backend="torch", drop_path_rate=0.1)
    rates = [b.drop_path.p for st in model.encoder.stages for b in st.blocks]
    assert len(rates) == 16
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    assert all(b > a for a, b in zip(rates, rates[1:]))


def test_layer_norm_eps_defaults_follow_nvlabs():
    model = sf.segformer("b0", backend="torch")
    st = model.encoder.stages[0]
    assert st.patch_embed.norm.eps == 1e-5 and st.blocks[0].attn.sr_norm.eps == 1e-5
    assert st.blocks[0].norm1.eps == 1e-6 and st.norm.eps == 1e-6


@pytest.mark.parametrize(
    "x, err, match",
    [
        (torch.randn(3, 64, 64), ValueError, "rank 3"),
        (torch.randn(1, 1, 3, 64, 64), ValueError, "rank 5"),
        (torch.randn(1, 4, 64, 64), ValueError, "4 channels"),
        (torch.randn(1, 64, 64, 3), ValueError, "64 channels"),
        (torch.randn(1, 3, 31, 64), ValueError, "at least 32x32"),
        (torch.randn(1, 3, 64, 16), ValueError, "at least 32x32"),
        (torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), TypeError, "floating-point"),
        (torch.randn(1, 3, 64, 64, dtype=torch.float64), TypeError, "float64"),
        ("not a tensor", TypeError, "torch.Tensor"),
    ],
)
def test_bad_input_is_named(x, err, match):
    model = sf.segformer("b0", num_classes=3, backend="torch", depths=(1, 1, 1, 1))
    with pytest.raises(err, match=match):
        model(x)


def test_bad_variant_and_overrides():
    with pytest.raises(ValueError, match="unknown SegFormer variant 'b9'"):
        sf.segformer("b9")
    with pytest.raises(TypeError, match="unknown SegFormerConfig field"):
        sf.segformer("b0", depth=(1, 1, 1, 1))
    with pytest.raises(ValueError, match="not divisible"):
        sf.segformer("b0", hidden_sizes=(32, 64, 161, 256))
    with pytest.raises(ValueError, match="num_classes"):
        sf.segformer("b0", num_classes=0)


def test_decoder_rejects_wrong_features():
    model = sf.segformer("b0", num_classes=3, backend="torch", depths=(1, 1, 1, 1))
    feats = model.encoder(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="expects 4 feature maps"):
        model.decoder(feats[:3])
    with pytest.raises(ValueError, match="feature map 2 has 64 channels"):
        model.decoder([feats[0], feats[1], feats[1], feats[3]])


def test_loss_matches_manual_upsampled_cross_entropy():
    logits = torch.randn(2, 4, 9, 7, requires_grad=True)
    labels = torch.randint(0, 4, (2, 33, 27))
    labels[0, :5] = 255
    got = sf.segformer_loss_reference(logits, labels)
    up = torch.nn.functional.interpolate(logits, size=(33, 27), mode="bilinear", align_corners=False)
    want = torch.nn.functional.cross_entropy(up, labels, ignore_index=255)
    torch.testing.assert_close(got, want)
    with pytest.raises(TypeError, match="integer"):
        sf.segformer_loss_reference(logits, labels.float())
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        sf.segformer_loss_reference(logits, labels[0])


def test_autocast_bf16_runs_on_cpu():
    model = sf.segformer("b0", num_classes=3, backend="torch", depths=(1, 1, 1, 1)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
    assert torch.isfinite(low).all()
    assert (low.float() - ref).abs().max() < 0.1 * ref.abs().max() + 0.05
