"""Readable pictures: palette label PNGs, colour maps, overlays, legends; predict's --size/--scale and the
README picture script."""

import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

import segformer_fast as sf
from segformer_fast.tools.cli import main
from segformer_fast.train.imageio import read_image, read_mask, write_png
from segformer_fast.train.inference import keep_ratio_size, predict_files
from segformer_fast.classes import CITYSCAPES_CLASSES, class_names
from segformer_fast.visualize import (BACKGROUND_COLOUR, CITYSCAPES_PALETTE, background_class, colorize, legend,
                                      overlay, palette, save_label_png)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class PointwiseModel(nn.Module):
    """Per-pixel logits at full resolution, with an optional id2label in its config."""

    def __init__(self, k=4, id2label=None):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, k, 1)
        self.config = types.SimpleNamespace(num_classes=k, id2label=id2label)

    def forward(self, x):
        return self.conv(x)


def _labels(hw=(7, 9), k=5, seed=0):
    return np.random.default_rng(seed).integers(0, k, size=hw)


def _photo(hw=(7, 9), seed=1):
    return np.random.default_rng(seed).integers(0, 256, size=hw + (3,), dtype=np.uint8)


def test_palette_is_deterministic_with_a_neutral_background_and_distinct_colours():
    pal = palette(6)
    assert pal.dtype == np.uint8 and pal.shape == (6, 3)
    np.testing.assert_array_equal(pal, palette(6))
    assert tuple(pal[0]) == BACKGROUND_COLOUR and len(set(BACKGROUND_COLOUR)) == 1  # grey
    chroma = pal[1:].max(1).astype(int) - pal[1:].min(1)
    assert (chroma > 80).all()  # the classes are clearly coloured, not grey
    first = palette(9)[1:].astype(int)
    distance = np.abs(first[:, None] - first[None]).sum(-1) + 1000 * np.eye(8, dtype=int)
    assert distance.min() > 60  # the first classes are well apart
    for k in (150, 256):
        many = palette(k)
        assert len({tuple(c) for c in many}) == k and not (many == 0).all(1).any()
    none = palette(5, background=None)
    assert BACKGROUND_COLOUR not in {tuple(c) for c in none}
    np.testing.assert_array_equal(palette(5, background=2)[2], BACKGROUND_COLOUR)
    np.testing.assert_array_equal(palette(19, names=[n.replace(" ", "_") for n in CITYSCAPES_CLASSES]),
                                  CITYSCAPES_PALETTE)
    with pytest.raises(ValueError, match="background class 5"):
        palette(5, background=5)


def test_background_class():
    assert background_class(None) == 0
    assert background_class(["LABEL_0", "LABEL_1"]) == 0  # Hugging Face's placeholder names are no names
    assert background_class(["wall", "Unlabeled", "sky"]) == 1
    assert background_class(["wall", "sky"]) is None


