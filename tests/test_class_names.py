"""Class names (config.id2label) through configs, weight files, Hugging Face folders, checkpoints,
training outputs and the evaluate command."""

import json
import os

import numpy as np
import pytest
import torch

import segformer_fast as sf
from segformer_fast.classes import (ADE20K_CLASSES, CITYSCAPES_CLASSES, SYNTHETIC_CLASSES, class_names,
                                    model_class_names)
from segformer_fast.configs import SegFormerConfig, SETRConfig, get_config, get_setr_config
from segformer_fast.io import export_state_dict, from_pretrained, load_weights, save_weights, to_hf
from segformer_fast.io.setr_weights import load_setr_weights
from segformer_fast.testing import tiny_train_config
from segformer_fast.tools.cli import main
from segformer_fast.train import SegmentationFolder, train
from segformer_fast.train.build import build_model
from segformer_fast.train.imageio import write_png

SMALL = dict(depths=(1, 1, 1, 1), hidden_sizes=(16, 32, 32, 64), num_heads=(1, 2, 2, 4), decoder_dim=32)
TINY_SETR = dict(embed_dim=32, depth=4, num_heads=2, head_channels=16, mla_head_channels=8)
NAMES = ("sky", "road", "tree")


def _segformer(num_classes=3, **kw):
    return sf.segformer("b0", num_classes=num_classes, backend="torch", **{**SMALL, **kw}).eval()


def _setr(num_classes=3, **kw):
    return sf.setr("naive", num_classes=num_classes, img_size=32, backend="torch", **{**TINY_SETR, **kw}).eval()


def _same_outputs(a, b):
    size = a.config.img_size if isinstance(a, sf.SETR) else 64
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        return torch.equal(a(x), b(x))


# ----- configs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda **kw: get_config("b0", **kw), lambda **kw: get_setr_config("vit-b16", **kw)])
def test_config_names_round_trip_through_json(make):
    cfg = make(num_classes=3, id2label=list(NAMES))
    assert cfg.id2label == {0: "sky", 1: "road", 2: "tree"}
    assert cfg.label2id == {"sky": 0, "road": 1, "tree": 2} and cfg.class_names == NAMES
    text = json.dumps(cfg.to_dict())
    assert json.loads(text)["id2label"] == {"0": "sky", "1": "road", "2": "tree"}  # JSON keys are strings
    back = type(cfg).from_dict(json.loads(text))
    assert back == cfg and back.id2label == {0: "sky", 1: "road", 2: "tree"}
    assert all(isinstance(k, int) for k in back.id2label)
    hash(back)  # still hashable (id2label is left out of the hash)
    assert back != cfg.replace(id2label=["sky", "road", "grass"])

    unnamed = make(num_classes=2)
    assert unnamed.id2label is None and unnamed.class_names == ("class 0", "class 1")
    assert unnamed.label2id == {"class 0": 0, "class 1": 1}


def test_config_json_without_names_loads():
    """Configs written before id2label existed (no such key) still load, unnamed."""
    old = get_config("b0", num_classes=4).to_dict()
    del old["id2label"]
    assert SegFormerConfig.from_dict(json.loads(json.dumps(old))).id2label is None
    old = get_setr_config("vit-b16", num_classes=4).to_dict()
    del old["id2label"]
    assert SETRConfig.from_dict(old).id2label is None


def test_config_names_are_validated():
    with pytest.raises(ValueError, match="id2label has 2 names but num_classes is 3"):
        get_config("b0", num_classes=3, id2label=["a", "b"])
    with pytest.raises(ValueError, match="SETRConfig.id2label has 4 names but num_classes is 3"):
        get_setr_config("vit-b16", num_classes=3, id2label={0: "a", 1: "b", 2: "c", 3: "d"})
    with pytest.raises(ValueError, match=r"class ids \[5\] outside 0..2"):
        get_config("b0", num_classes=3, id2label={0: "a", 1: "b", 5: "c"})
    with pytest.raises(ValueError, match="key 'x'"):
        get_config("b0", num_classes=2, id2label={"0": "a", "x": "b"})
    with pytest.raises(ValueError, match=r"id2label\[1\] is 7, expected a string"):
        get_config("b0", num_classes=2, id2label={0: "a", 1: 7})
    with pytest.raises(ValueError, match="a list of names, got str"):
        get_config("b0", num_classes=2, id2label="ab")


def test_changing_num_classes_drops_names_that_no_longer_fit():
    cfg = get_config("b0", num_classes=3, id2label=NAMES)
    assert cfg.replace(num_classes=5).id2label is None
    assert cfg.replace(num_classes=3).id2label == dict(enumerate(NAMES))
    assert cfg.replace(num_classes=2, id2label=["a", "b"]).id2label == {0: "a", 1: "b"}
    with pytest.raises(ValueError, match="1 name but num_classes is 2"):
        cfg.replace(num_classes=2, id2label=["a"])


