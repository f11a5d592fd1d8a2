"""read_image on 16-bit and float images: scaled to 0..255, never clipped at 255."""

import numpy as np
import pytest
from PIL import Image

from segformer_fast.train.imageio import read_image


def _ramp(dtype, hi):
    return np.linspace(0, hi, 6 * 7, dtype=np.float64).reshape(6, 7).astype(dtype)


@pytest.mark.parametrize("mode, name", [("I;16", "a.png"), ("I", "a.tiff")])
def test_read_image_scales_16_bit_png(tmp_path, mode, name):
    """A 16-bit grey PNG ("I;16"; "I" is a 32-bit integer TIFF holding 16-bit values) is scaled by 1/257."""
    v = _ramp(np.uint16, 65535)
    v[0, 0], v[0, 1], v[0, 2] = 0, 65535, 257 * 100
    im = Image.fromarray(v) if mode == "I;16" else Image.fromarray(v.astype(np.int32))
    im.save(tmp_path / name)
    with Image.open(tmp_path / name) as back:
        assert back.mode == mode
    got = read_image(tmp_path / name)
    assert got.shape == (6, 7, 3) and got.dtype == np.uint8
    want = np.rint(v / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(got, np.repeat(want[..., None], 3, axis=2))
    assert got[0, 1, 0] == 255 and got[0, 2, 0] == 100 and len(np.unique(got)) > 30  # not clipped to 0/255


@pytest.mark.parametrize("hi, scale", [(1.0, 255.0), (255.0, 1.0), (4000.0, 255.0 / 4000.0)])
def test_read_image_scales_float_tiff(tmp_path, hi, scale):
    v = _ramp(np.float32, hi)
    Image.fromarray(v).save(tmp_path / "a.tiff")
    with Image.open(tmp_path / "a.tiff") as back:
        assert back.mode == "F"
    got = read_image(tmp_path / "a.tiff")
    want = np.clip(np.rint(v.astype(np.float64) * scale), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(got[..., 0], want)
    assert got[..., 0].max() == 255 and len(np.unique(got)) > 30


def test_read_image_8_bit_unchanged(tmp_path):
    v = (np.arange(6 * 7 * 3) % 256).astype(np.uint8).reshape(6, 7, 3)
    Image.fromarray(v).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), v)
    Image.fromarray(v[..., 0]).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_image(tmp_path / "g.png"), np.repeat(v[..., :1], 3, axis=2))
