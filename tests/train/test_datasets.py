import os

import numpy as np
import pytest

from segformer_fast.train.datasets import DatasetError, SegmentationFolder, detect_layout
from segformer_fast.train.imageio import read_mask, write_png
from segformer_fast.train.synthetic import SyntheticSegmentation


def _ade(root, pair_writer, n=2, labels=(0, 1, 150)):
    for split in ("training", "validation"):
        for i in range(n):
            pair_writer(root / "images" / split / f"ADE_{i}.png",
                        root / "annotations" / split / f"ADE_{i}.png", labels=labels, seed=i)


def test_ade_layout_reduces_zero_label(tmp_path, pair_writer):
    _ade(tmp_path, pair_writer)
    assert detect_layout(tmp_path) == "ade"
    ds = SegmentationFolder(tmp_path, "val")
    assert len(ds) == 2 and ds.num_classes == 150 and ds.scale == (2048, 512)
    image, mask = ds[1]
    raw = read_mask(tmp_path / "annotations" / "validation" / "ADE_1.png")
    assert image.shape == (40, 48, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(mask[raw == 0], 255)
    np.testing.assert_array_equal(mask[raw == 1], 0)
    np.testing.assert_array_equal(mask[raw == 150], 149)


def test_ade_jpeg_images(tmp_path):
    from PIL import Image

    for split in ("training", "validation"):
        (tmp_path / "images" / split).mkdir(parents=True)
        Image.fromarray(np.full((33, 35, 3), 99, np.uint8)).save(tmp_path / "images" / split / "a.jpg")
        write_png(tmp_path / "annotations" / split / "a.png", np.full((33, 35), 3, np.uint8))
    image, mask = SegmentationFolder(tmp_path, "train")[0]
    assert image.shape == (33, 35, 3) and (mask == 2).all()


def test_cityscapes_layout(tmp_path, pair_writer):
    for split in ("train", "val"):
        for city in ("aachen", "bonn"):
            stem = f"{city}_000000_000019"
            pair_writer(tmp_path / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                        tmp_path / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png", labels=(0, 18, 255))
            write_png(tmp_path / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", np.zeros((40, 48), np.uint8))
    assert detect_layout(tmp_path) == "cityscapes"
    ds = SegmentationFolder(tmp_path, "train")
    assert len(ds) == 2 and ds.num_classes == 19
    _, mask = ds[0]
    assert set(np.unique(mask)) <= {0, 18, 255} and (mask == 255).any()
    assert ds.name(0) == "aachen_000000_000019_leftImg8bit"


def test_generic_flat_and_split(tmp_path, pair_writer):
    flat = tmp_path / "flat"
    for i in range(3):
        pair_writer(flat / "images" / f"im{i}.png", flat / "masks" / f"im{i}.png", labels=(0, 4), seed=i)
    ds = SegmentationFolder(flat, "val", num_classes=5)
    assert ds.layout == "generic" and len(ds) == 3
    with pytest.raises(DatasetError, match="num-classes"):
        SegmentationFolder(flat, "val")
    split = tmp_path / "split"
    pair_writer(split / "images" / "train" / "a.png", split / "masks" / "train" / "a.png")
    pair_writer(split / "images" / "val" / "b.png", split / "masks" / "val" / "b.png")
    assert SegmentationFolder(split, "val", num_classes=3).name(0) == "b"


def test_missing_mask_names_the_image(tmp_path, pair_writer):
    pair_writer(tmp_path / "images" / "a.png", tmp_path / "masks" / "a.png")
    pair_writer(tmp_path / "images" / "b.png", tmp_path / "masks_elsewhere" / "b.png")
    with pytest.raises(DatasetError, match=r"b\.png.*has no mask"):
        SegmentationFolder(tmp_path, "train", num_classes=3)


def test_size_mismatch_names_the_mask(tmp_path, pair_writer):
    pair_writer(tmp_path / "images" / "a.png", tmp_path / "masks" / "a.png")
    pair_writer(tmp_path / "images" / "b.png", tmp_path / "masks" / "b.png", mask_hw=(40, 47))
    ds = SegmentationFolder(tmp_path, "train", num_classes=3)
    ds[0]
    with pytest.raises(DatasetError, match=r"masks/b\.png.* is 47x40 but image"):
        ds[1]


def test_out_of_range_labels_name_the_mask(tmp_path, pair_writer):
    pair_writer(tmp_path / "images" / "a.png", tmp_path / "masks" / "a.png", labels=(0, 2, 7, 255))
    with pytest.raises(DatasetError, match=r"masks/a\.png.*label values \[7\] outside 0\.\.2"):
        SegmentationFolder(tmp_path, "train", num_classes=3)[0]
    _ade(tmp_path / "ade", pair_writer, n=1, labels=(0, 151))
    with pytest.raises(DatasetError, match=r"ADE_0\.png.*\[150\].*reduce_zero_label"):
        SegmentationFolder(tmp_path / "ade", "train")[0]


def test_unknown_layout_and_missing_split(tmp_path):
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DatasetError, match="cannot tell the layout"):
        detect_layout(tmp_path)
    os.makedirs(tmp_path / "x" / "images" / "training")
    os.makedirs(tmp_path / "x" / "annotations" / "training")
    with pytest.raises(DatasetError, match="no val or validation folder"):
        SegmentationFolder(tmp_path / "x", "val")


def test_synthetic_is_deterministic_and_split_disjoint():
    a = SyntheticSegmentation("train", 10, (64, 80), seed=3)
    b = SyntheticSegmentation("train", 10, (64, 80), seed=3)
    image, mask = a[4]
    assert image.shape == (64, 80, 3) and image.dtype == np.uint8 and mask.shape == (64, 80)
    np.testing.assert_array_equal(image, b[4][0])
    np.testing.assert_array_equal(mask, b[4][1])
    assert not np.array_equal(image, a[5][0])
    assert not np.array_equal(image, SyntheticSegmentation("val", 10, (64, 80), seed=3)[4][0])
    assert not np.array_equal(image, SyntheticSegmentation("train", 10, (64, 80), seed=4)[4][0])
    classes = np.unique(np.concatenate([a[i][1].ravel() for i in range(10)]))
    assert set(classes.tolist()) == set(range(a.num_classes))
