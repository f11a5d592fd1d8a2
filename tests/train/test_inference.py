import os
import types

import numpy as np
import pytest
import torch
from torch import nn

import segformer_fast as sf
from segformer_fast.tools.cli import main
from segformer_fast.train.imageio import palette, read_image, read_mask, write_png
from segformer_fast.train.inference import evaluate_dataset, predict_probs, window_starts


class PointwiseModel(nn.Module):
    """Per-pixel logits at full resolution: any tiling must reproduce the whole-image result."""

    def __init__(self, k=5):
        super().__init__()
        self.conv = nn.Conv2d(3, k, 1)
        self.config = types.SimpleNamespace(num_classes=k)

    def forward(self, x):
        return self.conv(x)


def test_window_starts_cover_the_image():
    assert window_starts(100, 40, 30) == [0, 30, 60]
    assert window_starts(100, 50, 50) == [0, 50]
    assert window_starts(30, 40, 30) == [0]


@pytest.mark.parametrize("window,stride", [(32, 32), (48, 24), (40, 29)])
def test_sliding_equals_whole_for_a_pointwise_model(window, stride):
    model = PointwiseModel().eval()
    x = torch.randn(2, 3, 96, 128)
    whole = predict_probs(model, x)
    slide = predict_probs(model, x, window=window, stride=stride)
    torch.testing.assert_close(slide, whole, rtol=1e-6, atol=1e-6)


def test_sliding_window_covering_the_image_equals_whole_segformer():
    model = sf.segformer("b0", num_classes=4).eval()
    x = torch.randn(1, 3, 64, 96)
    whole = predict_probs(model, x)
    assert torch.equal(predict_probs(model, x, window=96, stride=64), whole)
    tiled = predict_probs(model, x, window=64, stride=32)  # real tiles: a global-attention model differs
    assert tiled.shape == whole.shape and not torch.equal(tiled, whole)


def test_multiscale_flip_shapes_and_probabilities():
    model = sf.segformer("b0", num_classes=3).eval()
    x = torch.randn(1, 3, 45, 70)  # odd size; the 0.5 scale is below the model's 32-pixel minimum
    probs = predict_probs(model, x, scales=(0.5, 0.75, 1.0, 1.25), flip=True)
    assert probs.shape == (1, 3, 45, 70)
    torch.testing.assert_close(probs.sum(1), torch.ones(1, 45, 70))
    both = predict_probs(model, x, scales=(0.5, 0.75, 1.0, 1.25), flip=True, window=40, stride=30)
    assert both.shape == (1, 3, 45, 70)


def test_flip_average_of_a_mirror_model_is_symmetric():
    model = PointwiseModel(2).eval()
    x = torch.randn(1, 3, 32, 40)
    p = predict_probs(model, x, flip=True)
    torch.testing.assert_close(p, predict_probs(model, x))  # pointwise: flip changes nothing
    with pytest.raises(ValueError, match="stride"):
        predict_probs(model, x, window=16, stride=32)


def test_evaluate_dataset_on_a_perfect_and_a_constant_model():
    class Data:
        num_classes, ignore_index = 2, 255

        def __len__(self):
            return 3

        def __getitem__(self, i):
            image = np.zeros((40, 50, 3), np.uint8)
            image[:, 25:] = 255
            mask = (image[..., 0] > 0).astype(np.int64)
            mask[0, 0] = 255
            return image, mask

    model = PointwiseModel(2).eval()
    with torch.no_grad():  # class 1 wins where the (normalised) red channel is high
        model.conv.weight.zero_()
        model.conv.weight[1, 0, 0, 0] = 10.0
        model.conv.bias.zero_()
    conf = evaluate_dataset(model, Data(), batch=2)
    assert torch.equal(conf, torch.tensor([[3 * (40 * 25 - 1), 0], [0, 3 * 40 * 25]]))
    with torch.no_grad():
        model.conv.weight.zero_()
        model.conv.bias.copy_(torch.tensor([1.0, 0.0]))
    conf = evaluate_dataset(model, Data())
    assert torch.equal(conf, torch.tensor([[3 * (40 * 25 - 1), 0], [3 * 40 * 25, 0]]))


def test_predict_cli_writes_labels_colours_overlays(tmp_path, capsys):
    model = sf.segformer("b0", num_classes=4)
    sf.save_weights(model, tmp_path / "w.safetensors")
    rng = np.random.default_rng(0)
    write_png(tmp_path / "in" / "a.png", rng.integers(0, 256, (37, 61, 3), dtype=np.uint8))
    write_png(tmp_path / "in" / "b.png", rng.integers(0, 256, (70, 40, 3), dtype=np.uint8))
    out = tmp_path / "out"
    rc = main(["predict", str(tmp_path / "in"), "--weights", str(tmp_path / "w.safetensors"), "--out", str(out),
               "--window", "48", "--stride", "32", "--scales", "0.75,1.0", "--flip", "--no-progress"])
    assert rc == 0
    kinds = ("label", "color", "overlay", "legend")
    assert sorted(os.listdir(out)) == sorted(f"{s}_{k}.png" for s in "ab" for k in kinds)
    label = read_mask(out / "a_label.png")
    assert label.shape == (37, 61) and label.max() < 4
    colour = read_image(out / "a_color.png")
    np.testing.assert_array_equal(colour, palette(4)[label])
    assert read_image(out / "b_overlay.png").shape == (70, 40, 3)
    # --model + --num-classes path, and the same labels as the Python API
    out2 = tmp_path / "out2"
    main(["predict", str(tmp_path / "in" / "a.png"), "--weights", str(tmp_path / "w.safetensors"), "--model", "b0",
          "--num-classes", "4", "--out", str(out2), "--no-progress"])
    x = sf.train.transforms.normalize(torch.from_numpy(read_image(tmp_path / "in" / "a.png")).permute(2, 0, 1).float())
    expected = predict_probs(model.eval(), x[None]).argmax(1)[0].numpy()
    np.testing.assert_array_equal(read_mask(out2 / "a_label.png"), expected)


def test_palette_distinct_and_not_black():
    pal = palette(150)
    assert len({tuple(c) for c in pal}) == 150 and not (pal == 0).all(1).any()