def test_builtin_names():
    assert len(ADE20K_CLASSES) == 150 == len(set(ADE20K_CLASSES))
    assert (ADE20K_CLASSES[0], ADE20K_CLASSES[2], ADE20K_CLASSES[12], ADE20K_CLASSES[20], ADE20K_CLASSES[149]) == (
        "wall", "sky", "person", "car", "flag")
    assert len(CITYSCAPES_CLASSES) == 19 and CITYSCAPES_CLASSES[0] == "road" and CITYSCAPES_CLASSES[18] == "bicycle"
    from segformer_fast.train.synthetic import SYNTHETIC_CLASSES as original

    assert SYNTHETIC_CLASSES is original
    assert class_names({0: "sky"}, 2) == ("sky", "class 1") and class_names(None, 2) == ("class 0", "class 1")


def test_dataset_layouts_name_their_classes(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("training", "validation"):
        write_png(tmp_path / "ade" / "images" / split / "a.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        write_png(tmp_path / "ade" / "annotations" / split / "a.png", np.ones((8, 8), np.uint8))
    for split in ("train", "val"):
        write_png(tmp_path / "cs" / "leftImg8bit" / split / "c" / "x_leftImg8bit.png",
                  rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        write_png(tmp_path / "cs" / "gtFine" / split / "c" / "x_gtFine_labelTrainIds.png", np.zeros((8, 8), np.uint8))
    ade = SegmentationFolder(tmp_path / "ade", "val")
    assert ade.class_names == ADE20K_CLASSES
    assert SegmentationFolder(tmp_path / "cs", "val").class_names == CITYSCAPES_CLASSES
    assert SegmentationFolder(tmp_path / "ade", "val", num_classes=151).class_names is None  # other count
    model = build_model("b0", 150, "torch", overrides=SMALL, id2label=ade.class_names)
    assert model.config.id2label[12] == "person" and model_class_names(model, ade)[149] == "flag"
    unnamed = build_model("b0", 150, "torch", overrides=SMALL)
    assert model_class_names(unnamed, ade)[2] == "sky"  # the dataset's names when the model has none
    assert model_class_names(unnamed)[2] == "class 2"


# ----- weight files, Hugging Face folders --------------------------------------------------------


def test_save_weights_keeps_the_names(tmp_path):
    model = _segformer(id2label=NAMES)
    save_weights(model, tmp_path / "m.safetensors")
    loaded = from_pretrained(tmp_path / "m.safetensors", backend="torch")
    assert loaded.config == model.config and loaded.config.id2label == dict(enumerate(NAMES))
    assert _same_outputs(loaded, model)
    assert from_pretrained(tmp_path / "m.safetensors", num_classes=5, strict=False).config.id2label is None

    unnamed = _segformer()
    load_weights(unnamed, tmp_path / "m.safetensors")
    assert unnamed.config.id2label == dict(enumerate(NAMES))  # an unnamed model takes the file's names
    own = _segformer(id2label=["a", "b", "c"])
    load_weights(own, tmp_path / "m.safetensors")
    assert own.config.class_names == ("a", "b", "c")  # a named one keeps its own


def test_setr_save_weights_keeps_the_names(tmp_path):
    model = _setr(id2label=NAMES)
    assert model.config.id2label[1] == "road"
    save_weights(model, tmp_path / "s.safetensors")
    loaded = from_pretrained(tmp_path / "s.safetensors", backend="torch")
    assert isinstance(loaded, sf.SETR) and loaded.config.id2label == dict(enumerate(NAMES))
    assert _same_outputs(loaded, model)
    assert from_pretrained(tmp_path / "s.safetensors", num_classes=4, strict=False).config.id2label is None
    unnamed = _setr()
    load_setr_weights(unnamed, tmp_path / "s.safetensors")
    assert unnamed.config.class_names == NAMES


def _hf_folder(path, model, id2label):
    path.mkdir()
    torch.save(export_state_dict(model, "hf4"), path / "pytorch_model.bin")
    config = {"model_type": "segformer", "hidden_sizes": list(SMALL["hidden_sizes"]), "depths": list(SMALL["depths"]),
              "num_attention_heads": list(SMALL["num_heads"]), "decoder_hidden_size": SMALL["decoder_dim"],
              "num_labels": model.config.num_classes, "id2label": id2label,
              "label2id": {v: int(k) for k, v in id2label.items()}}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_from_pretrained_keeps_hugging_face_names(tmp_path):
    src = _segformer()
    folder = _hf_folder(tmp_path / "hf", src, {"0": "sky", "1": "road", "2": "tree"})
    model = from_pretrained(folder, backend="torch")
    assert model.config.id2label == {0: "sky", 1: "road", 2: "tree"} and model.config.label2id["tree"] == 2
    placeholders = _hf_folder(tmp_path / "hf2", src, {str(k): f"LABEL_{k}" for k in range(3)})
    assert from_pretrained(placeholders, backend="torch").config.id2label is None  # transformers' defaults
    assert from_pretrained(folder, num_classes=4, strict=False, backend="torch").config.id2label is None
    bad = _hf_folder(tmp_path / "hf3", src, {"0": "sky", "1": "road", "7": "tree"})
    with pytest.raises(ValueError, match="id2label is unusable.*outside 0..2"):
        from_pretrained(bad, backend="torch")


def test_to_hf_carries_the_names(tmp_path):
    pytest.importorskip("transformers")
    model = _segformer(id2label=NAMES)
    hf = to_hf(model)
    assert hf.config.id2label == {0: "sky", 1: "road", 2: "tree"}
    assert hf.config.label2id == {"sky": 0, "road": 1, "tree": 2} and hf.config.num_labels == 3
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(hf(pixel_values=x).logits, model(x), rtol=1e-4, atol=1e-5)
    hf.save_pretrained(tmp_path / "hf")
    back = from_pretrained(tmp_path / "hf", backend="torch")
    assert back.config.id2label == model.config.id2label
    assert to_hf(_segformer()).config.id2label == {0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}
    unnamed = _segformer()
    load_weights(unnamed, hf)  # from a Hugging Face model object
    assert unnamed.config.class_names == NAMES
    with pytest.raises(TypeError, match="SegFormer"):
        to_hf(_setr())


# ----- checkpoints, training outputs, evaluate -----------------------------------------------------


def test_checkpoint_round_trip_keeps_the_names(tmp_path):
    from segformer_fast.train.build import model_from_record, model_record
    from segformer_fast.train.checkpoint import read_checkpoint, write_checkpoint
    from segformer_fast.train.inference import load_model

    for model in (_segformer(id2label=NAMES), _setr(id2label=NAMES)):
        out = tmp_path / type(model).__name__
        state = {f"model.{k}": v for k, v in model.state_dict().items()}
        write_checkpoint(str(out), 1, state, {"model": model_record(model)})
        _, meta = read_checkpoint(str(out))
        assert model_from_record(meta["model"], "torch").config == model.config
        loaded = load_model(str(out), backend="torch")
        assert loaded.config.id2label == dict(enumerate(NAMES)) and _same_outputs(loaded, model)


def test_training_outputs_and_evaluate_use_the_names(tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "run"
    train(tiny_train_config(out, steps=2, val_every=2, synthetic_val=2, backend="torch"))
    names = dict(enumerate(SYNTHETIC_CLASSES))
    assert from_pretrained(out).config.id2label == names  # the folder (its checkpoint)
    assert from_pretrained(out / "model.safetensors").config.id2label == names
    entry = json.loads((out / "metrics.json").read_text())["history"][-1]
    assert list(entry["per_class_iou_by_name"]) == list(SYNTHETIC_CLASSES)
    assert [v if v is not None else float("nan") for v in entry["per_class_iou_by_name"].values()] == \
        pytest.approx([v if v is not None else float("nan") for v in entry["per_class_iou"]], nan_ok=True)

    # a model with its own names: evaluate prints and writes them, not the dataset's
    own = ("bg", "horizontal", "vertical", "slanted", "chequered", "spotted")
    model = from_pretrained(out / "model.safetensors").eval()
    model.config = model.config.replace(id2label=own)
    save_weights(model, tmp_path / "own.safetensors")
    argv = ["evaluate", "--data", "synthetic", "--synthetic-size", "64", "--synthetic-val", "2", "--no-progress",
            "--backend", "torch"]
    rc = main(argv + ["--weights", str(tmp_path / "own.safetensors"), "--json", str(tmp_path / "m.json")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "chequered" in text and "spotted" in text and "h-stripes" not in text
    saved = json.loads((tmp_path / "m.json").read_text())
    assert saved["class_names"] == list(own) and list(saved["per_class_iou_by_name"]) == list(own)

    # an unnamed model: the dataset's names
    model.config = model.config.replace(id2label=None)
    save_weights(model, tmp_path / "plain.safetensors")
    assert main(argv + ["--weights", str(tmp_path / "plain.safetensors")]) == 0
    assert "h-stripes" in capsys.readouterr().out
