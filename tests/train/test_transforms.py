import numpy as np
import pytest
import torch

from segformer_fast.train.transforms import (IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform, normalize,
                                             photometric_distortion, rescale_factor)


def _sample(h=60, w=90):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    mask = np.tile(np.arange(w) % 4, (h, 1)).astype(np.int64)  # column index mod 4: flips are visible
    return image, mask


@pytest.mark.parametrize("crop", [(64, 64), (48, 80)])
def test_output_shapes_dtypes_and_labels(crop):
    image, mask = _sample()
    tf = TrainTransform(crop=crop)
    for seed in range(6):
        img, lab = tf(image, mask, np.random.default_rng(seed))
        assert img.shape == (3,) + crop and img.dtype == torch.float32
        assert lab.shape == crop and lab.dtype == torch.int64
        assert set(lab.unique().tolist()) <= {0, 1, 2, 3, 255}


def test_small_images_are_padded_with_ignore():
    image, mask = _sample(20, 30)
    tf = TrainTransform(crop=(64, 64), ratio_range=(1.0, 1.0), flip_prob=0.0, photometric=False)
    img, lab = tf(image, mask, np.random.default_rng(0))
    assert (lab[20:, :] == 255).all() and (lab[:, 30:] == 255).all()
    assert (lab[:20, :30] != 255).all()
    assert (img[:, 20:, :] == 0).all() and (img[:, :, 30:] == 0).all()
    expected = normalize(torch.from_numpy(image).permute(2, 0, 1).float())
    torch.testing.assert_close(img[:, :20, :30], expected)


def test_same_seed_same_sample_and_flip_moves_image_with_mask():
    image, mask = _sample()
    tf = TrainTransform(crop=(48, 48))
    a = tf(image, mask, np.random.default_rng(7))
    b = tf(image, mask, np.random.default_rng(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # a mask equal to a function of the image: flips and crops must keep them in register
    mask = (image[..., 0] > 127).astype(np.int64)
    flip = TrainTransform(crop=(40, 60), ratio_range=(1.0, 1.0), flip_prob=1.0, photometric=False, cat_max_ratio=1.0)
    img, lab = flip(image, mask, np.random.default_rng(1))
    red = img[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    assert torch.equal((red > 127.5).long(), lab)


def test_rescale_ratio_range():
    image, mask = _sample(100, 100)
    tf = TrainTransform(crop=(400, 400), flip_prob=0.0, photometric=False, cat_max_ratio=1.0)
    sizes = set()
    for seed in range(30):
        _, lab = tf(image, mask, np.random.default_rng(seed))
        valid = lab != 255
        sizes.add(int(valid.any(1).sum()))
    assert min(sizes) >= 50 and max(sizes) <= 200 and max(sizes) - min(sizes) > 80
    assert rescale_factor((512, 683), (2048, 512)) == pytest.approx(1.0)
    assert rescale_factor((1024, 2048), (2048, 512), ratio=2.0) == pytest.approx(1.0)
    assert rescale_factor((10, 20), None, ratio=1.5) == 1.5


def test_cat_max_ratio_prefers_mixed_crops():
    mask = np.zeros((200, 200), np.int64)
    mask[:, 100:] = 1
    image = np.zeros((200, 200, 3), np.uint8)

    def balanced(cat_max_ratio):  # crops where neither class exceeds 75%
        tf = TrainTransform(crop=(64, 64), ratio_range=(1.0, 1.0), flip_prob=0.0, photometric=False,
                            cat_max_ratio=cat_max_ratio)
        fractions = [float(tf(image, mask, np.random.default_rng(s))[1].float().mean()) for s in range(20)]
        return sum(0.25 < f < 0.75 for f in fractions)

    assert balanced(0.75) >= 15 and balanced(1.0) <= 10


def test_photometric_changes_colours_within_range():
    img = torch.from_numpy(_sample()[0]).permute(2, 0, 1).float()
    outs = [photometric_distortion(img, np.random.default_rng(s)) for s in range(8)]
    assert all(o.min() >= 0 and o.max() <= 255 and o.shape == img.shape for o in outs)
    assert sum(not torch.equal(o, img) for o in outs) >= 6


def test_eval_transform_rescales_to_scale():
    image, _ = _sample(100, 200)
    assert EvalTransform((400, 100))(image).shape == (3, 100, 200)
    assert EvalTransform((100, 50))(image).shape == (3, 50, 100)
    assert EvalTransform(None)(image).shape == (3, 100, 200)