@pytest.mark.parametrize("k", [5, 256])
def test_label_png_is_a_palette_image_whose_indices_are_the_class_ids(tmp_path, k):
    labels = _labels((7, 9), k)
    labels[0, :3] = 255 if k < 256 else labels[0, :3]  # the ignore label fits in a palette image
    save_label_png(tmp_path / "l.png", labels, k)
    with Image.open(tmp_path / "l.png") as im:
        assert im.mode == "P" and im.size == (9, 7)
        np.testing.assert_array_equal(np.array(im), labels)
        entries = np.array(im.getpalette(), np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(entries[:k], palette(k))
    if k < 256:
        np.testing.assert_array_equal(entries[255], (0, 0, 0))
    np.testing.assert_array_equal(read_mask(tmp_path / "l.png"), labels)
    assert os.listdir(tmp_path) == ["l.png"]  # no temporary file left behind


def test_label_png_past_256_classes_is_16_bit_grey(tmp_path):
    labels = _labels((5, 6), 300)
    labels[0, 0] = 299
    save_label_png(tmp_path / "l.png", labels, 300)
    with Image.open(tmp_path / "l.png") as im:
        assert im.mode.startswith("I")
        np.testing.assert_array_equal(np.array(im), labels)
    with pytest.raises(ValueError, match="non-negative"):
        save_label_png(tmp_path / "bad.png", -labels, 300)
    with pytest.raises(ValueError, match="integer"):
        save_label_png(tmp_path / "bad.png", labels.astype(np.float32), 300)


def test_colorize_and_overlay_blend_values():
    labels, photo = _labels(), _photo()
    labels[0, 0] = 255  # ignored
    colours = colorize(labels, 5)
    np.testing.assert_array_equal(colours[labels < 5], palette(5)[labels[labels < 5]])
    np.testing.assert_array_equal(colours[0, 0], (0, 0, 0))
    for alpha in (0.0, 0.3, 0.6, 1.0):
        got = overlay(photo, labels, 5, alpha)
        want = np.clip(np.rint((1 - alpha) * photo.astype(np.float32) + alpha * colours.astype(np.float32)), 0, 255)
        want[0, 0] = photo[0, 0]  # ignored pixels are never painted
        np.testing.assert_array_equal(got, want.astype(np.uint8))
    np.testing.assert_array_equal(overlay(photo, labels, 5, 0.0), photo)
    assert (overlay(photo, labels, 5, 1.0)[labels == 3] == palette(5)[3]).all()


def test_overlay_leaves_the_background_unpainted():
    labels, photo = _labels(), _photo()
    got = overlay(photo, labels, 5, 0.6, paint_background=False)
    painted = overlay(photo, labels, 5, 0.6)
    assert (labels == 0).any() and (labels != 0).any()
    np.testing.assert_array_equal(got[labels == 0], photo[labels == 0])
    np.testing.assert_array_equal(got[labels != 0], painted[labels != 0])
    other = overlay(photo, labels, 5, 0.6, paint_background=False, background=2)
    np.testing.assert_array_equal(other[labels == 2], photo[labels == 2])
    assert not np.array_equal(other[labels == 0], photo[labels == 0])
    with pytest.raises(ValueError, match="alpha"):
        overlay(photo, labels, 5, 1.5)
    with pytest.raises(ValueError, match=r"\(7, 8\)"):
        overlay(photo[:, :8], labels, 5)


def test_legend_has_one_row_per_class_present():
    labels = np.array([[0, 2, 2], [5, 5, 255]])
    names = ["background", "cat", "dog", "bird", "fish", "a much longer class name"]
    key = legend(labels, 6, names)
    row, pad = 20, 5
    assert key.dtype == np.uint8 and key.shape[0] == 2 * pad + 3 * row and key.shape[2] == 3
    for i, k in enumerate((0, 2, 5)):  # each row's swatch centre has its class's colour
        np.testing.assert_array_equal(key[pad + i * row + row // 2, pad + 8], palette(6)[k])
    assert key.shape[1] > legend(labels, 6)[0].size // 3  # a long name widens it
    tall = legend(labels, 6, names, row_height=32)
    assert tall.shape[0] == 2 * 8 + 3 * 32
    assert legend(np.full((4, 4), 255), 6).shape[0] == 2 * pad + row  # "no classes"
    assert legend([1, 3], 6).shape[0] == 2 * pad + 2 * row  # a list of ids works too


def test_legend_with_the_bitmap_font_of_pillow_without_freetype(monkeypatch):
    from PIL import ImageFont

    import segformer_fast.visualize as visualize

    if not hasattr(ImageFont, "load_default_imagefont"):
        pytest.skip("this Pillow has no separate bitmap default font (before 10.1)")
    monkeypatch.setattr(visualize, "_font", lambda size: ImageFont.load_default_imagefont())
    key = legend(np.array([0, 2, 5]), 6, ["background", "cat"])
    assert key.shape[0] == 2 * 5 + 3 * 20 and (key[:, 27:] < 64).all(-1).any()  # rows, and text right of the swatches


def test_predict_files_writes_the_four_pictures(tmp_path):
    model = PointwiseModel(4, {0: "sky", 1: "background", 2: "tree", 3: "car"}).eval()
    photo = _photo((23, 31), seed=3)
    write_png(tmp_path / "in" / "p.png", photo)
    out = tmp_path / "out"
    written = predict_files(model, [str(tmp_path / "in" / "p.png")], str(out), alpha=0.7, paint_background=False,
                            progress=False)
    assert sorted(os.path.basename(p) for p in written) == [f"p_{s}.png" for s in ("color", "label", "legend",
                                                                                   "overlay")]
    want = sf.predict(model, photo).numpy()
    with Image.open(out / "p_label.png") as im:
        assert im.mode == "P"
        labels = np.array(im)
    np.testing.assert_array_equal(labels, want)
    pictures = {"background": 1, "names": class_names(model)}  # "background" is named: class 1
    np.testing.assert_array_equal(read_image(out / "p_color.png"), colorize(labels, 4, **pictures))
    shown = read_image(out / "p_overlay.png")
    np.testing.assert_array_equal(shown, overlay(photo, labels, 4, 0.7, paint_background=False, **pictures))
    np.testing.assert_array_equal(shown[labels == 1], photo[labels == 1])
    assert read_image(out / "p_legend.png").shape[0] == 10 + 20 * len(np.unique(labels))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "p_legend.png").write_bytes(b"my own legend")
    with pytest.raises(FileExistsError, match="1 output file.*p_legend.png"):
        predict_files(model, [str(tmp_path / "in" / "p.png")], str(mine), progress=False)
    assert os.listdir(mine) == ["p_legend.png"] and (mine / "p_legend.png").read_bytes() == b"my own legend"


def test_size_and_scale_resize_before_inference_and_return_the_original_size(tmp_path):
    assert keep_ratio_size((375, 500), (2048, 512)) == (512, 683)
    assert keep_ratio_size((1024, 2048), (2048, 512)) == (512, 1024)
    model = PointwiseModel(3).eval()
    with torch.no_grad():
        model.conv.weight.normal_(0.0, 2.0)
    photo = np.kron(_photo((9, 13), seed=4), np.ones((3, 3, 1), np.uint8))  # (27, 39): resizing changes labels
    write_png(tmp_path / "a.png", photo)
    for extra, size in (({"size": 16}, 16), ({"scale": (24, 12)}, keep_ratio_size((27, 39), (24, 12)))):
        out = tmp_path / str(size)
        predict_files(model, [str(tmp_path / "a.png")], str(out), progress=False, **extra)
        labels = read_mask(out / "a_label.png")
        assert labels.shape == (27, 39) and read_image(out / "a_overlay.png").shape == (27, 39, 3)
        np.testing.assert_array_equal(labels, sf.predict(model, photo, size=size).numpy())
    assert not np.array_equal(labels, sf.predict(model, photo).numpy())
    with pytest.raises(ValueError, match="not both"):
        predict_files(model, [str(tmp_path / "a.png")], str(tmp_path / "x"), size=16, scale=(24, 12))
    with pytest.raises(ValueError, match="alpha"):
        predict_files(model, [str(tmp_path / "a.png")], str(tmp_path / "x"), alpha=-0.1)


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    torch.manual_seed(0)
    model = sf.segformer("b0", num_classes=3, backend="torch", depths=(1, 1, 1, 1)).eval()
    sf.save_weights(model, path)
    return model, str(path)


def test_predict_cli_in_a_subprocess(tmp_path, tiny_weights):
    model, weights = tiny_weights
    photo = _photo((45, 70), seed=5)
    write_png(tmp_path / "in" / "cat.png", photo)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "segformer_fast.tools.cli", "predict", str(tmp_path / "in"), "--weights", weights,
           "--out", str(out), "--alpha", "0.6", "--no-background-paint", "--size", "40", "--backend", "torch",
           "--no-progress"]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr
    assert sorted(os.listdir(out)) == [f"cat_{s}.png" for s in ("color", "label", "legend", "overlay")]
    with Image.open(out / "cat_label.png") as im:
        assert im.mode == "P" and im.size == (70, 45)
        labels = np.array(im)
    np.testing.assert_array_equal(labels, model.predict(photo, size=40).numpy())
    shown = read_image(out / "cat_overlay.png")
    np.testing.assert_array_equal(shown, overlay(photo, labels, 3, 0.6, paint_background=False))


def test_predict_cli_scale_and_option_errors(tmp_path, tiny_weights, capsys):
    model, weights = tiny_weights
    photo = _photo((45, 70), seed=6)
    write_png(tmp_path / "dog.png", photo)
    base = ["predict", str(tmp_path / "dog.png"), "--weights", weights, "--backend", "torch", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "o"), "--scale", "64,32", "--background-class", "none"]) == 0
    size = keep_ratio_size((45, 70), (64, 32))
    np.testing.assert_array_equal(read_mask(tmp_path / "o" / "dog_label.png"), model.predict(photo, size=size).numpy())
    colours = read_image(tmp_path / "o" / "dog_color.png")
    assert BACKGROUND_COLOUR not in {tuple(c) for c in colours.reshape(-1, 3)}
    for bad, said in ((["--size", "40", "--scale", "64,32"], "not allowed with"), (["--alpha", "1.5"], "0 to 1"),
                      (["--size", "0"], "positive"), (["--background-class", "x"], "class id")):
        with pytest.raises(SystemExit):
            main(base + ["--out", str(tmp_path / "bad")] + bad)
        assert said in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_a_model_with_cityscapes_names_gets_the_cityscapes_colours(tmp_path):
    model = PointwiseModel(19, dict(enumerate(CITYSCAPES_CLASSES))).eval()
    write_png(tmp_path / "street.png", _photo((16, 24), seed=7))
    predict_files(model, [str(tmp_path / "street.png")], str(tmp_path), progress=False)
    labels = read_mask(tmp_path / "street_label.png")
    assert len(np.unique(labels)) > 3
    np.testing.assert_array_equal(read_image(tmp_path / "street_color.png"), CITYSCAPES_PALETTE[labels])


def test_readme_picture_script_runs(tmp_path):
    run = subprocess.run([sys.executable, os.path.join(ROOT, "docs", "make_pictures.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    names = sorted(os.listdir(tmp_path))
    assert names == [f"example_{w}.png" for w in ("label", "legend", "overlay", "photo")]
    for name in names:
        assert os.path.getsize(tmp_path / name) < 60 * 1024
    with Image.open(tmp_path / "example_label.png") as im:
        assert im.mode == "P" and im.size == (256, 256) and set(np.unique(np.array(im))) == set(range(6))
    for name in names:  # the committed pictures are what the script makes
        committed = os.path.join(ROOT, "docs", "images", name)
        if os.path.exists(committed):
            np.testing.assert_array_equal(read_image(committed), read_image(tmp_path / name))
