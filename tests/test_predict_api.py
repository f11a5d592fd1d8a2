"""segformer_fast.predict / predict_probs and model.predict: every input kind, lists, Hugging Face models,
errors, mode restoring; from_pretrained of a training output folder."""

import pathlib

import numpy as np
import pytest
import torch

import segformer_fast as sf
from segformer_fast.testing import perturb_parameters
from segformer_fast.train.imageio import read_image, write_png
from segformer_fast.train.inference import predict_probs as probs_of_normalised
from segformer_fast.train.transforms import normalize

K = 5


def _segformer():
    torch.manual_seed(0)
    return perturb_parameters(sf.segformer("b0", num_classes=K, backend="torch", depths=(1, 1, 1, 1))).eval()


def _setr():
    torch.manual_seed(0)
    return perturb_parameters(sf.setr("naive", num_classes=K, embed_dim=32, depth=2, num_heads=2, img_size=32,
                                      backend="torch", aux=False)).eval()


def _image(hw=(37, 53), seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=hw + (3,), dtype=np.uint8)


def _manual(model, image, **kw):
    """The chain the API wraps: read_image -> normalize -> predict_probs (one image)."""
    x = normalize(torch.from_numpy(image).permute(2, 0, 1).float())[None]
    return probs_of_normalised(model, x, **kw)[0]


def _assert_same_labels(labels, probs_want):
    """Labels equal the reference argmax wherever its top two classes are not (numerically) tied."""
    top2 = probs_want.topk(2, dim=0).values
    clear = (top2[0] - top2[1]) > 1e-4
    assert labels.dtype == torch.int64 and labels.shape == probs_want.shape[1:]
    assert clear.float().mean() > 0.9
    assert torch.equal(labels[clear], probs_want.argmax(0)[clear])


@pytest.mark.parametrize("kind", ["str", "path", "pil", "numpy", "uint8_tensor", "float_tensor"])
@pytest.mark.parametrize("family", ["segformer", "setr"])
def test_every_input_kind_matches_the_manual_chain(tmp_path, kind, family):
    from PIL import Image

    model = _segformer() if family == "segformer" else _setr()
    path = tmp_path / "photo.png"
    write_png(path, _image())
    image = read_image(path)
    given = {"str": str(path), "path": pathlib.Path(path), "pil": Image.open(path), "numpy": image,
             "uint8_tensor": torch.from_numpy(image).permute(2, 0, 1),
             "float_tensor": torch.from_numpy(image).permute(2, 0, 1).float() / 255}[kind]
    want = _manual(model, image)
    probs = model.predict_probs(given)
    assert probs.shape == (K, 37, 53) and probs.dtype == torch.float32
    torch.testing.assert_close(probs, want, rtol=1e-5, atol=1e-5)
    _assert_same_labels(model.predict(given), want)
    _assert_same_labels(sf.predict(model, given), want)


def test_list_gives_a_list_at_each_image_size_batched_by_size():
    model = _segformer()
    images = [_image((37, 53), 0), _image((40, 33), 1), _image((37, 53), 2), _image((37, 53), 3)]
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
    out = sf.predict(model, images, batch_size=2)
    hook.remove()
    assert isinstance(out, list) and [tuple(t.shape) for t in out] == [(37, 53), (40, 33), (37, 53), (37, 53)]
    assert sorted(calls) == sorted([(2, 3, 37, 53), (1, 3, 37, 53), (1, 3, 40, 33)])
    for labels, image in zip(out, images):
        _assert_same_labels(labels, _manual(model, image))


def test_options_size_window_scales_flip():
    model = _segformer()
    image = _image((45, 61))
    x = torch.from_numpy(image).permute(2, 0, 1).float()

    # size: shorter side resized (as EvalTransform does), probabilities back at the image's size
    small = torch.nn.functional.interpolate(x[None], size=(32, 43), mode="bilinear", align_corners=False)
    want = probs_of_normalised(model, normalize(small))
    want = torch.nn.functional.interpolate(want, size=(45, 61), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(sf.predict_probs(model, image, size=32), want, rtol=1e-5, atol=1e-5)
    assert sf.predict(model, image, size=(40, 40)).shape == (45, 61)

    kw = dict(window=40, stride=24, scales=(0.75, 1.0), flip=True)
    torch.testing.assert_close(sf.predict_probs(model, image, **kw), _manual(model, image, **kw), rtol=1e-5, atol=1e-5)
    default_stride = _manual(model, image, window=40, stride=30)
    torch.testing.assert_close(sf.predict_probs(model, image, window=40), default_stride, rtol=1e-5, atol=1e-5)


def test_train_mode_is_restored_and_no_graph_is_built():
    model = _segformer().train()
    model.encoder.stages[0].eval()  # a submodule's own mode survives too
    probs = model.predict_probs(_image())
    assert not probs.requires_grad
    assert model.training and not model.encoder.stages[0].training and model.decoder.training
    model.eval()
    model.predict(_image())
    assert not model.training


def test_patched_hugging_face_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.SegformerConfig(num_labels=K, depths=[1, 1, 1, 1])
    hf = perturb_parameters(transformers.SegformerForSemanticSegmentation(cfg)).eval()
    sf.patch(hf)
    image = _image()
    want = _manual(lambda x: hf(pixel_values=x).logits, image)
    torch.testing.assert_close(sf.predict_probs(hf, image), want, rtol=1e-5, atol=1e-5)
    _assert_same_labels(sf.predict(hf, image), want)
    out = sf.predict(hf, [image, _image((40, 33))])
    assert [tuple(t.shape) for t in out] == [(37, 53), (40, 33)]


@pytest.mark.parametrize("bad,error,words", [
    (np.zeros((37, 53, 4), np.uint8), ValueError, "(H, W, 3)"),
    (np.zeros((37, 53), np.uint8), ValueError, "(H, W, 3)"),
    (np.zeros((37, 53, 3), np.float32), TypeError, "uint8"),
    (torch.zeros(1, 37, 53), ValueError, "(3, H, W)"),
    (torch.zeros(37, 53, 3, dtype=torch.uint8), ValueError, "channels first"),
    (torch.full((3, 37, 53), 255.0), ValueError, "[0, 1]"),
    ("no/such/photo.jpg", FileNotFoundError, "no/such/photo.jpg"),
    (3.5, TypeError, "PIL image"),
])
def test_bad_inputs_say_what_is_wrong(bad, error, words):
    model = _segformer().train()
    with pytest.raises(error) as info:
        sf.predict(model, [_image(), bad])
    assert words in str(info.value) and "image 1" in str(info.value)
    assert model.training


def test_from_pretrained_reads_a_train_output_folder(tmp_path):
    from segformer_fast.testing import tiny_train_config
    from segformer_fast.train import train

    result = train(tiny_train_config(tmp_path, steps=2, val_every=2))
    trained = result["model"].cpu().eval()
    loaded = sf.from_pretrained(tmp_path)
    assert type(loaded) is type(trained) and not loaded.training
    want, got = trained.state_dict(), loaded.state_dict()
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k].cpu()) for k in want)
    x = torch.randn(1, 3, 37, 53)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="training output folder"):
        sf.from_pretrained(tmp_path, num_classes=3)
