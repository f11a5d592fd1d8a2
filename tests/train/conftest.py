import numpy as np
import pytest

from segformer_fast.train.imageio import write_png


def write_pair(image_path, mask_path, hw=(40, 48), labels=(0, 1, 2), seed=0, mask_hw=None):
    """A random RGB image and a mask drawn from ``labels`` (mask size ``mask_hw`` if given)."""
    rng = np.random.default_rng(seed)
    write_png(image_path, rng.integers(0, 256, size=hw + (3,), dtype=np.uint8))
    write_png(mask_path, rng.choice(np.asarray(labels), size=mask_hw or hw).astype(np.uint8))


@pytest.fixture
def pair_writer():
    return write_pair
